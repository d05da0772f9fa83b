"""Whole networks at 8 and 16 bits: every operation's codes equal an integer re-run of that layer.

Random weights (with non-trivial BatchNorm statistics, folded) and small
random inputs; each operation's input codes are recorded and the layer is
recomputed by ``integer_reference`` from them, its formats and the float weights.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import pytest
import torch

import integer_reference as ref
from made_on_the_fly import random_network
from fxpsweep.engine.ops import FixedAdd, FixedAvgPool, FixedCat, FixedClamp, FixedDot, FixedInput
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.core.rules import parse_rule


def reference_output(op, inputs: list[np.ndarray], float_input: np.ndarray) -> np.ndarray:
    """The layer recomputed in integers from its input codes; a ReLU or ReLU6 that is a register's only
    reader is applied as it is written: codes clipped to the clamp constants on the grid (rounded toward zero)."""
    codes = register_codes(op, inputs, float_input)
    if op.read_clamp is None:
        return codes
    f, (low, high) = op.out_fmt, op.read_clamp
    low_code = f.min_code if low == -np.inf else max(f.min_code, int(np.ceil(low * 2.0**f.frac_bits)))
    high_code = f.max_code if high == np.inf else min(f.max_code, int(np.floor(high * 2.0**f.frac_bits)))
    return np.clip(codes, low_code, high_code)


def register_codes(op, inputs: list[np.ndarray], float_input: np.ndarray) -> np.ndarray:
    o = op.out_fmt
    if isinstance(op, FixedInput):
        return ref.quantize_array(float_input, o.total_bits, o.frac_bits, o.rounding, o.overflow)
    if isinstance(op, FixedDot):
        a_fmt = op.in_fmts[0]
        bf = op.bias_fmt
        # GPTQ's codes are the datapath's input, like the float weights; else each weight rounded in its format.
        w = rounded_weights(op) if op.chosen_weight_codes is None else op.chosen_weight_codes.numpy().astype(np.int64)
        x = inputs[0]
        if op.geometry.is_linear:
            acc = ref.conv2d_exact(x[:, :, None, None], w[:, :, None, None], 1, 0, 1, 1)[:, :, 0, 0]
        else:
            g = op.geometry
            acc = ref.conv2d_exact(x, w, g.stride[0], g.padding[0], g.dilation[0], g.groups)
        view = (1, -1) if op.geometry.is_linear else (1, -1, 1, 1)
        acc_frac = (a_fmt.frac_bits + np.array([f.frac_bits for f in op.weight_fmts])).reshape(view)
        if bf is not None:
            b = ref.quantize_array(op.module.bias.detach().cpu().numpy(), bf.total_bits, bf.frac_bits, bf.rounding, bf.overflow)
            s = np.maximum(acc_frac, bf.frac_bits)
            acc = acc * (np.int64(1) << (s - acc_frac)) + b.reshape(view) * (np.int64(1) << (s - bf.frac_bits))
            acc_frac = s
        return ref.requantize_array(acc, acc_frac, o.total_bits, o.frac_bits, o.rounding, o.overflow)
    if isinstance(op, FixedAdd):
        (fa, fb), (a, b) = op.in_fmts, inputs
        return ref.add(a, fa.frac_bits, b, fb.frac_bits, o.total_bits, o.frac_bits, o.rounding, o.overflow)
    if isinstance(op, FixedCat):
        parts = [ref.requantize_array(x, f.frac_bits, o.total_bits, o.frac_bits, o.rounding, o.overflow) for x, f in zip(inputs, op.in_fmts)]
        return np.concatenate(parts, axis=op.dim)
    if isinstance(op, FixedAvgPool):
        (x,) = inputs
        rows = ref.adaptive_windows(x.shape[2], op.output_size[0])
        cols = ref.adaptive_windows(x.shape[3], op.output_size[1])
        return ref.avg_pool(x, rows, cols, op.in_fmts[0].frac_bits, o.total_bits, o.frac_bits, o.rounding, o.overflow)
    if isinstance(op, FixedClamp):
        return inputs[0]  # its clamp is applied by reference_output
    raise AssertionError(type(op))


# Every pair of (network, word length, format mode) once: wide biases with per-channel weights, or biases at the
# word length with per-tensor weights, at 8 and 16 bits, on each network (pairwise, not the full product).
NETWORK_FORMATS = [
    ("resnet18", 8, 32, "channel"), ("resnet18", 16, 16, "tensor"),
    ("mobilenet_v2", 8, 8, "tensor"), ("mobilenet_v2", 16, 32, "channel"),
    ("squeezenet1_1", 8, 32, "channel"), ("squeezenet1_1", 16, 16, "tensor"),
]


@pytest.mark.parametrize(("arch", "bits", "bias_bits", "granularity"), NETWORK_FORMATS)
def test_network_is_bit_identical_to_an_integer_rerun(arch: str, bits: int, bias_bits: int, granularity: str, device) -> None:
    settings = QuantSettings(param_bits=bits, fwd_bits=bits, bias_bits=bias_bits, weight_granularity=granularity)
    check_every_layer(QuantizedNetwork(random_network(arch), settings).to(device), f"{arch} {bits} bits", device)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_mixed_precision_network_is_bit_identical_to_an_integer_rerun(arch: str, device) -> None:
    rules = ["*features.1* weight=4 output=6", "layer1.* weight=5 output=7", "*.conv2 weight=12", "classifier.1 weight=16 output=16",
             "fc weight=16 output=16", "add* output=10", "x output=12"]
    settings = QuantSettings(param_bits=8, fwd_bits=8)
    model = random_network(arch)
    names = {op.name for op in QuantizedNetwork(model, settings).ops}
    usable = [parse_rule(r) for r in rules if any(fnmatch.fnmatchcase(n, r.split()[0]) for n in names)]
    assert len(usable) >= 4
    net = QuantizedNetwork(model, settings, rules=usable).to(device)
    check_every_layer(net, f"{arch} mixed", device)
    widths = {op.out_fmt.total_bits for op in net.ops}
    assert len(widths) >= 3  # several word lengths in one network


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_gptq_network_is_bit_identical_to_an_integer_rerun(arch: str, device) -> None:
    settings = QuantSettings(param_bits=5, fwd_bits=8, weight_rounding="gptq")
    net = QuantizedNetwork(random_network(arch), settings).to(device)
    check_every_layer(net, f"{arch} gptq", device)
    dots = [op for op in net.ops if isinstance(op, FixedDot)]
    assert all(op.chosen_weight_codes is not None for op in dots)
    for op in dots:  # every code in its word
        assert op.chosen_weight_codes.abs().max() <= 2 ** (settings.param_bits - 1)
    moved = [op.name for op in dots if not np.array_equal(op.chosen_weight_codes.numpy(), rounded_weights(op))]
    assert len(moved) == len(dots)  # GPTQ moved codes off nearest rounding in every layer


def rounded_weights(op) -> np.ndarray:
    """``op``'s float weights, each rounded in its output channel's format (int64 codes)."""
    weight = op.module.weight.detach().cpu().numpy()
    return np.stack([
        ref.quantize_array(weight[c], f.total_bits, f.frac_bits, f.rounding, f.overflow) for c, f in enumerate(op.weight_fmts)
    ])


def check_every_layer(net: QuantizedNetwork, label: str, device) -> None:
    """Every operation's output codes equal the integer reference of that layer, on every kernel it may choose."""
    torch.manual_seed(1)
    net.calibrate([torch.randn(2, 3, 48, 48, device=device)])
    x = torch.randn(2, 3, 48, 48)
    records = []
    hooks = [
        op.register_forward_hook(lambda m, i, out: records.append((m, [t.to("cpu", copy=True) for t in i], out.to("cpu", copy=True))))
        for op in net.ops
    ]
    before = [(op.overflows, op.values) for op in net.ops]
    with torch.no_grad():
        logits = net(x.to(device)).cpu()
    for h in hooks:
        h.remove()
    assert len(records) == len(net.ops)
    # Unwatched, forward runs each conv/linear that only a residual add reads together with that add
    # (FixedDotAdd): the logits and overflow counts of the operations one by one, each checked below.
    watched = [(op.overflows, op.values) for op in net.ops]
    with torch.no_grad():
        assert torch.equal(net(x.to(device)).cpu(), logits), label
    unwatched = [(op.overflows, op.values) for op in net.ops]
    assert [(o2 - o1, v2 - v1) for (o1, v1), (o2, v2) in zip(watched, unwatched)] == [
        (o1 - o0, v1 - v0) for (o0, v0), (o1, v1) in zip(before, watched)], label
    kinds = {type(op).__name__ for op, _, _ in records}
    kernels_run = set()
    for op, inputs, out in records:
        assert torch.equal(out, out.round()), op.name
        expected = reference_output(op, [t.numpy().astype(np.int64) for t in inputs], x.numpy())
        np.testing.assert_array_equal(out.numpy().astype(np.int64), expected, err_msg=f"{label}: {op.name}")
        # Every kernel the layer could have chosen, whatever this machine chose, on the same input.
        for kernel in getattr(op, "candidates", []):
            op.use(kernel)
            with torch.no_grad():
                again = op(inputs[0].to(device)).cpu()
            np.testing.assert_array_equal(again.numpy().astype(np.int64), expected, err_msg=f"{label}: {op.name}, {kernel.label}")
            kernels_run.add(kernel.name)
    last_op, _, last_codes = records[-1]
    assert torch.equal(logits, last_codes.double().reshape(logits.shape) * 2.0**-last_op.out_fmt.frac_bits)
    assert {"FixedDot", "FixedAvgPool"} <= kinds
    assert "float64" in kernels_run and (device.type != "cpu" or "onednn_int8" in kernels_run)
