"""Hydra callbacks: the end-of-sweep table."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fxpsweep.core.errors import ConfigError
from fxpsweep.sweep import jobdir
from fxpsweep.sweep.config import Folder
from fxpsweep.sweep.aggregate import TABLE_STEM, write_tables

log = logging.getLogger(__name__)


class AggregateOnSweepEnd(Callback):
    """After a multirun, write and print the bits-vs-accuracy table beside the sweep, then say how many of its
    jobs failed (a job that stops on a bad value records it and lets the others run) and exit with status 1
    if any did.

    Hydra skips this when a job raised anything else (a crash); ``python -m fxpsweep.aggregate DIR``
    makes the same table from any sweep folder afterwards.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # before Hydra makes it, so that a folder no one can write to is one line, not a traceback
            Folder(writable=True)("hydra.sweep.dir", str(config.hydra.sweep.dir))
        except ConfigError as err:
            print(f"fxpsweep: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        self.started = time.time() - 1.0  # error records written from now on are this sweep's (a second of clock skew)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_tables([sweep_dir], sweep_dir)
        print(f"\nbits vs accuracy (top-1/top-5 %), saved as {sweep_dir / TABLE_STEM}.csv and .md:\n")
        print(table.to_markdown(index=False) if not table.empty else "no results found")
        started = getattr(self, "started", 0.0)
        failed = sorted(p.parent.name for p in sweep_dir.rglob(jobdir.ERROR_FILE) if p.stat().st_mtime >= started)
        if failed:
            print(f"\n{len(failed)} job(s) of this sweep failed ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}): "
                  "each folder's error.json says why; fix it and rerun the sweep, which skips the finished jobs", file=sys.stderr)
            raise SystemExit(1)
