"""Calibration statistics (and anything ``storage.cached`` keeps) are computed once and reused:
from memory, then from the cache folder."""

from __future__ import annotations

import torch

from fxpsweep.engine import statistics
from fxpsweep.engine.calibration import TensorStats
from fxpsweep.core import storage


def test_statistics_are_gathered_once_per_identity(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(storage, "_in_memory", {})
    calls = []

    def gather():
        calls.append(1)
        return {"conv": TensorStats(2.5, torch.tensor([1.0, -2.5]))}

    identity = {"model": "m", "images": "train[seed 0: 20 of 100]"}
    first, source1 = statistics.cached_stats(identity, tmp_path, gather)
    second, source2 = statistics.cached_stats(identity, tmp_path, gather)
    assert (source1, source2, len(calls)) == ("computed", "memory", 1)

    monkeypatch.setattr(storage, "_in_memory", {})  # a new process sharing the cache folder
    third, source3 = statistics.cached_stats(identity, tmp_path, gather)
    assert (source3, len(calls)) == ("cache", 1)
    assert third["conv"].max_abs == 2.5 and torch.equal(third["conv"].sample, first["conv"].sample)

    _, source4 = statistics.cached_stats({**identity, "images": "other"}, tmp_path, gather)
    assert (source4, len(calls)) == ("computed", 2)


def test_an_unreadable_cache_file_is_computed_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(storage, "_in_memory", {})
    identity = {"model": "m"}
    path = tmp_path / "kind" / f"{storage.cache_key(identity)}.pt"
    path.parent.mkdir()
    path.write_bytes(b"not a torch file")
    value, source = storage.cached("kind", identity, tmp_path, lambda: {"x": torch.ones(1)})
    assert source == "computed" and torch.equal(value["x"], torch.ones(1))
    monkeypatch.setattr(storage, "_in_memory", {})
    assert storage.cached("kind", identity, tmp_path, lambda: None)[1] == "cache"  # rewritten whole


def test_observer_keeps_the_max_and_a_bounded_sample() -> None:
    observer = statistics.StatsObserver(sample_size=100, seed=0)
    observer.update("a", torch.arange(1000.0))
    observer.update("a", -torch.arange(500.0))
    stats = observer.result()["a"]
    assert stats.max_abs == 999.0 and stats.sample.shape == (100,)
    assert set(stats.sample.tolist()) <= set(range(-499, 1000))
