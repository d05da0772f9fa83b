"""What a job's folder says about it: done, failed, incomplete (started, never finished), or new.

One process at a time checks, runs and records a job (``claimed``). A job
writes ``job.json`` (what it is) when it starts, ``result.json`` when it
finishes, and ``error.json`` (message and traceback) when it raises; all
atomically. Starting or failing removes the records of an earlier run
(``result.json``, ``formats.json``, ``layers.md``), so a rerun that fails
never leaves an old result looking current. A folder with ``job.json`` only
was killed (or is still running): SIGKILL, ``scancel``, a node that died. A
``result.json`` that is not a JSON object (a damaged disk, a hand edit) makes
the folder ``damaged``: reported as such, and run again by a rerun. The
status is read from the files, not from SLURM, so a SLURM job reported
COMPLETED whose Hydra job failed still counts as failed.

A job's folder is named by its overrides (``bits=8,model=resnet50``), made
safe by ``folder_name``: Hydra calls it through the ``fxpsweep.job_folder``
resolver in ``conf/config.yaml``, registered when this module is imported
(which ``run.py`` does, in the launcher's process and in every SLURM job).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fxpsweep.core.storage import atomic_write_json, read_record

log = logging.getLogger(__name__)

LOCK_FILE = "job.lock"  # held while a process checks, runs and records the job: one process per job at a time
JOB_FILE = "job.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
FORMATS_FILE = "formats.json"  # the formats and the layer report, written just before the result
LAYERS_FILE = "layers.md"
STATUSES = ("done", "damaged", "failed", "incomplete", "new")
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
        return "done" if read_record(folder / RESULT_FILE) is not None else "damaged"
    if (folder / ERROR_FILE).exists():
        return "failed"
    if (folder / JOB_FILE).exists():
        return "incomplete"
    return "new"


def finished_result(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of ``folder`` if it was made with exactly ``config``, else None (also where it is damaged)."""
    result = read_record(folder / RESULT_FILE)
    return result if result is not None and result.get("config") == config else None


def _forget_earlier_run(folder: Path) -> None:
    for name in (RESULT_FILE, FORMATS_FILE, LAYERS_FILE, ERROR_FILE):
        (folder / name).unlink(missing_ok=True)


@contextlib.contextmanager
def claimed(folder: Path) -> Iterator[None]:
    """Hold the job folder's lock (``flock``): a second process given the same job (two identical sweeps into one
    folder) waits here until the first is done, then finds the result and skips it. The lock goes with the
    process, also when it is killed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is running the job in %s; waiting for it", folder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def mark_started(folder: Path, identity: dict[str, Any]) -> None:
    """Record that the job ``identity`` started here, and where it runs; forget every record of an earlier run."""
    _forget_earlier_run(folder)
    where = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    atomic_write_json(folder / JOB_FILE, {**identity, **where})


def record_failure(folder: Path, identity: dict[str, Any], error: BaseException) -> None:
    """Write ``error.json``: the job, the error's type and message, and the traceback; an earlier run's result
    goes (a job that failed before it started, on a bad value, leaves no older result looking current)."""
    _forget_earlier_run(folder)
    atomic_write_json(folder / ERROR_FILE, {
        **identity,
        "error_type": type(error).__name__,
        "error": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    })
