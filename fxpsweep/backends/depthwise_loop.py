"""A depthwise convolution as one numba loop in float64 that rounds as it stores.

A depthwise convolution (each output channel reads only its own input
channel: MobileNet's 3x3 layers) does 9 multiply-adds per output value, so
its cost is memory, not arithmetic. At 16 bits no float32 call is exact (9
products of up to 2**30), so the other exact kernels split the codes into
bytes and run four or five convolutions, each writing a float32 term, and a
pass that sums and rounds the terms, many times a float32 convolution's
memory traffic. This loop reads the input once, sums each output's products
in float64, adds the bias and rounds, counts and clamps as ``rounding_loop``
does, writing only the output codes.

Exact under the float64 kernel's bound (``kernels.FLOAT64_EXACT``): every
product and every partial sum of a window, in any order, is an integer below
``2**53`` (the layer's ``dot_bound``), so reassociating the sum or fusing a
multiply and an add (fastmath ``reassoc``, ``contract``) changes nothing; the
output scale is a power of two and the scaled sum plus the bias stays below
``2**53`` (``folded_bound``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.backends.rounding_loop import clamped_code, follow_torch_threads, loop_constants


@numba.njit(parallel=True, boundscheck=False, fastmath={"reassoc", "contract"}, cache=True)
def _depthwise(x, w, scale, bias, stride, padding, dilation, out, low, high, clamp_low, clamp_high, rounds):  # pragma: no cover
    """``out[n, oh, ow, c] = sum_{kh, kw} x[n, ih, iw, c] * w[kh, kw, c] * scale[c] + bias[c]``, the input
    zero outside its edges; ``rounds``: stored as ``clamped_code`` of its nearest integer (ties to even),
    else as it is. ``x``: (N, H, W, C) codes; ``w``: (KH, KW, C); ``out``: (N, OH, OW, C). Returns how
    many values overflowed [low, high] (0 unless ``rounds``). One output row per task of the threads."""
    n_images, height, width, channels = x.shape
    out_h, out_w = out.shape[1], out.shape[2]
    counts = np.zeros(n_images * out_h, np.int64)
    for row in numba.prange(n_images * out_h):
        n, oh = row // out_h, row % out_h
        acc = np.empty(channels, np.float64)
        count = 0
        for ow in range(out_w):
            acc[:] = 0.0
            for kh in range(w.shape[0]):
                ih = oh * stride[0] - padding[0] + kh * dilation[0]
                if ih < 0 or ih >= height:
                    continue
                for kw in range(w.shape[1]):
                    iw = ow * stride[1] - padding[1] + kw * dilation[1]
                    if iw < 0 or iw >= width:
                        continue
                    for c in range(channels):
                        acc[c] += x[n, ih, iw, c] * w[kh, kw, c]
            if rounds:
                pixel_count = np.float32(0)  # float32 so that the loop vectorizes; exact below 2**24 channels
                for c in range(channels):
                    out[n, oh, ow, c], overflowed = clamped_code(
                        np.rint(acc[c] * scale[c] + bias[c]), low, high, clamp_low, clamp_high
                    )
                    pixel_count += overflowed
                count += np.int64(pixel_count)
            else:
                for c in range(channels):
                    out[n, oh, ow, c] = acc[c] * scale[c] + bias[c]
        counts[row] = count
    return counts.sum()


def output_shape(codes: torch.Tensor, kernel_size: tuple[int, int], stride, padding, dilation) -> tuple[int, int, int, int]:
    """(N, C, OH, OW) of a depthwise convolution of ``codes`` (N, C, H, W)."""
    n, c, h, w = codes.shape
    size = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip((h, w), kernel_size, stride, padding, dilation)]
    return n, c, size[0], size[1]


def depthwise_into(
    codes: torch.Tensor, weight: np.ndarray, scale: np.ndarray, bias: np.ndarray,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    out: torch.Tensor, fmt: QFormat | None = None, clamp: tuple[int, int] | None = None,
) -> int:
    """Write the depthwise convolution of ``codes`` (N, C, H, W, channels-last float32/float64 CPU integer
    codes) into ``out`` (N, C, OH, OW, channels-last): ``weight`` (KH, KW, C) float64 integer codes,
    ``scale`` and ``bias`` (C,) float64 per channel. With ``fmt``: as codes of ``fmt`` clamped to ``clamp``
    (round half to even, saturate) and returns the number that overflowed; else as values, returns 0."""
    follow_torch_threads()
    x = codes.detach().permute(0, 2, 3, 1).numpy()  # channels-last: (N, H, W, C), C-contiguous
    y = out.permute(0, 2, 3, 1).numpy()
    bounds = (y.dtype.type(0),) * 4  # low, high, clamp_low, clamp_high in the codes' dtype (unused unless fmt)
    if fmt is not None:
        bounds = tuple(loop_constants(y.dtype.type, (1.0, 0.0), (fmt, clamp))[2:])
    return int(_depthwise(x, weight, scale, bias, tuple(stride), tuple(padding), tuple(dilation), y, *bounds, fmt is not None))
