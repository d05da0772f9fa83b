"""The max rule for fractional lengths, on hand-computed cases."""

from __future__ import annotations

import pytest

from fxpsweep.calibration import frac_bits_for_max


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
