"""Images/s and peak memory of float32 inference, fxpsweep's simulation and peer simulators, side by side.

    python bench/throughput.py [--models alexnet resnet18 mobilenet_v2 resnet20_cifar10] [--batch 32] [--threads 2]
    python bench/throughput.py --isa-cap avx2   # as far as the libraries go, a processor with AVX2 at most
    python bench/throughput.py --isa-cap avx512_vnni   # ... with AVX-512 and VNNI but no AMX

Every configuration of a model runs in this one process on the same input
batch, timed in rounds that run each configuration once in turn (best round
counts; ``--repeats`` rounds or more, until the rounds took ``--min-seconds``),
so a disturbance of the machine hits all alike. ``x float32`` is
images/s over the fastest float32 form of the model: as torchvision ships
it, with BatchNorm folded, and folded in channels-last memory order. Peak
memory is the most that PyTorch's allocator holds at once during one forward
pass (from the profiler's record of allocations), over that of float32 as
shipped. As a job on the CPU does, the process keeps freed memory for reuse
(``fxpsweep.backends.host_memory``; ``--no-keep-freed-memory``: malloc's
defaults), which speeds float32 and fxpsweep alike.

Configurations: fxpsweep at 8 and 16 bits, ``exact`` and ``fast``, each layer
on the kernel its measurement picks (named in the last column); torch.ao's
FX fake quantization (8 bits, the x86 QAT config); and, where installed (the
``bench`` extra), Brevitas fixed-point layers (8-bit weights and inputs of
every conv/linear) and QPyTorch's fixed-point quantizer (8-bit weights,
every conv/linear/ReLU output rounded by a forward hook). Random weights with
randomized BatchNorm statistics; ``resnet20_cifar10`` on 32x32 inputs, the
others on 224x224.

``--isa-cap avx2`` runs the bench again in a process whose libraries are held
to AVX2 on a processor with more (torch's ``ATEN_CPU_CAPABILITY``, oneDNN's
``ONEDNN_MAX_CPU_ISA``, MKL's ``MKL_ENABLE_INSTRUCTIONS``, and numba's loops
compiled without AVX-512): the kernels and loops an AVX2 processor runs, timed
on this one's cores and caches. It is not an AVX2 processor: ``torch._int_mm``,
30 to 75 times slower than a float32 matmul on an AMD EPYC with AVX2, took
half a float32 matmul's time on an Intel Xeon with AMX held to AVX2 (ad hoc),
so a capped run shows the code's paths, not another machine's figures.
``--isa-cap avx512_vnni`` holds a processor with AMX to AVX-512 with VNNI
(oneDNN's int8 kernels without AMX tiles, as on an Ice Lake Xeon or a Zen 4
EPYC), in the same way.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import llvmlite.binding as llvm
import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

from fxpsweep.backends.host_memory import freed_memory_kept
from fxpsweep.backends.kernel_choice import isa_caps, processor_name
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.ops import FixedDot
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.models.cifar_resnet import cifar_resnet

INPUT_SIZE = {"resnet20_cifar10": 32}


class IsaCap(NamedTuple):
    """An ``--isa-cap``: what holds each library to fewer instruction sets than the processor has."""

    library_caps: dict[str, str]  # torch's, oneDNN's and MKL's environment variables
    numba_features_off: tuple[str, ...]  # LLVM's names (prefixes) of the features numba's loops go without
    words: str  # in the header


ISA_CAPS = {
    "avx2": IsaCap({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
                   ("avx512", "avx10", "evex512", "amx", "avxvnni"), "AVX2"),
    "avx512_vnni": IsaCap({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
                           "MKL_ENABLE_INSTRUCTIONS": "AVX512_E1"}, ("amx",), "AVX-512 with VNNI, no AMX"),
}


def cap_variables(cap: str) -> dict[str, str]:
    """Environment variables that hold torch, oneDNN, MKL and numba to ``cap`` (``ISA_CAPS``) on a processor with more.

    Read when each library starts, so they are set for a new process (``main`` runs itself again).
    """
    chosen = ISA_CAPS[cap]
    numba_features = ",".join(("+" if on and not name.startswith(chosen.numba_features_off) else "-") + name
                              for name, on in sorted(llvm.get_host_cpu_features().items()))
    return {**chosen.library_caps, "NUMBA_CPU_FEATURES": numba_features}


def active_cap() -> str | None:
    """The ``--isa-cap`` this process runs under, if any."""
    return next((cap for cap in ISA_CAPS if isa_caps() == cap_variables(cap)), None)


def random_model(arch: str) -> nn.Module:
    """``arch`` with random weights and randomized BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = cifar_resnet(20) if arch == "resnet20_cifar10" else torchvision.models.get_model(arch, weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


class ChannelsLast(nn.Module):
    """A model fed channels-last input (its convolutions then run in that memory order)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def torch_ao_fake_quant(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """torch.ao FX graph-mode fake quantization, 8 bits (the x86 QAT config), observers calibrated, then frozen."""
    from torch.ao.quantization import disable_observer, get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (batch[:1],))
    prepared.eval()
    with torch.no_grad():
        prepared(batch[:4])
    prepared.apply(disable_observer)
    return prepared


def _replace_modules(model: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    for name, child in list(model.named_children()):
        new = replace(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _replace_modules(child, replace)
    return model


def brevitas_fixed_point(model: nn.Module) -> nn.Module:
    """Every conv/linear of the BatchNorm-folded model as a Brevitas layer with 8-bit fixed-point weights and inputs."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint

    def replace(m: nn.Module) -> nn.Module | None:
        quant = {"weight_quant": Int8WeightPerTensorFixedPoint, "input_quant": Int8ActPerTensorFixedPoint, "return_quant_tensor": False}
        if isinstance(m, nn.Conv2d):
            new = qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                                  bias=m.bias is not None, **quant)
        elif isinstance(m, nn.Linear):
            new = qnn.QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, **quant)
        else:
            return None
        new.load_state_dict(m.state_dict(), strict=False)
        return new

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _replace_modules(copy.deepcopy(fuse(model)), replace).eval()


def qpytorch_fixed_point(model: nn.Module) -> nn.Module:
    """QPyTorch: weights rounded to 8-bit fixed point once, every conv/linear/ReLU output by a forward hook."""
    from qtorch.quant import fixed_point_quantize

    net = copy.deepcopy(fuse(model))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(fixed_point_quantize(m.weight, 8, 6))
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU)):
                m.register_forward_hook(lambda _m, _i, out: fixed_point_quantize(out, 8, 4))
    return net.eval()


def fxpsweep_network(model: nn.Module, batch: torch.Tensor, bits: int, arithmetic: str, **settings) -> QuantizedNetwork:
    """``model`` at ``bits`` everywhere, calibrated on four images of ``batch``; ``settings``: other ``QuantSettings``."""
    net = QuantizedNetwork(model, QuantSettings(param_bits=bits, fwd_bits=bits, arithmetic=arithmetic, **settings)).to(batch.device)
    net.calibrate([batch[:4]])
    return net


@torch.no_grad()
def seconds_per_batch(model: nn.Module, batch: torch.Tensor) -> float:
    if batch.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(batch)
    if batch.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def peak_memory_mib(model: nn.Module, batch: torch.Tensor) -> float:
    """The most memory PyTorch's allocator held at once during one forward pass, above what it held before, in MiB.

    From the profiler's record of every allocation and free (``profile_memory``),
    so memory the C library keeps for reuse does not hide it.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        model(batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak / 2**20


def best_images_per_second(models: dict[str, nn.Module], batch: torch.Tensor, rounds: int,
                           min_seconds: float = 0.0) -> dict[str, float]:
    """Images/s of each model, best of ``rounds`` or more: rounds go on until they have taken ``min_seconds``
    in all, so that a small model (a batch of resnet20_cifar10 takes 10 ms) gets as many chances as a shared
    machine's bursts of other work need to leave some rounds undisturbed. Each round times every model once,
    in turn."""
    for model in models.values():
        seconds_per_batch(model, batch)  # warm-up: kernel choices, compiled rounding, caches
    best = dict.fromkeys(models, float("inf"))
    done, start = 0, time.perf_counter()
    while done < rounds or time.perf_counter() - start < min_seconds:
        for name, model in models.items():
            best[name] = min(best[name], seconds_per_batch(model, batch))
        done += 1
    return {name: len(batch) / t for name, t in best.items()}


def configurations(arch: str, batch: torch.Tensor, bits: list[int]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Every configuration of ``arch`` by name, and the kernel mix of fxpsweep's."""
    model = random_model(arch).to(batch.device)
    folded = fuse(model)
    configs: dict[str, nn.Module] = {
        "float32": model, "float32, BatchNorm folded": folded, "float32, folded, channels-last": ChannelsLast(copy.deepcopy(folded)),
    }
    kernels: dict[str, str] = {}
    for b in bits:
        for arithmetic in ("exact", "fast"):
            name = f"fxpsweep {b}-bit {arithmetic}"
            configs[name] = fxpsweep_network(model, batch, b, arithmetic)
    configs["torch.ao FX fake-quant 8-bit"] = torch_ao_fake_quant(model, batch)
    for name, make in (("Brevitas fixed-point 8-bit", brevitas_fixed_point), ("QPyTorch fixed-point 8-bit", qpytorch_fixed_point)):
        try:
            configs[name] = make(model)
        except ImportError:
            pass  # not installed: pip install -e ".[bench]"
    for name, net in configs.items():
        if isinstance(net, QuantizedNetwork):
            net(batch)  # each layer picks its kernel on a batch of this size
            mix = Counter(op.kernel for op in net.ops if isinstance(op, FixedDot))
            kernels[name] = ", ".join(f"{k} {n}" for k, n in sorted(mix.items()))
    return configs, kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["alexnet", "resnet18", "mobilenet_v2", "resnet20_cifar10"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    # On a shared 2-core VM, three runs of 3 or 5 rounds gave resnet20_cifar10 16-bit fast 0.97x, 0.98x and 0.94x
    # and mobilenet_v2 0.96x, 0.90x and 0.97x with the same fast-mode code: more rounds, and for a small model
    # rounds for at least --min-seconds, give a steadier best for every configuration alike.
    parser.add_argument("--repeats", type=int, default=5, help="rounds at least; each times every configuration once")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="and rounds until they took this long in all")
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--isa-cap", choices=list(ISA_CAPS), help="hold the libraries to these instruction sets (see the module docstring)")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc malloc keeps freed memory for reuse, as a job on the CPU does while it runs (device.keep_freed_memory)")
    args = parser.parse_args()
    if args.isa_cap is not None and active_cap() != args.isa_cap:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **cap_variables(args.isa_cap)})
    with freed_memory_kept(args.keep_freed_memory) as kept:
        report(args, kept)


def setup_note(kept: bool) -> str:
    """The header's words for how freed host memory was handled and for an instruction-set cap."""
    cap = active_cap()
    note = f"freed host memory {'kept for reuse' if kept else 'given back (malloc defaults)'}"
    if cap is not None:
        note += f", instruction sets capped at {ISA_CAPS[cap].words} (torch, oneDNN, MKL, numba: `--isa-cap {cap}`)"
    return note


def report(args: argparse.Namespace, kept: bool) -> None:
    """Measure and print (``main``'s arguments; ``kept``: whether freed host memory is kept for reuse)."""
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name()
    print(f"# {where}, CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"device {device}, {args.threads} threads, batch {args.batch}, best of {args.repeats} rounds or more "
          f"({args.min_seconds:g} s of rounds per model at least), "
          f"{setup_note(kept)}\n")
    print("| model | configuration | images/s | x float32 | peak MiB | x float32 memory | conv/linear kernels |")
    print("|---|---|---:|---:|---:|---:|---|")
    ratios: dict[str, dict[str, float]] = {}  # model -> configuration -> x float32, for the summary
    for arch in args.models:
        size = INPUT_SIZE.get(arch, 224)
        torch.manual_seed(0)
        batch = torch.randn(args.batch, 3, size, size, device=device)
        configs, kernels = configurations(arch, batch, args.bits)
        speed = best_images_per_second(configs, batch, args.repeats, args.min_seconds)
        memory = {name: peak_memory_mib(net, batch) for name, net in configs.items()}
        base = max(v for k, v in speed.items() if k.startswith("float32"))
        base_memory = memory["float32"]
        for name, value in speed.items():
            mib = memory[name]
            print(f"| {arch} | {name} | {value:.1f} | {value / base:.2f} | {mib:.0f} | {mib / base_memory:.2f} | {kernels.get(name, '')} |", flush=True)
        ratios[arch] = {"float32 images/s": base, **{name: value / base for name, value in speed.items() if not name.startswith("float32")}}
        del configs
        gc.collect()
    print_summary(ratios)


def print_summary(ratios: dict[str, dict[str, float]]) -> None:
    """One row per model: the best float32 images/s, then every other configuration's x float32 (the README's table)."""
    columns = list(dict.fromkeys(name for row in ratios.values() for name in row))
    print("\nSummary, x float32 (float32: its best form, images/s):\n")
    print("| model | " + " | ".join(c.removeprefix("fxpsweep ") for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for arch, row in ratios.items():
        cells = [f"{row[c]:.1f}" if c == "float32 images/s" else f"{row[c]:.2f}" if c in row else "" for c in columns]
        print(f"| {arch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
