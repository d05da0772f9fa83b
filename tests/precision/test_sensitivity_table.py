"""The sensitivity table is read from the study's job folders: a damaged record is left out with a warning, and a
study without its reference result is one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fxpsweep.core.errors import ConfigError
from fxpsweep.precision.sensitivity import sensitivity_table


def _job(folder: Path, probe: str | None, top1: float) -> Path:
    folder.mkdir(parents=True)
    record = {"config": {"probe": probe}, "quant_top1": top1, "output_sqnr_db": 20.0, "model": "m", "dataset": "d", "bits": 8,
              "float_top1": 90.0, "n_eval": 100}
    (folder / "result.json").write_text(json.dumps(record))
    return folder


def test_a_damaged_probe_is_left_out_with_a_warning_and_a_missing_reference_is_one_line(tmp_path, caplog) -> None:
    reference = _job(tmp_path / "probe=null", None, 88.0)
    (reference / "formats.json").write_text(json.dumps([{"layer": "x"}, {"layer": "conv1"}, {"layer": "fc"}]))
    _job(tmp_path / "fc", "fc weight=4", 80.5)
    _job(tmp_path / "conv1", "conv1 weight=4", 85.0)
    (_job(tmp_path / "damaged", "conv1 output=4", 1.0) / "result.json").write_text('{"config": {"pro')
    with caplog.at_level(logging.WARNING):
        table = sensitivity_table(tmp_path)
    assert list(table["layer"]) == ["conv1", "fc"]  # network order, from the reference's formats.json
    assert list(table["top1 drop"]) == [3.0, 7.5]
    assert "left out 1 damaged result.json" in caplog.text and "damaged" in caplog.text
    (reference / "result.json").unlink()
    with pytest.raises(ConfigError, match=r"no readable result of the reference job \(probe=null\)"):
        sensitivity_table(tmp_path)
