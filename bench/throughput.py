"""Images/s of float32 inference and of fixed-point simulation (exact and fast), side by side.

    python bench/throughput.py [--models alexnet resnet18 mobilenet_v2] [--batch 32] [--threads 2]

Every configuration runs in this one process on the same input batch, in
rounds that time each configuration once in turn (best round counts): float32
as torchvision ships the model, float32 with BatchNorm folded into the
convolutions, then each simulation; the ratio is images/s over the faster
float32 figure. Random weights with
randomized BatchNorm statistics (pretrained weights shift which layers fit the
float32-exact bound).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import Counter

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.ops import FixedDot
from fxpsweep.engine.settings import QuantSettings


def random_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@torch.no_grad()
def seconds_per_batch(model: nn.Module, batch: torch.Tensor) -> float:
    if batch.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(batch)
    if batch.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_images_per_second(models: dict[str, nn.Module], batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """Images/s of each model, best of ``rounds``; each round times every model once, in turn,
    so that a disturbance of the machine hits all configurations alike."""
    for model in models.values():
        seconds_per_batch(model, batch)  # warm-up
    best = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = min(best[name], seconds_per_batch(model, batch))
    return {name: len(batch) / t for name, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["alexnet", "resnet18", "mobilenet_v2"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each times every configuration once")
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
          f"{args.threads} threads, batch {args.batch}, best of {args.repeats} rounds, each timing every configuration once after a warm-up\n")
    print("| model | config | images/s | x float32 | conv/linear kernels |")
    print("|---|---|---:|---:|---|")
    for arch in args.models:
        model = random_model(arch).to(device)
        batch = torch.randn(args.batch, 3, 224, 224, device=device)
        configs: dict[str, nn.Module] = {"float32": model, "float32, BatchNorm folded": fuse(model)}
        kernels: dict[str, str] = {}
        for bits in args.bits:
            for arithmetic in ("exact", "fast"):
                net = QuantizedNetwork(model, QuantSettings(param_bits=bits, fwd_bits=bits, arithmetic=arithmetic)).to(device)
                net.calibrate([batch[:4]])
                name = f"{bits}-bit {arithmetic}"
                configs[name] = net
                mix = Counter(op.kernel for op in net.ops if isinstance(op, FixedDot))
                kernels[name] = ", ".join(f"{k} {n}" for k, n in sorted(mix.items()))
        speed = best_images_per_second(configs, batch, args.repeats)
        base = max(speed["float32"], speed["float32, BatchNorm folded"])
        for name, value in speed.items():
            print(f"| {arch} | {name} | {value:.1f} | {value / base:.2f} | {kernels.get(name, '')} |", flush=True)


if __name__ == "__main__":
    main()
