"""Command: export a bit-exact run as golden integer test vectors for an RTL or HLS testbench.

    python -m fxpsweep.export model=resnet18 dataset=imagenet_val1300 bits=8 export.n_images=1
    python -m fxpsweep.replay golden/resnet18-imagenet_val1300-8bit     # check them, numpy alone

Composed like ``run.py`` (model, dataset, bits, per-layer precision, any
datapath setting); see ``fxpsweep.golden.export`` for what the folder holds.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from fxpsweep.core.errors import ConfigError, one_line_errors
from fxpsweep.golden.export import check_destination, export
from fxpsweep.sweep.config import check_config, check_config_files, rule_texts
from fxpsweep.sweep.job import calibrated_network


def run(cfg: DictConfig) -> None:
    check_config(cfg)
    n = cfg.export.n_images
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"export.n_images={n!r} must be a positive number of images")
    if cfg.export.layers is not None and not isinstance(cfg.export.layers, str):
        raise ConfigError(f"export.layers={cfg.export.layers!r} must be a glob over operation names, or null")
    check_destination(Path(cfg.export.out), cfg.rounding)
    started = time.perf_counter()
    job = calibrated_network(cfg)
    count = min(n, len(job.splits.evaluation))
    images = torch.stack([job.splits.evaluation[i][0] for i in range(count)])
    labels = [int(job.splits.evaluation[i][1]) for i in range(count)]
    about = {
        "model": cfg.model.name, "dataset": cfg.dataset.name,
        "settings": dataclasses.asdict(job.quant_model.settings), "precision_rules": rule_texts(cfg),
        "images": {"split": "evaluation", "indices": (job.evaluation_images or list(range(count)))[:count], "labels": labels},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out = Path(cfg.export.out)
    manifest = export(job.quant_model, images, out, about, cfg.export.layers)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"exported {len(manifest['operations'])} operations and {len(manifest['tensors'])} tensors of {count} image(s) "
          f"to {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")
    print(f"check them: python -m fxpsweep.replay {out}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        run(cfg)


if __name__ == "__main__":
    with one_line_errors():  # before Hydra reads them
        check_config_files(sys.argv[1:])
    main()
