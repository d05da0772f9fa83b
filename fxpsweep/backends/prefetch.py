"""Software prefetch for numba's loops: ask the processor for memory a loop reads a few kilobytes later.

A register that a convolution has just written comes back from memory, not
the caches, when its rounding pass reads it. The pass does about ten vector
instructions per 16 values where a clamp does two, and while it computes, the
processor asks for too few cache lines ahead to keep memory busy; asking for
the next block's lines before each block keeps it busy (``rounding_loop``
does so on registers larger than a core's L2 cache). A prefetch is a hint: it
changes no value.
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LINE_VALUES = 16  # float32 values per 64-byte cache line (float64 arrays are asked for every other line: enough)


@intrinsic
def _prefetch_value(typingctx, array, index):  # pragma: no cover (compiled)
    """``llvm.prefetch`` of ``array[index]``'s cache line, for writing, into every cache level."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0"
        )
        # rw 1: the loops write what they read (in place); locality 3: keep it; 1: data, not instructions.
        builder.call(hint, [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@numba.njit(inline="always")
def prefetch_range(array, start, stop):  # pragma: no cover (compiled)
    """Ask for the cache lines of ``array[start:stop]`` (indices clipped to the array)."""
    for i in range(max(start, 0), min(stop, array.size), LINE_VALUES):
        _prefetch_value(array, i)
