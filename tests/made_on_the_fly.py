"""Networks, data and checkpoints made on the fly in the real formats, for tests that must not download anything."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from fxpsweep.models import torchvision_zoo


def random_network(arch: str) -> nn.Module:
    """A torchvision ``arch`` with seeded random weights and randomized BatchNorm (statistics and affine), in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def make_cifar(root: Path, classes: int, n_train: int, n_test: int) -> None:
    """CIFAR-10/100 in torchvision's python-pickle layout (random pixels, labels cycling through the classes)."""
    rng = np.random.default_rng(0)
    folder, label_key = ("cifar-10-batches-py", "labels") if classes == 10 else ("cifar-100-python", "fine_labels")
    (root / folder).mkdir(parents=True)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    test_file = "test_batch" if classes == 10 else "test"
    per_file = n_train // len(train_files)
    for name, n in [(f, per_file) for f in train_files] + [(test_file, n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [i % classes for i in range(n)]}
        (root / folder / name).write_bytes(pickle.dumps(batch))
    meta_name, meta_key = ("batches.meta", "label_names") if classes == 10 else ("meta", "fine_label_names")
    (root / folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(classes)]}))


def make_imagenet_folder(root: Path, images_per_class: dict[int, int], seed: int = 0) -> Path:
    """The standard validation layout: 1000 wnid folders, real JPEGs in the chosen classes."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
    for cls, count in images_per_class.items():
        for i in range(count):
            pixels = rng.integers(0, 256, size=(rng.integers(240, 300), rng.integers(240, 300), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnids[cls] / f"ILSVRC2012_val_{cls:04d}{i:04d}.JPEG", quality=90)
    return root


def save_random_weights(arch: str, torch_home: Path) -> Path:
    """Seeded random weights of torchvision's ``arch`` under the file name its IMAGENET1K_V1 weights download to."""
    member = torchvision_zoo.weights_enum(arch, "IMAGENET1K_V1")
    path = torch_home / "hub" / "checkpoints" / Path(member.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    return path
