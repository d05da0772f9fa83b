"""Choosing a tensor's fractional length F from statistics gathered on calibration data.

Statistics (here the largest magnitude seen) do not depend on the word length,
so they are gathered once and turned into an ``F`` for each ``W`` afterwards.
"""

from __future__ import annotations

import math

import torch

# F for a tensor that is zero everywhere: every F represents it exactly.
F_FOR_ALL_ZERO = 0


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
