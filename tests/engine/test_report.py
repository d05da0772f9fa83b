"""layers.md's table names every width a register's layer uses: output, weight, bias and accumulator; a forced kernel that
cannot be exact at those widths is a warning that names the layers."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fxpsweep.core.rules import parse_rule
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.report import layer_table
from fxpsweep.engine.settings import QuantSettings


def small_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def table_of(settings: QuantSettings, rules=()):
    net = QuantizedNetwork(small_network(), settings, rules=[parse_rule(r) for r in rules])
    net.calibrate([torch.randn(4, 3, 8, 8)])
    with torch.no_grad():
        net(torch.randn(2, 3, 8, 8))  # so that each conv/linear row names the kernel that ran it
    return layer_table(net.formats(), {}).set_index("layer")


def test_each_layer_shows_its_weight_bias_and_accumulator_widths() -> None:
    table = table_of(QuantSettings(8, 8, bias_bits=16), rules=["3 weight=3 output=6"])
    assert table.loc["0", ["W", "weight W", "bias W", "accumulator W"]].tolist() == [8, 8, 16, "exact"]
    assert table.loc["3", ["W", "weight W", "bias W", "accumulator W"]].tolist() == [6, 3, 16, "exact"]
    assert table.loc["input_1", ["weight W", "bias W", "accumulator W"]].tolist() == ["", "", ""]  # the input register


def test_an_accumulator_word_is_shown_where_one_is_set() -> None:
    table = table_of(QuantSettings(8, 8, acc_bits=20))
    assert table.loc["0", "accumulator W"] == 20 and table.loc["3", "accumulator W"] == 20


def test_a_forced_kernel_that_cannot_be_exact_is_a_warning_naming_the_layers(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fxpsweep.engine.network"):
        table = table_of(QuantSettings(16, 16, kernel="float32"))
    assert "kernel=float32 cannot compute 2 of the conv/linear layers exactly at these widths (0, 3)" in caplog.text
    ran = table.loc[["0", "3"], "kernel"].tolist()
    assert all(ran) and "float32" not in ran  # they ran on kernels that can
