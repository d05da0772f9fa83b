"""Which tests raised the process's peak resident memory, and its resident memory
after each test file (Linux: ``VmHWM`` and ``VmRSS`` of ``/proc/self/status``), printed at the end of a run
(``-p peak_memory`` in ``pyproject.toml``'s ``addopts``)."""

from __future__ import annotations

import pytest

STEP_MB = 100  # a rise of the peak below this is not named
_peak_mb = 0
_lines: list[str] = []


def _memory_mb() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in status) if k in ("VmRSS", "VmHWM")}


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    global _peak_mb
    memory = _memory_mb()
    if memory["VmHWM"] > _peak_mb + STEP_MB:
        _lines.append(f"peak {memory['VmHWM']:6d} MB (+{memory['VmHWM'] - _peak_mb}) after {item.nodeid}")
        _peak_mb = memory["VmHWM"]
    if nextitem is None or nextitem.path != item.path:
        _lines.append(f"resident {memory['VmRSS']:6d} MB after {item.path.name}")


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.section("peak memory")
    for line in _lines:
        terminalreporter.write_line(line)
