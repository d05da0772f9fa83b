"""Signed two's-complement fixed-point numbers: formats and the quantize function.

A format ``Q(W, F)`` is a word of ``W`` bits in total (sign included) with ``F``
fractional bits. Its values are ``k * 2**-F`` for integer codes
``k in [-2**(W-1), 2**(W-1) - 1]``. ``F`` may be negative (an LSB coarser than 1)
or larger than ``W`` (all-fraction values).

    q(x) = overflow(rounding(x * 2**F)) * 2**-F

The arithmetic runs in float64, where every step is exact: scaling by a power
of two, floor, and the wrap-around all stay within 53 bits for ``W <= 32``
(float32 is used where it is provably exact too, see ``_working_dtype``). Non-finite inputs have no hardware meaning; by this module's
convention NaN maps to code 0 and +-inf to the largest / smallest code, in
both overflow modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxpsweep.core.errors import ConfigError

MIN_BITS = 2
MAX_BITS = 32

ROUNDING_MODES = ("nearest_even", "nearest_up", "nearest_away", "floor", "toward_zero", "stochastic")
OVERFLOW_MODES = ("saturate", "wrap")


@dataclass(frozen=True)
class QFormat:
    """``Q(total_bits, frac_bits)`` with its rounding and overflow rule."""

    total_bits: int
    frac_bits: int
    rounding: str = "nearest_even"
    overflow: str = "saturate"

    def __post_init__(self) -> None:
        check_format(self.total_bits, self.frac_bits, self.rounding, self.overflow)

    @property
    def min_code(self) -> int:
        return -(2 ** (self.total_bits - 1))

    @property
    def max_code(self) -> int:
        return 2 ** (self.total_bits - 1) - 1

    @property
    def lsb(self) -> float:
        """Weight of one code step, ``2**-frac_bits``."""
        return 2.0 ** -self.frac_bits

    def __str__(self) -> str:
        return f"Q({self.total_bits},{self.frac_bits})"


def check_bits(total_bits: object, name: str = "bits") -> int:
    """Return ``total_bits`` as an int, or raise ConfigError naming ``name`` and the allowed range."""
    if isinstance(total_bits, bool) or not isinstance(total_bits, int):
        raise ConfigError(
            f"{name}={total_bits!r} is not a whole number of bits; "
            f"allowed: an integer from {MIN_BITS} to {MAX_BITS}"
        )
    if not MIN_BITS <= total_bits <= MAX_BITS:
        raise ConfigError(
            f"{name}={total_bits} is impossible for a signed two's-complement word; "
            f"allowed: an integer from {MIN_BITS} to {MAX_BITS} (sign bit included)"
        )
    return total_bits


def check_format(total_bits: object, frac_bits: object, rounding: str, overflow: str) -> None:
    """Raise ConfigError for a format this module cannot represent."""
    check_bits(total_bits, "total_bits")
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int):
        raise ConfigError(f"frac_bits={frac_bits!r} must be an integer (negative and > total_bits allowed)")
    if rounding not in ROUNDING_MODES:
        raise ConfigError(f"rounding={rounding!r} is unknown; allowed: {', '.join(ROUNDING_MODES)}")
    if overflow not in OVERFLOW_MODES:
        raise ConfigError(f"overflow={overflow!r} is unknown; allowed: {', '.join(OVERFLOW_MODES)}")


def round_to_integer(v: torch.Tensor, rounding: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round a tensor of scaled values to integers (same float dtype).

    ``floor(v)`` and ``v - floor(v)`` are exact in floating point, so every
    mode is decided on the exact fraction, with no ``v + 0.5`` rounding error.
    ``stochastic`` rounds up with probability equal to the fraction, drawing
    from ``generator`` (seed it for reproducible results).
    """
    low = torch.floor(v)
    frac = v - low
    if rounding == "nearest_even":
        return torch.round(v)  # IEEE round-half-to-even, exact
    if rounding == "nearest_up":
        return low + (frac >= 0.5).to(v.dtype)
    if rounding == "nearest_away":
        up = (frac > 0.5) | ((frac == 0.5) & (v > 0))
        return low + up.to(v.dtype)
    if rounding == "floor":
        return low
    if rounding == "toward_zero":
        return torch.trunc(v)
    if rounding == "stochastic":
        # Drawn in float64 on the CPU so that a seed gives the same codes on every device.
        draw = torch.rand(v.shape, generator=generator, dtype=torch.float64, device="cpu").to(v.device)
        return low + (draw < frac).to(v.dtype)
    raise ConfigError(f"rounding={rounding!r} is unknown; allowed: {', '.join(ROUNDING_MODES)}")


def reproducible(rounding: str) -> str:
    """``rounding`` for a choice that must come out the same every time (formats, weight codes):
    ``stochastic`` as ``nearest_even``, every other mode as it is."""
    return "nearest_even" if rounding == "stochastic" else rounding


def apply_overflow(k: torch.Tensor, total_bits: int, overflow: str) -> torch.Tensor:
    """Bring integer-valued float codes into ``[-2**(W-1), 2**(W-1)-1]``.

    ``wrap`` keeps the low ``W`` bits (two's-complement wrap-around). Every step
    is exact in float64: ``k / 2**W``, its floor and ``2**W * floor`` are exact,
    and ``k - 2**W * floor(k / 2**W)`` is an integer in ``[0, 2**W)`` on the
    grid of ``k``'s last bit, so representable. (``k - lo`` would not be: it
    rounds once ``|k| > 2**53``.)
    """
    lo, hi = -(2.0 ** (total_bits - 1)), 2.0 ** (total_bits - 1) - 1
    if overflow == "saturate":
        return k.clamp(lo, hi)
    if overflow == "wrap":
        span = 2.0**total_bits
        low_bits = k - span * torch.floor(k / span)  # unsigned value of the low W bits
        return torch.where(low_bits > hi, low_bits - span, low_bits)
    raise ConfigError(f"overflow={overflow!r} is unknown; allowed: {', '.join(OVERFLOW_MODES)}")


def _working_dtype(x: torch.Tensor, total_bits: int, frac_bits: int, overflow: str) -> torch.dtype:
    """float32 where it is provably exact for this input and format, else float64.

    With a float32 input, ``F >= 0`` (scaling up cannot underflow), saturation
    (no wrap-around arithmetic on huge values) and codes of at most 25 bits,
    every step of quantize_codes is exact in float32, and twice as fast.
    """
    if x.dtype == torch.float32 and overflow == "saturate" and total_bits <= 25 and frac_bits >= 0:
        return torch.float32
    return torch.float64


def quantize_codes(
    x: torch.Tensor,
    total_bits: int,
    frac_bits: int,
    rounding: str = "nearest_even",
    overflow: str = "saturate",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer codes ``k`` (int64) of ``x`` in ``Q(total_bits, frac_bits)``.

    ``x`` may be any real tensor; NaN gives 0, +-inf the extreme codes.
    """
    check_format(total_bits, frac_bits, rounding, overflow)
    v = x.to(_working_dtype(x, total_bits, frac_bits, overflow))
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    # Scale in two steps so that 2**F itself never overflows for large |F|.
    v = v * 2.0 ** (frac_bits // 2) * 2.0 ** (frac_bits - frac_bits // 2)
    k = apply_overflow(round_to_integer(v, rounding, generator), total_bits, overflow)
    lo, hi = -(2.0 ** (total_bits - 1)), 2.0 ** (total_bits - 1) - 1
    k = torch.where(torch.isnan(x), torch.zeros_like(k), k)
    k = torch.where(x == float("inf"), torch.full_like(k, hi), k)
    k = torch.where(x == float("-inf"), torch.full_like(k, lo), k)
    return k.to(torch.int64)


def codes_to_real(k: torch.Tensor, frac_bits: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Real values ``k * 2**-frac_bits`` of integer codes, in ``dtype``."""
    return k.to(torch.float64).mul(2.0 ** -(frac_bits // 2)).mul(2.0 ** -(frac_bits - frac_bits // 2)).to(dtype)


def exactly_representable(total_bits: int, frac_bits: int, dtype: torch.dtype) -> bool:
    """Whether every value of ``Q(total_bits, frac_bits)`` is exact in float ``dtype``.

    Codes need ``total_bits - 1`` significand bits; the LSB ``2**-F`` must be a
    normal number and the largest magnitude ``2**(W-1-F)`` must stay finite.
    """
    info = torch.finfo(dtype)
    significand_bits = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}[dtype]
    return (
        total_bits - 1 <= significand_bits
        and 2.0**-frac_bits >= info.tiny
        and 2.0 ** (total_bits - 1 - frac_bits) <= info.max
    )


def quantize(
    x: torch.Tensor,
    total_bits: int,
    frac_bits: int,
    rounding: str = "nearest_even",
    overflow: str = "saturate",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize ``x`` to ``Q(total_bits, frac_bits)`` and return the real values.

    The result has ``x``'s dtype when every value of the format is exact in it
    (float32: ``total_bits <= 25`` and ``frac_bits`` within its exponent range),
    else float64, so the returned values are always exactly ``k * 2**-F``.
    """
    k = quantize_codes(x, total_bits, frac_bits, rounding, overflow, generator)
    dtype = x.dtype if x.is_floating_point() and exactly_representable(total_bits, frac_bits, x.dtype) else torch.float64
    return codes_to_real(k, frac_bits, dtype)


def round_and_overflow(
    v: torch.Tensor, fmt: QFormat, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """Round scaled values ``v`` (real value times ``2**F``) to codes of ``fmt``; count overflows.

    ``v`` may be modified in place. Returns the codes (same float dtype) and
    how many values were saturated or wrapped. The range check is one min/max
    pass; the overflow rule runs only where a value is out of range.
    """
    k = torch.round_(v) if fmt.rounding == "nearest_even" else round_to_integer(v, fmt.rounding, generator)
    if k.numel() == 0:
        return k, 0
    low, high = torch.aminmax(k)
    below, above = bool(low < fmt.min_code), bool(high > fmt.max_code)
    # Count only the side that overflowed: one pass each, the common cases cost none.
    overflowed = (int(torch.count_nonzero(k < fmt.min_code)) if below else 0) + (int(torch.count_nonzero(k > fmt.max_code)) if above else 0)
    if not overflowed:
        return k, 0
    if fmt.overflow == "saturate":
        return k.clamp_(fmt.min_code, fmt.max_code), overflowed
    return apply_overflow(k, fmt.total_bits, fmt.overflow), overflowed


def requantize(
    acc: torch.Tensor,
    shift: torch.Tensor | int,
    fmt: QFormat,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Round integer codes ``acc`` (an integer-valued float tensor) by ``2**shift`` into ``fmt``.

    ``shift`` is ``F_out - F_acc`` (a tensor broadcasts, e.g. one per channel).
    Scaling an integer by a power of two is exact, so the result is exact
    whenever ``acc`` itself is (float32 below ``2**24``, float64 below ``2**53``).
    Returns the new codes (same float dtype) and how many values overflowed
    (were saturated or wrapped).
    """
    scale = torch.pow(2.0, shift) if isinstance(shift, torch.Tensor) else 2.0**shift
    return round_and_overflow(acc * scale, fmt, generator)


def divide_and_round(p: torch.Tensor, q: torch.Tensor, rounding: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``rounding(p / q)`` for integer-valued float64 ``p`` and positive integer-valued ``q``, exactly.

    ``p / q`` itself is not exact in floating point, so the quotient is
    floored, corrected to the true floor with the exact remainder
    ``r = p - q * floor`` (|values| below ``2**53``), and the rounding decided
    on ``r`` against ``q``: the average-pooling division of a datapath.
    """
    q = q.to(p.dtype)
    low = torch.floor(p / q)
    r = p - low * q
    low = low - (r < 0).to(p.dtype) + (r >= q).to(p.dtype)
    r = p - low * q  # now 0 <= r < q
    twice = 2 * r
    if rounding == "nearest_even":
        up = (twice > q) | ((twice == q) & (torch.remainder(low, 2) == 1))
    elif rounding == "nearest_up":
        up = twice >= q
    elif rounding == "nearest_away":
        up = (twice > q) | ((twice == q) & (p > 0))
    elif rounding == "floor":
        up = torch.zeros_like(r, dtype=torch.bool)
    elif rounding == "toward_zero":
        up = (r > 0) & (p < 0)
    elif rounding == "stochastic":
        draw = torch.rand(p.shape, generator=generator, dtype=torch.float64, device="cpu").to(p.device)
        up = draw * q < r
    else:
        raise ConfigError(f"rounding={rounding!r} is unknown; allowed: {', '.join(ROUNDING_MODES)}")
    return low + up.to(p.dtype)
