"""The operations of a fixed-point network, each a register-transfer step on integer codes.

Between operations, tensors hold integer codes ``k`` (values ``k * 2**-F``),
stored in float32 for words of up to 24 bits and float64 above, images in
channels-last memory order (what the CPU's convolutions are fastest on), so
ReLU, max-pooling and reshapes apply to codes unchanged. Each operation here knows
the formats of its inputs and output and computes its output codes exactly
(see ``kernels`` for the dot products).

Every operation has two modes. Before ``finalize`` it runs the float
operation (and reports its output to a ``StatsObserver`` while calibration
statistics are gathered); afterwards it runs the integer datapath.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxpsweep.backends import kernels, rounding_loop
from fxpsweep.core.fixedpoint import QFormat, apply_overflow, divide_and_round, quantize_codes
from fxpsweep.backends.fused import Rounder
from fxpsweep.backends.kernel_choice import KernelChooser
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.engine.statistics import RELU_SUFFIX, StatsObserver
from fxpsweep.core.errors import ConfigError

WEIGHT_BLOCK_VALUES = 2**20  # weights rounded per call in ``FixedDot.weight_codes``


# Bytes of a conv/linear kernel's temporaries per output element, at most: the largest budget that keeps
# exact 16-bit peak memory below 2x float32's on the bench models (bench/throughput.py's memory column), at no
# cost in speed: a sliced layer is large, and its calls stay large.
SCRATCH_BUDGET = 6.0
# ... or this many bytes, where that is more: a small output runs in few slices (slices of a few images
# cost more calls than they save), and its temporaries stay below what float32 holds for a small network.
# 12 MiB keeps resnet20_cifar10 at 16 bits below 2x float32's peak on any kernel forced on every layer (float64,
# 88 bytes per output element on its 16-channel layers, is the largest).
SCRATCH_FLOOR = 12 * 2**20


def code_dtype(fmt: QFormat) -> torch.dtype:
    """The float dtype that holds every code of ``fmt`` exactly."""
    return torch.float32 if fmt.total_bits <= 24 else torch.float64


@dataclass
class RegisterRecord:
    """What the fixed-point runs wrote to one register (counts since finalize). A plain object, not
    module attributes: updated at every operation, where ``nn.Module.__setattr__`` costs microseconds."""

    out_numel: int = 0  # values per image, in the last run
    overflows: int = 0  # values that saturated or wrapped into the register's format
    values: int = 0  # values written


class FixedOp(nn.Module):
    """Base of every operation: float while calibrating, integer codes once finalized."""

    kind = "activation"

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.observer: StatsObserver | None = None  # set while calibration statistics are gathered
        # Every reader of the output is a ReLU (the register is calibrated on what the ReLU passes).
        self.only_relu_reads = False
        # (low, high) in real values: a ReLU, ReLU6 or Hardtanh that is this register's only reader,
        # removed by the builder and applied as the register is written (overflows counted before it).
        self.read_clamp: tuple[float, float] | None = None
        self.out_fmt: QFormat | None = None
        self.in_fmts: list[QFormat] = []
        self.inputs_from: list[str] = []  # the operations whose registers this one reads (set at finalize)
        self.record = RegisterRecord()
        self.generator: torch.Generator | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.out_fmt is None:
            out = self.float_forward(*inputs)
            if self.observer is not None:
                self.observer.update(self.name, out)
                if self.only_relu_reads:
                    self.observer.update(self.name + RELU_SUFFIX, torch.relu(out))
            return out.clamp(*self.read_clamp) if self.read_clamp is not None else out
        out = self.fixed_forward(*inputs)
        self.record.out_numel = math.prod(out.shape[1:])
        return out

    @property
    def out_numel(self) -> int:
        """Values of the output register per image (of the last fixed-point run)."""
        return self.record.out_numel

    @property
    def overflows(self) -> int:
        """Values that saturated or wrapped into ``out_fmt`` since finalize (or ``reset_counts``)."""
        return self.record.overflows

    @property
    def values(self) -> int:
        """Values written to the output register since finalize (or ``reset_counts``)."""
        return self.record.values

    def float_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fixed_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, out_fmt: QFormat, in_fmts: list[QFormat], settings: QuantSettings, index: int) -> None:
        """Fix the formats; from now on the operation runs on integer codes."""
        self.in_fmts = in_fmts
        self.out_fmt = out_fmt
        if out_fmt.rounding == "stochastic":
            self.generator = torch.Generator().manual_seed(settings.seed * 100003 + index)
        self.rounder = Rounder(out_fmt, code_dtype(out_fmt), self.generator, self.clamp_codes())

    def clamp_codes(self) -> tuple[int, int]:
        """The codes the output may take: the format's range, narrowed by ``read_clamp``.

        A clamp constant not on the grid is rounded toward zero onto it (6.0
        with an LSB of 4 becomes 4.0), and limited to the format's range.
        """
        f = self.out_fmt
        if self.read_clamp is None:
            return f.min_code, f.max_code
        low, high = self.read_clamp
        scale = 2.0**f.frac_bits
        low_code = f.min_code if low == -math.inf else max(f.min_code, math.ceil(low * scale))
        high_code = f.max_code if high == math.inf else min(f.max_code, math.floor(high * scale))
        return low_code, high_code

    def count(self, codes: torch.Tensor, overflowed: int) -> torch.Tensor:
        """Add ``overflowed`` values of ``codes`` (this operation's output) to its overflow counts."""
        record = self.record
        record.overflows += overflowed
        record.values += codes.numel()
        return codes

    def emit(self, v: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """Round ``v`` (output value times ``2**F_out``, exact) into the output format, counting overflows;
        ``in_place``: over ``v`` where it has the codes' dtype (a temporary nothing else reads)."""
        return self.count(*self.rounder.round(v, in_place))

    def extra_formats(self) -> list[tuple[str, QFormat | None, int | None, int | None]]:
        """(kind, format, overflows, values) of this operation's parameters and internal registers."""
        return []

    def reset_counts(self) -> None:
        """Forget the overflows counted so far."""
        self.record.overflows = self.record.values = 0


class FixedInput(FixedOp):
    """The network input register: real values rounded into ``Q(fwd_bits, F)``."""

    kind = "input"

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def fixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        given = x.data_ptr()
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # Scaling by 2**F is exact in float32 for F >= 0 (no underflow); float64 otherwise.
        if not (x.dtype == torch.float32 and self.out_fmt.frac_bits >= 0):
            x = x.double()
        # A copy made here (memory order, dtype) is ours to write the codes over; the caller's tensor is not.
        return self.count(*self.rounder.scale_and_round(x, 2.0**self.out_fmt.frac_bits, in_place=x.data_ptr() != given))


class Dequantize(nn.Module):
    """Network output: codes back to real values ``k * 2**-F`` (logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.fmt: QFormat | None = None

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.fmt is None:
            return codes
        return codes.to(torch.float64) * 2.0**-self.fmt.frac_bits


class FixedDot(FixedOp):
    """Conv2d or Linear: exact products, an exact (or ``acc_bits``) accumulator, bias, one rounding.

    The output before rounding is ``acc * 2**(F_out - F_acc) + bias * 2**(F_out - F_bias)``,
    both power-of-two scalings, so exact. Weights and bias are rounded to
    ``param_bits`` at ``finalize``; the weight F may differ per output channel.
    The kernel that computes it is the fastest of the exact ones on this
    machine (``kernel_choice``), chosen on the first batch; ``kernel`` names it.
    """

    def __init__(self, name: str, module: nn.Conv2d | nn.Linear) -> None:
        super().__init__(name)
        self.module = module
        if isinstance(module, nn.Linear):
            self.geometry = kernels.ConvGeometry(is_linear=True)
        else:
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                raise ConfigError(f"layer {name!r}: only numeric zero padding is supported")
            self.geometry = kernels.ConvGeometry(module.stride, module.padding, module.dilation, module.groups)
        self.chooser = KernelChooser()  # the network gives every layer its own, with its cache folder
        self.images_by_kernel: Counter[str] = Counter()  # how many images each kernel computed
        self.weight_fmts: list[QFormat] = []
        self.bias_fmt: QFormat | None = None
        self.acc_fmt: QFormat | None = None
        self.product_fmt: QFormat | None = None
        self.acc_overflows = self.acc_values = 0
        self.product_overflows = self.product_values = 0
        self.input_low_code = -math.inf  # the lowest code the input register holds (0 after a ReLU); set by the builder
        self.chosen_weight_codes: torch.Tensor | None = None  # set by calibration with weight_rounding=gptq
        self.kernel_refused = False  # settings.kernel cannot compute this layer exactly: it runs on another

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def set_parameter_formats(self, weight_fmts: list[QFormat], bias_fmt: QFormat | None) -> None:
        """Per-output-channel weight formats (all equal for per-tensor) and the bias format."""
        self.weight_fmts, self.bias_fmt = weight_fmts, bias_fmt

    def weight_codes(self) -> torch.Tensor:
        """The integer weight codes (float64, the module's weight shape), each channel in its format:
        those calibration chose (``chosen_weight_codes``, GPTQ), else each weight rounded by the format's rule."""
        if self.chosen_weight_codes is not None:
            return self.chosen_weight_codes
        weight = self.module.weight.detach().cpu()
        shared = self.weight_fmts[0]  # the channels share word length, rounding and overflow; F is per channel
        frac_bits = torch.tensor([f.frac_bits for f in self.weight_fmts], dtype=torch.float64)
        codes = torch.empty(weight.shape, dtype=torch.float64)
        # Blocks of whole channels, in order: each channel scaled by its 2**F (exact in float64) and rounded as
        # Q(W, 0), which is Q(W, F) of the unscaled weight; stochastic draws stay in element order; a block's
        # temporaries, not the whole layer's, are what a large classifier adds to the peak memory.
        rows = max(1, WEIGHT_BLOCK_VALUES // max(1, weight[0].numel()))
        for start in range(0, len(weight), rows):
            block = weight[start:start + rows].to(torch.float64)
            scale = torch.pow(2.0, frac_bits[start:start + rows]).reshape(-1, *[1] * (weight.dim() - 1))
            codes[start:start + rows] = quantize_codes(block * scale, shared.total_bits, 0, shared.rounding, shared.overflow)
        return codes

    def bias_codes(self) -> torch.Tensor | None:
        """The integer bias codes (float64), None without a bias."""
        if self.module.bias is None or self.bias_fmt is None:
            return None
        b = self.bias_fmt
        return quantize_codes(self.module.bias.detach().cpu(), b.total_bits, b.frac_bits, b.rounding, b.overflow).double()

    def finalize(self, out_fmt: QFormat, in_fmts: list[QFormat], settings: QuantSettings, index: int) -> None:
        super().finalize(out_fmt, in_fmts, settings, index)
        a_bits, a_frac = in_fmts[0].total_bits, in_fmts[0].frac_bits
        w_codes = self.weight_codes()
        cout = w_codes.shape[0]
        w_bits = self.weight_fmts[0].total_bits
        w_frac = torch.tensor([f.frac_bits for f in self.weight_fmts], dtype=torch.float64)

        # Per-product rounding drops the low bits that a product of these words cannot keep.
        drop = 0
        if settings.product_bits is not None:
            drop = max(0, a_bits + w_bits - 1 - settings.product_bits)
        acc_frac = a_frac + w_frac - drop  # per output channel
        if settings.product_bits is not None:
            self.product_fmt = QFormat(settings.product_bits, int(acc_frac.min()), out_fmt.rounding, "saturate")
        if settings.acc_bits is not None:
            self.acc_fmt = QFormat(settings.acc_bits, int(acc_frac.min()), out_fmt.rounding, settings.acc_overflow)
        bias = self.bias_codes()
        bias_frac = float(self.bias_fmt.frac_bits) if bias is not None else 0.0
        layer = kernels.DotLayer(
            weight=w_codes,
            geometry=self.geometry,
            act_bits=a_bits,
            out_scale=torch.pow(2.0, out_fmt.frac_bits - acc_frac),
            bias_out=bias * 2.0 ** (out_fmt.frac_bits - bias_frac) if bias is not None else torch.zeros(cout, dtype=torch.float64),
            bias_unit=2.0 ** (out_fmt.frac_bits - bias_frac) if bias is not None else None,
            raw=self.acc_fmt is not None,
            unsigned_input=self.input_low_code >= 0,
        )
        self.layer = layer
        device = self.module.weight.device
        self.candidates: list[kernels.Kernel] = []
        self.forced: kernels.Kernel | None = None
        self.plans: dict[tuple[int, ...], tuple[kernels.Kernel, int]] = {}  # by input shape: see _plan
        self.images_by_kernel.clear()
        if self.product_fmt is not None or (self.acc_fmt is not None and self.acc_fmt.overflow == "saturate"):
            # The order of the adds matters: one input position at a time.
            if a_bits + w_bits - 2 >= 53:
                raise ConfigError(f"layer {self.name!r}: products of {a_bits + w_bits} bits exceed the 53-bit exact range")
            self.forced = None
            self.w_codes = w_codes.to(device)
            self.product_shift = -drop
            return
        if settings.arithmetic == "fast":
            self.candidates = kernels.fast_candidates(layer, device)
        else:
            bound = max(layer.dot_bound(), layer.folded_bound())
            if bound >= kernels.FLOAT64_EXACT:
                raise ConfigError(
                    f"layer {self.name!r}: its accumulator may reach {bound:.3g}, beyond the 2**53 that fxpsweep "
                    "simulates exactly; use fewer bits or a narrower acc_bits with acc_overflow=saturate"
                )
            self.candidates = kernels.exact_candidates(layer, device)
        if settings.kernel != "auto":
            forced = [k for k in self.candidates if k.name == settings.kernel]
            self.kernel_refused = not forced  # the network says so once, for every such layer
            self.candidates = forced or self.candidates  # where it is not exact, the layer chooses among the others
        if len(self.candidates) == 1:
            self.use(self.candidates[0])

    @property
    def sequential(self) -> bool:
        """Whether the order of the adds matters (``sequential_dot``), so no kernel is chosen."""
        return self.product_fmt is not None or (self.acc_fmt is not None and self.acc_fmt.overflow == "saturate")

    @property
    def kernel(self) -> str:
        """The kernel that computed most of the images so far (``sequential``, or "" before any)."""
        if self.sequential:
            return "sequential"
        return self.images_by_kernel.most_common(1)[0][0] if self.images_by_kernel else ""

    def use(self, kernel: kernels.Kernel) -> None:
        """Run this layer on ``kernel`` from now on, whatever the input."""
        self.forced = kernel
        self.plans.clear()

    def _out_numel_per_image(self, codes: torch.Tensor) -> int:
        if self.geometry.is_linear:
            return self.layer.out_channels
        g, (kh, kw) = self.geometry, self.layer.weight.shape[2:]
        size = [(codes.shape[2 + i] + 2 * g.padding[i] - g.dilation[i] * (k - 1) - 1) // g.stride[i] + 1 for i, k in enumerate((kh, kw))]
        return self.layer.out_channels * size[0] * size[1]

    def _plan(self, codes: torch.Tensor) -> tuple[kernels.Kernel, int]:
        """The kernel for inputs of this shape (the forced one, else the fastest, timed on the first such
        input) and the images per call (``_slice_size``), worked out once per shape: a small network's
        layers take less time than working them out again."""
        shape = tuple(codes.shape)
        if shape not in self.plans:
            kernel = self.forced
            if kernel is None:
                # Compared on as many images as the most sliced candidate runs at once, timed on the batch
                # in its own slices.
                first = min(self._slice_size(k, codes) for k in self.candidates)
                kernel = self.chooser.choose(self.candidates, codes, self.name, self._timed_run, check=first)
            self.plans[shape] = (kernel, self._slice_size(kernel, codes))
        return self.plans[shape]

    def _timed_run(self, kernel: kernels.Kernel, codes: torch.Tensor) -> torch.Tensor:
        """What ``fixed_forward`` computes on ``kernel``, counting nothing: for the kernel choice. Rounded as
        ``_dot_codes`` rounds, but not with ``acc_bits`` (the accumulator is rounded the same on any kernel) or
        stochastic rounding (whose draws would then depend on whether the choice was cached)."""
        rounds = self.acc_fmt is None and self.rounder.fmt.rounding != "stochastic"
        run = (lambda part: self._rounded(kernel, part)[0]) if rounds else kernel
        return self._in_slices(codes, self._slice_size(kernel, codes), run)

    def fixed_forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.sequential:
            acc, p_over, a_over = kernels.sequential_dot(
                codes, self.w_codes, self.geometry, self.product_fmt, self.product_shift, self.acc_fmt
            )
            adds = acc.numel() * self.w_codes[0].numel()  # one product and one add per input position
            self.product_overflows += p_over
            self.product_values += adds if self.product_fmt is not None else 0
            self.acc_overflows += a_over
            self.acc_values += adds if self.acc_fmt is not None else 0
            return self.emit(self.layer.output(acc))
        kernel, step = self._plan(codes)
        self.images_by_kernel[kernel.label] += len(codes)
        return self._in_slices(codes, step, lambda part: self._dot_codes(kernel, part))

    def unrounded(self, codes: torch.Tensor) -> torch.Tensor | None:
        """The output before its rounding (output values times ``2**F_out``, float32), where this layer computes
        it as one tensor (``Kernel.one_tensor``, one call on the whole batch) and the rounding loops implement
        its format's rule; None, computing nothing, elsewhere. Counts the images as ``fixed_forward`` does;
        the caller rounds it (``emit``, or ``FixedDotAdd``'s loop)."""
        if self.sequential or self.acc_fmt is not None or not rounding_loop.rounds(self.out_fmt):
            return None
        kernel, step = self._plan(codes)
        if not kernel.one_tensor or step < len(codes):
            return None
        self.images_by_kernel[kernel.label] += len(codes)
        return kernel.result(codes)

    @staticmethod
    def _in_slices(codes: torch.Tensor, step: int, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``run`` on slices of ``step`` images of the batch ``codes``, the results in one tensor: a kernel with
        large temporaries runs so, that they stay within the budget of ``_slice_size`` (peak memory near
        float32's). Each slice's result goes straight into the output: no second copy of it is held."""
        if step >= len(codes):
            return run(codes)
        out = None
        for i in range(0, len(codes), step):
            part = run(codes[i : i + step])
            if out is None:
                out = torch.empty((len(codes),) + part.shape[1:], dtype=part.dtype, device=codes.device,
                                  memory_format=torch.channels_last if part.dim() == 4 else torch.contiguous_format)
            out[i : i + step] = part
            del part
        return out

    def _slice_size(self, kernel: kernels.Kernel, codes: torch.Tensor) -> int:
        """Images per call of ``kernel`` on the batch ``codes``: temporaries of at most ``SCRATCH_BUDGET``
        bytes per output element of the batch, or ``SCRATCH_FLOOR`` bytes where that is more."""
        n = len(codes)
        outputs = n * self._out_numel_per_image(codes)
        allowed = max(SCRATCH_BUDGET * outputs, SCRATCH_FLOOR)
        return -(-n // max(1, math.ceil(kernel.scratch * outputs / allowed)))

    def _dot_codes(self, kernel: kernels.Kernel, codes: torch.Tensor) -> torch.Tensor:
        """The output codes of ``codes`` on ``kernel``, overflows counted."""
        if self.acc_fmt is None:
            return self.count(*self._rounded(kernel, codes))
        # A wrapping accumulator is order-independent: wrap the exact sum once.
        v = kernel(codes)
        self.acc_overflows += int(torch.count_nonzero((v < self.acc_fmt.min_code) | (v > self.acc_fmt.max_code)))
        self.acc_values += v.numel()
        v = self.layer.output(apply_overflow(v, self.acc_fmt.total_bits, self.acc_fmt.overflow))
        return self.emit(v, in_place=True)

    def _rounded(self, kernel: kernels.Kernel, codes: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The output codes of ``codes`` on ``kernel`` and how many overflowed (``Kernel.rounded``)."""
        return kernel.rounded(codes, self.rounder)

    def reset_counts(self) -> None:
        super().reset_counts()
        self.acc_overflows = self.acc_values = 0
        self.product_overflows = self.product_values = 0

    def extra_formats(self) -> list[tuple[str, QFormat | None, int | None, int | None]]:
        weights = self.weight_fmts[:1] if len({f.frac_bits for f in self.weight_fmts}) == 1 else self.weight_fmts
        return [("weight", f, None, None) for f in weights] + [
            ("bias", self.bias_fmt, None, None),
            ("accumulator", self.acc_fmt, self.acc_overflows, self.acc_values),
            ("product", self.product_fmt, self.product_overflows, self.product_values),
        ]


class FixedAdd(FixedOp):
    """Residual add: operands aligned to the finer F exactly, summed exactly, rounded once."""

    def float_forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def finalize(self, out_fmt: QFormat, in_fmts: list[QFormat], settings: QuantSettings, index: int) -> None:
        super().finalize(out_fmt, in_fmts, settings, index)
        fa, fb = in_fmts
        f_sum = max(fa.frac_bits, fb.frac_bits)
        # In units of the finer LSB, |a| + |b| stays below this; float32 is exact below 2**24.
        bound = 2.0 ** (fa.total_bits - 1 + f_sum - fa.frac_bits) + 2.0 ** (fb.total_bits - 1 + f_sum - fb.frac_bits)
        self.dtype = torch.float32 if bound < kernels.FLOAT32_EXACT else torch.float64
        self.scale_a = 2.0 ** (out_fmt.frac_bits - fa.frac_bits)
        self.scale_b = 2.0 ** (out_fmt.frac_bits - fb.frac_bits)

    def fixed_forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.count(*self.rounder.add_and_round(a.to(self.dtype), b, self.scale_a, self.scale_b))


class FixedDotAdd(nn.Module):
    """A conv/linear layer and the residual add that is its register's only reader, as one step: the add
    rounds the layer's register and the sum in one pass over memory (``rounding_loop.round_then_add``), so
    the layer's codes are never stored. The codes, and each operation's overflow counts, are those of the
    two operations run one after the other, which is what runs where the loop does not apply (another
    rounding rule, CUDA, a sliced or multi-call kernel). Only ``QuantizedNetwork.forward`` runs it, and only
    where no hook watches the operations: whatever reads every register gets them one by one.
    """

    def __init__(self, dot: FixedDot, add: FixedAdd, dot_first: bool) -> None:
        super().__init__()
        self.dot, self.add = dot, add
        self.dot_first = dot_first  # the layer is the add's first operand (its scale is scale_a)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        dot, add = self.dot, self.add
        v = dot.unrounded(x)
        # The add's sum is exact in add.dtype; the loop computes it in v's dtype and stores the codes over v.
        if v is None or not (v.dtype == add.dtype == add.rounder.dtype and rounding_loop.supports(add.out_fmt, v, other)):
            codes = dot(x) if v is None else self._counted(dot, *dot.rounder.round(v, in_place=True))
            return add(codes, other) if self.dot_first else add(other, codes)
        scale_k, scale_other = (add.scale_a, add.scale_b) if self.dot_first else (add.scale_b, add.scale_a)
        register, added = rounding_loop.round_then_add(
            v, dot.out_fmt, dot.rounder.clamp, scale_k, other, scale_other, add.out_fmt, add.rounder.clamp
        )
        self._counted(dot, v, register)
        return self._counted(add, v, added)

    @staticmethod
    def _counted(op: FixedOp, codes: torch.Tensor, overflowed: int) -> torch.Tensor:
        """What ``FixedOp.forward`` records of an output: its overflows, values and size per image."""
        op.record.out_numel = math.prod(codes.shape[1:])
        return op.count(codes, overflowed)


class FixedCat(FixedOp):
    """Concatenation: each input requantized into the one output format."""

    def __init__(self, name: str, dim: int) -> None:
        super().__init__(name)
        self.dim = dim

    def float_forward(self, *parts: torch.Tensor) -> torch.Tensor:
        return torch.cat(parts, self.dim)

    def fixed_forward(self, *parts: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.emit(p * 2.0 ** (self.out_fmt.frac_bits - f.frac_bits)) for p, f in zip(parts, self.in_fmts)], self.dim)


def _adaptive_windows(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) 0/1 matrix of torch's adaptive pooling windows."""
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0
    return m


class FixedAvgPool(FixedOp):
    """Average pooling: the window sum is exact, the division by the window size is a rounding point.

    ``output_size`` set: adaptive pooling; else fixed pooling with torch's
    ``avg_pool2d`` arguments (``kernel_size``, ``stride``, ``padding``,
    ``ceil_mode``, ``count_include_pad``).
    """

    def __init__(self, name: str, output_size=None, **pool_args) -> None:
        super().__init__(name)
        self.output_size = output_size
        self.pool_args = pool_args

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_size is not None:
            return F.adaptive_avg_pool2d(x, self.output_size)
        return F.avg_pool2d(x, **self.pool_args)

    def _sums_and_divisors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.output_size is not None:
            out_h, out_w = F.adaptive_avg_pool2d(x[:1, :1], self.output_size).shape[-2:]
            (h, w) = x.shape[-2:]
            if h % out_h == 0 and w % out_w == 0:
                # Equal windows side by side (a global average pool): a plain window sum, far cheaper than the einsum.
                window = (h // out_h, w // out_w)
                sums = F.avg_pool2d(x, window, window, divisor_override=1)  # integers below 2**53: exact
                return sums, torch.full_like(sums[0, 0], float(window[0] * window[1]))
            rows = _adaptive_windows(x.shape[-2], out_h).to(x.device, x.dtype)
            cols = _adaptive_windows(x.shape[-1], out_w).to(x.device, x.dtype)
            sums = torch.einsum("ih,nchw,jw->ncij", rows, x, cols)  # integers below 2**53: exact
            divisors = torch.outer(rows.sum(1), cols.sum(1))
            return sums, divisors
        sums = F.avg_pool2d(x, **self.pool_args, divisor_override=1)
        ones = torch.ones_like(x[:1, :1])
        divisors = torch.round(F.avg_pool2d(ones, **self.pool_args, divisor_override=1) / F.avg_pool2d(ones, **self.pool_args))
        return sums, divisors[0, 0]

    def _window_values(self, codes: torch.Tensor) -> int:
        """The most input values one window sums (adaptive: at most the whole map)."""
        if self.output_size is not None:
            return codes.shape[-2] * codes.shape[-1]
        size = self.pool_args["kernel_size"]
        return size * size if isinstance(size, int) else math.prod(size)

    def fixed_forward(self, codes: torch.Tensor) -> torch.Tensor:
        # The window sums are integers: exact in float32 while a whole window's stays below 2**24 (a 7 x 7
        # pool of 16-bit codes), which saves converting the whole register to float64; the few sums then go
        # on in float64.
        largest = self._window_values(codes) * 2.0 ** (self.in_fmts[0].total_bits - 1)
        sum_dtype = torch.float32 if codes.dtype == torch.float32 and largest < kernels.FLOAT32_EXACT else torch.float64
        sums, divisors = self._sums_and_divisors(codes.to(sum_dtype))
        sums, divisors = sums.double(), divisors.double()
        shift = self.out_fmt.frac_bits - self.in_fmts[0].frac_bits
        fmt = self.out_fmt
        window = float(divisors.flatten()[0])
        power_of_two = math.frexp(window)[0] == 0.5  # window = 0.5 * 2**e
        if fmt.rounding != "stochastic" and power_of_two and bool((divisors == window).all()):
            # Every window of a power-of-two size (ResNet-20's 8 x 8): the quotient is a power-of-two
            # scaling of the exact sum, so exact, and the register rounds it as it rounds any value; the
            # division below would cost a dozen passes over the output.
            return self.count(*self.rounder.scale_and_round(sums, 2.0**shift / window))
        numerator = sums * 2.0 ** max(shift, 0)
        denominator = divisors * 2.0 ** max(-shift, 0)
        k = divide_and_round(numerator, denominator.expand_as(numerator), fmt.rounding, self.generator)
        overflowed = int(torch.count_nonzero((k < fmt.min_code) | (k > fmt.max_code)))
        k = apply_overflow(k, fmt.total_bits, fmt.overflow)
        return self.count(k.clamp_(*self.clamp_codes()).to(code_dtype(fmt)), overflowed)


class FixedClamp(FixedOp):
    """ReLU6 and Hardtanh: a clamp on the grid; the output keeps the input's format (see ``clamp_codes``).

    Where it is the only reader of a register, the builder removes it and that
    register applies it as it is written (``read_clamp``).
    """

    def __init__(self, name: str, low: float, high: float, float_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(name)
        self.low, self.high, self.float_fn = low, high, float_fn
        self.read_clamp = (low, high)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.float_fn(x)

    def fixed_forward(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.clamp(*self.clamp_codes())
