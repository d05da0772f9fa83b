"""Whole networks at 8 and 16 bits: every operation's codes equal an integer re-run of that layer.

Random weights (with non-trivial BatchNorm statistics, folded) and small
random inputs; each operation's input codes are recorded and the layer is
recomputed by ``integer_reference`` from them, its formats and the float weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import integer_reference as ref
from fxpsweep.engine.ops import FixedAdd, FixedAvgPool, FixedCat, FixedClamp, FixedDot, FixedInput
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.settings import QuantSettings


def random_network(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def reference_output(op, inputs: list[np.ndarray], float_input: np.ndarray) -> np.ndarray:
    """The layer recomputed in integers from its input codes."""
    o = op.out_fmt
    if isinstance(op, FixedInput):
        return ref.quantize_array(float_input, o.total_bits, o.frac_bits, o.rounding, o.overflow)
    if isinstance(op, FixedDot):
        a_fmt = op.in_fmts[0]
        bf = op.bias_fmt
        weight = op.module.weight.detach().cpu().numpy()
        w = np.stack([
            ref.quantize_array(weight[c], f.total_bits, f.frac_bits, f.rounding, f.overflow) for c, f in enumerate(op.weight_fmts)
        ])
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
        f = op.in_fmts[0]
        high = min(f.max_code, int(np.floor(6.0 * 2.0**f.frac_bits)))
        return np.clip(inputs[0], 0, high)
    raise AssertionError(type(op))


@pytest.mark.parametrize(
    ("bits", "bias_bits", "granularity"), [(8, 32, "channel"), (16, 32, "channel"), (8, 8, "tensor"), (16, 16, "tensor")]
)
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "squeezenet1_1"])
def test_network_is_bit_identical_to_an_integer_rerun(arch: str, bits: int, bias_bits: int, granularity: str, device) -> None:
    settings = QuantSettings(param_bits=bits, fwd_bits=bits, bias_bits=bias_bits, weight_granularity=granularity)
    net = QuantizedNetwork(random_network(arch), settings).to(device)
    torch.manual_seed(1)
    net.calibrate([torch.randn(2, 3, 48, 48, device=device)])
    x = torch.randn(2, 3, 48, 48)
    records = []
    hooks = [
        op.register_forward_hook(lambda m, i, out: records.append((m, [t.cpu().numpy().astype(np.int64) for t in i], out.to("cpu", copy=True))))
        for op in net.ops
    ]
    with torch.no_grad():
        logits = net(x.to(device)).cpu()
    for h in hooks:
        h.remove()
    assert len(records) == len(net.ops)
    kinds = {type(op).__name__ for op, _, _ in records}
    for op, inputs, out in records:
        assert torch.equal(out, out.round()), op.name
        expected = reference_output(op, inputs, x.numpy())
        np.testing.assert_array_equal(out.numpy().astype(np.int64), expected, err_msg=f"{arch} {bits} bits: {op.name}")
    last_op, _, last_codes = records[-1]
    assert torch.equal(logits, last_codes.double().reshape(logits.shape) * 2.0**-last_op.out_fmt.frac_bits)
    assert {"FixedDot", "FixedAvgPool"} <= kinds
