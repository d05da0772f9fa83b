"""The CIFAR fine-tuning script: ImageNet weights in, a checkpoint the quantization jobs load out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir

from conftest import REPO
from fxpsweep import finetune
from fxpsweep.core.errors import ConfigError
from fxpsweep.sweep.job import build
from made_on_the_fly import make_cifar, save_random_weights


def finetune_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("finetune", overrides=[
            f"data_dir={tmp_path / 'data'}", f"cache_dir={tmp_path / 'cache'}", "dataset.download=false", *overrides,
        ])


def test_finetune_starts_from_imagenet_weights_and_writes_a_loadable_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    imagenet = torch.load(save_random_weights("resnet18", tmp_path / "torch_home"))
    make_cifar(tmp_path / "data" / "cifar", 10, n_train=20, n_test=8)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    cfg = finetune_config(
        tmp_path, "model=resnet18_cifar10", "model.input_size=64", "finetune.epochs=1", "finetune.batch_size=10",
    )
    accuracy = finetune.finetune(cfg)
    assert 0.0 <= accuracy <= 100.0
    state = torch.load(cfg.model.checkpoint)
    assert state["fc.weight"].shape == (10, 512)
    # The body started from the ImageNet weights and moved by training; the run loads it as its model.
    assert not torch.equal(state["layer4.1.conv2.weight"], imagenet["layer4.1.conv2.weight"])
    assert (state["layer4.1.conv2.weight"] - imagenet["layer4.1.conv2.weight"]).abs().max() < 0.5
    model = build(cfg.model.build)
    assert torch.equal(model.module.state_dict()["fc.weight"], state["fc.weight"])


def test_finetune_refuses_a_model_it_cannot_train(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a CIFAR transfer model"):
        finetune.finetune(finetune_config(tmp_path, "model=resnet20_cifar10"))
    with pytest.raises(ConfigError, match="dataset=cifar100"):
        finetune.finetune(finetune_config(tmp_path, "model=resnet18_cifar100", "dataset=cifar10"))
