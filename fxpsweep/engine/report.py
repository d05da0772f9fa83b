"""Per-layer report: each register's format, overflows, and the SQNR of its output against float.

SQNR (signal to quantization noise ratio, dB) of a register is
``10 * log10(sum(float**2) / sum((float - fixed)**2))`` over the report
images, where ``float`` is the same point of the float network (BatchNorm
folded) and ``fixed`` the register's real values ``k * 2**-F`` (both after
the ReLU for a register that only a ReLU reads). Where a
network loses accuracy, the layer where the SQNR drops is the one to widen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd
import torch

from fxpsweep.engine.network import QuantizedNetwork, TensorFormat


@torch.no_grad()
def layer_sqnr(float_twin: QuantizedNetwork, quant: QuantizedNetwork, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """SQNR in dB per register name; ``float_twin`` is an uncalibrated network built from the same model."""
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for x in batches:
        floats: list[torch.Tensor] = []
        hooks = [op.register_forward_hook(lambda m, i, o, store=floats: store.append(o.double().clone())) for op in float_twin.ops]
        float_twin.graph_module(x)
        for h in hooks:
            h.remove()
        fixed: list[torch.Tensor] = []
        hooks = [
            op.register_forward_hook(lambda m, i, o, store=fixed: store.append(o.double() * 2.0**-m.out_fmt.frac_bits))
            for op in quant.ops
        ]
        quant(x)
        for h in hooks:
            h.remove()
        for op, f, q in zip(quant.ops, floats, fixed):
            if op.only_relu_reads:  # what the datapath keeps of this register
                f, q = torch.relu(f), torch.relu(q)
            signal[op.name] = signal.get(op.name, 0.0) + float((f**2).sum())
            noise[op.name] = noise.get(op.name, 0.0) + float(((f - q) ** 2).sum())
    return {
        name: (math.inf if noise[name] == 0 else 10 * math.log10(signal[name] / noise[name]) if signal[name] > 0 else -math.inf)
        for name in signal
    }


def layer_table(formats: list[TensorFormat], sqnr: dict[str, float]) -> pd.DataFrame:
    """One row per register: layer, kind, output W and F; a conv/linear's weight W and F (a range if per
    channel), bias W and accumulator W (``exact``: as wide as needed); overflows / values, SQNR, kernel."""
    rows = []
    weight_frac: dict[str, list[int]] = {}
    widths: dict[tuple[str, str], int] = {}  # (layer, weight | bias | accumulator) -> W
    for f in formats:
        if f.kind == "weight":
            weight_frac.setdefault(f.layer, []).append(f.frac_bits)
        if f.kind in ("weight", "bias", "accumulator"):
            widths[f.layer, f.kind] = f.total_bits
    for f in formats:
        if f.kind not in ("input", "activation"):
            continue
        wf = weight_frac.get(f.layer)
        rows.append({
            "layer": f.layer,
            "kind": f.kind,
            "W": f.total_bits,
            "F": f.frac_bits,
            "weight W": widths.get((f.layer, "weight"), ""),
            "weight F": "" if not wf else str(wf[0]) if min(wf) == max(wf) else f"{min(wf)}..{max(wf)}",
            "bias W": widths.get((f.layer, "bias"), ""),
            "accumulator W": "" if not wf else widths.get((f.layer, "accumulator"), "exact"),
            "overflows": f"{f.overflows}/{f.values}",
            "SQNR dB": round(sqnr.get(f.layer, math.nan), 2),
            "kernel": f.kernel or "",
        })
    return pd.DataFrame(rows)
