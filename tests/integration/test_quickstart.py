"""The README tells the truth: its first quick-start command, run verbatim in a new folder with an empty
cache, prints exactly the README's digits table, cell for cell."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from conftest import REPO


def readme_quickstart_sweep() -> list[str]:
    """The arguments of ``run.py`` in the README's first quick-start command."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    first = block.strip().splitlines()[0]
    command = first.split("&&")[-1].strip()
    words = shlex.split(command)
    assert words[:2] == [".venv/bin/python", "run.py"], command
    return words[2:]


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every table row in ``text`` (the separator row left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[:\-| ]+\|", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_quickstart_sweep_prints_the_readme_table(tmp_path) -> None:
    args = readme_quickstart_sweep()
    assert "bits=2,3,4,5,6,8,16" in args  # the curve: where the digits network falls
    folder, cache = tmp_path / "fresh", tmp_path / "cache"
    folder.mkdir()
    env = {**os.environ, "FXPSWEEP_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    readme = (REPO / "README.md").read_text()
    expected = markdown_rows(readme.split("<!-- digits-table -->", 1)[1].split("<!-- /digits-table -->", 1)[0])
    printed = markdown_rows(proc.stdout)
    assert printed == expected
    assert (folder / "multirun").is_dir() and not list(cache.glob("digits_cnn-*.pt"))  # shipped weights: nothing trained
