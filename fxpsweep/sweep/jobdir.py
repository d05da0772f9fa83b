"""What a job's folder says about it: done, failed, incomplete (started, never finished), or new.

A job writes ``job.json`` (what it is) when it starts, ``result.json`` when it
finishes, and ``error.json`` (message and traceback) when it raises; all
atomically. A folder with ``job.json`` only was killed (or is still running):
SIGKILL, ``scancel``, a node that died. The status is read from the files, not
from SLURM, so a SLURM job reported COMPLETED whose Hydra job failed still
counts as failed.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

from fxpsweep.sweep.storage import atomic_write_json

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
STATUSES = ("done", "failed", "incomplete", "new")


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
