"""Hydra callbacks: the end-of-sweep table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fxpsweep.sweep.aggregate import TABLE_STEM, write_tables

log = logging.getLogger(__name__)


class AggregateOnSweepEnd(Callback):
    """After a multirun, write and print the bits-vs-accuracy table beside the sweep.

    Hydra skips this when a job raised; ``python -m fxpsweep.sweep.aggregate DIR``
    makes the same table from any sweep folder afterwards.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_tables([sweep_dir], sweep_dir)
        print(f"\nbits vs accuracy (top-1/top-5 %), saved as {sweep_dir / TABLE_STEM}.csv and .md:\n")
        print(table.to_markdown(index=False) if not table.empty else "no results found")
