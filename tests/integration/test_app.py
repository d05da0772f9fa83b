"""The app end to end, in subprocesses writing into tmp_path: sweeps, the saved table, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """One multirun of the embedded default at 4, 8 and 16 bits."""
    import os

    sweep_dir = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", "bits=4,8,16", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env={**os.environ, "FXPSWEEP_CACHE": str(cache_dir)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return sweep_dir, proc


def test_multirun_saves_the_bits_vs_accuracy_table(sweep) -> None:
    sweep_dir, proc = sweep
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("result.json"))]
    assert sorted(r["bits"] for r in results) == [4, 8, 16]
    table = pd.read_csv(sweep_dir / "bits_vs_accuracy.csv", dtype=str)
    assert list(table.columns) == ["model", "dataset", "images", "float", "4", "8", "16"]
    row = table.iloc[0]
    assert (row["model"], row["dataset"]) == ("digits_cnn", "digits")
    for r in results:
        assert row[str(r["bits"])] == f"{r['quant_top1']:.2f}/{r['quant_top5']:.2f}"
        assert row["float"] == f"{r['float_top1']:.2f}/{r['float_top5']:.2f}"
        assert r["n_eval"] == 540 and r["n_samples"] == 20
    assert (sweep_dir / "bits_vs_accuracy.md").read_text().startswith("| model")
    assert "| digits_cnn" in proc.stdout  # printed at the end of the sweep
    assert len((sweep_dir / "acc1_acc5.txt").read_text().splitlines()) == 3


def test_calibration_statistics_are_gathered_once_per_sweep(sweep, run_app, tmp_path) -> None:
    sweep_dir, _ = sweep
    results = sorted((json.loads(p.read_text()) for p in sweep_dir.rglob("result.json")), key=lambda r: r["bits"])
    sources = [r["calibration_stats"] for r in results]
    assert sources[0] in ("computed", "cache") and sources[1:] == ["memory", "memory"]
    # Another process with the same cache folder reads them from disk.
    proc = run_app("bits=6", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "result.json").read_text())["calibration_stats"] == "cache"


def test_embedded_default_accuracy_targets(sweep) -> None:
    sweep_dir, _ = sweep
    by_bits = {r["bits"]: r for r in (json.loads(p.read_text()) for p in sweep_dir.rglob("result.json"))}
    float_top1 = by_bits[16]["float_top1"]
    assert float_top1 >= 95.0
    assert abs(by_bits[16]["quant_top1"] - float_top1) <= 0.5
    assert by_bits[4]["quant_top1"] < by_bits[8]["quant_top1"]  # 4 bits visibly degrades


def test_each_job_reports_the_format_of_every_tensor(sweep) -> None:
    sweep_dir, _ = sweep
    for path in sweep_dir.rglob("formats.json"):
        formats = json.loads(path.read_text())
        bits = json.loads((path.parent / "result.json").read_text())["bits"]
        assert {f["kind"] for f in formats} == {"input", "weight", "bias", "activation"}
        assert all(f["total_bits"] == (32 if f["kind"] == "bias" else bits) for f in formats)  # bias_bits=32


def test_aggregate_command_rebuilds_the_table(sweep, tmp_path) -> None:
    sweep_dir, _ = sweep
    proc = subprocess.run(
        [sys.executable, "-m", "fxpsweep.aggregate", str(sweep_dir), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "bits_vs_accuracy.csv").read_text() == (sweep_dir / "bits_vs_accuracy.csv").read_text()


def test_single_run_prints_its_table(run_app, tmp_path) -> None:
    proc = run_app("bits=6", "eval_limit=100", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "| digits_cnn" in proc.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["n_eval"] == 100 and result["param_bits"] == result["fwd_bits"] == 6


@pytest.mark.parametrize(
    "args",
    [
        ["arithmetic=fast"],
        ["acc_bits=20", "acc_overflow=saturate", "product_bits=12", "rounding=floor", "eval_limit=40"],
        ["batchnorm=keep", "overflow=wrap", "rounding=stochastic"],
    ],
    ids=["fast", "narrow-accumulator", "batchnorm-kept"],
)
def test_datapath_options_run_and_are_recorded(run_app, tmp_path, args: list[str]) -> None:
    proc = run_app("bits=10", *args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    for arg in args:
        key, value = arg.split("=")
        assert str(result["config"][key]) == value
    assert result["quant_top1"] > 90.0  # 10 bits barely dent the digits model
    kinds = {f["kind"] for f in json.loads((tmp_path / "formats.json").read_text())}
    if "acc_bits=20" in args:
        assert {"accumulator", "product"} <= kinds


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=resnet50", "dataset=imagenet"], "dataset=imagenet needs dataset.root"),
        (["model=resnet50", "dataset=imagenet", "dataset.root=/no/such/dir"], "dataset.root=/no/such/dir does not exist"),
        (["model=alexnet"], "model=alexnet classifies imagenet images"),
    ],
)
def test_bad_model_and_dataset_combinations_fail_with_a_clear_message(run_app, tmp_path, args: list[str], message: str) -> None:
    proc = run_app(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "result.json").exists()
