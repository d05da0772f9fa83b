"""The compiled (one-pass) rounding gives the same codes and overflow counts as the eager operations,
and both equal the integer reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import integer_reference as ref
from fxpsweep.backends import fused, rounding_loop
from fxpsweep.core.fixedpoint import QFormat
from fxpsweep.backends.fused import Rounder, byte_pieces, combine

ROUNDINGS = ["nearest_even", "nearest_up", "nearest_away", "floor", "toward_zero"]


def scaled_values(dtype: torch.dtype, n: int = 1 << 16) -> torch.Tensor:
    """Values times 2**F: ties (k + 1/2), near-ties, integers, out of range on both sides."""
    g = torch.Generator().manual_seed(0)
    halves = torch.randint(-300, 300, (n // 4,), generator=g).double() + 0.5
    near = halves + torch.tensor([1e-6, -1e-6]).repeat(n // 8)
    spread = (torch.rand(n // 2, generator=g, dtype=torch.float64) - 0.5) * 700
    values = torch.cat([halves, near, spread]).to(dtype)
    return values[torch.randperm(n, generator=g)].reshape(32, -1)


# Every pair of rounding, overflow rule and dtype once (each compiled variant costs seconds of compiling): each
# rounding with both rules and both dtypes, each rule with both dtypes.
COMPILED_CASES = [
    pytest.param(rounding, overflow, dtype, id=f"{rounding}-{overflow}-{str(dtype).removeprefix('torch.')}")
    for i, rounding in enumerate(ROUNDINGS) for j, overflow in enumerate(("saturate", "wrap"))
    for dtype in [(torch.float32, torch.float64)[(i + j) % 2]]
]


@pytest.mark.parametrize(("rounding", "overflow", "dtype"), COMPILED_CASES)
def test_compiled_rounding_equals_eager_and_the_reference(rounding: str, overflow: str, dtype: torch.dtype, monkeypatch) -> None:
    v = scaled_values(dtype)
    fmt = QFormat(9, 0, rounding, overflow)
    # The compiled pass, not rounding_loop's loops (which take the default rule on the CPU: test_rounding_loop.py).
    monkeypatch.setattr(rounding_loop, "supports", lambda *tensors: False)
    for clamp in (None, (0, 40)):  # a ReLU6-like reader: codes 0..40
        compiled = Rounder(fmt, torch.float32, clamp=clamp).round(v.clone())
        over_v = v.clone()  # written over where it is of the codes' dtype (float32)
        in_place = Rounder(fmt, torch.float32, clamp=clamp).round(over_v, in_place=True)
        assert (in_place[0].data_ptr() == over_v.data_ptr()) == (dtype == torch.float32)
        with monkeypatch.context() as eager_only:
            eager_only.setattr(fused, "COMPILE_MIN_ELEMENTS", 1 << 40)  # everything eager
            eager = Rounder(fmt, torch.float32, clamp=clamp).round(v.clone())
            eager_in_place = Rounder(fmt, torch.float32, clamp=clamp).round(v.clone(), in_place=True)
        assert torch.equal(compiled[0], eager[0]) and compiled[1] == eager[1]
        assert all(torch.equal(c[0], eager[0]) and c[1] == eager[1] for c in (in_place, eager_in_place))
        sample = slice(None, None, 16)  # the reference is slow: every 16th value (all kinds are interleaved)
        expected = np.array([
            ref.overflow_int(ref.round_fraction(ref.Fraction(float(x)), rounding), 9, overflow) for x in v.reshape(-1)[sample].tolist()
        ])
        codes = compiled[0].reshape(-1)[sample].numpy().astype(np.int64)
        np.testing.assert_array_equal(codes, np.clip(expected, *clamp) if clamp else expected)
    assert fused._Fused.broken is False  # the compiled path ran


def test_byte_pieces_and_combine_rebuild_the_codes() -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-(2**15), 2**15, (64, 2048), generator=g).float()
    for unsigned in (False, True):
        pieces, offset = byte_pieces(codes, 16, unsigned)
        values = [p.double() - 128 if unsigned else p.double() for p in pieces]
        rebuilt = combine(values, [1.0, 256.0], torch.full_like(codes, float(offset), dtype=torch.float64))
        assert torch.equal(rebuilt, codes.double())
        assert [p.dtype for p in pieces] == [torch.uint8 if unsigned else torch.int8] * 2


@pytest.mark.parametrize("rounding", ["nearest_even", "floor"])
def test_combine_and_round_in_one_pass_equals_combine_then_round(rounding: str, monkeypatch) -> None:
    """A kernel's terms summed and rounded in one compiled loop give the codes and overflow count of the
    float64 sum rounded afterwards, eager."""
    g = torch.Generator().manual_seed(2)
    shape = (4, 8, 48, 48)  # above COMPILE_MIN_ELEMENTS: the compiled path
    terms = [torch.randint(-(2**23), 2**23, shape, generator=g).float(), torch.randint(-(2**20), 2**20, shape, generator=g, dtype=torch.int32)]
    multipliers = [1.0, 256.0]
    offset = torch.randint(-(2**20), 2**20, (1, 8, 1, 1), generator=g).double()
    scale = 2.0 ** -torch.randint(15, 21, (1, 8, 1, 1), generator=g).double()  # per output channel, powers of two
    bias = torch.randint(-(2**10), 2**10, (1, 8, 1, 1), generator=g).double() / 2
    fmt = QFormat(12, 0, rounding, "saturate")
    one_pass = Rounder(fmt, torch.float32, clamp=(0, fmt.max_code)).combine_and_round(terms, multipliers, offset, scale, bias)
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 1 << 40)  # everything eager
    v = combine(terms, multipliers, offset, scale, bias)
    two_passes = Rounder(fmt, torch.float32, clamp=(0, fmt.max_code)).round(v)
    monkeypatch.undo()
    assert torch.equal(one_pass[0], two_passes[0]) and one_pass[1] == two_passes[1]
    assert 0 < two_passes[1] < v.numel()  # some values overflow, not all: the count is tested
    assert fused._Fused.broken is False


PIECES_CHECK = textwrap.dedent("""
    import torch
    from fxpsweep.backends.fused import _PIECES, COMPILE_MIN_ELEMENTS
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-2**15, 2**15, (4, COMPILE_MIN_ELEMENTS), generator=g, dtype=torch.int64)
    low, high = _PIECES(codes.float(), 2, False)  # the compiled pass
    # The integers' own remainder and floor division, not the pieces' float arithmetic:
    assert torch.equal(low.long() + 128, codes % 256), "low bytes"
    assert torch.equal(high.long(), codes.div(256, rounding_mode="floor")), "high pieces"
    print(torch.backends.cpu.get_cpu_capability())
""")


def test_a_compiled_pass_served_from_the_cache_to_narrower_vectors_is_exact(tmp_path) -> None:
    # Inductor's FX graph cache does not key CPU graphs by vector width: without fused._compile_options a
    # graph generated for AVX-512 and read by a process held to AVX2 (one cache folder for a cluster's
    # nodes) gave wrong pieces (torch 2.14.1). Where the machine has no AVX-512, the second process runs
    # scalar code: that the pieces stay exact is checked all the same.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("ATEN_CPU_CAPABILITY", None)
    narrower = "avx2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "default"
    for capability in (None, narrower):  # the first fills the cache, the second reads it
        run_env = env if capability is None else {**env, "ATEN_CPU_CAPABILITY": capability}
        done = subprocess.run([sys.executable, "-c", PIECES_CHECK], env=run_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == narrower.upper()  # the second process did run held to it
