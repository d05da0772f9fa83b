"""Every command, fed bad values of every kind, stops before any work with one line naming the key or file.

Each case runs the command's real entry point (``run.py``, ``python -m fxpsweep.X``: Hydra's composition, the
config-file check, the command's ``main``) in this process, as ``runpy`` runs it for ``python -m``, and asserts: a
non-zero exit, no traceback, the line naming what is wrong, and no result file left behind. The job keys' bad
values are ``BAD_VALUES`` of ``test_bad_config``, the study's ``STUDY_BAD_VALUES``; ``test_bad_config`` and ``test_commands`` prove the same
through a separate process for one case of each kind (the exit status and stderr a user sees).
"""

from __future__ import annotations

import contextlib
import io
import logging
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from fxpsweep.sweep.config import COMMAND_SCHEMAS, schema_keys
from test_bad_config import BAD_VALUES, STUDY_BAD_VALUES

# What a command leaves where it finished something: none may exist after a refused run.
RESULT_FILES = ("result.json", "formats.json", "search.json", "sensitivity.csv", "manifest.json", "bits_vs_accuracy.csv")
HYDRA_GROUPS = ("model=", "dataset=", "device=", "precision=")  # Hydra's own message lists the options it has

CIFAR_JOB = ["model=resnet18_cifar10", "dataset=cifar10_test2000", "dataset.path={tmp}/good.npz", "n_samples=1"]  # a model read from model.checkpoint
# (command, arguments, a piece of the one line). "{tmp}" is the test's folder, holding the bad files of
# bad_files(); "{conf}" a --config-dir with bad precision files.
COMMAND_CASES: list[tuple[str, list[str], str]] = [
    # run.py: inputs beyond the schema's values
    ("run.py", ["dataset=cifar10_test2000", "model=resnet20_cifar10", "dataset.path={tmp}/missing.npz"],
     "dataset.path={tmp}/missing.npz does not exist"),
    ("run.py", ["dataset=cifar10_test2000", "model=resnet20_cifar10", "dataset.path={tmp}"], "dataset.path={tmp} is a folder"),
    ("run.py", ["dataset=cifar10_test2000", "model=resnet20_cifar10", "dataset.path={tmp}/text.npz"],
     "dataset.path={tmp}/text.npz cannot be read (not an .npz archive)"),
    ("run.py", ["dataset=cifar10_test2000", "model=resnet20_cifar10", "dataset.path={tmp}/gray.npz"],
     "dataset.path={tmp}/gray.npz: x is uint8 of shape (4, 8, 8)"),
    ("run.py", ["dataset=imagenet", "model=resnet18", "dataset.root={tmp}/missing"], "dataset.root={tmp}/missing"),
    ("run.py", [*CIFAR_JOB, "model.checkpoint={tmp}/text.npz"],
     "checkpoint {tmp}/text.npz is corrupt or not a torch state dict (UnpicklingError: "),
    ("run.py", [*CIFAR_JOB, "model.checkpoint={tmp}/empty"], "{tmp}/empty is a folder, not a file"),
    ("run.py", [*CIFAR_JOB, "model.checkpoint={tmp}/missing.pt"], "{tmp}/missing.pt does not exist and no download URL is configured"),
    ("run.py", ["--config-dir", "{conf}", "precision=broken"], "precision=broken: {conf}/precision/broken.yaml is not valid YAML"),
    ("run.py", ["--config-dir", "{conf}", "precision=no_header"], "precision.precision is not a key fxpsweep knows"),
    ("run.py", ["cache_dir={tmp}/text.npz"], "cache_dir={tmp}/text.npz is not a folder fxpsweep can write to"),
    ("run.py", ["bits=24"], "param_bits=24, fwd_bits=24: layer 'features.3' sums 288 products"),
    ("run.py", ["+search.tolerance=1"], "search.* are the keys of python -m fxpsweep.search"),
    # search
    ("fxpsweep.search", ["search.tolerance=-1"], "search.tolerance=-1 must be a positive number of top-1 points"),
    ("fxpsweep.search", ["search.tolerance=lots"], "search.tolerance='lots' must be a positive number"),
    ("fxpsweep.search", ["search.confidence=1"], "search.confidence=1 must be a probability from 0.5"),
    ("fxpsweep.search", ["search.widths=[1,4]"], "search.widths=[1, 4] must be a list of word lengths, integers from 2 to 32"),
    ("fxpsweep.search", ["search.widths=[]"], "search.widths=[] must be a list of word lengths"),
    ("fxpsweep.search", ["search.holdout_widths=8"], "search.holdout_widths=8 must be a list of word lengths"),
    ("fxpsweep.search", ["search.cost=area"], "search.cost='area' is unknown; allowed: weight_memory, bitops"),
    ("fxpsweep.search", ["search.activation_bits=1"], "search.activation_bits=1 is impossible"),
    ("fxpsweep.search", ["search.probe_images=0"], "search.probe_images=0 must be a positive integer"),
    ("fxpsweep.search", ["search.polish_evaluations=-1"], "search.polish_evaluations=-1 is not allowed; allowed: an integer >= 0"),
    ("fxpsweep.search", ["search.name=a/b"], "search.name='a/b' must be a name without /"),
    ("fxpsweep.search", ["search.name=''"], "search.name='' must be a name"),
    ("fxpsweep.search", ["search.out=/proc/no/such"], "search.out=/proc/no/such is not a folder fxpsweep can write to"),
    ("fxpsweep.search", ["+search.tolerence=1"], "search.tolerence is not a key fxpsweep knows; did you mean search.tolerance?"),
    ("fxpsweep.search", ['precision.rules=["features.0 weight=4"]'], "precision.rules and probe are what the search chooses"),
    ("fxpsweep.search", ["bits=eight"], "bits='eight' is not a whole number"),
    ("fxpsweep.search", ["--config-dir", "{conf}", "precision=broken"], "is not valid YAML"),
    # sensitivity
    ("fxpsweep.sensitivity", ["+sensitivity.bits=3"], "sensitivity.bits is not a key fxpsweep knows"),
    ("fxpsweep.sensitivity", ["-m", "bits=4,8"], "a study is one multirun already"),
    ("fxpsweep.sensitivity", ["rounding=round"], "rounding='round' is unknown"),
    # export
    ("fxpsweep.export", ["export.n_images=0"], "export.n_images=0 must be a positive integer"),
    ("fxpsweep.export", ["export.n_images=all"], "export.n_images='all' must be a positive integer"),
    ("fxpsweep.export", ["export.layers=''"], "export.layers='' must be a glob over operation names"),
    ("fxpsweep.export", ["export.layers=nothing*"], "export.layers='nothing*' matches no operation"),
    ("fxpsweep.export", ["export.out={tmp}"], "export.out={tmp} exists; choose a new folder"),
    ("fxpsweep.export", ["export.out=/proc/no/such/folder"], "export.out=/proc/no/such/folder: its folder cannot be made"),
    ("fxpsweep.export", ["export.out=''"], "export.out='' must be a folder path"),
    ("fxpsweep.export", ["rounding=stochastic"], "rounding=stochastic draws random numbers that golden vectors cannot hold"),
    ("fxpsweep.export", ["+export.images=2"], "export.images is not a key fxpsweep knows; did you mean export.n_images?"),
    ("fxpsweep.export", ["bits=1"], "bits=1 is impossible"),
    # finetune
    ("fxpsweep.finetune", ["finetune.epochs=0"], "finetune.epochs=0 is not allowed; allowed: an integer >= 1"),
    ("fxpsweep.finetune", ["finetune.lr=0"], "finetune.lr=0 must be a positive learning rate"),
    ("fxpsweep.finetune", ["finetune.momentum=1"], "finetune.momentum=1 must be a fraction in [0, 1)"),
    ("fxpsweep.finetune", ["finetune.weight_decay=-1"], "finetune.weight_decay=-1 must be a number >= 0"),
    ("fxpsweep.finetune", ["finetune.batch_size=none"], "finetune.batch_size='none' is not allowed"),
    ("fxpsweep.finetune", ["finetune.train_limit=0"], "finetune.train_limit=0 must be a positive integer, or null"),
    ("fxpsweep.finetune", ["model=resnet20_cifar10"], "model=resnet20_cifar10 is not a CIFAR transfer model"),
    ("fxpsweep.finetune", ["dataset=cifar100"], "model=resnet18_cifar10 fine-tunes on dataset=cifar10, not dataset=cifar100"),
    # replay
    ("fxpsweep.replay", ["{tmp}/missing"], "{tmp}/missing is not a folder"),
    ("fxpsweep.replay", ["{tmp}/text.npz"], "{tmp}/text.npz is not a folder"),
    ("fxpsweep.replay", ["{tmp}/empty"], "{tmp}/empty/manifest.json is missing; this is not an export folder"),
    ("fxpsweep.replay", ["{tmp}/broken_export"], "{tmp}/broken_export/manifest.json is not valid JSON"),
    ("fxpsweep.replay", [], "the following arguments are required: folder"),
    # aggregate
    ("fxpsweep.aggregate", ["{tmp}/missing"], "not a folder: {tmp}/missing"),
    ("fxpsweep.aggregate", ["{tmp}/text.npz"], "not a folder: {tmp}/text.npz"),
    ("fxpsweep.aggregate", ["{tmp}/empty", "--readme", "{tmp}/gray.npz"], "--readme and --marker go together"),
    ("fxpsweep.aggregate", ["{tmp}/empty", "--readme", "{tmp}/missing.md", "--marker", "t"], "{tmp}/missing.md"),
    ("fxpsweep.aggregate", ["{tmp}/empty", "--readme", "{tmp}/conf/precision/no_header.yaml", "--marker", "t"],
     "expected one '<!-- t -->' followed by one '<!-- /t -->'"),
    ("fxpsweep.aggregate", ["{tmp}/empty", "--out", "/proc/no/such"], "--out=/proc/no/such is not a folder fxpsweep can write to"),
    ("fxpsweep.aggregate", ["{tmp}/empty"], "no job folders (result.json, error.json or job.json) under {tmp}/empty"),
    ("fxpsweep.aggregate", [], "the following arguments are required: sweep_dirs"),
]


def bad_files(tmp: Path) -> None:
    """The bad inputs the cases name: files of the wrong format and shape, an empty folder, a damaged export, and a
    --config-dir with precision files written wrongly."""
    (tmp / "text.npz").write_text("not an archive\n")
    np.savez(tmp / "gray.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, np.int64))
    np.savez(tmp / "good.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.int64))
    (tmp / "empty").mkdir()
    (tmp / "broken_export").mkdir()
    (tmp / "broken_export" / "manifest.json").write_text('{"operations": [')
    (tmp / "conf" / "precision").mkdir(parents=True)
    (tmp / "conf" / "precision" / "broken.yaml").write_text("# @package _global_\nprecision:\n  name: broken\n  rules: [ 'a weight=4'\n")
    (tmp / "conf" / "precision" / "no_header.yaml").write_text("precision:\n  name: no_header\n  rules: []\n")


def run_command(command: str, args: list[str]) -> tuple[object, str]:
    """Run ``command`` as ``python run.py ARGS`` or ``python -m command ARGS`` would, in this process: its exit code
    and what it printed (stdout, stderr, and the message of the SystemExit that ended it)."""
    argv, root = sys.argv, logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    code: object = 0
    try:
        sys.argv = [command, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if command == "run.py":
                runpy.run_path(str(REPO / "run.py"), run_name="__main__")
            else:
                with warnings.catch_warnings():  # python -m starts from a fresh process; this one imported it already
                    warnings.filterwarnings("ignore", ".* found in sys.modules after import of package", RuntimeWarning)
                    runpy.run_module(command, run_name="__main__", alter_sys=True)
    except SystemExit as end:
        code = end.code
    finally:  # Hydra configures logging for its job: give the test process its own back
        sys.argv = argv
        root.handlers[:], root.level = handlers, level
    text = out.getvalue() + (code + "\n" if isinstance(code, str) else "")
    return code, text


def all_cases() -> list:
    job = [("run.py", [arg], message) for values in BAD_VALUES.values() for arg, message in values]
    study = [("fxpsweep.sensitivity", [arg], message) for arg, message in STUDY_BAD_VALUES]
    return [pytest.param(c, a, m, id=f"{c.removeprefix('fxpsweep.')}:{' '.join(a)}") for c, a, m in job + study + COMMAND_CASES]


def test_every_command_has_bad_values_under_test() -> None:
    commands = {c for c, _, _ in COMMAND_CASES}
    assert commands == {"run.py", "fxpsweep.search", "fxpsweep.sensitivity", "fxpsweep.export", "fxpsweep.finetune",
                        "fxpsweep.replay", "fxpsweep.aggregate"}
    given = {arg.lstrip("+").split("=")[0] for case in all_cases() for arg in case.values[1]}
    for section, schema in COMMAND_SCHEMAS.items():  # every key of every command's own section (the job's: BAD_VALUES)
        assert {name for name, _ in schema_keys(schema, f"{section}.")} <= given, section
    assert len(all_cases()) >= 100


@pytest.mark.parametrize(("command", "args", "message"), all_cases())
def test_a_bad_value_stops_the_command_with_one_line_and_no_result(command, args, message, tmp_path, monkeypatch) -> None:
    bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)  # where the commands' default folders (multirun/, golden/, outputs/) would go
    monkeypatch.setenv("FXPSWEEP_CACHE", str(tmp_path / "cache"))
    fill = {"tmp": str(tmp_path), "conf": str(tmp_path / "conf")}
    args = [a.format(**fill) for a in args]
    if command in ("run.py", "fxpsweep.search", "fxpsweep.sensitivity", "fxpsweep.export", "fxpsweep.finetune") and "-m" not in args:
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    before = set(tmp_path.rglob("*"))
    code, text = run_command(command, args)
    message = message.format(**fill)
    assert code not in (0, None), f"exit {code}: {text[-1500:]}"
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if message in line]
    assert lines, f"{message!r} not in {text[-1500:]!r}"
    if command not in ("fxpsweep.replay", "fxpsweep.aggregate") and not any(a.startswith(HYDRA_GROUPS) for a in args if "=" in a):
        errors = [line for line in text.splitlines() if "error" in line.lower()]
        assert errors == lines, text[-1500:]  # one line says what is wrong
    left = [p for name in RESULT_FILES for p in tmp_path.rglob(name) if p not in before]
    assert not left, f"left behind: {left}"
