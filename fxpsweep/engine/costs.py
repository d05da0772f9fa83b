"""What a network's word lengths cost: weight memory, activation storage and BitOps.

- weight memory: the sum over every weight of its word length, in KiB (biases
  are listed apart, ``bias_kib``: a few words per channel);
- activation storage: the largest single register (a layer's output, or the
  network input) of one image, in KiB: the buffer a layer-by-layer datapath
  needs at least;
- BitOps: per conv/linear layer, MACs x weight bits x input bits, summed, for
  one image (the cost measure of mixed-precision work such as AIMET's and HAWQ's).

Sizes come from the network's last fixed-point run (``FixedOp.out_numel``).
"""

from __future__ import annotations

from typing import Any

from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.ops import FixedClamp, FixedDot

KIB = 8 * 1024  # bits


def layer_costs(network: QuantizedNetwork) -> dict[str, dict[str, Any]]:
    """Per operation: its registers' word lengths and sizes, and where its inputs come from."""
    layers = {}
    for op in network.ops:
        if op.out_fmt is None:
            continue
        entry: dict[str, Any] = {"output_bits": op.out_fmt.total_bits, "outputs": op.out_numel, "inputs_from": list(op.inputs_from)}
        if isinstance(op, FixedClamp):
            entry["keeps_input_format"] = True
        if isinstance(op, FixedDot):
            weight = op.module.weight
            entry.update(
                weight_bits=op.weight_fmts[0].total_bits,
                weights=weight.numel(),
                bias_bits=op.bias_fmt.total_bits if op.bias_fmt is not None else 0,
                biases=op.module.bias.numel() if op.module.bias is not None else 0,
                input_bits=op.in_fmts[0].total_bits,
                macs=op.out_numel * weight[0].numel(),
            )
        layers[op.name] = entry
    return layers


def totals(layers: dict[str, dict[str, Any]], bits: dict[str, dict[str, int]] | None = None) -> dict[str, float]:
    """``weight_kib``, ``bias_kib``, ``activation_kib`` and ``bitops`` (per image) of ``layer_costs``.

    ``bits``: word lengths to cost instead of the ones that ran, ``{layer: {"weight": 4, "output": 6}}``
    (a layer's input width follows its producer's output). The search prices assignments this way.
    """
    bits = bits or {}
    output: dict[str, int] = {}
    for name, c in layers.items():  # in network order: producers first
        if c.get("keeps_input_format") and c["inputs_from"]:
            output[name] = output[c["inputs_from"][0]]
        else:
            output[name] = bits.get(name, {}).get("output", c["output_bits"])
    weight_kib = bias_kib = bitops = 0.0
    for name, c in layers.items():
        if "weights" not in c:
            continue
        w = bits.get(name, {}).get("weight", c["weight_bits"])
        a = output[c["inputs_from"][0]] if c["inputs_from"] else c["input_bits"]
        weight_kib += c["weights"] * w / KIB
        bias_kib += c["biases"] * bits.get(name, {}).get("bias", c["bias_bits"]) / KIB
        bitops += c["macs"] * w * a
    return {
        "weight_kib": weight_kib,
        "bias_kib": bias_kib,
        "activation_kib": max((c["outputs"] * output[n] for n, c in layers.items()), default=0) / KIB,
        "bitops": bitops,
    }
