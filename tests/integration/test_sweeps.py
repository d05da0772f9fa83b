"""Sweeps that resume: override-named job folders, skipping finished jobs, two identical sweeps at once, dry runs,
failures on record, and the aggregate command (merging sweeps, marking failures, the plot, README tables between markers)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from conftest import REPO
from fxpsweep import aggregate


def result_mtimes(sweep_dir) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.rglob("result.json")}


def test_rerun_skips_finished_jobs_and_runs_only_what_is_missing(run_app, tmp_path) -> None:
    args = ("-m", "bits=4,8", "report_images=16", f"hydra.sweep.dir={tmp_path}")
    assert run_app(*args).returncode == 0
    first = result_mtimes(tmp_path)
    assert set(first) == {"bits=4,report_images=16", "bits=8,report_images=16"}  # folders named by overrides

    proc = run_app(*args)  # the same sweep again: nothing to do
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("already done, skipped") == 2 and result_mtimes(tmp_path) == first

    (tmp_path / "bits=4,report_images=16" / "result.json").unlink()  # lose one result
    listing = run_app(*args, "dry_run=true")
    assert listing.returncode == 0 and result_mtimes(tmp_path) == {"bits=8,report_images=16": first["bits=8,report_images=16"]}
    lines = [line.split() for line in listing.stdout.splitlines() if line.split()[:1] in (["done"], ["incomplete"], ["new"])]
    assert sorted((words[0], words[1]) for words in lines) == [
        ("done", "bits=8,report_images=16"), ("incomplete", "bits=4,report_images=16"),
    ]
    proc = run_app(*args)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("already done, skipped") == 1
    again = result_mtimes(tmp_path)
    assert again["bits=8,report_images=16"] == first["bits=8,report_images=16"]
    assert again["bits=4,report_images=16"] != first["bits=4,report_images=16"]  # exactly the lost one ran


def test_a_failed_job_is_recorded_and_marked_while_the_others_finish(run_app, tmp_path) -> None:
    # resnet20_cifar10 cannot run on the digits: that job fails, the digits one finishes.
    proc = run_app("-m", "model=digits_cnn,resnet20_cifar10", "report_images=16", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fxpsweep: error: ")]
    assert len(errors) == 1 and errors[0].startswith("fxpsweep: error: model=resnet20_cifar10,report_images=16: ")
    assert "choose a dataset of kind cifar10" in errors[0]  # one line, naming the job and what to do
    assert "| resnet20_cifar10 |" in proc.stdout and "FAILED" in proc.stdout  # the sweep's table all the same
    assert "1 job(s) of this sweep failed (model=resnet20_cifar10,report_images=16): each folder's error.json says why" in proc.stderr
    error = json.loads((tmp_path / "model=resnet20_cifar10,report_images=16" / "error.json").read_text())
    assert error["error_type"] == "ConfigError" and "choose a dataset of kind cifar10" in error["error"]
    assert "Traceback" in error["traceback"] and error["model"] == "resnet20_cifar10"
    assert (tmp_path / "model=digits_cnn,report_images=16" / "result.json").exists()
    out = subprocess.run(
        [sys.executable, "-m", "fxpsweep.aggregate", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "bits_vs_accuracy.csv", dtype=str).set_index("model")
    assert table.loc["resnet20_cifar10", "8"] == "FAILED" and "/" in table.loc["digits_cnn", "8"]
    assert "1 job(s) failed" in out.stdout


def test_aggregate_merges_sweeps_plots_and_rewrites_a_readme_table(run_app, tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_app("-m", "bits=4", "report_images=16", f"hydra.sweep.dir={a}").returncode == 0
    assert run_app("-m", "bits=6", "report_images=16", f"hydra.sweep.dir={b}").returncode == 0
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- digits -->\nstale\n<!-- /digits -->\n\nafter\n")
    aggregate.main([str(a), str(b), "--out", str(tmp_path / "out"), "--readme", str(readme), "--marker", "digits"])
    table = pd.read_csv(tmp_path / "out" / "bits_vs_accuracy.csv", dtype=str)
    assert list(table.columns) == ["model", "dataset", "images", "float", "4", "6"]
    results = {r["bits"]: r for r in (json.loads(p.read_text()) for p in tmp_path.rglob("result.json"))}
    assert table.loc[0, "6"] == f"{results[6]['quant_top1']:.2f}/{results[6]['quant_top5']:.2f}"
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# title") and text.endswith("<!-- /digits -->\n\nafter\n")
    assert (tmp_path / "out" / "bits_vs_accuracy.md").read_text().strip() in text
    assert (tmp_path / "out" / "bits_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The cost table: a row per job, cheapest weights first, its costs as result.json has them.
    costs = pd.read_csv(tmp_path / "out" / "bits_vs_cost.csv")
    assert list(costs.bits) == [4, 6] and list(costs.precision) == ["uniform", "uniform"]
    assert costs.loc[1, "weight KiB"] == round(results[6]["weight_kib"], 3)
    assert costs.loc[1, "GBitOps per image"] == round(results[6]["bitops"] / 1e9, 3)


def test_local_submitit_launcher_runs_the_jobs_as_processes(run_app, tmp_path) -> None:
    proc = run_app("-m", "hydra/launcher=local", "bits=4,8", "report_images=16", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / ".submitit").is_dir()  # went through submitit, not Hydra's in-process launcher
    assert set(result_mtimes(tmp_path)) == {"bits=4,report_images=16", "bits=8,report_images=16"}


def test_two_identical_sweeps_at_once_run_each_job_once(run_app, tmp_path) -> None:
    args = ("-m", "bits=4,8", "eval_limit=200", "report_images=0", f"hydra.sweep.dir={tmp_path}")
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: run_app(*args), range(2)))
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    output = "".join(p.stdout + p.stderr for p in procs)
    assert output.count("already done, skipped") == 2  # each job ran in one sweep and was found done by the other
    lines = (tmp_path / "acc1_acc5.txt").read_text().splitlines()
    assert len(lines) == 2 and len(set(lines)) == 2
