"""The quantized network builder: registers where the datapath has them, values on their grids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxpsweep.errors import ConfigError
from fxpsweep.quantized import QuantizedNetwork, QuantSettings


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


def _register_outputs(net: QuantizedNetwork, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = {}
    hooks = [q.register_forward_hook(lambda m, i, o: seen.__setitem__(m.name, (m.fmt, o))) for q in net.quantizers]
    net(x)
    for h in hooks:
        h.remove()
    return seen


def test_functional_ops_get_registers_and_values_sit_on_their_grid() -> None:
    model = _randomized(FunctionalResBlock())
    net = QuantizedNetwork(model, QuantSettings(param_bits=6, fwd_bits=6))
    net.calibrate([torch.randn(8, 3, 8, 8)])
    kinds = {f.layer: f.kind for f in net.formats()}
    assert kinds["x"] == "input"
    # conv1 (BN folded), conv2, shortcut, the residual add, the pooling and fc are arithmetic.
    assert sum(k == "activation" for k in kinds.values()) == 6
    assert "bn1" not in kinds  # folded into conv1
    outputs = _register_outputs(net, torch.randn(4, 3, 8, 8))
    for name, (fmt, out) in outputs.items():
        codes = out.double() * 2.0**fmt.frac_bits
        assert torch.equal(codes, codes.round()), name
        assert codes.min() >= -(2 ** (fmt.total_bits - 1)) and codes.max() <= 2 ** (fmt.total_bits - 1) - 1, name
    for f in net.formats():
        if f.kind in ("weight", "bias"):
            param = getattr(net.graph_module.get_submodule(f.layer), f.kind).double() * 2.0**f.frac_bits
            assert torch.equal(param, param.round()) and param.abs().max() <= 2 ** (f.total_bits - 1)


def test_sixteen_bits_track_the_float_network() -> None:
    model = _randomized(FunctionalResBlock())
    net = QuantizedNetwork(model, QuantSettings(param_bits=16, fwd_bits=16))
    calib = torch.randn(16, 3, 8, 8)
    net.calibrate([calib])
    with torch.no_grad():
        ref, got = model(calib[:4]), net(calib[:4])
    assert torch.allclose(got, ref, atol=2e-2 * ref.abs().max())


def test_unsupported_operation_is_refused() -> None:
    with pytest.raises(ConfigError, match="Sigmoid"):
        QuantizedNetwork(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sigmoid()), QuantSettings(8, 8))


def test_inference_before_calibration_is_refused() -> None:
    net = QuantizedNetwork(nn.Sequential(nn.Conv2d(1, 2, 1)), QuantSettings(8, 8))
    with pytest.raises(RuntimeError, match="calibrate"):
        net(torch.zeros(1, 1, 2, 2))
