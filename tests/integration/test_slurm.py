"""Sweeps on a real SLURM cluster through submitit (hydra/launcher=slurm), and a job killed mid-sweep.

`.ci/slurm-cluster start DIR` makes a single-node cluster on this machine and
`.ci/run` runs these tests against it with FXPSWEEP_REQUIRE_SLURM=1 (then a
missing cluster fails them instead of skipping).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO
from fxpsweep.sweep import aggregate

CLUSTER = bool(os.environ.get("SLURM_CONF")) and shutil.which("sbatch") is not None
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    not CLUSTER and os.environ.get("FXPSWEEP_REQUIRE_SLURM") != "1",
    reason="no SLURM cluster here (SLURM_CONF unset); .ci/slurm-cluster starts one",
)]
# Small jobs: one CPU and 2 GB each, so that both fit on the 2-core test machine at once.
SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "report_images=16"]


def test_sweep_runs_as_slurm_jobs_and_a_rerun_runs_none(run_app, tmp_path) -> None:
    proc = run_app(*SLURM, "bits=4,8", f"hydra.sweep.dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "bits_vs_accuracy.csv", dtype=str)
    assert list(table.columns)[-2:] == ["4", "8"] and all("/" in table.loc[0, c] for c in ("float", "4", "8"))
    job_ids = sorted(p.name for p in (tmp_path / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    deadline = time.monotonic() + 60  # accounting records a job's end a moment after the job ends
    while True:
        states = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_ids[0].split("_")[0]],
                                capture_output=True, text=True, check=True).stdout.split()
        if all(s.endswith("|COMPLETED") for s in states) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(states) == 2 and all(s.endswith("|COMPLETED") for s in states), states  # two array tasks ran on SLURM

    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    proc = run_app(*SLURM, "bits=4,8", f"hydra.sweep.dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each SLURM task logs into its job folder (Hydra's run.log): both skipped.
    assert all("already done, skipped" in (p.parent / "run.log").read_text() for p in before)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")} == before


def test_a_killed_job_is_marked_and_a_rerun_finishes_only_it(cache_dir, tmp_path) -> None:
    # acc_bits=20 with a saturating accumulator runs the slow sequential kernel: time to kill it.
    args = [sys.executable, str(REPO / "run.py"), *SLURM, "bits=8", "acc_bits=null,20", "acc_overflow=saturate",
            "report_images=540", f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "FXPSWEEP_CACHE": str(cache_dir)}
    fast = tmp_path / "acc_bits=null,acc_overflow=saturate,bits=8,report_images=540"
    slow = tmp_path / "acc_bits=20,acc_overflow=saturate,bits=8,report_images=540"
    sweep = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (slow / "job.json").exists():
        assert time.monotonic() < deadline and sweep.poll() is None, "the slow job never started"
        time.sleep(0.05)
    started = json.loads((slow / "job.json").read_text())
    assert started["slurm_job_id"]  # it runs as a SLURM job, on this single-node cluster
    os.kill(started["pid"], signal.SIGKILL)  # as the OOM killer or a dying node would
    output, _ = sweep.communicate(timeout=300)
    assert sweep.returncode != 0  # the launcher reports the killed job...
    assert (fast / "result.json").exists()  # ...and the other one finished
    assert (slow / "job.json").exists() and not (slow / "result.json").exists()
    assert not list(slow.glob(".*.tmp"))  # nothing half-written
    table = aggregate.write_tables([tmp_path], tmp_path)
    cells = dict(zip(table["acc_bits"], table["8"]))
    assert cells["20"] == "INCOMPLETE" and "/" in cells["None"], (cells, output[-2000:])

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already done, skipped" in (fast / "run.log").read_text()
    assert "already done, skipped" not in (slow / "run.log").read_text()
    assert (slow / "result.json").exists()
