"""A conv/linear layer whose register only a residual add reads runs with that add as one pass
(``FixedDotAdd``) where the rounding loop applies, and as the two operations everywhere else; a hook on
any operation runs the network one operation at a time. The codes are checked against the integer
reference in ``test_engine_networks`` (fused and one by one) and ``test_rounding_loop``."""

from __future__ import annotations

import pytest
import torch

from made_on_the_fly import random_network
from fxpsweep.backends import rounding_loop
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.ops import FixedAdd, FixedDot, FixedDotAdd
from fxpsweep.engine.settings import QuantSettings


def network(settings: QuantSettings) -> QuantizedNetwork:
    torch.manual_seed(1)
    net = QuantizedNetwork(random_network("resnet18"), settings)
    net.calibrate([torch.randn(2, 3, 48, 48)])
    return net


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """One entry per call of the one-pass loop."""
    calls: list[int] = []
    real = rounding_loop.round_then_add
    monkeypatch.setattr(rounding_loop, "round_then_add", lambda *args: calls.append(1) or real(*args))
    return calls


@pytest.mark.parametrize("bits, arithmetic", [(8, "exact"), (16, "fast")])
def test_each_layer_that_only_a_residual_add_reads_runs_with_it_in_one_pass(bits: int, arithmetic: str, fused_calls) -> None:
    net = network(QuantSettings(param_bits=bits, fwd_bits=bits, arithmetic=arithmetic))
    pairs = [m for m in net.fused_module.modules() if isinstance(m, FixedDotAdd)]
    # resnet18: 8 blocks, each adding its second conv to the shortcut (in 3, a 1x1 conv: one operand is fused)
    assert len(pairs) == 8 and {type(p.dot) for p in pairs} == {FixedDot} and {type(p.add) for p in pairs} == {FixedAdd}
    assert len({p.add for p in pairs}) == 8
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        one_by_one = net.graph_module(x)
        assert not fused_calls
        fused = net(x)
    # One pass wherever the layer's kernel computes one float32 tensor for the whole batch (at 8 bits exact,
    # some layers may need several calls, or float64); at 16 bits fast, every layer is one float32 call.
    single = [p for p in pairs if all(k.one_tensor and s >= len(x) for k, s in p.dot.plans.values())]
    assert len(fused_calls) == len(single) >= (8 if arithmetic == "fast" else 1)
    assert torch.equal(fused, one_by_one)


def test_where_the_loop_does_not_apply_the_two_operations_run_one_after_the_other(fused_calls) -> None:
    # 16-bit exact: every layer on several int8 or float32 calls, or float64 (no one float32 tensor to round)
    net = network(QuantSettings(param_bits=16, fwd_bits=16, kernel="float64"))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        one_by_one = net.graph_module(x)
        fused = net(x)
    assert not fused_calls and torch.equal(fused, one_by_one)
    assert all(op.kernel == "float64" for op in net.ops if isinstance(op, FixedDot))


def test_a_hook_on_any_operation_runs_the_network_one_operation_at_a_time(fused_calls) -> None:
    net = network(QuantSettings(param_bits=16, fwd_bits=16, arithmetic="fast"))  # every add fused when unwatched
    dot = next(p.dot for p in net.fused_module.modules() if isinstance(p, FixedDotAdd))
    seen = []
    hook = dot.register_forward_hook(lambda m, i, out: seen.append(out))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        watched = net(x)
    hook.remove()
    assert len(seen) == 1 and not fused_calls  # the register was stored, and its hook saw it
    with torch.no_grad():
        assert torch.equal(net(x), watched) and len(fused_calls) == 8
