"""The layer kernels that round as they store, against the independent integer reference: the depthwise
loop (``depthwise_loop``) and the float64 kernel's blocks over a pointwise layer's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import integer_reference as ref
from fxpsweep.backends import kernels
from fxpsweep.backends.depthwise_loop import depthwise_into, output_shape
from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.engine.ops import FixedDot
from fxpsweep.engine.settings import QuantSettings

IN, WEIGHT, BIAS = QFormat(16, 4), QFormat(16, 15), QFormat(16, 12)  # accumulator F 19, bias shifted up 7


def random_codes(rng: np.random.Generator, shape, bits: int = 16) -> np.ndarray:
    return rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=shape, dtype=np.int64)


def reference(total: np.ndarray, out_fmt: QFormat, clamp: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """Codes of ``total`` (accumulator codes at F 19) in ``out_fmt``, clamped, and how many overflowed it."""
    rounded = ref.requantize_array(total, 19, 60, out_fmt.frac_bits, out_fmt.rounding, "saturate")  # 60 bits: none overflow
    overflowed = int(((rounded < out_fmt.min_code) | (rounded > out_fmt.max_code)).sum())
    low, high = clamp or (out_fmt.min_code, out_fmt.max_code)
    return np.clip(rounded, max(low, out_fmt.min_code), min(high, out_fmt.max_code)), overflowed


def channels_last(codes: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(codes, dtype=dtype).contiguous(memory_format=torch.channels_last)


def fixed_dot(module: nn.Conv2d, w: np.ndarray, b: np.ndarray, out_fmt: QFormat, kernel: type[kernels.Kernel]) -> FixedDot:
    """A FixedDot of ``module`` with weight codes ``w`` and bias codes ``b``, forced onto ``kernel``."""
    with torch.no_grad():
        module.weight.copy_(torch.tensor(w, dtype=torch.float64).mul(2.0**-WEIGHT.frac_bits))
        module.bias.copy_(torch.tensor(b, dtype=torch.float64).mul(2.0**-BIAS.frac_bits))
    op = FixedDot("layer", module)
    op.set_parameter_formats([WEIGHT] * module.out_channels, BIAS)
    op.finalize(out_fmt, [IN], QuantSettings(16, 16, rounding=out_fmt.rounding), 0)
    chosen = [k for k in op.candidates if isinstance(k, kernel)]
    assert chosen, f"{kernel.name} is not a candidate"
    op.use(chosen[0])
    return op


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_depthwise_loop_rounds_counts_and_clamps_as_the_reference(stride, padding, dilation, dtype) -> None:
    rng = np.random.default_rng(stride + 3 * padding + 7 * dilation)
    channels, out_fmt, clamp = 19, QFormat(16, 8), (0, 5000)  # a ReLU-like clamp inside the format
    x, w = random_codes(rng, (3, channels, 9, 11)), random_codes(rng, (channels, 1, 3, 3))
    scale = np.full(channels, 2.0 ** (out_fmt.frac_bits - 19))
    codes = channels_last(x, dtype)
    out = torch.empty(output_shape(codes, (3, 3), (stride,) * 2, (padding,) * 2, (dilation,) * 2)).contiguous(memory_format=torch.channels_last)
    overflowed = depthwise_into(
        codes, w[:, 0].transpose(1, 2, 0).astype(np.float64).copy(), scale, np.zeros(channels),
        (stride,) * 2, (padding,) * 2, (dilation,) * 2, out, out_fmt, clamp,
    )
    expected, expected_overflows = reference(ref.conv2d_exact(x, w, stride, padding, dilation, channels), out_fmt, clamp)
    np.testing.assert_array_equal(out.to(torch.int64).numpy(), expected)
    assert overflowed == expected_overflows > 0
    values = torch.empty(out.shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert depthwise_into(codes, w[:, 0].transpose(1, 2, 0).astype(np.float64).copy(), np.ones(channels), np.zeros(channels),
                          (stride,) * 2, (padding,) * 2, (dilation,) * 2, values) == 0
    np.testing.assert_array_equal(values.to(torch.int64).numpy(), ref.conv2d_exact(x, w, stride, padding, dilation, channels))


@pytest.mark.parametrize("rounding", ["nearest_even", "floor"])
def test_a_depthwise_layer_on_the_loop_gives_the_reference_codes(rounding: str) -> None:
    # nearest_even rounds in the loop; floor takes the loop's float64 values to the Rounder.
    rng = np.random.default_rng(5)
    module = nn.Conv2d(24, 24, 3, 2, 1, groups=24)
    x, w, b = random_codes(rng, (4, 24, 15, 15)), random_codes(rng, module.weight.shape), random_codes(rng, (24,))
    out_fmt = QFormat(16, 6, rounding)
    op = fixed_dot(module, w, b, out_fmt, kernels.DepthwiseLoopKernel)
    with torch.no_grad():
        got = op(channels_last(x))
    expected, overflowed = reference(ref.conv2d_exact(x, w, 2, 1, 1, 24) + b.reshape(1, -1, 1, 1) * 2**7, out_fmt)
    np.testing.assert_array_equal(got.to(torch.int64).numpy(), expected)
    assert op.overflows == overflowed > 0


def test_the_depthwise_loop_is_a_candidate_only_for_depthwise_layers() -> None:
    rng = np.random.default_rng(0)
    for module, expected in [(nn.Conv2d(8, 8, 3, groups=8), True), (nn.Conv2d(8, 16, 3, groups=8), False), (nn.Conv2d(8, 8, 3, groups=2), False)]:
        op = FixedDot("layer", module)
        op.set_parameter_formats([WEIGHT] * module.out_channels, BIAS)
        with torch.no_grad():
            module.weight.copy_(torch.tensor(random_codes(rng, module.weight.shape), dtype=torch.float64).mul(2.0**-15))
        op.finalize(QFormat(16, 6), [IN], QuantSettings(16, 16), 0)
        assert any(isinstance(k, kernels.DepthwiseLoopKernel) for k in op.candidates) == expected


@pytest.mark.parametrize("rounding", ["nearest_even", "floor", "stochastic"])
def test_a_pointwise_layer_in_float64_blocks_gives_the_reference_codes(rounding: str, monkeypatch) -> None:
    # Blocks of 7 pixels over 2 * 5 * 6 = 60 pixels: eight full blocks and a short one. Stochastic
    # rounding draws for the whole output at once (no blocks): the same codes as the unblocked kernel.
    monkeypatch.setattr(kernels, "BLOCK_VALUES", 7 * 12)
    rng = np.random.default_rng(6)
    module = nn.Conv2d(10, 12, 1)
    x, w, b = random_codes(rng, (2, 10, 5, 6)), random_codes(rng, module.weight.shape), random_codes(rng, (12,))
    out_fmt = QFormat(16, 4, rounding)
    op = fixed_dot(module, w, b, out_fmt, kernels.Float64Kernel)
    assert op.forced.matrix is not None and op.forced.scratch == 0.0
    total = ref.conv2d_exact(x, w, 1, 0, 1, 1) + b.reshape(1, -1, 1, 1) * 2**7
    with torch.no_grad():
        got = op(channels_last(x))
    if rounding == "stochastic":
        low = ref.requantize_array(total, 19, 60, 4, "floor", "saturate")
        neighbours = [np.clip(k, out_fmt.min_code, out_fmt.max_code) for k in (low, low + 1)]
        assert np.all((got.numpy() == neighbours[0]) | (got.numpy() == neighbours[1]))
        return
    expected, overflowed = reference(total, out_fmt)
    np.testing.assert_array_equal(got.to(torch.int64).numpy(), expected)
    assert op.overflows == overflowed > 0
