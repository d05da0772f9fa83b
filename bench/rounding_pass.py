"""What a register's rounding pass costs, loop against compiled pass: the overflow count that bounded the engine.

    python bench/rounding_pass.py [--model mobilenet_v2] [--bits 8] [--arithmetic exact] [--batch 32] [--threads 2]

Every register's codes come out of one pass: round, count the values outside
the format, clamp, store. The engine runs it as a hand-written loop
(``fxpsweep/backends/rounding_loop.py``, numba) where the format allows, and
otherwise as a torch.compile'd pass (``fused.py``), whose CPU code generator
writes the count as a loop of its own before the loop that stores the codes,
so that pass reads the register twice.

Part 1, on the largest register of the model (its real values, captured
during a forward pass): the loop, the loop without its prefetching (below),
the compiled pass, the same compiled pass without the count, a float32 ReLU6
(``clamp_``, what float32 inference spends on that register) and one read
(``sum``); each on a fresh copy of the
register, whose time is given and subtracted. Part 2: images/s of float32
(BatchNorm folded, channels-last, the baseline of ``throughput.py``), of the
network as the engine runs it (the loops), of the same network with the
loops' prefetching off, on the compiled passes, and on the compiled passes
without the count (codes checked equal; counts not kept), timed in turn,
best of five rounds. The loops ask for the cache lines of the next 2 KiB
block before each on registers of more than ``rounding_loop.PREFETCH_FROM``
values; "prefetching off" raises that threshold above every register.
Part 3: every pass of ``rounding_loop`` over a register in one forward of
the network as the engine runs it (each register, the network input and
the residual adds; not the rounding inside a kernel, of its terms or in the
depthwise loop, which belongs to the kernel's time), each
timed again on a fresh copy of what it read, beside float32's own pass
there (a ReLU or ReLU6 that reads the register: ``clamp_``; a residual add:
``add_``; none over the input and the other registers), and the sums: what
the element-wise work of the engine costs against float32's.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from throughput import INPUT_SIZE, ChannelsLast, best_images_per_second, fxpsweep_network, random_model, setup_note
from torch.fx.experimental.optimization import fuse

from fxpsweep.backends import fused, rounding_loop
from fxpsweep.core.fixedpoint import QFormat, round_to_integer
from fxpsweep.backends.host_memory import freed_memory_kept
from fxpsweep.backends.kernel_choice import processor_name


def _round_into_uncounted(v, lo, hi, clamp_lo, clamp_hi, rounding, overflow, total_bits, dtype):
    """``fused._round_overflow_into`` without the count (saturation only): the codes, no statistics."""
    v.copy_(torch.clamp(round_to_integer(v, rounding), clamp_lo, clamp_hi).to(dtype))
    return torch.zeros((), dtype=torch.int64)


COUNTED = fused._ROUND_INTO
UNCOUNTED = fused._Fused(_round_into_uncounted)


def loop_pass(v, lo, hi, clamp_lo, clamp_hi, rounding, overflow, total_bits, dtype):
    """The engine's loop, called as the compiled pass is (same arguments)."""
    fmt = QFormat(total_bits, 0, rounding, overflow)
    return rounding_loop.round_into(v, v, fmt, (int(clamp_lo), int(clamp_hi)))


def best_ms(run: Callable[[], object], rounds: int = 7) -> float:
    seconds = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds * 1e3


@contextlib.contextmanager
def unprefetched() -> Iterator[None]:
    """While the block runs, the loops prefetch on no register."""
    threshold = rounding_loop.PREFETCH_FROM
    rounding_loop.PREFETCH_FROM = math.inf
    try:
        yield
    finally:
        rounding_loop.PREFETCH_FROM = threshold


def loop_pass_unprefetched(*args):
    """``loop_pass`` with the loops' prefetching off."""
    with unprefetched():
        return loop_pass(*args)


@contextlib.contextmanager
def compiled_rounding(fn: Callable) -> Iterator[None]:
    """While the block runs, every rounding pass is compiled (the loops left out), the in-place one ``fn``
    (the compiled pass's arguments)."""
    fused._ROUND_INTO = fn
    supports = rounding_loop.supports
    rounding_loop.supports = lambda *args: False
    try:
        yield
    finally:
        fused._ROUND_INTO = COUNTED
        rounding_loop.supports = supports


def largest_register(net: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """A copy of the largest tensor the network rounds in place, and the other arguments of that pass."""
    seen: dict[str, tuple] = {}

    def spy(v, *args):
        if "v" not in seen or v.numel() > seen["v"][0].numel():
            seen["v"] = (v.clone(), args)
        return COUNTED(v, *args)

    with compiled_rounding(spy), torch.no_grad():
        net(batch)
    return seen["v"]


def pass_costs(register: torch.Tensor, args: tuple) -> list[tuple[str, float]]:
    """(what, ms) of each pass over a fresh copy of ``register``, the copy's own time subtracted."""
    work = register.clone()
    fresh = lambda: work.copy_(register)  # noqa: E731
    passes = {
        "engine's loop: round, count, clamp (numba)": lambda: loop_pass(fresh(), *args),
        "the same loop, prefetching off": lambda: loop_pass_unprefetched(fresh(), *args),
        "compiled pass: round, count, clamp (torch.compile)": lambda: COUNTED(fresh(), *args),
        "the same without the count (compiled)": lambda: UNCOUNTED(fresh(), *args),
        "float32 ReLU6 (clamp_, eager)": lambda: fresh().clamp_(0, 6),
        "one read (sum, eager)": lambda: fresh().sum(),
    }
    for run in passes.values():
        run()  # compile, warm up
    copy_ms = best_ms(fresh)
    return [("copy of the register (subtracted below)", copy_ms)] + [(k, best_ms(v) - copy_ms) for k, v in passes.items()]


def every_pass(net: torch.nn.Module, batch: torch.Tensor) -> list[tuple[str, torch.Tensor, Callable, Callable | None, str]]:
    """(what, input copy, the pass on a tensor like it, float32's pass there or None, its name) of each loop
    pass in one forward of ``net``: ``rounding_loop``'s passes over a register (float32's counterpart a
    ReLU6, ``clamp_``, where a ReLU or ReLU6 reads it: its lowest code 0) and over a residual add (``add_``)."""
    passes = []
    run, then_add = rounding_loop._run, rounding_loop.round_then_add

    def spy_run(loop, fmt, clamp, a, out, scale_a=1.0, b=None, scale_b=0.0):
        other = b.clone() if b is not None else None
        redo = lambda t: run(loop, fmt, clamp, t, t if out is a else torch.empty_like(t), scale_a, other, scale_b)  # noqa: E731
        what = {0: "scaled register", 1: "register into a new tensor", 2: "residual add", 3: "register"}[loop]
        if loop == 2:
            float32 = (lambda t: t.add_(other), "add_")  # noqa: E731
        else:
            float32 = (lambda t: t.clamp_(0, 6), "clamp_") if clamp[0] == 0 else (None, "none")  # noqa: E731
        passes.append((f"{what} {tuple(a.shape)}", a.clone(), redo, *float32))
        return run(loop, fmt, clamp, a, out, scale_a, b, scale_b)

    def spy_then_add(v, fmt, clamp, scale_k, b, scale_b, add_fmt, add_clamp):
        other = b.clone()
        redo = lambda t: then_add(t, fmt, clamp, scale_k, other, scale_b, add_fmt, add_clamp)  # noqa: E731
        passes.append((f"register and its residual add {tuple(v.shape)}", v.clone(), redo, lambda t: t.add_(other), "add_"))
        return then_add(v, fmt, clamp, scale_k, b, scale_b, add_fmt, add_clamp)

    rounding_loop._run, rounding_loop.round_then_add = spy_run, spy_then_add
    try:
        with torch.no_grad():
            net(batch)
    finally:
        rounding_loop._run, rounding_loop.round_then_add = run, then_add
    return passes


def per_pass_costs(passes) -> None:
    """Print Part 3's table: each pass and float32's there, on a fresh copy of its input (the copy's time
    subtracted), and their sums."""
    print("| pass | values | loop ms | float32's pass | float32 ms |\n|---|---:|---:|---|---:|")
    loops = both_loops = both_float32 = 0.0
    shared = 0
    for what, values, redo, float32, name in passes:
        work = values.clone()
        fresh = lambda: work.copy_(values)  # noqa: E731
        copy_ms = best_ms(fresh)
        loop_ms = best_ms(lambda: redo(fresh())) - copy_ms
        loops += loop_ms
        float32_ms = ""
        if float32 is not None:
            ms = best_ms(lambda: float32(fresh())) - copy_ms
            both_loops, both_float32, shared = both_loops + loop_ms, both_float32 + ms, shared + 1
            float32_ms = f"{ms:.3f}"
        print(f"| {what} | {values.numel()} | {loop_ms:.3f} | {name} | {float32_ms} |")
    print(f"\nSums: the loops {loops:.1f} ms over {len(passes)} passes; over the {shared} passes float32 makes "
          f"too, the loops {both_loops:.1f} ms against float32's {both_float32:.1f} ms.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--arithmetic", default="exact")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc malloc keeps freed memory for reuse, as a job on the CPU does while it runs (device.keep_freed_memory)")
    args = parser.parse_args()
    with freed_memory_kept(args.keep_freed_memory) as kept:
        report(args, kept)


def report(args: argparse.Namespace, kept: bool) -> None:
    """Measure and print (``main``'s arguments; ``kept``: whether freed host memory is kept for reuse)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = INPUT_SIZE.get(args.model, 224)
    batch = torch.randn(args.batch, 3, size, size)
    model = random_model(args.model)
    baseline = ChannelsLast(fuse(model))
    net = fxpsweep_network(model, batch, args.bits, args.arithmetic)
    register, pass_args = largest_register(net, batch)
    print(f"# {args.model}, {args.bits}-bit {args.arithmetic}, batch {args.batch}, {args.threads} threads, "
          f"{processor_name()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{setup_note(kept)}\n")
    print(f"Part 1: the largest register, {tuple(register.shape)} {register.dtype} "
          f"({register.numel() * register.element_size() / 2**20:.0f} MiB).\n")
    print("| pass | ms |\n|---|---:|")
    for what, ms in pass_costs(register, pass_args):
        print(f"| {what} | {ms:.1f} |")

    def network(rounding: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with compiled_rounding(rounding):
                return net(x)
        return run

    def no_prefetch(x: torch.Tensor) -> torch.Tensor:
        with unprefetched():
            return net(x)

    configurations = {
        "float32, folded, channels-last": baseline,
        "fxpsweep (the loops)": net,
        "fxpsweep (the loops), prefetching off": no_prefetch,
        "fxpsweep on compiled passes": network(COUNTED),
        "fxpsweep on compiled passes, overflow count left out": network(UNCOUNTED),
    }
    with torch.no_grad():
        outputs = [run(batch) for run in list(configurations.values())[1:]]
    same = all(torch.equal(outputs[0], out) for out in outputs[1:])
    per_second = best_images_per_second(configurations, batch, rounds=5)  # in turn: a disturbance hits all alike
    print(f"\nPart 2: one batch, best of five rounds; outputs of the fxpsweep runs equal: {same}.\n")
    print("| configuration | ms a batch | images/s | x float32 |\n|---|---:|---:|---:|")
    reference = per_second["float32, folded, channels-last"]
    for name, ips in per_second.items():
        print(f"| {name} | {args.batch / ips * 1e3:.0f} | {ips:.1f} | {ips / reference:.2f} |")
    print("\nPart 3: every pass of the loops over a register in one batch, each timed alone (best of seven) on a fresh copy of "
          "what it read (the copy's time subtracted), beside float32's own pass there (ReLU6: clamp_; residual add: add_).\n")
    per_pass_costs(every_pass(net, batch))

if __name__ == "__main__":
    main()
