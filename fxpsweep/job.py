"""One job of a sweep: build, calibrate and evaluate one model at one bit-width, then save the result."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

import fxpsweep
from fxpsweep.errors import ConfigError
from fxpsweep.evaluate import evaluate_pair
from fxpsweep.fixedpoint import check_bits
from fxpsweep.models import PretrainedModel
from fxpsweep.quantized import QuantizedNetwork
from fxpsweep.settings import QuantSettings
from fxpsweep.storage import atomic_write_json

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
FORMATS_FILE = "formats.json"
ACC_LINES_FILE = "acc1_acc5.txt"


def quant_settings(cfg: DictConfig) -> QuantSettings:
    """The fixed-point configuration of ``cfg``; bad values raise ConfigError naming the key."""
    check_bits(cfg.bits, "bits")
    return QuantSettings(
        param_bits=cfg.param_bits,
        fwd_bits=cfg.fwd_bits,
        rounding=cfg.rounding,
        overflow=cfg.overflow,
        acc_bits=cfg.acc_bits,
        acc_overflow=cfg.acc_overflow,
        product_bits=cfg.product_bits,
        batchnorm=cfg.batchnorm,
        arithmetic=cfg.arithmetic,
        seed=cfg.seed,
    )


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; CUDA math is pinned to full float32 (no TF32) so results stay exact."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but torch sees no CUDA device here; use device=cpu")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device={name!r} is unknown; allowed: cpu, cuda")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, letting a ConfigError from the target through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def _loader(dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def run_job(cfg: DictConfig, output_dir: Path, acc_lines_dir: Path) -> dict[str, Any]:
    """Run one configuration and return its result; also written atomically to ``output_dir``.

    The float model and its fixed-point simulation are evaluated on the same
    images in the same run. ``acc_lines_dir`` gets one human-readable line in
    ``acc1_acc5.txt`` (the sweep folder in a multirun).
    """
    started = time.perf_counter()
    settings = quant_settings(cfg)
    device = resolve_device(cfg.device.name)
    torch.manual_seed(cfg.seed)

    # Everything that can be checked from the config and the disk is checked
    # before a model is built, which may mean a download of hundreds of MB.
    if cfg.model.kind != cfg.dataset.kind:
        raise ConfigError(
            f"model={cfg.model.name} classifies {cfg.model.kind} images; it cannot be evaluated on "
            f"dataset={cfg.dataset.name} ({cfg.dataset.kind} images); choose a dataset of kind {cfg.model.kind}"
        )
    splits = build(cfg.dataset.splits, n_samples=cfg.n_samples, eval_limit=cfg.eval_limit, seed=cfg.seed)
    model: PretrainedModel = build(cfg.model.build)
    splits = splits.with_transform(model.transform)

    float_model = model.module.to(device)
    quant_model = QuantizedNetwork(model.module, settings).to(device)
    quant_model.calibrate(x.to(device) for x, _ in _loader(splits.calibration, cfg.batch_size, cfg.workers))
    float_acc, quant_acc = evaluate_pair(
        float_model, quant_model, _loader(splits.evaluation, cfg.batch_size, cfg.workers), device
    )

    result = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "bits": cfg.bits,
        "param_bits": settings.param_bits,
        "fwd_bits": settings.fwd_bits,
        "rounding": settings.rounding,
        "overflow": settings.overflow,
        "arithmetic": settings.arithmetic,
        "acc_bits": settings.acc_bits,
        "acc_overflow": settings.acc_overflow,
        "product_bits": settings.product_bits,
        "batchnorm": settings.batchnorm,
        "n_samples": len(splits.calibration),
        "calibration_images": splits.calibration_source,
        "n_eval": float_acc.n_images,
        "float_top1": float_acc.top1,
        "float_top5": float_acc.top5,
        "quant_top1": quant_acc.top1,
        "quant_top5": quant_acc.top5,
        "published_top1": model.meta.get("published_top1"),
        "published_top5": model.meta.get("published_top5"),
        "seed": cfg.seed,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 3),
        "fxpsweep_version": fxpsweep.__version__,
        "torch_version": torch.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    # The formats first, the result last: a result file means the whole job finished.
    atomic_write_json(output_dir / FORMATS_FILE, [dataclasses.asdict(f) for f in quant_model.formats()])
    atomic_write_json(output_dir / RESULT_FILE, result)
    _append_acc_line(acc_lines_dir / ACC_LINES_FILE, result)
    return result


def _append_acc_line(path: Path, r: dict[str, Any]) -> None:
    """One line per job, as the original tool wrote; a single short append is atomic on POSIX."""
    line = (
        f"model={r['model']} dataset={r['dataset']} param_bits={r['param_bits']} fwd_bits={r['fwd_bits']} "
        f"n_eval={r['n_eval']} float: acc1={r['float_top1']:.2f} acc5={r['float_top5']:.2f} "
        f"quant: acc1={r['quant_top1']:.2f} acc5={r['quant_top5']:.2f}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line)
