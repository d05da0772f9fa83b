"""GPTQ: weight codes chosen in sequence, each making up for the rounding error of those before it.

Rounding every weight to its nearest code minimises each weight's own error,
not the error of the layer's output. GPTQ (Frantar, Ashkboos, Hoefler and
Alistarh 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", after Optimal Brain Quantization) rounds one input
column at a time and shifts the weights not yet rounded so that the output on
the calibration inputs changes least: for a row ``w`` and inputs ``X``
(columns = input positions), it minimises ``||w X - q X||**2`` greedily, using
the inverse of ``H = X X^T``. The formats (F per output channel) are chosen
before, as for plain rounding; only which code each weight gets changes, so
the datapath and everything that checks it stay the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpsweep.core.fixedpoint import apply_overflow, reproducible, round_to_integer
from fxpsweep.backends.kernels import ConvGeometry

# Added to H's diagonal, as a fraction of its mean: keeps H invertible where
# the calibration inputs span fewer directions than a row has weights.
DAMPING = 0.01
# Columns rounded between two whole-matrix updates (the paper's lazy batch).
BLOCK = 128
# Images unfolded at once for a convolution's H (bounds the im2col memory).
IMAGES_PER_STEP = 4


def input_hessian(x: torch.Tensor, geometry: ConvGeometry, kernel_size: tuple[int, int]) -> torch.Tensor:
    """``H = X X^T`` per group, float64, ``(groups, K, K)``; ``x``: the layer's input (any real scale).

    ``K`` is a row's weight count (``Cin/groups * kh * kw``, in the order of
    ``weight.reshape(Cout, -1)``; ``Cin`` for a linear layer). The scale of
    ``x`` does not matter: GPTQ's choice is the same for ``c * H``.
    """
    x = x.detach().double()
    if geometry.is_linear:
        x = x.reshape(len(x), -1)
        return (x.T @ x)[None]
    groups = geometry.groups
    hessian = None
    for start in range(0, len(x), IMAGES_PER_STEP):
        cols = F.unfold(x[start : start + IMAGES_PER_STEP], kernel_size, geometry.dilation, geometry.padding, geometry.stride)
        cols = cols.reshape(cols.shape[0], groups, cols.shape[1] // groups, cols.shape[2])
        part = torch.einsum("ngkl,ngml->gkm", cols, cols)
        hessian = part if hessian is None else hessian + part
    return hessian


def gptq_codes(
    weight: torch.Tensor, hessian: torch.Tensor, frac_bits: torch.Tensor, total_bits: int, rounding: str
) -> torch.Tensor:
    """Integer weight codes (float64, ``weight``'s shape) chosen by GPTQ.

    ``weight``: ``(Cout, ...)`` real values; ``hessian``: ``(groups, K, K)``
    from ``input_hessian``; ``frac_bits``: F per output channel; every code in
    ``[-2**(total_bits-1), 2**(total_bits-1) - 1]``, rounded by ``rounding``
    (``stochastic`` as ``nearest_even``: the choice must be reproducible).
    """
    groups, k_len, _ = hessian.shape
    cout = weight.shape[0]
    w = weight.detach().double().reshape(groups, cout // groups, k_len).clone()
    scale = torch.pow(2.0, frac_bits.double()).reshape(groups, cout // groups, 1)
    mode = reproducible(rounding)

    h = hessian.double().clone()
    diag = h.diagonal(dim1=1, dim2=2)
    diag[diag == 0] = 1.0  # an input that is always zero: its weights change nothing
    diag += DAMPING * diag.mean(1, keepdim=True)
    # The upper Cholesky factor of H^-1 holds, row by row, what each rounding error is spread over.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.empty_like(w)
    for b0 in range(0, k_len, BLOCK):
        b1 = min(b0 + BLOCK, k_len)
        block = w[:, :, b0:b1].clone()
        errors = torch.empty_like(block)
        for k in range(b1 - b0):
            column = block[:, :, k]
            c = apply_overflow(round_to_integer(column * scale[:, :, 0], mode), total_bits, "saturate")
            codes[:, :, b0 + k] = c
            error = (column - c / scale[:, :, 0]) / u[:, b0 + k, b0 + k, None]
            block[:, :, k:] -= error[:, :, None] * u[:, None, b0 + k, b0 + k : b1]
            errors[:, :, k] = error
        w[:, :, b1:] -= errors @ u[:, b0:b1, b1:]
    return codes.reshape(weight.shape)
