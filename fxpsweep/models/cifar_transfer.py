"""torchvision ImageNet architectures moved to CIFAR-10/100 by transfer learning.

The original tool's CIFAR variants: the ImageNet network, its classifier head
replaced by one with ``num_classes`` outputs, fine-tuned on CIFAR images
resized to ``input_size`` (see ``fxpsweep.finetune``). Such a checkpoint is
then loaded like any other state dict (``checkpoint.from_state_dict``).
"""

from __future__ import annotations

import torch
import torchvision
from torchvision import transforms

from fxpsweep.models import torchvision_zoo

# torchvision's ImageNet normalization: the fine-tuned features expect it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cifar_transform(input_size: int) -> transforms.Compose:
    """A decoded 32x32 RGB image -> the network input: resized to ``input_size`` pixels, ImageNet-normalized."""
    return transforms.Compose([
        transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def imagenet_initialised(arch: str, num_classes: int, weights: str = "IMAGENET1K_V1") -> torch.nn.Module:
    """``arch`` with ``num_classes`` outputs: every layer from the ImageNet weights but the new head (random).

    The head is whatever parameters change shape with the number of classes,
    found by comparing shapes, so no per-architecture list is needed.
    """
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    imagenet = torchvision_zoo.fetch_state_dict(torchvision_zoo.weights_enum(arch, weights))
    own = model.state_dict()
    body = {k: v for k, v in imagenet.items() if k in own and own[k].shape == v.shape}
    head = sorted(set(own) - set(body))
    if not head or len(head) > 2:  # a weight and a bias: anything else means the shapes did not line up
        raise RuntimeError(f"{arch}: expected a new head of one weight and bias, found {head}")
    model.load_state_dict(body, strict=False)
    return model
