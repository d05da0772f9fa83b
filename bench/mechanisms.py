"""Each speed mechanism of ``fxpsweep.backends`` turned off, one at a time, against all of them on, side by side.

    python bench/mechanisms.py [--models alexnet resnet18 mobilenet_v2 resnet20_cifar10] [--bits 8 16]

For every bench model, bit width and arithmetic (``exact``, ``fast``), one
process builds the network once per variant: everything on, everything on
again (a second copy: how far two identical networks' figures spread on this
machine), and each mechanism off. Each variant is built, calibrated, has its
kernels chosen and runs with its switch in place, so a mechanism's absence
reaches every choice it would have changed. The variants of a group are timed
in rounds, each round timing every variant once, in an order shuffled afresh
each round, so that a disturbance of the machine, or a variant that leaves the
machine in another state (the host-memory switch gives freed memory back to
the system, which the next network faults in afresh), hits all alike. A
variant's figure is its fastest batch over the rounds: on a shared machine one
network's batches spread widely from call to call, and the fastest of many is
what two identical networks agree on.

``gain`` is images/s with the mechanism on over images/s with it off, minus
one: +0.10 means the mechanism makes that configuration 10 % faster end to
end. ``all on, again`` is the same ratio between two identical networks: how
far this machine spreads. The summary gives each mechanism's
largest gain and where it was.

The switches replace a module attribute for the duration of a call
(``unittest.mock.patch.object``), the way the engine itself would run without
the mechanism: the Rounder, the kernels and the layers fall back to the path
they take where a mechanism does not apply (another device, another rounding
rule).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import INPUT_SIZE, fxpsweep_network, random_model, seconds_per_batch  # noqa: E402

from fxpsweep.backends import fused, host_memory, kernels, rounding_loop  # noqa: E402
from fxpsweep.backends.host_memory import freed_memory_kept  # noqa: E402
from fxpsweep.backends.kernel_choice import processor_name  # noqa: E402

Switch = Callable[[], contextlib.AbstractContextManager]


def _patched(*replacements: tuple[object, str, object]) -> Switch:
    """A switch that replaces each (module, attribute) by a value while it is on."""

    @contextlib.contextmanager
    def switch() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for module, name, value in replacements:
                stack.enter_context(mock.patch.object(module, name, value))
            yield

    return switch


@contextlib.contextmanager
def _freed_memory_given_back() -> Iterator[None]:
    """glibc's thresholds as a job without ``freed_memory_kept`` runs (large blocks mapped afresh each batch)."""
    libc = host_memory._libc()
    if libc is None:
        yield
        return
    host_memory._thresholds(libc, host_memory.MMAP_AFTER, host_memory.TRIM_AFTER)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        host_memory._thresholds(libc, host_memory.LARGEST, host_memory.LARGEST)


def _no(*args, **kwargs) -> bool:
    return False


def _plain_kernels(layer, device):
    """The kernel choice off: the plain kernel of each arithmetic (float64 exact, one float32 call fast)."""
    return [kernels.Float32Kernel(layer, device, exact=False)]


MECHANISMS: dict[str, tuple[str, Switch]] = {
    "kernel choice": ("every layer on the plain kernel (float64 exact; one float32 call fast)", _patched(
        (kernels, "EXACT_KERNELS", (kernels.Float64Kernel,)), (kernels, "fast_candidates", _plain_kernels))),
    "rounding_loop": ("registers rounded by the torch.compile pass instead of numba's loops", _patched(
        (rounding_loop, "supports", _no), (rounding_loop, "combines", _no), (rounding_loop, "rounds", _no))),
    "prefetch": ("numba's loops without software prefetch", _patched((rounding_loop, "prefetch_ahead", lambda values: 0))),
    "torch.compile": ("what is not on a numba loop runs eager", _patched((fused._Fused, "broken", True))),
    "depthwise_loop": ("depthwise convolutions without the numba kernel", _patched(
        (kernels, "EXACT_KERNELS", tuple(k for k in kernels.EXACT_KERNELS if k is not kernels.DepthwiseLoopKernel)))),
    "dot+add fusion": ("a residual add's layer stores its register, the add reads it", None),  # see _variant
    "host memory": ("freed memory given back to the system (malloc's defaults)", _freed_memory_given_back),
}
ON, ON_AGAIN = "all on", "all on, again"


class Switched(nn.Module):
    """A network that runs with a mechanism switched off."""

    def __init__(self, net: nn.Module, switch: Switch) -> None:
        super().__init__()
        self.net, self.switch = net, switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.switch():
            return self.net(x)


def _variant(model: nn.Module, batch: torch.Tensor, bits: int, arithmetic: str, mechanism: str | None, rounding: str) -> nn.Module:
    """The network of one variant, built, calibrated and with its kernels chosen under its switch."""
    switch = MECHANISMS[mechanism][1] if mechanism is not None else None
    with switch() if switch is not None else contextlib.nullcontext():
        net = fxpsweep_network(model, batch, bits, arithmetic, rounding=rounding)
        if mechanism == "dot+add fusion":
            object.__setattr__(net, "fused_module", net.graph_module)  # what forward runs: the unfused graph
        elif switch is not None:
            net = Switched(net, switch)
        net(batch)
    return net


def round_seconds(variants: dict[str, nn.Module], batch: torch.Tensor, rounds: int, min_seconds: float) -> dict[str, list[float]]:
    """Seconds of one batch of each variant in every round: ``rounds`` rounds or more, until they took ``min_seconds``."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for net in variants.values():
        seconds_per_batch(net, batch)  # warm-up: compiled passes, caches
    start = time.perf_counter()
    while len(seconds[ON]) < rounds or time.perf_counter() - start < min_seconds:
        shuffle(order)
        for name in order:
            seconds[name].append(seconds_per_batch(variants[name], batch))
    return seconds


def measure(arch: str, bits: int, arithmetic: str, rounding: str, batch: torch.Tensor, rounds: int,
            min_seconds: float) -> dict[str, list[float]]:
    """Seconds of a batch of every variant of one configuration in every round, timed side by side."""
    model = random_model(arch)
    variants = {name: _variant(model, batch, bits, arithmetic, None, rounding) for name in (ON, ON_AGAIN)}
    for mechanism in MECHANISMS:
        variants[f"{mechanism} off"] = _variant(model, batch, bits, arithmetic, mechanism, rounding)
    seconds = round_seconds(variants, batch, rounds, min_seconds)
    del variants
    gc.collect()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20_cifar10", "mobilenet_v2", "resnet18", "alexnet"])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--arithmetic", nargs="+", default=["exact", "fast"])
    parser.add_argument("--rounding", default="nearest_even", help="the rounding mode of every register (QuantSettings.rounding)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="rounds at least; each times every variant once")
    parser.add_argument("--min-seconds", type=float, default=10.0, help="and rounds until they took this long in all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with freed_memory_kept() as kept:
        print(f"# {processor_name()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
              f"rounding {args.rounding}, {args.threads} threads, batch {args.batch}, {args.repeats} rounds or more "
              f"({args.min_seconds:g} s of rounds per configuration at least), freed host memory "
              f"{'kept for reuse' if kept else 'given back'}\n")
        print("What each switch turns off:\n")
        for mechanism, (words, _) in MECHANISMS.items():
            print(f"- {mechanism}: {words}")
        print("\n| model | configuration | all on, images/s | all on again: gain | "
              + " | ".join(f"{m}: gain" for m in MECHANISMS) + " |")
        print("|---|---|---:|---:|" + "---:|" * len(MECHANISMS), flush=True)
        raw: list[str] = []  # images/s of every variant
        best: dict[str, tuple[float, str]] = {m: (-float("inf"), "") for m in [ON_AGAIN, *MECHANISMS]}
        for arch in args.models:
            size = INPUT_SIZE.get(arch, 224)
            torch.manual_seed(0)
            batch = torch.randn(args.batch, 3, size, size)
            for bits in args.bits:
                for arithmetic in args.arithmetic:
                    seconds = measure(arch, bits, arithmetic, args.rounding, batch, args.repeats, args.min_seconds)
                    speed = {name: args.batch / min(times) for name, times in seconds.items()}
                    on = speed[ON]
                    gains = {ON_AGAIN: on / speed[ON_AGAIN] - 1, **{m: on / speed[f"{m} off"] - 1 for m in MECHANISMS}}
                    where = f"{arch} {bits}-bit {arithmetic}"
                    for m, g in gains.items():
                        if g > best[m][0]:
                            best[m] = (g, where)
                    print(f"| {arch} | {bits}-bit {arithmetic} | {on:.1f} | "
                          + " | ".join(f"{g:+.2f}" for g in gains.values()) + " |", flush=True)
                    raw.append(f"| {arch} | {bits}-bit {arithmetic} | " + " | ".join(f"{v:.1f}" for v in speed.values()) + " |")
        print("\nImages/s of every variant (the fastest batch):\n")
        print("| model | configuration | " + " | ".join([ON, ON_AGAIN, *(f"{m} off" for m in MECHANISMS)]) + " |")
        print("|---|---|" + "---:|" * (len(MECHANISMS) + 2))
        print("\n".join(raw))
        print("\nLargest gain of each mechanism:\n")
        print("| mechanism | largest gain | where |")
        print("|---|---:|---|")
        for m, (g, where) in best.items():
            print(f"| {m} | {g:+.2f} | {where} |")


if __name__ == "__main__":
    main()
