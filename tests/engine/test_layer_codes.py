"""Each fixed-point operation against the independent integer reference, on random layers and formats."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import integer_reference as ref
from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.backends import kernels
from fxpsweep.backends.kernels import Int8MatmulKernel, OneDNNInt8Kernel, onednn_digit_bits
from fxpsweep.engine.ops import FixedAdd, FixedAvgPool, FixedCat, FixedDot, FixedInput
from fxpsweep.engine.settings import QuantSettings

ROUNDINGS = ["nearest_even", "nearest_up", "nearest_away", "floor", "toward_zero"]
KERNELS_SEEN: set[str] = set()


def random_codes(rng: np.random.Generator, shape, bits: int) -> np.ndarray:
    return rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=shape, dtype=np.int64)


def as_real(codes: np.ndarray, frac_bits: int) -> torch.Tensor:
    return torch.tensor(codes, dtype=torch.float64).mul(2.0**-frac_bits).float()


def run_op(op, device, settings: QuantSettings, out_fmt: QFormat, in_fmts: list[QFormat], *inputs: np.ndarray) -> np.ndarray:
    """The operation's output codes; a conv/linear runs on every kernel it may choose, which must all agree."""
    op.to(device).finalize(out_fmt, in_fmts, settings, 0)
    outputs = []
    for kernel in getattr(op, "candidates", None) or [None]:
        if kernel is not None:
            op.use(kernel)
        with torch.no_grad():
            out = op(*[torch.tensor(x, dtype=torch.float64, device=device) for x in inputs])
        assert torch.equal(out, out.round())
        outputs.append(out.cpu().to(torch.int64).numpy())
        KERNELS_SEEN.add(kernel.label if kernel is not None else getattr(op, "kernel", ""))
    for other in outputs[1:]:
        np.testing.assert_array_equal(other, outputs[0])
    return outputs[0]


@pytest.mark.parametrize("seed", range(60))
def test_conv_and_linear_codes_equal_the_reference(seed: int, device) -> None:
    py, rng = random.Random(seed), np.random.default_rng(seed)
    rounding, overflow = py.choice(ROUNDINGS), py.choice(["saturate", "wrap"])
    wa, ww, wb, wo = (py.randint(4, 16) for _ in range(4))
    fa, fw, fb, fo = (py.randint(-3, 12) for _ in range(4))
    linear = py.random() < 0.2
    acc = py.choice([None, None, (py.randint(12, 28), "wrap"), (py.randint(12, 28), "saturate")])
    product_bits = py.choice([None, None, None, py.randint(6, 20)])
    if linear:
        groups, k, stride, padding, dilation = 1, 1, 1, 0, 1
        cin, cout = py.randint(1, 40), py.randint(1, 12)
        x = random_codes(rng, (3, cin), wa)
        module = nn.Linear(cin, cout, bias=py.random() < 0.7)
    else:
        groups = py.choice([1, 1, 2, "depthwise"])
        cin = py.choice([2, 4, 6]) if groups != "depthwise" else py.randint(1, 6)
        groups = cin if groups == "depthwise" else groups
        cout = groups * py.randint(1, 3)
        k, stride, padding, dilation = py.choice([1, 3]), py.choice([1, 2]), py.choice([0, 1]), py.choice([1, 2])
        size = py.randint(5, 9)
        x = random_codes(rng, (2, cin, size, size), wa)
        module = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=py.random() < 0.7)
    w = random_codes(rng, module.weight.shape, ww)
    b = random_codes(rng, (cout,), wb) if module.bias is not None else None
    # Per output channel weight formats in a third of the cases.
    fws = [py.randint(-3, 12) for _ in range(cout)] if py.random() < 0.35 else [fw] * cout
    with torch.no_grad():
        for c in range(cout):
            module.weight[c].copy_(as_real(w[c], fws[c]))
        if b is not None:
            module.bias.copy_(as_real(b, fb))

    settings = QuantSettings(
        param_bits=ww, fwd_bits=wo, rounding=rounding, overflow=overflow,
        acc_bits=acc[0] if acc else None, acc_overflow=acc[1] if acc else "wrap", product_bits=product_bits,
    )
    op = FixedDot("layer", module)
    op.set_parameter_formats([QFormat(ww, f, rounding, overflow) for f in fws], QFormat(wb, fb, rounding, overflow) if b is not None else None)
    in_fmt, out_fmt = QFormat(wa, fa, rounding, overflow), QFormat(wo, fo, rounding, overflow)
    got = run_op(op, device, settings, out_fmt, [in_fmt], x)

    drop = max(0, wa + ww - 1 - product_bits) if product_bits else 0
    product = (product_bits, -drop, rounding) if product_bits else None
    if linear:
        acc_codes = ref.linear_acc(x, w, product, acc)
    else:
        acc_codes = ref.conv2d_acc(x, w, stride, padding, dilation, groups, product, acc)
    view = (1, cout) if linear else (1, cout, 1, 1)
    acc_frac = (fa + np.array(fws) - drop).reshape(view)
    if b is not None:
        sum_frac = np.maximum(acc_frac, fb)
        total = acc_codes * (np.int64(1) << (sum_frac - acc_frac)) + (b.reshape(view) * (np.int64(1) << (sum_frac - fb)))
    else:
        sum_frac, total = acc_frac, acc_codes
    expected = ref.requantize_array(total, sum_frac, wo, fo, rounding, overflow)
    np.testing.assert_array_equal(got, expected)


def test_wide_grouped_conv_codes_equal_the_reference(device) -> None:
    # K = 114 * 9 = 1026 per group: too wide for float32 pieces, so float64 on the CPU.
    rng = np.random.default_rng(0)
    module = nn.Conv2d(228, 4, 3, 1, 1, groups=2, bias=False)
    x, w = random_codes(rng, (1, 228, 4, 4), 16), random_codes(rng, module.weight.shape, 16)
    with torch.no_grad():
        module.weight.copy_(as_real(w, 14))
    op = FixedDot("wide", module)
    op.set_parameter_formats([QFormat(16, 14)] * 4, None)
    got = run_op(op, device, QuantSettings(16, 16), QFormat(16, -10), [QFormat(16, 4)], x)
    expected = ref.requantize_array(ref.conv2d_exact(x, w, 1, 1, 1, 2), 18, 16, -10, "nearest_even", "saturate")
    np.testing.assert_array_equal(got, expected)


def test_every_exact_kernel_was_exercised(device) -> None:
    # Runs after the parametrized cases above (pytest keeps file order): every kernel, and the
    # chunked and split forms (several calls per layer, "float32x3") of the CPU ones.
    names = {label.split("x")[0] for label in KERNELS_SEEN}
    cpu_only = {"onednn_int8", "int8_mm", "float32_pieces", "depthwise_loop"}
    expected = {"float32", "float64", "sequential"} | (cpu_only if device.type == "cpu" else set())
    assert names >= expected
    if device.type == "cpu":
        assert any(label.startswith("float32x") for label in KERNELS_SEEN)
        assert any(label.startswith("onednn_int8x") for label in KERNELS_SEEN)


@pytest.mark.parametrize("seed", range(30))
def test_avg_pool_codes_equal_the_reference(seed: int, device) -> None:
    py, rng = random.Random(seed), np.random.default_rng(seed)
    rounding, overflow = py.choice(ROUNDINGS), py.choice(["saturate", "wrap"])
    wa, wo, fa, fo = py.randint(4, 16), py.randint(4, 16), py.randint(-3, 10), py.randint(-3, 10)
    h, w = py.randint(3, 9), py.randint(3, 9)
    x = random_codes(rng, (2, 3, h, w), wa)
    if py.random() < 0.5:
        out_size = (py.randint(1, h), py.randint(1, w))
        op = FixedAvgPool("pool", output_size=out_size)
        rows, cols = ref.adaptive_windows(h, out_size[0]), ref.adaptive_windows(w, out_size[1])
    else:
        k = py.randint(2, 3)
        s, p = py.randint(1, 2), py.randint(0, k // 2)
        ceil_mode, include = py.random() < 0.5, py.random() < 0.5
        op = FixedAvgPool("pool", kernel_size=k, stride=s, padding=p, ceil_mode=ceil_mode, count_include_pad=include)
        rows = ref.pool_windows(h, k, s, p, ceil_mode, include)
        cols = ref.pool_windows(w, k, s, p, ceil_mode, include)
    settings = QuantSettings(param_bits=8, fwd_bits=wo, rounding=rounding, overflow=overflow)
    got = run_op(op, device, settings, QFormat(wo, fo, rounding, overflow), [QFormat(wa, fa, rounding, overflow)], x)
    np.testing.assert_array_equal(got, ref.avg_pool(x, rows, cols, fa, wo, fo, rounding, overflow))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "float64"])
def test_the_input_register_rounds_a_copy_never_the_callers_tensor(layout: str, device) -> None:
    # The codes are written over the channels-last or float32 copy the register makes, where it makes one;
    # a channels-last float32 input is read, not written.
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(6)) * 12
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last), "float64": x.double()}[layout].to(device)
    given = x.clone()
    fmt = QFormat(8, 3)
    op = FixedInput("input").to(device)
    op.finalize(fmt, [], QuantSettings(param_bits=8, fwd_bits=8), 0)
    with torch.no_grad():
        codes = op(x)
    assert torch.equal(x, given) and codes.data_ptr() != x.data_ptr()
    expected = [ref.overflow_int(ref.round_fraction(ref.Fraction(v) * 8, "nearest_even"), 8, "saturate") for v in x.cpu().reshape(-1).tolist()]
    np.testing.assert_array_equal(codes.cpu().contiguous().reshape(-1).to(torch.int64).numpy(), expected)
    assert op.overflows == sum(not -128 <= ref.round_fraction(ref.Fraction(v) * 8, "nearest_even") <= 127 for v in x.cpu().reshape(-1).tolist()) > 0


@pytest.mark.parametrize("bits", [8, 16, 20])
@pytest.mark.parametrize("pool", ["global 7x7", "global 8x8", "3x3 stride 2", "adaptive 7x7 to 3x3"])
def test_pools_of_float32_codes_equal_the_reference(bits: int, pool: str, device) -> None:
    # In a network, codes of up to 24 bits come as float32: the window sums are taken in float32 where no
    # window's can reach 2**24 (a 7 x 7 window of 16-bit codes, a 3 x 3 one of 20-bit codes), else in
    # float64 (7 x 7 or 8 x 8 of 20-bit codes). Extreme codes, whole windows of the largest and smallest,
    # and one window of the largest but one 96: at 20 bits, 8 x 8, its sum 64 * 516096 + 33 (above 2**24, odd)
    # would become the tie 64 * 516096 + 32 in float32 and round to 516096, not 516097.
    rng = np.random.default_rng(bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    size = 8 if pool == "global 8x8" else 7
    x = rng.choice([low, low + 1, high - 1, high], size=(2, 3, size, size))
    x[0, 0], x[0, 1], x[1, 2] = high, low, high
    x[1, 2, 0, 0] = 96
    if pool.startswith("global"):
        op = FixedAvgPool("pool", output_size=(1, 1))
        rows = cols = ref.adaptive_windows(size, 1)
    elif pool.startswith("adaptive"):  # windows of unequal sizes, overlapping
        op = FixedAvgPool("pool", output_size=(3, 3))
        rows = cols = ref.adaptive_windows(size, 3)
    else:
        op = FixedAvgPool("pool", kernel_size=3, stride=2, padding=1, ceil_mode=False, count_include_pad=True)
        rows = cols = ref.pool_windows(size, 3, 2, 1, False, True)
    fmt = QFormat(bits, 2)
    op.to(device).finalize(fmt, [fmt], QuantSettings(param_bits=8, fwd_bits=bits), 0)
    with torch.no_grad():
        out = op(torch.tensor(x, dtype=torch.float32, device=device))
    np.testing.assert_array_equal(out.cpu().to(torch.int64).numpy(), ref.avg_pool(x, rows, cols, 2, bits, 2, "nearest_even", "saturate"))


@pytest.mark.parametrize("window", [(1, 2), (2, 2), (4, 4), (8, 8)])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
@pytest.mark.parametrize("fa, fo", [(3, 5), (6, 2)])
def test_power_of_two_pools_equal_the_reference(window, rounding: str, overflow: str, fa: int, fo: int, device) -> None:
    # Windows of a power-of-two size take a scaling, not the exact division (FixedAvgPool.fixed_forward):
    # every rule, into an 8-bit output (that overflows where the output F is the finer), and the count of
    # the values that overflowed.
    rng = np.random.default_rng(window[0] * 10 + window[1])
    x = random_codes(rng, (2, 3, 2 * window[0], 2 * window[1]), 12)
    rows, cols = ref.adaptive_windows(x.shape[2], 2), ref.adaptive_windows(x.shape[3], 2)
    op = FixedAvgPool("pool", output_size=(2, 2))
    settings = QuantSettings(param_bits=8, fwd_bits=8, rounding=rounding, overflow=overflow)
    got = run_op(op, device, settings, QFormat(8, fo, rounding, overflow), [QFormat(12, fa, rounding, overflow)], x)
    np.testing.assert_array_equal(got, ref.avg_pool(x, rows, cols, fa, 8, fo, rounding, overflow))
    unbounded = ref.avg_pool(x, rows, cols, fa, 40, fo, rounding, overflow)
    overflowed = int(((unbounded < -128) | (unbounded > 127)).sum())
    assert op.overflows == overflowed and (overflowed > 0 or fo < fa)
    assert op.values == got.size


@pytest.mark.parametrize("seed", range(30))
def test_add_and_concat_codes_equal_the_reference(seed: int, device) -> None:
    py, rng = random.Random(seed), np.random.default_rng(seed)
    rounding, overflow = py.choice(ROUNDINGS), py.choice(["saturate", "wrap"])
    wa, wb, wo = py.randint(4, 16), py.randint(4, 16), py.randint(4, 16)
    fa, fb, fo = py.randint(-3, 12), py.randint(-3, 12), py.randint(-3, 12)
    a, b = random_codes(rng, (2, 3, 4, 4), wa), random_codes(rng, (2, 3, 4, 4), wb)
    settings = QuantSettings(param_bits=8, fwd_bits=wo, rounding=rounding, overflow=overflow)
    fmts = [QFormat(wa, fa, rounding, overflow), QFormat(wb, fb, rounding, overflow)]
    out_fmt = QFormat(wo, fo, rounding, overflow)
    got = run_op(FixedAdd("add"), device, settings, out_fmt, fmts, a, b)
    np.testing.assert_array_equal(got, ref.add(a, fa, b, fb, wo, fo, rounding, overflow))
    got = run_op(FixedCat("cat", 1), device, settings, out_fmt, fmts, a, b)
    expected = np.concatenate(
        [ref.requantize_array(a, fa, wo, fo, rounding, overflow), ref.requantize_array(b, fb, wo, fo, rounding, overflow)], axis=1
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape", ["conv", "grouped", "linear"])
def test_extreme_sixteen_bit_weights_on_every_kernel(shape: str, device) -> None:
    # Codes at the top of a 16-bit word (32640..32767) need a third signed digit, unless the
    # kernels shift the weights by 128 (split_weights): both ends of the range, every kernel.
    rng = np.random.default_rng(7)
    module = nn.Linear(40, 6) if shape == "linear" else nn.Conv2d(8, 8, 3, 1, 1, groups=4 if shape == "grouped" else 1)
    w = random_codes(rng, module.weight.shape, 16)
    w.reshape(-1)[:6] = [32767, 32700, 32640, -32768, -32700, 0]
    b = random_codes(rng, (module.bias.shape[0],), 20)
    x = random_codes(rng, (2, 40) if shape == "linear" else (2, 8, 5, 5), 16)
    with torch.no_grad():
        module.weight.copy_(as_real(w, 20))
        module.bias.copy_(as_real(b, 16))
    op = FixedDot("extreme", module)
    op.set_parameter_formats([QFormat(16, 20)] * module.weight.shape[0], QFormat(24, 16))
    got = run_op(op, device, QuantSettings(16, 16), QFormat(16, 0), [QFormat(16, 4)], x)
    assert device.type != "cpu" or any(getattr(k, "shift", 0) for k in op.candidates)
    acc = ref.linear_acc(x, w, None, None) if shape == "linear" else ref.conv2d_acc(x, w, 1, 1, 1, module.groups, None, None)
    view = (1, -1) if shape == "linear" else (1, -1, 1, 1)
    total = acc + b.reshape(view) * (np.int64(1) << 8)  # bias F 16 -> accumulator F 24
    np.testing.assert_array_equal(got, ref.requantize_array(total, 24, 16, 0, "nearest_even", "saturate"))


def extreme_eight_bit_layer(shape: str, device) -> tuple[FixedDot, np.ndarray, np.ndarray]:
    """An 8-bit layer (``conv``, ``strided_depthwise`` or ``linear``) with every weight and input code at
    the end of its range, products of one sign among them; the op, its input codes and weight codes."""
    rng = np.random.default_rng(3)
    if shape == "linear":
        module, x_shape = nn.Linear(64, 4, bias=False), (3, 64)
    else:
        groups = 8 if shape == "strided_depthwise" else 1
        module, x_shape = nn.Conv2d(8, 8, 3, 2 if groups > 1 else 1, 1, groups=groups, bias=False), (2, 8, 6, 6)
    w = np.where(rng.random(module.weight.shape) < 0.5, 127, -128).astype(np.int64)
    w[0] = 127  # one output channel of all-positive products against all-maximum inputs
    x = np.where(rng.random(x_shape) < 0.5, 127, -128).astype(np.int64)
    x.reshape(x_shape[0], -1)[0] = 127
    with torch.no_grad():
        module.weight.copy_(as_real(w, 0))
    op = FixedDot("extreme", module)
    op.set_parameter_formats([QFormat(8, 0)] * module.weight.shape[0], None)
    op.to(device).finalize(QFormat(32, 0), [QFormat(8, 0)], QuantSettings(8, 32), 0)
    return op, x, w


def extreme_acc(op: FixedDot, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The reference accumulator of ``extreme_eight_bit_layer``'s layer."""
    module = op.module
    if isinstance(module, nn.Linear):
        return ref.linear_acc(x, w, None, None)
    return ref.conv2d_acc(x, w, module.stride[0], 1, 1, module.groups, None, None)


@pytest.mark.parametrize("shape", ["conv", "strided_depthwise", "linear"])
@pytest.mark.parametrize("digit_bits", sorted({7, onednn_digit_bits()}))
def test_extreme_eight_bit_codes_on_onednn_with_either_digit_width(shape: str, digit_bits: int, device) -> None:
    # Every code at the end of its 8-bit range, products of one sign: where a library adds two
    # uint8 x int8 products into a saturating int16 first (x86 without VNNI), 8-bit digits are off by
    # millions; 7-bit digits (what fxpsweep uses there) are exact on every CPU. 8-bit digits are
    # checked where this CPU sums in int32 (VNNI), the only place the engine uses them.
    if device.type != "cpu":
        pytest.skip("oneDNN int8 kernels run on the CPU")
    op, x, w = extreme_eight_bit_layer(shape, device)
    assert OneDNNInt8Kernel.applies(op.layer, device, digit_bits)
    op.use(OneDNNInt8Kernel(op.layer, device, digit_bits=digit_bits))
    with torch.no_grad():
        got = op(torch.tensor(x, dtype=torch.float64, device=device)).cpu().to(torch.int64).numpy()
    np.testing.assert_array_equal(got, extreme_acc(op, x, w))


@pytest.mark.parametrize("shape", ["conv", "linear"])
def test_extreme_eight_bit_codes_on_int8_mm(shape: str, device) -> None:
    # torch._int_mm runs on oneDNN, whose pairs saturate int16 as its convolutions' do where it has no VNNI.
    if device.type != "cpu":
        pytest.skip("torch._int_mm runs on the CPU here")
    op, x, w = extreme_eight_bit_layer(shape, device)
    assert Int8MatmulKernel.applies(op.layer, device)
    op.use(Int8MatmulKernel(op.layer, device))
    with torch.no_grad():
        got = op(torch.tensor(x, dtype=torch.float64, device=device)).cpu().to(torch.int64).numpy()
    np.testing.assert_array_equal(got, extreme_acc(op, x, w))


def test_onednn_held_below_vnni_takes_seven_bit_digits(monkeypatch) -> None:
    try:
        for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # oneDNN's name, and its older one
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
            monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
            kernels.onednn_digit_bits.cache_clear()
            unheld = onednn_digit_bits()
            monkeypatch.setenv(name, "avx2")
            kernels.onednn_digit_bits.cache_clear()
            assert onednn_digit_bits() == 7
            monkeypatch.setenv(name, "AVX512_CORE_AMX")  # a cap above VNNI: what the processor has decides
            kernels.onednn_digit_bits.cache_clear()
            assert onednn_digit_bits() == unheld
    finally:
        monkeypatch.undo()
        kernels.onednn_digit_bits.cache_clear()


def test_every_kernel_is_exact_with_onednn_held_to_avx2(device) -> None:
    # ONEDNN_MAX_CPU_ISA is read when oneDNN starts, so the layer tests run again in a new process. On a
    # processor with VNNI this runs oneDNN's AVX2 kernels (vpmaddubsw's saturating pairs); where the
    # processor has none, what it runs anyway.
    if device.type != "cpu":
        pytest.skip("oneDNN's kernels run on the CPU")
    tests = [f"{__file__}::{name}" for name in (
        "test_conv_and_linear_codes_equal_the_reference", "test_extreme_sixteen_bit_weights_on_every_kernel",
        "test_extreme_eight_bit_codes_on_onednn_with_either_digit_width", "test_extreme_eight_bit_codes_on_int8_mm")]
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout.splitlines()[-1] and "failed" not in done.stdout.splitlines()[-1]


@pytest.mark.parametrize("seed", range(12))
def test_layers_reading_a_relu_register_equal_the_reference_on_every_kernel(seed: int, device) -> None:
    # An input that is never negative (the builder sets input_low_code from a ReLU-clamped producer)
    # goes to oneDNN as the codes themselves, zero point 0, 8-bit weight digits on any CPU.
    py, rng = random.Random(seed), np.random.default_rng(seed)
    wa, ww = py.randint(2, 8), py.randint(2, 8)
    linear = seed % 3 == 0
    module = nn.Linear(48, 5) if linear else nn.Conv2d(12, 6, 3, py.choice([1, 2]), 1, groups=py.choice([1, 3]))
    x = rng.integers(0, 2 ** (wa - 1), size=(3, 48) if linear else (2, 12, 7, 7), dtype=np.int64)
    x.reshape(x.shape[0], -1)[0] = 2 ** (wa - 1) - 1  # one image all at the top
    w = random_codes(rng, module.weight.shape, ww)
    w.reshape(w.shape[0], -1)[0] = 2 ** (ww - 1) - 1  # one channel of all-positive products
    with torch.no_grad():
        module.weight.copy_(as_real(w, 0))
        module.bias.zero_()
    op = FixedDot("after_relu", module)
    op.input_low_code = 0
    op.set_parameter_formats([QFormat(ww, 0)] * module.weight.shape[0], None)
    got = run_op(op, device, QuantSettings(ww, 32), QFormat(32, 0), [QFormat(wa, 0)], x)
    assert device.type != "cpu" or any(getattr(k, "zero_point", None) == 0 for k in op.candidates)
    acc = ref.linear_acc(x, w, None, None) if linear else ref.conv2d_acc(x, w, module.stride[0], 1, 1, module.groups, None, None)
    np.testing.assert_array_equal(got, acc)


def test_a_layer_sliced_over_the_batch_gives_the_reference_codes(device) -> None:
    # An output large enough that kernels of several calls run on slices of the batch (their temporaries
    # bounded by SCRATCH_BUDGET), each slice's codes written into the output; every kernel, sliced or not.
    rng = np.random.default_rng(3)
    module = nn.Conv2d(4, 48, 3, 1, 1, bias=True)
    x, w, b = random_codes(rng, (6, 4, 66, 66), 16), random_codes(rng, module.weight.shape, 16), random_codes(rng, (48,), 16)
    with torch.no_grad():
        module.weight.copy_(as_real(w, 15))
        module.bias.copy_(as_real(b, 12))
    op = FixedDot("large", module)
    op.set_parameter_formats([QFormat(16, 15)] * 48, QFormat(16, 12))
    got = run_op(op, device, QuantSettings(16, 16), QFormat(16, 2), [QFormat(16, 4)], x)
    codes = torch.zeros(x.shape, dtype=torch.float64, device=device)
    assert any(op._slice_size(k, codes) < len(x) for k in op.candidates)
    total = ref.conv2d_exact(x, w, 1, 1, 1, 1) + b.reshape(1, -1, 1, 1) * (np.int64(1) << 7)  # bias F 12 -> acc F 19
    np.testing.assert_array_equal(got, ref.requantize_array(total, 19, 16, 2, "nearest_even", "saturate"))
