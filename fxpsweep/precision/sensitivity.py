"""Layer sensitivity: each layer's weights alone, and each register alone, at a probe width.

Every probe is one job of a Hydra multirun (``probe="conv1 weight=4"``): the
network at the reference width ``bits`` with that one register narrowed, so
a study runs in parallel on any launcher and resumes like any sweep. The
reference job (``probe=null``) runs in the same sweep. Per probe, the table
gives the top-1 drop against the reference and the SQNR of the network's
output (its logits) against float: how much that one register hurts.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pandas as pd

from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.ops import FixedClamp, FixedDot
from fxpsweep.core.errors import ConfigError
from fxpsweep.core.storage import atomic_write_bytes, atomic_write_text, read_record

STEM = "sensitivity"
log = logging.getLogger(__name__)

REGISTER_KINDS = ("weight", "output")  # what a probe narrows: a conv/linear's weights, or a register's output


def probes(network: QuantizedNetwork, probe_bits: int, kinds: list[str]) -> list[str]:
    """The probe rules of a study, in layer order: ``NAME weight=B`` per conv/linear, ``NAME output=B`` per register.

    Layer names are matched exactly: glob characters in a name are escaped.
    """
    found = []
    for kind in kinds:
        for op in network.ops:
            if kind == "weight" and not isinstance(op, FixedDot):
                continue
            if kind == "output" and isinstance(op, FixedClamp):
                continue  # a clamp keeps its input's format: no register of its own
            found.append(f"{_literal(op.name)} {kind}={probe_bits}")
    return found


def _literal(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def sensitivity_table(sweep_dir: Path) -> pd.DataFrame:
    """One row per probe of the study in ``sweep_dir``: layer, register, probe bits, top-1, drop, output SQNR."""
    records = {p: read_record(p) for p in sorted(sweep_dir.rglob("result.json"))}
    damaged = [p for p, r in records.items() if r is None or "probe" not in r.get("config", {})]
    if damaged:
        log.warning("left out %d damaged result.json (rerun the study to redo them): %s", len(damaged), ", ".join(map(str, damaged[:3])))
    paths = {p: r for p, r in records.items() if p not in damaged}
    reference = [p for p, r in paths.items() if r["config"]["probe"] is None]
    try:
        formats = json.loads((reference[0].parent / "formats.json").read_bytes()) if len(reference) == 1 else None
    except (OSError, ValueError):
        formats = None
    if not isinstance(formats, list):
        raise ConfigError(f"{sweep_dir}: no readable result of the reference job (probe=null) with its formats.json, "
                          "so no drop to measure; see its error.json, and rerun the study")
    ref = paths[reference[0]]
    # Network order, from the reference's formats.json (result.json's dicts are sorted by name).
    order = list(dict.fromkeys(f["layer"] for f in formats))
    results = list(paths.values())
    rows = []
    for r in results:
        probe = r["config"]["probe"]
        if probe is None:
            continue
        pattern, setting = probe.split()
        kind, bits = setting.split("=")
        rows.append({
            "order": order.index(_unescape(pattern)),
            "layer": _unescape(pattern),
            "register": kind,
            "bits": int(bits),
            "top1": round(r["quant_top1"], 2),
            "top1 drop": round(ref["quant_top1"] - r["quant_top1"], 2),
            "output SQNR dB": None if r["output_sqnr_db"] is None else round(r["output_sqnr_db"], 2),
        })
    table = pd.DataFrame(rows).sort_values(["register", "order"], ascending=[False, True]).drop(columns="order")
    table.attrs["reference"] = {k: ref[k] for k in ("model", "dataset", "bits", "quant_top1", "float_top1", "n_eval", "output_sqnr_db")}
    return table.reset_index(drop=True)


def _unescape(pattern: str) -> str:
    for c in "*?[":
        pattern = pattern.replace(f"[{c}]", c)
    return pattern


def write_report(table: pd.DataFrame, out_dir: Path) -> None:
    """``sensitivity.csv``, ``.md`` (with the reference) and ``.png`` (bars in layer order) in ``out_dir``."""
    ref = table.attrs["reference"]
    head = (
        f"{ref['model']} on {ref['dataset']}, {ref['n_eval']} images: every register at {ref['bits']} bits "
        f"gives top-1 {ref['quant_top1']:.2f} (float {ref['float_top1']:.2f}); each row narrows one register.\n\n"
    )
    atomic_write_text(out_dir / f"{STEM}.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / f"{STEM}.md", head + table.to_markdown(index=False) + "\n")
    plot(table, out_dir / f"{STEM}.png")


def plot(table: pd.DataFrame, path: Path) -> None:
    """Top-1 drop and output SQNR per probe, weights and outputs side by side, in layer order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("weight", "output") if (table["register"] == k).any()]
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 6), squeeze=False, sharey="row")
    ref = table.attrs["reference"]
    for col, kind in enumerate(kinds):
        part = table[table["register"] == kind]
        x = range(len(part))
        axes[0][col].bar(x, part["top1 drop"], color="tab:red")
        axes[0][col].set_title(f"{kind} at {part['bits'].iloc[0]} bits, the rest at {ref['bits']}")
        axes[1][col].bar(x, part["output SQNR dB"].fillna(0), color="tab:blue")
        axes[1][col].set_xticks(list(x), part["layer"], rotation=90, fontsize=6)
        axes[0][col].set_xticks([])
    axes[0][0].set_ylabel("top-1 drop (points)")
    axes[1][0].set_ylabel("output SQNR (dB)")
    fig.suptitle(f"layer sensitivity: {ref['model']} on {ref['dataset']}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
