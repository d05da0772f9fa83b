"""Calibration on real pretrained networks and real images from ../shared/data (skipped where it is absent).

ResNet-20 on 2000 CIFAR-10 test images; BN-folded MobileNetV2 on 1300 ImageNet
validation images. Both image sets are harder or easier than the full test
sets (see ../shared/data/README.md): the figures are relative to float on the
same images, measured in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

pytestmark = [pytest.mark.realdata, pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")]


def run_sweep(tmp_path, cache_dir, *args: str) -> list[dict]:
    """Run a multirun into tmp_path and return its results."""
    proc = subprocess.run(
        # No SQNR report: nothing here reads it (tests/integration/test_app.py checks the report).
        [sys.executable, "run.py", "-m", *args, "report_images=0", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, env={**os.environ, "FXPSWEEP_CACHE": str(cache_dir), "FXPSWEEP_DATA": str(SHARED_DATA)},
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]


def sweep(tmp_path, cache_dir, *args: str) -> dict[tuple, dict]:
    """``run_sweep``'s results keyed by (param_bits, fwd_bits, bias_bits, granularity)."""
    results = run_sweep(tmp_path, cache_dir, *args)
    return {(r["param_bits"], r["fwd_bits"], r["bias_bits"], r["weight_granularity"]): r for r in results}


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory, cache_dir):
    return sweep(tmp_path_factory.mktemp("resnet20"), cache_dir, "model=resnet20_cifar10", "dataset=cifar10_test2000", "bits=6,8")


def test_resnet20_float_baseline_is_the_published_network(resnet20) -> None:
    r = resnet20[(8, 8, 32, "channel")]
    assert r["n_eval"] == 2000 - r["n_samples"]
    assert 78.0 <= r["float_top1"] <= 84.0  # about 80 % on these JPEG-compressed images (shared/data README)


def test_resnet20_8_bit_is_within_0_3_points_of_float(resnet20) -> None:
    r = resnet20[(8, 8, 32, "channel")]
    assert r["float_top1"] - r["quant_top1"] <= 0.3


def test_resnet20_6_bit_is_within_2_points_of_float(resnet20) -> None:
    r = resnet20[(6, 6, 32, "channel")]
    assert r["float_top1"] - r["quant_top1"] <= 2.0


def test_mobilenet_v2_8_bit_per_channel_is_within_1_5_points_of_float(tmp_path, cache_dir) -> None:
    # Per channel only: the per-tensor figure is docs/calibration.md's table (scripts/readme_tables.sh --real), and
    # statistics shared by the jobs of a sweep are proven by tests/sweep/test_reuse.py and test_app.py.
    # Batches of 32: the same codes as 64 (each image's integers do not depend on its batch), and the job's peak
    # memory stays well below the 4 GiB a test process may hold.
    results = sweep(tmp_path, cache_dir, "model=mobilenet_v2_fused", "dataset=imagenet_val1300", "bits=8", "batch_size=32")
    per_channel = results[(8, 8, 32, "channel")]
    assert per_channel["float_top1"] - per_channel["quant_top1"] <= 1.5


def test_resnet20_gptq_keeps_4_bit_weights_within_half_a_point(tmp_path, cache_dir) -> None:
    """GPTQ codes, chosen on the 20 calibration images, judged on the 1980 others."""
    results = run_sweep(
        tmp_path, cache_dir, "model=resnet20_cifar10", "dataset=cifar10_test2000", "param_bits=4", "fwd_bits=8",
        "calibration.weight_rounding=plain,gptq",
    )
    by_rounding = {r["weight_rounding"]: r for r in results}
    plain, gptq = by_rounding["plain"], by_rounding["gptq"]
    assert gptq["float_top1"] - gptq["quant_top1"] <= 0.5
    assert gptq["quant_top1"] >= plain["quant_top1"] + 1.5
