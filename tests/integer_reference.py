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


# ---------------------------------------------------------------------------
# Layers, on int64 numpy arrays of codes. Loops over kernel positions, integer
# division with remainder: nothing here calls fxpsweep or a float kernel.
# ---------------------------------------------------------------------------

import numpy as np  # noqa: E402


def round_div(num: np.ndarray, den: np.ndarray | int, rounding: str) -> np.ndarray:
    """``rounding(num / den)`` elementwise for int64 ``num`` and positive int64 ``den``."""
    num = np.asarray(num, dtype=np.int64)
    den = np.broadcast_to(np.asarray(den, dtype=np.int64), num.shape)
    q = np.floor_divide(num, den)
    r = num - q * den  # 0 <= r < den
    if rounding == "nearest_even":
        up = (2 * r > den) | ((2 * r == den) & (q % 2 == 1))
    elif rounding == "nearest_up":
        up = 2 * r >= den
    elif rounding == "nearest_away":
        up = (2 * r > den) | ((2 * r == den) & (num > 0))
    elif rounding == "floor":
        up = np.zeros(num.shape, dtype=bool)
    elif rounding == "toward_zero":
        up = (r > 0) & (num < 0)
    else:
        raise ValueError(rounding)
    return q + up


def overflow_array(k: np.ndarray, total_bits: int, overflow: str) -> np.ndarray:
    """``overflow_int`` of every element of the int64 array ``k``, by the same integer operations on int64
    (two's complement, as Python's ints behave under ``&``): exact for words of up to 62 bits."""
    k = np.asarray(k, dtype=np.int64)
    if total_bits > 62:
        return np.vectorize(lambda v: overflow_int(int(v), total_bits, overflow), otypes=[np.int64])(k) if k.size else k
    lo, hi = -(1 << (total_bits - 1)), (1 << (total_bits - 1)) - 1
    if overflow == "saturate":
        return np.clip(k, lo, hi)
    if overflow == "wrap":
        low_bits = k & np.int64((1 << total_bits) - 1)
        return np.where(low_bits > hi, low_bits - np.int64(1 << total_bits), low_bits)
    raise ValueError(overflow)


def requantize_array(value: np.ndarray, from_frac: np.ndarray | int, to_bits: int, to_frac: int, rounding: str, overflow: str) -> np.ndarray:
    """Codes at ``from_frac`` fractional bits (per element or broadcast) into ``Q(to_bits, to_frac)``."""
    value = np.asarray(value, dtype=np.int64)
    shift = np.broadcast_to(np.asarray(to_frac - np.asarray(from_frac), dtype=np.int64), value.shape)
    up = np.where(shift >= 0, value * (np.int64(1) << np.maximum(shift, 0)), 0)
    down = round_div(value, np.int64(1) << np.maximum(-shift, 0), rounding)
    return overflow_array(np.where(shift >= 0, up, down), to_bits, overflow)


def conv2d_acc(
    x: np.ndarray, w: np.ndarray, stride: int, padding: int, dilation: int, groups: int,
    product: tuple[int, int, str] | None = None, acc: tuple[int, str] | None = None,
) -> np.ndarray:
    """The accumulator of a conv on int64 codes: sum over (input channel, kernel row, kernel column) in that order.

    ``product=(bits, shift, rounding)``: each product rounded by ``2**shift``
    into ``bits`` (saturating). ``acc=(bits, overflow)``: the accumulator word,
    overflowed after every add.
    """
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, cout, oh, ow), dtype=np.int64)
    cout_g = cout // groups
    for co in range(cout):
        g = co // cout_g
        for ci in range(cin_g):
            for i in range(kh):
                for j in range(kw):
                    rows = slice(i * dilation, i * dilation + stride * (oh - 1) + 1, stride)
                    cols = slice(j * dilation, j * dilation + stride * (ow - 1) + 1, stride)
                    p = xp[:, g * cin_g + ci, rows, cols] * w[co, ci, i, j]
                    if product is not None:
                        bits, shift, rounding = product
                        p = requantize_array(p, 0, bits, shift, rounding, "saturate")
                    out[:, co] += p
                    if acc is not None:
                        out[:, co] = overflow_array(out[:, co], *acc)
    return out


def linear_acc(x: np.ndarray, w: np.ndarray, product=None, acc=None) -> np.ndarray:
    """The accumulator of a linear layer: a 1x1 conv on a 1x1 image."""
    return conv2d_acc(x[:, :, None, None], w[:, :, None, None], 1, 0, 1, 1, product, acc)[:, :, 0, 0]


def pool_windows(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool, count_include_pad: bool):
    """Per output position: (start, end) of the real inputs and the divisor, as torch's avg_pool2d defines them."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or its left padding
    windows = []
    for o in range(out):
        start = o * stride - padding
        end = min(start + kernel, size + padding)
        padded = end - start
        start, end = max(start, 0), min(end, size)
        windows.append((start, end, padded if count_include_pad else end - start))
    return windows


def adaptive_windows(size: int, out: int):
    return [((o * size) // out, -(-((o + 1) * size) // out), -(-((o + 1) * size) // out) - (o * size) // out) for o in range(out)]


def avg_pool(x: np.ndarray, rows, cols, in_frac: int, out_bits: int, out_frac: int, rounding: str, overflow: str) -> np.ndarray:
    """Window sums divided by the divisors, rounded once into ``Q(out_bits, out_frac)``."""
    n, c = x.shape[:2]
    out = np.zeros((n, c, len(rows), len(cols)), dtype=np.int64)
    for i, (r0, r1, rd) in enumerate(rows):
        for j, (c0, c1, cd) in enumerate(cols):
            total = x[:, :, r0:r1, c0:c1].sum(axis=(2, 3))
            shift = out_frac - in_frac
            num = total * (1 << max(shift, 0))
            den = rd * cd * (1 << max(-shift, 0))
            out[:, :, i, j] = overflow_array(round_div(num, den, rounding), out_bits, overflow)
    return out


def add(a: np.ndarray, fa: int, b: np.ndarray, fb: int, out_bits: int, out_frac: int, rounding: str, overflow: str) -> np.ndarray:
    fs = max(fa, fb)
    total = a * (1 << (fs - fa)) + b * (1 << (fs - fb))
    return requantize_array(total, fs, out_bits, out_frac, rounding, overflow)


def quantize_array(x: np.ndarray, total_bits: int, frac_bits: int, rounding: str, overflow: str) -> np.ndarray:
    """Vectorized ``quantize_code`` for finite float arrays (float64 scaling by 2**F is exact)."""
    v = np.asarray(x, dtype=np.float64) * 2.0**frac_bits
    low = np.floor(v)
    num = (v - low)  # exact fraction in [0, 1)
    half = num == 0.5
    if rounding == "nearest_even":
        k = low + ((num > 0.5) | (half & (np.mod(low, 2) == 1)))
    elif rounding == "nearest_up":
        k = low + (num >= 0.5)
    elif rounding == "nearest_away":
        k = low + ((num > 0.5) | (half & (v > 0)))
    elif rounding == "floor":
        k = low
    elif rounding == "toward_zero":
        k = low + ((num > 0) & (v < 0))
    else:
        raise ValueError(rounding)
    return overflow_array(k.astype(np.int64), total_bits, overflow)


def conv2d_exact(x: np.ndarray, w: np.ndarray, stride: int, padding: int, dilation: int, groups: int) -> np.ndarray:
    """The exact accumulator of a conv (order-free), vectorized over channels and groups in int64."""
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    xg = xp.reshape(n, groups, cin_g, *xp.shape[2:])
    wg = w.reshape(groups, cout // groups, cin_g, kh, kw)
    out = np.zeros((n, groups, cout // groups, oh, ow), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xg[:, :, :, i * dilation : i * dilation + stride * (oh - 1) + 1 : stride,
                       j * dilation : j * dilation + stride * (ow - 1) + 1 : stride]
            out += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, i, j])
    return out.reshape(n, cout, oh, ow)
