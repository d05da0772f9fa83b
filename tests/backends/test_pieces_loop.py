"""The numba loop that cuts codes into 8-bit pieces gives the bytes of the integers' own arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxpsweep.backends import fused, pieces_loop, rounding_loop


def integer_pieces(codes: torch.Tensor, n: int, unsigned: bool) -> list[torch.Tensor]:
    """The pieces by int64 remainder and floor division (``fused._byte_pieces``' definition), as int64."""
    rest = codes.to(torch.int64)
    pieces = []
    for _ in range(n - 1):
        byte = torch.remainder(rest, 256)
        pieces.append(byte if unsigned else byte - 128)
        rest = torch.div(rest, 256, rounding_mode="floor")
    pieces.append(rest + 128 if unsigned else rest)
    return pieces


def layouts(codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """``codes`` (N, C, H, W) in the memory orders the kernels hand over."""
    return {
        "contiguous": codes,
        "channels_last": codes.contiguous(memory_format=torch.channels_last),
        # int8_mm's input: the padded codes seen as NHWC, a permuted view of NCHW memory
        "permuted": F.pad(codes, (1, 1, 1, 1)).permute(0, 2, 3, 1),
        "size-1 dims": codes[:1, :, :1].contiguous(memory_format=torch.channels_last),
    }


@pytest.mark.parametrize("bits", [8, 12, 16, 24, 32])
@pytest.mark.parametrize("images", [1, 24])  # 24: more values than SERIAL_UP_TO, shared among the threads
def test_pieces_equal_the_integers_pieces(bits: int, images: int) -> None:
    g = torch.Generator().manual_seed(bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    dtype = torch.float32 if bits <= 24 else torch.float64  # ops.code_dtype: float32 holds 24-bit codes
    codes = torch.randint(low, high + 1, (images, 48, 9, 9), generator=g, dtype=torch.int64)
    codes.view(-1)[:4] = torch.tensor([low, high, -1, 0])  # both ends, and the codes next to 0
    assert (images == 24) == (codes.numel() > pieces_loop.SERIAL_UP_TO)
    n = -(-bits // 8)
    for name, x in layouts(codes.to(dtype)).items():
        assert pieces_loop.supports(x, n), name
        for unsigned in (False, True):
            pieces = pieces_loop.byte_pieces(x, n, unsigned)
            expected = integer_pieces(x, n, unsigned)
            assert len(pieces) == n
            for got, want in zip(pieces, expected):
                assert got.dtype == (torch.uint8 if unsigned else torch.int8)
                assert got.shape == x.shape and got.stride() == x.stride(), name  # the codes' memory order
                assert torch.equal(got.to(torch.int64), want), (name, unsigned)
            offset = 128 * sum(256**i for i in range(n - 1)) if not unsigned else -128 * 256 ** (n - 1)
            rebuilt = sum(256**i * p.to(torch.int64) for i, p in enumerate(pieces)) + offset
            assert torch.equal(rebuilt, x.to(torch.int64)), name


def test_pieces_of_a_register_walked_with_prefetching() -> None:
    # More than rounding_loop.PREFETCH_FROM codes: two pieces in blocks, the next block's lines asked for.
    codes = torch.randint(-(2**15), 2**15, (17, 64, 32, 32), generator=torch.Generator().manual_seed(9))
    x = codes.float().contiguous(memory_format=torch.channels_last)
    assert x.numel() > rounding_loop.PREFETCH_FROM
    for unsigned in (False, True):
        for got, want in zip(pieces_loop.byte_pieces(x, 2, unsigned), integer_pieces(x, 2, unsigned)):
            assert torch.equal(got.to(torch.int64), want)


def test_byte_pieces_runs_the_loop_on_the_cpu_and_the_compiled_pass_elsewhere(monkeypatch) -> None:
    codes = torch.randint(-(2**15), 2**15, (4, 8, 40, 40), generator=torch.Generator().manual_seed(5)).float()
    calls = []
    real = pieces_loop.byte_pieces
    monkeypatch.setattr(pieces_loop, "byte_pieces", lambda *a: calls.append(1) or real(*a))
    by_loop, offset = fused.byte_pieces(codes, 16, unsigned=False)
    assert calls == [1] and offset == 128
    compiled = fused._PIECES(codes, 2, False)
    assert all(torch.equal(a, b) for a, b in zip(by_loop, compiled))


def test_what_the_loop_refuses() -> None:
    codes = torch.zeros(2, 3, 4, 4)
    assert not pieces_loop.supports(codes, 5)  # more than 32 bits: not an int32
    assert not pieces_loop.supports(codes.to(torch.int32), 2)
    assert not pieces_loop.supports(codes[:, :, ::2], 2)  # not dense: a slice with a step
    assert not pieces_loop.supports(codes[:0], 2)
    assert pieces_loop.supports(codes.permute(0, 2, 3, 1), 2) and pieces_loop.supports(codes.double(), 4)
