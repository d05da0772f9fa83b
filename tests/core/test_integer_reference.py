"""The integer reference's array form agrees with its per-integer form (plain Python ints)."""

from __future__ import annotations

import numpy as np
import pytest

from integer_reference import overflow_array, overflow_int


@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
@pytest.mark.parametrize("total_bits", [2, 3, 8, 16, 31, 32])
def test_overflow_of_an_array_is_the_overflow_of_each_integer(total_bits: int, overflow: str) -> None:
    rng = np.random.default_rng(total_bits)
    k = np.concatenate([rng.integers(-2**40, 2**40, 2000), rng.integers(-2**total_bits, 2**total_bits, 2000),
                        [-(2**62), 2**62, 0, -1, 2 ** (total_bits - 1), -(2 ** (total_bits - 1)) - 1]]).astype(np.int64)
    expected = np.array([overflow_int(int(v), total_bits, overflow) for v in k], dtype=np.int64)
    np.testing.assert_array_equal(overflow_array(k, total_bits, overflow), expected)
