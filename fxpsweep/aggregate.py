"""Merge job results into the bits-vs-accuracy table (CSV and Markdown).

    python -m fxpsweep.aggregate SWEEP_DIR [SWEEP_DIR ...] [--out DIR]

Reads every ``result.json`` below the given folders; where one configuration
ran more than once, the latest result counts. One row per model and dataset,
one column per bit-width (``w8a10`` where weights and activations differ) plus
a ``float`` column; cells are ``top1/top5`` in percent. Where the results
differ in a datapath or calibration setting (``SETTINGS``), that setting
becomes part of the row.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from fxpsweep.job import RESULT_FILE
from fxpsweep.storage import atomic_write_text

TABLE_STEM = "bits_vs_accuracy"
# Datapath and calibration settings: where a sweep varies one, the table gets a row per value.
SETTINGS = [
    "bias_bits", "rounding", "overflow", "arithmetic", "acc_bits", "acc_overflow", "product_bits", "batchnorm",
    "act_calibration", "weight_calibration", "weight_granularity", "overflow_rate", "bias_correction", "eval_subset",
    "n_samples", "seed",
]
# What makes two results the same configuration (the later one replaces the earlier).
CONFIG_KEYS = ["model", "dataset", "param_bits", "fwd_bits", "n_eval", *SETTINGS]


def load_results(sweep_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Every result below ``sweep_dirs``, latest per configuration, one row each."""
    rows = []
    for sweep_dir in sweep_dirs:
        for path in sorted(Path(sweep_dir).rglob(RESULT_FILE)):
            row = json.loads(path.read_text())
            row.pop("config", None)
            row["path"] = str(path.parent)
            row["mtime"] = path.stat().st_mtime
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=CONFIG_KEYS)
    df = pd.DataFrame(rows).sort_values("mtime")
    for key in CONFIG_KEYS:  # results written by older versions lack some settings
        if key not in df:
            df[key] = None
    keys = df[CONFIG_KEYS].astype(str)  # None and NaN compare equal as text
    return df[~keys.duplicated(keep="last")].reset_index(drop=True)


def _bits_label(param_bits: int, fwd_bits: int) -> str:
    return str(param_bits) if param_bits == fwd_bits else f"w{param_bits}a{fwd_bits}"


def _cell(top1: float, top5: float) -> str:
    return f"{top1:.2f}/{top5:.2f}"


def accuracy_table(results: pd.DataFrame) -> pd.DataFrame:
    """The bits-vs-accuracy table of ``results`` (see the module docstring)."""
    if results.empty:
        return pd.DataFrame()
    df = results.copy()
    df["column"] = [_bits_label(p, f) for p, f in zip(df.param_bits, df.fwd_bits)]
    df["cell"] = [_cell(a, b) for a, b in zip(df.quant_top1, df.quant_top5)]
    # A setting splits rows only where it differs between results of the same bit-width
    # (bias_bits=${param_bits} varies with the column, not between rows).
    cells = df.assign(**{k: df[k].astype(str) for k in SETTINGS}).groupby(["model", "dataset", "column"])
    varying = [k for k in SETTINGS if cells[k].nunique().max() > 1]
    index = ["model", "dataset", *varying]
    df[varying] = df[varying].astype(str)
    table = df.pivot_table(index=index, columns="column", values="cell", aggfunc="last")
    # Columns in bit order: plain widths numerically, mixed widths after them.
    columns = sorted(table.columns, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    table = table[columns]
    floats = df.groupby(index).last()
    table.insert(0, "float", [_cell(a, b) for a, b in zip(floats.float_top1, floats.float_top5)])
    table.insert(0, "images", floats.n_eval.astype(int))
    table.columns.name = None
    return table.reset_index()


def write_tables(sweep_dirs: Iterable[str | Path], out_dir: str | Path) -> pd.DataFrame:
    """Aggregate ``sweep_dirs`` and write ``bits_vs_accuracy.csv`` and ``.md`` into ``out_dir``."""
    table = accuracy_table(load_results(sweep_dirs))
    out = Path(out_dir)
    atomic_write_text(out / f"{TABLE_STEM}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{TABLE_STEM}.md", table.to_markdown(index=False) + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge fxpsweep results into the bits-vs-accuracy table.")
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="folders holding job results (searched recursively)")
    parser.add_argument("--out", type=Path, help="where to write the CSV and Markdown (default: the first folder)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    table = write_tables(args.sweep_dirs, args.out or args.sweep_dirs[0])
    print(table.to_markdown(index=False) if not table.empty else "no results found")


if __name__ == "__main__":
    main()
