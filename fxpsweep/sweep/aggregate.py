"""Merge job results into the bits-vs-accuracy table (CSV, Markdown and a plot).

Reads every job folder below the given folders (see ``jobdir``); where one
configuration ran more than once, the latest record counts. A job that failed
shows ``FAILED`` in its cell, one that started and never finished (killed)
``INCOMPLETE``, one whose ``result.json`` is damaged ``DAMAGED`` (with a
warning; a rerun runs it again): never a silent blank. One row per model and dataset,
one column per bit-width (``w8a10`` where weights and activations differ) plus
a ``float`` column; cells are ``top1/top5`` in percent. Where the results
differ in a datapath or calibration setting (``SETTINGS``), that setting
becomes part of the row. Beside it, the cost table (``bits_vs_cost``) has one
row per finished job: its accuracy next to its weight memory, largest
activation and BitOps, so mixed and uniform word lengths compare on one axis.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from fxpsweep.sweep import jobdir
from fxpsweep.sweep.config import identity_keys
from fxpsweep.core.storage import atomic_write_bytes, atomic_write_text, read_record

TABLE_STEM = "bits_vs_accuracy"
COST_STEM = "bits_vs_cost"
COST_COLUMNS = {"weight_kib": "weight KiB", "activation_kib": "largest activation KiB", "bitops": "GBitOps per image"}
# Datapath, calibration and image settings (every key of the job schema that names a job, but the word lengths
# that make the table's columns, eval_limit and kernel: every exact kernel gives the same result): where a
# sweep varies one, the table gets a row per value.
SETTINGS = [c for c in identity_keys() if c not in ("bits", "param_bits", "fwd_bits", "eval_limit", "kernel")] + ["precision"]
# What makes two results the same configuration (the later one replaces the earlier).
CONFIG_KEYS = ["model", "dataset", "param_bits", "fwd_bits", "eval_limit", *SETTINGS]
# The record a row is read from, by status: a damaged folder's row comes from what the job said when it started.
RECORD_FILES = {"done": jobdir.RESULT_FILE, "damaged": jobdir.JOB_FILE, "failed": jobdir.ERROR_FILE, "incomplete": jobdir.JOB_FILE}

log = logging.getLogger(__name__)


def load_results(sweep_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Every job below ``sweep_dirs``, latest record per configuration, one row each.

    ``status`` is ``done`` (the row has the accuracies), ``failed`` (``error``
    says why), ``incomplete`` or ``damaged``. A folder none of whose records can
    be read is left out, with a warning.
    """
    rows = []
    folders = {p.parent for d in sweep_dirs for name in set(RECORD_FILES.values()) for p in Path(d).rglob(name)}
    for folder in sorted(folders):
        state = jobdir.status(folder)
        path = folder / RECORD_FILES[state]
        row = read_record(path)
        if state == "damaged" or row is None:
            log.warning("%s: %s is damaged (not a JSON object); %s", folder, jobdir.RESULT_FILE if state == "damaged" else path.name,
                        "shown as DAMAGED; a rerun of the sweep runs it again" if row is not None else "left out of the table")
        if row is None:
            continue
        row.pop("config", None)
        row.pop("traceback", None)
        row.update(status=state, path=str(folder), mtime=path.stat().st_mtime)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*CONFIG_KEYS, "status"])
    df = pd.DataFrame(rows).sort_values("mtime")
    for key in CONFIG_KEYS:  # results written by older versions lack some settings
        if key not in df:
            df[key] = None
    keys = df[CONFIG_KEYS].apply(_as_text)
    return df[~keys.duplicated(keep="last")].reset_index(drop=True)


def _as_text(column: pd.Series) -> pd.Series:
    """Values as text, missing ones (None, NaN) all as ``"None"``: settings compare by what they say."""
    def text(v) -> str:
        if v is None or v != v:  # v != v: NaN
            return "None"
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)  # 20, not 20.0 beside a None

    return column.map(text)


def _bits_label(param_bits: int, fwd_bits: int) -> str:
    return str(param_bits) if param_bits == fwd_bits else f"w{param_bits}a{fwd_bits}"


def _cell(top1: float, top5: float) -> str:
    return f"{top1:.2f}/{top5:.2f}"


def accuracy_table(results: pd.DataFrame) -> pd.DataFrame:
    """The bits-vs-accuracy table of ``results`` (see the module docstring)."""
    if results.empty:
        return pd.DataFrame()
    df = results.copy()
    for column in ("quant_top1", "quant_top5", "float_top1", "float_top5", "n_eval"):  # absent when nothing finished
        if column not in df:
            df[column] = float("nan")
    df["column"] = [_bits_label(p, f) for p, f in zip(df.param_bits, df.fwd_bits)]
    done = df.status == "done"
    df["cell"] = [_cell(a, b) if ok else state.upper() for a, b, ok, state in zip(df.quant_top1, df.quant_top5, done, df.status)]
    # A setting splits rows only where it differs between results of the same bit-width
    # (bias_bits=${param_bits} varies with the column, not between rows).
    cells = df.assign(**{k: _as_text(df[k]) for k in SETTINGS}).groupby(["model", "dataset", "column"])
    varying = [k for k in SETTINGS if cells[k].nunique().max() > 1]
    index = ["model", "dataset", *varying]
    df[varying] = df[varying].apply(_as_text)
    table = df.pivot_table(index=index, columns="column", values="cell", aggfunc="last")
    # Columns in bit order: plain widths numerically, mixed widths after them.
    columns = sorted(table.columns, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    table = table[columns]
    floats = df[done].groupby(index).last().reindex(table.index)  # float and image count of finished jobs
    table.insert(0, "float", [_cell(a, b) if a == a else "" for a, b in zip(floats.float_top1, floats.float_top5)])
    table.insert(0, "images", [int(n) if n == n else "" for n in floats.n_eval])  # n == n: not NaN
    table = table.fillna("")  # a width this row never ran
    table.columns.name = None
    return table.reset_index()


def cost_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per finished job: model, dataset, precision, widths, top-1/top-5 and costs (``engine.costs``)."""
    done = results[results.status == "done"] if "status" in results else results
    if done.empty or "weight_kib" not in done:
        return pd.DataFrame()
    df = done.assign(bits=[_bits_label(p, f) for p, f in zip(done.param_bits, done.fwd_bits)], bitops=done.bitops / 1e9)
    df = df.sort_values(["model", "dataset", "weight_kib"])
    columns = ["model", "dataset", "precision", "bits", "quant_top1", "quant_top5", *COST_COLUMNS]
    table = df[columns].rename(columns={"quant_top1": "top-1", "quant_top5": "top-5", **COST_COLUMNS})
    return table.round(3).reset_index(drop=True)


def plot(table: pd.DataFrame, path: Path) -> None:
    """Top-1 against bit-width, one line per row of ``table``, its float top-1 dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    bits = [c for c in table.columns if str(c).isdigit()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [c for c in table.columns if c not in ("images", "float", *bits) and not str(c).startswith("w")]
    for _, row in table.iterrows():
        points = [(int(b), float(row[b].split("/")[0])) for b in bits if isinstance(row[b], str) and "/" in row[b]]
        if not points:
            continue
        name = " ".join(str(row[c]) for c in labels if c != "dataset") + f" ({row['dataset']})"
        line, = ax.plot(*zip(*points), marker="o", label=name)
        if isinstance(row["float"], str) and "/" in row["float"]:
            ax.axhline(float(row["float"].split("/")[0]), color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xticks(sorted(int(b) for b in bits))
    ax.set_xlabel("bits (weights = activations)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("fixed-point top-1 vs bit-width (dashed: float)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def replace_between_markers(text: str, marker: str, content: str) -> str:
    """``text`` with what lies between ``<!-- marker -->`` and ``<!-- /marker -->`` replaced by ``content``."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"expected one '{start}' followed by one '{end}'")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


def write_tables(sweep_dirs: Iterable[str | Path], out_dir: str | Path) -> pd.DataFrame:
    """Aggregate ``sweep_dirs``; write ``bits_vs_accuracy.csv``, ``.md``, ``.png`` and ``bits_vs_cost.csv``, ``.md`` into ``out_dir``."""
    results = load_results(sweep_dirs)
    table = accuracy_table(results)
    out = Path(out_dir)
    costs = cost_table(results)
    atomic_write_text(out / f"{COST_STEM}.csv", costs.to_csv(index=False))
    atomic_write_text(out / f"{COST_STEM}.md", costs.to_markdown(index=False) + "\n")
    atomic_write_text(out / f"{TABLE_STEM}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{TABLE_STEM}.md", table.to_markdown(index=False) + "\n")
    if not table.empty:
        plot(table, out / f"{TABLE_STEM}.png")
    return table
