"""Exact integer dot products (convolution and linear layers) on integer codes.

Every kernel here takes input codes and weight codes (integer-valued float
tensors) and returns the exact integer accumulator ``sum_k a_k * w_k`` per
output element. Which kernel is exact depends on how large a partial sum can
get, and the fastest exact one is picked per layer (``ops.FixedDot._choose_kernel``):

- ``float32``: a float32 convolution is exact while every partial sum is an
  integer below ``2**24`` (the float32 significand); proven per layer from the
  weights, ``sum_k |w_k| * max|a|``.
- ``int8``: integer GEMM (``torch._int_mm``: int8 x int8 -> int32, exact).
  Wider words split into 8-bit pieces: weights into signed digits
  ``w = sum_j 256**j * w_j`` (``w_j`` in [-128, 127], fixed at build time),
  activations into bytes offset by 128 (``a = sum_i 256**i * a_i + C``, each
  ``a_i`` in [-128, 127]; the constant ``C`` contributes ``C * sum_k w_k``).
  Each piece product is exact in int32 (``K * 2**14 < 2**31``) and the pieces
  combine exactly in float64 (the accumulator stays below ``2**53``).
- ``float32_pieces``: grouped and depthwise convolutions with a small window
  (``K * 2**14 < 2**24``, e.g. 3x3 depthwise): the same 8-bit pieces as
  ``int8``, each pair convolved in float32 (exact: every partial sum is below
  ``K * 2**14``), combined in float64. On the CPU, float64 convolutions are
  many times slower.
- ``float64``: exact while partial sums stay below ``2**53`` (other grouped
  convolutions; every layer on CUDA).
- ``sequential``: one input position ``k`` at a time, in the order
  (input channel, kernel row, kernel column), for a saturating accumulator
  (saturation after every add depends on the order) or rounding of every
  product. Slow; exact while every product is below ``2**53``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fxpsweep.engine.fixedpoint import QFormat, apply_overflow, round_to_integer

FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53


@dataclass(frozen=True)
class ConvGeometry:
    """How a dot-product layer walks its input. Linear layers are the 1x1, no-padding case on 2-D input."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    is_linear: bool = False


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
    return F.conv2d(codes, weight, bias, g.stride, g.padding, g.dilation, g.groups)


def signed_digits(w: torch.Tensor) -> list[torch.Tensor]:
    """Split integer codes into int8 digits with ``w = sum_j 256**j * digits[j]``, each in [-128, 127]."""
    digits = []
    rest = w.to(torch.int64)
    while True:
        digit = torch.remainder(rest + 128, 256) - 128
        digits.append(digit.to(torch.int8))
        rest = (rest - digit) // 256
        if not rest.any():
            return digits


def offset_bytes(a: torch.Tensor, total_bits: int) -> tuple[list[torch.Tensor], int]:
    """Split integer codes (a float tensor) into int8 pieces ``a = sum_i 256**i * pieces[i] + offset``.

    Up to 8 bits the codes are their own piece. Wider: every piece but the top
    is a byte ``b`` in [0, 255] stored as ``b - 128``; the top piece is signed.
    Returns the pieces and the constant ``offset = 128 * sum_{i < top} 256**i``.
    Floor, division by 256 and subtraction of integers are exact in the float dtype.
    """
    if total_bits <= 8:
        return [a.to(torch.int8)], 0
    n = math.ceil(total_bits / 8)
    pieces, offset, rest = [], 0, a
    for i in range(n - 1):
        high = torch.floor(rest / 256)
        pieces.append((rest - high * 256 - 128).to(torch.int8))
        offset += 128 * 256**i
        rest = high
    pieces.append(rest.to(torch.int8))
    return pieces, offset


def _im2col_nhwc(x: torch.Tensor, kernel: tuple[int, int], g: ConvGeometry) -> tuple[torch.Tensor, int, int]:
    """(N, H, W, C) int8, already padded -> (N*OH*OW, kh*kw*C) rows in (kernel row, column, channel) order."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, g.stride, g.dilation
    cols = x.unfold(1, (kh - 1) * dh + 1, sh).unfold(2, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]  # (N, OH, OW, C, kh, kw)
    n, oh, ow, c = cols.shape[:4]
    return cols.permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * c), oh, ow


@dataclass
class Int8Weights:
    """Weight codes prepared for ``int8_dot``: signed digits as (K, Cout) int8 matrices.

    K runs over (kernel row, kernel column, input channel), matching ``_im2col_nhwc``.
    """

    digits: list[torch.Tensor]
    row_sums: torch.Tensor  # (Cout,) float64: sum_k w_k, for the activation offset
    kernel: tuple[int, int]

    @classmethod
    def prepare(cls, weight_codes: torch.Tensor, device: torch.device | str = "cpu") -> Int8Weights:
        w = weight_codes.to(torch.int64)
        if w.dim() == 2:
            w = w[:, :, None, None]
        rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (Cout, K)
        digits = [d.T.contiguous().to(device) for d in signed_digits(rows)]
        return cls(digits, rows.sum(1).to(torch.float64).to(device), tuple(w.shape[2:]))


def int8_dot(codes: torch.Tensor, act_bits: int, weights: Int8Weights, geometry: ConvGeometry) -> torch.Tensor:
    """The exact accumulator (float64, below 2**53) by int8 GEMMs over 8-bit pieces; ungrouped layers only.

    A conv's result comes back as an NCHW view of NHWC memory (channels-last),
    which the following element-wise operations and convolutions accept as is.
    """
    g = geometry
    x = codes
    if not g.is_linear:
        if any(g.padding):
            ph, pw = g.padding
            x = F.pad(x, (pw, pw, ph, ph))  # zero codes, split below like any other value
        x = x.permute(0, 2, 3, 1)  # NHWC: the channels of one pixel are contiguous in the im2col rows
    pieces, offset = offset_bytes(x, act_bits)
    # Products of the same weight 256**p add up in int32 first where that stays exact
    # (count * K * 2**14 < 2**31), so each power converts to float64 once.
    by_power: dict[int, list[torch.Tensor]] = {}
    for i, piece in enumerate(pieces):
        if g.is_linear:
            cols = piece.contiguous()
        else:
            cols, oh, ow = _im2col_nhwc(piece.contiguous(), weights.kernel, g)
        for j, digit in enumerate(weights.digits):
            by_power.setdefault(i + j, []).append(torch._int_mm(cols, digit))  # |.| <= K * 2**14
    acc = None
    for power, terms in sorted(by_power.items()):
        if len(terms) * cols.shape[1] * 2**14 < 2**31:
            terms = [functools.reduce(torch.Tensor.add_, terms)]
        for term in terms:
            if acc is None:
                acc = term.to(torch.float64) * 256**power if power else term.to(torch.float64)
            else:
                acc.add_(term, alpha=256**power)
    if offset:
        acc.add_(weights.row_sums, alpha=offset)
    if g.is_linear:
        return acc
    return acc.reshape(codes.shape[0], oh, ow, -1).permute(0, 3, 1, 2)


@dataclass
class PieceWeights:
    """Weight codes as signed 8-bit digits in float32 conv layout, for ``float32_pieces_dot``."""

    digits: list[torch.Tensor]  # each (Cout, Cin/groups, kh, kw) float32, values in [-128, 127]
    row_sums: torch.Tensor  # (1, Cout, 1, 1) float64: sum_k w_k, for the activation offset

    @classmethod
    def prepare(cls, weight_codes: torch.Tensor, device: torch.device | str = "cpu") -> PieceWeights:
        digits = [d.to(torch.float32).to(device) for d in signed_digits(weight_codes)]
        sums = weight_codes.to(torch.float64).reshape(weight_codes.shape[0], -1).sum(1)
        return cls(digits, sums.reshape(1, -1, 1, 1).to(device))


def float32_pieces_dot(codes: torch.Tensor, act_bits: int, weights: PieceWeights, geometry: ConvGeometry) -> torch.Tensor:
    """The exact accumulator (float64) of a grouped conv from float32 convolutions of 8-bit pieces."""
    g = geometry
    x = codes
    if any(g.padding):
        ph, pw = g.padding
        x = F.pad(x, (pw, pw, ph, ph))  # zero codes, split below like any other value
    pieces, offset = offset_bytes(x, act_bits)
    acc = None
    for i, piece in enumerate(pieces):
        a = piece.to(torch.float32)
        for j, digit in enumerate(weights.digits):
            term = F.conv2d(a, digit, None, g.stride, 0, g.dilation, g.groups).to(torch.float64)
            acc = term * 256 ** (i + j) if acc is None else acc.add_(term, alpha=256 ** (i + j))
    if offset:
        acc.add_(weights.row_sums * offset)
    return acc


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
