"""Per-layer word lengths: rules over layer names, what they change, what they cost, and bad rules."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.core.errors import ConfigError
from fxpsweep.engine.costs import layer_costs, totals
from fxpsweep.core.rules import parse_rule


def formats_by_register(path) -> dict[tuple[str, str], int]:
    return {(f["layer"], f["kind"]): f["total_bits"] for f in json.loads(path.read_text())}


def test_rules_on_the_command_line_change_exactly_the_registers_they_name(run_app, tmp_path) -> None:
    uniform = run_app("bits=8", "report_images=0", f"hydra.run.dir={tmp_path / 'uniform'}")
    # Layer names hold dots and globs: a list of quoted rules passes Hydra's override grammar as it is.
    mixed = run_app("bits=8", "report_images=0", 'precision.rules=["features.* weight=5","features.7 weight=3 output=6","pool output=10"]',
                    f"hydra.run.dir={tmp_path / 'mixed'}")
    assert uniform.returncode == 0 and mixed.returncode == 0, mixed.stderr
    before, after = formats_by_register(tmp_path / "uniform" / "formats.json"), formats_by_register(tmp_path / "mixed" / "formats.json")
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert changed == {
        ("features.0", "weight"): (8, 5), ("features.3", "weight"): (8, 5), ("features.7", "weight"): (8, 3),
        ("features.7", "activation"): (8, 6), ("pool", "activation"): (8, 10),
    }  # the later rule wins for features.7's weights
    result = json.loads((tmp_path / "mixed" / "result.json").read_text())
    assert result["precision"].startswith("mixed:") and len(result["precision_rules"]) == 3
    assert result["layer_costs"]["features.7"]["weight_bits"] == 3 and result["layer_costs"]["classifier"]["input_bits"] == 10
    uniform_result = json.loads((tmp_path / "uniform" / "result.json").read_text())
    assert result["weight_kib"] < uniform_result["weight_kib"] and uniform_result["precision"] == "uniform"


def test_costs_of_a_small_network() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    net = QuantizedNetwork(model, QuantSettings(8, 8), rules=[parse_rule("0 weight=4")])
    net.calibrate([torch.randn(4, 3, 5, 5)])
    net(torch.randn(2, 3, 5, 5))
    layers = layer_costs(net)
    assert layers["0"]["macs"] == 4 * 5 * 5 * 27 and layers["3"]["macs"] == 2 * 100
    cost = totals(layers)
    assert cost["weight_kib"] == (108 * 4 + 200 * 8) / 8192
    assert cost["bitops"] == 4 * 5 * 5 * 27 * 4 * 8 + 200 * 8 * 8
    assert cost["activation_kib"] == 100 * 8 / 8192  # the conv's output: the largest register
    # Priced as if the conv's output were 4 bits: the linear layer's input narrows with it.
    assert totals(layers, {"0": {"output": 4}})["bitops"] == 4 * 5 * 5 * 27 * 4 * 8 + 200 * 8 * 4


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("layer9.* weight=4", "matches no layer; closest layer names: "),
        ("features.0 weights=4", "'weights=4' in rule 'features.0 weights=4' is not key=bits; keys: weight, bias, output, acc"),
        ("features.0 weight=1", "weight=1 in rule 'features.0 weight=1' is not a word length; allowed: an integer from 2 to 32"),
        ("features.0", "sets nothing"),
        ("pool weight=4", "only conv/linear layers have weight, bias and acc"),
    ],
)
def test_bad_rules_are_one_line_errors(rule: str, message: str) -> None:
    from fxpsweep.models.digits_cnn import DigitsCNN

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.").replace("*", r"\*")):
        QuantizedNetwork(DigitsCNN(), QuantSettings(8, 8), rules=[parse_rule(rule)])


def test_a_rule_that_matches_nothing_stops_run_py_with_one_line(run_app, tmp_path) -> None:
    proc = run_app('precision.rules=["feature.0 weight=4"]', f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "rule 'feature.0 weight=4' matches no layer; closest layer names: features.0" in proc.stderr
    assert not (tmp_path / "result.json").exists()
