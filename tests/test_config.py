"""Every config group option composes, and bits drive param_bits and fwd_bits."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO

CONF = REPO / "conf"
KINDS = ("digits", "imagenet", "cifar10")
GROUPS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in ("model", "dataset", "device")}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize(
    "choice", list(itertools.product(GROUPS["model"], GROUPS["dataset"], GROUPS["device"])), ids="-".join
)
def test_every_group_option_composes(choice: tuple[str, str, str]) -> None:
    model, dataset, device = choice
    cfg = _compose([f"model={model}", f"dataset={dataset}", f"device={device}"])
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["name"] == model
    assert resolved["dataset"]["name"] == dataset
    assert resolved["device"]["name"] == device
    assert "_target_" in resolved["model"]["build"] and "_target_" in resolved["dataset"]["splits"]
    assert resolved["model"]["kind"] in KINDS and resolved["dataset"]["kind"] in KINDS


def test_groups_are_the_documented_ones() -> None:
    assert {"digits_cnn", "alexnet", "resnet50", "resnet20_cifar10", "mobilenet_v2_fused"} <= set(GROUPS["model"])
    assert {"digits", "imagenet", "cifar10_test2000", "imagenet_val1300"} <= set(GROUPS["dataset"])
    assert GROUPS["device"] == ["cpu", "cuda"]


def test_bits_is_a_plain_number_that_sets_both_word_lengths() -> None:
    cfg = _compose(["bits=12"])
    assert cfg.bits == 12 and cfg.param_bits == 12 and cfg.fwd_bits == 12
    cfg = _compose(["bits=12", "fwd_bits=16"])
    assert cfg.param_bits == 12 and cfg.fwd_bits == 16
