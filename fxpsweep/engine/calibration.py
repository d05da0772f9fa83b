"""Choosing a tensor's fractional length F for a word of W bits.

Every method turns what was seen of a tensor (a weight's values, or the
statistics of an activation on calibration images) into an F. Statistics do
not depend on W, so they are gathered once per model and calibration set and
reused for every word length of a sweep (see ``statistics``).

- ``max``: the largest F whose range holds the largest magnitude seen. Nothing
  seen overflows; a single outlier costs resolution for every other value.
- ``overflow_rate``: the largest F whose range holds all but a stated fraction
  of the magnitudes seen (pytorch-playground's rule); ``0`` is ``max``.
- ``mse``: the F, from the ``max`` one up to 8 finer, that gives the least
  squared quantization error (rounding and saturation together) on what was seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxpsweep.core.fixedpoint import quantize, reproducible
from fxpsweep.core.errors import ConfigError

METHODS = ("max", "overflow_rate", "mse")
GRANULARITIES = ("tensor", "channel")
# F for a tensor that is zero everywhere: every F represents it exactly.
F_FOR_ALL_ZERO = 0
# How many finer F than the max rule the mse search tries.
MSE_SEARCH = 8


@dataclass
class TensorStats:
    """What calibration saw of one tensor: the largest magnitude and a uniform random sample of its values."""

    max_abs: float
    sample: torch.Tensor  # float32, 1-D


def frac_bits_for_max(max_abs: float, total_bits: int) -> int:
    """The largest ``F`` such that ``Q(total_bits, F)`` holds ``+-max_abs`` without overflow.

    That is the ``max`` rule: the smallest integer part that holds the largest
    magnitude seen. The format's positive limit is ``(2**(W-1) - 1) * 2**-F``
    and its negative limit ``-2**(W-1) * 2**-F``; both must hold ``max_abs``.
    """
    if not math.isfinite(max_abs):
        raise ValueError(f"max_abs={max_abs} is not finite; the calibration data contain inf or NaN")
    if max_abs <= 0.0:
        return F_FOR_ALL_ZERO
    # Start from the power-of-two estimate and step until the rule holds exactly.
    frac_bits = total_bits - 1 - math.ceil(math.log2(max_abs))
    while max_abs > (2 ** (total_bits - 1) - 1) * 2.0**-frac_bits:
        frac_bits -= 1
    while max_abs <= (2 ** (total_bits - 1) - 1) * 2.0 ** -(frac_bits + 1):
        frac_bits += 1
    return frac_bits


def max_abs(t: torch.Tensor) -> float:
    """Largest finite magnitude in ``t`` (0.0 for an empty tensor)."""
    return float(t.detach().abs().max()) if t.numel() else 0.0


def frac_bits_for_overflow_rate(stats: TensorStats, total_bits: int, rate: float) -> int:
    """The largest F that holds all magnitudes seen but the top ``rate`` fraction (estimated on the sample)."""
    if rate <= 0.0 or stats.sample.numel() == 0:
        return frac_bits_for_max(stats.max_abs, total_bits)
    magnitude = float(torch.quantile(stats.sample.abs().double(), 1.0 - rate))
    return frac_bits_for_max(min(magnitude, stats.max_abs), total_bits)


def frac_bits_for_mse(values: torch.Tensor, max_abs_seen: float, total_bits: int, rounding: str, overflow: str) -> int:
    """The F, from the ``max`` rule's up to ``MSE_SEARCH`` finer, with the least squared error on ``values``."""
    start = frac_bits_for_max(max_abs_seen, total_bits)
    if values.numel() == 0 or max_abs_seen == 0.0:
        return start
    x = values.double()
    errors = []
    for frac_bits in range(start, start + MSE_SEARCH + 1):
        q = quantize(x, total_bits, frac_bits, reproducible(rounding), overflow)
        errors.append((float(((x - q) ** 2).sum()), frac_bits))
    return min(errors)[1]  # the coarsest F among equal errors: ties favour range


def choose_frac_bits(
    method: str, stats: TensorStats, total_bits: int, rounding: str, overflow: str, rate: float
) -> int:
    """F for a tensor of which ``stats`` was seen, by ``method`` (one of ``METHODS``)."""
    if method == "max":
        return frac_bits_for_max(stats.max_abs, total_bits)
    if method == "overflow_rate":
        return frac_bits_for_overflow_rate(stats, total_bits, rate)
    if method == "mse":
        return frac_bits_for_mse(stats.sample, stats.max_abs, total_bits, rounding, overflow)
    raise ConfigError(f"calibration method {method!r} is unknown; allowed: {', '.join(METHODS)}")


def frac_bits_per_row(
    rows: torch.Tensor, method: str, total_bits: int, rounding: str, overflow: str, rate: float
) -> list[int]:
    """``choose_frac_bits`` for every row of ``rows`` (a weight's output channels, each seen whole).

    The ``mse`` search runs on all rows that share a starting F at once: a
    network has about ten distinct starts per layer, against thousands of channels.
    """
    rows = rows.detach().reshape(len(rows), -1).float().cpu()
    maxes = rows.abs().amax(1).tolist() if rows.shape[1] else [0.0] * len(rows)
    if method != "mse":
        return [choose_frac_bits(method, TensorStats(m, r), total_bits, rounding, overflow, rate) for m, r in zip(maxes, rows)]
    starts = [frac_bits_for_max(m, total_bits) for m in maxes]
    chosen = list(starts)
    groups: dict[int, list[int]] = {}
    for i, (start, m) in enumerate(zip(starts, maxes)):
        if m > 0.0:
            groups.setdefault(start, []).append(i)
    mode = reproducible(rounding)
    for start, members in groups.items():
        x = rows[members].double()
        candidates = range(start, start + MSE_SEARCH + 1)
        errors = torch.stack([((x - quantize(x, total_bits, f, mode, overflow)) ** 2).sum(1) for f in candidates])
        for i, best in zip(members, errors.argmin(0).tolist()):  # argmin: the first, coarsest F among equal errors
            chosen[i] = start + best
    return chosen
