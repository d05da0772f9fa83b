"""Datasets and the split of their images into calibration and evaluation images.

Calibration images never appear among the evaluation images: they come from
the training split where the dataset has one (digits), else from a seeded
random slice of the evaluation split that is then excluded (ImageNet val).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from fxpsweep.core.errors import ConfigError

# The digits split is fixed: the embedded model is trained on the training part,
# so the held-out part must be the same for training and evaluation.
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0
IMAGENET_CLASSES = 1000


@dataclass
class DataSplits:
    """Calibration and evaluation images of one job, and where the calibration images came from."""

    calibration: Dataset
    evaluation: Dataset
    calibration_source: str  # e.g. "train[seed 0: 20 of 1257]"
    # The images are already resized and cropped to the network's input (the original
    # tool's val224 pickle): only the tensor steps of a model's transform apply.
    presized: bool = False


def labels_of(images: Dataset) -> np.ndarray | None:
    """The label of every image of ``images`` without decoding any (None where the dataset keeps them elsewhere)."""
    if isinstance(images, Subset):
        inner = labels_of(images.dataset)
        return None if inner is None else inner[np.asarray(images.indices, dtype=np.int64)]
    if isinstance(images, TensorDataset):
        return images.tensors[1].numpy()
    labels = getattr(images, "labels", getattr(images, "targets", None))
    return None if labels is None else np.asarray(labels)


def check_labels(images: Dataset, classes: int, model: str) -> None:
    """Refuse evaluation images whose label the model cannot score (a class index beyond its outputs)."""
    labels = labels_of(images)
    outside = (labels < 0) | (labels >= classes) if labels is not None else np.zeros(0, bool)
    if outside.any():
        bad = int(np.argmax(outside))
        raise ConfigError(
            f"dataset: evaluation image {bad} has label {int(labels[bad])}, beyond the {classes} classes of model={model} "
            f"(labels 0..{classes - 1}); choose a model of this dataset's classes"
        )


EVAL_SUBSETS = ("first", "random")
EVAL_SPLITS = ("all", "search", "holdout")


def digits_splits(test_fraction: float = DIGITS_TEST_FRACTION, split_seed: int = DIGITS_SPLIT_SEED) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 digits as (train, test) TensorDatasets, stratified.

    Images: float32 ``(N, 1, 8, 8)`` in ``[0, 1]`` (pixel value / 16). Labels: int64 0..9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=split_seed, stratify=y.numpy()
    )
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def _seeded_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def check_counts(n_samples: int, eval_limit: int | None, eval_subset: str = "first", eval_split: str = "all") -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"n_samples={n_samples!r} must be a positive integer (number of calibration images)")
    if eval_limit is not None and (isinstance(eval_limit, bool) or not isinstance(eval_limit, int) or eval_limit < 1):
        raise ConfigError(f"eval_limit={eval_limit!r} must be a positive integer, or null for all evaluation images")
    if eval_subset not in EVAL_SUBSETS:
        raise ConfigError(f"eval_subset={eval_subset!r} is unknown; allowed: {', '.join(EVAL_SUBSETS)}")
    if eval_split not in EVAL_SPLITS:
        raise ConfigError(f"eval_split={eval_split!r} is unknown; allowed: {', '.join(EVAL_SPLITS)}")


def _evaluation_indices(candidates: list[int], eval_limit: int | None, eval_subset: str, seed: int, eval_split: str = "all") -> list[int]:
    """``eval_limit`` of ``candidates``: the first ones (the original tool's "first 1000"), or a seeded random
    choice kept in dataset order; all of them when ``eval_limit`` is None.

    ``eval_split``: ``all`` the candidates, or one of two disjoint halves drawn
    once by the seed, whatever ``eval_limit`` is: ``search`` (where a bit-width
    search chooses) and ``holdout`` (where its choice is judged)."""
    if eval_split != "all":
        half = sorted(_seeded_order(len(candidates), seed + 2)[: len(candidates) // 2])  # seed + 2: its own draw
        chosen = set(half) if eval_split == "search" else set(range(len(candidates))) - set(half)
        candidates = [c for i, c in enumerate(candidates) if i in chosen]
    if eval_limit is None or eval_limit >= len(candidates):
        return list(candidates)
    if eval_subset == "first":
        return list(candidates[:eval_limit])
    chosen = sorted(_seeded_order(len(candidates), seed + 1)[:eval_limit])  # seed + 1: not the calibration draw
    return [candidates[i] for i in chosen]


def _split_train_test(
    train: Dataset, test: Dataset, n_samples: int, eval_limit: int | None, eval_subset: str, seed: int, eval_split: str = "all",
    presized: bool = False,
) -> DataSplits:
    """For a dataset with a training split: ``n_samples`` seeded training images calibrate, the test split evaluates."""
    check_counts(n_samples, eval_limit, eval_subset, eval_split)
    if n_samples > len(train):
        raise ConfigError(f"n_samples={n_samples} exceeds the {len(train)} training images")
    calibration = Subset(train, _seeded_order(len(train), seed)[:n_samples])
    evaluation = Subset(test, _evaluation_indices(list(range(len(test))), eval_limit, eval_subset, seed, eval_split))
    return DataSplits(calibration, evaluation, f"train[seed {seed}: {n_samples} of {len(train)}]", presized)


def _split_held_out(
    images: Dataset, n_samples: int, eval_limit: int | None, eval_subset: str, seed: int, eval_split: str = "all",
    presized: bool = False,
) -> DataSplits:
    """For a dataset with one split: a seeded random slice calibrates, the rest (or eval_limit of it) evaluates."""
    check_counts(n_samples, eval_limit, eval_subset, eval_split)
    n = len(images)
    if n_samples >= n:
        raise ConfigError(f"n_samples={n_samples} leaves no evaluation image among the {n} images")
    calib_idx = _seeded_order(n, seed)[:n_samples]
    taken = set(calib_idx)
    eval_idx = _evaluation_indices([i for i in range(n) if i not in taken], eval_limit, eval_subset, seed, eval_split)
    source = f"val[seed {seed}: {n_samples} of {n}, excluded from evaluation]"
    return DataSplits(Subset(images, calib_idx), Subset(images, eval_idx), source, presized)


def split_digits(n_samples: int, eval_limit: int | None, seed: int, eval_subset: str = "first", eval_split: str = "all") -> DataSplits:
    """Calibration: ``n_samples`` seeded images of the training split. Evaluation: the held-out split."""
    train, test = digits_splits()
    return _split_train_test(train, test, n_samples, eval_limit, eval_subset, seed, eval_split)


def imagenet_folder(root: str | None) -> Dataset:
    """ImageNet validation images in the standard layout: ``root/<wnid>/*.JPEG``, 1000 wnid folders.

    Labels are the positions of the wnids in sorted order, which is
    torchvision's class index order. Empty class folders are allowed (a subset).
    """
    from torchvision.datasets import ImageFolder

    how = (
        "give the ILSVRC2012 validation images in the standard layout, one folder per class "
        "(root/n01440764/ILSVRC2012_val_00000293.JPEG, ...; 1000 folders), as dataset.root=DIR"
    )
    if root is None:
        raise ConfigError(f"dataset=imagenet needs dataset.root: {how}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(f"dataset.root={root} does not exist or is not a folder; {how}")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if len(classes) != IMAGENET_CLASSES:
        raise ConfigError(f"dataset.root={root} has {len(classes)} class folders, not {IMAGENET_CLASSES}; {how}")
    images = ImageFolder(str(path), allow_empty=True)
    if len(images) == 0:
        raise ConfigError(f"dataset.root={root} has the 1000 class folders but no images in them; {how}")
    return images


def split_imagenet_folder(
    root: str | None, n_samples: int, eval_limit: int | None, seed: int, eval_subset: str = "first", eval_split: str = "all"
) -> DataSplits:
    """ImageNet validation folder (PIL images): a seeded slice of ``n_samples`` calibrates, the rest evaluates."""
    check_counts(n_samples, eval_limit, eval_subset, eval_split)
    return _split_held_out(imagenet_folder(root), n_samples, eval_limit, eval_subset, seed, eval_split)


class NpzImages(Dataset):
    """Images and labels from an ``.npz`` file: ``x`` uint8 ``(N, H, W, 3)`` RGB, ``y`` integer labels.

    Yields ``(PIL image, label)``, for the model's transform.
    """

    def __init__(self, path: str | Path) -> None:
        import zipfile

        wanted = "give an .npz file with arrays x (N, H, W, 3) uint8 and y (N) integer labels"
        if Path(path).is_dir():
            raise ConfigError(f"dataset.path={path} is a folder; {wanted}")
        try:
            archive = np.load(path, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):  # one .npy array
                raise ValueError(path)
            with archive:
                names = list(archive.files)
                images, labels = (archive["x"], archive["y"]) if {"x", "y"} <= set(names) else (None, None)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else "not an .npz archive"
            raise ConfigError(f"dataset.path={path} cannot be read ({why}); {wanted}") from None
        if images is None:
            raise ConfigError(f"dataset.path={path} holds arrays {names}, not x and y; {wanted}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ConfigError(f"dataset.path={path}: x is {images.dtype} of shape {tuple(images.shape)}; {wanted}")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
            raise ConfigError(f"dataset.path={path}: y is {labels.dtype} of shape {tuple(labels.shape)} for {len(images)} images; {wanted}")
        self.images, self.labels = images, labels.astype("int64")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.fromarray(self.images[index]), int(self.labels[index])


class ImageList(Dataset):
    """Images listed in a text file, one ``relative/path.JPEG, LABEL`` per line (0-based labels).

    Yields ``(PIL RGB image, label)``, for the model's transform.
    """

    def __init__(self, root: str | Path, list_file: str) -> None:
        self.root = Path(root)
        self.items = []
        for number, line in enumerate((self.root / list_file).read_text().splitlines(), 1):
            if not line.strip():
                continue
            name, _, label = line.rpartition(",")
            if not name or not label.strip().isdigit():
                raise ConfigError(f"{self.root / list_file}:{number}: expected 'path, label' (a label >= 0), got {line!r}")
            self.items.append((name.strip(), int(label)))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def __getitem__(self, index: int):
        from PIL import Image

        name, label = self.items[index]
        with Image.open(self.root / name) as image:
            return image.convert("RGB"), label


def _existing(path: str | None, key: str, what: str) -> Path:
    if path is None:
        raise ConfigError(f"{key} is not set; {what}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}={path} does not exist; {what}")
    return p


def split_npz(path: str | None, n_samples: int, eval_limit: int | None, seed: int, eval_subset: str = "first", eval_split: str = "all") -> DataSplits:
    """One ``.npz`` split (see NpzImages): a seeded slice of ``n_samples`` calibrates, the rest evaluates."""
    check_counts(n_samples, eval_limit, eval_subset, eval_split)
    file = _existing(path, "dataset.path", "give an .npz file with arrays x (N, H, W, 3) uint8 and y")
    return _split_held_out(NpzImages(file), n_samples, eval_limit, eval_subset, seed, eval_split)


def split_image_list(
    root: str | None, list_file: str, n_samples: int, eval_limit: int | None, seed: int, eval_subset: str = "first", eval_split: str = "all"
) -> DataSplits:
    """A folder of images with a list file (see ImageList): a seeded slice calibrates, the rest evaluates."""
    check_counts(n_samples, eval_limit, eval_subset, eval_split)
    folder = _existing(root, "dataset.root", f"give the folder that holds {list_file} and the images it lists")
    if not (folder / list_file).is_file():
        raise ConfigError(f"dataset.root={root} has no {list_file} (lines 'relative/path.JPEG, LABEL')")
    return _split_held_out(ImageList(folder, list_file), n_samples, eval_limit, eval_subset, seed, eval_split)


CIFAR_URLS = {10: "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 100: "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}


def cifar_images(classes: int, root: str, train: bool, download: bool) -> Dataset:
    """torchvision's CIFAR-10/100 (PIL images), downloaded into ``root`` when allowed and missing."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = {10: CIFAR10, 100: CIFAR100}.get(classes)
    if cls is None:
        raise ConfigError(f"dataset.classes={classes!r}: CIFAR has 10 or 100 classes")
    folder = Path(root).expanduser()
    try:
        return cls(str(folder), train=train, download=download)
    except RuntimeError as err:  # "Dataset not found or corrupted"
        raise ConfigError(
            f"CIFAR-{classes} is not in dataset.root={root} ({err}); allow dataset.download=true on a connected "
            f"machine, or unpack {CIFAR_URLS[classes]} there (the folder {cls.base_folder}/)"
        ) from None
    except OSError as err:  # the download itself failed
        raise ConfigError(
            f"CIFAR-{classes} could not be downloaded from {CIFAR_URLS[classes]} into {root} ({type(err).__name__}: {err}); "
            f"download it elsewhere and unpack it into dataset.root"
        ) from None


def split_cifar(
    classes: int, root: str, download: bool, n_samples: int, eval_limit: int | None, seed: int, eval_subset: str = "first", eval_split: str = "all"
) -> DataSplits:
    """CIFAR-10/100 through torchvision: calibration from the 50000 training images, evaluation on the 10000 test images."""
    check_counts(n_samples, eval_limit, eval_subset, eval_split)
    train, test = cifar_images(classes, root, True, download), cifar_images(classes, root, False, download)
    return _split_train_test(train, test, n_samples, eval_limit, eval_subset, seed, eval_split)


def split_jpeg_pickle(
    path: str | None, url: str | None, cache_dir: str, n_samples: int, eval_limit: int | None, seed: int, eval_subset: str = "first", eval_split: str = "all"
) -> DataSplits:
    """The original tool's ``val224_compressed.pkl`` (see ``jpeg_pickle``): a seeded slice calibrates, the rest evaluates.

    The images are already 224x224 crops: only the tensor steps of a model's
    transform apply (``presized``), as in the original tool.
    """
    from fxpsweep.data.jpeg_pickle import PickledJpegs
    from fxpsweep.core.storage import fetch_file

    check_counts(n_samples, eval_limit, eval_subset, eval_split)
    if path is None:
        raise ConfigError("dataset.path is not set; give the val224_compressed.pkl file")
    file = fetch_file(path, url, "set dataset.path to the val224_compressed.pkl file")
    return _split_held_out(PickledJpegs(file, cache_dir), n_samples, eval_limit, eval_subset, seed, eval_split, presized=True)
