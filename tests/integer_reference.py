"""An independent integer reference for fixed-point arithmetic.

Plain Python integers and exact rationals (``fractions.Fraction``); shares no
code with ``fxpsweep``. Used only by the tests, to check the engine.
"""

from __future__ import annotations

import math
from fractions import Fraction


def round_fraction(v: Fraction, rounding: str, u: float | None = None) -> int:
    """Round the exact rational ``v`` to an integer. ``u`` in [0, 1) decides ``stochastic``."""
    low = math.floor(v)
    frac = v - low
    if rounding == "nearest_even":
        if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and low % 2 == 1):
            return low + 1
        return low
    if rounding == "nearest_up":
        return low + 1 if frac >= Fraction(1, 2) else low
    if rounding == "nearest_away":
        if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and v > 0):
            return low + 1
        return low
    if rounding == "floor":
        return low
    if rounding == "toward_zero":
        return low if v >= 0 else math.ceil(v)
    if rounding == "stochastic":
        return low + 1 if Fraction(u) < frac else low
    raise ValueError(rounding)


def overflow_int(k: int, total_bits: int, overflow: str) -> int:
    """Bring the integer ``k`` into a signed ``total_bits`` word by clamping or by keeping the low bits."""
    lo, hi = -(1 << (total_bits - 1)), (1 << (total_bits - 1)) - 1
    if overflow == "saturate":
        return max(lo, min(hi, k))
    if overflow == "wrap":
        k &= (1 << total_bits) - 1
        return k - (1 << total_bits) if k > hi else k
    raise ValueError(overflow)


def quantize_code(x: float, total_bits: int, frac_bits: int, rounding: str, overflow: str, u: float | None = None) -> int:
    """The integer code of the real ``x`` in ``Q(total_bits, frac_bits)``.

    Non-finite inputs follow the documented convention: NaN -> 0, +-inf -> the extreme codes.
    """
    lo, hi = -(1 << (total_bits - 1)), (1 << (total_bits - 1)) - 1
    if math.isnan(x):
        return 0
    if math.isinf(x):
        return hi if x > 0 else lo
    v = Fraction(x) * (Fraction(2) ** frac_bits)
    return overflow_int(round_fraction(v, rounding, u), total_bits, overflow)
