"""Writing files so that a crash never leaves half of one, and reading checkpoints with clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fxpsweep.core.errors import ConfigError

log = logging.getLogger(__name__)


def umask_mode(directory: bool = False) -> int:
    """The mode the process's umask gives a new file (``0o666 & ~umask``) or folder (``0o777 & ~umask``)."""
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def temporary_folder_beside(beside: Path) -> Path:
    """A new temporary folder beside ``beside`` (same file system, for an atomic rename onto it), with the mode
    the umask gives (``mkdtemp`` makes it 0700, which would keep a team from reading it once renamed)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}."))
    tmp.chmod(umask_mode(directory=True))
    return tmp


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, fsync, then rename over it; the file
    gets the mode the umask gives, as a plain ``open`` would (``mkstemp`` makes it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


_in_memory: dict[tuple[str, str], Any] = {}
SOURCES = ("memory", "cache", "computed")  # where a cached result came from, cheapest first


def cache_key(identity: dict[str, Any]) -> str:
    """A short hash of ``identity`` (JSON, keys sorted): the name of its cache file."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(kind: str, identity: dict[str, Any], cache_dir: str | Path | None, compute: Callable[[], Any]) -> tuple[Any, str]:
    """``compute()`` for ``identity``: from memory, from ``cache_dir/<kind>/<key>.pt``, or computed now and kept in both.

    The jobs of a sweep share the memory when they share a process, and the
    folder otherwise (SLURM, later sweeps). The value must be what
    ``torch.load(weights_only=True)`` reads back: tensors, numbers, strings,
    and lists and dicts of them. Returns it and where it came from (``SOURCES``).
    """
    key = cache_key(identity)
    if (kind, key) in _in_memory:
        return _in_memory[(kind, key)], "memory"
    path = Path(cache_dir).expanduser() / kind / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
            _in_memory[(kind, key)] = value
            return value, "cache"
        except Exception as err:  # a damaged cache file is only a lost shortcut
            log.warning("ignoring unreadable cache file %s (%s); computing again", path, err)
    value = compute()
    if path is not None:
        atomic_torch_save(value, path)
    _in_memory[(kind, key)] = value
    return value, "computed"


def fetch_file(path: str | Path, url: str | None, how_else: str) -> Path:
    """``path``, downloaded from ``url`` first where it is missing.

    torch.hub downloads to a temporary file and renames it (a killed download
    leaves no partial file), shows progress, and checks the sha256 prefix that
    names such as ``resnet18-f37072fd.pth`` carry. ``how_else`` tells the user
    how to provide the file another way.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a file; {how_else}")
    if not url:
        raise ConfigError(f"{path} does not exist and no download URL is configured; {how_else}")
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    log.info("downloading %s to %s", url, path)
    try:
        # A live bar on a terminal only: in a log, its every update would be one more line.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=sys.stderr.isatty())
    except Exception as err:  # URLError, HTTPError, hash mismatch, disk full: all mean "not here"
        raise ConfigError(
            f"{path} is missing and could not be downloaded from {url} ({type(err).__name__}: {_first_line(err)}); "
            f"on a machine without internet, download that URL elsewhere and copy the file to {path}; {how_else}"
        ) from None
    return path


def _first_line(err: BaseException) -> str:
    """An exception's message in one line: torch.load's weights-only failure by what it could not read (its
    advice about ``weights_only=False`` does not apply to a file that is no checkpoint), others by their first line."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return (text.splitlines() or [""])[0]


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict saved with ``torch.save``; a corrupt or foreign file gives a ConfigError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # unpickling raises many types; all mean "not a usable checkpoint"
        raise ConfigError(
            f"checkpoint {path} is corrupt or not a torch state dict ({type(err).__name__}: {_first_line(err)}); "
            "delete it so that it is downloaded or trained again"
        ) from None


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in the record file ``path``; None where it is missing, unreadable or not a JSON object."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):  # ValueError: broken JSON or text that is not UTF-8
        return None
    return record if isinstance(record, dict) else None
