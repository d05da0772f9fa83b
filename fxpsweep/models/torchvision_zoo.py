"""torchvision classifiers with pinned ImageNet weights, downloaded into torch's hub cache.

Weights are named by their enum member (``IMAGENET1K_V1``), never ``DEFAULT``,
which moves between torchvision releases. The file lands where torchvision
puts it, ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``, so a machine
without internet can be given the file by copying it there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from fxpsweep.core.errors import ConfigError
from fxpsweep.models import PretrainedModel
from fxpsweep.core.storage import fetch_file, load_checkpoint

log = logging.getLogger(__name__)


def weights_enum(arch: str, weights: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights member ``weights`` of architecture ``arch``."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        known = ", ".join(torchvision.models.list_models(module=torchvision.models))
        raise ConfigError(f"arch={arch!r} is not a torchvision classifier; known: {known}") from None
    try:
        return enum[weights]
    except KeyError:
        names = ", ".join(m.name for m in enum)
        raise ConfigError(f"weights={weights!r} are not published for {arch}; choose one of: {names}") from None


def checkpoint_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch.hub keeps (or will download) the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def fetch_state_dict(weights: torchvision.models.WeightsEnum) -> dict[str, torch.Tensor]:
    """The state dict of ``weights``: from the hub cache, else downloaded (hash-checked) into it."""
    path = fetch_file(checkpoint_file(weights), weights.url, "the folder follows TORCH_HOME")
    return load_checkpoint(path)


def imagenet_transform(weights: torchvision.models.WeightsEnum) -> transforms.Compose:
    """The preprocessing published with ``weights``, as a Compose of its steps.

    The same arithmetic as ``weights.transforms()`` (resize, centre crop, to
    [0, 1], normalize), but written as separate steps so that the image cache
    can keep the cropped uint8 images and apply only the tensor steps.
    """
    preset = weights.transforms()
    return transforms.Compose([
        transforms.Resize(preset.resize_size, interpolation=preset.interpolation, antialias=preset.antialias),
        transforms.CenterCrop(preset.crop_size),
        transforms.ToTensor(),
        transforms.Normalize(preset.mean, preset.std),
    ])


def pretrained(arch: str, weights: str) -> PretrainedModel:
    """A torchvision ImageNet classifier with pinned weights and their preprocessing and metadata."""
    member = weights_enum(arch, weights)
    model = torchvision.models.get_model(arch, weights=None)
    try:
        model.load_state_dict(fetch_state_dict(member))
    except RuntimeError as err:  # wrong keys or shapes
        raise ConfigError(f"{checkpoint_file(member)} does not fit {arch}: {err}") from None
    metrics = member.meta.get("_metrics", {}).get("ImageNet-1K", {})
    meta = {
        "weights": f"{type(member).__name__}.{member.name}",
        "url": member.url,
        "published_top1": metrics.get("acc@1"),
        "published_top5": metrics.get("acc@5"),
    }
    return PretrainedModel(model.eval(), imagenet_transform(member), meta)


def mobilenet_v2_without_batchnorm() -> torch.nn.Module:
    """torchvision's MobileNetV2 with BatchNorm folded away: every BatchNorm2d an Identity,
    every Conv2d with a bias, every ReLU6 a ReLU (the layout of BN-folded exports such as
    torchvision's 8-bit MobileNetV2 turned back into float)."""
    model = torchvision.models.mobilenet_v2()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(parent, name, torch.nn.Identity())
            elif isinstance(child, torch.nn.ReLU6):
                setattr(parent, name, torch.nn.ReLU(inplace=True))
            elif isinstance(child, torch.nn.Conv2d) and child.bias is None:
                conv = torch.nn.Conv2d(
                    child.in_channels, child.out_channels, child.kernel_size, child.stride,
                    child.padding, child.dilation, child.groups, bias=True,
                )
                setattr(parent, name, conv)
    return model
