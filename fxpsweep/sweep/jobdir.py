"""What a job's folder says about it: done, failed, incomplete (started, never finished), or new.

A job writes ``job.json`` (what it is) when it starts, ``result.json`` when it
finishes, and ``error.json`` (message and traceback) when it raises; all
atomically. A folder with ``job.json`` only was killed (or is still running):
SIGKILL, ``scancel``, a node that died. The status is read from the files, not
from SLURM, so a SLURM job reported COMPLETED whose Hydra job failed still
counts as failed.

A job's folder is named by its overrides (``bits=8,model=resnet50``), made
safe by ``folder_name``: Hydra calls it through the ``fxpsweep.job_folder``
resolver in ``conf/config.yaml``, registered when this module is imported
(which ``run.py`` does, in the launcher's process and in every SLURM job).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fxpsweep.core.storage import atomic_write_json

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
STATUSES = ("done", "failed", "incomplete", "new")
# Characters kept in a folder name; anything else (/, spaces, quotes, brackets, ...) becomes "_".
UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@-]")
NAME_BYTES = 200  # of the readable part; with the hash, well below the 255-byte limit of a file name


def folder_name(overrides: str) -> str:
    """A flat, safe and unique folder name for a job's override string (Hydra's ``override_dirname``).

    An override string of safe characters (letters, digits, ``. _ , = + @ -``)
    up to 200 bytes is the name as it is. Otherwise every other character
    becomes ``_``, the result is cut to 200 bytes, and ``-h`` plus 10 hex digits
    of the sha256 of the full override string is appended, so two jobs never
    share a folder: ``dataset.root=/a/b/c`` -> ``dataset.root=_a_b_c-h1f0e...``.
    Which job a folder holds is decided by the full config in its files, never by the name.
    """
    safe = UNSAFE.sub("_", overrides)
    if safe == overrides and len(overrides.encode()) <= NAME_BYTES:
        return overrides
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:10]
    return f"{safe.encode()[:NAME_BYTES].decode(errors='ignore')}-h{digest}"


OmegaConf.register_new_resolver("fxpsweep.job_folder", folder_name, replace=True)


def status(folder: Path) -> str:
    """One of ``STATUSES`` for the job folder ``folder``."""
    if (folder / RESULT_FILE).exists():
        return "done"
    if (folder / ERROR_FILE).exists():
        return "failed"
    if (folder / JOB_FILE).exists():
        return "incomplete"
    return "new"


def finished_result(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of ``folder`` if it was made with exactly ``config``, else None."""
    path = folder / RESULT_FILE
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("config") == config else None


def mark_started(folder: Path, identity: dict[str, Any]) -> None:
    """Record that the job ``identity`` started here, and where it runs; forget an earlier failure."""
    (folder / ERROR_FILE).unlink(missing_ok=True)
    where = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    atomic_write_json(folder / JOB_FILE, {**identity, **where})


def record_failure(folder: Path, identity: dict[str, Any], error: BaseException) -> None:
    """Write ``error.json``: the job, the error's type and message, and the traceback."""
    atomic_write_json(folder / ERROR_FILE, {
        **identity,
        "error_type": type(error).__name__,
        "error": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    })
