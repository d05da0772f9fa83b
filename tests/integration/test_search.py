"""The minimum-bits search on the digits network: cheaper than every uniform width at its tolerance, judged on
images it did not see, resumable after a kill, and strict about its settings."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

SETTINGS = ["search.tolerance=1.5", "search.widths=[2,3,4,5,6,8]", "search.holdout_widths=[2,3,4,5,6,7,8]", "search.probe_images=128"]


def search(out, cache_dir, *args: str) -> subprocess.Popen:
    env = {**os.environ, "FXPSWEEP_CACHE": str(cache_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "fxpsweep.search", *SETTINGS, f"search.out={out}", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("search")
    proc = search(out, cache_dir)
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stderr[-3000:]
    return out, stdout


def test_the_answer_is_cheaper_than_every_uniform_width_that_meets_the_tolerance(searched) -> None:
    out, stdout = searched
    answer = json.loads((out / "search.json").read_text())
    h = answer["holdout"]
    assert h["within_tolerance"] and h["cheapest_uniform"] is not None
    cheapest = h["uniform"][str(h["cheapest_uniform"])]
    assert h["weight_kib"] < cheapest["weight_kib"] and h["bitops"] <= cheapest["bitops"]
    meeting = [u for u in h["uniform"].values() if h["float_top1"] - u["top1"] <= answer["tolerance"]]
    assert all(h["weight_kib"] < u["weight_kib"] for u in meeting)
    assert f"{answer['evaluations']} network evaluations" in stdout
    assert answer["evaluations"] < 200 < answer["exhaustive_assignments"]
    assert (out / "search.png").stat().st_size > 0 and "holdout images" in (out / "search.md").read_text()


def test_choices_are_made_on_search_images_and_judged_on_others(searched) -> None:
    out, _ = searched
    trace = json.loads((out / "trace.json").read_text())
    assert {e["split"] for e in trace if e["phase"] != "holdout"} == {"search"}
    assert {e["split"] for e in trace if e["phase"] == "holdout"} == {"holdout"}
    jobs = [json.loads(p.read_text()) for p in (out / "jobs").glob("*/result.json")]
    distinct = {(e["bits"], e["activation_bits"], tuple(e["rules"]), e["split"], e["images"]) for e in trace}  # a repeated assignment runs once
    assert len(jobs) == len(distinct) and {j["eval_split"] for j in jobs} == {"search", "holdout"}


def test_run_py_runs_the_precision_file_unchanged(searched, run_app, tmp_path) -> None:
    out, _ = searched
    answer = json.loads((out / "search.json").read_text())
    (name,) = [p.stem for p in (out / "precision").glob("*.yaml")]
    proc = run_app("--config-dir", str(out), f"precision={name}", "eval_split=holdout", "report_images=0", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["precision_rules"] == answer["rules"] and result["bits"] == answer["uniform_width"]
    assert result["quant_top1"] == answer["holdout"]["top1"] and result["weight_kib"] == answer["holdout"]["weight_kib"]


def test_a_killed_search_resumes_without_redoing_finished_evaluations(tmp_path, cache_dir, run_app) -> None:
    out = tmp_path / "search"
    own = ["search.activation_bits=8", "seed=1", "calibration.bias_correction=false"]  # activations fixed, weights searched
    proc = search(out, cache_dir, *own)
    deadline = time.time() + 600
    while time.time() < deadline and (not (out / "trace.json").exists() or len(json.loads((out / "trace.json").read_text())) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in (out / "jobs").glob("*/result.json")}
    assert len(done) >= 5
    again = search(out, cache_dir, *own)
    stdout, stderr = again.communicate(timeout=1200)
    assert again.returncode == 0, stderr[-3000:]
    answer = json.loads((out / "search.json").read_text())
    jobs = list((out / "jobs").glob("*/result.json"))
    assert answer["evaluations_run_now"] == len(jobs) - len(done)  # each finished evaluation ran once, in the first run
    assert all((out / "jobs" / name / "result.json").stat().st_mtime_ns == stamp for name, stamp in done.items())
    # Every evaluation but the uniform widths it is judged beside keeps activations at 8; so does its precision file.
    results = [json.loads(p.read_text()) for p in jobs]
    assert {r["fwd_bits"] for r in results if r["eval_split"] == "search" or r["precision_rules"]} == {8}
    # Judged beside every uniform width (WkAk) and every uniform weight width at its 8-bit activations (WkA8).
    h = answer["holdout"]
    assert sorted(map(int, h["uniform"])) == sorted(map(int, h["uniform_weights"])) == [2, 3, 4, 5, 6, 7, 8]
    report = (out / "search.md").read_text()
    for kind, name in (("cheapest_uniform", "W{w}A{w}"), ("cheapest_uniform_weights", "W{w}A8")):
        by_width = {int(w): u for w, u in h[kind.removeprefix("cheapest_")].items()}
        meeting = [w for w, u in by_width.items() if h["float_top1"] - u["top1"] <= answer["tolerance"]]
        assert h[kind] == (min(meeting, key=lambda w: by_width[w]["weight_kib"]) if meeting else None)
        assert h[kind] is None or name.format(w=h[kind]) in report
    assert f"narrow{'s' if len(answer['rules']) == 1 else ''} registers below the {answer['uniform_width']}-bit base" in report
    # The printed command (the precision file and the search's own seed and calibration) reproduces the holdout figure.
    (command,) = [line.removeprefix("run it: ") for line in stdout.splitlines() if line.startswith("run it: ")]
    words = shlex.split(command)
    assert words[:2] == ["python", "run.py"] and "seed=1" in words
    assert "bias_correction: false" in next((out / "precision").glob("*.yaml")).read_text()
    rerun = run_app(*words[2:], "report_images=0", f"hydra.run.dir={tmp_path / 'rerun'}")
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads((tmp_path / "rerun" / "result.json").read_text())
    assert result["fwd_bits"] == 8 and result["seed"] == 1 and not result["bias_correction"]
    assert result["quant_top1"] == answer["holdout"]["top1"] and result["weight_kib"] == answer["holdout"]["weight_kib"]
