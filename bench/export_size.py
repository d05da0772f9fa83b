"""Size and time of golden vectors: resnet18 (random weights) exported for one 224x224 image, then replayed.

    python bench/export_size.py [--bits 8 16] [--images 1]

The export writes every register, weight and bias as .npy and .mem; the
replay recomputes every operation with numpy alone (``python -m fxpsweep.replay``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from throughput import random_model  # same weights as the throughput benchmark
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.golden.export import export

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--images", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| resnet18, random weights | images | operations | files | MiB (.npy + .mem) | export s | replay s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for bits in args.bits:
        net = QuantizedNetwork(random_model("resnet18"), QuantSettings(bits, bits))
        torch.manual_seed(0)
        net.calibrate([torch.randn(4, 3, 224, 224)])
        images = torch.randn(args.images, 3, 224, 224)
        net(images)  # kernel choices made, as in a job
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "golden"
            start = time.perf_counter()
            manifest = export(net, images, out, {"model": "resnet18"})
            exported = time.perf_counter() - start
            files = list(out.iterdir())
            size = sum(p.stat().st_size for p in files) / 2**20
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "fxpsweep.replay", str(out)], cwd=REPO, capture_output=True, text=True)
            replayed = time.perf_counter() - start
            if proc.returncode:
                raise SystemExit(proc.stdout + proc.stderr)
        print(f"| {bits}-bit | {args.images} | {len(manifest['operations'])} | {len(files)} | {size:.1f} | {exported:.1f} | {replayed:.1f} |")


if __name__ == "__main__":
    main()
