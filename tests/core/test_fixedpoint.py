"""quantize against hand-computed values and against the independent integer reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpsweep.core.errors import ConfigError
from fxpsweep.core.fixedpoint import OVERFLOW_MODES, ROUNDING_MODES, quantize, quantize_codes
from integer_reference import quantize_code

TIES = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])


@pytest.mark.parametrize(
    ("rounding", "expected"),
    [
        ("nearest_even", [-2, -2, 0, 0, 2, 2]),
        ("nearest_up", [-2, -1, 0, 1, 2, 3]),
        ("nearest_away", [-3, -2, -1, 1, 2, 3]),
        ("floor", [-3, -2, -1, 0, 1, 2]),
        ("toward_zero", [-2, -1, 0, 0, 1, 2]),
    ],
)
def test_rounding_modes_on_ties(rounding: str, expected: list[int]) -> None:
    # Q(8, 0): LSB 1, so each tie sits exactly between two codes.
    assert quantize_codes(TIES, 8, 0, rounding).tolist() == expected


def test_hand_computed_q8_4() -> None:
    # Q(8,4): LSB 1/16, range [-8, 7.9375].
    x = torch.tensor([0.1, -0.1, 3.14159, 7.96, 100.0, -8.0, -8.04, -100.0])
    # 0.1*16 = 1.6 -> 2; 3.14159*16 = 50.27 -> 50; 7.96*16 = 127.36 -> 127; beyond the range: clamp.
    assert quantize_codes(x, 8, 4).tolist() == [2, -2, 50, 127, 127, -128, -128, -128]
    assert quantize(x, 8, 4).tolist() == [0.125, -0.125, 3.125, 7.9375, 7.9375, -8.0, -8.0, -8.0]


def test_wrap_keeps_low_bits() -> None:
    # Q(4,0): codes -8..7. 8 wraps to -8, 9 to -7, -9 to 7, 16 to 0, 23 to 7.
    x = torch.tensor([7.0, 8.0, 9.0, -9.0, 16.0, 23.0, -8.0])
    assert quantize_codes(x, 4, 0, overflow="wrap").tolist() == [7, -8, -7, 7, 0, 7, -8]


def test_negative_and_large_frac_bits() -> None:
    # Q(4,-2): LSB 4, values -32..28. Q(4,6): LSB 1/64, values -0.125..0.109375.
    assert quantize(torch.tensor([13.0, 14.0, 100.0]), 4, -2).tolist() == [12.0, 16.0, 28.0]
    assert quantize(torch.tensor([0.05, 1.0]), 4, 6).tolist() == [0.046875, 0.109375]


def test_two_bit_and_thirty_two_bit_words() -> None:
    assert quantize_codes(torch.tensor([-5.0, -1.0, 0.4, 0.6, 5.0]), 2, 0).tolist() == [-2, -1, 0, 1, 1]
    big = torch.tensor([2.0**31, -(2.0**31) - 1, 2.0**31 - 1], dtype=torch.float64)
    assert quantize_codes(big, 32, 0).tolist() == [2**31 - 1, -(2**31), 2**31 - 1]
    assert quantize_codes(big, 32, 0, overflow="wrap").tolist() == [-(2**31), 2**31 - 1, 2**31 - 1]


def test_non_finite_convention() -> None:
    x = torch.tensor([float("nan"), float("inf"), float("-inf")])
    for overflow in OVERFLOW_MODES:
        assert quantize_codes(x, 8, 3, overflow=overflow).tolist() == [0, 127, -128]


def test_result_dtype_is_exact() -> None:
    x = torch.tensor([1.0 / 3.0])
    assert quantize(x, 16, 8).dtype == torch.float32  # 16-bit codes are exact in float32
    assert quantize(x, 32, 30).dtype == torch.float64  # 32-bit codes are not
    assert quantize(x, 32, 30).item() == round(x.item() * 2**30) / 2**30


def test_stochastic_is_seeded_and_unbiased() -> None:
    x = torch.full((20000,), 0.25)
    a = quantize_codes(x, 8, 0, "stochastic", generator=torch.Generator().manual_seed(1))
    b = quantize_codes(x, 8, 0, "stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert set(a.tolist()) == {0, 1}
    assert abs(a.double().mean().item() - 0.25) < 0.02


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_bits": 1, "frac_bits": 0}, "from 2 to 32"),
        ({"total_bits": 33, "frac_bits": 0}, "from 2 to 32"),
        ({"total_bits": 8, "frac_bits": 0, "rounding": "round"}, "nearest_even, nearest_up"),
        ({"total_bits": 8, "frac_bits": 0, "overflow": "clip"}, "saturate, wrap"),
        ({"total_bits": 8, "frac_bits": 1.5}, "frac_bits=1.5"),
    ],
)
def test_bad_formats_name_the_allowed_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        quantize_codes(torch.zeros(1), **kwargs)


finite_or_not = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e6, max_value=1e6, width=32),
    st.integers(-(2**20), 2**20).map(lambda i: i / 8),  # many exact ties
)


@settings(max_examples=300, deadline=None)
@given(
    xs=st.lists(finite_or_not, min_size=1, max_size=40),
    total_bits=st.integers(2, 32),
    frac_bits=st.integers(-40, 60),
    rounding=st.sampled_from([m for m in ROUNDING_MODES if m != "stochastic"]),
    overflow=st.sampled_from(OVERFLOW_MODES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_quantize_equals_integer_reference(xs, total_bits, frac_bits, rounding, overflow, dtype) -> None:
    x = torch.tensor(xs, dtype=dtype)
    got = quantize_codes(x, total_bits, frac_bits, rounding, overflow).tolist()
    expected = [quantize_code(v, total_bits, frac_bits, rounding, overflow) for v in x.tolist()]
    assert got == expected
    real = quantize(x, total_bits, frac_bits, rounding, overflow).tolist()
    assert real == [k * 2.0**-frac_bits for k in expected]


@settings(max_examples=100, deadline=None)
@given(
    xs=st.lists(st.floats(min_value=-1e4, max_value=1e4, width=32), min_size=1, max_size=40),
    total_bits=st.integers(2, 32),
    frac_bits=st.integers(-8, 30),
    overflow=st.sampled_from(OVERFLOW_MODES),
    seed=st.integers(0, 2**31),
)
def test_stochastic_equals_integer_reference(xs, total_bits, frac_bits, overflow, seed) -> None:
    x = torch.tensor(xs, dtype=torch.float32)
    got = quantize_codes(x, total_bits, frac_bits, "stochastic", overflow, torch.Generator().manual_seed(seed))
    # The documented draw: one float64 uniform per element from the given generator, in element order.
    draws = torch.rand(len(xs), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    expected = [quantize_code(v, total_bits, frac_bits, "stochastic", overflow, u) for v, u in zip(x.tolist(), draws)]
    assert got.tolist() == expected
    assert not any(math.isnan(v) for v in got.double().tolist())
