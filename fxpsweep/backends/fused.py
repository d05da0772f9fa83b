"""A register's rounding and overflow in one pass over memory: the element-wise steps fused by ``torch.compile``.

In eager PyTorch, rounding a register, counting its overflows and saturating
it are four passes over memory (round, compare, count, clamp), which together
cost as much as an 8-bit convolution. Compiled, they are one loop. The
compiled functions run the same torch operations as the eager ones
(``fixedpoint.round_to_integer`` decides every mode on the exact fraction;
comparisons, clamps and conversions of integers are exact), so the codes are
identical; ``tests/backends/test_fused.py`` checks it.

On the CPU, the default rule (round half to even, saturate) of a register,
of the network input, of a residual add and of a kernel's terms runs instead
as ``rounding_loop``'s hand-written loops, which count overflows in the loop
that stores the codes; torch.compile's CPU code reads the register twice
for that.

Tensors below ``COMPILE_MIN_ELEMENTS`` (a small network's registers) and
stochastic rounding (drawn from a generator) stay eager, and so does
everything when compiling is impossible (no C++ compiler on the machine): a
warning says so once and the results are the same, only slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from fxpsweep.backends import rounding_loop
from fxpsweep.core.fixedpoint import QFormat, apply_overflow, round_to_integer

log = logging.getLogger(__name__)

COMPILE_MIN_ELEMENTS = 1 << 16  # below this the compile is not worth its first-call cost
# Each function here is compiled once per rounding mode, overflow rule, dtype, piece or term count:
# more variants than torch's default of 8 per function, past which it would silently run eager.
RECOMPILE_LIMIT = 64


def _round_overflow(v, lo, hi, clamp_lo, clamp_hi, rounding: str, overflow: str, total_bits: int, dtype: torch.dtype):
    """Codes of ``v`` (scaled values) in the format [lo, hi], clamped to [clamp_lo, clamp_hi] (a ReLU or ReLU6
    that reads the register), and how many overflowed the format (a 0-dim tensor)."""
    k = round_to_integer(v, rounding)
    overflowed = ((k < lo) | (k > hi)).sum()
    if overflow != "saturate":
        k = apply_overflow(k, total_bits, overflow)
    return torch.clamp(k, clamp_lo, clamp_hi).to(dtype), overflowed


def _round_overflow_into(v, lo, hi, clamp_lo, clamp_hi, rounding: str, overflow: str, total_bits: int, dtype: torch.dtype):
    """``_round_overflow`` written over ``v`` itself (of the codes' dtype): a register as large as MobileNetV2's
    early ones (150 MB a batch) then needs no fresh memory, whose first touch costs more than the rounding."""
    codes, overflowed = _round_overflow(v, lo, hi, clamp_lo, clamp_hi, rounding, overflow, total_bits, dtype)
    v.copy_(codes)
    return overflowed


def _scale_round_overflow(x, scale, *args):
    """``_round_overflow`` of ``x * scale`` (a power of two: exact)."""
    return _round_overflow(x * scale, *args)


def _add_round_overflow(a, b, scale_a, scale_b, *args):
    """``_round_overflow`` of ``a * scale_a + b * scale_b`` (powers of two; exact in ``a``'s dtype by the caller's bound)."""
    return _round_overflow(a * scale_a + b.to(a.dtype) * scale_b, *args)


def _byte_pieces(codes, n: int, unsigned: bool):
    """Codes as ``n`` 8-bit pieces, ``codes = sum_i 256**i * piece_i + 128 * sum_{i < n-1} 256**i``.

    Every piece but the top is a byte ``b`` in [0, 255], the top one signed;
    ``unsigned``: each as uint8 ``piece + 128`` (oneDNN's input with zero point 128,
    so ``b`` itself), else int8 ``piece``. Floor, division by 256 and subtraction
    of integers are exact in the float dtype.
    """
    pieces = []
    rest = codes
    for _ in range(n - 1):
        high = torch.floor(rest / 256)
        byte = rest - high * 256
        pieces.append(byte.to(torch.uint8) if unsigned else (byte - 128).to(torch.int8))
        rest = high
    pieces.append((rest + 128).to(torch.uint8) if unsigned else rest.to(torch.int8))
    return pieces


def _combine(terms: list[torch.Tensor], multipliers, offset_sums, scale, bias):
    """``sum_t terms[t] * multipliers[t] (+ offset_sums) (* scale + bias)`` in float64, exact below ``2**53``."""
    acc = terms[0].double() * multipliers[0]
    for i in range(1, len(terms)):
        acc = acc + terms[i].double() * multipliers[i]
    if offset_sums is not None:
        acc = acc + offset_sums
    if scale is not None:
        acc = acc * scale + bias
    return acc


def _combine_round_overflow(first, rest, multipliers, offset_sums, scale, bias, *args):
    """``_round_overflow`` of ``_combine``: a kernel's terms summed and rounded in one loop, so the float64
    sum (8 bytes per output value, fresh memory) is never written out."""
    return _round_overflow(_combine([first, *rest], multipliers, offset_sums, scale, bias), *args)


def _compile_options() -> dict[str, int]:
    """Inductor options of the compiled passes: the CPU vector width named (bits; 0: none), the one it picks.

    Inductor's on-disk FX graph cache does not key a CPU graph by the vector
    instruction set it was generated for (its C++ kernels are built again for
    the reading process's): a graph generated for AVX-512 and served to a
    process held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, or a cache folder shared
    by a cluster's nodes) gave wrong values, NaN among them (torch 2.14.1: the
    8-bit pieces of a layer's input off by up to 2.75e4 in its output, caught
    by the kernels' check; ``tests/backends/test_fused.py``). A width named in the
    options is part of the cache key.
    """
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    width = pick_vec_isa().bit_width()
    return {"cpp.simdlen": width}


class _Fused:
    """``fn`` compiled on first use for large tensors, eager for small ones and wherever compiling fails."""

    broken = False  # set once compiling failed in this process: everything stays eager

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.compiled = None

    def __call__(self, first: torch.Tensor, *args):
        if _Fused.broken or first.numel() < COMPILE_MIN_ELEMENTS:
            return self.fn(first, *args)
        try:
            if self.compiled is None:
                import torch._dynamo.config

                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                self.compiled = torch.compile(self.fn, dynamic=True, options=_compile_options())
            return self.compiled(first, *args)
        except Exception as err:  # no compiler, an inductor bug: the eager operations give the same codes
            log.warning("torch.compile failed (%s: %s); rounding runs eager, slower, same results", type(err).__name__, err)
            _Fused.broken = True
            return self.fn(first, *args)


_ROUND = _Fused(_round_overflow)
_ROUND_INTO = _Fused(_round_overflow_into)
_SCALE_ROUND = _Fused(_scale_round_overflow)
_ADD_ROUND = _Fused(_add_round_overflow)
_PIECES = _Fused(_byte_pieces)
_COMBINE = _Fused(lambda first, rest, *args: _combine([first, *rest], *args))
_COMBINE_ROUND = _Fused(_combine_round_overflow)


class Rounder:
    """Rounds scaled values into one register's format and counts its overflows, compiled where it pays.

    ``dtype``: the float dtype of the codes it returns. ``generator``: for
    ``stochastic`` rounding (always eager: the draws come from the generator).
    ``clamp``: the codes the output may take (a ReLU or ReLU6 that reads the
    register, applied here; overflows are counted before it), default the format's range.
    """

    def __init__(
        self, fmt: QFormat, dtype: torch.dtype, generator: torch.Generator | None = None, clamp: tuple[int, int] | None = None
    ) -> None:
        self.fmt, self.dtype, self.generator = fmt, dtype, generator
        self.clamp = clamp or (fmt.min_code, fmt.max_code)
        # 0-dim tensors, not Python floats: compiled code is then shared by every format.
        self.bounds = torch.tensor([fmt.min_code, fmt.max_code, *self.clamp], dtype=torch.float64)
        self.args = (fmt.rounding, fmt.overflow, fmt.total_bits, dtype)
        self._cast: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = tuple(self.bounds.to(like.device, like.dtype).unbind())
        return self._cast[key]

    def round(self, v: torch.Tensor, in_place: bool = False) -> tuple[torch.Tensor, int]:
        """Codes of ``v`` (real value times ``2**F``, exact) and the number of values that overflowed.

        ``in_place``: ``v`` is a temporary that nothing else reads; where it has the codes' dtype, the
        codes are written over it.
        """
        if self.fmt.rounding == "stochastic":
            return self._stochastic(v)
        if rounding_loop.supports(self.fmt, v):  # one read, not two: see rounding_loop
            out = v if in_place and v.dtype == self.dtype else torch.empty_like(v, dtype=self.dtype)
            return out, rounding_loop.round_into(v, out, self.fmt, self.clamp)
        if in_place and v.dtype == self.dtype:
            return v, int(_ROUND_INTO(v, *self._bounds(v), *self.args))
        codes, overflowed = _ROUND(v, *self._bounds(v), *self.args)
        return codes, int(overflowed)

    def scale_and_round(self, x: torch.Tensor, scale: float, in_place: bool = False) -> tuple[torch.Tensor, int]:
        """``round(x * scale)`` for a power of two ``scale`` (the network input); ``in_place`` as in ``round``."""
        if self.fmt.rounding == "stochastic":
            return self._stochastic(x * scale)
        if rounding_loop.supports(self.fmt, x):
            out = x if in_place and x.dtype == self.dtype else torch.empty_like(x, dtype=self.dtype)
            return out, rounding_loop.round_into(x, out, self.fmt, self.clamp, scale)
        codes, overflowed = _SCALE_ROUND(x, torch.tensor(scale, dtype=x.dtype, device=x.device), *self._bounds(x), *self.args)
        return codes, int(overflowed)

    def add_and_round(self, a: torch.Tensor, b: torch.Tensor, scale_a: float, scale_b: float) -> tuple[torch.Tensor, int]:
        """``round(a * scale_a + b * scale_b)``, powers of two, summed exactly in ``a``'s dtype."""
        if self.fmt.rounding == "stochastic":
            return self._stochastic(a * scale_a + b.to(a.dtype) * scale_b)
        if rounding_loop.supports(self.fmt, a, b):
            out = torch.empty_like(a, dtype=self.dtype)
            return out, rounding_loop.add_round_into(a, scale_a, b, scale_b, out, self.fmt, self.clamp)
        scales = (torch.tensor(scale_a, dtype=a.dtype, device=a.device), torch.tensor(scale_b, dtype=a.dtype, device=a.device))
        codes, overflowed = _ADD_ROUND(a, b, *scales, *self._bounds(a), *self.args)
        return codes, int(overflowed)

    def combine_and_round(
        self, terms: list[torch.Tensor], multipliers: list[float], offset_sums: torch.Tensor | None,
        scale: torch.Tensor, bias: torch.Tensor,
    ) -> tuple[torch.Tensor, int]:
        """Codes of ``combine(terms, multipliers, offset_sums, scale, bias)`` and the number that overflowed,
        in one pass (see ``combine``)."""
        if self.fmt.rounding == "stochastic":
            return self._stochastic(combine(terms, multipliers, offset_sums, scale, bias))
        if rounding_loop.combines(self.fmt, terms, offset_sums):  # one read of each term, as for a register
            out = torch.empty_like(terms[0], dtype=self.dtype)
            return out, rounding_loop.combine_round_into(terms, multipliers, offset_sums, scale, bias, out, self.fmt, self.clamp)
        weights = _multipliers(multipliers, terms[0].device)
        codes, overflowed = _COMBINE_ROUND(terms[0], terms[1:], weights, offset_sums, scale, bias, *self._bounds(scale), *self.args)
        return codes, int(overflowed)

    def _stochastic(self, v: torch.Tensor) -> tuple[torch.Tensor, int]:
        k = round_to_integer(v, "stochastic", self.generator)
        overflowed = int(torch.count_nonzero((k < self.fmt.min_code) | (k > self.fmt.max_code)))
        if overflowed:
            k = apply_overflow(k, self.fmt.total_bits, self.fmt.overflow)
        return k.clamp(*self.clamp).to(self.dtype), overflowed


def byte_pieces(codes: torch.Tensor, total_bits: int, unsigned: bool) -> tuple[list[torch.Tensor], int]:
    """Codes of ``total_bits`` as 8-bit pieces (see ``_byte_pieces``) and the constant ``C`` they leave out."""
    n = max(1, -(-total_bits // 8))
    offset = 128 * sum(256**i for i in range(n - 1))
    return _PIECES(codes, n, unsigned), offset


def combine(
    terms: list[torch.Tensor],
    multipliers: list[float],
    offset_sums: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact float64 sum of kernel terms, each times its power of two (see ``_combine``), in one pass."""
    return _COMBINE(terms[0], terms[1:], _multipliers(multipliers, terms[0].device), offset_sums, scale, bias)


def _multipliers(multipliers: list[float], device: torch.device) -> torch.Tensor:
    """The powers of two of ``combine`` as one float64 tensor: compiled code is then shared by every layer."""
    return torch.tensor(multipliers, dtype=torch.float64, device=device)
