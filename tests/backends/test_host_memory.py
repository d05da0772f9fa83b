"""Freed host memory kept for reuse while a job runs: a freed block asked for again is not page-faulted
afresh, and on leaving, the free memory goes back to the kernel."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from fxpsweep.sweep import job

# In a process of its own (malloc's settings are the process's). Page faults of writing a fresh 60 MiB
# tensor after one of 64 MiB was written and freed (a little smaller, so that it fits the freed block
# whatever the alignment padding of either): inside the setting, inside it after a nested use has ended,
# and without it; and the resident memory of a freed 256 MiB block inside and after leaving.
SCRIPT = """
import json, resource, torch
from fxpsweep.backends.host_memory import freed_memory_kept

def faults_of_a_reused_block():
    torch.ones(16 * 2**20)  # 64 MiB, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(15 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

seen = {"default": faults_of_a_reused_block()}
with freed_memory_kept() as kept:
    seen["kept"] = kept
    seen["inside"] = faults_of_a_reused_block()
    with freed_memory_kept():
        pass
    seen["after_nested"] = faults_of_a_reused_block()
    torch.ones(64 * 2**20)  # 256 MiB, written, freed: kept
    seen["resident_inside"] = resident_mib()
seen["resident_after"] = resident_mib()
with freed_memory_kept(False) as kept:
    seen["disabled"] = kept
print(json.dumps(seen))
"""
PAGES = 60 * 2**20 // 4096


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc malloc's")
def test_freed_blocks_are_reused_inside_and_given_back_on_leaving() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["kept"] and not seen["disabled"]
    assert seen["default"] > PAGES / 2  # malloc's defaults: mapped afresh, every page faulted again
    assert seen["inside"] < PAGES / 50 and seen["after_nested"] < PAGES / 50  # the same pages, already there
    assert seen["resident_inside"] - seen["resident_after"] > 200  # MiB: the freed 256 MiB went back


@pytest.mark.parametrize(("device", "expected"), [
    ({"name": "cpu", "keep_freed_memory": True}, True),
    ({"name": "cpu", "keep_freed_memory": False}, False),
    ({"name": "cuda"}, False),
])
def test_a_job_keeps_freed_memory_on_the_cpu_unless_told_not_to(monkeypatch, device: dict, expected: bool) -> None:
    asked = []
    monkeypatch.setattr(job, "freed_memory_kept", lambda enabled: asked.append(enabled))
    job.job_memory(OmegaConf.create({"device": device}))
    assert asked == [expected]
