"""Every config group option composes, bits drive param_bits and fwd_bits, and the job schema is what Hydra
composes, what the settings and identity are made of, and what the docs list."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.sweep.config import DOCS_MARKERS, job_identity, markdown_rows, quant_settings, schema_keys

CONF = REPO / "conf"
KINDS = ("digits", "imagenet", "cifar10", "cifar100")
GROUPS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in ("model", "dataset", "device")}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def every_combination() -> list:
    """Every (model, dataset, device); the quick tier runs a set that has each option once (model k with the
    k-th dataset and device, cycling), the full suite all."""
    models, datasets, devices = GROUPS["model"], GROUPS["dataset"], GROUPS["device"]
    quick = {(m, datasets[k % len(datasets)], devices[k % len(devices)]) for k, m in enumerate(models)}
    return [c if c in quick else pytest.param(c, marks=pytest.mark.slow)
            for c in itertools.product(models, datasets, devices)]


@pytest.mark.parametrize("choice", every_combination(), ids="-".join)
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
    imagenet = ["alexnet", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "squeezenet_v0", "squeezenet_v1", "mobilenet_v2"]
    cifar = [f"{arch}_cifar{n}" for arch in ("alexnet", "squeezenet_v1", "mobilenet_v2", "resnet18", "resnet50") for n in (10, 100)]
    cifar_resnets = [f"resnet{depth}_cifar10" for depth in (20, 32, 44, 56, 110)]
    assert set(GROUPS["model"]) == {"digits_cnn", "mobilenet_v2_fused", *imagenet, *cifar, *cifar_resnets}
    assert set(GROUPS["dataset"]) == {
        "digits", "imagenet", "imagenet_pkl", "cifar10", "cifar100", "cifar10_test2000", "imagenet_val1300"
    }
    assert GROUPS["device"] == ["cpu", "cuda"]


def test_bits_is_a_plain_number_that_sets_both_word_lengths() -> None:
    cfg = _compose(["bits=12"])
    assert cfg.bits == 12 and cfg.param_bits == 12 and cfg.fwd_bits == 12
    cfg = _compose(["bits=12", "fwd_bits=16"])
    assert cfg.param_bits == 12 and cfg.fwd_bits == 16


def test_the_composed_defaults_are_the_schemas_and_make_the_settings_and_identity() -> None:
    cfg = _compose([])
    for name, f in schema_keys():
        value = OmegaConf.select(cfg, name)
        assert value == f.default or str(f.default).startswith("${"), name
    assert quant_settings(cfg) == QuantSettings(param_bits=8, fwd_bits=8)  # QuantSettings' own defaults agree
    identity = job_identity(_compose(["calibration.weights=max", "bits=6"]))
    assert identity["weight_calibration"] == "max" and identity["param_bits"] == 6 and identity["model"] == "digits_cnn"


def test_the_docs_list_every_schema_key_as_declared() -> None:
    docs = (REPO / "docs" / "configuration.md").read_text()
    for marker in DOCS_MARKERS:
        table = docs.split(f"<!-- {marker} -->\n", 1)[1].split(f"<!-- /{marker} -->", 1)[0].splitlines()[2:]
        assert table == markdown_rows(marker), "rewrite it: python -m fxpsweep.sweep.config docs/configuration.md"


def test_a_cache_folder_with_a_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch) -> None:
    import os

    from fxpsweep.core.errors import ConfigError
    from fxpsweep.sweep.config import check_config

    (tmp_path / "kernels").mkdir()
    (tmp_path / "images").mkdir()
    cfg = _compose([f"cache_dir={tmp_path}"])
    check_config(cfg)
    (tmp_path / "images").chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make os.access answer as it would for anyone else
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: bool(os.stat(p).st_mode & 0o200) and real_access(p, mode))
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value) == (f"cache_dir={tmp_path}: its folder images/ cannot be written; give a folder fxpsweep can write "
                              "to throughout, or make it writable")
    (tmp_path / "images").chmod(0o755)
