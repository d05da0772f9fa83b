"""Where the time of one fxpsweep configuration goes: a profile per operator, against float32 in the same run.

    python bench/profile_engine.py [--model resnet18] [--bits 16] [--arithmetic exact] [--batch 32] [--threads 2]

The model and its calibration are those of ``throughput.py``. After a warm-up
batch (kernel choices, compiled rounding), the fixed-point network and float32
(BatchNorm folded, channels-last: the baseline of ``throughput.py``) are timed
(best of three batches), then one batch of the fixed-point network runs under
``torch.profiler``; the table lists its operators by self CPU time with their
share, so a missed target names what bounds it: the integer or float
convolutions and GEMMs (the kernels), the compiled rounding passes (one per
register), or the rest.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from throughput import INPUT_SIZE, ChannelsLast, fxpsweep_network, random_model
from torch.fx.experimental.optimization import fuse

COMPILED = "compiled rounding passes (torch.compile, all graphs)"


@torch.no_grad()
def profile(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, list[tuple[str, float, int]]]:
    """Wall seconds of one batch (best of three) and (operator, self CPU seconds, calls), most expensive first."""
    model(batch)
    seconds = math.inf
    for _ in range(3):  # best of three: the machine is shared
        start = time.perf_counter()
        model(batch)
        seconds = min(seconds, time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(batch)
    grouped: dict[str, list[float]] = {}
    for e in prof.key_averages():
        # Each compiled graph gets a hashed name; what they share is being one compiled element-wise pass.
        name = COMPILED if e.key.startswith("## Call CompiledFxGraph") else e.key
        total = grouped.setdefault(name, [0.0, 0])
        total[0] += e.self_cpu_time_total / 1e6
        total[1] += e.count
    return seconds, sorted(((k, v[0], int(v[1])) for k, v in grouped.items()), key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--arithmetic", default="exact")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = INPUT_SIZE.get(args.model, 224)
    torch.manual_seed(0)
    batch = torch.randn(args.batch, 3, size, size)
    model = random_model(args.model)
    baseline = ChannelsLast(fuse(model))
    net = fxpsweep_network(model, batch, args.bits, args.arithmetic)
    float_seconds, _ = profile(baseline, batch)
    seconds, rows = profile(net, batch)
    print(f"# {args.model}, {args.bits}-bit {args.arithmetic}, batch {args.batch}, {args.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print(f"One batch: {seconds * 1e3:.0f} ms; float32 (folded, channels-last) {float_seconds * 1e3:.0f} ms "
          f"({float_seconds / seconds:.2f}x float32).\n")
    total = sum(r[1] for r in rows)
    print("| operator | self CPU ms | share | calls |")
    print("|---|---:|---:|---:|")
    for name, cpu, calls in rows[: args.top]:
        print(f"| {name} | {cpu * 1e3:.0f} | {100 * cpu / total:.1f} % | {calls} |")
    rest = rows[args.top:]
    print(f"| {len(rest)} others | {sum(r[1] for r in rest) * 1e3:.0f} | {100 * sum(r[1] for r in rest) / total:.1f} % | |")


if __name__ == "__main__":
    main()
