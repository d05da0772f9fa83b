"""The commands as a user runs them, each once, for the quick tier: one job and the table the aggregate command
builds from its folder, the export of a layer's golden vectors and their replay, and the sensitivity study's
refusal of a setting it makes itself. (The full suite runs each of them at length elsewhere.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO
from fxpsweep import aggregate


def command(module: str, *args: str, cache_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FXPSWEEP_CACHE": str(cache_dir)})


def test_export_writes_a_layer_that_replay_recomputes(tmp_path, cache_dir) -> None:
    out = tmp_path / "golden"
    proc = command("fxpsweep.export", "export.layers=classifier", "export.n_images=2", f"export.out={out}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exported 1 operations" in proc.stdout and (out / "manifest.json").is_file()
    proc = command("fxpsweep.replay", str(out), cache_dir=cache_dir)
    assert proc.returncode == 0 and proc.stdout.strip() == "1/1 operations match", proc.stdout + proc.stderr


def test_sensitivity_refuses_a_probe_of_its_own_in_one_line(tmp_path, cache_dir) -> None:
    proc = command("fxpsweep.sensitivity", "probe='classifier weight=4'", f"sensitivity.out={tmp_path / 's'}", cache_dir=cache_dir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "fxpsweep: error: probe is set by the study itself, one per job; leave it out"
    assert not (tmp_path / "s" / "sensitivity.csv").exists()


def test_a_job_prints_its_table_and_the_aggregate_command_rebuilds_it(run_app, tmp_path, capsys) -> None:
    proc = run_app("bits=6", "eval_limit=100", f"hydra.run.dir={tmp_path / 'job'}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    assert result["n_eval"] == 100 and result["param_bits"] == result["fwd_bits"] == 6
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| digits_cnn"))
    aggregate.main([str(tmp_path / "job"), "--out", str(tmp_path / "tables")])
    assert row in capsys.readouterr().out  # the same row, from the folder's records
    assert (tmp_path / "tables" / "bits_vs_accuracy.csv").is_file() and (tmp_path / "tables" / "bits_vs_accuracy.png").is_file()
