"""The search's picture and table: cost against top-1, uniform widths as a line, searched assignments as points."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from fxpsweep.precision.search import COSTS, TRACE_FILE
from fxpsweep.core.storage import atomic_write_bytes, atomic_write_text

COST_LABELS = {"weight_kib": "weight memory (KiB)", "bitops": "BitOps per image"}


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, top-1) points no other point beats on both (cheaper and at least as accurate), by cost."""
    front, best = [], float("-inf")
    for cost, top1 in sorted(points, key=lambda p: (p[0], -p[1])):
        if top1 > best:
            front.append((cost, top1))
            best = top1
    return front


def write_search_report(out: Path, answer: dict[str, Any]) -> str:
    """``search.md`` and ``search.png`` in ``out`` from ``trace.json`` and the answer; returns the Markdown."""
    trace = json.loads((out / TRACE_FILE).read_text())
    key = COSTS[answer["cost"]]
    h = answer["holdout"]
    cheapest = h["cheapest_uniform"]
    lines = [
        f"Tolerance {answer['tolerance']} top-1 points (passing where the {answer['confidence']} bound on the drop is within it), "
        f"cost {answer['cost']}; widths {answer['widths'][0]}..{answer['widths'][-1]}; the answer narrows registers from "
        f"{answer['uniform_width']} bits" + (f", activations fixed at {answer['activation_bits']}." if answer["activation_bits"] else "."),
        "",
        f"| on the {h['images']} holdout images | top-1 | below float | weight KiB | GBitOps per image |",
        "|---|---:|---:|---:|---:|",
        f"| float | {h['float_top1']:.2f} | | | |",
        f"| searched assignment ({_assignment(answer)}) | {h['top1']:.2f} | {h['float_top1'] - h['top1']:.2f} | "
        f"{h['weight_kib']:.1f} | {h['bitops'] / 1e9:.3f} |",
    ]
    a = answer["activation_bits"]
    comparisons = [("uniform", cheapest, f"cheapest uniform width meeting it: {cheapest} bits (W{cheapest}A{cheapest})")]
    if a:
        w = h.get("cheapest_uniform_weights")
        comparisons.append(("uniform_weights", w, f"cheapest uniform weight width at {a}-bit activations meeting it: W{w}A{a}"))
    summary = []
    for kind, width, label in comparisons:
        if width is None:
            summary.append(f"no {'uniform width' if kind == 'uniform' else f'uniform weight width at {a}-bit activations'} "
                           "meets the tolerance on the holdout images")
            continue
        u = _at(h[kind], width)
        lines.append(f"| {label} | {u['top1']:.2f} | {h['float_top1'] - u['top1']:.2f} | {u['weight_kib']:.1f} | {u['bitops'] / 1e9:.3f} |")
        name = f"W{width}A{width}" if kind == "uniform" else f"W{width}A{a}"
        summary.append(f"against {name}, weight memory {_change(h['weight_kib'], u['weight_kib'])} and BitOps "
                       f"{_change(h['bitops'], u['bitops'])}")
    narrowing = len(answer["rules"])
    lines += [
        "",
        f"The answer, {'; '.join(summary)}. {narrowing} rule"
        f"{'' if narrowing == 1 else 's'} narrow{'s' if narrowing == 1 else ''} registers below the {answer['uniform_width']}-bit base; "
        f"within the tolerance on the holdout images: {'yes' if h['within_tolerance'] else 'no'}.",
    ]
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(out / "search.md", markdown)
    _plot(trace, key, answer, out / "search.png")
    return markdown


def _at(by_width: dict, width: int) -> dict[str, float]:
    """One width's entry: keys are numbers in memory and strings once read back from ``search.json``."""
    return by_width[width] if width in by_width else by_width[str(width)]


def _assignment(answer: dict[str, Any]) -> str:
    """The answer in words: '4-bit weights, 8-bit activations, 3 rules narrowing them'."""
    activations = answer["activation_bits"] or answer["uniform_width"]
    return f"{answer['uniform_width']}-bit weights, {activations}-bit activations, {len(answer['rules'])} rules narrowing them"


def _change(value: float, reference: float) -> str:
    """``value`` against ``reference`` in words: '12.6 % below', '10.7 % above' or 'the same'."""
    percent = 100 * (value / reference - 1)
    if abs(percent) < 0.05:
        return "the same"
    return f"{abs(percent):.1f} % {'above' if percent > 0 else 'below'}"


def _plot(trace: list[dict], key: str, answer: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    for ax, split, title in ((axes[0], "search", "search images (where it chooses)"), (axes[1], "holdout", "holdout images (where it is judged)")):
        done = [e for e in trace if e["split"] == split and e["phase"] != "probe"]
        is_uniform = lambda e: not e["rules"] and e["activation_bits"] in (None, e["bits"])  # noqa: E731
        uniform = sorted((e[key], e["top1"], e["bits"]) for e in done if is_uniform(e))
        # With activations held at one width: every weight at one width, the line the search starts from.
        weights_only = sorted((e[key], e["top1"], e["bits"]) for e in done if not e["rules"] and not is_uniform(e))
        mixed = [(e[key], e["top1"]) for e in done if e["rules"]]
        for line, color, label in (
            (uniform, "tab:gray", "uniform widths"),
            (weights_only, "tab:blue", f"one weight width, activations at {answer['activation_bits']} bits"),
        ):
            if not line:
                continue
            ax.plot([u[0] for u in line], [u[1] for u in line], "o-", color=color, label=label)
            for cost, top1, bits in line:
                ax.annotate(str(bits), (cost, top1), fontsize=7, xytext=(3, -9), textcoords="offset points")
        if mixed:
            ax.plot(*zip(*mixed), "o", color="tab:orange", alpha=0.7, label="searched assignments")
        front = pareto([(u[0], u[1]) for u in uniform + weights_only] + mixed)
        ax.plot(*zip(*front), "-", color="tab:green", linewidth=2, alpha=0.6, label="Pareto front")
        float_top1 = done[0]["float_top1"] if done else None
        if float_top1 is not None:
            ax.axhline(float_top1 - answer["tolerance"], color="tab:red", linestyle="--", linewidth=1, label="float - tolerance")
        ax.set_xscale("log")
        ax.set_xlabel(COST_LABELS[key])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    for ax in axes:
        ax.legend(fontsize=8)
    top = max(e["float_top1"] for e in trace)
    for ax in axes:
        ax.set_ylim(max(0, top - 10 * answer["tolerance"]), top + answer["tolerance"])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
