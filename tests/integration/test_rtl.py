"""The golden vectors drive a real Verilog simulation: Icarus Verilog, through cocotb, loads the exported
.mem files with $readmemh into rtl/tb_fxp_linear.v and computes the digits network's classifier; every
output equals the exported code, for nearest_even and floor rounding, and a changed code is caught.

Needs ``iverilog`` (Debian's package; .ci/run installs it): skipped without it, unless
FXPSWEEP_REQUIRE_RTL=1 (CI), where its absence fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

HAVE_ICARUS = shutil.which("iverilog") is not None
pytestmark = [pytest.mark.rtl, pytest.mark.skipif(
    not HAVE_ICARUS and os.environ.get("FXPSWEEP_REQUIRE_RTL") != "1", reason="iverilog is not installed (apt-get install iverilog)"
)]


def export_classifier(out, cache_dir, rounding: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "fxpsweep.export", "export.layers=classifier", "export.n_images=8", f"rounding={rounding}", f"export.out={out}"],
        cwd=REPO, env={**os.environ, "FXPSWEEP_CACHE": str(cache_dir)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "manifest.json").read_text())


def simulate(gold, manifest: dict, expected_mem, build_dir) -> tuple[int, int]:
    """Build and run the testbench on the exported classifier; returns (tests, failures) of the cocotb run."""
    from cocotb_tools.runner import get_results, get_runner

    (op,) = manifest["operations"]
    tensors = manifest["tensors"]
    x, w, b, y = (tensors[op["inputs"][0]], tensors[op["weight"]], tensors[op["bias"]], tensors[op["output"]])
    n, k = x["shape"]
    c = w["shape"][0]
    weight_frac = w["format"].get("frac_bits_per_channel") or [w["format"]["frac_bits"]] * c
    shifts = []
    for frac in weight_frac:  # per output channel: accumulator F minus the bias F and minus the output F
        acc = x["format"]["frac_bits"] + frac
        bias_shift, out_shift = acc - b["format"]["frac_bits"], acc - y["format"]["frac_bits"]
        assert 0 <= bias_shift < 64 and 0 <= out_shift < 64
        shifts.append(f"{(bias_shift << 6) | out_shift:03x}")
    (build_dir / "shift.mem").parent.mkdir(parents=True, exist_ok=True)
    (build_dir / "shift.mem").write_text("\n".join(shifts) + "\n")
    parameters = {
        "N": n, "K": k, "C": c, "W_A": x["format"]["total_bits"], "W_W": w["format"]["total_bits"], "W_B": b["format"]["total_bits"],
        "W_OUT": y["format"]["total_bits"], "W_ACC": 56, "ROUNDING": {"nearest_even": 0, "floor": 1}[y["format"]["rounding"]],
        "A_FILE": f'"{gold / (x["file"] + ".mem")}"', "W_FILE": f'"{gold / (w["file"] + ".mem")}"',
        "B_FILE": f'"{gold / (b["file"] + ".mem")}"', "SHIFT_FILE": f'"{build_dir / "shift.mem"}"',
    }
    runner = get_runner("icarus")
    runner.build(sources=[REPO / "rtl" / "fxp_dot.v", REPO / "rtl" / "tb_fxp_linear.v"], hdl_toplevel="tb_fxp_linear",
                 parameters=parameters, build_dir=build_dir, always=True, timescale=("1ns", "1ps"))
    env = {"EXPECTED_MEM": str(expected_mem), "W_OUT": str(parameters["W_OUT"])}
    results = build_dir / "results.xml"
    try:
        runner.test(
            test_module="fxp_linear_cocotb", hdl_toplevel="tb_fxp_linear", build_dir=build_dir,
            test_dir=REPO / "tests" / "rtl", results_xml=str(results), extra_env=env,
        )
    except SystemExit:  # the runner exits when a cocotb test fails; its results file says which
        pass
    return get_results(results)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache_dir):
    """``exported(rounding)``: the folder and manifest of the classifier's export, made once per rounding."""
    folders: dict[str, tuple] = {}

    def export(rounding: str):
        if rounding not in folders:
            gold = tmp_path_factory.mktemp(rounding) / "gold"
            folders[rounding] = gold, export_classifier(gold, cache_dir, rounding)
        return folders[rounding]

    return export


def output_file(gold, manifest: dict):
    return gold / (manifest["tensors"][manifest["operations"][0]["output"]]["file"] + ".mem")


@pytest.mark.parametrize("rounding", ["nearest_even", "floor"])
def test_the_simulator_computes_the_exported_codes(rounding: str, tmp_path, exported) -> None:
    gold, manifest = exported(rounding)
    assert simulate(gold, manifest, output_file(gold, manifest), tmp_path / "build") == (1, 0)


def test_a_changed_expected_code_fails_the_simulation(tmp_path, exported) -> None:
    gold, manifest = exported("nearest_even")
    lines = output_file(gold, manifest).read_text().splitlines()
    word = len([line for line in lines if line.startswith("//")]) + 13  # output 13
    bits = manifest["tensors"][manifest["operations"][0]["output"]]["format"]["total_bits"]
    lines[word] = f"{(int(lines[word], 16) + 1) % (1 << bits):0{len(lines[word])}x}"
    changed = tmp_path / "changed.mem"
    changed.write_text("\n".join(lines) + "\n")
    assert simulate(gold, manifest, changed, tmp_path / "build") == (1, 1)
