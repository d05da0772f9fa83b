"""Which exact kernel a layer runs on: the fastest, measured on this machine once and remembered.

The fastest kernel differs between processors by a factor of 50 (int8 GEMMs
on a processor with and without VNNI), so nothing is assumed: the first batch
a conv/linear layer sees (of each shape) runs through every kernel that
``kernels`` proves exact for it, each timed (one warm-up run, then the best
of up to three rounds, each timing every candidate in turn, so that a
machine whose speed drifts slows all alike; a kernel over three times slower
than the fastest after a round is not timed again), as the layer runs it
(``finish``): on the whole
batch, in the slices of the batch that bound its temporaries, with the
rounding of its result, since a kernel of several calls has its terms summed
and rounded in one pass and ``depthwise_loop`` rounds as it stores. A kernel
timed on fewer images than it runs would hide the cost of its slices. Their
outputs must agree bit for bit, since all are exact, on the first images of
the batch (``check``) and on two images of extreme codes (each the lowest or
the highest code the input may hold, where intermediate sums of a library's
kernel would overflow first): one that differs from ``float64`` (the
plainest) is a bug in it or in the library under it, is logged as an error
and never chosen. ``arithmetic=fast``'s candidates, exact only below
``2**24``, are timed without that comparison.

Choices are cached per machine (processor, CPU capability and instruction-set
flags, the instruction-set caps set in the environment, torch version,
threads, device) and per layer signature (input and
weight shapes, geometry, word length, candidates) in memory and in
``cache_dir/kernels/<machine>.json``, so a sweep, and every later job on the
machine, pays for the timing once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fxpsweep.backends.kernels import Kernel
from fxpsweep.core.storage import atomic_write_json

log = logging.getLogger(__name__)

ROUNDS = 3  # timed calls of each candidate, at most, one per round
SKIP_SLOWER = 3.0  # a candidate this many times slower than the fastest after a round is not timed further
Finish = Callable[[Kernel, torch.Tensor], Any]  # (a kernel, input codes) -> the layer's codes
_in_memory: dict[str, dict[str, str]] = {}  # machine key -> layer signature -> kernel label


# /proc/cpuinfo flags that decide which kernel is fastest: vector and matrix instruction sets (x86, Arm).
# Processors of one model name may differ in them (a cloud VM's "Intel(R) Xeon(R) Processor" with or
# without AMX), and a cache folder may be shared by a cluster's nodes.
_SIMD_FLAG = re.compile(r"^(avx|amx|fma|f16c|sse4|ssse3|vnni|asimd|sve|i8mm|bf16|sme(\d|$))")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(model name, sorted SIMD flags) of the first processor in ``/proc/cpuinfo``; ("", ()) where unreadable."""
    name, flags = "", ()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return name, flags
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = tuple(sorted(f for f in value.split() if _SIMD_FLAG.match(f)))
    return name, flags


# Environment variables that cap the instruction sets the libraries use below what the processor has
# (``bench/throughput.py --isa-cap``): under them another kernel may be fastest.
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "NUMBA_CPU_NAME",
                     "NUMBA_CPU_FEATURES")


def isa_caps() -> dict[str, str]:
    """The instruction-set caps set in this process's environment, by variable ({} where none is)."""
    return {name: os.environ[name] for name in ISA_CAP_VARIABLES if os.environ.get(name)}


def processor_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def cpu_features() -> tuple[str, ...]:
    """The CPU's vector and matrix instruction-set flags (``/proc/cpuinfo``: avx2, avx512_vnni, amx_int8, ...)."""
    return _cpuinfo()[1]


def machine(device: torch.device) -> dict[str, Any]:
    """What decides which kernel is fastest, apart from the layer."""
    about = {
        "processor": processor_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_features": list(cpu_features()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device.type,
    }
    caps = isa_caps()
    if caps:  # only where set, so that the key of an uncapped machine stays as it was
        about["isa_caps"] = caps
    if device.type == "cuda":
        about["gpu"] = torch.cuda.get_device_name(device)
    return about


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class KernelChooser:
    """Picks among exact kernels by timing them (see the module docstring); ``cache_dir`` None: memory only."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None

    def choose(self, candidates: list[Kernel], codes: torch.Tensor, layer_name: str, finish: Finish | None = None,
               check: int | None = None) -> Kernel:
        """The fastest of ``candidates`` on ``codes`` (a real input of the layer), from the cache when known;
        ``finish``: how the layer computes its codes on a kernel (timed so), else the kernel's own ``__call__``;
        ``check``: the images on which the outputs are compared by a whole call of each kernel (default all)."""
        if len(candidates) == 1:
            return candidates[0]
        about = machine(codes.device)
        machine_key = _digest(about)
        layer = candidates[0].layer
        signature = _digest({
            "input": list(codes.shape), "weight": list(layer.weight.shape), "geometry": repr(layer.geometry),
            "act_bits": layer.act_bits, "raw": layer.raw, "unsigned_input": layer.unsigned_input,
            "candidates": [k.label for k in candidates],
        })
        known = _in_memory.setdefault(machine_key, {})
        path = self.cache_dir / "kernels" / f"{machine_key}.json" if self.cache_dir is not None else None
        if signature not in known and path is not None and path.exists():
            try:
                known.update({s: c["kernel"] for s, c in json.loads(path.read_text())["choices"].items()})
            except (OSError, ValueError, KeyError) as err:  # a damaged cache file is only a lost shortcut
                log.warning("ignoring unreadable kernel cache %s (%s)", path, err)
        by_label = {k.label: k for k in candidates}
        if known.get(signature) in by_label:
            return by_label[known[signature]]
        seconds = self._time(candidates, codes, layer_name, finish, check)
        best = min(seconds, key=seconds.get)
        known[signature] = best
        if path is not None:
            self._remember(path, about, signature, layer_name, best, seconds)
        log.debug("%s: %s (%s)", layer_name, best, ", ".join(f"{k} {s * 1e3:.2f} ms" for k, s in seconds.items()))
        return by_label[best]

    @torch.no_grad()
    def _time(self, candidates: list[Kernel], codes: torch.Tensor, layer_name: str, finish: Finish | None,
              check: int | None = None) -> dict[str, float]:
        """Seconds per batch of each candidate that agrees with the reference output (in fast mode, of every candidate)."""
        reference_kernel = next((k for k in candidates if k.name == "float64"), candidates[0])
        sample = codes[:check]
        reference = reference_kernel(sample)  # also the reference's warm-up on the sample's shape
        if reference_kernel.exact:  # fast mode's kernels are not compared (below): no extreme codes to run
            extreme = extreme_codes(sample[:2], *reference_kernel.layer.input_codes)
            reference_extreme = reference_kernel(extreme)
        agreeing = []
        for kernel in [k for k in candidates if k is not reference_kernel] + [reference_kernel]:
            if kernel is not reference_kernel:
                out = kernel(sample)
                # ``arithmetic=fast``'s kernels are not exact beyond ``2**24`` (float32 sums; int8's int32 sums
                # times a folded float32 scale): there they may differ, as fast mode allows.
                compared = kernel.exact and reference_kernel.exact
                if compared and not (torch.equal(out.double(), reference.double()) and torch.equal(kernel(extreme).double(), reference_extreme.double())):
                    log.error("%s: kernel %s disagrees with %s; it is not used", layer_name, kernel.label, reference_kernel.label)
                    continue
            # Warm-up: first calls on a shape pay for setup (primitive creation, compilation). The calls above
            # ran on the sample's shape; the layer's slices of a larger batch have shapes of their own.
            if len(sample) < len(codes):
                _timed(kernel, codes, finish)
            agreeing.append(kernel)
        seconds: dict[str, float] = {}
        racing = agreeing  # never empty: the reference is in it
        for round_ in range(ROUNDS):
            # In turn, each round from the next kernel on: a machine whose speed drifts (a shared VM's
            # varies by half within minutes) then slows or speeds every candidate alike.
            for kernel in racing[round_ % len(racing):] + racing[: round_ % len(racing)]:
                seconds[kernel.label] = min(seconds.get(kernel.label, float("inf")), _timed(kernel, codes, finish))
            fastest = min(seconds.values())
            racing = [k for k in racing if seconds[k.label] <= SKIP_SLOWER * fastest]  # clearly slower: timed enough
            if len(racing) < 2:
                break
        return seconds

    @staticmethod
    def _remember(path: Path, about: dict, signature: str, layer_name: str, best: str, seconds: dict[str, float]) -> None:
        """Add one choice to the machine's cache file (read, merge, write atomically)."""
        try:
            record = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            record = {}
        record["machine"] = about
        record.setdefault("choices", {})[signature] = {
            "kernel": best, "layer": layer_name, "seconds": {k: round(s, 6) for k, s in seconds.items()},
        }
        atomic_write_json(path, record)


def extreme_codes(codes: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Codes of ``codes``' shape, each at random ``low`` or ``high`` (seeded)."""
    generator = torch.Generator().manual_seed(0)
    top = torch.rand(codes.shape, generator=generator).to(codes.device) < 0.5
    return torch.where(top, high, low).to(codes.dtype)


def _timed(kernel: Kernel, codes: torch.Tensor, finish: Finish | None = None) -> float:
    """Seconds of one call of ``kernel`` on ``codes`` (of ``finish`` of both where given)."""
    if codes.is_cuda:
        torch.cuda.synchronize(codes.device)
    start = time.perf_counter()
    if finish is None:
        kernel(codes)
    else:
        finish(kernel, codes)
    if codes.is_cuda:
        torch.cuda.synchronize(codes.device)
    return time.perf_counter() - start
