"""The pass that cuts codes into 8-bit pieces (``fused.byte_pieces``) gives the bytes of the integers' own arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxpsweep.backends import fused


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


# 1 image: the eager pass; 24: more values than fused.COMPILE_MIN_ELEMENTS, the compiled pass (2 pieces of float32
# codes, 4 of float64 ones; each width compiles afresh).
@pytest.mark.parametrize(("bits", "images"), [(8, 1), (12, 1), (16, 1), (24, 1), (32, 1), (16, 24), (32, 24)])
def test_pieces_equal_the_integers_pieces(bits: int, images: int) -> None:
    g = torch.Generator().manual_seed(bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    dtype = torch.float32 if bits <= 24 else torch.float64  # ops.code_dtype: float32 holds 24-bit codes
    codes = torch.randint(low, high + 1, (images, 48, 9, 9), generator=g, dtype=torch.int64)
    codes.view(-1)[:4] = torch.tensor([low, high, -1, 0])  # both ends, and the codes next to 0
    assert (images == 24) == (codes.numel() >= fused.COMPILE_MIN_ELEMENTS)
    n = -(-bits // 8)
    for name, x in layouts(codes.to(dtype)).items():
        for unsigned in (False, True):
            pieces, offset = fused.byte_pieces(x, bits, unsigned)
            expected = integer_pieces(x, n, unsigned)
            assert len(pieces) == n and offset == 128 * sum(256**i for i in range(n - 1))
            for got, want in zip(pieces, expected):
                assert got.dtype == (torch.uint8 if unsigned else torch.int8)
                assert got.shape == x.shape, name
                assert torch.equal(got.to(torch.int64), want), (name, unsigned)
            offset = 128 * sum(256**i for i in range(n - 1)) if not unsigned else -128 * 256 ** (n - 1)
            rebuilt = sum(256**i * p.to(torch.int64) for i, p in enumerate(pieces)) + offset
            assert torch.equal(rebuilt, x.to(torch.int64)), name
