"""Build the fixed-point version of a float network.

The network is traced with ``torch.fx`` so that functional operations (a
residual ``+``, ``torch.cat``, ``F.relu``, ``torch.flatten``) are seen as well as
modules. BatchNorm is folded into the preceding convolution (what deployed
hardware does). Then:

- a register (an ``ActivationQuantizer``) is inserted on the network input and
  after every arithmetic operation (conv, linear, add, average pooling,
  concatenation); operations that are exact on the grid (ReLU, max-pool,
  flatten, dropout in eval) get none;
- each register observes its largest magnitude on calibration images, and its
  fractional length for ``fwd_bits`` follows from that;
- then every weight and bias is rounded to ``param_bits`` with its own
  per-tensor fractional length (the largest that holds its max magnitude).

Operations the builder does not know raise an error rather than silently run
in float.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

from fxpsweep.calibration import frac_bits_for_max, max_abs
from fxpsweep.errors import ConfigError
from fxpsweep.fixedpoint import QFormat, check_bits, quantize

# Operations whose output leaves an adder or multiplier: a rounding point.
ARITHMETIC_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
ARITHMETIC_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, F.adaptive_avg_pool2d, F.avg_pool2d}
ARITHMETIC_METHODS = {"add", "add_", "mean"}
# Operations that map grid values to grid values: no rounding needed.
EXACT_MODULES = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
EXACT_FUNCTIONS = {F.relu, torch.relu, torch.flatten, F.max_pool2d, F.dropout, getattr}
EXACT_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "size", "contiguous"}

# Parameters that are rounded to param_bits.
WEIGHTED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class QuantSettings:
    """Word lengths and rules for a whole network.

    ``param_bits``: bits of every weight and bias word. ``fwd_bits``: bits of
    every activation word (network input included). Both count the sign bit.
    """

    param_bits: int
    fwd_bits: int
    rounding: str = "nearest_even"
    overflow: str = "saturate"

    def __post_init__(self) -> None:
        check_bits(self.param_bits, "param_bits")
        check_bits(self.fwd_bits, "fwd_bits")
        QFormat(self.fwd_bits, 0, self.rounding, self.overflow)  # validates the rule names


class ActivationQuantizer(nn.Module):
    """A register of the datapath.

    Before ``set_format`` it passes values through and records the largest
    magnitude seen (calibration); afterwards it rounds and overflows its input
    into its ``Q(W, F)`` format.
    """

    def __init__(self, name: str, kind: str) -> None:
        super().__init__()
        self.name = name
        self.kind = kind
        self.observed_max_abs = 0.0
        self.fmt: QFormat | None = None

    def set_format(self, fmt: QFormat) -> None:
        self.fmt = fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt is None:
            self.observed_max_abs = max(self.observed_max_abs, max_abs(x))
            return x
        fmt = self.fmt
        return quantize(x, fmt.total_bits, fmt.frac_bits, fmt.rounding, fmt.overflow).to(x.dtype)


@dataclass(frozen=True)
class TensorFormat:
    """The format of one quantized tensor, as reported beside a job's result."""

    layer: str
    kind: str  # input | weight | bias | activation
    total_bits: int
    frac_bits: int
    rounding: str
    overflow: str


def _classify(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """'arithmetic', 'exact' or 'other' (placeholders, outputs, constants)."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, ARITHMETIC_MODULES):
            return "arithmetic"
        if isinstance(module, EXACT_MODULES):
            return "exact"
        raise ConfigError(
            f"layer {node.target!r} is a {type(module).__name__}, which fxpsweep cannot simulate in fixed point yet; "
            f"supported modules: {', '.join(m.__name__ for m in ARITHMETIC_MODULES + EXACT_MODULES)}"
        )
    if node.op == "call_function":
        if node.target in ARITHMETIC_FUNCTIONS:
            return "arithmetic"
        if node.target in EXACT_FUNCTIONS:
            return "exact"
        raise ConfigError(f"operation {node.target} at {node.name!r} cannot be simulated in fixed point yet")
    if node.op == "call_method":
        if node.target in ARITHMETIC_METHODS:
            return "arithmetic"
        if node.target in EXACT_METHODS:
            return "exact"
        raise ConfigError(f"method .{node.target}() at {node.name!r} cannot be simulated in fixed point yet")
    return "other"


def _trace_and_fold(model: nn.Module) -> torch.fx.GraphModule:
    """A traced copy of ``model`` in eval mode with BatchNorm folded into convolutions."""
    try:
        return fuse(copy.deepcopy(model).eval())
    except Exception as err:  # fx raises many types; the user needs to know tracing failed
        raise ConfigError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(err).__name__}: {err}); "
            "fxpsweep needs a forward without data-dependent control flow"
        ) from err


def _insert_quantizers(gm: torch.fx.GraphModule) -> list[ActivationQuantizer]:
    """Put a register after the input and after every arithmetic node of ``gm``'s graph."""
    modules = dict(gm.named_modules())
    quantizers: list[ActivationQuantizer] = []
    for node in list(gm.graph.nodes):
        kind = _classify(node, modules)
        if node.op == "placeholder":
            kind, label = "input", node.name
        elif kind == "arithmetic":
            kind, label = "activation", str(node.target) if node.op == "call_module" else node.name
        else:
            continue
        quantizer = ActivationQuantizer(label, kind)
        attr = f"fxq_{len(quantizers)}"
        gm.add_submodule(attr, quantizer)
        with gm.graph.inserting_after(node):
            q_node = gm.graph.call_module(attr, (node,))
        node.replace_all_uses_with(q_node, delete_user_cb=lambda user: user is not q_node)
        quantizers.append(quantizer)
    gm.graph.lint()
    gm.recompile()
    return quantizers


def _quantize_parameters(gm: torch.fx.GraphModule, settings: QuantSettings) -> list[TensorFormat]:
    """Round every weight and bias in place to ``param_bits``, per tensor; return their formats."""
    formats = []
    for name, module in gm.named_modules():
        if not isinstance(module, WEIGHTED_MODULES):
            continue
        for kind in ("weight", "bias"):
            param = getattr(module, kind)
            if param is None:
                continue
            frac_bits = frac_bits_for_max(max_abs(param), settings.param_bits)
            with torch.no_grad():
                param.copy_(quantize(param, settings.param_bits, frac_bits, settings.rounding, settings.overflow))
            formats.append(TensorFormat(name, kind, settings.param_bits, frac_bits, settings.rounding, settings.overflow))
    return formats


class QuantizedNetwork(nn.Module):
    """A float network turned into its fixed-point simulation (see the module docstring)."""

    def __init__(self, model: nn.Module, settings: QuantSettings) -> None:
        super().__init__()
        self.settings = settings
        self.graph_module = _trace_and_fold(model)
        self.quantizers = _insert_quantizers(self.graph_module)
        self.param_formats: list[TensorFormat] = []

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Observe activation ranges on calibration batches, then fix every register's format.

        Ranges are observed on the float network (weights not yet rounded), so
        they depend only on the model and the calibration images, not on any
        word length; the weights are rounded afterwards.
        """
        if self.param_formats:
            raise RuntimeError("a QuantizedNetwork is calibrated once; build a new one for new images")
        seen = 0
        for x in batches:
            self.graph_module(x)
            seen += len(x)
        if seen == 0:
            raise ConfigError("calibration needs at least one image; set n_samples >= 1")
        s = self.settings
        for q in self.quantizers:
            q.set_format(QFormat(s.fwd_bits, frac_bits_for_max(q.observed_max_abs, s.fwd_bits), s.rounding, s.overflow))
        self.param_formats = _quantize_parameters(self.graph_module, s)

    def formats(self) -> list[TensorFormat]:
        """Format of every quantized tensor: inputs, weights, biases, activations."""
        acts = [
            TensorFormat(q.name, q.kind, q.fmt.total_bits, q.fmt.frac_bits, q.fmt.rounding, q.fmt.overflow)
            for q in self.quantizers
            if q.fmt is not None
        ]
        return acts[:1] + self.param_formats + acts[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(q.fmt is None for q in self.quantizers):
            raise RuntimeError("QuantizedNetwork.calibrate() must run before inference")
        return self.graph_module(x)
