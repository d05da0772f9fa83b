"""cocotb test of rtl/tb_fxp_linear.v: every output the simulator computes from the golden vectors'
.mem files equals the exported output code (EXPECTED_MEM, a .mem file), bit for bit."""

from __future__ import annotations

import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge


def read_mem(path: str, bits: int) -> list[int]:
    """Signed codes of a .mem file: one two's-complement hex word per line, ``//`` comments skipped."""
    words = [line.strip() for line in open(path) if line.strip() and not line.startswith("//")]
    return [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in (int(w, 16) for w in words)]


@cocotb.test()
async def outputs_equal_the_golden_vectors(dut) -> None:
    expected = read_mem(os.environ["EXPECTED_MEM"], int(os.environ["W_OUT"]))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.start.value = 1
    got: dict[int, int] = {}
    while True:
        await FallingEdge(dut.clk)  # between edges: every register and the output settled
        if dut.output_valid.value:
            got[int(dut.output_index.value)] = dut.y.value.to_signed()
        if dut.done.value:
            break
        await RisingEdge(dut.clk)
    assert sorted(got) == list(range(len(expected))), f"{len(got)} outputs for {len(expected)} expected"
    wrong = [(i, got[i], e) for i, e in enumerate(expected) if got[i] != e]
    assert not wrong, f"{len(wrong)} of {len(expected)} outputs differ; first: output {wrong[0][0]} is {wrong[0][1]}, expected {wrong[0][2]}"
