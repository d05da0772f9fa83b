"""Fine-tune an ImageNet network on CIFAR-10/100: the checkpoints of the ``*_cifar10`` / ``*_cifar100`` models.

The original tool's recipe, transfer learning: every layer starts from the
torchvision ImageNet weights (``IMAGENET1K_V1``), the classifier head is new
(random, ``num_classes`` outputs), and the whole network trains with SGD and
momentum on the 50000 training images, resized to the model's ``input_size``
(224 by default) with random crops (4-pixel padding) and flips, for
``finetune.epochs`` epochs (default 3) under a cosine learning rate. The state
dict is written atomically to the model's ``checkpoint`` path, where the
quantization jobs look for it:

    python -m fxpsweep.finetune model=resnet18_cifar10 dataset=cifar10 device=cuda
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from fxpsweep.data.preprocess import Transformed
from fxpsweep.data.splits import cifar_images
from fxpsweep.core.errors import ConfigError, one_line_errors
from fxpsweep.models.cifar_transfer import cifar_transform, imagenet_initialised
from fxpsweep.core.progress import progress
from fxpsweep.engine.evaluate import predict
from fxpsweep.sweep.config import check_config, check_config_files
from fxpsweep.sweep.job import resolve_device  # and with it the job schema Hydra composes (fxpsweep.sweep.config)
from fxpsweep.core.storage import atomic_torch_save

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    """Fine-tuning hyperparameters (``finetune.*`` in the config)."""

    epochs: int = 3
    lr: float = 0.01  # peak learning rate, cosine-annealed to 0 over all steps
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    train_limit: int | None = None  # train on the first N training images (None: all 50000)


def train(model: nn.Module, images: Dataset, recipe: Recipe, device: torch.device) -> nn.Module:
    """SGD with momentum and a cosine schedule on ``images`` (network inputs and labels); returns ``model``."""
    loader = DataLoader(images, batch_size=recipe.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, recipe.epochs * len(loader)))
    model.to(device).train()
    for epoch in range(recipe.epochs):
        for x, y in progress(loader, desc=f"fine-tuning, epoch {epoch + 1}/{recipe.epochs}", unit="batch"):
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def top1(model: nn.Module, images: Dataset, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` in percent."""
    return predict([model], DataLoader(images, batch_size=batch_size), device, desc="testing")[0].accuracy().top1


def finetune(cfg: DictConfig) -> float:
    """Fine-tune ``cfg.model`` on ``cfg.dataset``, save it to the model's checkpoint, return its test top-1."""
    if "arch" not in cfg.model or "num_classes" not in cfg.model:
        raise ConfigError(f"model={cfg.model.name} is not a CIFAR transfer model (*_cifar10 / *_cifar100 of a torchvision arch)")
    if cfg.dataset.name != f"cifar{cfg.model.num_classes}":
        raise ConfigError(f"model={cfg.model.name} fine-tunes on dataset=cifar{cfg.model.num_classes}, not dataset={cfg.dataset.name}")
    recipe = Recipe(**cfg.finetune)
    device = resolve_device(cfg.device.name)
    torch.manual_seed(cfg.seed)
    to_input = cifar_transform(cfg.model.input_size)
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), to_input])
    train_images = cifar_images(cfg.model.num_classes, cfg.dataset.root, True, cfg.dataset.download)
    if recipe.train_limit is not None:
        train_images = Subset(train_images, range(min(recipe.train_limit, len(train_images))))
    test_images = cifar_images(cfg.model.num_classes, cfg.dataset.root, False, cfg.dataset.download)
    test_images = Subset(test_images, range(min(cfg.eval_limit or len(test_images), len(test_images))))

    model = imagenet_initialised(cfg.model.arch, cfg.model.num_classes)
    train(model, Transformed(train_images, augment), recipe, device)
    accuracy = top1(model, Transformed(test_images, to_input), recipe.batch_size, device)
    atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, cfg.model.checkpoint)
    log.info("%s: test top-1 %.2f %% on %d images; saved %s", cfg.model.name, accuracy, len(test_images), cfg.model.checkpoint)
    return accuracy


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        check_config(cfg)
        finetune(cfg)


if __name__ == "__main__":
    with one_line_errors():  # before Hydra reads them
        check_config_files(sys.argv[1:])
    main()
