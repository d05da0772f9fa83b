"""Shared fixtures: the repo root, a per-session cache with the trained digits model, and running the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where engine tests run: cpu, or FXPSWEEP_TEST_DEVICE=cuda on a GPU machine (TF32 off)."""
    name = os.environ.get("FXPSWEEP_TEST_DEVICE", "cpu")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the trained embedded model, trained once per test session."""
    from fxpsweep.models.digits_cnn import pretrained_digits_cnn

    path = tmp_path_factory.mktemp("cache")
    pretrained_digits_cnn(path)
    return path


@pytest.fixture
def run_app(cache_dir: Path):
    """Run ``python run.py ARGS`` in a subprocess, with the test cache, and return the finished process."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "FXPSWEEP_CACHE": str(cache_dir), "HYDRA_FULL_ERROR": "0", **(env or {})}
        return subprocess.run(
            [sys.executable, str(REPO / "run.py"), *args],
            cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
        )

    return run
