"""A register's rounding pass as one hand-written loop (numba): round, count overflows, clamp, store.

torch.compile's CPU code generator writes a count over a whole tensor as a
loop of its own, before the loop that stores the codes, so its pass reads the
register twice and counting costs as much as rounding (``bench/rounding_pass.py``
times both passes). These loops do the four steps per
value in one read and one write, and LLVM vectorizes them: one for a
register or the network input (``round_into``, over itself or into a new
tensor), one for a residual add (``add_round_into``), one for a
conv/linear register together with the residual add that is its only reader
(``round_then_add``: the register's codes are never stored), and one for the
terms of a kernel of several calls, summed in float64 and rounded
(``combine_round_into``). They cover the default rule, round half to even with
saturation, on dense float32 and float64 CPU tensors (``supports``,
``combines``); every other case stays on ``fused``'s compiled pass.

Exact: ``np.rint`` is IEEE round half to even, as ``torch.round``;
comparisons and selects are exact, and NaN stays NaN as in ``torch.clamp``.
The count is a float32 sum per piece of ``PIECE`` values (at most 2**16, so
exact), its additions reassociated (fastmath ``reassoc``) so that it
vectorizes; an integer sum does not, and costs as much as the second read it
replaces. The only other float additions, an add's two aligned operands and
a kernel's terms (integers times powers of two, in float64), are exact by
their callers' bounds, so no order of evaluation can change them.

Speed after a convolution: each thread takes one contiguous range of the
register, in order, as torch shares an element-wise operation (the part of the
register a core wrote is still in its cache; numba's own scheduler hands out
pieces in another order), and registers larger than a core's L2 cache are
walked with the next block prefetched. A call is kept short, which matters on
small registers: the tensors go in as NumPy views of their memory and the
constants as one array, not a dozen scalars that numba's dispatcher types one
by one.
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np
import torch

from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.backends.prefetch import prefetch_range

_DTYPES = (torch.float32, torch.float64)  # the codes' dtypes (see ops.code_dtype)

PIECE = 1 << 16  # values per call of a loop: its float32 count stays below 2**24 (exact)
# A register of more than PREFETCH_FROM values (4 MiB of float32, more than a core's L2 cache) comes from
# memory: its pieces are walked in blocks of BLOCK values, the cache lines AHEAD values on asked for before
# each (``prefetch``): 2 KiB blocks, the next block's lines, the fastest of the block sizes and distances
# tried. On a register already in the cache a prefetch only costs, hence the threshold.
PREFETCH_FROM = 1 << 20
BLOCK = 512
AHEAD = 512
COMBINE_BLOCK = 1024  # values of a block of ``_combine_pixels`` (its per-channel constants: 24 KiB of float64, in the L1 cache)


@numba.njit(inline="always")
def clamped_code(k, low, high, clamp_low, clamp_high):  # pragma: no cover (compiled)
    """The code of the integer ``k`` clamped to [clamp_low, clamp_high], and 1.0 where ``k`` is outside
    [low, high] (else 0.0): selects, not min/max, so NaN passes through."""
    overflowed = np.float32(1) if (k < low) | (k > high) else np.float32(0)
    k = clamp_low if k < clamp_low else k
    return (clamp_high if k > clamp_high else k), overflowed


# Separate loops over a register and into another array, not one with an output that may be its input: LLVM
# vectorizes a loop over two arrays only after a run-time check that they do not overlap, and runs a register
# rounded over itself one value at a time.
@numba.njit(boundscheck=False, fastmath={"reassoc"}, cache=True)
def _round_over(v, scale, low, high, clamp_low, clamp_high):  # pragma: no cover (compiled)
    count = np.float32(0)
    for i in range(v.size):
        v[i], overflowed = clamped_code(np.rint(v[i] * scale), low, high, clamp_low, clamp_high)
        count += overflowed
    return count


@numba.njit(boundscheck=False, fastmath={"reassoc"}, cache=True)
def _round_over_unscaled(v, low, high, clamp_low, clamp_high):  # pragma: no cover (compiled)
    # ``_round_over`` with a scale of 1 (a conv/linear register): one multiply fewer per value.
    count = np.float32(0)
    for i in range(v.size):
        v[i], overflowed = clamped_code(np.rint(v[i]), low, high, clamp_low, clamp_high)
        count += overflowed
    return count


@numba.njit(boundscheck=False, fastmath={"reassoc"}, cache=True)
def _round_into(v, scale, out, low, high, clamp_low, clamp_high):  # pragma: no cover (compiled)
    count = np.float32(0)
    for i in range(v.size):
        out[i], overflowed = clamped_code(np.rint(v[i] * scale), low, high, clamp_low, clamp_high)
        count += overflowed
    return count


@numba.njit(boundscheck=False, fastmath={"reassoc"}, cache=True)
def _add_round_into(a, scale_a, b, scale_b, out, low, high, clamp_low, clamp_high):  # pragma: no cover
    count = np.float32(0)
    for i in range(a.size):
        out[i], overflowed = clamped_code(np.rint(a[i] * scale_a + b[i] * scale_b), low, high, clamp_low, clamp_high)
        count += overflowed
    return count


@numba.njit(boundscheck=False, cache=True)
def _one_loop(loop, a, b, out, p, ahead):  # pragma: no cover (compiled)
    """One of the loops over 1-D arrays, on the calling thread; the overflow count. ``loop``: 0 rounds
    ``a * scale_a`` over ``a``, 1 rounds ``a * scale_a`` into ``out``, 2 rounds ``a * scale_a + b * scale_b``
    into ``out``, 3 rounds ``a`` over ``a`` (``scale_a`` 1); arrays a loop does not read are ignored. ``p``:
    ``scale_a, scale_b, low, high, clamp_low, clamp_high`` (``loop_constants``). ``ahead`` > 0: in blocks of
    ``BLOCK`` values, the lines of the arrays it reads and writes ``ahead`` values on asked for before each."""
    scale_a, scale_b, low, high, clamp_low, clamp_high = p[0], p[1], p[2], p[3], p[4], p[5]
    block = BLOCK if ahead else max(a.size, 1)
    count = 0
    for start in range(0, a.size, block):
        stop = min(a.size, start + block)
        if ahead:
            prefetch_range(a, start + ahead, stop + ahead)
            if loop == 1 or loop == 2:
                prefetch_range(out, start + ahead, stop + ahead)
            if loop == 2:
                prefetch_range(b, start + ahead, stop + ahead)
        if loop == 3:
            count += np.int64(_round_over_unscaled(a[start:stop], low, high, clamp_low, clamp_high))
        elif loop == 0:
            count += np.int64(_round_over(a[start:stop], scale_a, low, high, clamp_low, clamp_high))
        elif loop == 1:
            count += np.int64(_round_into(a[start:stop], scale_a, out[start:stop], low, high, clamp_low, clamp_high))
        else:
            count += np.int64(_add_round_into(a[start:stop], scale_a, b[start:stop], scale_b, out[start:stop], low, high,
                                              clamp_low, clamp_high))
    return count


@numba.njit(inline="always")
def thread_range(values, threads, t):  # pragma: no cover (compiled)
    """Thread ``t``'s values of ``values`` shared among ``threads``: one contiguous range each, in order,
    as torch's ``parallel_for`` shares an element-wise operation."""
    chunk = (values + threads - 1) // threads
    return min(values, t * chunk), min(values, (t + 1) * chunk)


@numba.njit(parallel=True, boundscheck=False, cache=True)
def _in_pieces(loop, a, b, out, p, ahead, threads):  # pragma: no cover (compiled)
    """``_one_loop`` shared among ``threads`` of numba's threads (``thread_range``), each walking its range in
    pieces of at most ``PIECE`` values; the overflow count."""
    counts = np.zeros(threads, np.int64)
    for t in numba.prange(threads):
        first, last = thread_range(a.size, threads, t)
        for start in range(first, last, PIECE):
            stop = min(last, start + PIECE)
            counts[t] += _one_loop(loop, a[start:stop], b[start:stop], out[start:stop], p, ahead)
    return counts.sum()


@numba.njit(boundscheck=False, fastmath={"reassoc"}, cache=True)
def _round_then_add_block(v, b, scale_k, scale_b, low, high, clamp_low, clamp_high,
                          add_low, add_high, add_clamp_low, add_clamp_high):  # pragma: no cover (compiled)
    """``v``'s codes ``k`` in a register, then ``k * scale_k + b * scale_b`` rounded into the add's, over ``v``;
    the two overflow counts."""
    register = np.float32(0)
    added = np.float32(0)
    for i in range(v.size):
        k, overflowed = clamped_code(np.rint(v[i]), low, high, clamp_low, clamp_high)
        register += overflowed
        v[i], overflowed = clamped_code(np.rint(k * scale_k + b[i] * scale_b), add_low, add_high, add_clamp_low, add_clamp_high)
        added += overflowed
    return register, added


@numba.njit(boundscheck=False, cache=True)
def _round_then_add_over(v, b, p, ahead):  # pragma: no cover (compiled)
    """``_round_then_add_block`` on the calling thread, in blocks with the lines ahead asked for where
    ``ahead`` > 0 (as ``_one_loop``); the two counts. ``p``: ``scale_k, scale_b``, then ``low, high,
    clamp_low, clamp_high`` of the register and of the add (``loop_constants``)."""
    block = BLOCK if ahead else max(v.size, 1)
    register = added = 0
    for start in range(0, v.size, block):
        stop = min(v.size, start + block)
        if ahead:
            prefetch_range(v, start + ahead, stop + ahead)
            prefetch_range(b, start + ahead, stop + ahead)
        counts = _round_then_add_block(v[start:stop], b[start:stop], p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9])
        register += np.int64(counts[0])
        added += np.int64(counts[1])
    return register, added


@numba.njit(parallel=True, boundscheck=False, cache=True)
def _round_then_add_in_pieces(v, b, p, ahead, threads):  # pragma: no cover (compiled)
    """``_round_then_add_over`` shared among threads as ``_in_pieces`` shares its loops; the two counts."""
    register = np.zeros(threads, np.int64)
    added = np.zeros(threads, np.int64)
    for t in numba.prange(threads):
        first, last = thread_range(v.size, threads, t)
        for start in range(first, last, PIECE):
            stop = min(last, start + PIECE)
            counts = _round_then_add_over(v[start:stop], b[start:stop], p, ahead)
            register[t] += counts[0]
            added[t] += counts[1]
    return register.sum(), added.sum()


@numba.njit(inline="always")
def _term_sum(terms, weights, i):  # pragma: no cover (compiled)
    """``sum_t terms[t][i] * weights[t]`` in float64. ``terms`` is a tuple of a fixed length (its type's), so
    LLVM unrolls this loop and the caller's loop over ``i`` reads every term at once, vectorized, instead of
    summing term after term into a buffer."""
    total = 0.0
    for t in range(len(terms)):
        total += terms[t][i] * weights[t]
    return total


@numba.njit(boundscheck=False, fastmath={"reassoc"}, cache=True)
def _combine_pixels(terms, weights, extra, extra_weight, offset, scale, bias, out, first, last, channels, p):  # pragma: no cover
    """Pixels ``first`` to ``last`` of a kernel's terms (channels innermost: value ``pixel * channels + c``)
    summed and rounded: ``(sum_t terms[t] * weights[t] + extra * extra_weight + offset[c]) * scale[c] + bias[c]``
    in float64, rounded into ``out`` as ``_round_into`` rounds (``p``: as ``_one_loop``'s); the overflow
    count. In blocks of about ``COMBINE_BLOCK`` values, the per-channel constants laid out along a block
    once, so that the loop runs flat over it."""
    low, high, clamp_low, clamp_high = p[2], p[3], p[4], p[5]
    step = max(1, COMBINE_BLOCK // channels)
    width = step * channels
    block_offset, block_scale, block_bias = np.empty(width), np.empty(width), np.empty(width)
    for j in range(width):
        block_offset[j], block_scale[j], block_bias[j] = offset[j % channels], scale[j % channels], bias[j % channels]
    count = 0
    for pixel in range(first, last, step):
        start = pixel * channels
        n = (min(last, pixel + step) - pixel) * channels
        block_count = np.float32(0)
        # The loops index the terms by j itself (not start + j): LLVM then vectorizes them.
        if extra.size:
            for j in range(start, start + n):
                v = _term_sum(terms, weights, j) + extra[j] * extra_weight + block_offset[j - start]
                out[j], overflowed = clamped_code(np.rint(v * block_scale[j - start] + block_bias[j - start]), low, high,
                                                  clamp_low, clamp_high)
                block_count += overflowed
        else:
            for j in range(start, start + n):
                v = _term_sum(terms, weights, j) + block_offset[j - start]
                out[j], overflowed = clamped_code(np.rint(v * block_scale[j - start] + block_bias[j - start]), low, high,
                                                  clamp_low, clamp_high)
                block_count += overflowed
        count += np.int64(block_count)
    return count


@numba.njit(parallel=True, boundscheck=False, cache=True)
def _combine_in_pieces(terms, weights, extra, extra_weight, offset, scale, bias, out, channels, p, threads):  # pragma: no cover
    """``_combine_pixels`` over every pixel of ``out``, shared among ``threads`` as ``thread_range`` shares a
    register (whole pixels each); the overflow count."""
    counts = np.zeros(threads, np.int64)
    for t in numba.prange(threads):
        first, last = thread_range(out.size // channels, threads, t)
        counts[t] = _combine_pixels(terms, weights, extra, extra_weight, offset, scale, bias, out, first, last, channels, p)
    return counts.sum()


def rounds(fmt: QFormat) -> bool:
    """Whether these loops implement ``fmt``'s rule: round half to even, saturate."""
    return fmt.rounding == "nearest_even" and fmt.overflow == "saturate"


def supports(fmt: QFormat, *inputs: torch.Tensor) -> bool:
    """Whether these loops can round ``inputs`` (one, or the two operands of an add) into ``fmt``: the
    format rounds half to even and saturates; the inputs are dense float32/float64 CPU tensors of one shape
    and memory order, so that one flat index walks them and an output made by ``torch.empty_like`` alike."""
    if not rounds(fmt):
        return False
    first = inputs[0]
    if first.numel() == 0 or not (first.is_contiguous() or first.is_contiguous(memory_format=torch.channels_last)):
        return False
    for t in inputs:  # a loop, not all() over generators: this runs for every register a network writes
        if not t.is_cpu or t.dtype not in _DTYPES:
            return False
        if t is not first and (t.shape != first.shape or t.stride() != first.stride()):
            return False
    return True


def flat_values(v: torch.Tensor) -> np.ndarray:
    """The values of a dense tensor (``supports``) in memory order, as a flat NumPy view (no copy)."""
    return (v.detach() if v.requires_grad else v).numpy().ravel(order="K")


@functools.lru_cache(maxsize=1024)  # a few per register; asked for every one it rounds
def loop_constants(dtype: type, scales: tuple[float, float], *registers: tuple[QFormat, tuple[int, int]]) -> np.ndarray:
    """The loops' constants as one array of the working dtype ``dtype``: the two scales, then ``low, high,
    clamp_low, clamp_high`` of each register written (``clamped_code``). One array, not a dozen scalars:
    numba's dispatcher takes microseconds to type each argument of a call."""
    values = list(scales)
    for fmt, clamp in registers:
        values += [fmt.min_code, fmt.max_code, *clamp]
    return np.array(values, dtype)


def _run(loop: int, fmt: QFormat, clamp: tuple[int, int], a: torch.Tensor, out: torch.Tensor,
         scale_a: float = 1.0, b: torch.Tensor | None = None, scale_b: float = 0.0) -> int:
    """``_in_pieces`` on the tensors' memory, the constants in ``a``'s dtype (the working one: the codes'
    bounds are integers, exact in either), on torch's number of threads; one piece runs on the calling thread."""
    flat_a = flat_values(a)
    flat_out = flat_a if out is a else flat_values(out)
    flat_b = flat_a if b is None else flat_values(b)
    constants = loop_constants(flat_a.dtype.type, (scale_a, scale_b), (fmt, clamp))
    if flat_a.size <= PIECE:
        # Nothing to share: waking numba's threads would cost more than the loop.
        return int(_one_loop(loop, flat_a, flat_b, flat_out, constants, prefetch_ahead(flat_a.size)))
    return int(_in_pieces(loop, flat_a, flat_b, flat_out, constants, prefetch_ahead(flat_a.size), follow_torch_threads()))


def prefetch_ahead(values: int) -> int:
    """How far ahead the loops prefetch on a register of ``values`` values (0: they do not)."""
    return AHEAD if values > PREFETCH_FROM else 0


_THREADS_SET: dict[int, int] = {}  # Python thread -> the number of numba threads set for it (numba's is per thread)


def follow_torch_threads() -> int:
    """Run numba's parallel loops on torch's number of threads (numba's default threading layer here, omp,
    shares torch's OpenMP runtime); that number. Set only when torch's changed: asking numba for its own
    number right after a torch operation costs a fair part of rounding a small register."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    caller = threading.get_ident()
    if _THREADS_SET.get(caller) != threads:
        numba.set_num_threads(threads)
        _THREADS_SET[caller] = threads
    return threads


def round_into(v: torch.Tensor, out: torch.Tensor, fmt: QFormat, clamp: tuple[int, int], scale: float = 1.0) -> int:
    """Write the codes of ``v * scale`` (real values times ``2**F``; ``scale`` a power of two, exact) in
    ``fmt`` into ``out`` (may be ``v``), clamped to ``clamp`` (codes within the format's range: a ReLU or
    ReLU6 that reads the register); return how many values fell outside the format's range, counted
    before the clamp. ``supports(fmt, v)`` must hold, and ``out`` be ``v`` or have its shape and strides
    (``torch.empty_like``)."""
    loop = (3 if scale == 1.0 else 0) if out is v else 1
    return _run(loop, fmt, clamp, v, out, scale)


def add_round_into(
    a: torch.Tensor, scale_a: float, b: torch.Tensor, scale_b: float, out: torch.Tensor, fmt: QFormat, clamp: tuple[int, int]
) -> int:
    """``round_into`` of ``a * scale_a + b * scale_b``: powers of two, the sum exact in ``a``'s dtype (the
    caller's bound), so that computing it in the wider of the two dtypes gives the same codes.
    ``supports(fmt, a, b)`` must hold, and ``out`` be a new tensor of ``a``'s shape and strides."""
    return _run(2, fmt, clamp, a, out, scale_a, b, scale_b)


def round_then_add(v: torch.Tensor, fmt: QFormat, clamp: tuple[int, int], scale_k: float, b: torch.Tensor, scale_b: float,
                   add_fmt: QFormat, add_clamp: tuple[int, int]) -> tuple[int, int]:
    """A register and the residual add that is its only reader, in one pass: the codes ``k`` of ``v`` (real
    values times ``2**F``) in ``fmt``, clamped to ``clamp``, as ``round_into`` gives them, then
    ``k * scale_k + b * scale_b`` rounded into ``add_fmt``, clamped to ``add_clamp``, as ``add_round_into``
    gives them, written over ``v`` (the register's codes are never stored); returns the overflow counts of
    the register and of the add. ``supports(fmt, v)`` and ``supports(add_fmt, v, b)`` must hold, and ``v``'s
    dtype hold both registers' codes and be the one the add is exact in."""
    flat_v, flat_b = flat_values(v), flat_values(b)
    constants = loop_constants(flat_v.dtype.type, (scale_k, scale_b), (fmt, clamp), (add_fmt, add_clamp))
    ahead = prefetch_ahead(flat_v.size)
    if flat_v.size <= PIECE:  # as in _run: nothing to share
        register, added = _round_then_add_over(flat_v, flat_b, constants, ahead)
    else:
        register, added = _round_then_add_in_pieces(flat_v, flat_b, constants, ahead, follow_torch_threads())
    return int(register), int(added)


def _channels_innermost(t: torch.Tensor) -> bool:
    """Whether ``t``'s values lie channel after channel for each pixel (channels-last, or a (N, C) matrix)."""
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 2 and t.is_contiguous()


def combines(fmt: QFormat, terms: list[torch.Tensor], offset_sums: torch.Tensor | None) -> bool:
    """Whether ``combine_round_into`` can sum and round these kernel terms into ``fmt``: the format rounds
    half to even and saturates; the first term is a CPU tensor, channels innermost, float32 or int32; the
    others are of its dtype but for at most one (a window-sums term, float32 or float64), each of its shape
    or broadcast to it; the offset is per channel."""
    if not rounds(fmt):
        return False
    first = terms[0]
    if not first.is_cpu or first.numel() == 0 or first.dtype not in (torch.float32, torch.int32) or not _channels_innermost(first):
        return False
    other_dtypes = [t.dtype for t in terms if t.dtype != first.dtype]
    if len(other_dtypes) > 1 or (other_dtypes and other_dtypes[0] not in _DTYPES):
        return False
    for t in terms:
        if not t.is_cpu or t.dim() != first.dim() or any(n not in (1, m) for n, m in zip(t.shape, first.shape)):
            return False
    return offset_sums is None or (offset_sums.is_cpu and offset_sums.numel() == first.shape[1])


def _like(t: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``t`` in ``first``'s shape and memory order (a copy where it is not: a window-sums term, one per layer)."""
    if t.shape == first.shape and t.stride() == first.stride():
        return t
    return torch.empty_like(first, dtype=t.dtype).copy_(t.expand_as(first))


def combine_round_into(terms: list[torch.Tensor], multipliers: list[float], offset_sums: torch.Tensor | None,
                       scale: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, fmt: QFormat, clamp: tuple[int, int]) -> int:
    """Write the codes of ``(sum_t terms[t] * multipliers[t] + offset_sums) * scale + bias`` (a kernel's exact
    terms, ``kernels.Terms``; per-channel ``offset_sums``, ``scale`` (powers of two) and ``bias``, all exact in
    float64 by the kernel's bound) in ``fmt`` into ``out`` (a new tensor like ``terms[0]``, of the codes'
    dtype), clamped to ``clamp``, in one pass; return how many overflowed the format. ``combines`` must hold."""
    first = terms[0]
    main = [(_like(t, first), m) for t, m in zip(terms, multipliers) if t.dtype == first.dtype]
    other = [(_like(t, first), m) for t, m in zip(terms, multipliers) if t.dtype != first.dtype]
    extra, extra_weight = other[0] if other else (first.new_empty(0, dtype=torch.float64), 0.0)
    channels = first.shape[1]
    per_channel = [(v.reshape(-1) if v is not None else torch.zeros(channels, dtype=torch.float64)).double().numpy()
                   for v in (offset_sums, scale, bias)]
    constants = loop_constants(np.float64, (1.0, 0.0), (fmt, clamp))
    args = (tuple(flat_values(t) for t, _ in main), np.array([m for _, m in main]), flat_values(extra), float(extra_weight),
            *per_channel, flat_values(out))
    if first.numel() <= PIECE:  # as in _run: nothing to share
        return int(_combine_pixels(*args, 0, first.numel() // channels, channels, constants))
    return int(_combine_in_pieces(*args, channels, constants, follow_torch_threads()))
