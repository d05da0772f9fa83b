"""Images/s of float32 inference and of fixed-point simulation (exact and fast), side by side.

    python bench/throughput.py [--models alexnet resnet18 mobilenet_v2] [--batch 32] [--threads 2]

Every configuration runs in this one process on the same input batch:
float32 first (as torchvision ships the model, and with BatchNorm folded into
the convolutions, usually faster), then each simulation; the ratio is the
simulation's images/s over the faster float32 figure. Random weights with
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

from fxpsweep.ops import FixedDot
from fxpsweep.quantized import QuantizedNetwork
from fxpsweep.settings import QuantSettings


def random_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@torch.no_grad()
def images_per_second(model: nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Best of ``repeats`` timed batches after one warm-up batch (the least disturbed run)."""
    model(batch)
    best = float("inf")
    for _ in range(repeats):
        if batch.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(batch)
        if batch.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["alexnet", "resnet18", "mobilenet_v2"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
          f"{args.threads} threads, batch {args.batch}, best of {args.repeats} timed batches after one warm-up\n")
    print("| model | config | images/s | x float32 | conv/linear kernels |")
    print("|---|---|---:|---:|---|")
    for arch in args.models:
        model = random_model(arch).to(device)
        batch = torch.randn(args.batch, 3, 224, 224, device=device)
        shipped = images_per_second(model, batch, args.repeats)
        folded = images_per_second(fuse(model), batch, args.repeats)
        base = max(shipped, folded)
        print(f"| {arch} | float32 | {shipped:.1f} | {shipped / base:.2f} | |", flush=True)
        print(f"| {arch} | float32, BatchNorm folded | {folded:.1f} | {folded / base:.2f} | |", flush=True)
        for bits in args.bits:
            for arithmetic in ("exact", "fast"):
                net = QuantizedNetwork(model, QuantSettings(param_bits=bits, fwd_bits=bits, arithmetic=arithmetic)).to(device)
                net.calibrate([batch[:4]])
                speed = images_per_second(net, batch, args.repeats)
                kernels = Counter(op.kernel for op in net.ops if isinstance(op, FixedDot))
                mix = ", ".join(f"{k} {n}" for k, n in sorted(kernels.items()))
                print(f"| {arch} | {bits}-bit {arithmetic} | {speed:.1f} | {speed / base:.2f} | {mix} |", flush=True)


if __name__ == "__main__":
    main()
