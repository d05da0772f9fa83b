"""Where the time of one fxpsweep configuration goes: a profile per operator, beside float32's, in one run.

    python bench/profile_engine.py [--model resnet18] [--bits 16] [--arithmetic exact] [--batch 32] [--threads 2]

The model and its calibration are those of ``throughput.py``. After a warm-up
batch (kernel choices, compiled rounding), the fixed-point network and float32
(BatchNorm folded, channels-last: the baseline of ``throughput.py``) are timed
(best of three batches), then one batch of each runs under ``torch.profiler``.
The table lists the operators of both by self CPU time (milliseconds of the
calling thread, each operator's worker threads included), so a missed target
names what bounds it: the integer or float convolutions and GEMMs (the
kernels), the element-wise passes (fxpsweep's rounding of each register,
float32's ReLU and adds), or the rest. The profiler sees torch operators only,
so fxpsweep's numba loops are recorded here under names of their own
(``numba: ...``); "outside operators" is the profiled batch's wall time that
no operator holds (Python, module calls, dispatch).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import time
from collections.abc import Iterator

import torch
from throughput import INPUT_SIZE, ChannelsLast, fxpsweep_network, random_model, setup_note
from torch.fx.experimental.optimization import fuse

from fxpsweep.backends import depthwise_loop, rounding_loop
from fxpsweep.backends.host_memory import freed_memory_kept

COMPILED = "compiled rounding passes (torch.compile, all graphs)"
OUTSIDE = "outside operators (Python, module calls, dispatch)"
# The numba loops, each recorded as one profiler event per call: (module, function, event name).
NUMBA_LOOPS = [
    (rounding_loop, "round_into", "numba: rounding pass of a register"),
    (rounding_loop, "add_round_into", "numba: residual add and its rounding"),
    (rounding_loop, "round_then_add", "numba: a register and the residual add reading it, one pass"),
    (rounding_loop, "combine_round_into", "numba: a kernel's terms summed and rounded"),
    (depthwise_loop, "depthwise_into", "numba: depthwise convolution and its rounding"),
]

Profile = dict[str, tuple[float, int]]  # operator -> (self CPU seconds, calls)


@contextlib.contextmanager
def numba_loops_recorded() -> Iterator[None]:
    """Each call of a numba loop of ``NUMBA_LOOPS`` is a profiler event of its name, while inside."""
    originals = [(module, name, getattr(module, name)) for module, name, _ in NUMBA_LOOPS]

    def recorded(function, event: str):
        @functools.wraps(function)
        def call(*args, **kwargs):
            with torch.profiler.record_function(event):
                return function(*args, **kwargs)
        return call

    try:
        for (module, name, function), (_, _, event) in zip(originals, NUMBA_LOOPS):
            setattr(module, name, recorded(function, event))
        yield
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


@torch.no_grad()
def profile(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, Profile]:
    """Wall seconds of one batch (best of three, unprofiled) and the profile of one more batch."""
    model(batch)
    seconds = math.inf
    for _ in range(3):  # best of three: the machine is shared
        start = time.perf_counter()
        model(batch)
        seconds = min(seconds, time.perf_counter() - start)
    with numba_loops_recorded(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model(batch)
        profiled = time.perf_counter() - start
    grouped: dict[str, list[float]] = {}
    for e in prof.key_averages():
        # Each compiled graph gets a hashed name; what they share is being one compiled element-wise pass.
        name = COMPILED if e.key.startswith("## Call CompiledFxGraph") else e.key
        total = grouped.setdefault(name, [0.0, 0])
        total[0] += e.self_cpu_time_total / 1e6
        total[1] += e.count
    rows = {name: (cpu, int(calls)) for name, (cpu, calls) in grouped.items()}
    rows[OUTSIDE] = (max(0.0, profiled - sum(cpu for cpu, _ in rows.values())), 0)
    return seconds, rows


def table(ours: Profile, theirs: Profile, top: int) -> list[str]:
    """Markdown rows: the ``top`` most expensive operators of either profile, the rest summed, the total."""
    names = sorted(set(ours) | set(theirs), key=lambda n: -max(ours.get(n, (0, 0))[0], theirs.get(n, (0, 0))[0]))
    names.remove(OUTSIDE)
    shown, rest = names[:top] + [OUTSIDE], names[top:]

    def cells(profile: Profile, keys: list[str], calls: bool = True) -> str:
        cpu = sum(profile.get(k, (0.0, 0))[0] for k in keys)
        count = sum(profile.get(k, (0.0, 0))[1] for k in keys)
        return f"{cpu * 1e3:.1f} | {count if calls and count else ''}"

    lines = ["| operator | fxpsweep ms | calls | float32 ms | calls |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {cells(ours, [name])} | {cells(theirs, [name])} |" for name in shown]
    lines.append(f"| {len(rest)} others | {cells(ours, rest, False)} | {cells(theirs, rest, False)} |")
    lines.append(f"| **all** | {cells(ours, list(ours), False)} | {cells(theirs, list(theirs), False)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--arithmetic", default="exact")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc malloc keeps freed memory for reuse, as a job on the CPU does while it runs (device.keep_freed_memory)")
    args = parser.parse_args()
    with freed_memory_kept(args.keep_freed_memory) as kept:
        report(args, kept)


def report(args: argparse.Namespace, kept: bool) -> None:
    """Measure and print (``main``'s arguments; ``kept``: whether freed host memory is kept for reuse)."""
    torch.set_num_threads(args.threads)
    size = INPUT_SIZE.get(args.model, 224)
    torch.manual_seed(0)
    batch = torch.randn(args.batch, 3, size, size)
    model = random_model(args.model)
    baseline = ChannelsLast(fuse(model))
    net = fxpsweep_network(model, batch, args.bits, args.arithmetic)
    float_seconds, theirs = profile(baseline, batch)
    seconds, ours = profile(net, batch)
    print(f"# {args.model}, {args.bits}-bit {args.arithmetic}, batch {args.batch}, {args.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{setup_note(kept)}\n")
    print(f"One batch: {seconds * 1e3:.1f} ms; float32 (folded, channels-last) {float_seconds * 1e3:.1f} ms "
          f"({float_seconds / seconds:.2f}x float32). Profiled batch below (profiling slows it).\n")
    print("\n".join(table(ours, theirs, args.top)))


if __name__ == "__main__":
    main()
