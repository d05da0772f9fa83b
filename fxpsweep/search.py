"""Command: the minimum-bits search, its precision file, table and plot.

    python -m fxpsweep.search model=resnet20_cifar10 dataset=cifar10_test2000 search.tolerance=1.0

Writes into ``search.out``: ``precision/NAME.yaml`` (run it with
``python run.py --config-dir OUT precision=NAME ...``), ``search.json`` (the
answer, its holdout figures and the counts), ``trace.json`` (every evaluation:
what ran, its top-1 and cost), ``search.md`` and ``search.png``, and a job
folder per evaluation under ``jobs/`` (a rerun skips finished ones). See
``fxpsweep.precision.search`` for the algorithm.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fxpsweep.core.errors import ConfigError, one_line_errors
from fxpsweep.precision.report import write_search_report
from fxpsweep.precision.search import SearchSettings, search
from fxpsweep.sweep import jobdir
from fxpsweep.sweep.config import check_config, check_config_files, job_identity
from fxpsweep.sweep.job import run_job
from fxpsweep.core.storage import atomic_write_json, atomic_write_text


def run_one(cfg: DictConfig, folder: Path) -> tuple[dict[str, Any], bool]:
    """One evaluation of the search as a job in ``folder``: its result and whether an earlier run had finished it.

    A result made with the same config is reused (results from before the paired counts ``top1_lost`` are run
    again); otherwise the job runs, started, finished or failed on record.
    """
    earlier = jobdir.finished_result(folder, OmegaConf.to_container(cfg, resolve=True))
    if earlier is not None and "top1_lost" in earlier:
        return earlier, True
    identity = job_identity(cfg)
    jobdir.mark_started(folder, identity)
    try:
        return run_job(cfg, folder, folder), False
    except BaseException as err:
        jobdir.record_failure(folder, identity, err)
        raise


def precision_file(cfg: DictConfig, answer: dict[str, Any]) -> str:
    """The answer as a precision option: the uniform width (and activation width, where the search fixed it), the
    rules that narrow registers from it, and the calibration that made its codes."""
    h = answer["holdout"]
    body = {
        "bits": answer["uniform_width"],
        **({"fwd_bits": answer["activation_bits"]} if answer["activation_bits"] is not None else {}),
        "calibration": OmegaConf.to_container(cfg.calibration, resolve=True),  # the codes the answer was judged with
        "precision": {"name": cfg.search.name, "rules": answer["rules"]},
    }
    return (
        f"# @package _global_\n"
        f"# Found by python -m fxpsweep.search for {cfg.model.name} on {cfg.dataset.name}, tolerance {answer['tolerance']} "
        f"top-1 points, cost {answer['cost']}:\n"
        f"# holdout top-1 {h['top1']:.2f} (float {h['float_top1']:.2f}), {h['weight_kib']:.1f} KiB of weights, "
        f"{h['bitops'] / 1e9:.3f} GBitOps per image.\n"
        + OmegaConf.to_yaml(OmegaConf.create(body))
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="search")
def main(cfg: DictConfig) -> None:
    s = cfg.search
    with one_line_errors():
        check_config(cfg)
        if cfg.precision.rules or cfg.probe is not None:
            raise ConfigError("precision.rules and probe are what the search chooses; leave them out")
        settings = SearchSettings(
            s.tolerance, s.confidence, list(s.widths), s.cost, s.probe_images, list(s.holdout_widths), s.polish_evaluations, s.activation_bits
        )
        answer = search(cfg, settings, Path(s.out), run_one)
    out = Path(s.out)
    path = out / "precision" / f"{cfg.search.name}.yaml"
    atomic_write_text(path, precision_file(cfg, answer))
    atomic_write_json(out / "search.json", answer)
    summary = write_search_report(out, answer)
    print(summary)
    print(f"\n{answer['evaluations']} network evaluations ({answer['evaluations_run_now']} run now, the rest from earlier runs); "
          f"exhaustive search over {answer['knobs']} registers would need {answer['exhaustive_assignments']:.3g}.")
    print(f"precision file: {path}\nrun it: {rerun_command(cfg, out)}")


def rerun_command(cfg: DictConfig, out: Path) -> str:
    """``run.py`` on the answer and the holdout images: the precision file plus the search's own overrides
    (``seed`` picks the halves and the calibration images), without its ``search.*`` settings and ``precision``
    option (the file takes its place)."""
    own = [o for o in HydraConfig.get().overrides.task if not o.startswith(("search.", "model=", "dataset=", "precision="))]
    words = ["python", "run.py", "--config-dir", str(out), f"precision={cfg.search.name}",
             f"model={cfg.model.name}", f"dataset={cfg.dataset.name}", *own, "eval_split=holdout"]
    return shlex.join(words)


if __name__ == "__main__":
    with one_line_errors():  # before Hydra reads them
        check_config_files(sys.argv[1:])
    main()
