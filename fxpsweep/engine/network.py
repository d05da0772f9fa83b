"""Build the fixed-point version of a float network.

The network is traced with ``torch.fx`` so that functional operations (a
residual ``+``, ``torch.cat``, ``F.relu``, ``torch.flatten``) are seen as well as
modules. BatchNorm is folded into the preceding convolution (``fold``, what
deployed hardware does) or kept as a per-channel multiply-add (``keep``, a
depthwise 1x1 convolution with quantized constants). Then every arithmetic
operation becomes a ``FixedOp`` (see ``ops``), an input register goes on the
network input and a ``Dequantize`` on its output. Operations that are exact on
the grid (ReLU, max-pooling, flatten, dropout in eval) stay as they are and
run on integer codes.

``observe`` runs the float network on calibration images and gathers
statistics at every register (and, for a register read only by a ReLU, of
what the ReLU passes: with saturation, a negative value that overflows still
becomes exactly 0, so only the positive range needs holding); ``calibrate``
turns them into formats:
activations get ``fwd_bits`` and weights ``param_bits``, each with the F its
calibration method picks (see ``calibration``); then, optionally, weight codes
are chosen by GPTQ, and, by default, every bias is corrected for the mean
error of its layer's output (``_LayerByLayer``). Operations the builder does
not know raise an error rather than silently run in float.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.fx.experimental.optimization import fuse

from fxpsweep.engine.calibration import (
    TensorStats,
    choose_frac_bits,
    frac_bits_for_max,
    frac_bits_per_row,
    max_abs,
)
from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.engine.gptq import gptq_codes, input_hessian
from fxpsweep.backends.kernel_choice import KernelChooser
from fxpsweep.engine.ops import (
    Dequantize,
    FixedAdd,
    FixedAvgPool,
    FixedCat,
    FixedClamp,
    FixedDot,
    FixedDotAdd,
    FixedInput,
    FixedOp,
)
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.engine.statistics import RELU_SUFFIX, StatsObserver, tensor_fingerprint
from fxpsweep.core.errors import ConfigError
from fxpsweep.core.rules import Rule, resolve
from fxpsweep.core.storage import SOURCES, cached

log = logging.getLogger(__name__)

# Operations that map grid values to grid values: they run on codes unchanged.
EXACT_MODULES = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
EXACT_FUNCTIONS = {F.relu, torch.relu, torch.flatten, F.max_pool2d, F.dropout, operator.getitem}
EXACT_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "contiguous"}
# Operations whose result is not a tensor of values (shapes): no format.
SHAPE_FUNCTIONS = {getattr}
SHAPE_METHODS = {"size", "dim"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class TensorFormat:
    """The format of one quantized tensor, as reported beside a job's result.

    ``overflows`` / ``values``: how many values saturated or wrapped, out of
    how many, since calibration (on the evaluation images in a job).
    """

    layer: str
    kind: str  # input | weight | bias | activation | accumulator | product
    total_bits: int
    frac_bits: int
    rounding: str
    overflow: str
    overflows: int | None = None
    values: int | None = None
    kernel: str | None = None  # a conv/linear output: the kernel that computed it


def batchnorm_as_conv(bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The eval-mode BatchNorm as the per-channel multiply-add it is: a depthwise 1x1 conv."""
    conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=True)
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
    with torch.no_grad():
        conv.weight.copy_(scale.reshape(-1, 1, 1, 1))
        conv.bias.copy_(shift)
    return conv


def _trace(model: nn.Module, batchnorm: str) -> torch.fx.GraphModule:
    """A traced eval-mode copy of ``model``, BatchNorm folded (``fold``) where a conv precedes it."""
    model = copy.deepcopy(model).eval()
    try:
        return fuse(model) if batchnorm == "fold" else torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types; the user needs to know tracing failed
        raise ConfigError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(err).__name__}: {err}); "
            "fxpsweep needs a forward without data-dependent control flow"
        ) from err


def _fixed_op_for(node: torch.fx.Node, modules: dict[str, nn.Module]) -> FixedOp | None:
    """The FixedOp replacing ``node``, None for an exact or shape operation; ConfigError if unknown."""
    name = str(node.target) if node.op == "call_module" else node.name
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return FixedDot(name, m)
        if isinstance(m, nn.BatchNorm2d):
            return FixedDot(name, batchnorm_as_conv(m))
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return FixedAvgPool(name, output_size=m.output_size)
        if isinstance(m, nn.AvgPool2d):
            return FixedAvgPool(
                name, kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
            )
        if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            return FixedClamp(name, m.min_val, m.max_val, m)
        if isinstance(m, EXACT_MODULES):
            return None
        raise ConfigError(
            f"layer {node.target!r} is a {type(m).__name__}, which fxpsweep cannot simulate in fixed point yet; "
            "supported: Conv2d, Linear, BatchNorm2d, AvgPool2d, AdaptiveAvgPool2d, ReLU, ReLU6, Hardtanh, "
            "MaxPool2d, Flatten, Dropout, Identity, and the functions +, torch.cat, F.relu, torch.flatten"
        )
    if node.op == "call_function":
        kwargs = node.kwargs
        if node.target in ADD_FUNCTIONS and len(node.args) == 2 and not kwargs:
            if all(isinstance(a, torch.fx.Node) for a in node.args):
                return FixedAdd(name)
        elif node.target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else kwargs.get("dim", 0)
            return FixedCat(name, dim)
        elif node.target is F.adaptive_avg_pool2d:
            return FixedAvgPool(name, output_size=node.args[1] if len(node.args) > 1 else kwargs["output_size"])
        elif node.target in (F.relu6,):
            return FixedClamp(name, 0.0, 6.0, F.relu6)
        elif node.target is F.pad:
            mode = node.args[2] if len(node.args) > 2 else kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else kwargs.get("value", None)
            if mode == "constant" and not value:
                return None  # zero padding: code 0 in any format
        elif node.target in EXACT_FUNCTIONS or node.target in SHAPE_FUNCTIONS:
            return None
        raise ConfigError(f"operation {getattr(node.target, '__name__', node.target)} at {node.name!r} cannot be simulated in fixed point yet")
    if node.op == "call_method":
        if node.target in ("add", "add_") and len(node.args) == 2 and isinstance(node.args[1], torch.fx.Node):
            return FixedAdd(name)
        if node.target in EXACT_METHODS or node.target in SHAPE_METHODS:
            return None
        raise ConfigError(f"method .{node.target}() at {node.name!r} cannot be simulated in fixed point yet")
    return None


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    return (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
        node.op == "call_method" and node.target in ("relu", "relu_")
    )


def _intersect(a: tuple[float, float] | None, b: tuple[float, float]) -> tuple[float, float]:
    """Two clamps applied one after the other, as one."""
    return b if a is None else (max(a[0], b[0]), min(a[1], b[1]))


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes whose values ``node`` consumes, in order (a torch.cat's list flattened)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(node.args, found.append)
    return found


class QuantizedNetwork(nn.Module):
    """A float network turned into its fixed-point simulation (see the module docstring)."""

    def __init__(
        self, model: nn.Module, settings: QuantSettings, cache_dir: str | Path | None = None, rules: list[Rule] | None = None
    ) -> None:
        """``cache_dir``: where kernel choices and weight formats are remembered (None: in memory only).
        ``rules``: per-layer word lengths (``fxpsweep.core.rules``) over the global ones of ``settings``."""
        super().__init__()
        self.settings = settings
        gm = _trace(model, settings.batchnorm)
        modules = dict(gm.named_modules())
        self.ops: list[FixedOp] = []
        self.op_nodes: dict[str, str] = {}  # graph node name -> attribute of its FixedOp
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op == "placeholder":
                op = FixedInput(node.name)
                attr = self._add(gm, op)
                with graph.inserting_after(node):
                    q_node = graph.call_module(attr, (node,))
                node.replace_all_uses_with(q_node, delete_user_cb=lambda user, q=q_node: user is not q)
            elif node.op == "output":
                self.dequantize = Dequantize()
                gm.add_submodule("fxp_dequantize", self.dequantize)
                (result,) = node.args
                with graph.inserting_before(node):
                    out_node = graph.call_module("fxp_dequantize", (result,))
                node.args = (out_node,)
            else:
                op = _fixed_op_for(node, modules)
                if op is None:
                    continue
                attr = self._add(gm, op)
                with graph.inserting_before(node):
                    new = graph.call_module(attr, tuple(_tensor_inputs(node)))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                self.op_nodes[new.name] = attr
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        self.graph_module = gm
        modules = dict(gm.named_modules())
        for node in list(graph.nodes):
            if node.op == "call_module" and isinstance(modules[node.target], FixedOp):
                readers = list(node.users)
                if readers and all(_is_relu(u, modules) for u in readers):
                    # The ReLU is applied as the register is written (same codes, one pass less).
                    op = modules[node.target]
                    op.only_relu_reads = True
                    op.read_clamp = _intersect(op.read_clamp, (0.0, math.inf))
                    for relu in readers:
                        relu.replace_all_uses_with(node)
                        graph.erase_node(relu)
        for node in list(graph.nodes):
            clamp = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(clamp, FixedClamp):
                (source,) = _tensor_inputs(node)
                producer = modules.get(source.target) if source.op == "call_module" else None
                if isinstance(producer, FixedOp) and len(source.users) == 1:
                    # A ReLU6 or Hardtanh that is a register's only reader: applied as it is written.
                    producer.read_clamp = _intersect(producer.read_clamp, clamp.read_clamp)
                    node.replace_all_uses_with(source)
                    graph.erase_node(node)
                    self.ops.remove(clamp)
        graph.lint()
        gm.recompile()
        # Not a submodule (its operations are graph_module's, registered there once): what forward runs.
        object.__setattr__(self, "fused_module", _with_dot_adds(gm))
        self.cache_dir = cache_dir
        # Clamps keep their input's format: no register of their own for a rule to set.
        self.layer_bits = resolve(rules or [], {op.name: isinstance(op, FixedDot) for op in self.ops if not isinstance(op, FixedClamp)})
        self.weight_format_sources: set[str] = set()
        self._check_exact_range()
        chooser = KernelChooser(cache_dir)
        for op in self.ops:
            if isinstance(op, FixedDot):
                op.chooser = chooser
        self.calibrated = False

    def _add(self, gm: torch.fx.GraphModule, op: FixedOp) -> str:
        attr = f"fxp_{len(self.ops)}"
        gm.add_submodule(attr, op)
        self.ops.append(op)
        return attr

    def _check_exact_range(self) -> None:
        """Refuse, before any image is read, word lengths whose exact conv/linear sums could pass ``2**53``.

        For any weights and inputs of its formats, a layer of ``K`` products of an
        ``A``-bit input code and a ``W``-bit weight code sums up to ``K * 2**(A-1) *
        2**(W-1)``; with ``product_bits`` or a saturating ``acc_bits`` (one product at
        a time) only a product must stay below ``2**53``. ``arithmetic=fast`` is not
        exact anyway and is not checked. After calibration each layer checks its own
        codes again (``FixedDot.finalize``).
        """
        if self.settings.arithmetic != "exact":
            return
        modules = dict(self.graph_module.named_modules())

        def input_bits(node: torch.fx.Node) -> int:
            while True:  # up to the register that holds the input codes (clamps keep their input's)
                node = _tensor_inputs(node)[0]
                op = modules.get(node.target) if node.op == "call_module" else None
                if isinstance(op, FixedOp) and not isinstance(op, FixedClamp):
                    return self.settings_for(op).fwd_bits

        for node in self.graph_module.graph.nodes:
            op = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(op, FixedDot):
                continue
            s = self.settings_for(op)
            a_bits, w_bits = input_bits(node), s.param_bits
            one_at_a_time = s.product_bits is not None or (s.acc_bits is not None and s.acc_overflow == "saturate")
            terms = 1 if one_at_a_time else op.module.weight[0].numel()
            log2_bound = a_bits - 1 + w_bits - 1 + math.log2(terms)
            if log2_bound >= 53:
                widest = math.ceil(55 - math.log2(terms)) - 1  # the largest A + W with a bound below 2**53
                raise ConfigError(
                    f"param_bits={w_bits}, fwd_bits={a_bits}: layer {op.name!r} sums {terms} products of {a_bits}-bit "
                    f"inputs and {w_bits}-bit weights, up to 2**{log2_bound:.1f}, beyond the 2**53 that fxpsweep "
                    f"simulates exactly; allowed there: param_bits + fwd_bits <= {widest} (or arithmetic=fast, or "
                    "acc_bits with acc_overflow=saturate)"
                )

    @torch.no_grad()
    def observe(self, batches: Iterable[torch.Tensor], seed: int = 0) -> dict[str, TensorStats]:
        """Statistics of every register on calibration batches, from the float network.

        The float network here has BatchNorm folded and weights not yet
        rounded, so the statistics depend only on the model and the images,
        not on any word length. It runs in float64 (see ``_in_float64``).
        """
        if self.calibrated:
            raise RuntimeError("statistics come from the float network: observe before calibrate")
        observer = StatsObserver(seed=seed)
        for op in self.ops:
            op.observer = observer
        seen = 0
        try:
            with self._in_float64():
                for x in batches:
                    self.graph_module(x.double())
                    seen += len(x)
        finally:
            for op in self.ops:
                op.observer = None
        if seen == 0:
            raise ConfigError("calibration needs at least one image; set n_samples >= 1")
        return observer.result()

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor], stats: dict[str, TensorStats] | None = None) -> None:
        """Fix every format from ``stats`` (see ``observe``; gathered from ``batches`` when None).

        With ``settings.weight_rounding == "gptq"`` or ``settings.bias_correction``
        the calibration batches, joined into one, then run once through the
        fixed-point network, and every conv/linear gets its GPTQ weight codes
        and its corrected bias on the way (see ``_LayerByLayer``).
        """
        if self.calibrated:
            raise RuntimeError("a QuantizedNetwork is calibrated once; build a new one for new images")
        batches = list(batches)
        if stats is None:
            stats = self.observe(batches, self.settings.seed)
        s = self.settings
        images = torch.cat(batches) if (s.bias_correction or s.weight_rounding == "gptq") and batches else None
        float_means = self._dot_output_means(images) if images is not None and s.bias_correction else None
        self._finalize(stats)
        refused = [op.name for op in self.ops if isinstance(op, FixedDot) and op.kernel_refused]
        if refused:
            log.warning("kernel=%s cannot compute %d of the conv/linear layers exactly at these widths (%s); they run on "
                        "the fastest kernel that can", s.kernel, len(refused), ", ".join(refused[:5]) + (", ..." if len(refused) > 5 else ""))
        if images is not None:
            _LayerByLayer(self, s.weight_rounding == "gptq", float_means).run(images)
            for op in self.ops:
                op.reset_counts()  # overflow counts are "since calibration"
        self.calibrated = True

    def _dot_output_means(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-channel mean of every conv/linear output of the float network on ``images`` (see ``output_means``)."""
        means: dict[str, torch.Tensor] = {}
        hooks = [
            op.register_forward_hook(lambda op, _inputs, out: means.__setitem__(op.name, output_means(op, out)))
            for op in self.ops
            if isinstance(op, FixedDot)
        ]
        try:
            with self._in_float64():
                self.graph_module(images.double())
        finally:
            for hook in hooks:
                hook.remove()
        return means

    @contextlib.contextmanager
    def _in_float64(self) -> Iterator[None]:
        """Run the float network in float64 (before ``_finalize``; converting back is lossless).

        Float32 convolutions round differently on different processors (the
        kernels sum in different orders); the statistics, the formats chosen
        from them and the bias corrections would then differ from machine to
        machine. In float64 those differences are a billion times smaller.
        """
        self.graph_module.double()
        try:
            yield
        finally:
            self.graph_module.float()

    def settings_for(self, op: FixedOp) -> QuantSettings:
        """The settings of one operation: the global ones with the word lengths its rules set."""
        bits, s = self.layer_bits.get(op.name, {}), self.settings
        if not bits:
            return s
        return dataclasses.replace(
            s, param_bits=bits.get("weight", s.param_bits), bias_bits=bits.get("bias", s.bias_bits),
            fwd_bits=bits.get("output", s.fwd_bits), acc_bits=bits.get("acc", s.acc_bits),
        )

    def _weight_formats(self, op: FixedDot) -> list[QFormat]:
        """Weight formats, one per output channel (all equal per tensor), F chosen by the weight method.

        The search (a few quantizations of every channel, minutes for VGG's
        classifier) depends on the weights, word length and method only: kept
        by ``storage.cached`` for every job of a sweep and later ones.
        """
        s = self.settings_for(op)
        weight = op.module.weight.detach()

        def search() -> list[int]:
            rows = weight.reshape(len(weight), -1) if s.weight_granularity == "channel" else weight.reshape(1, -1)
            frac_bits = frac_bits_per_row(rows, s.weight_calibration, s.param_bits, s.rounding, s.overflow, s.overflow_rate)
            return frac_bits if s.weight_granularity == "channel" else frac_bits * len(weight)

        identity = {
            "weights": tensor_fingerprint(weight), "bits": s.param_bits, "method": s.weight_calibration,
            "granularity": s.weight_granularity, "rounding": s.rounding, "overflow": s.overflow, "rate": s.overflow_rate,
        }
        frac_bits, source = cached("weight_formats", identity, self.cache_dir, search)
        self.weight_format_sources.add(source)
        return [s.parameter_format(f) for f in frac_bits]

    @property
    def weight_formats_source(self) -> str:
        """Where the weight formats came from: ``computed`` if any layer's was, else ``cache``, else ``memory``."""
        return max(self.weight_format_sources, key=SOURCES.index, default="computed")

    def _bias_format(self, op: FixedDot, acc_frac: int) -> QFormat | None:
        """The bias format: the max rule (a handful of values, each added once: none should
        overflow), but never a finer LSB than the accumulator's (``acc_frac``, input F + weight F):
        like an int32 bias at the accumulator's scale in deployed integer kernels."""
        bias, s = op.module.bias, self.settings_for(op)
        if bias is None:
            return None
        return s.bias_format(min(frac_bits_for_max(max_abs(bias), s.bias_bits), acc_frac))

    def _finalize(self, stats: dict[str, TensorStats]) -> None:
        modules = dict(self.graph_module.named_modules())
        formats: dict[str, QFormat] = {}  # node name -> format of the codes it holds

        def producer(node: torch.fx.Node) -> torch.fx.Node:
            while node.name not in formats:  # exact operations pass their input's format through
                node = _tensor_inputs(node)[0]
            return node

        def fmt_of(node: torch.fx.Node) -> QFormat:
            return formats[producer(node).name]

        for node in self.graph_module.graph.nodes:
            if node.op != "call_module":
                continue
            op = modules[node.target]
            if isinstance(op, Dequantize):
                op.fmt = fmt_of(node.args[0])
                continue
            if not isinstance(op, FixedOp):
                continue
            s = self.settings_for(op)
            inputs = [] if isinstance(op, FixedInput) else _tensor_inputs(node)
            in_fmts = [fmt_of(n) for n in inputs]
            op.inputs_from = [modules[producer(n).target].name for n in inputs]
            if isinstance(op, FixedClamp):
                out_fmt = in_fmts[0]
            else:
                if op.name not in stats:
                    raise RuntimeError(f"no calibration statistics for {op.name!r}; were they gathered on another model?")
                # Read only by a ReLU and saturating: a negative value that saturates still becomes
                # exactly 0 after the ReLU, so the range needs to hold only what the ReLU passes.
                key = op.name + RELU_SUFFIX if op.only_relu_reads and s.overflow == "saturate" else op.name
                frac_bits = choose_frac_bits(s.act_calibration, stats[key], s.fwd_bits, s.rounding, s.overflow, s.overflow_rate)
                out_fmt = s.activation_format(frac_bits)
            if isinstance(op, FixedDot):
                # What lies between the producer and this layer (ReLU, max-pool, flatten, zero padding) keeps codes >= 0.
                op.input_low_code = modules[producer(inputs[0]).target].clamp_codes()[0]
                weight_fmts = self._weight_formats(op)
                acc_frac = in_fmts[0].frac_bits + min(f.frac_bits for f in weight_fmts)
                op.set_parameter_formats(weight_fmts, self._bias_format(op, acc_frac))
            op.finalize(out_fmt, in_fmts, s, self.ops.index(op))
            formats[node.name] = out_fmt

    def formats(self) -> list[TensorFormat]:
        """Format of every quantized tensor, with overflow counts since calibration."""
        rows = []
        for op in self.ops:
            if op.out_fmt is None:
                continue
            f = op.out_fmt
            kernel = op.kernel or None if isinstance(op, FixedDot) else None
            rows.append(TensorFormat(op.name, op.kind, f.total_bits, f.frac_bits, f.rounding, f.overflow, op.overflows, op.values, kernel))
            for kind, fmt, overflows, values in op.extra_formats():
                if fmt is not None:
                    rows.append(TensorFormat(op.name, kind, fmt.total_bits, fmt.frac_bits, fmt.rounding, fmt.overflow, overflows, values))
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (real values ``k * 2**-F``) of the fixed-point network for a float input batch."""
        if not self.calibrated:
            raise RuntimeError("QuantizedNetwork.calibrate() must run before inference")
        # fused_module stores fewer registers; a hook (the layer report, a user's probe) may read any of them.
        watched = _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks or any(
            op._forward_hooks or op._forward_pre_hooks for op in self.ops
        )
        return (self.graph_module if watched else self.fused_module)(x)


def _with_dot_adds(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its operations) in which each conv/linear whose register only a residual add
    reads runs with that add as one ``FixedDotAdd``: one pass over memory fewer per residual block."""
    fused = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph = fused.graph
    modules = dict(gm.named_modules())

    def op_of(node: torch.fx.Node) -> nn.Module | None:
        return modules.get(node.target) if node.op == "call_module" else None

    for node in list(graph.nodes):
        add = op_of(node)
        if not isinstance(add, FixedAdd) or node.args[0] is node.args[1]:
            continue
        for i, source in enumerate(node.args[:2]):
            dot = op_of(source)
            if isinstance(dot, FixedDot) and len(source.users) == 1:
                name = f"{node.target}_with_{source.target}"
                fused.add_submodule(name, FixedDotAdd(dot, add, dot_first=i == 0))
                with graph.inserting_before(node):
                    both = graph.call_module(name, (source.args[0], node.args[1 - i]))
                node.replace_all_uses_with(both)
                graph.erase_node(node)
                graph.erase_node(source)
                break
    graph.lint()
    fused.recompile()
    return fused


def output_means(op: FixedOp, out: torch.Tensor) -> torch.Tensor:
    """Mean real value per channel (dim 1) of ``op``'s output: float values, or codes once finalized.

    Of what the ReLU passes where only a ReLU reads the output: the error that
    matters downstream is the error after the ReLU.
    """
    values = out.double() * 2.0**-op.out_fmt.frac_bits if op.out_fmt is not None else out.double()
    if op.only_relu_reads:
        values = values.clamp(min=0)
    return values.transpose(0, 1).reshape(values.shape[1], -1).mean(1)


class _LayerByLayer(torch.fx.Interpreter):
    """One run of the fixed-point network on the calibration images that fixes, in graph order,
    each conv/linear's GPTQ weight codes and its bias correction.

    GPTQ (``gptq``) sees each layer's real input: the codes the layers before
    it, already finished, produce. Bias correction (Nagel et al. 2019,
    "Data-Free Quantization", section 4.2): rounding weights shifts the mean
    of a layer's output (the rounding errors of a channel's weights need not
    cancel), and later layers add shifts of their own; each layer, when
    reached, subtracts from its float bias the mean error of its output per
    channel against the float network's (``float_means``; None: no
    correction), is rounded again and rerun, so every later layer sees and
    corrects from already corrected inputs. Layers without a bias keep it.
    """

    def __init__(self, network: QuantizedNetwork, gptq: bool, float_means: dict[str, torch.Tensor] | None) -> None:
        super().__init__(network.graph_module)
        self.network = network
        self.gptq = gptq
        self.float_means = float_means

    def _refinalize(self, op: FixedDot) -> None:
        """Rebuild ``op``'s kernel for new weight codes or bias (the bias format, max rule, may change too)."""
        acc_frac = op.in_fmts[0].frac_bits + min(f.frac_bits for f in op.weight_fmts)
        op.set_parameter_formats(op.weight_fmts, self.network._bias_format(op, acc_frac))
        op.finalize(op.out_fmt, op.in_fmts, self.network.settings_for(op), self.network.ops.index(op))

    def call_module(self, target, args, kwargs):
        op = self.fetch_attr(target)
        if not isinstance(op, FixedDot):
            return super().call_module(target, args, kwargs)
        if self.gptq:
            kernel_size = (1, 1) if op.geometry.is_linear else op.module.kernel_size
            fmt = op.weight_fmts[0]
            frac_bits = torch.tensor([f.frac_bits for f in op.weight_fmts])
            hessian = input_hessian(args[0].cpu(), op.geometry, kernel_size)
            op.chosen_weight_codes = gptq_codes(op.module.weight.cpu(), hessian, frac_bits, fmt.total_bits, fmt.rounding)
            self._refinalize(op)
        out = super().call_module(target, args, kwargs)
        if self.float_means is None or op.module.bias is None or op.name not in self.float_means:
            return out
        error = output_means(op, out) - self.float_means[op.name]
        op.module.bias -= error.to(op.module.bias)
        self._refinalize(op)
        return super().call_module(target, args, kwargs)
