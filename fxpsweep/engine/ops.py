"""The operations of a fixed-point network, each a register-transfer step on integer codes.

Between operations, tensors hold integer codes ``k`` (values ``k * 2**-F``),
stored in float32 for words of up to 24 bits and float64 above, so ReLU,
max-pooling and reshapes apply to codes unchanged. Each operation here knows
the formats of its inputs and output and computes its output codes exactly
(see ``kernels`` for the dot products).

Every operation has two modes. Before ``finalize`` it runs the float
operation (and reports its output to a ``StatsObserver`` while calibration
statistics are gathered); afterwards it runs the integer datapath.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxpsweep.engine import kernels
from fxpsweep.engine.fixedpoint import (
    QFormat,
    apply_overflow,
    divide_and_round,
    quantize_codes,
    round_and_overflow,
)
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.engine.statistics import RELU_SUFFIX, StatsObserver
from fxpsweep.errors import ConfigError


def code_dtype(fmt: QFormat) -> torch.dtype:
    """The float dtype that holds every code of ``fmt`` exactly."""
    return torch.float32 if fmt.total_bits <= 24 else torch.float64


class FixedOp(nn.Module):
    """Base of every operation: float while calibrating, integer codes once finalized."""

    kind = "activation"

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.observer: StatsObserver | None = None  # set while calibration statistics are gathered
        self.only_relu_reads = False  # every reader of the output is a ReLU (set by the builder)
        self.out_fmt: QFormat | None = None
        self.in_fmts: list[QFormat] = []
        self.overflows = 0  # values that saturated or wrapped into out_fmt since finalize
        self.values = 0
        self.generator: torch.Generator | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.out_fmt is None:
            out = self.float_forward(*inputs)
            if self.observer is not None:
                self.observer.update(self.name, out)
                if self.only_relu_reads:
                    self.observer.update(self.name + RELU_SUFFIX, torch.relu(out))
            return out
        return self.fixed_forward(*inputs)

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

    def emit(self, v: torch.Tensor) -> torch.Tensor:
        """Round ``v`` (output value times ``2**F_out``, exact) into the output format, counting overflows."""
        codes, overflowed = round_and_overflow(v, self.out_fmt, self.generator)
        self.overflows += overflowed
        self.values += codes.numel()
        return codes.to(code_dtype(self.out_fmt))

    def extra_formats(self) -> list[tuple[str, QFormat | None, int | None, int | None]]:
        """(kind, format, overflows, values) of this operation's parameters and internal registers."""
        return []

    def reset_counts(self) -> None:
        """Forget the overflows counted so far."""
        self.overflows = self.values = 0


class FixedInput(FixedOp):
    """The network input register: real values rounded into ``Q(fwd_bits, F)``."""

    kind = "input"

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def fixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emit(x.to(torch.float64) * 2.0**self.out_fmt.frac_bits)


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
        self.kernel = ""
        self.exact = True
        self.folded = False
        self.weight_fmts: list[QFormat] = []
        self.bias_fmt: QFormat | None = None
        self.acc_fmt: QFormat | None = None
        self.product_fmt: QFormat | None = None
        self.acc_overflows = self.acc_values = 0
        self.product_overflows = self.product_values = 0

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def set_parameter_formats(self, weight_fmts: list[QFormat], bias_fmt: QFormat | None) -> None:
        """Per-output-channel weight formats (all equal for per-tensor) and the bias format."""
        self.weight_fmts, self.bias_fmt = weight_fmts, bias_fmt

    def finalize(self, out_fmt: QFormat, in_fmts: list[QFormat], settings: QuantSettings, index: int) -> None:
        super().finalize(out_fmt, in_fmts, settings, index)
        a_bits, a_frac = in_fmts[0].total_bits, in_fmts[0].frac_bits
        weight = self.module.weight.detach().cpu()
        cout = weight.shape[0]
        w_bits = self.weight_fmts[0].total_bits
        w_codes = torch.stack(
            [quantize_codes(weight[c], f.total_bits, f.frac_bits, f.rounding, f.overflow) for c, f in enumerate(self.weight_fmts)]
        ).to(torch.float64)
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
        if self.module.bias is not None and self.bias_fmt is not None:
            b = self.bias_fmt
            bias = quantize_codes(self.module.bias.detach().cpu(), b.total_bits, b.frac_bits, b.rounding, b.overflow).double()
            bias_frac = float(b.frac_bits)
        else:
            bias, bias_frac = torch.zeros(cout, dtype=torch.float64), 0.0

        # Bounds, in units of the finer of the accumulator's and the bias's LSB.
        sum_frac = torch.clamp(acc_frac, min=bias_frac) if self.module.bias is not None else acc_frac
        dot_bound = float((w_codes.abs().reshape(cout, -1).sum(1) * 2.0 ** (a_bits - 1)).max())
        acc_range = 2.0 ** (self.acc_fmt.total_bits - 1) if self.acc_fmt is not None else dot_bound
        total_bound = float((acc_range * torch.pow(2.0, sum_frac - acc_frac) + bias.abs() * torch.pow(2.0, sum_frac - bias_frac)).max())
        self.kernel = self._choose_kernel(settings, dot_bound, total_bound, a_bits + w_bits, self.module.weight.device)
        self.exact = settings.arithmetic == "exact"

        view = (1, cout) if self.geometry.is_linear else (1, cout, 1, 1)
        dtype = torch.float32 if self.kernel == "float32" else torch.float64
        acc_to_out = torch.pow(2.0, out_fmt.frac_bits - acc_frac)
        bias_out = bias * 2.0 ** (out_fmt.frac_bits - bias_frac)
        # Without an accumulator word, the scaling folds into the weights and the bias into the
        # float kernel's bias: one pass gives the output before rounding.
        self.folded = self.kernel in ("float32", "float64") and self.acc_fmt is None
        w_stored = w_codes * acc_to_out.reshape((cout,) + (1,) * (w_codes.dim() - 1)) if self.folded else w_codes
        device = self.module.weight.device
        self.register_buffer("w_codes", w_stored.to(dtype).to(device))
        self.register_buffer("bias_out", bias_out.to(dtype).to(device))
        self.register_buffer("acc_to_out", acc_to_out.reshape(view).to(dtype).to(device))
        self.int8_weights = kernels.Int8Weights.prepare(w_codes, device) if self.kernel == "int8" else None
        self.piece_weights = kernels.PieceWeights.prepare(w_codes, device) if self.kernel == "float32_pieces" else None
        self.product_shift = -drop

    def _choose_kernel(
        self, settings: QuantSettings, dot_bound: float, total_bound: float, product_bits: int, device: torch.device
    ) -> str:
        """The fastest kernel that is exact for these bounds on ``device`` (see ``kernels``)."""
        if self.product_fmt is not None or (self.acc_fmt is not None and self.acc_fmt.overflow == "saturate"):
            if product_bits - 2 >= 53:
                raise ConfigError(f"layer {self.name!r}: products of {product_bits} bits exceed the 53-bit exact range")
            return "sequential"
        if settings.arithmetic == "fast":
            return "float32"
        if dot_bound < kernels.FLOAT32_EXACT and total_bound < kernels.FLOAT32_EXACT:
            return "float32"
        if max(dot_bound, total_bound) >= kernels.FLOAT64_EXACT:
            raise ConfigError(
                f"layer {self.name!r}: its accumulator may reach {max(dot_bound, total_bound):.3g}, beyond the 2**53 "
                "that fxpsweep simulates exactly; use fewer bits or a narrower acc_bits with acc_overflow=saturate"
            )
        # CPU: integer GEMM beats float64 for ungrouped layers, float32 pieces for small
        # grouped windows. CUDA's int8 GEMM wants shapes in multiples of 8, and its
        # float64 units are fast: float64 there.
        if device.type != "cpu":
            return "float64"
        if self.geometry.groups == 1:
            return "int8"
        window = self.module.weight[0].numel()  # K of one group
        return "float32_pieces" if window * 2**14 < kernels.FLOAT32_EXACT else "float64"

    def _accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """The raw accumulator ``sum_k a_k * w_k`` (integer-valued float tensor)."""
        if self.kernel == "int8":
            return kernels.int8_dot(codes, self.in_fmts[0].total_bits, self.int8_weights, self.geometry)
        if self.kernel == "float32_pieces":
            return kernels.float32_pieces_dot(codes, self.in_fmts[0].total_bits, self.piece_weights, self.geometry)
        if self.kernel == "sequential":
            acc, p_over, a_over = kernels.sequential_dot(
                codes, self.w_codes, self.geometry, self.product_fmt, self.product_shift, self.acc_fmt
            )
            adds = acc.numel() * self.w_codes[0].numel()  # one product and one add per input position
            self.product_overflows += p_over
            self.product_values += adds if self.product_fmt is not None else 0
            self.acc_overflows += a_over
            self.acc_values += adds if self.acc_fmt is not None else 0
            return acc
        return kernels.float_dot(codes.to(self.w_codes.dtype), self.w_codes, self.geometry, exact=self.exact)

    def fixed_forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.folded:
            v = kernels.float_dot(codes.to(self.w_codes.dtype), self.w_codes, self.geometry, self.bias_out, self.exact)
        else:
            acc = self._accumulate(codes).to(self.acc_to_out.dtype)
            if self.acc_fmt is not None and self.kernel != "sequential":
                # A wrapping accumulator is order-independent: wrap the exact sum once.
                self.acc_overflows += int(torch.count_nonzero((acc < self.acc_fmt.min_code) | (acc > self.acc_fmt.max_code)))
                self.acc_values += acc.numel()
                acc = apply_overflow(acc, self.acc_fmt.total_bits, self.acc_fmt.overflow)
            v = torch.addcmul(self.bias_out.reshape(self.acc_to_out.shape), acc, self.acc_to_out)
        return self.emit(v)

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
        v = a.to(self.dtype) * self.scale_a
        return self.emit(v.add_(b.to(self.dtype), alpha=self.scale_b))


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
            rows = _adaptive_windows(x.shape[-2], out_h).to(x.device)
            cols = _adaptive_windows(x.shape[-1], out_w).to(x.device)
            sums = torch.einsum("ih,nchw,jw->ncij", rows, x, cols)  # integers below 2**53: exact
            divisors = torch.outer(rows.sum(1), cols.sum(1))
            return sums, divisors
        sums = F.avg_pool2d(x, **self.pool_args, divisor_override=1)
        ones = torch.ones_like(x[:1, :1])
        divisors = torch.round(F.avg_pool2d(ones, **self.pool_args, divisor_override=1) / F.avg_pool2d(ones, **self.pool_args))
        return sums, divisors[0, 0]

    def fixed_forward(self, codes: torch.Tensor) -> torch.Tensor:
        sums, divisors = self._sums_and_divisors(codes.to(torch.float64))
        shift = self.out_fmt.frac_bits - self.in_fmts[0].frac_bits
        numerator = sums * 2.0 ** max(shift, 0)
        denominator = divisors * 2.0 ** max(-shift, 0)
        k = divide_and_round(numerator, denominator.expand_as(numerator), self.out_fmt.rounding, self.generator)
        fmt = self.out_fmt
        self.overflows += int(torch.count_nonzero((k < fmt.min_code) | (k > fmt.max_code)))
        self.values += k.numel()
        return apply_overflow(k, fmt.total_bits, fmt.overflow).to(code_dtype(fmt))


class FixedClamp(FixedOp):
    """ReLU6 and Hardtanh: a clamp on the grid; the output keeps the input's format.

    A clamp constant that is not on the grid is rounded toward zero onto it
    (6.0 in a format with LSB 4 becomes 4.0), and limited to the format's range.
    """

    def __init__(self, name: str, low: float, high: float, float_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(name)
        self.low, self.high, self.float_fn = low, high, float_fn

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.float_fn(x)

    def fixed_forward(self, codes: torch.Tensor) -> torch.Tensor:
        f = self.in_fmts[0]
        low = max(f.min_code, int(torch.ceil(torch.tensor(self.low * 2.0**f.frac_bits))))
        high = min(f.max_code, int(torch.floor(torch.tensor(self.high * 2.0**f.frac_bits))))
        return codes.clamp(low, high)
