"""Shared fixtures: the repo root, a per-session cache with the trained digits model, and running the app;
the test tiers (markers) and freed memory given back after large tests."""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def device():
    """Where engine tests run (a ``torch.device``): cpu, or FXPSWEEP_TEST_DEVICE=cuda on a GPU machine (TF32 off)."""
    import torch  # here, not at the top: cocotb's simulator process loads this file too, and needs no torch

    name = os.environ.get("FXPSWEEP_TEST_DEVICE", "cpu")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the trained embedded model, trained once per test session."""
    from fxpsweep.models.digits_cnn import pretrained_digits_cnn

    path = tmp_path_factory.mktemp("cache")
    pretrained_digits_cnn(path)
    return path


@pytest.fixture
def run_app(cache_dir: Path):
    """Run ``python run.py ARGS`` in a subprocess, with the test cache, and return the finished process."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "FXPSWEEP_CACHE": str(cache_dir), "HYDRA_FULL_ERROR": "0", **(env or {})}
        return subprocess.run(
            [sys.executable, str(REPO / "run.py"), *args],
            cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
        )

    return run


# Tests that need a cluster, a simulator or the shared data are in the full suite only, never the quick tier.
NEEDS_MORE = ("slurm", "rtl", "realdata")

# The quick tier (pytest -m "not slow") runs every module and every command at least once; these tests (node id
# patterns) are left to the full suite: whole torchvision networks, more cases of a property the quick tier
# already runs once, and sweeps run as processes.
SLOW = [
    "backends/test_fused.py::test_compiled_rounding_equals_eager_and_the_reference[[]*",  # one case stays quick:
    "!backends/test_fused.py::test_compiled_rounding_equals_eager_and_the_reference[[]nearest_even-saturate-float32[]]",
    "backends/test_fused.py::test_combine_and_round_in_one_pass_equals_combine_then_round[[]floor[]]",
    "backends/test_fused.py::test_a_compiled_pass_served_from_the_cache_to_narrower_vectors_is_exact",
    "backends/test_rounding_loop.py::*[[]prefetched-*",  # the prefetching loops: their own case stays quick
    "backends/test_rounding_loop.py::test_kernel_terms_summed_and_rounded_in_one_loop_give_the_reference[[]4-*",
    "engine/test_layer_codes.py::test_every_kernel_is_exact_with_onednn_held_to_avx2",
    "engine/test_network_codes.py::*",  # squeezenet1_1 at 8 bits stays quick:
    "!engine/test_network_codes.py::test_network_is_bit_identical_to_an_integer_rerun[[]squeezenet1_1-8-32-channel[]]",
    "engine/test_dot_add.py::test_each_layer_that_only_a_residual_add_reads_runs_with_it_in_one_pass[[]8-exact[]]",
    "engine/test_dot_add.py::test_where_the_loop_does_not_apply_the_two_operations_run_one_after_the_other",
    "golden/test_golden.py::*",  # export settings and a layer pattern (export and replay) stay quick:
    "!golden/test_golden.py::test_bad_export_settings",
    "!golden/test_golden.py::test_a_destination_that_cannot_take_an_export_is_refused_before_any_work",
    "!golden/test_golden.py::test_a_mem_header_states_the_scale_of_any_fraction_width[[]*",
    "!golden/test_golden.py::test_a_layer_pattern_exports_only_those_operations",
    "models/test_models.py::test_model_builds_from_its_checkpoint_and_runs_one_batch[[]*",  # two stay quick:
    "!models/test_models.py::test_model_builds_from_its_checkpoint_and_runs_one_batch[[]resnet20_cifar10[]]",
    "!models/test_models.py::test_model_builds_from_its_checkpoint_and_runs_one_batch[[]squeezenet_v1[]]",
    "models/test_torchvision_offline.py::test_resnet50_runs_from_a_checkpoint_in_torch_home",
    "sweep/test_reuse.py::*",
    "integration/test_app.py::*",  # a bad combination stays quick (a run: test_commands.py):
    "!integration/test_app.py::test_bad_model_and_dataset_combinations_fail_with_a_clear_message[[]args0-*",
    "integration/test_job_folders.py::test_an_override_list_longer_than_255_bytes_gets_a_short_folder",
    "integration/test_job_folders.py::test_path_and_spaced_values_give_flat_folders_with_the_full_value_on_record",
    "integration/test_job_folders.py::test_the_readme_imagenet_example_gives_flat_folders",
    "integration/test_precision.py::test_rules_on_the_command_line_change_exactly_the_registers_they_name",
    "integration/test_precision.py::test_a_rule_that_matches_nothing_stops_run_py_with_one_line",  # and test_bad_config
    "models/test_models.py::test_run_py_reports_a_missing_checkpoint_without_a_traceback",  # run.py's one line: test_bad_config
    "integration/test_quickstart.py::*",
    "integration/test_search.py::*",  # one bad setting stays quick:
    "!integration/test_search.py::test_bad_search_settings_are_one_line_errors[[]args0-*",
    "integration/test_sensitivity.py::*",
    "integration/test_sweeps.py::*",
]


def is_slow(nodeid: str) -> bool:
    """Whether ``SLOW`` leaves the test (``tests/...`` node id) to the full suite."""
    path = nodeid.removeprefix("tests/")
    slow = False
    for pattern in SLOW:
        if pattern.startswith("!"):
            slow = slow and not fnmatch.fnmatchcase(path, pattern[1:])
        elif fnmatch.fnmatchcase(path, pattern):
            slow = True
    return slow


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if is_slow(item.nodeid) or any(item.get_closest_marker(name) for name in NEEDS_MORE):
            item.add_marker(pytest.mark.slow)


_LIBC_NAME = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_LIBC_NAME) if _LIBC_NAME else None


GIVE_BACK_ABOVE_MB = 1536  # resident memory above which a test's freed memory goes back to the system
GROWN_BY_MB = 256  # ... once it has grown this much since the last give-back (what that left is not freed memory)
_resident_after_give_back = 0


def _resident_mb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS:"))


@pytest.fixture(autouse=True)
def give_memory_back() -> None:
    """After a test that leaves the process large, hand the memory its networks freed back to the system: glibc
    keeps freed blocks below its mmap threshold in the heap, one process runs the whole suite, and the next
    test's own peak would come on top. A collection and a trim cost up to a second in a large process, too much
    to run after every small test: they run when a test left the process above the line and larger than the last
    give-back left it, by more than ``GROWN_BY_MB``."""
    global _resident_after_give_back
    yield
    resident = _resident_mb()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim") and resident > max(GIVE_BACK_ABOVE_MB, _resident_after_give_back + GROWN_BY_MB):
        gc.collect()
        _LIBC.malloc_trim(0)
        _resident_after_give_back = _resident_mb()
    else:  # a process that shrank since gives back again from where it is now
        _resident_after_give_back = min(_resident_after_give_back, resident)
