"""The quantized network builder: which operations it makes, and what it reports."""

from __future__ import annotations

import copy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxpsweep.core.errors import ConfigError
from fxpsweep.engine.ops import FixedDot
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.core.rules import parse_rule


class FunctionalResBlock(nn.Module):
    """A CIFAR-style block whose forward uses functional ops: ``F.relu(out + shortcut)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.conv2(out) + self.shortcut(x))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(torch.flatten(out, 1))


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding matters
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_functional_ops_become_fixed_point_operations() -> None:
    model = _randomized(FunctionalResBlock())
    net = QuantizedNetwork(model, QuantSettings(param_bits=6, fwd_bits=6))
    net.calibrate([torch.randn(8, 3, 8, 8)])
    formats = net.formats()
    assert formats[0].kind == "input"
    # conv1 (BN folded), conv2, shortcut, the residual add, the pooling and fc are arithmetic.
    activations = [f.layer for f in formats if f.kind == "activation"]
    assert len(activations) == 6 and "bn1" not in activations
    assert len({f.layer for f in formats if f.kind == "weight"}) == 4 and sum(f.kind == "bias" for f in formats) == 4
    assert all(f.total_bits == (32 if f.kind == "bias" else 6) for f in formats)


def test_batchnorm_kept_is_a_quantized_multiply_add() -> None:
    model = _randomized(FunctionalResBlock())
    net = QuantizedNetwork(model, QuantSettings(param_bits=8, fwd_bits=8, batchnorm="keep"))
    net.calibrate([torch.randn(8, 3, 8, 8)])
    layers = {(f.layer, f.kind) for f in net.formats()}
    assert {("bn1", "weight"), ("bn1", "bias"), ("bn1", "activation")} <= layers


def test_overflows_are_counted_per_tensor() -> None:
    model = _randomized(FunctionalResBlock())
    net = QuantizedNetwork(model, QuantSettings(param_bits=8, fwd_bits=8))
    net.calibrate([torch.randn(8, 3, 8, 8) * 0.1])  # calibrated on small inputs...
    with torch.no_grad():
        net(torch.randn(4, 3, 8, 8) * 10)  # ...evaluated on large ones: the input register saturates
    input_fmt = net.formats()[0]
    assert input_fmt.values == 4 * 3 * 8 * 8 and input_fmt.overflows > 0


@pytest.mark.parametrize("arithmetic", ["exact", "fast"])
def test_sixteen_bits_track_the_float_network(arithmetic: str) -> None:
    model = _randomized(FunctionalResBlock())
    net = QuantizedNetwork(model, QuantSettings(param_bits=16, fwd_bits=16, arithmetic=arithmetic))
    calib = torch.randn(16, 3, 8, 8)
    net.calibrate([calib])
    with torch.no_grad():
        ref, got = model(calib[:4]), net(calib[:4])
    assert torch.allclose(got.float(), ref, atol=2e-2 * ref.abs().max())


def test_unsupported_operation_is_refused() -> None:
    with pytest.raises(ConfigError, match="Sigmoid"):
        QuantizedNetwork(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sigmoid()), QuantSettings(8, 8))


def test_widths_whose_exact_sums_could_pass_2_53_are_refused_before_calibration() -> None:
    # K = 2*3*3 = 18 products: A + W - 2 + log2(18) < 53 allows A + W <= 50; a one-product-at-a-time
    # accumulator only needs each product below 2**53 (A + W <= 54).
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    net = QuantizedNetwork(model, QuantSettings(param_bits=25, fwd_bits=25))
    net.calibrate([torch.randn(4, 2, 4, 4)])  # the layers' own check of their codes agrees
    with pytest.raises(ConfigError, match=r"param_bits=26, fwd_bits=25: layer '0' sums 18 products .* <= 50"):
        QuantizedNetwork(model, QuantSettings(param_bits=26, fwd_bits=25))
    with pytest.raises(ConfigError, match=r"layer '3' sums 12 products .* <= 51"):  # its input: the 25-bit output of '0'
        QuantizedNetwork(model, QuantSettings(param_bits=25, fwd_bits=25), rules=[parse_rule("3 weight=27")])
    QuantizedNetwork(model, QuantSettings(param_bits=26, fwd_bits=26, acc_bits=32, acc_overflow="saturate"))
    QuantizedNetwork(model, QuantSettings(param_bits=32, fwd_bits=32, arithmetic="fast"))


def test_inference_before_calibration_is_refused() -> None:
    net = QuantizedNetwork(nn.Sequential(nn.Conv2d(1, 2, 1)), QuantSettings(8, 8))
    with pytest.raises(RuntimeError, match="calibrate"):
        net(torch.zeros(1, 1, 2, 2))


def _logit_mean_error(model: nn.Module, bias_correction: bool, images: torch.Tensor) -> tuple[QuantizedNetwork, float]:
    # 4-bit weights shift the output means; 16-bit activations add little error of their own.
    net = QuantizedNetwork(model, QuantSettings(param_bits=4, fwd_bits=16, bias_correction=bias_correction))
    net.calibrate([images])
    with torch.no_grad():
        error = (net(images).float() - model(images)).mean(0)  # per class, over the calibration images
    return net, float(error.abs().sum())


def test_bias_correction_removes_the_mean_error_and_changes_only_biases() -> None:
    model = _randomized(FunctionalResBlock())
    untouched = copy.deepcopy(model.state_dict())
    images = torch.randn(64, 3, 8, 8)
    plain, plain_error = _logit_mean_error(model, False, images)
    corrected, corrected_error = _logit_mean_error(model, True, images)
    assert corrected_error < 0.01 * plain_error
    dots = [(a, b) for a, b in zip(plain.ops, corrected.ops) if isinstance(a, FixedDot)]
    for a, b in dots:
        assert a.weight_fmts == b.weight_fmts and torch.equal(a.layer.weight, b.layer.weight)
    changed = [a.name for a, b in dots if not torch.equal(a.layer.bias_out, b.layer.bias_out)]
    assert changed  # at least one bias moved
    assert corrected.formats()[0].values == images.numel()  # counts start after calibration: one run of the images
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())  # the user's model is not changed
