"""Freed host memory kept for reuse: a block freed and asked for again is not page-faulted afresh."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from fxpsweep.sweep import job

# In a process of its own (the setting is the process's): the page faults of writing a fresh 60 MiB tensor,
# after one of 64 MiB was written and freed (a little smaller, so that it fits the freed block whatever the
# alignment padding of either).
FAULTS_OF_A_REUSED_BLOCK = """
import json, resource, sys, torch
from fxpsweep.engine.host_memory import keep_freed_memory
kept = sys.argv[1] == "keep" and keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 * 2**20)  # 64 MiB, written, freed
before = faults()
torch.ones(15 * 2**20)
print(json.dumps({"kept": kept, "faults": faults() - before}))
"""
PAGES = 60 * 2**20 // 4096


def faults_of_a_reused_block(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc malloc's")
def test_a_freed_block_is_reused_without_faulting_its_pages_again() -> None:
    kept = faults_of_a_reused_block("keep")
    default = faults_of_a_reused_block("default")
    assert kept["kept"] and not default["kept"]
    assert default["faults"] > PAGES / 2  # malloc's defaults: mapped afresh, every page faulted again
    assert kept["faults"] < PAGES / 50  # kept: the same pages, already there


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_job_keeps_freed_memory_unless_told_not_to(monkeypatch, keep: bool) -> None:
    calls = []
    monkeypatch.setattr(job, "keep_freed_memory", lambda: calls.append(1) or True)
    device = job.resolve_device(OmegaConf.create({"name": "cpu", "keep_freed_memory": keep}))
    assert device.type == "cpu" and len(calls) == int(keep)
