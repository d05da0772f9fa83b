"""fxpsweep's Hydra entry point: ``python run.py [-m] [model=...] [dataset=...] [bits=...]``.

Each job's folder is named by its overrides (in a sweep). A job whose folder
holds a result made with the same config is skipped, so re-running a sweep
finishes only what is missing; ``dry_run=true`` lists every job of the sweep
and whether it is done, failed, incomplete or new, running nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fxpsweep.core.errors import ConfigError, one_line_errors
from fxpsweep.sweep import jobdir
from fxpsweep.sweep.aggregate import accuracy_table, load_results
from fxpsweep.sweep.config import check_config, check_config_files, job_identity, plain_config
from fxpsweep.sweep.job import run_job

log = logging.getLogger("fxpsweep")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    name = hydra_cfg.job.override_dirname or "(no overrides)"
    identity = _identity(cfg)
    claim = contextlib.ExitStack()  # released after the failure is recorded
    try:
        check_config(cfg)  # every value, before anything runs or is written
        if cfg.dry_run:
            print(f"{jobdir.status(output_dir):>10}  {name}  ({output_dir})")
            return None
        claim.enter_context(jobdir.claimed(output_dir))
        done = jobdir.finished_result(output_dir, plain_config(cfg))
        if done is not None:
            log.info("already done, skipped: %s (%s)", name, output_dir)
            return done
        jobdir.mark_started(output_dir, identity)
        result = run_job(cfg, output_dir, Path(hydra_cfg.sweep.dir) if multirun else output_dir)
    except BaseException as err:  # Ctrl-C and SystemExit too: the folder says it failed
        if cfg.dry_run is not True:  # a dry run writes nothing
            jobdir.record_failure(output_dir, identity, err)
        if isinstance(err, ConfigError):
            # A user's mistake: say what is wrong and what is allowed, without a traceback. In a sweep the other
            # jobs go on, and the end of the sweep prints the table and how many failed (sweep.callbacks).
            if multirun:
                print(f"fxpsweep: error: {name}: {err}", file=sys.stderr)
                return None
            raise SystemExit(f"fxpsweep: error: {err}") from None
        raise
    finally:
        claim.close()
    log.info(
        "%s on %s, %s: float %.2f/%.2f, fixed point %.2f/%.2f (top-1/top-5 %%, %d images)", result["model"], result["dataset"],
        _widths(result), result["float_top1"], result["float_top5"], result["quant_top1"], result["quant_top5"], result["n_eval"],
    )
    if not multirun:
        print(accuracy_table(load_results([output_dir])).to_markdown(index=False))
    return result


def _identity(cfg: DictConfig) -> dict:
    """What the job is (``job_identity``), or for a config too broken to say (a precision file without
    ``name``), its model and dataset: what its ``error.json`` records."""
    try:
        return job_identity(cfg)
    except OmegaConfBaseException:
        return {"model": OmegaConf.select(cfg, "model.name", default=None), "dataset": OmegaConf.select(cfg, "dataset.name", default=None)}


def _widths(result: dict) -> str:
    """``8-bit weights, 8-bit activations``; a mixed assignment by its label and the range of its widths."""
    def bits(kind: str, uniform: int) -> str:
        low, high = result.get(f"{kind}_bits_range") or [uniform, uniform]
        return f"{low}-bit {kind}s" if low == high else f"{low}..{high}-bit {kind}s"

    text = f"{bits('weight', result['param_bits'])}, {bits('activation', result['fwd_bits'])}"
    return text if result["precision"] == "uniform" else f"precision {result['precision']}: {text}"


if __name__ == "__main__":
    with one_line_errors():  # before Hydra reads them
        check_config_files(sys.argv[1:])
    main()
