"""One job of a sweep: build, calibrate and evaluate one model at one bit-width, then save the result."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

import fxpsweep
from fxpsweep.data.preprocess import prepare, subset_key
from fxpsweep.data.splits import DataSplits, check_labels
from fxpsweep.backends.host_memory import freed_memory_kept
from fxpsweep.engine.network import QuantizedNetwork
from fxpsweep.engine.report import layer_sqnr, layer_table
from fxpsweep.engine.settings import QuantSettings
from fxpsweep.engine.statistics import cached_stats, weights_fingerprint
from fxpsweep.core.errors import ConfigError
from fxpsweep.models import PretrainedModel
from fxpsweep.engine.costs import layer_costs, totals
from fxpsweep.engine.evaluate import Predictions, paired_top1, predict
from fxpsweep.sweep.config import job_identity, keeps_freed_memory, precision_rules, quant_settings
from fxpsweep.sweep.jobdir import FORMATS_FILE, LAYERS_FILE, RESULT_FILE
from fxpsweep.core.storage import atomic_write_json, atomic_write_text, cached

log = logging.getLogger(__name__)

ACC_LINES_FILE = "acc1_acc5.txt"


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


def job_memory(cfg: DictConfig) -> contextlib.AbstractContextManager[bool]:
    """The host memory rule of a job: freed memory kept for reuse while it runs (``backends.host_memory``),
    on the CPU unless ``device.keep_freed_memory`` is false."""
    return freed_memory_kept(cfg.device.name == "cpu" and keeps_freed_memory(cfg))


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


@dataclass
class CalibratedNetwork:
    """A job's network, built and calibrated: what ``run_job`` evaluates and ``fxpsweep.export`` exports."""

    model: PretrainedModel
    quant_model: QuantizedNetwork
    splits: DataSplits  # network inputs (preprocessed)
    evaluation_images: list[int] | None  # indices of the evaluation images in the dataset
    identity: dict[str, Any]  # the network and dataset, for cache keys
    stats_source: str
    device: torch.device


def calibrated_network(cfg: DictConfig) -> CalibratedNetwork:
    """Build ``cfg``'s model and its fixed-point network, calibrated on the calibration images."""
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
    splits = build(
        cfg.dataset.splits, n_samples=cfg.n_samples, eval_limit=cfg.eval_limit, eval_subset=cfg.eval_subset,
        eval_split=cfg.eval_split, seed=cfg.seed,
    )
    evaluation_images = subset_key(splits.evaluation)
    model: PretrainedModel = build(cfg.model.build)
    check_labels(splits.evaluation, model.classes, cfg.model.name)
    model.module.to(device)
    quant_model = QuantizedNetwork(model.module, settings, cfg.cache_dir, precision_rules(cfg)).to(device)
    dataset_config = OmegaConf.to_container(cfg.dataset, resolve=True)
    splits = prepare(splits, model.transform, dataset_config, cfg.cache_dir if cfg.image_cache else None)
    # Statistics depend on the model, the calibration images and BatchNorm handling only:
    # gathered once, reused by every word length (from memory, or from the cache folder).
    network = {"model": OmegaConf.to_container(cfg.model, resolve=True), "weights": weights_fingerprint(model.module)}
    identity = {**network, "dataset": dataset_config, "calibration_images": splits.calibration_source, "batchnorm": settings.batchnorm}
    calibration_batches = [x.to(device) for x, _ in _loader(splits.calibration, cfg.batch_size, cfg.workers)]
    stats, stats_source = cached_stats(identity, cfg.cache_dir, lambda: quant_model.observe(calibration_batches, cfg.seed))
    log.info("calibration statistics: %s", stats_source)
    quant_model.calibrate(calibration_batches, stats)
    return CalibratedNetwork(model, quant_model, splits, evaluation_images, {**network, "dataset": dataset_config}, stats_source, device)


def run_job(cfg: DictConfig, output_dir: Path, acc_lines_dir: Path) -> dict[str, Any]:
    """Run one configuration and return its result; also written atomically to ``output_dir``.

    The float model and its fixed-point simulation are evaluated on the same
    images in the same run. ``acc_lines_dir`` gets one human-readable line in
    ``acc1_acc5.txt`` (the sweep folder in a multirun).
    """
    with job_memory(cfg):
        return _run_job(cfg, output_dir, acc_lines_dir)


def _run_job(cfg: DictConfig, output_dir: Path, acc_lines_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    job = calibrated_network(cfg)
    model, quant_model, splits, device, stats_source = job.model, job.quant_model, job.splits, job.device, job.stats_source
    float_predictions, float_source, quant_predictions = _evaluate(
        model.module, quant_model, _loader(splits.evaluation, cfg.batch_size, cfg.workers), device,
        {**job.identity, "images": job.evaluation_images, "transform": repr(model.transform), "device": device.type},
        cfg.cache_dir,
    )
    float_acc, quant_acc = float_predictions.accuracy(), quant_predictions.accuracy()
    top1_lost, top1_gained = paired_top1(float_predictions, quant_predictions)
    formats = quant_model.formats()  # overflow counts over the evaluation images, before the report reruns some
    costs = layer_costs(quant_model)
    sqnr = _layer_sqnr(model, quant_model.settings, quant_model, splits.evaluation, cfg, device)
    layers = layer_table(formats, sqnr)

    result = {
        **job_identity(cfg),
        "calibration_images": splits.calibration_source,
        "calibration_stats": stats_source,
        "weight_formats": quant_model.weight_formats_source,
        "float_predictions": float_source,
        "n_eval": float_acc.n_images,
        "float_top1": float_acc.top1,
        "float_top5": float_acc.top5,
        "quant_top1": quant_acc.top1,
        "quant_top5": quant_acc.top5,
        # Images float classifies right and fixed point wrong, and the reverse: the paired drop and its error.
        "top1_lost": top1_lost,
        "top1_gained": top1_gained,
        # The SQNR of the network's output (its last register) against float, on the report images.
        "output_sqnr_db": sqnr.get(quant_model.ops[-1].name) if sqnr else None,
        # The narrowest and widest word of the weights and of the activations (a mixed assignment's range).
        "weight_bits_range": _range(f.total_bits for f in formats if f.kind == "weight"),
        "activation_bits_range": _range(f.total_bits for f in formats if f.kind in ("input", "activation")),
        **totals(costs),
        "layer_costs": costs,
        "published_top1": model.meta.get("published_top1"),
        "published_top5": model.meta.get("published_top5"),
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 3),
        "fxpsweep_version": fxpsweep.__version__,
        "torch_version": torch.__version__,
    }
    # The formats and report first, the result last: a result file means the whole job finished.
    atomic_write_json(output_dir / FORMATS_FILE, [dataclasses.asdict(f) for f in formats])
    atomic_write_text(output_dir / LAYERS_FILE, _layers_markdown(result, layers))
    atomic_write_json(output_dir / RESULT_FILE, result)
    _append_acc_line(acc_lines_dir / ACC_LINES_FILE, result)
    return result


def _range(widths) -> list[int]:
    widths = list(widths)
    return [min(widths), max(widths)] if widths else []


def _evaluate(
    float_model: nn.Module, quant_model: nn.Module, loader: DataLoader, device: torch.device, identity: dict[str, Any], cache_dir: str
) -> tuple[Predictions, str, Predictions]:
    """(float predictions, where they came from, fixed-point predictions) on the evaluation images.

    The float network's predictions are the same in every job of a sweep: kept
    by ``storage.cached`` under ``identity`` (weights, dataset, which images,
    preprocessing, device type). Where they are not known yet, both networks
    run in the same pass over the images.
    """
    quant: list[Predictions] = []

    def both() -> dict[str, torch.Tensor]:
        float_predictions, quant_predictions = predict([float_model, quant_model], loader, device)
        quant.append(quant_predictions)
        return float_predictions.plain()

    plain, source = cached("float_predictions", identity, cache_dir, both)
    if not quant:
        quant = predict([quant_model], loader, device)
    return Predictions(**plain), source, quant[0]


# Images per batch of the SQNR report: it holds every register of a batch in float64 at once (MobileNetV2 at
# 64 images: gigabytes, whose page faults cost more than the report's arithmetic).
REPORT_BATCH = 8


def _layer_sqnr(
    model: PretrainedModel, settings: QuantSettings, quant_model: QuantizedNetwork, images, cfg: DictConfig, device: torch.device
) -> dict[str, float]:
    """SQNR per register against float on the first ``report_images`` evaluation images."""
    float_twin = QuantizedNetwork(model.module, settings).to(device)  # never calibrated: runs in float
    count = min(cfg.report_images, len(images))
    batches = (x.to(device) for x, _ in _loader(Subset(images, range(count)), min(cfg.batch_size, REPORT_BATCH), cfg.workers))
    return layer_sqnr(float_twin, quant_model, batches)


def _layers_markdown(result: dict[str, Any], layers) -> str:
    title = (
        f"# {result['model']} on {result['dataset']}: {result['param_bits']}-bit weights, "
        f"{result['fwd_bits']}-bit activations\n\n"
        f"Top-1/top-5: float {result['float_top1']:.2f}/{result['float_top5']:.2f}, "
        f"fixed point {result['quant_top1']:.2f}/{result['quant_top5']:.2f} ({result['n_eval']} images). "
        f"Overflows over all evaluation images; SQNR of each register against float "
        f"on the first {min(result['config']['report_images'], result['n_eval'])} of them.\n\n"
    )
    return title + layers.to_markdown(index=False) + "\n"


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
