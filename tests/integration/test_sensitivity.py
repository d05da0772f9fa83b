"""A sensitivity study is one multirun of run.py (a job per probe), resumable, with a table and a bar chart."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd

from conftest import REPO


def study(out, cache_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fxpsweep.sensitivity", "bits=8", "sensitivity.probe_bits=3", f"sensitivity.out={out}"],
        cwd=REPO, env={**os.environ, "FXPSWEEP_CACHE": str(cache_dir)}, capture_output=True, text=True, timeout=900,
    )


def test_every_register_is_probed_alone_and_a_rerun_skips_them(tmp_path, cache_dir) -> None:
    proc = study(tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sensitivity.csv")
    weights = table[table.register == "weight"]
    outputs = table[table.register == "output"]
    assert list(weights.layer) == ["features.0", "features.3", "features.7", "classifier"]  # layer order
    assert list(outputs.layer) == ["x", "features.0", "features.3", "features.7", "pool", "classifier"]
    assert (table.bits == 3).all() and table["output SQNR dB"].notna().all()
    assert table["top1 drop"].max() > 0  # three bits somewhere hurt
    assert (tmp_path / "sensitivity.png").stat().st_size > 0 and "every register at 8 bits" in (tmp_path / "sensitivity.md").read_text()
    assert len(list((tmp_path / "jobs").glob("*/result.json"))) == len(table) + 1  # and the reference
    again = study(tmp_path, cache_dir)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("already done, skipped") == len(table) + 1
