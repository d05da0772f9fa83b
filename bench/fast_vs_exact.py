"""How far ``arithmetic=fast`` (float32 throughout) strays from ``exact``, measured side by side.

    python bench/fast_vs_exact.py [--bits 8 12 16]

For each bit-width, the exact and the fast simulation of the same network,
with the same formats, run on the same images; every operation's output codes
are compared. Networks: the embedded digits model on its 540 held-out images
(accuracy too), and random-weight resnet18 and mobilenet_v2 on random
224x224 images (codes only).
"""

from __future__ import annotations

import argparse

import torch
from throughput import random_model  # same weights as the throughput benchmark
from torch import nn

from fxpsweep.data.splits import split_digits
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.models.digits_cnn import pretrained_digits_cnn
from fxpsweep.engine.evaluate import Predictions, ranked_classes


@torch.no_grad()
def compare(model: nn.Module, calibration: torch.Tensor, images: torch.Tensor, labels: torch.Tensor | None, bits: int) -> str:
    nets = {}
    for arithmetic in ("exact", "fast"):
        # Calibration is a float pass over the same images: both get the same formats.
        nets[arithmetic] = QuantizedNetwork(model, QuantSettings(bits, bits, arithmetic=arithmetic))
        nets[arithmetic].calibrate([calibration])
    assert [op.out_fmt for op in nets["exact"].ops] == [op.out_fmt for op in nets["fast"].ops]
    outputs: dict[str, list[torch.Tensor]] = {"exact": [], "fast": []}
    logits = {}
    for name, net in nets.items():
        hooks = [op.register_forward_hook(lambda m, i, o, store=outputs[name]: store.append(o.double().clone())) for op in net.ops]
        logits[name] = torch.cat([net(images[i : i + 64]) for i in range(0, len(images), 64)])
        for h in hooks:
            h.remove()
    differ = sum(int((a != b).sum()) for a, b in zip(outputs["exact"], outputs["fast"]))
    total = sum(a.numel() for a in outputs["exact"])
    row = f"{bits} | {differ} of {total} ({100 * differ / total:.4f} %)"
    if labels is not None:
        acc = {name: Predictions(ranked_classes(out, 5), labels).accuracy().top1 for name, out in logits.items()}
        row += f" | {acc['exact']:.2f} | {acc['fast']:.2f} | {acc['fast'] - acc['exact']:+.2f}"
    else:
        row += " | | |"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 12, 16])
    parser.add_argument("--cache-dir", default="~/.cache/fxpsweep")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| network | bits | activation codes that differ | exact top-1 | fast top-1 | delta |")
    print("|---|---|---|---:|---:|---:|")
    splits = split_digits(n_samples=20, eval_limit=None, seed=0)
    calib = torch.stack([x for x, _ in splits.calibration])
    images = torch.stack([x for x, _ in splits.evaluation])
    labels = torch.tensor([y for _, y in splits.evaluation])
    digits = pretrained_digits_cnn(args.cache_dir).module
    for bits in args.bits:
        print(f"| digits_cnn (540 digits) | {compare(digits, calib, images, labels, bits)} |", flush=True)
    torch.manual_seed(0)
    calib, images = torch.randn(4, 3, 224, 224), torch.randn(8, 3, 224, 224)
    for arch in ("resnet18", "mobilenet_v2"):
        model = random_model(arch)
        for bits in args.bits:
            print(f"| {arch} (random, 8 images) | {compare(model, calib, images, None, bits)} |", flush=True)


if __name__ == "__main__":
    main()
