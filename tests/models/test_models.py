"""Every model option builds offline from a checkpoint where its config expects one, and runs at 8 bits;
the embedded digits model ships its weights.

ImageNet models: random weights saved under the file name torchvision
downloads to, in a temporary TORCH_HOME. CIFAR models: random weights at the
config's checkpoint path, in the layout their real checkpoints have.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.core.errors import ConfigError
from fxpsweep.models import torchvision_zoo
from fxpsweep.sweep.job import build

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml") if p.stem not in ("digits_cnn", "mobilenet_v2_fused"))
CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100}


def model_config(name: str, tmp_path: Path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}", f"data_dir={tmp_path / 'data'}", f"cache_dir={tmp_path / 'cache'}"])
    return cfg.model


def save_random_checkpoint(model_cfg, torch_home: Path) -> Path:
    """Random weights where the config looks for them, in the layout of the real file."""
    torch.manual_seed(0)
    if model_cfg.kind == "imagenet":
        member = torchvision_zoo.weights_enum(model_cfg.arch, model_cfg.weights)
        path = torch_home / "hub" / "checkpoints" / Path(member.url).name
        state = torchvision.models.get_model(model_cfg.arch, weights=None).state_dict()
    else:
        path = Path(model_cfg.checkpoint)
        state = instantiate(model_cfg.build.architecture).state_dict()
        if "state_dict_key" in model_cfg.build:  # akamaster's layout: DataParallel keys inside a dict
            state = {model_cfg.build.state_dict_key: {model_cfg.build.strip_prefix + k: v for k, v in state.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture
def offline(monkeypatch) -> None:
    def fail(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)


# One model of each kind of layer mix runs a batch quantized at 8 bits; the others (the VGGs, AlexNet's conv, ReLU,
# max-pool, adaptive average pool, dropout and linear layers; deeper ResNets; the CIFAR heads on ImageNet
# architectures) consist of the same kinds of layers, so they build from their checkpoint and run a float batch, which
# proves their configs (weights file, layout, classes) without quantizing the same layers again. (Quantizing VGG-16's
# 138M weights alone took 7.6 GB, twice the memory any other test needs.)
QUANTIZED = {"alexnet", "resnet18", "resnet50", "squeezenet_v0", "squeezenet_v1", "mobilenet_v2", "resnet20_cifar10"}


@pytest.mark.parametrize("name", MODELS)
def test_model_builds_from_its_checkpoint_and_runs_one_batch(name: str, tmp_path, torch_home, offline) -> None:
    cfg = model_config(name, tmp_path)
    save_random_checkpoint(cfg, torch_home)
    model = instantiate(cfg.build)
    # Small inputs keep the test fast; every architecture here accepts 64x64 (CIFAR ResNets: 32x32).
    size = 32 if "depth" in cfg else 64
    if name in QUANTIZED:
        # Weights by the max rule: the mse search over VGG's 100M classifier weights takes about a minute
        # and is tested on its own (test_calibration); here what matters is that every model builds and runs.
        # Fast arithmetic: one kernel per layer, none timed against the others (the exact kernels and their
        # choice are proven on every layer kind in tests/engine and tests/backends).
        net = QuantizedNetwork(model.module, QuantSettings(param_bits=8, fwd_bits=8, weight_calibration="max", arithmetic="fast"))
        net.calibrate([torch.randn(2, 3, size, size)])
    else:
        net = model.module.eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, size, size))
    assert logits.shape == (2, CLASSES[cfg.kind]) and torch.isfinite(logits).all()
    if cfg.kind == "imagenet":  # published accuracy from the weights' metadata
        assert 50.0 < model.meta["published_top1"] < 90.0


@pytest.mark.parametrize("name", MODELS)
def test_missing_checkpoint_names_the_file_and_where_to_get_it(name: str, tmp_path, torch_home, offline) -> None:
    cfg = model_config(name, tmp_path)
    with pytest.raises(ConfigError) as err:
        build(cfg.build)
    message = str(err.value)
    if cfg.kind == "imagenet":
        url = torchvision_zoo.weights_enum(cfg.arch, cfg.weights).url
        assert url in message and str(torch_home / "hub" / "checkpoints" / Path(url).name) in message
    else:
        assert cfg.checkpoint in message
        assert (cfg.url in message) if cfg.url else f"python -m fxpsweep.finetune model={name}" in message


def test_run_py_reports_a_missing_checkpoint_without_a_traceback(run_app, tmp_path) -> None:
    images = tmp_path / "images.npz"
    np.savez(images, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    # A proxy on a closed port: the download fails at once, as on a machine without internet.
    proc = run_app(
        "model=resnet32_cifar10", "dataset=cifar10_test2000", f"dataset.path={images}", "n_samples=1",
        f"data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}",
        env={"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"},
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "resnet32-d509ac18.th" in proc.stderr
    assert "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet32-d509ac18.th" in proc.stderr


def test_bring_your_own_strips_prefixes_and_finds_the_state_dict(tmp_path) -> None:
    from fxpsweep.models.checkpoint import from_state_dict
    from fxpsweep.models.cifar_resnet import cifar_resnet

    source = cifar_resnet(20)
    path = tmp_path / "mine.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = from_state_dict(cifar_resnet(20), str(path), state_dict_key="model", strip_prefix="module.")
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(ConfigError, match="missing"):
        from_state_dict(cifar_resnet(32), str(path), state_dict_key="model", strip_prefix="module.")


def test_the_digits_model_ships_its_weights_and_trains_nothing(tmp_path) -> None:
    from fxpsweep.models.digits_cnn import (
        WEIGHTS_DIR,
        TrainingRecipe,
        file_sha256,
        pretrained_digits_cnn,
    )

    recipe = TrainingRecipe()
    shipped = WEIGHTS_DIR / f"digits_cnn-{recipe.key()}.pt"
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(shipped) and record["recipe"] == dataclasses.asdict(recipe)
    model = pretrained_digits_cnn(tmp_path)
    assert model.meta["checkpoint"] == str(shipped) and not any(tmp_path.iterdir())


def test_a_changed_recipe_trains_once_and_is_cached(tmp_path) -> None:
    from fxpsweep.models.digits_cnn import TrainingRecipe, pretrained_digits_cnn

    recipe = TrainingRecipe(epochs=1, width=4)
    first = pretrained_digits_cnn(tmp_path, recipe)
    path = Path(first.meta["checkpoint"])
    assert path.parent == tmp_path and recipe.key() in path.name
    stamp = path.stat().st_mtime_ns
    again = pretrained_digits_cnn(tmp_path, recipe)
    assert path.stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(first.module.state_dict().values(), again.module.state_dict().values()))


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch) -> None:
    from fxpsweep.models import digits_cnn

    recipe = digits_cnn.TrainingRecipe()
    name = f"digits_cnn-{recipe.key()}"
    for suffix in (".pt", ".json"):
        shutil.copy(digits_cnn.WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    data = bytearray((tmp_path / f"{name}.pt").read_bytes())
    data[-100] ^= 1
    (tmp_path / f"{name}.pt").write_bytes(bytes(data))
    monkeypatch.setattr(digits_cnn, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ConfigError, match="does not match the sha256"):
        digits_cnn.pretrained_digits_cnn(tmp_path / "cache")
