"""Exact integer dot products (convolution and linear layers) on integer codes.

A conv/linear layer turns input codes ``a`` and weight codes ``w`` into its
output before rounding,

    v = acc * 2**(F_out - F_acc) + bias_out,    acc = sum_k a_k * w_k,

per output channel (``DotLayer`` holds the codes, the scales and the bias).
Every kernel below computes ``v`` exactly, or the raw ``acc`` where an
``acc_bits`` accumulator must wrap it first. A kernel may serve a layer only
where a bound on its partial sums proves it exact (``applies``); among those,
the fastest is measured on the machine (``kernel_choice``):

- ``float32``: float32 convolutions, exact while every partial sum is an
  integer below ``2**24`` (the significand). The bound is
  ``sum_k |w_k| * 2**(Wa-1)`` per output channel; where it is larger, the
  input channels are cut into chunks whose bounds are not (up to
  ``MAX_CALLS`` convolutions), summed in float64. One chunk: the scaling and
  the bias fold into the convolution itself.
- ``onednn_int8``: oneDNN's int8 convolutions (``torch.ops.onednn``, what
  PyTorch's x86 quantization runs on): uint8 inputs with zero point 128, int8
  weights, int32 accumulation, float32 output. Exact while each output fits
  float32's ``2**24``, and while no product pair saturates: without VNNI
  (AVX2, AVX-512 without VNNI) oneDNN adds two uint8 x int8 products into a
  saturating int16 first (``vpmaddubsw``), so there the weights are cut into
  7-bit digits (``2 * 255 * 64 < 2**15``; ``onednn_digit_bits``). Wider words
  split into pieces (activations into bytes, weights into signed digits,
  below), chunked like ``float32`` where a piece's sum could pass ``2**24``,
  combined in float64. One 8-bit call (weights of one digit): scale and bias
  fold in.
- ``int8_mm``: ``torch._int_mm`` (int8 x int8 -> int32) GEMMs over im2col rows
  of the same pieces (oneDNN runs them: weight digits of ``onednn_digit_bits``,
  as for its convolutions); int32 holds any piece sum with ``K < 2**17``.
  Ungrouped layers.
- ``float32_pieces``: float32 convolutions of the 8-bit pieces, chunked like
  ``onednn_int8``.
- ``float64``: exact while partial sums stay below ``2**53``.
- ``sequential``: one input position ``k`` at a time, in the order (input
  channel, kernel row, kernel column), for a saturating accumulator or
  rounding of every product (``sequential_dot``); never measured, the
  semantics need it.

A kernel of several calls returns its exact terms (``Terms``) rather than
their sum: ``FixedDot`` sums them in float64 and rounds the sum in one pass
(``fused.Rounder.combine_and_round``), so the float64 output never goes to
memory; calling a kernel returns the sum itself.

8-bit pieces: weights split into signed digits ``w = sum_j 256**j * w_j``
(``w_j`` in [-128, 127]; ``onednn_int8`` without VNNI: ``128**j``, ``w_j`` in
[-64, 63]), activations into bytes offset by 128
(``a = sum_i 256**i * a_i + C``, each ``a_i`` in [-128, 127]; the constant
``C`` contributes ``C * sum_k w_k``).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fxpsweep.backends import depthwise_loop, rounding_loop
from fxpsweep.core.fixedpoint import QFormat, apply_overflow, round_to_integer
from fxpsweep.backends.fused import Rounder, byte_pieces, combine

FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53
INT32_EXACT = 2**31
PIECE = 2**7  # largest magnitude of an 8-bit piece
MAX_CALLS = 16  # a kernel that needs more convolutions than this for one layer is not a candidate
BLOCK_VALUES = 1 << 18  # float64 outputs of one block of a pointwise layer (2 MiB: it stays in the cache)


@dataclass(frozen=True)
class ConvGeometry:
    """How a dot-product layer walks its input. Linear layers are the 1x1, no-padding case on 2-D input."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    is_linear: bool = False


@dataclass
class Terms:
    """A kernel's exact integer terms before their sum: ``acc = sum_t terms[t] * multipliers[t] (+ offset_sums)``.

    Each term is exact in its own dtype (float32 below ``2**24``, int32, float64); the
    multipliers are powers of two. The caller sums them in float64, or sums and
    rounds them in one pass (``fused.Rounder.combine_and_round``).
    """

    terms: list[torch.Tensor]
    multipliers: list[float]
    offset_sums: torch.Tensor | None = None


@dataclass
class DotLayer:
    """One conv/linear layer in integers: what every kernel needs.

    ``weight``: integer weight codes (float64, ``(Cout, Cin/groups, kh, kw)`` or
    ``(Cout, K)``). ``act_bits``: the input word (``|a| <= 2**(act_bits-1)``).
    ``out_scale``: ``2**(F_out - F_acc)`` per output channel. ``bias_out``: the
    bias in units of the output LSB, exact. ``bias_unit``: the bias LSB in the
    same units (None: no bias). ``raw``: kernels return ``acc``, not ``v``.
    ``unsigned_input``: every input code is >= 0 (the register it reads is
    clamped by a ReLU as it is written).
    """

    weight: torch.Tensor
    geometry: ConvGeometry
    act_bits: int
    out_scale: torch.Tensor
    bias_out: torch.Tensor
    bias_unit: float | None
    raw: bool = False
    unsigned_input: bool = False

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def act_max(self) -> float:
        return 2.0 ** (self.act_bits - 1)

    @property
    def input_codes(self) -> tuple[float, float]:
        """The lowest and the highest code the input may hold."""
        return (0.0 if self.unsigned_input else -self.act_max), self.act_max - 1

    def abs_sums(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``sum |w|`` per output channel and input channel (a column per input channel, K for linear)."""
        w = (self.weight if weight is None else weight).abs()
        return w if self.geometry.is_linear else w.sum((2, 3))

    def dot_bound(self) -> float:
        """Largest ``|partial sum of acc|`` over the output channels."""
        return float(self.abs_sums().sum(1).max()) * self.act_max

    def folded_bound(self) -> float:
        """Largest ``|partial sum of v|`` in units of the finest LSB of ``v`` (acc LSB or bias LSB)."""
        unit = self.out_scale if self.bias_unit is None else torch.clamp(self.out_scale, max=self.bias_unit)
        bound = self.abs_sums().sum(1) * self.act_max * self.out_scale + self.bias_out.abs()
        return float((bound / unit).max())

    def input_chunks(self, abs_sums: torch.Tensor, act_max: float, limit: float) -> list[slice] | None:
        """The fewest equal runs of input channels (columns of ``abs_sums``) whose sums stay below ``limit``.

        Grouped convolutions are not cut. None if no split into ``MAX_CALLS`` runs or fewer does it.
        """
        width = abs_sums.shape[1]
        most = 1 if self.geometry.groups > 1 else min(MAX_CALLS, width)
        for n in range(1, most + 1):
            edges = [round(i * width / n) for i in range(n + 1)]
            chunks = [slice(a, b) for a, b in zip(edges, edges[1:])] if n > 1 else [slice(None)]
            if all(float(abs_sums[:, c].sum(1).max()) * act_max < limit for c in chunks):
                return chunks
        return None

    def combine(self, result: Terms) -> torch.Tensor:
        """A kernel's result from its exact integer terms, in float64 (below ``2**53``):
        ``acc``, then ``v = acc * out_scale + bias_out`` unless ``raw``."""
        if self.raw:
            return combine(result.terms, result.multipliers, result.offset_sums)
        scale, bias = self.scale_and_bias(result.terms[0].device)
        return combine(result.terms, result.multipliers, result.offset_sums, scale, bias)

    def output(self, acc: torch.Tensor) -> torch.Tensor:
        """``v`` from ``acc`` (exact): both scalings are powers of two, the sum stays below ``2**53``."""
        scale, bias = self.scale_and_bias(acc.device)
        return combine([acc], [1.0], None, scale, bias)

    def window_sums(self, codes: torch.Tensor) -> torch.Tensor:
        """``sum_k a_k`` over each output's inputs, per output channel: exact in float32 where the sum of a
        window stays below ``2**24`` (``K * 2**(act_bits-1)``), else in float64 (below ``2**53``)."""
        g = self.geometry
        x = codes.float() if self.weight[0].numel() * self.act_max < FLOAT32_EXACT else codes.double()
        if g.is_linear:
            return x.sum(1, keepdim=True)
        # Sum each group's input channels first, then the window of that one map: the same integers
        # (zero padding adds nothing either way) for a fraction of the work of a conv over every channel.
        n, _, h, w = x.shape
        per_group = x.reshape(n, g.groups, -1, h, w).sum(2)  # (N, groups, H, W)
        ones = torch.ones(g.groups, 1, *self.weight.shape[2:], dtype=x.dtype, device=x.device)
        sums = float_dot(per_group, ones, ConvGeometry(g.stride, g.padding, g.dilation, g.groups))  # (N, groups, OH, OW)
        return sums.repeat_interleave(self.out_channels // g.groups, dim=1)

    def channel_view(self, values: torch.Tensor) -> torch.Tensor:
        """Per-output-channel values shaped to broadcast against the layer's output."""
        return values.reshape((1, -1) if self.geometry.is_linear else (1, -1, 1, 1))

    def scale_and_bias(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``out_scale`` and ``bias_out`` shaped to broadcast against the output (float64)."""
        return self.channel_view(self.out_scale).to(device), self.channel_view(self.bias_out).to(device)


def float_dot(
    codes: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry, bias: torch.Tensor | None = None, exact: bool = True
) -> torch.Tensor:
    """Convolution or matmul in ``codes``' float dtype (exact only under the bounds above).

    On CUDA, cuDNN may pick Winograd or FFT algorithms, which are not exact
    even for small integer sums (seen on an H200: off-by-one codes in a
    resnet18 conv); ``exact`` convolutions there bypass cuDNN for PyTorch's
    own im2col + GEMM kernels, which sum the products as they are.
    """
    if geometry.is_linear:
        return F.linear(codes, weight, bias)
    g = geometry
    if exact and codes.is_cuda:
        with torch.backends.cudnn.flags(enabled=False):
            return F.conv2d(codes, weight, bias, g.stride, g.padding, g.dilation, g.groups)
    if codes.dtype == torch.float64 and g.groups > 1 and codes.is_contiguous(memory_format=torch.channels_last):
        # PyTorch's own float64 path (oneDNN has none) runs a grouped conv one group at a time, and in
        # channels-last order each group's slice is a strided copy: NCHW and two layout copies cost less.
        out = F.conv2d(codes.contiguous(), weight.contiguous(), bias, g.stride, g.padding, g.dilation, g.groups)
        return out.contiguous(memory_format=torch.channels_last)
    return F.conv2d(codes, weight, bias, g.stride, g.padding, g.dilation, g.groups)


def _conv_layout(weight: torch.Tensor) -> torch.Tensor:
    """Conv weights in channels-last order, as the activations are: no reordering at every call."""
    return weight.contiguous(memory_format=torch.channels_last) if weight.dim() == 4 else weight


class Kernel:
    """One way to compute a layer's ``v`` (or ``acc``) exactly; ``calls``: convolutions or GEMMs per forward."""

    name = ""
    exact = True  # False: ``arithmetic=fast``'s one call without the bound, which may differ beyond ``2**24``

    def __init__(self, layer: DotLayer, device: torch.device) -> None:
        self.layer = layer
        self.calls = 1

    @classmethod
    def applies(cls, layer: DotLayer, device: torch.device) -> bool:
        """Whether this kernel is available on ``device`` and provably exact for ``layer``."""
        raise NotImplementedError

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """``v`` of ``codes`` (``acc`` where the layer is ``raw``), float32 or float64."""
        result = self.result(codes)
        return result if isinstance(result, torch.Tensor) else self.layer.combine(result)

    def result(self, codes: torch.Tensor) -> torch.Tensor | Terms:
        """``v`` (``acc`` where ``raw``), or the terms that sum to it (``Terms``), left to the caller to sum."""
        raise NotImplementedError

    @property
    def one_tensor(self) -> bool:
        """Whether ``result`` is ``v`` as one float32 tensor that ``rounded`` rounds as it is (in place), so
        that a reader of the register may round it in a pass of its own (``ops.FixedDotAdd``)."""
        return False

    def rounded(self, codes: torch.Tensor, rounder: Rounder) -> tuple[torch.Tensor, int]:
        """The layer's output codes of ``codes``, rounded by ``rounder``, and how many overflowed. Terms
        are summed and rounded in one pass, so their float64 sum is never written to memory; a tensor is
        a new one, rounded in place."""
        result = self.result(codes)
        if isinstance(result, Terms):
            scale, bias = self.layer.scale_and_bias(result.terms[0].device)
            return rounder.combine_and_round(result.terms, result.multipliers, result.offset_sums, scale, bias)
        return rounder.round(result, in_place=True)

    @property
    def label(self) -> str:
        """The name, with the number of calls where there are several (``float32x2``)."""
        return self.name if self.calls == 1 else f"{self.name}x{self.calls}"

    @property
    def scratch(self) -> float:
        """Bytes of temporaries per output element, at most: each call's float32 or int32 term, and their
        float64 sum (an ``acc_bits`` layer; elsewhere the codes the terms are rounded into, 4 bytes)."""
        return 4.0 if self.calls == 1 else 4.0 * self.calls + 8.0


class Float32Kernel(Kernel):
    """float32 convolutions over chunks of input channels, each below ``2**24``; one chunk folds scale and bias.

    ``exact=False`` (``arithmetic=fast``): one folded call whatever the bound.
    """

    name = "float32"

    def __init__(self, layer: DotLayer, device: torch.device, exact: bool = True) -> None:
        super().__init__(layer, device)
        self.exact = exact
        chunks = layer.input_chunks(layer.abs_sums(), layer.act_max, FLOAT32_EXACT) if exact else [slice(None)]
        self.folded = not layer.raw and len(chunks) == 1 and (not exact or layer.folded_bound() < FLOAT32_EXACT)
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        if self.folded:
            self.chunks = [slice(None)]
            self.weights = [_conv_layout((layer.weight * layer.out_scale.reshape(view)).float().to(device))]
            self.bias = layer.bias_out.float().to(device)
        else:
            self.chunks = chunks
            self.weights = [_conv_layout(layer.weight[:, c].float().to(device)) for c in chunks]
        self.calls = len(self.chunks)

    @classmethod
    def applies(cls, layer: DotLayer, device: torch.device) -> bool:
        return layer.input_chunks(layer.abs_sums(), layer.act_max, FLOAT32_EXACT) is not None

    @property
    def one_tensor(self) -> bool:
        return self.folded

    def result(self, codes: torch.Tensor) -> torch.Tensor | Terms:
        x = codes.float()
        g = self.layer.geometry
        if self.folded:
            return float_dot(x, self.weights[0], g, self.bias, self.exact)
        terms = [float_dot(x[:, chunk], w, g) for chunk, w in zip(self.chunks, self.weights)]
        return Terms(terms, [1.0] * len(terms))


class Float64Kernel(Kernel):
    """One float64 convolution, scale and bias folded unless ``raw``: exact below ``2**53``.

    On the CPU, a pointwise layer (a 1x1 convolution of stride 1, unpadded: one GEMM over the pixels of a
    channels-last input) is computed in blocks of ``BLOCK_VALUES`` outputs, each rounded while it is in the
    cache, so its float64 values never go out to memory and back.
    """

    name = "float64"

    def __init__(self, layer: DotLayer, device: torch.device) -> None:
        super().__init__(layer, device)
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        scale = torch.ones_like(layer.out_scale) if layer.raw else layer.out_scale
        weight = (layer.weight * scale.reshape(view)).to(device)
        # Grouped: NCHW, the order float_dot runs float64 grouped convolutions in (no copy per call).
        self.weight = weight.contiguous() if layer.geometry.groups > 1 else _conv_layout(weight)
        self.bias = None if layer.raw else layer.bias_out.to(device)
        g = layer.geometry
        pointwise = not g.is_linear and g.groups == 1 and tuple(weight.shape[2:]) == (1, 1) and g.stride == (1, 1) and not any(g.padding)
        # CPU only: on CUDA each block's overflow count would wait for the GPU.
        blocks = pointwise and device.type == "cpu"
        self.matrix = weight.reshape(weight.shape[0], -1).T.contiguous() if blocks else None  # (Cin, Cout)

    @classmethod
    def applies(cls, layer: DotLayer, device: torch.device) -> bool:
        return max(layer.dot_bound(), layer.folded_bound()) < FLOAT64_EXACT

    @property
    def scratch(self) -> float:
        if self.matrix is not None:
            return 0.0  # blocks (stochastic rounding, which draws for the whole output at once, excepted)
        # The input and the output in float64, and for a convolution PyTorch's float64 path (no oneDNN)
        # unfolds the input: K * groups float64 values per output position, over Cout outputs.
        layer = self.layer
        im2col = 0.0 if layer.geometry.is_linear else 8.0 * layer.weight[0].numel() * layer.geometry.groups / layer.out_channels
        return 16.0 + im2col

    def result(self, codes: torch.Tensor) -> torch.Tensor | Terms:
        return float_dot(codes.double(), self.weight, self.layer.geometry, self.bias)

    def rounded(self, codes: torch.Tensor, rounder: Rounder) -> tuple[torch.Tensor, int]:
        if self.matrix is None or rounder.fmt.rounding == "stochastic" or not codes.is_contiguous(memory_format=torch.channels_last):
            return super().rounded(codes, rounder)
        n, cin, h, w = codes.shape
        cout = self.matrix.shape[1]
        pixels = codes.permute(0, 2, 3, 1).reshape(-1, cin)  # a view of the channels-last input
        out = torch.empty((n, cout, h, w), dtype=rounder.dtype, device=codes.device, memory_format=torch.channels_last)
        out_pixels = out.permute(0, 2, 3, 1).view(-1, cout)
        step = max(1, BLOCK_VALUES // cout)
        block = torch.empty((min(step, len(pixels)), cout), dtype=torch.float64, device=codes.device)
        bias = self.bias if self.bias is not None else torch.zeros(cout, dtype=torch.float64, device=codes.device)
        in_loop = rounding_loop.supports(rounder.fmt, block)  # the same for every block: decided once
        overflowed = 0
        for start in range(0, len(pixels), step):
            part = pixels[start : start + step]
            acc = torch.addmm(bias, part.double(), self.matrix, out=block[: len(part)])
            target = out_pixels[start : start + step]
            if in_loop:
                overflowed += rounding_loop.round_into(acc, target, rounder.fmt, rounder.clamp)
            else:
                rounded, count = rounder.round(acc)
                target.copy_(rounded)
                overflowed += count
        return out, overflowed


class DepthwiseLoopKernel(Kernel):
    """A depthwise convolution (each output channel reads its own input channel) as one numba loop in
    float64 (``depthwise_loop``): exact below ``2**53`` as ``float64``, and for the default rule (round half
    to even, saturate) it rounds as it stores, so it writes nothing but the output codes."""

    name = "depthwise_loop"

    def __init__(self, layer: DotLayer, device: torch.device) -> None:
        super().__init__(layer, device)
        self.weight = layer.weight[:, 0].permute(1, 2, 0).contiguous().numpy()  # (kh, kw, C)
        scale = torch.ones_like(layer.out_scale) if layer.raw else layer.out_scale
        bias = torch.zeros_like(layer.bias_out) if layer.raw else layer.bias_out
        self.scale, self.bias = scale.double().contiguous().numpy(), bias.double().contiguous().numpy()

    @classmethod
    def applies(cls, layer: DotLayer, device: torch.device) -> bool:
        g = layer.geometry
        depthwise = not g.is_linear and layer.weight.shape[1] == 1 and g.groups == layer.out_channels
        return device.type == "cpu" and depthwise and max(layer.dot_bound(), layer.folded_bound()) < FLOAT64_EXACT

    @property
    def scratch(self) -> float:
        return 0.0  # the output only (float64 values where it does not round)

    def _run(self, codes: torch.Tensor, dtype: torch.dtype, rounder: Rounder | None = None) -> tuple[torch.Tensor, int]:
        g = self.layer.geometry
        if codes.dtype not in (torch.float32, torch.float64):
            codes = codes.double()
        codes = codes.contiguous(memory_format=torch.channels_last)
        shape = depthwise_loop.output_shape(codes, self.weight.shape[:2], g.stride, g.padding, g.dilation)
        out = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
        fmt, clamp = (rounder.fmt, rounder.clamp) if rounder is not None else (None, None)
        overflowed = depthwise_loop.depthwise_into(codes, self.weight, self.scale, self.bias, g.stride, g.padding, g.dilation, out, fmt, clamp)
        return out, overflowed

    def result(self, codes: torch.Tensor) -> torch.Tensor | Terms:
        return self._run(codes, torch.float64)[0]

    def rounded(self, codes: torch.Tensor, rounder: Rounder) -> tuple[torch.Tensor, int]:
        if not rounding_loop.supports(rounder.fmt, codes):  # another rule: its float64 values, rounded by the Rounder
            return super().rounded(codes, rounder)
        return self._run(codes, rounder.dtype, rounder)


def signed_digits(w: torch.Tensor, bits: int = 8) -> list[torch.Tensor]:
    """Split integer codes into int8 digits of ``bits`` bits (7 or 8): ``w = sum_j (2**bits)**j * digits[j]``,
    each in ``[-2**(bits-1), 2**(bits-1) - 1]``."""
    base, half = 2**bits, 2 ** (bits - 1)
    digits = []
    rest = w.to(torch.int64)
    while True:
        digit = torch.remainder(rest + half, base) - half
        digits.append(digit.to(torch.int8))
        rest = (rest - digit) // base
        if not rest.any():
            return digits


def fits_one_digit(w: torch.Tensor, bits: int = 8) -> bool:
    """Whether the integer codes ``w`` are one digit of ``signed_digits(w, bits)``: all in ``[-2**(bits-1), 2**(bits-1) - 1]``."""
    low, high = torch.aminmax(w)
    return -(2 ** (bits - 1)) <= float(low) and float(high) <= 2 ** (bits - 1) - 1


def split_weights(weight: torch.Tensor, bits: int = 8) -> tuple[int, list[torch.Tensor]]:
    """``(shift, digits)`` with ``weight = shift + sum_j (2**bits)**j * digits[j]``, ``shift`` 0 or ``2**(bits-1)``.

    Two signed 8-bit digits hold [-32896, 32639], not the top of a 16-bit
    word's [-32768, 32767]; ``weight - 128`` always fits. Where that saves a
    digit (one conv or GEMM per activation piece), the kernel adds
    ``shift * sum_k a_k`` itself (``DotLayer.window_sums``).
    """
    if fits_one_digit(weight, bits):  # the common case, without the digits' int64 temporaries
        return 0, [weight.to(torch.int8)]
    plain = signed_digits(weight, bits)
    shift = 2 ** (bits - 1)
    shifted = signed_digits(weight - shift, bits)
    return (shift, shifted) if len(shifted) < len(plain) else (0, plain)


def piece_count(total_bits: int) -> int:
    """How many 8-bit pieces ``fused.byte_pieces`` cuts a word of ``total_bits`` into."""
    return max(1, math.ceil(total_bits / 8))


# oneDNN's names of the instruction sets below VNNI (``ONEDNN_MAX_CPU_ISA``'s values).
ONEDNN_ISAS_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


@functools.cache
def onednn_digit_bits() -> int:
    """Bits of the weight digits that oneDNN's uint8 x int8 kernels multiply exactly on this CPU.

    8 with VNNI (``vpdpbusd`` sums four products straight into int32). 7
    without it: ``vpmaddubsw`` first adds two products into a saturating int16,
    and ``2 * 255 * 127`` does not fit (measured on an AVX2 EPYC: an 8-bit conv
    of all-extreme codes off by 2.3e6), while ``2 * 255 * 64 = 32640`` does.
    Also 7 where ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) holds oneDNN
    below VNNI on a processor that has it (on a Xeon with AMX held to AVX2,
    ``torch._int_mm`` of 8-bit digits was off by up to 1.2e6, of 7-bit ones
    exact). Where the CPU cannot be asked, 7. (Inputs of 7 bits,
    ``unsigned_input``, take 8-bit digits everywhere: ``2 * 127 * 128 = 32512``;
    see ``OneDNNInt8Kernel``.)
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.upper() in ONEDNN_ISAS_WITHOUT_VNNI:
        return 7
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    try:
        return 8 if is_vnni is not None and is_vnni() else 7
    except RuntimeError:
        return 7


def _onednn_unsigned(layer: DotLayer) -> bool:
    """Whether the input goes to oneDNN as the codes themselves (uint8 in [0, 127], zero point 0):
    one piece, never negative. Else as uint8 ``piece + 128`` with zero point 128."""
    return layer.unsigned_input and piece_count(layer.act_bits) == 1


def _onednn_digits(layer: DotLayer, digit_bits: int | None = None) -> int:
    """The weight digit width of ``OneDNNInt8Kernel`` on ``layer``: 8 for unsigned 7-bit inputs (their
    product pairs fit int16 on any CPU), else what the CPU sums exactly (``onednn_digit_bits``)."""
    return digit_bits or (8 if _onednn_unsigned(layer) else onednn_digit_bits())


def _piece_chunks(layer: DotLayer, digits: list[torch.Tensor]) -> list[slice] | None:
    """Input-channel chunks for kernels of pieces: each call's sum of one activation piece times one
    weight digit stays below ``2**24`` (8-bit words: the codes themselves, pieces: at most 128)."""
    if piece_count(layer.act_bits) == 1 and len(digits) == 1:
        return layer.input_chunks(layer.abs_sums(), layer.act_max, FLOAT32_EXACT)
    digit_sums = torch.stack([layer.abs_sums(d.double()) for d in digits]).amax(0)
    return layer.input_chunks(digit_sums, PIECE, FLOAT32_EXACT)


def _onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv_pointwise") and torch.backends.mkldnn.is_available()


class OneDNNInt8Kernel(Kernel):
    """oneDNN int8 convolutions or matmuls (uint8 input, int8 weights), float32 output.

    Each call sums products of one activation piece and one weight digit over
    one chunk of input channels; its float32 output is exact below ``2**24``.
    A single call (8-bit words, one chunk) folds the output scale and the bias in.
    The input is uint8 ``piece + 128`` with zero point 128, or, where it is one
    piece that is never negative (after a ReLU), the codes with zero point 0,
    which lets 8-bit weights be one digit also without VNNI.

    ``exact=False`` (``arithmetic=fast``): one call, scale and bias folded whatever the bound.
    """

    name = "onednn_int8"

    def __init__(self, layer: DotLayer, device: torch.device, exact: bool = True, digit_bits: int | None = None) -> None:
        super().__init__(layer, device)
        self.exact = exact
        self.digit_bits = _onednn_digits(layer, digit_bits)
        self.zero_point = 0 if _onednn_unsigned(layer) else 128
        self.shift, self.digits = split_weights(layer.weight, self.digit_bits)
        self.n_pieces = piece_count(layer.act_bits)
        self.chunks = _piece_chunks(layer, self.digits) if exact else [slice(None)]
        single = self.n_pieces == 1 and len(self.digits) == 1 and len(self.chunks) == 1 and not self.shift
        self.folded = not layer.raw and single and (not exact or layer.folded_bound() < FLOAT32_EXACT)
        cout = layer.out_channels
        self.scales = (layer.out_scale if self.folded else torch.ones(cout, dtype=torch.float64)).float()
        self.bias = layer.bias_out.float() if self.folded else None
        self.zero_points = torch.zeros(cout, dtype=torch.int64)
        # Wide words: the constant C of the pieces is added for every input position, padding
        # included, so the zero codes of the padding are split like any others: pad first.
        self.padding = (0, 0) if self.n_pieces > 1 else layer.geometry.padding
        self.row_sums = layer.channel_view((layer.weight - self.shift).reshape(cout, -1).sum(1)).to(device)
        self.packed = [[self._pack(d[:, c]) for c in self.chunks] for d in self.digits]  # per digit, per chunk
        self.calls = self.n_pieces * len(self.digits) * len(self.chunks) + (self.shift != 0)

    def _pack(self, digit: torch.Tensor):
        """oneDNN's packed form of one weight digit (int8) of one chunk."""
        g = self.layer.geometry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if g.is_linear:
                return torch.ops.onednn.qlinear_prepack(digit.contiguous(), None)
            return torch.ops.onednn.qconv_prepack(
                digit.contiguous(memory_format=torch.channels_last), self.scales, 1.0, self.zero_point,
                list(g.stride), list(self.padding), list(g.dilation), g.groups, None,
            )

    @classmethod
    def applies(cls, layer: DotLayer, device: torch.device, digit_bits: int | None = None) -> bool:
        if device.type != "cpu" or not _onednn_available():
            return False
        _, digits = split_weights(layer.weight, _onednn_digits(layer, digit_bits))
        chunks = _piece_chunks(layer, digits)
        return chunks is not None and piece_count(layer.act_bits) * len(digits) * len(chunks) <= MAX_CALLS

    def _pieces(self, codes: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """The activation pieces as the oneDNN inputs: uint8 ``piece + 128`` (zero point 128), or the
        codes themselves (zero point 0).

        uint8, also for matmuls that take int8: oneDNN runs a signed-input matmul
        on a reference path, thousands of times slower.
        """
        if self.zero_point == 0:
            return [codes.to(torch.uint8)], 0
        g = self.layer.geometry
        if self.padding != g.padding:
            ph, pw = g.padding
            codes = F.pad(codes, (pw, pw, ph, ph))
        return byte_pieces(codes, self.layer.act_bits, unsigned=True)

    def _call(self, x: torch.Tensor, packed) -> torch.Tensor:
        g = self.layer.geometry
        if g.is_linear:
            return torch.ops.onednn.qlinear_pointwise(
                x, 1.0, self.zero_point, packed, self.scales, self.zero_points, self.bias, 1.0, 0, torch.float32, "none", [], ""
            )
        return torch.ops.onednn.qconv_pointwise(
            x, 1.0, self.zero_point, packed, self.scales, self.zero_points, self.bias,
            list(g.stride), list(self.padding), list(g.dilation), g.groups, 1.0, 0, torch.float32, "none", [], "",
        )

    @property
    def one_tensor(self) -> bool:
        return self.folded

    def result(self, codes: torch.Tensor) -> torch.Tensor | Terms:
        pieces, offset = self._pieces(codes)
        layout = torch.contiguous_format if self.layer.geometry.is_linear else torch.channels_last
        if self.folded:
            return self._call(pieces[0].contiguous(memory_format=layout), self.packed[0][0])
        terms, multipliers = [], []
        for i, piece in enumerate(pieces):
            for j, per_chunk in enumerate(self.packed):
                for chunk, packed in zip(self.chunks, per_chunk):
                    terms.append(self._call(piece[:, chunk].contiguous(memory_format=layout), packed))
                    multipliers.append(256.0**i * 2.0 ** (self.digit_bits * j))
        if self.shift:
            terms.append(self.layer.window_sums(codes))
            multipliers.append(float(self.shift))
        return Terms(terms, multipliers, self.row_sums * offset if offset else None)


def _im2col_nhwc(x: torch.Tensor, kernel: tuple[int, int], g: ConvGeometry) -> tuple[torch.Tensor, int, int]:
    """(N, H, W, C) int8, already padded -> (N*OH*OW, kh*kw*C) rows in (kernel row, column, channel) order."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, g.stride, g.dilation
    cols = x.unfold(1, (kh - 1) * dh + 1, sh).unfold(2, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]  # (N, OH, OW, C, kh, kw)
    n, oh, ow, c = cols.shape[:4]
    return _row_major(cols.permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * c)), oh, ow


def _row_major(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with plain row-major strides. ``_int_mm`` reads the strides to tell a transposed
    operand, and a size-1 dimension's stride (a view, or even ``contiguous()``) can mislead it."""
    if matrix.stride() == (matrix.shape[1], 1):
        return matrix
    return torch.empty(matrix.shape, dtype=matrix.dtype, device=matrix.device).copy_(matrix)


class Int8MatmulKernel(Kernel):
    """``torch._int_mm`` GEMMs over im2col rows of 8-bit pieces; int32 holds every piece sum."""

    name = "int8_mm"

    def __init__(self, layer: DotLayer, device: torch.device) -> None:
        super().__init__(layer, device)
        w = layer.weight.to(torch.int64)
        if w.dim() == 2:
            w = w[:, :, None, None]
        rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (Cout, K), K over (kernel row, column, channel)
        self.digit_bits = onednn_digit_bits()
        self.shift, digits = split_weights(rows, self.digit_bits)
        self.digits = [_row_major(d.T).to(device) for d in digits]
        self.row_sums = layer.channel_view((rows - self.shift).sum(1).to(torch.float64)).to(device)
        self.kernel_size = tuple(w.shape[2:])
        self.calls = piece_count(layer.act_bits) * len(self.digits) + (self.shift != 0)

    @property
    def scratch(self) -> float:
        layer = self.layer
        im2col = piece_count(layer.act_bits) * layer.weight[0].numel() / layer.out_channels  # int8 rows per output element
        return 4.0 * self.calls + 8.0 + im2col

    @classmethod
    def applies(cls, layer: DotLayer, device: torch.device) -> bool:
        k = layer.weight[0].numel()
        return device.type == "cpu" and layer.geometry.groups == 1 and k * PIECE * PIECE < INT32_EXACT and layer.dot_bound() < FLOAT64_EXACT

    def result(self, codes: torch.Tensor) -> torch.Tensor | Terms:
        g = self.layer.geometry
        x = codes
        if not g.is_linear:
            if any(g.padding):
                ph, pw = g.padding
                x = F.pad(x, (pw, pw, ph, ph))  # zero codes, split below like any other value
            x = x.permute(0, 2, 3, 1)  # NHWC: the channels of one pixel are contiguous in the im2col rows
        pieces, offset = byte_pieces(x, self.layer.act_bits, unsigned=False)
        terms, multipliers = [], []
        for i, piece in enumerate(pieces):
            if g.is_linear:
                cols = _row_major(piece)
            else:
                cols, oh, ow = _im2col_nhwc(piece.contiguous(), self.kernel_size, g)
            for j, digit in enumerate(self.digits):
                term = torch._int_mm(cols, digit)  # exact int32: |.| <= K * 2**14
                terms.append(term if g.is_linear else term.reshape(codes.shape[0], oh, ow, -1).permute(0, 3, 1, 2))
                multipliers.append(256.0**i * 2.0 ** (self.digit_bits * j))
        if self.shift:
            terms.append(self.layer.window_sums(codes))
            multipliers.append(float(self.shift))
        return Terms(terms, multipliers, self.row_sums * offset if offset else None)


class Float32PiecesKernel(Kernel):
    """float32 convolutions or matmuls of 8-bit pieces (activation bytes times signed weight digits), over chunks
    of input channels whose sums stay below ``2**24``: exact where float64 is slow (4-10x float32 on AVX2)."""

    name = "float32_pieces"

    def __init__(self, layer: DotLayer, device: torch.device) -> None:
        super().__init__(layer, device)
        self.shift, digits = split_weights(layer.weight)
        self.chunks = _piece_chunks(layer, digits)
        self.digits = [[_conv_layout(d[:, c].to(torch.float32).to(device)) for c in self.chunks] for d in digits]
        self.row_sums = layer.channel_view((layer.weight - self.shift).reshape(layer.out_channels, -1).sum(1)).to(device)
        self.calls = piece_count(layer.act_bits) * len(digits) * len(self.chunks) + (self.shift != 0)

    @classmethod
    def applies(cls, layer: DotLayer, device: torch.device) -> bool:
        _, digits = split_weights(layer.weight)
        pieces = piece_count(layer.act_bits) * len(digits)
        if pieces == 1:
            return False  # one piece each side: the float32 kernel itself
        chunks = _piece_chunks(layer, digits)
        return chunks is not None and pieces * len(chunks) <= MAX_CALLS

    def result(self, codes: torch.Tensor) -> torch.Tensor | Terms:
        g = self.layer.geometry
        x = codes
        if any(g.padding):
            ph, pw = g.padding
            x = F.pad(x, (pw, pw, ph, ph))  # zero codes, split below like any other value
        unpadded = ConvGeometry(g.stride, (0, 0), g.dilation, g.groups, g.is_linear)
        pieces, offset = byte_pieces(x, self.layer.act_bits, unsigned=False)
        terms, multipliers = [], []
        for i, piece in enumerate(pieces):
            a = piece.to(torch.float32)
            for j, per_chunk in enumerate(self.digits):
                for chunk, digit in zip(self.chunks, per_chunk):
                    terms.append(float_dot(a[:, chunk], digit, unpadded))
                    multipliers.append(256.0 ** (i + j))
        if self.shift:
            terms.append(self.layer.window_sums(codes))
            multipliers.append(float(self.shift))
        return Terms(terms, multipliers, self.row_sums * offset if offset else None)


# The measured kernels, in the order they are tried (ties go to the first).
EXACT_KERNELS: tuple[type[Kernel], ...] = (
    OneDNNInt8Kernel, Float32Kernel, Int8MatmulKernel, Float32PiecesKernel, DepthwiseLoopKernel, Float64Kernel
)
KERNEL_NAMES = tuple(k.name for k in EXACT_KERNELS) + ("sequential",)


def exact_candidates(layer: DotLayer, device: torch.device) -> list[Kernel]:
    """Every kernel that is available on ``device`` and provably exact for ``layer``."""
    return [k(layer, device) for k in EXACT_KERNELS if k.applies(layer, device)]


def fast_candidates(layer: DotLayer, device: torch.device) -> list[Kernel]:
    """``arithmetic=fast``: one call without the bound (inexact where partial sums pass ``2**24``)."""
    found: list[Kernel] = [Float32Kernel(layer, device, exact=False)]
    # Only weights of one digit: without VNNI, wider ones would saturate oneDNN's int16 pair sums (not a rounding error).
    if device.type == "cpu" and _onednn_available() and layer.act_bits <= 8 and fits_one_digit(layer.weight, _onednn_digits(layer)):
        found.insert(0, OneDNNInt8Kernel(layer, device, exact=False))
    return found


def sequential_dot(
    codes: torch.Tensor,
    weight: torch.Tensor,
    geometry: ConvGeometry,
    product_fmt: QFormat | None,
    product_shift: int,
    acc_fmt: QFormat | None,
) -> tuple[torch.Tensor, int, int]:
    """The accumulator summed one input position at a time, in float64.

    Each product ``a_k * w_k`` is optionally rounded by ``2**product_shift``
    into ``product_fmt``; each add optionally saturates or wraps into
    ``acc_fmt`` (then in the product's scale). The order is k = 0, 1, ...
    over (input channel, kernel row, kernel column). Returns the accumulator
    and the counts of overflowed products and accumulator adds.
    """
    g = geometry
    x = codes.to(torch.float64)
    w = weight.to(torch.float64)
    cout = w.shape[0]
    if g.is_linear:
        cols, out_shape = x.unsqueeze(0), None  # (1, N, K)
    else:
        unfolded = F.unfold(x, tuple(w.shape[2:]), g.dilation, g.padding, g.stride)  # (N, C*kh*kw, L)
        cols = unfolded.transpose(1, 2)  # (N, L, K)
        oh = (x.shape[2] + 2 * g.padding[0] - g.dilation[0] * (w.shape[2] - 1) - 1) // g.stride[0] + 1
        out_shape = (x.shape[0], cout, oh, -1)
    w = w.reshape(cout, -1)  # (Cout, K/groups)
    k_per_group = w.shape[1]
    out_per_group = cout // g.groups
    acc = torch.zeros(cols.shape[:2] + (cout,), dtype=torch.float64, device=x.device)
    product_overflows = acc_overflows = 0
    for k in range(k_per_group):
        # Column k of every group's window, each against its group's weights.
        a_k = torch.stack([cols[..., gi * k_per_group + k] for gi in range(g.groups)], -1)  # (.., G)
        a_k = a_k.repeat_interleave(out_per_group, dim=-1)  # (.., Cout)
        p = a_k * w[:, k]
        if product_fmt is not None:
            p = round_to_integer(p * 2.0**product_shift, product_fmt.rounding)
            product_overflows += int(torch.count_nonzero((p < product_fmt.min_code) | (p > product_fmt.max_code)))
            p = apply_overflow(p, product_fmt.total_bits, product_fmt.overflow)
        acc = acc + p
        if acc_fmt is not None:
            acc_overflows += int(torch.count_nonzero((acc < acc_fmt.min_code) | (acc > acc_fmt.max_code)))
            acc = apply_overflow(acc, acc_fmt.total_bits, acc_fmt.overflow)
    if g.is_linear:
        return acc[0], product_overflows, acc_overflows
    return acc.transpose(1, 2).reshape(out_shape), product_overflows, acc_overflows
