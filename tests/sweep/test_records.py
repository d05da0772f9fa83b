"""A job folder's records stay true: a rerun that starts or fails leaves no earlier result looking current, and a
damaged result.json is reported as damaged (one cell, one warning) and run again, never a crash."""

from __future__ import annotations

import json
import logging

from fxpsweep.sweep import jobdir
from fxpsweep.sweep.aggregate import accuracy_table, load_results

JOB = {"model": "digits_cnn", "dataset": "digits", "param_bits": 8, "fwd_bits": 8}
CONFIG = {"bits": 8}


def finished(folder, **extra) -> None:
    """A folder as a finished job leaves it: job, formats, layer report and result."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / jobdir.JOB_FILE).write_text(json.dumps(JOB))
    (folder / jobdir.FORMATS_FILE).write_text("[]")
    (folder / jobdir.LAYERS_FILE).write_text("# layers\n")
    result = {**JOB, "config": CONFIG, "n_eval": 10, "float_top1": 90.0, "float_top5": 99.0, "quant_top1": 80.0, "quant_top5": 98.0, **extra}
    (folder / jobdir.RESULT_FILE).write_text(json.dumps(result))


def test_a_rerun_that_starts_forgets_the_earlier_result_and_its_reports(tmp_path) -> None:
    finished(tmp_path)
    assert jobdir.finished_result(tmp_path, CONFIG) is not None
    jobdir.mark_started(tmp_path, JOB)
    assert sorted(p.name for p in tmp_path.iterdir()) == [jobdir.JOB_FILE]
    assert jobdir.status(tmp_path) == "incomplete"  # killed now, it shows as killed, not as the old result


def test_a_rerun_that_fails_before_it_starts_leaves_only_its_failure(tmp_path) -> None:
    finished(tmp_path)
    jobdir.record_failure(tmp_path, JOB, ValueError("rule 'x.*' matches no layer"))
    assert jobdir.status(tmp_path) == "failed"
    assert not (tmp_path / jobdir.RESULT_FILE).exists() and not (tmp_path / jobdir.LAYERS_FILE).exists()
    assert jobdir.finished_result(tmp_path, CONFIG) is None
    table = accuracy_table(load_results([tmp_path]))
    assert table["8"].tolist() == ["FAILED"]


def test_a_damaged_result_is_one_cell_one_warning_and_is_run_again(tmp_path, caplog) -> None:
    finished(tmp_path / "bits=8")
    finished(tmp_path / "bits=4", param_bits=4, fwd_bits=4)
    (tmp_path / "bits=4" / jobdir.JOB_FILE).write_text(json.dumps({**JOB, "param_bits": 4, "fwd_bits": 4}))
    for damage in (b'{"model": "digits_cnn", "quant_to', b"\xff\xfe\x00", b"[1, 2]"):
        (tmp_path / "bits=4" / jobdir.RESULT_FILE).write_bytes(damage)
        assert jobdir.status(tmp_path / "bits=4") == "damaged"
        assert jobdir.finished_result(tmp_path / "bits=4", CONFIG) is None  # a rerun runs it
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            table = accuracy_table(load_results([tmp_path]))
        assert table[["4", "8"]].values.tolist() == [["DAMAGED", "80.00/98.00"]]
        assert len(caplog.records) == 1 and "bits=4" in caplog.records[0].getMessage() and "damaged" in caplog.records[0].getMessage()


def test_a_folder_with_no_readable_record_is_left_out_with_a_warning(tmp_path, caplog) -> None:
    finished(tmp_path / "bits=8")
    (tmp_path / "bits=4").mkdir()
    (tmp_path / "bits=4" / jobdir.RESULT_FILE).write_text("not json")
    with caplog.at_level(logging.WARNING):
        results = load_results([tmp_path])
    assert results.path.tolist() == [str(tmp_path / "bits=8")]
    assert "left out" in caplog.text
