"""Golden vectors: an export replays, operation for operation, in numpy alone (no torch), and tampering,
foreign or damaged folders and bad settings are caught with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SHARED_DATA
from made_on_the_fly import random_network
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.core.errors import ConfigError
from fxpsweep.golden.export import check_destination, export, mem_text
from fxpsweep.core.rules import parse_rule

# Replay with torch made unimportable: the checker needs numpy alone.
REPLAY_WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from fxpsweep.golden.replay import main; main(sys.argv[1:])"


def replay(folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", REPLAY_WITHOUT_TORCH, str(folder)], cwd=REPO, capture_output=True, text=True, timeout=900)


def exported(tmp_path, arch: str, settings: QuantSettings, rules=None, size: int = 40):
    net = QuantizedNetwork(random_network(arch), settings, rules=rules)
    torch.manual_seed(1)
    net.calibrate([torch.randn(2, 3, size, size)])
    out = tmp_path / arch
    manifest = export(net, torch.randn(1, 3, size, size), out, {"model": arch})
    return out, manifest


# Every pair of (network, word length, weight granularity) once (pairwise, not the full product); accumulator
# words (wrap and saturate) on one network: the residual adds of resnet18 exercise both.
PLAIN_FORMATS = [("resnet18", 8, "channel", None), ("resnet18", 16, "tensor", None),
                 ("mobilenet_v2", 8, "tensor", None), ("mobilenet_v2", 16, "channel", None)]
ACCUMULATOR_FORMATS = [("resnet18", 8, "channel", "wrap"), ("resnet18", 8, "channel", "saturate")]


@pytest.mark.parametrize(("arch", "bits", "granularity", "acc"), PLAIN_FORMATS + ACCUMULATOR_FORMATS)
def test_every_operation_replays(arch: str, bits: int, granularity: str, acc: str | None, tmp_path) -> None:
    settings = QuantSettings(bits, bits, weight_granularity=granularity, acc_bits=22 if acc else None, acc_overflow=acc or "wrap")
    out, manifest = exported(tmp_path, arch, settings)
    proc = replay(out)
    n = len(manifest["operations"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{n}/{n} operations match"
    kinds = {op["kind"] for op in manifest["operations"]}
    assert {"input", "conv", "linear", "avgpool", "add"} <= kinds
    if acc:
        assert all(op["accumulator"] == {"total_bits": 22, "overflow": acc} for op in manifest["operations"] if op["kind"] == "conv")


def test_a_mixed_precision_assignment_replays(tmp_path) -> None:
    rules = [parse_rule(r) for r in ("layer1.* weight=4 output=6", "layer2.*.conv2 weight=12 output=14", "fc weight=16", "add_1 output=10")]
    out, manifest = exported(tmp_path, "resnet18", QuantSettings(8, 8), rules)
    widths = {manifest["tensors"][op["output"]]["format"]["total_bits"] for op in manifest["operations"]}
    assert {6, 8, 10, 14} <= widths
    proc = replay(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gptq_codes_are_what_the_vectors_carry_and_replay(tmp_path) -> None:
    out, manifest = exported(tmp_path, "mobilenet_v2", QuantSettings(5, 8, weight_rounding="gptq"))
    proc = replay(out)
    n = len(manifest["operations"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"{n}/{n} operations match", proc.stdout + proc.stderr


def test_a_flipped_code_is_caught_and_named(tmp_path) -> None:
    out, manifest = exported(tmp_path, "resnet18", QuantSettings(8, 8), size=32)
    op = next(o for o in manifest["operations"] if o["name"] == "layer2.0.conv1")
    path = out / f"{manifest['tensors'][op['output']]['file']}.npy"
    codes = np.load(path)
    codes.reshape(-1)[37] ^= 1
    np.save(path, codes)
    proc = replay(out)
    assert proc.returncode == 1
    assert "operation layer2.0.conv1 (conv): first difference at index" in proc.stdout and "replay gives" in proc.stdout
    # The .npy restored and a word of the .mem changed: the file is named.
    codes.reshape(-1)[37] ^= 1
    np.save(path, codes)
    mem = out / f"{manifest['tensors'][op['output']]['file']}.mem"
    lines = mem.read_text().splitlines()
    lines[10] = "7f" if lines[10] != "7f" else "00"
    mem.write_text("\n".join(lines) + "\n")
    proc = replay(out)
    assert proc.returncode != 0 and f"{mem}: word 6 is" in proc.stderr


def test_damaged_and_foreign_folders_are_one_line_errors(tmp_path) -> None:
    assert "is not a folder" in replay(tmp_path / "nowhere").stderr
    out, manifest = exported(tmp_path, "resnet18", QuantSettings(8, 8), size=32)
    weight = out / f"{manifest['tensors']['conv1.weight']['file']}.npy"
    whole = weight.read_bytes()
    weight.write_bytes(whole[:-50])
    proc = replay(out)
    assert proc.returncode != 0 and f"{weight} is truncated or not a .npy file" in proc.stderr and "Traceback" not in proc.stderr
    weight.write_bytes(whole)
    other = dict(manifest, version=99)
    (out / "manifest.json").write_text(json.dumps(other))
    proc = replay(out)
    assert "version 99; this replay reads 'fxpsweep-golden-vectors' version 1" in proc.stderr
    (out / "manifest.json").write_text(json.dumps(manifest))
    mem = out / f"{manifest['tensors']['fc']['file']}.mem"
    mem.write_text("\n".join(mem.read_text().splitlines()[:-1]) + "\n")
    proc = replay(out)
    assert f"{mem} has" in proc.stderr and "truncated or damaged" in proc.stderr


@pytest.mark.parametrize(("frac", "scale"), [(3, "value = code * 2^-3"), (0, "value = code * 2^0"), (-2, "value = code * 2^2")])
def test_a_mem_header_states_the_scale_of_any_fraction_width(frac: int, scale: str) -> None:
    text = mem_text("conv1", np.array([[-1, 2]]), {"total_bits": 8, "frac_bits": frac, "rounding": "floor", "overflow": "wrap"}, "NC")
    assert f"8-bit two's complement, {scale}; floor, wrap" in text
    assert text.splitlines()[-2:] == ["ff", "02"]


def test_a_destination_that_cannot_take_an_export_is_refused_before_any_work(tmp_path) -> None:
    (tmp_path / "old").mkdir()
    cases = [
        (tmp_path / "old", "nearest_even", f"export.out={tmp_path / 'old'} exists; choose a new folder"),
        (tmp_path / "new", "stochastic", "rounding=stochastic draws random numbers that golden vectors cannot hold"),
        (Path("/proc/fxpsweep/golden"), "nearest_even", "export.out=/proc/fxpsweep/golden: its folder cannot be made"),
    ]
    for out, rounding, message in cases:
        with pytest.raises(ConfigError) as err:
            check_destination(out, rounding)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    check_destination(tmp_path / "new", "nearest_even")  # a new folder in a writable one is fine
    assert not (tmp_path / "new").exists()


def test_bad_export_settings(tmp_path) -> None:
    net = QuantizedNetwork(random_network("resnet18"), QuantSettings(8, 8))
    net.calibrate([torch.randn(2, 3, 32, 32)])
    with pytest.raises(ConfigError, match="export.layers='layer9.*' matches no operation; closest"):
        export(net, torch.randn(1, 3, 32, 32), tmp_path / "a", {}, layers="layer9.*")
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="exists; choose a new folder"):
        export(net, torch.randn(1, 3, 32, 32), tmp_path / "b", {})
    assert not list(tmp_path.glob(".a.*"))  # nothing half-written left behind


def test_a_layer_pattern_exports_only_those_operations(tmp_path) -> None:
    net = QuantizedNetwork(random_network("resnet18"), QuantSettings(8, 8))
    net.calibrate([torch.randn(2, 3, 32, 32)])
    umask = os.umask(0o027)  # the folder and its files get the modes the umask gives, as a team's tools expect
    try:
        manifest = export(net, torch.randn(1, 3, 32, 32), tmp_path / "l", {}, layers="layer3.*")
    finally:
        os.umask(umask)
    assert (tmp_path / "l").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "l").rglob("*") if p.is_file()} == {0o640}
    assert {op["name"] for op in manifest["operations"]} == {"layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv1", "layer3.1.conv2"}
    assert replay(tmp_path / "l").returncode == 0


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
@pytest.mark.parametrize("model,dataset", [("resnet20_cifar10", "cifar10_test2000"), ("mobilenet_v2_fused", "imagenet_val1300")])
def test_real_networks_on_real_images_export_and_replay(model: str, dataset: str, tmp_path, cache_dir) -> None:
    out = tmp_path / "golden"
    proc = subprocess.run(
        [sys.executable, "-m", "fxpsweep.export", f"model={model}", f"dataset={dataset}", "bits=8", "export.n_images=2", f"export.out={out}"],
        cwd=REPO, env={**os.environ, "FXPSWEEP_CACHE": str(cache_dir), "FXPSWEEP_DATA": str(SHARED_DATA)},
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == model and len(manifest["images"]["indices"]) == 2
    checked = replay(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
