"""The real torchvision loading path, offline: weights in a temporary TORCH_HOME, a tiny ImageNet folder."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch

from fxpsweep.core.errors import ConfigError
from fxpsweep.models import torchvision_zoo
from made_on_the_fly import make_imagenet_folder, save_random_weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_resnet50_runs_from_a_checkpoint_in_torch_home(run_app, torch_home, tmp_path) -> None:
    checkpoint = save_random_weights("resnet50", torch_home)
    assert checkpoint.name == "resnet50-0676ba61.pth"  # the name torchvision downloads to
    root = make_imagenet_folder(tmp_path / "val", {0: 3, 7: 3})
    out = tmp_path / "out"
    proc = run_app(
        "model=resnet50", "dataset=imagenet", f"dataset.root={root}", "n_samples=2", "batch_size=4",
        # What is tested is the loading path; the exact kernels, their timed choice, the mse weight search and
        # the SQNR report (a minute and a half on ResNet-50 here) are proven in tests/engine and tests/backends.
        "arithmetic=fast", "calibration.weights=max", "report_images=0",
        f"hydra.run.dir={out}", env={"TORCH_HOME": str(torch_home)},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["n_eval"] == 4 and result["n_samples"] == 2
    assert "excluded from evaluation" in result["calibration_images"]
    assert result["published_top1"] == pytest.approx(76.13)  # from the weights' metadata


def test_missing_weights_name_the_file_and_url(torch_home, monkeypatch) -> None:
    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError) as err:
        torchvision_zoo.pretrained("alexnet", "IMAGENET1K_V1")
    message = str(err.value)
    assert str(torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message


def test_corrupt_checkpoint_is_reported(torch_home) -> None:
    path = save_random_weights("resnet18", torch_home)
    path.write_bytes(path.read_bytes()[:1000])  # a truncated download
    with pytest.raises(ConfigError, match="corrupt"):
        torchvision_zoo.pretrained("resnet18", "IMAGENET1K_V1")


def test_unknown_weights_and_arch_list_the_choices() -> None:
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        torchvision_zoo.weights_enum("alexnet", "IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="resnet50"):
        torchvision_zoo.weights_enum("resnet5000", "IMAGENET1K_V1")
