"""numba's loops compiled for 512-bit vectors where the processor has AVX-512, in fxpsweep's process only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import llvmlite.binding as llvm
import numba  # noqa: F401  (initializes LLVM for get_host_cpu_features)
import pytest

from fxpsweep.backends import vector_width

# In a process of its own (numba's settings are the process's): import the loops, then compile a loop of
# our own and report whether its machine code uses 512-bit (zmm) registers.
SCRIPT = """
import json, os, re
import numba, numpy as np
import fxpsweep.backends.rounding_loop  # noqa: F401
from numba.core import config

@numba.njit
def scaled(v, s):
    for i in range(v.size):
        v[i] = np.rint(v[i] * s)

scaled(np.zeros(64, np.float32), np.float32(2))
asm = "".join(scaled.inspect_asm().values())
print(json.dumps({"features": config.CPU_FEATURES, "environment": os.environ.get("NUMBA_CPU_FEATURES"),
                  "zmm": len(re.findall("zmm", asm))}))
"""


def _run(tmp_path: Path, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
    environment.update(NUMBA_CACHE_DIR=str(tmp_path), **env)  # compiled afresh: cached code has no assembly
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=environment)
    return json.loads(done.stdout.splitlines()[-1])


def test_wide_vectors_where_the_processor_has_avx512(tmp_path: Path) -> None:
    host = llvm.get_host_cpu_features()
    seen = _run(tmp_path)
    assert seen["environment"] is None  # a job started from here elsewhere compiles for its own processor
    if host.get("avx512f"):
        assert seen["features"] == host.flatten() + ",-prefer-256-bit"
        assert seen["zmm"] > 0
    else:
        assert seen["features"] is None  # numba's defaults
        assert seen["zmm"] == 0


def test_a_users_numba_cpu_features_are_kept(tmp_path: Path) -> None:
    host = llvm.get_host_cpu_features().flatten()
    seen = _run(tmp_path, NUMBA_CPU_FEATURES=host)
    assert seen["features"] == host and seen["environment"] == host


class _Features(dict):
    """What ``llvmlite.binding.get_host_cpu_features`` returns: flags by name, and ``flatten``."""

    def flatten(self) -> str:
        return ",".join(("+" if on else "-") + name for name, on in self.items())


@pytest.mark.parametrize(("host", "expected"), [
    (_Features(avx2=True, avx512f=True), "+avx2,+avx512f,-prefer-256-bit"),
    (_Features(avx2=True, avx512f=False), None),  # AVX2 only: numba's defaults
    (_Features(avx2=True), None),
])
def test_prefer_wide_vectors(monkeypatch: pytest.MonkeyPatch, host: _Features, expected: str | None) -> None:
    monkeypatch.setattr(vector_width.config, "CPU_FEATURES", None)
    monkeypatch.setattr(vector_width.llvm, "get_host_cpu_features", lambda: host)
    assert vector_width.prefer_wide_vectors() == (expected is not None)
    assert vector_width.config.CPU_FEATURES == expected
    assert vector_width.prefer_wide_vectors() == (expected is not None)  # a second call changes nothing
    assert vector_width.config.CPU_FEATURES == expected


def test_unreadable_features_leave_numbas_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable() -> None:
        raise RuntimeError("failed to get host CPU features")

    monkeypatch.setattr(vector_width.config, "CPU_FEATURES", None)
    monkeypatch.setattr(vector_width.llvm, "get_host_cpu_features", unreadable)
    assert not vector_width.prefer_wide_vectors()
    assert vector_width.config.CPU_FEATURES is None
