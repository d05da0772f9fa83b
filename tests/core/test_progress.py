"""Progress in a log: a line per stage (start, end, at most every 10 s), not a carriage return per image."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from conftest import REPO

FILL_CACHE = """
import sys
from torchvision import transforms
from fxpsweep.data.preprocess import cached_or_transformed
from fxpsweep.data.splits import NpzImages
images = NpzImages(sys.argv[1])
steps = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(36), transforms.ToTensor()])
cached_or_transformed(images, steps, False, {"test": "progress"}, sys.argv[2], "caching evaluation images")
"""


def test_a_1000_image_cache_fill_writes_two_lines_into_a_log(tmp_path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", x=rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), y=np.arange(1000) % 10)
    proc = subprocess.run(
        [sys.executable, "-c", FILL_CACHE, str(tmp_path / "images.npz"), str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "caching" in line]
    assert "\r" not in proc.stderr
    assert 2 <= len(lines) <= 3 and "1000/1000" in lines[-1]  # start, end (and one more if it took over 10 s)
    assert (tmp_path / "cache" / "images").is_dir()
