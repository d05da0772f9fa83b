"""Each piece of a sweep's work is done once: the float network's predictions and the weight formats
are shared by the jobs of a sweep (in memory) and later ones (the cache folder)."""

from __future__ import annotations

from collections import Counter

import torch
from hydra import compose, initialize_config_dir

from conftest import REPO
from fxpsweep.models.digits_cnn import DigitsCNN
from fxpsweep.core import storage
from fxpsweep.sweep.job import run_job


def run_jobs(tmp_path, cache, overrides: list[list[str]]) -> tuple[list[dict], Counter]:
    """Run one job per override list in this process; count the float network's forward passes."""
    calls: Counter = Counter()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.update(["float"]) if isinstance(module, DigitsCNN) else None
    )
    results = []
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            for i, extra in enumerate(overrides):
                cfg = compose("config", overrides=[f"cache_dir={cache}", "report_images=0", *extra])
                results.append(run_job(cfg, tmp_path / str(i), tmp_path))
    finally:
        hook.remove()
    return results, calls


def test_a_four_width_sweep_evaluates_the_float_network_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(storage, "_in_memory", {})
    results, calls = run_jobs(tmp_path, tmp_path / "cache", [[f"bits={b}"] for b in (3, 4, 6, 8)])
    assert calls["float"] == 9  # 540 evaluation images in batches of 64: one pass
    assert [r["float_predictions"] for r in results] == ["computed", "memory", "memory", "memory"]
    assert len({(r["float_top1"], r["float_top5"]) for r in results}) == 1
    assert len({r["quant_top1"] for r in results}) > 1  # the fixed-point networks did run

    # A new process with the same cache folder: predictions and weight formats from disk.
    monkeypatch.setattr(storage, "_in_memory", {})
    again, calls = run_jobs(tmp_path / "again", tmp_path / "cache", [["bits=8"], ["bits=8", "calibration.activations=max"]])
    assert calls["float"] == 0
    assert [r["float_predictions"] for r in again] == ["cache", "memory"]
    assert [r["weight_formats"] for r in again] == ["cache", "memory"]
    assert again[0]["quant_top1"] == results[3]["quant_top1"]
