"""Command: a layer sensitivity study as one multirun of ``run.py``, then its table and bar chart.

    python -m fxpsweep.sensitivity model=resnet20_cifar10 dataset=cifar10_test2000 bits=8 sensitivity.probe_bits=4

Every override but ``sensitivity.*`` is passed on to the jobs, launcher
settings (``hydra/launcher=slurm``, ``hydra.launcher.*``) too; a rerun skips
finished probes. Writes ``sensitivity.csv``, ``.md`` and ``.png`` into
``sensitivity.out``; see ``fxpsweep.precision.sensitivity``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.core.errors import ConfigError, one_line_errors
from fxpsweep.precision.sensitivity import probes, sensitivity_table, write_report
from fxpsweep.sweep.config import check_config, check_config_files, quant_settings
from fxpsweep.sweep.job import build

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"


def check_study(cfg: DictConfig, multirun: bool = False) -> None:
    """Raise ConfigError for the first bad value of a study (started with ``-m`` where ``multirun``), before any work."""
    if multirun:
        raise ConfigError("a study is one multirun already (one job per probe); run it without -m, once per reference width")
    check_config(cfg)
    if cfg.probe is not None:
        raise ConfigError("probe is set by the study itself, one per job; leave it out")


def study(cfg: DictConfig) -> None:
    check_study(cfg, HydraConfig.get().mode == RunMode.MULTIRUN)
    network = QuantizedNetwork(build(cfg.model.build).module, quant_settings(cfg))
    rules = probes(network, cfg.sensitivity.probe_bits, list(cfg.sensitivity.registers))
    out = Path(cfg.sensitivity.out)
    overrides = HydraConfig.get().overrides
    passed = [o for o in overrides.task if not o.lstrip("+~").startswith("sensitivity.")]
    launcher = [o for o in overrides.hydra if o.startswith(("hydra/launcher", "hydra.launcher"))]
    sweep = "probe=null," + ",".join(f"'{rule}'" for rule in rules)
    print(f"{len(rules)} probes and the reference, as one multirun into {out / 'jobs'}", flush=True)
    proc = subprocess.run([sys.executable, str(RUN_PY), "-m", *passed, *launcher, sweep, f"hydra.sweep.dir={out / 'jobs'}"])
    if proc.returncode:
        print(f"some probes failed (see their error.json under {out / 'jobs'}); the table has the others", file=sys.stderr)
    table = sensitivity_table(out / "jobs")
    write_report(table, out)
    print(table.to_markdown(index=False))
    print(f"\nsaved {out / 'sensitivity.csv'}, .md and .png")


@hydra.main(version_base="1.3", config_path="../conf", config_name="sensitivity")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        study(cfg)


if __name__ == "__main__":
    with one_line_errors():  # before Hydra reads them
        check_config_files(sys.argv[1:])
    main()
