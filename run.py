"""fxpsweep's Hydra entry point: ``python run.py [-m] [model=...] [dataset=...] [bits=...]``."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fxpsweep.aggregate import accuracy_table, load_results
from fxpsweep.errors import ConfigError
from fxpsweep.job import run_job

log = logging.getLogger("fxpsweep")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        result = run_job(cfg, output_dir, Path(hydra_cfg.sweep.dir) if multirun else output_dir)
    except ConfigError as err:
        # A user's mistake: say what is wrong and what is allowed, without a traceback.
        raise SystemExit(f"fxpsweep: error: {err}") from None
    log.info(
        "%s on %s, %d-bit weights, %d-bit activations: float %.2f/%.2f, fixed point %.2f/%.2f (top-1/top-5 %%, %d images)",
        result["model"], result["dataset"], result["param_bits"], result["fwd_bits"],
        result["float_top1"], result["float_top5"], result["quant_top1"], result["quant_top5"], result["n_eval"],
    )
    if not multirun:
        print(accuracy_table(load_results([output_dir])).to_markdown(index=False))
    return result


if __name__ == "__main__":
    main()
