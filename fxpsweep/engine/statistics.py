"""Activation statistics from one float pass over the calibration images, cached.

Statistics depend on the model, the calibration images and how BatchNorm is
treated, not on any word length: a sweep gathers them once and every job
reuses them, from memory when the jobs share a process and from
``<cache_dir>/calibration/<key>.pt`` when they share a cache folder
(``fxpsweep.core.storage.cached``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fxpsweep.engine.calibration import TensorStats
from fxpsweep.core.storage import cached

SAMPLE_SIZE = 16384  # values kept per tensor, uniformly at random
STATS_VERSION = 3  # bump when what is gathered changes: old cache files are then ignored (3: gathered in float64)
RELU_SUFFIX = "|relu"  # statistics of relu(output), for registers read only by a ReLU

class StatsObserver:
    """Accumulates, per named tensor, the largest magnitude and a uniform random sample of values."""

    def __init__(self, sample_size: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self.sample_size = sample_size
        self.generator = torch.Generator().manual_seed(seed)
        self.max_abs: dict[str, float] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}

    def update(self, name: str, values: torch.Tensor) -> None:
        flat = values.detach().reshape(-1)
        if flat.numel() == 0:
            return
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), float(flat.abs().max()))
        # The same number of draws (with replacement) from every batch: uniform over the images.
        index = torch.randint(flat.numel(), (self.sample_size,), generator=self.generator).to(flat.device)
        self.samples.setdefault(name, []).append(flat[index].float().cpu())

    def result(self) -> dict[str, TensorStats]:
        stats = {}
        for name, parts in self.samples.items():
            pooled = torch.cat(parts)
            keep = torch.randperm(len(pooled), generator=self.generator)[: self.sample_size]
            stats[name] = TensorStats(self.max_abs[name], pooled[keep])
        return stats


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap fingerprint of a module's parameters and buffers (names, shapes, sums), for cache keys."""
    parts = []
    for name, t in module.state_dict().items():
        t64 = t.detach().double()
        parts.append(f"{name}:{tuple(t.shape)}:{float(t64.sum()):.17g}:{float(t64.abs().sum()):.17g}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def tensor_fingerprint(t: torch.Tensor) -> str:
    """An exact fingerprint of one tensor (its dtype, shape and bytes), for cache keys."""
    data = t.detach().cpu().contiguous()
    header = f"{data.dtype}:{tuple(data.shape)}:".encode()
    return hashlib.sha256(header + data.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def cached_stats(
    identity: dict[str, Any], cache_dir: str | Path | None, gather: Callable[[], dict[str, TensorStats]]
) -> tuple[dict[str, TensorStats], str]:
    """The statistics for ``identity``: from memory, from ``cache_dir/calibration/``, or gathered now (and cached).

    Returns them and where they came from: ``memory``, ``cache`` or ``computed``.
    """
    def gather_plain() -> dict[str, dict[str, torch.Tensor]]:
        return {n: {"max_abs": torch.tensor(s.max_abs), "sample": s.sample} for n, s in gather().items()}

    key = {"version": STATS_VERSION, "sample": SAMPLE_SIZE, **identity}
    raw, source = cached("calibration", key, cache_dir, gather_plain)
    return {name: TensorStats(float(v["max_abs"]), v["sample"]) for name, v in raw.items()}, source
