"""The minimum-bits search: per-layer word lengths that keep top-1 within a tolerance at the least cost.

Choices are made on the ``search`` half of the evaluation images and judged
on the ``holdout`` half, which the search never sees (``eval_split``). Every
network evaluation is a job in its own folder under the search's, run (or
found already finished) by the ``run`` callable the caller passes, so a
killed search resumes from its finished evaluations.

An assignment *passes* on the search images when an upper confidence bound
on its paired top-1 drop against float stays within the tolerance:
``drop + z * error <= tolerance``, with ``z`` the one-sided normal quantile
of ``confidence`` and ``error`` the standard error of the mean of the
per-image differences (float right and fixed point wrong: +1, the reverse:
-1). Both networks see the same images, so only the images where they
disagree carry noise: a half of 990 images measures a one-point drop to
about half a point, and a plain ``top-1 >= float - tolerance`` would pass
assignments that miss on other images.

1. Uniform widths on the search images, narrowest first: ``u`` is the first that passes.
   With ``activation_bits`` set, every activation register (the network
   input and every layer output) stays at that width and only the weights
   take ``u``; otherwise activations take ``u`` too.
2. Sensitivity probes from ``u``: each knob (a conv/linear layer's weights;
   with ``cost=bitops`` also every register's output) alone at each narrower
   allowed width, on the first ``probe_images`` search images, measured as the
   noise power it adds to the network's output, ``10**(-SQNR/10)`` (Lin,
   Talathi and Annapureddy 2016: the noise of layers adds up). A knob's
   probing stops at the first width whose noise alone exceeds that of
   narrowing every weight (and, without ``activation_bits``, every
   activation) to ``u``'s next width.
3. Allocation: for a noise budget ``B``, greedily narrow the knob that saves
   the most cost per unit of noise while the summed noise stays within ``B``.
   Each allocation is evaluated on the whole search half; ``B`` doubles from
   a small start until an allocation fails, then is bisected three times
   between the last pass (or none) and the first failure.
4. Polish: from the cheapest passing allocation, narrow one knob by one
   probed width at a time, the best cost per noise first, each on the whole
   search half, keeping what passes, until a round keeps nothing or
   ``polish_evaluations`` ran. The summed noise is a model of how layers
   interact; this step asks the search images instead. Its result is the answer.
5. The answer and every uniform width of ``holdout_widths`` (weights and
   activations alike) are evaluated on the holdout images, and with
   ``activation_bits`` also every uniform weight width at those activations;
   the report compares the answer with the cheapest of each that meets the
   tolerance there.

Exhaustive search would evaluate ``len(widths) ** knobs`` assignments; this
needs about ``(widths up to u) + knobs * (widths below u) + 10 + polish_evaluations + len(holdout_widths)``
(twice that last term with ``activation_bits``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from fxpsweep.core.errors import ConfigError
from fxpsweep.engine.costs import totals
from fxpsweep.core.rules import Rule
from fxpsweep.core.storage import atomic_write_json

log = logging.getLogger(__name__)

COSTS = {"weight_memory": "weight_kib", "bitops": "bitops"}
Knob = tuple[str, str]  # (register kind: weight | output, layer name)
TRACE_FILE = "trace.json"
RESULT_FILE = "search.json"


@dataclass
class Evaluation:
    """One network evaluation of the search: what ran, on which images, what it scored and cost."""

    phase: str  # uniform | probe | allocation | polish | holdout
    bits: int
    activation_bits: int | None  # every activation register's word length; None: ``bits`` like the weights
    rules: list[str]
    split: str
    images: int
    top1: float
    float_top1: float
    lost: int  # images float classifies right and this assignment wrong
    gained: int  # images this assignment classifies right and float wrong
    output_sqnr_db: float | None
    weight_kib: float
    bitops: float
    resumed: bool

    @property
    def drop(self) -> float:
        """Top-1 points below float on these images (negative: above)."""
        return 100.0 * (self.lost - self.gained) / self.images

    @property
    def drop_error(self) -> float:
        """Standard error of ``drop`` in points: of the mean of the per-image differences (+1, 0, -1)."""
        n, differ, net = self.images, self.lost + self.gained, self.lost - self.gained
        return 100.0 * math.sqrt(max(differ / n - (net / n) ** 2, 0.0) / n)

    @property
    def noise(self) -> float:
        """Noise power of the network output relative to its signal (0 when exact)."""
        return 0.0 if self.output_sqnr_db is None or self.output_sqnr_db == math.inf else 10 ** (-self.output_sqnr_db / 10)


@dataclass
class SearchSettings:
    """``search.*`` of the config (checked by its schema, ``fxpsweep.sweep.config.SearchConfig``)."""

    tolerance: float
    confidence: float
    widths: list[int]
    cost: str
    probe_images: int
    holdout_widths: list[int] = field(default_factory=list)
    polish_evaluations: int = 0
    activation_bits: int | None = None

    def __post_init__(self) -> None:
        self.widths = sorted(set(self.widths))
        self.holdout_widths = sorted(set(self.holdout_widths))

    def passes(self, evaluation: Evaluation) -> bool:
        """Whether the upper ``confidence`` bound on the paired top-1 drop is within the tolerance."""
        z = NormalDist().inv_cdf(self.confidence)
        return evaluation.drop + z * evaluation.drop_error <= self.tolerance


# Runs one evaluation's job in a folder, or finds it finished there: (its result, whether it was found finished).
RunJob = Callable[[DictConfig, Path], tuple[dict[str, Any], bool]]


class Evaluator:
    """Runs (or finds already run) one job per assignment, each in a folder of ``out/jobs`` named by a hash of its config."""

    def __init__(self, base: DictConfig, out: Path, run: RunJob) -> None:
        self.base, self.out, self.run = base, out, run
        self.trace: list[Evaluation] = []

    def __call__(
        self, phase: str, bits: int, rules: list[str], split: str, limit: int | None = None, activation_bits: int | None = None
    ) -> Evaluation:
        cfg = self.base.copy()
        with open_dict(cfg):
            cfg.pop("search", None)  # how the search runs is no part of a job: a new search setting keeps its finished jobs
            cfg.bits, cfg.eval_split, cfg.eval_limit = bits, split, limit
            if activation_bits is not None:
                cfg.fwd_bits = activation_bits
            cfg.precision.rules = list(rules)
            cfg.report_images = limit or cfg.report_images
        plain = OmegaConf.to_container(cfg, resolve=True)
        folder = self.out / "jobs" / hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
        result, resumed = self.run(cfg, folder)
        evaluation = Evaluation(
            phase, bits, activation_bits, list(rules), split, result["n_eval"], result["quant_top1"], result["float_top1"],
            result["top1_lost"], result["top1_gained"], result["output_sqnr_db"], result["weight_kib"], result["bitops"], resumed,
        )
        self.trace.append(evaluation)
        atomic_write_json(self.out / TRACE_FILE, [e.__dict__ for e in self.trace])
        self.layers = result["layer_costs"]
        log.info(
            "%s %s: top-1 %.2f, %.2f +- %.2f below float, %s", phase, " / ".join(rules) or f"{bits} bits", evaluation.top1,
            evaluation.drop, evaluation.drop_error, "resumed" if resumed else "ran",
        )
        return evaluation


def narrowings(
    knobs: dict[Knob, dict[int, float]], assignment: dict[Knob, int], price: Callable[[dict[Knob, int]], float]
) -> list[tuple[Knob, int, float]]:
    """Each knob's next narrower probed width from ``assignment``, as ``(knob, width, cost saved per noise added)``,
    the best first; only narrowings that save cost."""
    steps = []
    for name, by_width in knobs.items():
        narrower = [w for w in by_width if w < assignment[name]]
        if not narrower:
            continue
        w = max(narrower)
        saved = price(assignment) - price({**assignment, name: w})
        if saved > 0:
            added = by_width[w] - by_width.get(assignment[name], 0.0)
            steps.append((name, w, saved / max(added, 1e-12)))
    return sorted(steps, key=lambda step: -step[2])


def allocate(knobs: dict[Knob, dict[int, float]], budget: float, price: Callable[[dict[Knob, int]], float]) -> dict[Knob, int]:
    """Greedy allocation: from every knob at its widest probed width, narrow the knob with the most cost saved
    per noise added, one probed width at a time, while the summed noise stays within ``budget``."""
    assignment = {name: max(by_width) for name, by_width in knobs.items()}
    noise = 0.0
    while True:
        best = None
        for name, w, score in narrowings(knobs, assignment, price):
            added = knobs[name][w] - knobs[name].get(assignment[name], 0.0)
            if noise + added <= budget:
                best = (name, w, added)
                break
        if best is None:
            return assignment
        name, w, added = best
        assignment[name] = w
        noise += added


def search(base: DictConfig, settings: SearchSettings, out: Path, run: RunJob) -> dict[str, Any]:
    """Run the search (see the module docstring); returns what ``search.json`` records."""
    evaluate = Evaluator(base, out, run)
    key = COSTS[settings.cost]
    fixed = settings.activation_bits

    # 1. Uniform widths on the search images, from the narrowest up to the first that passes.
    uniform: dict[int, Evaluation] = {}
    for w in settings.widths:
        uniform[w] = evaluate("uniform", w, [], "search", activation_bits=fixed)
        if settings.passes(uniform[w]):
            break
    else:
        raise ConfigError(
            f"no width of search.widths={settings.widths} keeps top-1 within {settings.tolerance} of float "
            f"({uniform[w].float_top1:.2f}) at search.confidence={settings.confidence}"
        )
    u = w
    float_top1 = uniform[u].float_top1
    activations = fixed if fixed is not None else u
    layers = evaluate.layers

    # 2. Probes from u: the noise each knob adds alone, per narrower width.
    probe = lambda bits, rules: evaluate("probe", bits, rules, "search", settings.probe_images, fixed)  # noqa: E731
    reference = probe(u, [])
    narrower = [w for w in settings.widths if w < u]
    step_noise = probe(max(narrower), []).noise - reference.noise if narrower else 0.0
    dots = [name for name, c in layers.items() if "weights" in c]
    knob_keys = [("weight", dots, u)]
    if key == "bitops":
        knob_keys.append(("output", [n for n, c in layers.items() if not c.get("keeps_input_format")], activations))
    knobs: dict[Knob, dict[int, float]] = {}
    for kind, names, start in knob_keys:
        for name in names:
            knobs[(kind, name)] = {start: 0.0}
            for w in sorted((w for w in settings.widths if w < start), reverse=True):
                added = max(probe(u, [str(Rule(name, ((kind, w),)))]).noise - reference.noise, 0.0)
                knobs[(kind, name)][w] = added
                if added > step_noise:
                    break
    start = {knob: max(by_width) for knob, by_width in knobs.items()}

    def price(assignment: dict[Knob, int]) -> float:
        bits: dict[str, dict[str, int]] = {}
        for (kind, name), w in assignment.items():
            bits.setdefault(name, {})[kind] = w
        return totals(layers, bits)[key]

    def as_rules(assignment: dict[Knob, int]) -> list[str]:
        return [str(Rule(name, ((kind, w),))) for (kind, name), w in sorted(assignment.items()) if w != start[(kind, name)]]

    def on_search_half(phase: str, assignment: dict[Knob, int]) -> Evaluation:
        return evaluate(phase, u, as_rules(assignment), "search", activation_bits=fixed)

    # 3. Allocations for growing, then bisected, noise budgets, each on the whole search half.
    passed: list[tuple[dict, Evaluation]] = []

    def attempt(budget: float) -> bool:
        assignment = allocate(knobs, budget, price)
        result = on_search_half("allocation", assignment)
        ok = settings.passes(result)
        if ok:
            passed.append((assignment, result))
        return ok

    low, high = 0.0, None
    budget = max(step_noise, 1e-9) / 16
    for _ in range(8):
        if not attempt(budget):
            high = budget
            break
        low, budget = budget, budget * 2
    if high is not None:  # bisect between the last pass (or nothing narrowed) and the first failure
        for _ in range(3):
            middle = (low + high) / 2
            if attempt(middle):
                low = middle
            else:
                high = middle
    if passed:
        best_assignment, best = min(passed, key=lambda p: getattr(p[1], key))
    else:
        best_assignment, best = dict(start), uniform[u]

    # 4. Polish: the summed noise is a model; what the search half says decides. From the cheapest
    # passing assignment, narrow one knob at a time by one probed width, best cost per noise first,
    # keeping each narrowing that still passes, until a round keeps none or the evaluations run out.
    polished = 0
    improved = True
    while improved and polished < settings.polish_evaluations:
        improved = False
        for name, w, _score in narrowings(knobs, best_assignment, price):
            if polished >= settings.polish_evaluations:
                break
            trial = {**best_assignment, name: w}
            result = on_search_half("polish", trial)
            polished += 1
            if settings.passes(result):
                best_assignment, best, improved = trial, result, True
                break
    chosen = as_rules(best_assignment)

    # 5. Judged on the holdout images, beside every uniform width.
    final = evaluate("holdout", u, chosen, "holdout", activation_bits=fixed)
    holdout_uniform = {w: evaluate("holdout", w, [], "holdout") for w in settings.holdout_widths}
    # With activations fixed, also every uniform weight width at the answer's activations (WkA8): what the
    # per-layer rules add beyond the weight/activation split.
    same_activations = {w: evaluate("holdout", w, [], "holdout", activation_bits=fixed) for w in settings.holdout_widths} if fixed else {}
    holdout_float = final.float_top1

    def cheapest_meeting(evaluations: dict[int, Evaluation]) -> int | None:
        meeting = [w for w, e in evaluations.items() if holdout_float - e.top1 <= settings.tolerance]
        return min(meeting, key=lambda w: getattr(evaluations[w], key)) if meeting else None

    def costs(evaluations: dict[int, Evaluation]) -> dict[int, dict[str, float]]:
        return {w: {"top1": e.top1, "weight_kib": e.weight_kib, "bitops": e.bitops} for w, e in evaluations.items()}
    computed = sum(not e.resumed for e in evaluate.trace)
    return {
        "tolerance": settings.tolerance, "confidence": settings.confidence, "cost": settings.cost, "widths": settings.widths,
        "uniform_width": u, "activation_bits": fixed, "rules": chosen,
        "search_top1": best.top1, "search_float_top1": float_top1, "search_drop": best.drop, "search_drop_error": best.drop_error,
        "holdout": {
            "float_top1": holdout_float, "top1": final.top1, "weight_kib": final.weight_kib, "bitops": final.bitops,
            "images": final.images, "drop_error": final.drop_error, "within_tolerance": holdout_float - final.top1 <= settings.tolerance,
            "cheapest_uniform": cheapest_meeting(holdout_uniform), "uniform": costs(holdout_uniform),
            "cheapest_uniform_weights": cheapest_meeting(same_activations), "uniform_weights": costs(same_activations),
        },
        "polish_evaluations": polished, "evaluations": len(evaluate.trace), "evaluations_run_now": computed,
        "knobs": len(knobs), "exhaustive_assignments": len(settings.widths) ** len(knobs),
    }
