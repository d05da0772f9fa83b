"""From dataset images to network inputs, with an optional cache of decoded, cropped images.

A model's transform is a ``Compose``: image steps (resize, crop) on the
decoded image, then tensor steps (``ToTensor``, ``Normalize``). Decoding JPEGs
and resizing is what costs; the result of the image steps is a uint8 image.
The cache keeps those uint8 images of one split in a memory-mapped file
(``cache_dir/images/<key>/images.u8``, N x H x W x C), keyed by the dataset,
which of its images, and the image steps, so the jobs of a sweep decode every
image once; reading applies only the tensor steps, giving the same tensors as
the uncached path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from fxpsweep.data.splits import DataSplits
from fxpsweep.core.progress import progress
from fxpsweep.core.storage import temporary_folder_beside

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def split_steps(transform: Callable | None) -> tuple[Callable | None, Callable | None]:
    """(image steps, tensor steps) of ``transform``: a Compose is cut before its ``ToTensor``.

    A transform that is not a Compose with a ``ToTensor`` is all image steps
    (its output cannot be cached as uint8): ``(transform, None)``.
    """
    # torchvision is imported by the models whose transforms it makes, not here: a job of a model without
    # one (the embedded default) then starts without its import, which is seconds.
    transforms = sys.modules.get("torchvision.transforms")
    if transforms is not None and isinstance(transform, transforms.Compose):
        steps = transform.transforms
        for i, step in enumerate(steps):
            if isinstance(step, transforms.ToTensor):
                image = transforms.Compose(steps[:i]) if i else None
                return image, transforms.Compose(steps[i:])
    return transform, None


class Transformed(Dataset):
    """``(transform(image), label)`` for every ``(image, label)`` of ``images`` (``None``: unchanged)."""

    def __init__(self, images: Dataset, transform: Callable | None) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, label = self.images[index]
        return (self.transform(image) if self.transform is not None else image), label


class CachedImages(Dataset):
    """uint8 images from a cache folder (see the module docstring), passed through ``tensor_steps``."""

    def __init__(self, folder: Path, tensor_steps: Callable) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        self.images = np.memmap(folder / "images.u8", dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
        self.labels = np.load(folder / "labels.npy")
        self.tensor_steps = tensor_steps

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        # A writable copy: ToTensor wraps the array without copying.
        return self.tensor_steps(np.array(self.images[index])), int(self.labels[index])


def _fill_cache(images: Dataset, image_steps: Callable | None, folder: Path, desc: str) -> bool:
    """Write the uint8 results of ``image_steps`` into ``folder`` (atomically); False if they differ in shape."""
    tmp = temporary_folder_beside(folder)
    try:
        data, labels = None, np.empty(len(images), np.int64)
        for i in progress(range(len(images)), desc=desc, unit="image"):
            image, labels[i] = images[i]
            array = np.asarray(image_steps(image) if image_steps is not None else image)
            if array.dtype != np.uint8:
                return False
            if data is None:
                shape = (len(images), *array.shape)
                data = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=shape)
            if array.shape != data.shape[1:]:
                log.info("image cache off: image %d is %s, image 0 was %s", i, array.shape, data.shape[1:])
                return False
            data[i] = array
        if data is None:
            return False
        data.flush()
        np.save(tmp / "labels.npy", labels)
        (tmp / "meta.json").write_text(json.dumps({"shape": list(data.shape)}))
        del data
        try:
            os.replace(tmp, folder)  # the folder appears whole, or not at all
        except OSError:
            if not (folder / "meta.json").exists():  # not "another job of the sweep finished it first"
                raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_or_transformed(
    images: Dataset, transform: Callable | None, presized: bool, key: dict[str, Any] | None, cache_dir: str | Path | None, desc: str
) -> Dataset:
    """``images`` turned into network inputs by ``transform``, through the image cache where possible.

    ``presized``: the images are network-sized already; only the tensor steps
    apply. ``key``: what identifies these images (dataset config, which
    images); None or no ``cache_dir`` turns the cache off.
    """
    image_steps, tensor_steps = split_steps(transform)
    if presized and tensor_steps is not None:
        image_steps = None
    if tensor_steps is None or key is None or cache_dir is None:
        return Transformed(images, transform if not presized else tensor_steps)
    text = json.dumps({"version": CACHE_VERSION, **key, "image_steps": repr(image_steps)}, sort_keys=True, default=str)
    folder = Path(cache_dir).expanduser() / "images" / hashlib.sha256(text.encode()).hexdigest()[:24]
    if (folder / "meta.json").exists() or _fill_cache(images, image_steps, folder, desc):
        return CachedImages(folder, tensor_steps)
    if image_steps is None:
        return Transformed(images, tensor_steps)
    from torchvision.transforms import Compose  # there are tensor steps: split_steps cut a Compose

    return Transformed(images, Compose([image_steps, tensor_steps]))


def subset_key(dataset: Dataset) -> list[int] | None:
    """The indices of a ``Subset`` (what part of its dataset it is), for cache keys."""
    indices = getattr(dataset, "indices", None)
    return [int(i) for i in indices] if indices is not None else None


def prepare(splits: DataSplits, transform: Callable | None, dataset_config: dict[str, Any], cache_dir: str | Path | None) -> DataSplits:
    """``splits`` with every image turned into a network input (cached when ``cache_dir`` is given)."""
    def one(part: Dataset, name: str) -> Dataset:
        indices = subset_key(part)
        digest = hashlib.sha256(json.dumps(indices).encode()).hexdigest() if indices is not None else None
        key = {"dataset": dataset_config, "split": name, "images": digest, "n": len(part)} if digest else None
        return cached_or_transformed(part, transform, splits.presized, key, cache_dir, f"caching {name} images")

    return DataSplits(one(splits.calibration, "calibration"), one(splits.evaluation, "evaluation"), splits.calibration_source, splits.presized)

