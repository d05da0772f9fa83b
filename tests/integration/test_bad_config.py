"""Every config value that could make a job fail gives one line naming the key and what is allowed.

``BAD_VALUES`` (every key of a job) and ``STUDY_BAD_VALUES`` (the sensitivity study's) are run through the
commands' entry points by ``test_bad_input``; here, what ``run.py`` makes of such an error in a process of its
own (exit non-zero, one line, no traceback, no result file) for one value of each kind (a value
``check_config`` refuses, a missing group option, and a rule that only the built model can refuse), and the
checks that need a folder of precision files or a sweep.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import REPO
from fxpsweep.core.errors import ConfigError
from fxpsweep.sensitivity import check_study
from fxpsweep.sweep.config import check_config, schema_keys

# Each top-level key of a job (the schema's, fxpsweep/sweep/config.py, and the config groups): bad values
# and a piece of the message that names the key and what is allowed.
BAD_VALUES: dict[str, list[tuple[str, str]]] = {
    "bits": [("bits=1", "bits=1 is impossible"), ("bits=eight", "bits='eight' is not a whole number")],
    "param_bits": [("param_bits=33", "param_bits=33 is impossible")],
    "bias_bits": [("bias_bits=0", "bias_bits=0 is impossible")],
    "fwd_bits": [("fwd_bits=2.5", "fwd_bits=2.5 is not a whole number")],
    "rounding": [("rounding=round", "rounding='round' is unknown; allowed: nearest_even")],
    "overflow": [("overflow=clip", "overflow='clip' is unknown; allowed: saturate, wrap")],
    "arithmetic": [("arithmetic=quick", "arithmetic='quick' is unknown; allowed: exact, fast")],
    "kernel": [("kernel=gpu", "kernel='gpu' is unknown; allowed: auto, onednn_int8")],
    "acc_bits": [("acc_bits=64", "acc_bits=64 is impossible")],
    "acc_overflow": [("acc_overflow=clip", "acc_overflow='clip' is unknown; allowed: saturate, wrap")],
    "product_bits": [("product_bits=x", "product_bits='x' is not a whole number")],
    "batchnorm": [("batchnorm=drop", "batchnorm='drop' is unknown; allowed: fold, keep")],
    "calibration": [
        ("calibration.activations=mean", "calibration.activations='mean' is unknown; allowed: max, overflow_rate, mse"),
        ("calibration.weights=kl", "calibration.weights='kl' is unknown"),
        ("calibration.granularity=row", "calibration.granularity='row' is unknown; allowed: tensor, channel"),
        ("calibration.overflow_rate=1.5", "calibration.overflow_rate=1.5 must be a fraction in [0, 1)"),
        ("calibration.bias_correction=sometimes", "calibration.bias_correction='sometimes' must be true or false"),
        ("calibration.weight_rounding=adaround", "calibration.weight_rounding='adaround' is unknown; allowed: plain, gptq"),
    ],
    "n_samples": [("n_samples=0", "n_samples=0 must be a positive integer")],
    "eval_limit": [("eval_limit=-5", "eval_limit=-5 must be a positive integer, or null")],
    "eval_subset": [("eval_subset=last", "eval_subset='last' is unknown; allowed: first, random")],
    "eval_split": [("eval_split=train", "eval_split='train' is unknown; allowed: all, search, holdout")],
    "probe": [("probe='conv9 weight=4'", "probe: rule 'conv9 weight=4' matches no layer; closest layer names:"),
              ("probe=conv9", "probe: rule 'conv9' sets nothing")],
    "image_cache": [("image_cache=maybe", "image_cache='maybe' must be true or false")],
    "batch_size": [("batch_size=0", "batch_size=0 is not allowed; allowed: an integer >= 1"), ("batch_size=many", "batch_size='many'")],
    "workers": [("workers=-1", "workers=-1 is not allowed; allowed: an integer >= 0")],
    "seed": [("seed=-1", "seed=-1 is not allowed; allowed: an integer >= 0"), ("seed=1.5", "seed=1.5 is not allowed")],
    "report_images": [("report_images=all", "report_images='all' is not allowed; allowed: an integer >= 0")],
    "cache_dir": [("cache_dir=/proc/no/such", "cache_dir=/proc/no/such is not a folder fxpsweep can write to")],
    "dry_run": [("dry_run=2", "dry_run=2 must be true or false")],
    "data_dir": [("data_dir=''", "data_dir='' must be a folder path")],
    "model": [("model=vgg99", "Could not find 'model/vgg99'")],
    "dataset": [("dataset=mnist", "Could not find 'dataset/mnist'")],
    "device": [("device=tpu", "Could not find 'device/tpu'"),
               ("device.keep_freed_memory=sometimes", "device.keep_freed_memory='sometimes' must be true or false")],
    "precision": [("precision=mixed", "Could not find 'precision/mixed'"),
                  ('precision.rules=["features.0 weight=40"]', "precision.rules[0]: weight=40 in rule 'features.0 weight=40' is not a word length"),
                  ('precision.rules=["features.0 weight=4 weight=6"]',
                   "precision.rules[0]: rule 'features.0 weight=4 weight=6' sets weight twice; give each of"),
                  ("precision.rules='features.* weight=4'",
                   "precision.rules='features.* weight=4' must be a list of rules, e.g. precision.rules=['features.* weight=4']")],
}


def test_every_top_level_key_has_bad_values_under_test() -> None:
    config = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    groups = {next(iter(d)) for d in config["defaults"] if isinstance(d, dict)}
    keys = {name.split(".")[0] for name, _ in schema_keys()} | groups
    assert keys == set(BAD_VALUES)
    assert {name for name, _ in schema_keys()} <= {arg.split("=")[0] for values in BAD_VALUES.values() for arg, _ in values}


# One of each kind through run.py.
THROUGH_RUN_PY = ["bits=eight", "model=vgg99", "probe='conv9 weight=4'"]


def test_run_py_stops_on_a_bad_value_with_one_line_and_no_result(run_app, tmp_path) -> None:
    cases = [(arg, message) for values in BAD_VALUES.values() for arg, message in values if arg in THROUGH_RUN_PY]
    assert len(cases) == len(THROUGH_RUN_PY)

    def run(index: int):
        return run_app(cases[index][0], f"hydra.run.dir={tmp_path / str(index)}")

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(run, range(len(cases))))
    problems = []
    for index, ((arg, message), proc) in enumerate(zip(cases, procs)):
        lines = proc.stderr.strip().splitlines()
        if proc.returncode == 0 or "Traceback" in proc.stderr or not any(message in line for line in lines):
            problems.append(f"{arg}: exit {proc.returncode}, stderr {proc.stderr[-500:]!r}")
        elif arg.split("=")[0] not in ("model", "dataset", "device", "precision") and len(lines) != 1:
            problems.append(f"{arg}: {len(lines)} lines on stderr: {proc.stderr[-500:]!r}")
        if (tmp_path / str(index) / "result.json").exists():
            problems.append(f"{arg}: a result file was written")
    assert not problems, "\n".join(problems)


# The sensitivity study's own keys, composed as ``python -m fxpsweep.sensitivity`` composes them.
STUDY_BAD_VALUES = [
    ("sensitivity.probe_bits=0", "sensitivity.probe_bits=0 is impossible"),
    ("sensitivity.probe_bits=four", "sensitivity.probe_bits='four' is not a whole number"),
    ("sensitivity.registers=weight", "sensitivity.registers='weight' must be a list of one or more of weight, output, "
     "e.g. sensitivity.registers=[weight,output]"),
    ("sensitivity.registers=[]", "sensitivity.registers=[] must be a list of one or more of weight, output"),
    ("sensitivity.registers=[weight,bias]", "sensitivity.registers: 'bias' is unknown; allowed: weight, output"),
    ("sensitivity.registers=[weight,weight]", "sensitivity.registers=['weight', 'weight'] names a value twice"),
    ("sensitivity.out=/proc/no", "sensitivity.out=/proc/no is not a folder fxpsweep can write to"),
    ("probe='classifier weight=4'", "probe is set by the study itself, one per job; leave it out"),
]


def test_a_study_refuses_to_be_swept(tmp_path) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("sensitivity", overrides=[f"cache_dir={tmp_path / 'cache'}"])
    check_study(cfg)  # the defaults are fine
    with pytest.raises(ConfigError, match="a study is one multirun already"):
        check_study(cfg, multirun=True)


def test_a_kernel_forced_on_fast_arithmetic_is_one_line(tmp_path) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["arithmetic=fast", "kernel=float64", f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=r"^kernel=float64 forces an exact kernel, and arithmetic=fast runs one float32 or int8 call"):
        check_config(cfg)


# Precision files as users write them wrongly (in a folder of their own, --config-dir's search path), and keys
# no schema declares: each one line naming the key, with the closest one that exists.
PRECISION_FILES = {
    "no_header": "precision:\n  name: no_header\n  rules: []\n",
    "no_name": "# @package _global_\nprecision:\n  rules: ['conv1 weight=4']\n",
    "misspelt": "# @package _global_\nbitz: 3\nprecision:\n  name: misspelt\n  rules: []\n",
}
UNKNOWN_KEYS = [
    ("precision=no_header", "precision.precision is not a key fxpsweep knows (a precision file that writes `precision:` "
     "itself starts with the line `# @package _global_`); known: name, rules"),
    ("precision=no_name", "precision.name is missing; a precision file sets `name:` and `rules:` (docs/precision.md)"),
    ("precision=misspelt", "bitz is not a key fxpsweep knows; did you mean bits?"),
    ("+calibration.weightz=max", "calibration.weightz is not a key fxpsweep knows; did you mean calibration.weights?"),
]


@pytest.mark.parametrize("arg, message", UNKNOWN_KEYS, ids=[a for a, _ in UNKNOWN_KEYS])
def test_an_unknown_key_or_a_malformed_precision_file_is_one_line(arg: str, message: str, tmp_path) -> None:
    for name, text in PRECISION_FILES.items():
        (tmp_path / "precision").mkdir(exist_ok=True)
        (tmp_path / "precision" / f"{name}.yaml").write_text(text)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[arg, f"hydra.searchpath=[file://{tmp_path}]", f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value) == message


def test_a_sweep_folder_no_one_can_write_is_one_line_before_any_job(run_app) -> None:
    proc = run_app("-m", "bits=4,8", "hydra.sweep.dir=/proc/fxpsweep/sweep")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "fxpsweep: error: hydra.sweep.dir=/proc/fxpsweep/sweep is not a folder fxpsweep can write to")
