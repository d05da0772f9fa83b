"""The original tool's ImageNet validation file: pytorch-playground's ``val224_compressed.pkl``.

A pickled dict ``{'data': [JPEG bytes, ...], 'target': [int, ...]}`` of the
50000 validation images, each resized to 256 and centre-cropped to 224 before
JPEG encoding. Unpickling it whole needs about 16 GB of RAM (the complaint of
that tool's users). Here the file is read once as a stream of pickle opcodes
(``pickletools.genops``), never building the objects, to find where each JPEG
lies in the file; the index (offsets, lengths, labels) is cached, and an image
is read by seeking to it.
"""

from __future__ import annotations

import hashlib
import io
import pickletools
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from fxpsweep.core.errors import ConfigError
from fxpsweep.core.progress import progress
from fxpsweep.core.storage import atomic_write_bytes

# Opcodes that carry a byte string, and the size of their header (opcode byte + length field).
BYTES_HEADERS = {"SHORT_BINSTRING": 2, "BINSTRING": 5, "SHORT_BINBYTES": 2, "BINBYTES": 5, "BINBYTES8": 9}
TEXT_OPCODES = {"SHORT_BINSTRING", "BINSTRING", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING"}
INT_OPCODES = {"BININT", "BININT1", "BININT2", "INT", "LONG1", "LONG"}
KEYS = ("data", "target")


def index_pickle(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, lengths, labels) of every JPEG in the pickle at ``path``, by one streaming pass."""
    offsets, lengths, labels = [], [], []
    section = None
    size = path.stat().st_size
    with open(path, "rb") as f, progress(total=size, unit="B", unit_scale=True, desc=f"indexing {path.name}") as bar:
        last = 0
        for opcode, arg, pos in pickletools.genops(f):
            if section == "data" and opcode.name in BYTES_HEADERS and len(arg) > 16:  # a JPEG, not a key
                offsets.append(pos + BYTES_HEADERS[opcode.name])
                lengths.append(len(arg))
            elif opcode.name in TEXT_OPCODES and isinstance(arg, (str, bytes)) and len(arg) <= 16:
                key = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                section = key if key in KEYS else section
            elif section == "target" and opcode.name in INT_OPCODES:
                labels.append(int(arg))
            if pos - last > 1 << 24:
                bar.update(pos - last)
                last = pos
        bar.update(size - last)
    if not offsets or len(offsets) != len(labels):
        raise ConfigError(
            f"{path} is not a val224_compressed.pkl-style file: found {len(offsets)} JPEGs and {len(labels)} "
            "labels; expected a pickled {'data': [JPEG bytes], 'target': [int]} with one label per image"
        )
    return np.array(offsets, np.int64), np.array(lengths, np.int64), np.array(labels, np.int64)


class PickledJpegs(Dataset):
    """The images of a ``val224_compressed.pkl``-style file as ``(PIL RGB image, label)``, read on demand.

    The index is cached in ``cache_dir/datasets/`` keyed by the file's path,
    size and modification time.
    """

    def __init__(self, path: str | Path, cache_dir: str | Path) -> None:
        self.path = Path(path).expanduser()
        stat = self.path.stat()
        key = hashlib.sha256(f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        index_file = Path(cache_dir).expanduser() / "datasets" / f"{self.path.stem}-{key}.npz"
        if index_file.exists():
            with np.load(index_file) as index:
                self.offsets, self.lengths, self.labels = index["offsets"], index["lengths"], index["labels"]
        else:
            self.offsets, self.lengths, self.labels = index_pickle(self.path)
            buffer = io.BytesIO()
            np.savez(buffer, offsets=self.offsets, lengths=self.lengths, labels=self.labels)
            atomic_write_bytes(index_file, buffer.getvalue())
        self._file = None  # opened lazily: one handle per DataLoader worker

    def __len__(self) -> int:
        return len(self.labels)

    def jpeg(self, index: int) -> bytes:
        """The encoded JPEG of image ``index``, as stored."""
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(int(self.offsets[index]))
        return self._file.read(int(self.lengths[index]))

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(io.BytesIO(self.jpeg(index))) as image:
            return image.convert("RGB"), int(self.labels[index])

    def __getstate__(self):  # DataLoader workers get their own file handle
        state = dict(self.__dict__)
        state["_file"] = None
        return state
