"""The hand-written rounding loops (numba) give the integer reference's codes and overflow counts."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch

import integer_reference as ref
from fxpsweep.backends import fused, rounding_loop
from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.backends.fused import Rounder

FORMAT = QFormat(9, 0)  # codes -256..255, round half to even, saturate


def scaled_values(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Values times 2**F: ties (k + 1/2), near-ties, integers, -0.0, out of range on both sides."""
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(-400, 400, (n // 4,), generator=g).double() + 0.5
    near = ties + torch.tensor([2e-6, -2e-6]).repeat(n // 8)
    spread = (torch.rand(n - n // 4 - 2 * (n // 8) - 3, generator=g, dtype=torch.float64) - 0.5) * 900
    values = torch.cat([ties, near, spread, torch.tensor([-0.0, -0.3, 255.5])]).to(dtype)
    return values[torch.randperm(n, generator=g)]


@pytest.fixture(params=["unprefetched", "prefetched"])
def prefetch(request, monkeypatch) -> str:
    """Run the loops as on registers below ``PREFETCH_FROM`` values, or as on larger ones: in blocks, the
    lines ahead asked for (``PREFETCH_FROM`` lowered to 0, so every register here is 'large')."""
    if request.param == "prefetched":
        monkeypatch.setattr(rounding_loop, "PREFETCH_FROM", 0)
    return request.param


def half_even(values: np.ndarray) -> np.ndarray:
    """The integer reference's round half to even of exact float64 values (small integers here), as int64."""
    return ref.quantize_array(values, 62, 0, "nearest_even", "saturate")  # 62 bits: nothing here overflows


def reference(values: torch.Tensor, clamp: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Codes (clamped) and the overflow count."""
    rounded = half_even(values.reshape(-1).double().numpy())
    overflowed = int(((rounded < FORMAT.min_code) | (rounded > FORMAT.max_code)).sum())
    codes = np.clip(ref.overflow_array(rounded, FORMAT.total_bits, "saturate"), *clamp)
    return codes, overflowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("clamp", [(FORMAT.min_code, FORMAT.max_code), (0, 40)])
def test_the_loop_gives_the_reference_codes_and_count(dtype: torch.dtype, layout: str, clamp: tuple[int, int], prefetch: str) -> None:
    # 4 x 8 x 65 x 65 = 135 200 values: more than two pieces, the last one short
    v = scaled_values(4 * 8 * 65 * 65, dtype).reshape(4, 8, 65, 65)
    if layout == "channels_last":
        v = v.to(memory_format=torch.channels_last)
    assert v.numel() > 2 * rounding_loop.PIECE and rounding_loop.supports(FORMAT, v)
    expected, expected_overflows = reference(v, clamp)
    into = torch.empty_like(v, dtype=torch.float32)  # a new tensor of the codes' dtype (from float64: narrower)
    assert rounding_loop.round_into(v, into, FORMAT, clamp) == expected_overflows > 0
    np.testing.assert_array_equal(into.reshape(-1).numpy().astype(np.int64), expected)
    halved, expected_halved = torch.empty_like(into), reference(v * 0.5, clamp)  # a scale: the network input
    assert rounding_loop.round_into(v, halved, FORMAT, clamp, scale=0.5) == expected_halved[1]
    np.testing.assert_array_equal(halved.reshape(-1).numpy().astype(np.int64), expected_halved[0])
    halved_over = v.clone()  # a scale, over itself: the network input's copy
    assert rounding_loop.round_into(halved_over, halved_over, FORMAT, clamp, scale=0.5) == expected_halved[1]
    np.testing.assert_array_equal(halved_over.reshape(-1).numpy().astype(np.int64), expected_halved[0])
    overflowed = rounding_loop.round_into(v, v, FORMAT, clamp)  # over itself
    assert overflowed == expected_overflows and v.dtype == dtype
    np.testing.assert_array_equal(v.reshape(-1).numpy().astype(np.int64), expected)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_the_add_loop_gives_the_reference_codes_and_count(dtypes: tuple[torch.dtype, torch.dtype], prefetch: str) -> None:
    g = torch.Generator().manual_seed(4)
    shape = (4, 8, 65, 65)
    a = torch.randint(-2**10, 2**10, shape, generator=g).to(dtypes[0]).contiguous(memory_format=torch.channels_last)
    b = torch.randint(-2**12, 2**12, shape, generator=g).to(dtypes[1]).contiguous(memory_format=torch.channels_last)
    scale_a, scale_b = 0.25, 2.0**-5  # a with 2 more fractional bits than the output, b with 5: ties and overflows
    assert rounding_loop.supports(FORMAT, a, b)
    out = torch.empty_like(a, dtype=torch.float32)
    overflowed = rounding_loop.add_round_into(a, scale_a, b, scale_b, out, FORMAT, (0, 200))
    # Integers times powers of two, summed: exact in float64.
    exact = a.permute(0, 2, 3, 1).reshape(-1).double().numpy() * scale_a + b.permute(0, 2, 3, 1).reshape(-1).double().numpy() * scale_b
    rounded = half_even(exact)
    np.testing.assert_array_equal(out.permute(0, 2, 3, 1).reshape(-1).numpy().astype(np.int64), np.clip(rounded, 0, 200))
    assert overflowed == int(((rounded < FORMAT.min_code) | (rounded > FORMAT.max_code)).sum()) > 0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("images", [1, 4])  # 33 800 values: on the calling thread; 135 200: in pieces
@pytest.mark.parametrize("dot_first", [True, False])
def test_a_register_and_its_residual_add_in_one_loop_give_the_reference_codes_and_counts(
    layout: str, images: int, dot_first: bool, prefetch: str
) -> None:
    g = torch.Generator().manual_seed(5)
    v = scaled_values(images * 8 * 65 * 65, torch.float32).reshape(images, 8, 65, 65)  # the layer's register, FORMAT
    other = torch.randint(-2**12, 2**12, v.shape, generator=g).float()  # the add's other operand
    if layout == "channels_last":
        v, other = v.contiguous(memory_format=torch.channels_last), other.contiguous(memory_format=torch.channels_last)
    scale_k, scale_other = (0.25, 2.0**-5) if dot_first else (2.0**-5, 0.25)
    add_fmt, register_clamp, add_clamp = QFormat(7, -2), (FORMAT.min_code, 200), (0, 63)
    order = (0, 2, 3, 1) if layout == "channels_last" else (0, 1, 2, 3)
    values, others = v.permute(order).reshape(-1).double().numpy(), other.permute(order).reshape(-1).double().numpy()
    rounded = half_even(values)
    register = np.clip(ref.overflow_array(rounded, FORMAT.total_bits, "saturate"), *register_clamp)
    sums = half_even(register * scale_k + others * scale_other)  # integers times powers of two: exact in float64
    assert rounding_loop.supports(FORMAT, v) and rounding_loop.supports(add_fmt, v, other)
    counts = rounding_loop.round_then_add(v, FORMAT, register_clamp, scale_k, other, scale_other, add_fmt, add_clamp)
    np.testing.assert_array_equal(v.permute(order).reshape(-1).numpy().astype(np.int64), np.clip(sums, *add_clamp))
    expected = (int(((rounded < FORMAT.min_code) | (rounded > FORMAT.max_code)).sum()),
                int(((sums < add_fmt.min_code) | (sums > add_fmt.max_code)).sum()))
    assert counts == expected and min(expected) > 0


def test_non_finite_values_behave_as_in_the_compiled_pass() -> None:
    v = torch.tensor([math.inf, -math.inf, math.nan, 3.5, -700.0] * 20, dtype=torch.float32)
    compiled = v.clone()
    overflowed = rounding_loop.round_into(v, v, FORMAT, (0, 40))
    expected = fused._round_overflow_into(compiled, *Rounder(FORMAT, torch.float32, clamp=(0, 40))._bounds(compiled),
                                          "nearest_even", "saturate", 9, torch.float32)
    assert torch.equal(v.isnan(), compiled.isnan()) and torch.equal(v.nan_to_num(), compiled.nan_to_num())
    assert overflowed == int(expected) == 60  # inf, -inf and -700 overflow; NaN is not counted


def test_the_rounder_uses_the_loop_only_where_it_applies(monkeypatch) -> None:
    calls, supports = [], rounding_loop.supports
    real = rounding_loop.round_into
    monkeypatch.setattr(rounding_loop, "round_into", lambda *args: calls.append(args) or real(*args))
    v = scaled_values(1 << 12, torch.float32)
    for fmt, uses_loop in [(FORMAT, True), (QFormat(9, 0, overflow="wrap"), False), (QFormat(9, 0, rounding="floor"), False)]:
        calls.clear()
        codes, overflowed = Rounder(fmt, torch.float32).round(v.clone(), in_place=True)
        monkeypatch.setattr(rounding_loop, "supports", lambda *args: False)  # the compiled pass
        compiled, compiled_overflowed = Rounder(fmt, torch.float32).round(v.clone(), in_place=True)
        monkeypatch.setattr(rounding_loop, "supports", supports)
        assert torch.equal(codes, compiled) and overflowed == compiled_overflowed > 0
        assert bool(calls) == uses_loop
    assert not supports(FORMAT, v.reshape(64, 64).t()[::2])  # not dense
    assert not supports(FORMAT, v.to(torch.int32))
    assert not supports(FORMAT, v.reshape(64, 64), v.reshape(64, 64).t().contiguous().t())  # memory orders differ


def test_registers_larger_than_a_cache_are_prefetched() -> None:
    assert rounding_loop.prefetch_ahead(rounding_loop.PREFETCH_FROM) == 0
    assert rounding_loop.prefetch_ahead(rounding_loop.PREFETCH_FROM + 1) == rounding_loop.AHEAD > 0


def test_the_loop_runs_on_torchs_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        v = scaled_values(1 << 17, torch.float32)
        rounding_loop.round_into(v, v, FORMAT, (FORMAT.min_code, FORMAT.max_code))
        assert numba.get_num_threads() == 1
        torch.set_num_threads(2)  # and back, where numba has that many
        rounding_loop.round_into(v, v, FORMAT, (FORMAT.min_code, FORMAT.max_code))
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("values, threads", [(10, 3), (1 << 17, 2), ((1 << 17) + 1, 2), (5, 8)])
def test_threads_share_a_register_in_contiguous_ranges_in_order(values: int, threads: int) -> None:
    # As torch's parallel_for shares an element-wise operation: thread 0 the first range, and so on.
    ranges = [rounding_loop.thread_range(values, threads, t) for t in range(threads)]
    assert ranges[0][0] == 0 and ranges[-1][1] == values
    assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) == -(-values // threads)


@pytest.mark.parametrize("shape, layout", [((4, 6, 1, 1), "channels_last"), ((1, 1, 8, 8), "channels_last"),
                                           ((2, 6, 4, 1), "channels_last"), ((8, 11), "contiguous")])
def test_a_register_of_size_one_dimensions_is_rounded_over_itself(shape: tuple[int, ...], layout: str) -> None:
    # The loops walk a NumPy view of the tensor's memory: it must be the tensor's memory, not a copy of it.
    v = scaled_values(math.prod(shape), torch.float32).reshape(shape)
    if layout == "channels_last":
        v = v.contiguous(memory_format=torch.channels_last)
    assert rounding_loop.supports(FORMAT, v) and np.shares_memory(rounding_loop.flat_values(v), v.numpy())
    expected, expected_overflows = reference(v.permute(0, 2, 3, 1) if layout == "channels_last" else v, (0, 40))
    assert rounding_loop.round_into(v, v, FORMAT, (0, 40)) == expected_overflows
    in_memory_order = v.permute(0, 2, 3, 1) if layout == "channels_last" else v
    np.testing.assert_array_equal(in_memory_order.reshape(-1).numpy().astype(np.int64), expected)


@pytest.mark.parametrize("term_dtype, extra", [(torch.float32, None), (torch.int32, torch.float32), (torch.float32, "broadcast")])
@pytest.mark.parametrize("images", [1, 4])  # 4 x 16 x 33 x 33 = 69 696 values: shared among threads; 1: on the caller's
def test_kernel_terms_summed_and_rounded_in_one_loop_give_the_reference(term_dtype: torch.dtype, extra, images: int) -> None:
    # A kernel's terms (kernels.Terms): pieces times powers of two, a window-sums term of another dtype or
    # broadcast over the channels, a per-channel offset, scale and bias; ties and overflows on both sides.
    g = torch.Generator().manual_seed(5)
    shape, channels = (images, 16, 33, 33), 16
    terms = [torch.randint(-2**14, 2**14, shape, generator=g).to(term_dtype).contiguous(memory_format=torch.channels_last)
             for _ in range(3)]
    multipliers = [1.0, 256.0, 2.0**-3]
    if extra == "broadcast":  # one value per pixel for every channel, as a linear layer's window sums (N, 1) are
        terms.append(torch.randint(-600, 600, (images, 1, 33, 33), generator=g).float())
        multipliers.append(128.0)
    elif extra is not None:  # another dtype, in NCHW order
        terms.append(torch.randint(-600, 600, shape, generator=g).to(extra))
        multipliers.append(128.0)
    offset = torch.randint(-2**20, 2**20, (1, channels, 1, 1), generator=g).double()
    scale = 2.0 ** -torch.randint(10, 13, (1, channels, 1, 1), generator=g).double()
    bias = torch.randint(-2**12, 2**12, (1, channels, 1, 1), generator=g).double() / 4
    fmt, clamp = QFormat(12, 0), (-100, 1500)
    assert rounding_loop.combines(fmt, terms, offset)
    out = torch.empty_like(terms[0], dtype=torch.float32)
    overflowed = rounding_loop.combine_round_into(terms, multipliers, offset, scale, bias, out, fmt, clamp)
    values = [torch.broadcast_to(t, shape).permute(0, 2, 3, 1).reshape(-1, channels).tolist() for t in terms]
    expected, expected_overflows = [], 0
    for pixel in range(len(values[0])):
        for c in range(channels):
            acc = sum(ref.Fraction(int(v[pixel][c])) * ref.Fraction(m) for v, m in zip(values, multipliers)) + int(offset[0, c, 0, 0])
            k = ref.round_fraction(acc * ref.Fraction(float(scale[0, c, 0, 0])) + ref.Fraction(float(bias[0, c, 0, 0])), "nearest_even")
            expected_overflows += not fmt.min_code <= k <= fmt.max_code
            expected.append(min(max(ref.overflow_int(k, fmt.total_bits, "saturate"), clamp[0]), clamp[1]))
    np.testing.assert_array_equal(out.permute(0, 2, 3, 1).reshape(-1).numpy().astype(np.int64), expected)
    assert overflowed == expected_overflows > 0


def test_kernel_terms_the_loop_cannot_take_stay_on_the_compiled_pass() -> None:
    cl = torch.zeros(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert rounding_loop.combines(FORMAT, [cl, cl.clone()], None)
    assert not rounding_loop.combines(QFormat(9, 0, rounding="floor"), [cl, cl.clone()], None)  # another rule
    assert not rounding_loop.combines(FORMAT, [cl.contiguous(), cl.clone()], None)  # channels not innermost
    assert not rounding_loop.combines(FORMAT, [cl.double(), cl.clone()], None)  # float64 pieces: no kernel makes them
    assert not rounding_loop.combines(FORMAT, [cl, cl.double(), cl.int()], None)  # two other dtypes
    assert not rounding_loop.combines(FORMAT, [cl, cl[:, :4]], None)  # neither its shape nor broadcast to it
    assert not rounding_loop.combines(FORMAT, [cl, cl.clone()], torch.zeros(1, 4, 1, 1))  # offset not per channel
