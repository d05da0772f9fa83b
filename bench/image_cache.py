"""Images per second of preparing network inputs: decoding JPEGs every time vs the uint8 image cache.

    python bench/image_cache.py [--images N] [--rounds R]

Uses ../shared/data/imagenet-val1300 (real JPEGs) where it exists, else
synthetic JPEGs of the same size. Each round reads every image once through
a fresh DataLoader (batch 64, main process) with the ResNet preprocessing
(resize 256, crop 224, normalize): cold = decode and resize each time, cached
= read the memory-mapped uint8 crops and normalize. The first cached round
builds the cache and is reported apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from fxpsweep.data.preprocess import prepare
from fxpsweep.data.splits import split_image_list
from fxpsweep.models.torchvision_zoo import imagenet_transform

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-val1300"


def synthetic_images(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "data").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (227, 227, 3), dtype=np.uint8)).save(folder / "data" / f"{i}.JPEG", quality=90)
        lines.append(f"./data/{i}.JPEG, {i % 1000}")
    (folder / "dataset.txt").write_text("\n".join(lines) + "\n")
    return folder


def read_all(dataset) -> float:
    """Seconds to read every input of ``dataset`` once."""
    start = time.perf_counter()
    for _ in DataLoader(dataset, batch_size=64):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = SHARED if SHARED.is_dir() else synthetic_images(Path(tmp) / "images", args.images + 1)
        splits = split_image_list(str(root), "dataset.txt", n_samples=1, eval_limit=args.images, seed=0)
        transform = imagenet_transform(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        key = {"name": "bench", "root": str(root)}
        cold = prepare(splits, transform, key, None).evaluation
        start = time.perf_counter()
        cached = prepare(splits, transform, key, Path(tmp) / "cache").evaluation  # builds the cache
        build_seconds = time.perf_counter() - start
        n = len(cold)
        cold_s, cached_s = [], []
        for _ in range(args.rounds):  # interleaved, so both see the same machine state
            cold_s.append(read_all(cold))
            cached_s.append(read_all(cached))
        print(f"images: {n} ({'real JPEGs, ' + str(root) if root == SHARED else 'synthetic JPEGs'}), {args.rounds} rounds, 2 threads")
        print("| path | images/s (best round) |\n|---|---|")
        print(f"| decode + resize every time | {n / min(cold_s):.0f} |")
        print(f"| uint8 cache (memmap) | {n / min(cached_s):.0f} |")
        print(f"| building the cache (once) | {n / build_seconds:.0f} |")
        print(f"cached / cold: {min(cold_s) / min(cached_s):.1f}x")


if __name__ == "__main__":
    main()
