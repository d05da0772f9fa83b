"""Checks of a job's config: every bad value is a ConfigError naming the key and what is allowed.

``run.py`` checks a job's config before anything runs, so a typo costs
seconds and prints one line, never a traceback from deep inside a library.
The datapath keys are checked by ``QuantSettings``, the image counts by
``fxpsweep.data.splits.check_counts``; the rest here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig

from fxpsweep.data.splits import check_counts
from fxpsweep.core.errors import ConfigError
from fxpsweep.sweep.job import keeps_freed_memory, precision_rules, quant_settings

SEED_LIMIT = 2**63  # torch.manual_seed takes seeds below this


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad top-level value of a job's config."""
    quant_settings(cfg)  # bits, word lengths, rounding, overflow, arithmetic, calibration.*
    check_counts(cfg.n_samples, cfg.eval_limit, cfg.eval_subset, cfg.eval_split)
    precision_rules(cfg)  # each rule parses; whether it matches a layer is known once the model is built
    _check_whole("batch_size", cfg.batch_size, 1, "images per batch")
    _check_whole("workers", cfg.workers, 0, "DataLoader worker processes, 0 for none")
    _check_whole("report_images", cfg.report_images, 0, "evaluation images for the SQNR report, 0 for none")
    _check_whole("seed", cfg.seed, 0, "a seed for the calibration images and stochastic rounding")
    if cfg.seed >= SEED_LIMIT:
        raise ConfigError(f"seed={cfg.seed} is too large; allowed: an integer from 0 to 2**63 - 1")
    for key in ("image_cache", "dry_run"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"{key}={cfg[key]!r} must be true or false")
    keeps_freed_memory(cfg)
    _check_folder("cache_dir", cfg.cache_dir)
    if not isinstance(cfg.data_dir, str) or not cfg.data_dir:
        raise ConfigError(f"data_dir={cfg.data_dir!r} must be a folder path")


def _check_whole(key: str, value: object, minimum: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: an integer >= {minimum} ({what})")


def _check_folder(key: str, value: object) -> None:
    """A folder that exists or can be made, and can be written."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}={value!r} must be a folder path")
    path = Path(value).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a unique name: jobs of a sweep check at once
            pass
    except OSError as err:
        raise ConfigError(f"{key}={value} is not a folder fxpsweep can write to ({err.strerror}); give a writable folder") from None
