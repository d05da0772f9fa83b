"""GPTQ weight codes (``fxpsweep.engine.gptq``): against a plain re-derivation, and what they are for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxpsweep.engine.gptq import DAMPING, gptq_codes, input_hessian
from fxpsweep.backends.kernels import ConvGeometry


def obq_codes(weight: np.ndarray, x: np.ndarray, frac_bits: np.ndarray, total_bits: int) -> np.ndarray:
    """One row at a time, one column at a time, with the inverse Hessian updated after every column
    (Optimal Brain Quantization's update; no Cholesky, no blocks). ``weight``: (rows, K); ``x``: (K, samples)."""
    h = x @ x.T
    diag = np.diag(h).copy()
    diag[diag == 0] = 1.0
    h[np.diag_indices_from(h)] = diag + DAMPING * diag.mean()
    lo, hi = -(2 ** (total_bits - 1)), 2 ** (total_bits - 1) - 1
    codes = np.zeros_like(weight)
    for r in range(len(weight)):
        w, h_inv, scale = weight[r].copy(), np.linalg.inv(h), 2.0 ** frac_bits[r]
        for k in range(len(w)):
            codes[r, k] = np.clip(np.round(w[k] * scale), lo, hi)
            error = (w[k] - codes[r, k] / scale) / h_inv[k, k]
            w -= error * h_inv[:, k]  # w[k] becomes its code's value; the later weights make up for it
            h_inv -= np.outer(h_inv[:, k], h_inv[k, :]) / h_inv[k, k]
    return codes


def output_error(weight: torch.Tensor, codes: torch.Tensor, frac_bits: torch.Tensor, x: torch.Tensor) -> float:
    values = codes * torch.pow(2.0, -frac_bits.double())[:, None]
    return float(((weight.double() - values) @ x.double()).pow(2).sum())


@pytest.mark.parametrize("seed", range(4))
def test_codes_equal_a_column_by_column_rederivation(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k, rows, samples = 300, 6, 200  # K > BLOCK: the lazy block update is exercised
    mixing = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5  # correlated inputs, as in a network
    x = mixing @ torch.randn(k, samples, generator=g, dtype=torch.float64)
    weight = torch.randn(rows, k, generator=g, dtype=torch.float64) * 0.1
    frac_bits = torch.tensor([4, 5, 6, 4, 5, 3])
    codes = gptq_codes(weight, (x @ x.T)[None], frac_bits, 5, "nearest_even")
    expected = obq_codes(weight.numpy(), x.numpy(), frac_bits.numpy(), 5)
    np.testing.assert_array_equal(codes.numpy(), expected)


def test_codes_keep_the_layer_output_closer_than_rounding_each_weight() -> None:
    g = torch.Generator().manual_seed(0)
    k, rows = 64, 16
    mixing = torch.randn(k, k, generator=g) / k**0.5
    seen, unseen = (mixing @ torch.randn(k, n, generator=g) for n in (2000, 2000))
    weight = torch.randn(rows, k, generator=g) * 0.2
    frac_bits = torch.full((rows,), 3)
    codes = gptq_codes(weight, input_hessian(seen.T, ConvGeometry(is_linear=True), (1, 1)), frac_bits, 4, "nearest_even")
    rounded = (weight.double() * 8).round().clamp(-8, 7)
    assert codes.abs().max() <= 8 and torch.equal(codes, codes.round())
    # On inputs GPTQ did not see, from the same distribution.
    assert output_error(weight, codes, frac_bits, unseen) < 0.7 * output_error(weight, rounded, frac_bits, unseen)


def test_a_convolution_hessian_is_that_of_its_im2col_columns_per_group() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 7, 9, generator=g, dtype=torch.float64)
    geometry = ConvGeometry(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=3)
    hessian = input_hessian(x, geometry, (3, 2))
    cols = F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))  # (N, 6*3*2, L)
    for group in range(3):
        part = cols[:, group * 12 : (group + 1) * 12].transpose(0, 1).reshape(12, -1)
        torch.testing.assert_close(hessian[group], part @ part.T)
