"""Files written atomically get the mode the umask gives, as a plain open would: a team reads what a job wrote."""

from __future__ import annotations

import os
import stat

import pytest

from fxpsweep.core.storage import atomic_torch_save, atomic_write_json, atomic_write_text, temporary_folder_beside


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomically_written_files_get_the_umask_mode(umask: int, tmp_path) -> None:
    atomic_write_text(tmp_path / "layers.md", "# layers\n")
    atomic_write_json(tmp_path / "result.json", {"quant_top1": 1.0})
    atomic_torch_save({"x": 1}, tmp_path / "stats.pt")
    for name in ("layers.md", "result.json", "stats.pt"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    atomic_write_text(tmp_path / "layers.md", "# again\n")  # a replaced file too
    assert mode(tmp_path / "layers.md") == 0o666 & ~umask


def test_a_temporary_folder_renamed_into_place_gets_the_umask_mode(umask: int, tmp_path) -> None:
    tmp = temporary_folder_beside(tmp_path / "golden")
    assert tmp.parent == tmp_path and tmp.name.startswith(".golden.")
    tmp.rename(tmp_path / "golden")
    assert mode(tmp_path / "golden") == 0o777 & ~umask
