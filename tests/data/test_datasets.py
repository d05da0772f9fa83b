"""Dataset loaders on small datasets made on the fly in their real on-disk formats, and the image cache."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from fxpsweep.data.splits import split_cifar, split_imagenet_folder, split_jpeg_pickle
from fxpsweep.core.errors import ConfigError
from fxpsweep.models.cifar_transfer import cifar_transform
from fxpsweep.data.preprocess import CachedImages, prepare
from made_on_the_fly import make_cifar, make_imagenet_folder

RESNET_TRANSFORM = torchvision.transforms.Compose([
    torchvision.transforms.Resize(256), torchvision.transforms.CenterCrop(224),
    torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def python2_pickle(jpegs: list[bytes], labels: list[int]) -> bytes:
    """``{'data': jpegs, 'target': labels}`` pickled the way Python 2 wrote val224_compressed.pkl (protocol 2,
    str values as BINSTRING), written opcode by opcode since Python 3 cannot produce it."""
    out = bytearray(b"\x80\x02}q\x00(")  # PROTO 2, EMPTY_DICT, BINPUT 0, MARK
    out += b"U\x04data" + b"]q\x01("  # SHORT_BINSTRING 'data', EMPTY_LIST, BINPUT 1, MARK
    for jpeg in jpegs:
        out += b"T" + struct.pack("<I", len(jpeg)) + jpeg  # BINSTRING
    out += b"e"  # APPENDS
    out += b"U\x06target" + b"]q\x02("
    for label in labels:
        out += b"M" + struct.pack("<H", label) if label > 255 else b"K" + bytes([label])  # BININT2 / BININT1
    out += b"eu."  # APPENDS, SETITEMS, STOP
    return bytes(out)


@pytest.fixture
def imagenet_pair(tmp_path):
    """An ImageNet-layout folder of real JPEGs, and the same JPEG files in both pickle formats."""
    root = make_imagenet_folder(tmp_path / "val", {3: 2, 500: 3, 999: 2})
    files = sorted(root.rglob("*.JPEG"))  # ImageFolder's order: by class folder, then name
    jpegs = [f.read_bytes() for f in files]
    labels = [int(f.parent.name[1:]) for f in files]
    py2 = tmp_path / "val224_compressed.pkl"
    py2.write_bytes(python2_pickle(jpegs, labels))
    py3 = tmp_path / "val224_py3.pkl"
    py3.write_bytes(pickle.dumps({"data": jpegs, "target": labels}, protocol=4))
    return root, py2, py3, labels


def test_jpeg_pickle_and_folder_load_the_same_tensors(imagenet_pair, tmp_path) -> None:
    root, py2, py3, labels = imagenet_pair
    with open(py2, "rb") as f:  # the hand-written pickle is what Python 2 would have written
        assert pickle.load(f, encoding="bytes")[b"target"] == labels
    folder = split_imagenet_folder(str(root), n_samples=2, eval_limit=None, seed=0)
    for path in (py2, py3):
        pkl = split_jpeg_pickle(str(path), None, str(tmp_path / "cache"), n_samples=2, eval_limit=None, seed=0)
        assert pkl.calibration_source == folder.calibration_source
        for a, b in ((folder.calibration, pkl.calibration), (folder.evaluation, pkl.evaluation)):
            assert len(a) == len(b)
            for (image_a, label_a), (image_b, label_b) in zip(a, b):
                assert label_a == label_b
                assert torch.equal(RESNET_TRANSFORM(image_a), RESNET_TRANSFORM(image_b))
    # The presized pickle gets only the tensor steps of a model's transform (the images are 224 crops already).
    pkl = split_jpeg_pickle(str(py2), None, str(tmp_path / "cache"), n_samples=2, eval_limit=None, seed=0)
    inputs = prepare(pkl, RESNET_TRANSFORM, {"name": "test"}, None)
    image, _ = pkl.evaluation[0]
    tensor_steps = torchvision.transforms.Compose(RESNET_TRANSFORM.transforms[2:])
    assert torch.equal(inputs.evaluation[0][0], tensor_steps(image))


def test_a_file_that_is_not_a_jpeg_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ConfigError, match="not a val224_compressed.pkl"):
        split_jpeg_pickle(str(path), None, str(tmp_path / "cache"), n_samples=1, eval_limit=None, seed=0)


def test_missing_jpeg_pickle_names_the_file_and_url(tmp_path, monkeypatch) -> None:
    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = "http://ml.cs.tsinghua.edu.cn/~chenxi/dataset/val224_compressed.pkl"
    with pytest.raises(ConfigError) as err:
        split_jpeg_pickle(str(tmp_path / "val224_compressed.pkl"), url, str(tmp_path), n_samples=1, eval_limit=None, seed=0)
    assert url in str(err.value) and str(tmp_path / "val224_compressed.pkl") in str(err.value)


def test_image_cache_gives_the_uncached_tensors(tmp_path) -> None:
    root = make_imagenet_folder(tmp_path / "val", {1: 3, 2: 3})
    splits = split_imagenet_folder(str(root), n_samples=2, eval_limit=None, seed=0)
    key = {"name": "imagenet", "root": str(root)}
    plain = prepare(splits, RESNET_TRANSFORM, key, None)
    cached = prepare(splits, RESNET_TRANSFORM, key, tmp_path / "cache")  # fills the cache
    again = prepare(splits, RESNET_TRANSFORM, key, tmp_path / "cache")  # reads it
    assert isinstance(again.evaluation, CachedImages) and len(list((tmp_path / "cache" / "images").iterdir())) == 2
    for part in ("calibration", "evaluation"):
        for (x, y), (xc, yc), (xa, ya) in zip(getattr(plain, part), getattr(cached, part), getattr(again, part)):
            assert torch.equal(x, xc) and torch.equal(x, xa) and y == yc == ya
    # Another crop is another cache entry, never a stale hit.
    other = torchvision.transforms.Compose([torchvision.transforms.Resize(128), torchvision.transforms.CenterCrop(112),
                                            *RESNET_TRANSFORM.transforms[2:]])
    assert prepare(splits, other, key, tmp_path / "cache").evaluation[0][0].shape == (3, 112, 112)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_calibrates_on_training_images_and_evaluates_on_the_test_split(classes, tmp_path, monkeypatch) -> None:
    make_cifar(tmp_path, classes, n_train=50, n_test=30)
    # Our files are not the published ones, whose md5 torchvision checks.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    splits = split_cifar(classes, str(tmp_path), False, n_samples=5, eval_limit=12, seed=0, eval_subset="random")
    assert splits.calibration_source == "train[seed 0: 5 of 50]" and len(splits.evaluation) == 12
    first = split_cifar(classes, str(tmp_path), False, n_samples=5, eval_limit=12, seed=0)
    assert list(first.evaluation.indices) == list(range(12)) and list(splits.evaluation.indices) != list(range(12))
    x, y = prepare(splits, cifar_transform(64), {"name": f"cifar{classes}"}, None).evaluation[0]
    assert x.shape == (3, 64, 64) and 0 <= y < classes


def test_cifar_without_files_or_network_says_what_to_do(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cifar-10-python.tar.gz"):
        split_cifar(10, str(tmp_path), False, n_samples=5, eval_limit=None, seed=0)


def test_eval_subset_is_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="eval_subset='last'"):
        split_cifar(10, str(tmp_path), False, n_samples=5, eval_limit=None, seed=0, eval_subset="last")


def test_python2_pickle_helper_writes_real_jpegs(imagenet_pair) -> None:
    _, py2, _, _ = imagenet_pair
    with open(py2, "rb") as f:
        data = pickle.load(f, encoding="bytes")[b"data"]
    assert Image.open(io.BytesIO(data[0])).format == "JPEG"


def _npz(path: Path, **arrays) -> Path:
    import numpy as np

    np.savez(path, **arrays)
    return path


def bad_npz_files(tmp_path: Path) -> list[tuple[Path, str]]:
    import numpy as np

    good_x = np.zeros((4, 8, 8, 3), np.uint8)
    text = tmp_path / "text.npz"
    text.write_text("not an archive\n")
    npy = tmp_path / "one.npz"
    np.save(npy.with_suffix(".npy"), good_x)
    npy.with_suffix(".npy").rename(npy)
    return [
        (tmp_path, "is a folder; give an .npz file"),
        (text, "cannot be read (not an .npz archive); give an .npz file"),
        (npy, "cannot be read (not an .npz archive)"),
        (_npz(tmp_path / "names.npz", images=good_x, labels=np.zeros(4, np.int64)), "holds arrays ['images', 'labels'], not x and y"),
        (_npz(tmp_path / "gray.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, np.int64)), "x is uint8 of shape (4, 8, 8)"),
        (_npz(tmp_path / "floats.npz", x=good_x.astype(np.float32), y=np.zeros(4, np.int64)), "x is float32 of shape (4, 8, 8, 3)"),
        (_npz(tmp_path / "short.npz", x=good_x, y=np.zeros(3, np.int64)), "y is int64 of shape (3,) for 4 images"),
        (_npz(tmp_path / "negative.npz", x=good_x, y=np.array([0, 1, -1, 2])), "y is int64 of shape (4,) for 4 images"),
    ]


def test_a_bad_npz_dataset_is_one_line_naming_the_file(tmp_path) -> None:
    from fxpsweep.data.splits import split_npz

    for path, message in bad_npz_files(tmp_path):
        with pytest.raises(ConfigError) as err:
            split_npz(str(path), n_samples=1, eval_limit=None, seed=0)
        assert str(err.value).startswith(f"dataset.path={path}") and message in str(err.value) and "\n" not in str(err.value)


def test_labels_the_model_cannot_score_are_refused_before_any_image_is_decoded(imagenet_pair, tmp_path) -> None:
    import numpy as np

    from fxpsweep.data.splits import check_labels, split_image_list, split_npz
    from fxpsweep.models import PretrainedModel

    ten_classes = PretrainedModel(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10)))
    assert ten_classes.classes == 10
    assert PretrainedModel(torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Conv2d(8, 100, 1))).classes == 100
    x = np.zeros((6, 8, 8, 3), np.uint8)
    splits = split_npz(str(_npz(tmp_path / "eleven.npz", x=x, y=np.array([0, 1, 2, 3, 10, 4]))), n_samples=1, eval_limit=None, seed=0)
    evaluation_labels = [label for _, label in splits.evaluation]
    with pytest.raises(ConfigError) as err:
        check_labels(splits.evaluation, ten_classes.classes, "digits_cnn")
    bad = evaluation_labels.index(10)
    assert str(err.value).startswith(f"dataset: evaluation image {bad} has label 10, beyond the 10 classes of model=digits_cnn")
    check_labels(splits.evaluation, 11, "eleven_classes")
    # the pickle (PickledJpegs.labels) and the image list (ImageList.labels) are checked the same way
    root, py2, _, labels = imagenet_pair
    check_labels(split_jpeg_pickle(str(py2), url=None, n_samples=1, eval_limit=None, seed=0, cache_dir=str(tmp_path)).evaluation, 1000, "resnet18")
    with pytest.raises(ConfigError, match="has label 500, beyond the 10 classes"):
        check_labels(split_jpeg_pickle(str(py2), url=None, n_samples=1, eval_limit=None, seed=0, cache_dir=str(tmp_path)).evaluation, 10, "x")
    (root / "list.txt").write_text("".join(f"{f.relative_to(root)}, {int(f.parent.name[1:])}\n" for f in sorted(root.rglob("*.JPEG"))))
    with pytest.raises(ConfigError, match="has label 500, beyond the 500 classes"):
        check_labels(split_image_list(str(root), "list.txt", n_samples=1, eval_limit=None, seed=0).evaluation, 500, "x")
    (root / "bad.txt").write_text("a.JPEG, -1\n")
    with pytest.raises(ConfigError, match=r"bad.txt:1: expected 'path, label' \(a label >= 0\)"):
        split_image_list(str(root), "bad.txt", n_samples=1, eval_limit=None, seed=0)
