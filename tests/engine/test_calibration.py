"""Calibration methods for fractional lengths, on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from fxpsweep.engine.calibration import TensorStats, choose_frac_bits, frac_bits_for_max
from fxpsweep.core.errors import ConfigError


@pytest.mark.parametrize(
    ("max_abs", "total_bits", "expected"),
    [
        (1.0, 8, 6),  # Q(8,6) tops at 127/64 = 1.98; Q(8,7) at 127/128 < 1
        (0.5, 8, 7),  # 127/128 >= 0.5, 127/256 < 0.5
        (127.0, 8, 0),
        (128.0, 8, -1),  # needs an LSB of 2
        (0.001, 4, 12),  # 7/4096 = 0.0017 >= 0.001; 7/8192 < 0.001
        (3.0, 2, -2),  # Q(2,-2) tops at 1*4 = 4
        (0.0, 8, 0),  # all zero: any F is exact
    ],
)
def test_frac_bits_for_max(max_abs: float, total_bits: int, expected: int) -> None:
    assert frac_bits_for_max(max_abs, total_bits) == expected


def _stats(values: list[float]) -> TensorStats:
    t = torch.tensor(values)
    return TensorStats(float(t.abs().max()), t)


def test_overflow_rate_lets_the_outlier_saturate() -> None:
    # 1000 values of magnitude 0.5 and one of 100, in 8 bits.
    stats = _stats([0.5] * 500 + [-0.5] * 500 + [100.0])
    assert choose_frac_bits("max", stats, 8, "nearest_even", "saturate", 0.0) == 0  # holds 100
    assert choose_frac_bits("overflow_rate", stats, 8, "nearest_even", "saturate", 0.0) == 0  # rate 0 is max
    # 1 % may saturate: the 0.1 % outlier does, and F holds 0.5 (127/128 >= 0.5 > 127/256).
    assert choose_frac_bits("overflow_rate", stats, 8, "nearest_even", "saturate", 0.01) == 7


def test_mse_trades_rounding_error_against_clipping() -> None:
    # 100000 values of 0.3 and one of 100, in 8 bits. Squared error by F:
    # F=0: 0.3 -> 0, 0.09 each: 9000.   F=1: 0.3 -> 0.5: 4000, 100 -> 63.5: 1332.25; 5332.25.
    # F=2: 0.3 -> 0.25: 250, 100 -> 31.75: 4658.06; 4908.06 (least).   F=3: 250 + 7077.0.
    stats = _stats([0.3] * 100000 + [100.0])
    assert choose_frac_bits("max", stats, 8, "nearest_even", "saturate", 0.0) == 0
    assert choose_frac_bits("mse", stats, 8, "nearest_even", "saturate", 0.0) == 2


def test_unknown_method_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="max, overflow_rate, mse"):
        choose_frac_bits("kl", _stats([1.0]), 8, "nearest_even", "saturate", 0.0)
