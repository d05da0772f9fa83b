"""A job's configuration, and each command's own section, declared once: every key's type, default, check and meaning.

``JobConfig`` is the schema. Everything else about a key is derived from its
field: the defaults Hydra composes (registered with ``ConfigStore`` as
``job_schema``, the first entry of ``conf/config.yaml``'s defaults list), the
check ``check_config`` runs before any work, the fixed-point settings
(``quant_settings``: the fields with a ``setting``), the job identity that
names a result's row and column (``job_identity``), and the key table of
``docs/configuration.md`` (``markdown_rows``). The other commands' sections
(``SearchConfig`` for ``search.*``, ...) are schemas of the same kind, in the
same tables and checks.

Hydra gets the keys and defaults, not the types: OmegaConf's own type check
would answer ``bits=eight`` with a message of its own over several lines, and
in a multirun would stop the whole sweep while composing one job. The checks
here answer every bad value with one line naming the key and what is allowed.

A new key is one field, e.g. ``tile_rows: int = key(8, Whole(1), "rows per
tile")``; a datapath key also gets ``setting="tile_rows"`` and a field of the
same name in ``QuantSettings``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fxpsweep.backends.kernels import KERNEL_NAMES
from fxpsweep.core.errors import ConfigError
from fxpsweep.core.fixedpoint import MAX_BITS, MIN_BITS, OVERFLOW_MODES, ROUNDING_MODES, check_bits
from fxpsweep.core.rules import Rule, parse_rule
from fxpsweep.data.splits import EVAL_SPLITS, EVAL_SUBSETS
from fxpsweep.engine.calibration import GRANULARITIES, METHODS
from fxpsweep.engine.settings import ARITHMETIC_MODES, BATCHNORM_MODES, WEIGHT_ROUNDINGS, QuantSettings
from fxpsweep.precision.search import COSTS
from fxpsweep.precision.sensitivity import REGISTER_KINDS

SEED_LIMIT = 2**63  # torch.manual_seed takes seeds below this


# What a key allows. Each check raises ConfigError with one line naming the key, the value and what is
# allowed; ``kind`` is the type column of docs/configuration.md.

@dataclass(frozen=True)
class WordLength:
    """A word length in bits, sign included (``null`` too where ``optional``)."""

    optional: bool = False

    @property
    def kind(self) -> str:
        return "int or null" if self.optional else "int"

    def allowed(self) -> str:
        return f"{MIN_BITS}..{MAX_BITS}" + (", or `null`" if self.optional else "")

    def __call__(self, key: str, value: Any) -> None:
        if not (self.optional and value is None):
            check_bits(value, key)


@dataclass(frozen=True)
class Choice:
    """One of a few words."""

    options: tuple[str, ...]
    kind = "name"

    def allowed(self) -> str:
        return ", ".join(f"`{o}`" for o in self.options)

    def __call__(self, key: str, value: Any) -> None:
        if value not in self.options:
            raise ConfigError(f"{key}={value!r} is unknown; allowed: {', '.join(self.options)}")


@dataclass(frozen=True)
class Choices:
    """A list of distinct words, at least one, each one of a few."""

    options: tuple[str, ...]
    kind = "list of names"

    def allowed(self) -> str:
        return "a list of " + ", ".join(f"`{o}`" for o in self.options)

    def __call__(self, key: str, value: Any) -> None:
        example = f"{key}=[{','.join(self.options)}]"
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise ConfigError(f"{key}={value!r} must be a list of one or more of {', '.join(self.options)}, e.g. {example}")
        for item in value:
            if item not in self.options:
                raise ConfigError(f"{key}: {item!r} is unknown; allowed: {', '.join(self.options)}")
        if len(set(value)) < len(value):
            raise ConfigError(f"{key}={list(value)!r} names a value twice; give each once")


@dataclass(frozen=True)
class Whole:
    """An integer from ``minimum`` up (below ``limit`` where one is given)."""

    minimum: int
    limit: int | None = None
    limit_text: str = ""  # how the message writes limit - 1
    kind = "int"

    def allowed(self) -> str:
        return f"{self.minimum}..{self.limit_text}" if self.limit is not None else f">= {self.minimum}"

    def __call__(self, key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: an integer >= {self.minimum}")
        if self.limit is not None and value >= self.limit:
            raise ConfigError(f"{key}={value} is too large; allowed: an integer from {self.minimum} to {self.limit_text}")


@dataclass(frozen=True)
class Count:
    """A number of images: a positive integer (``null`` too where ``optional``, meaning all)."""

    optional: bool = False

    @property
    def kind(self) -> str:
        return "int or null" if self.optional else "int"

    def allowed(self) -> str:
        return ">= 1" + (", or `null`" if self.optional else "")

    def __call__(self, key: str, value: Any) -> None:
        if self.optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a positive integer" + (", or null" if self.optional else ""))


@dataclass(frozen=True)
class Fraction:
    """A float in [0, 1)."""

    kind = "float"

    def allowed(self) -> str:
        return "[0, 1)"

    def __call__(self, key: str, value: Any) -> None:
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ConfigError(f"{key}={value!r} must be a fraction in [0, 1)")


@dataclass(frozen=True)
class Flag:
    """``true`` or ``false``."""

    kind = "bool"

    def allowed(self) -> str:
        return "`true`, `false`"

    def __call__(self, key: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")


@dataclass(frozen=True)
class Real:
    """A number from ``minimum`` (excluded where ``open_below``) to below ``limit`` where one is given."""

    minimum: float
    must: str  # what the message says it must be: "a positive number of top-1 points"
    open_below: bool = True
    limit: float | None = None
    kind = "float"

    def allowed(self) -> str:
        if self.limit is None:
            return f"{'>' if self.open_below else '>='} {self.minimum:g}"
        return f"{'(' if self.open_below else '['}{self.minimum:g}, {self.limit:g})"

    def __call__(self, key: str, value: Any) -> None:
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        ok = ok and (value > self.minimum if self.open_below else value >= self.minimum)
        if not ok or (self.limit is not None and value >= self.limit):
            raise ConfigError(f"{key}={value!r} must be {self.must}")


@dataclass(frozen=True)
class WordLengths:
    """A list of one or more word lengths."""

    kind = "list of int"

    def allowed(self) -> str:
        return f"a list of {MIN_BITS}..{MAX_BITS}"

    def __call__(self, key: str, value: Any) -> None:
        if (isinstance(value, str) or not isinstance(value, Sequence) or not value
                or any(isinstance(w, bool) or not isinstance(w, int) or not MIN_BITS <= w <= MAX_BITS for w in value)):
            shown = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
            raise ConfigError(f"{key}={shown!r} must be a list of word lengths, integers from {MIN_BITS} to {MAX_BITS}")


@dataclass(frozen=True)
class Name:
    """A name that is also a file name (no ``/``), or with ``optional``, ``null``; with ``pattern``, a glob."""

    optional: bool = False
    pattern: bool = False

    @property
    def kind(self) -> str:
        return ("glob" if self.pattern else "str") + (" or null" if self.optional else "")

    def allowed(self) -> str:
        return ("a glob over operation names" if self.pattern else "a name without `/`") + (", or `null`" if self.optional else "")

    def __call__(self, key: str, value: Any) -> None:
        if self.optional and value is None:
            return
        if not isinstance(value, str) or not value or (not self.pattern and ("/" in value or "\0" in value)):
            raise ConfigError(f"{key}={value!r} must be {self.allowed().replace('`', '')}")


@dataclass(frozen=True)
class Folder:
    """A folder path; where ``writable``, one that exists or can be made, and can be written (with
    ``subfolders``, the folders already in it too: a cache's kinds, written by later steps of a job)."""

    writable: bool = False
    subfolders: bool = False
    kind = "path"

    def allowed(self) -> str:
        return "a writable folder" if self.writable else "a folder"

    def __call__(self, key: str, value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}={value!r} must be a folder path")
        if not self.writable:
            return
        path = Path(value).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):  # a unique name: jobs of a sweep check at once
                pass
        except OSError as err:
            raise ConfigError(f"{key}={value} is not a folder fxpsweep can write to ({err.strerror}); give a writable folder") from None
        for sub in sorted(path.iterdir()) if self.subfolders else []:
            if sub.is_dir() and not os.access(sub, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}={value}: its folder {sub.name}/ cannot be written; give a folder fxpsweep can write "
                                  "to throughout, or make it writable")


@dataclass(frozen=True)
class OptionalRule:
    """One precision rule ``'PATTERN key=bits ...'`` (see ``fxpsweep.core.rules``), or ``null``."""

    kind = "str or null"

    def allowed(self) -> str:
        return "a rule, or `null`"

    def __call__(self, key: str, value: Any) -> None:
        if value is not None:
            parse_rule(value, key)


Check = WordLength | Choice | Choices | Whole | Count | Fraction | Flag | Folder | OptionalRule


def key(default: Any, check: Check, doc: str, *, setting: str | None = None, names_job: bool = False) -> Any:
    """A schema field: its default, its check, its meaning (one line of docs/configuration.md).

    ``setting``: the ``QuantSettings`` field it sets (also its column in results). ``names_job``: part of
    ``job_identity`` (under its own name) though not a setting.
    """
    metadata = {"check": check, "doc": doc, "setting": setting, "names_job": names_job}
    if isinstance(default, list):  # a fresh list for each instance
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class CalibrationConfig:
    """``calibration.*``: how each register's fractional length F is chosen (docs/calibration.md)."""

    activations: str = key("mse", Choice(METHODS), "per activation tensor", setting="act_calibration")
    weights: str = key("mse", Choice(METHODS), "per weight tensor or channel", setting="weight_calibration")
    granularity: str = key("channel", Choice(GRANULARITIES), "weights: one F per output channel, or per tensor",
                           setting="weight_granularity")
    overflow_rate: float = key(0.0, Fraction(), "for `overflow_rate`: the fraction of calibration values allowed to saturate",
                               setting="overflow_rate")
    bias_correction: bool = key(True, Flag(), "shift each conv/linear bias by its output's mean error on the calibration images",
                                setting="bias_correction")
    weight_rounding: str = key("plain", Choice(WEIGHT_ROUNDINGS), "weight codes: `plain` (each weight to its nearest code), "
                               "`gptq` (chosen layer by layer to keep each output on the calibration images)",
                               setting="weight_rounding")


@dataclass
class JobConfig:
    """The keys of a job besides its config groups (``model``, ``dataset``, ``device``, ``precision``)."""

    bits: int = key(8, WordLength(), "word length, sign bit included; what `param_bits` and `fwd_bits` default to", names_job=True)
    param_bits: int = key("${bits}", WordLength(), "weights", setting="param_bits")
    bias_bits: int = key(32, WordLength(), "biases (their LSB never finer than the accumulator's)", setting="bias_bits")
    fwd_bits: int = key("${bits}", WordLength(), "activations, network input included", setting="fwd_bits")
    rounding: str = key("nearest_even", Choice(ROUNDING_MODES), "the rule at every rounding point", setting="rounding")
    overflow: str = key("saturate", Choice(OVERFLOW_MODES), "what a value beyond the word becomes", setting="overflow")
    arithmetic: str = key("exact", Choice(ARITHMETIC_MODES),
                          "`exact` (bit-exact integer datapath), `fast` (one float32 or int8 call per layer, exact below 2**24)",
                          setting="arithmetic")
    kernel: str = key("auto", Choice(("auto",) + KERNEL_NAMES[:-1]),
                      "exact kernel of every conv/linear: `auto` (the fastest, measured on the machine) or one forced "
                      "(a layer it cannot compute exactly runs on another, with a warning; not with `arithmetic=fast`)",
                      setting="kernel")
    acc_bits: int | None = key(None, WordLength(optional=True), "conv/linear accumulator word (`null`: exact, as wide as needed)",
                               setting="acc_bits")
    acc_overflow: str = key("wrap", Choice(OVERFLOW_MODES), "for an `acc_bits` accumulator, after every add", setting="acc_overflow")
    product_bits: int | None = key(None, WordLength(optional=True),
                                   "round every product into this many bits before summing (`null`: exact)", setting="product_bits")
    batchnorm: str = key("fold", Choice(BATCHNORM_MODES), "`fold` into the preceding conv, `keep` as a quantized per-channel multiply-add",
                         setting="batchnorm")
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    n_samples: int = key(20, Count(), "calibration images (never among the evaluation images)", names_job=True)
    eval_limit: int | None = key(None, Count(optional=True), "evaluate on N evaluation images (`null`: all)", names_job=True)
    eval_subset: str = key("first", Choice(EVAL_SUBSETS), "which N: the first (the original table: the first 1000), "
                           "or a random choice seeded by `seed`", names_job=True)
    eval_split: str = key("all", Choice(EVAL_SPLITS), "all evaluation images, or one of two disjoint seeded halves "
                          "(a search chooses on one, is judged on the other)", names_job=True)
    probe: str | None = key(None, OptionalRule(), "one more precision rule, after `precision.rules` (a sensitivity probe)")
    image_cache: bool = key(True, Flag(), "keep decoded, resized images in `cache_dir/images/` for the next job")
    batch_size: int = key(64, Whole(1), "images per batch")
    workers: int = key(0, Whole(0), "DataLoader worker processes, 0 for none")
    seed: int = key(0, Whole(0, SEED_LIMIT, "2**63 - 1"), "picks the calibration images; seeds stochastic rounding",
                    setting="seed")
    report_images: int = key(256, Whole(0), "evaluation images for the per-layer SQNR in `layers.md`, 0 for none")
    cache_dir: str = key('${oc.env:FXPSWEEP_CACHE,"~/.cache/fxpsweep"}', Folder(writable=True, subfolders=True),
                         "images, calibration statistics, float predictions, weight formats, kernel choices")
    dry_run: bool = key(False, Flag(), "list the sweep's jobs and whether each is done, damaged, failed, incomplete or new; run nothing")
    data_dir: str = key("${oc.env:FXPSWEEP_DATA,../shared/data}", Folder(),
                        "real weights and images of the bundled real-data configs")


ConfigStore.instance().store(name="job_schema", node=dataclasses.asdict(JobConfig()))


# The keys each command adds in its own section (``search.*``, ...), declared here like the job's and checked
# by ``check_config`` wherever the section is composed (the command's YAML file puts the schema in its
# defaults list and holds no values of its own here).

@dataclass
class SearchConfig:
    """``search.*``: the minimum-bits search (``python -m fxpsweep.search``, docs/precision.md)."""

    tolerance: float = key(1.0, Real(0, "a positive number of top-1 points"), "top-1 points below float allowed")
    confidence: float = key(0.9, Real(0.5, "a probability from 0.5 (no bound: the measured drop) to below 1", open_below=False, limit=1),
                            "passes where this one-sided bound on the paired top-1 drop is within the tolerance")
    activation_bits: int | None = key(None, WordLength(optional=True), "every activation register at this width, weights "
                                      "searched (`null`: activations take the weights' uniform width)")
    widths: list = key(list(range(2, 17)), WordLengths(), "word lengths a register may get")
    holdout_widths: list = key(list(range(2, 17)), WordLengths(), "uniform widths judged beside the answer")
    cost: str = key("weight_memory", Choice(tuple(COSTS)), "what the answer minimizes")
    probe_images: int = key(256, Count(), "search images per sensitivity probe")
    polish_evaluations: int = key(40, Whole(0), "at most this many single-knob narrowings tried after the allocations")
    name: str = key("${model.name}-${dataset.name}-tol${search.tolerance}-${search.cost}-${calibration.weight_rounding}", Name(),
                    "the answer's precision option (`precision/NAME.yaml`)")
    out: str = key("multirun/search/${search.name}", Folder(writable=True), "its evaluations, report and precision file")


@dataclass
class SensitivityConfig:
    """``sensitivity.*``: the per-register sensitivity study (``python -m fxpsweep.sensitivity``)."""

    probe_bits: int = key(4, WordLength(), "the width of the one register each probe narrows")
    registers: list = key(["weight", "output"], Choices(REGISTER_KINDS), "what probes narrow: conv/linear weights, every register's output")
    out: str = key("multirun/sensitivity/${model.name}-${dataset.name}-${bits}bit-probe${sensitivity.probe_bits}", Folder(writable=True),
                   "its jobs, table and plot")


@dataclass
class ExportConfig:
    """``export.*``: golden vectors (``python -m fxpsweep.export``, docs/golden-vectors.md)."""

    n_images: int = key(1, Count(), "the first N evaluation images")
    layers: str | None = key(None, Name(optional=True, pattern=True), "export only the operations this glob matches "
                             "(with the tensors they read; `null`: all)")
    out: str = key("golden/${model.name}-${dataset.name}-${bits}bit", Folder(), "a new folder (an export is never written over another)")


@dataclass
class FinetuneConfig:
    """``finetune.*``: training a CIFAR transfer model (``python -m fxpsweep.finetune``)."""

    epochs: int = key(3, Whole(1), "passes over the training images")
    lr: float = key(0.01, Real(0, "a positive learning rate"), "peak learning rate, cosine-annealed to 0 over all steps")
    momentum: float = key(0.9, Fraction(), "SGD momentum")
    weight_decay: float = key(5e-4, Real(0, "a number >= 0", open_below=False), "SGD weight decay")
    batch_size: int = key(64, Whole(1), "training images per step")
    train_limit: int | None = key(None, Count(optional=True), "train on the first N training images (`null`: all)")


COMMAND_SCHEMAS = {"search": SearchConfig, "sensitivity": SensitivityConfig, "export": ExportConfig, "finetune": FinetuneConfig}
for _section, _schema in COMMAND_SCHEMAS.items():
    ConfigStore.instance().store(name=f"{_section}_schema", node={_section: dataclasses.asdict(_schema())})


def schema_keys(schema: type = JobConfig, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every leaf key of ``schema`` in declaration order, dotted (``calibration.weights``), with its field."""
    keys = []
    for f in dataclasses.fields(schema):
        if "check" in f.metadata:
            keys.append((prefix + f.name, f))
        else:
            keys += schema_keys(f.default_factory, f"{prefix}{f.name}.")
    return keys


GROUPS = ("model", "dataset", "device", "precision")  # the config groups; their options hold their own keys
PRECISION_KEYS = ("name", "rules")


def _known_keys(cfg: DictConfig, where: str, known: list[str], hint: str = "") -> None:
    for name in cfg:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            suggestion = f"; did you mean {where}{close[0]}?" if close else f"; known: {', '.join(known)}"
            raise ConfigError(f"{where}{name} is not a key fxpsweep knows{hint}{suggestion}")


def check_keys(cfg: DictConfig) -> None:
    """Raise ConfigError for a key no schema declares (a misspelt key in a precision file, ``+key=...``) and for a
    precision option without its ``name`` and ``rules``."""
    top = list(dict.fromkeys(name.split(".")[0] for name, _ in schema_keys())) + [*GROUPS, *COMMAND_SCHEMAS]
    _known_keys(cfg, "", top)
    for f in dataclasses.fields(JobConfig):
        if "check" not in f.metadata:  # a section of keys (calibration.*)
            _known_keys(cfg[f.name], f"{f.name}.", [g.name for g in dataclasses.fields(f.default_factory)])
    for section, schema in COMMAND_SCHEMAS.items():
        if section in cfg:
            _known_keys(cfg[section], f"{section}.", [g.name for g in dataclasses.fields(schema)])
            if any(g.name not in cfg[section] for g in dataclasses.fields(schema)):  # given to another command
                raise ConfigError(f"{section}.* are the keys of python -m fxpsweep.{section}; this command takes none of them")
    precision = cfg.get("precision")
    if not isinstance(precision, DictConfig):
        raise ConfigError(f"precision={precision!r} must be a precision option: a file with `name:` and `rules:` (docs/precision.md)")
    _known_keys(precision, "precision.", list(PRECISION_KEYS),
                " (a precision file that writes `precision:` itself starts with the line `# @package _global_`)")
    for name in PRECISION_KEYS:
        if name not in precision:
            raise ConfigError(f"precision.{name} is missing; a precision file sets `name:` and `rules:` (docs/precision.md)")
    if not isinstance(precision.name, str) or not precision.name:
        raise ConfigError(f"precision.name={precision.name!r} must be a name")


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the config groups every command composes from


def check_config_files(args: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise ConfigError for a config file that an override chooses (``precision=NAME``, in ``conf_dir`` or a
    ``--config-dir``) and that is not valid YAML; Hydra would stop on it with a parser's traceback."""
    import yaml

    dirs, overrides = [conf_dir], []
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            dirs.append(Path(args[i + 1]).expanduser())
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.partition("=")[2]).expanduser())
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
    for override in overrides:
        group, _, names = override.partition("=")
        group = group.lstrip("+~")
        for name in names.split(","):  # a sweep's list of options
            for file in (d / group / f"{name.strip()}.yaml" for d in dirs):
                if not file.is_file():
                    continue
                try:
                    yaml.safe_load(file.read_text())
                except (yaml.YAMLError, UnicodeDecodeError) as err:
                    mark = getattr(err, "problem_mark", None)
                    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                    raise ConfigError(f"{group}={name.strip()}: {file} is not valid YAML ({problem}{where}); "
                                      "fix the file (docs/configuration.md)") from None


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad value of a command's config (a job's keys and, where composed, the
    command's own section), before any work."""
    check_keys(cfg)
    for name, f in schema_keys():
        f.metadata["check"](name, OmegaConf.select(cfg, name))
    for section, schema in COMMAND_SCHEMAS.items():  # a command's own section, where it is composed
        for name, f in schema_keys(schema, f"{section}.") if section in cfg else []:
            f.metadata["check"](name, OmegaConf.select(cfg, name))
    precision_rules(cfg)  # each rule parses; whether it matches a layer is known once the model is built
    keeps_freed_memory(cfg)
    if cfg.arithmetic == "fast" and cfg.kernel != "auto":
        raise ConfigError(f"kernel={cfg.kernel} forces an exact kernel, and arithmetic=fast runs one float32 or int8 call per "
                          "layer; leave kernel=auto, or set arithmetic=exact")


def quant_settings(cfg: DictConfig) -> QuantSettings:
    """The fixed-point configuration of ``cfg``; bad values raise ConfigError naming the key."""
    check_bits(cfg.bits, "bits")
    return QuantSettings(**{f.metadata["setting"]: OmegaConf.select(cfg, name) for name, f in schema_keys() if f.metadata["setting"]})


def identity_keys() -> dict[str, str]:
    """The schema keys that name a job, by their column in results: ``{"act_calibration": "calibration.activations", ...}``."""
    return {f.metadata["setting"] or name: name for name, f in schema_keys() if f.metadata["setting"] or f.metadata["names_job"]}


def job_identity(cfg: DictConfig) -> dict[str, Any]:
    """What a job is, from its config alone: the fields that name its row and column in the table."""
    return {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        **{column: OmegaConf.select(cfg, name) for column, name in identity_keys().items()},
        "precision": precision_label(cfg),
        "precision_rules": rule_texts(cfg),
        "config": plain_config(cfg),
    }


def precision_rules(cfg: DictConfig) -> list[Rule]:
    """The job's precision rules: ``precision.rules``, then ``probe``."""
    texts = cfg.precision.rules
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ConfigError(f"precision.rules={texts!r} must be a list of rules, e.g. precision.rules=['features.* weight=4']")
    rules = [parse_rule(text, f"precision.rules[{i}]") for i, text in enumerate(cfg.precision.rules)]
    return rules + ([parse_rule(cfg.probe, "probe")] if cfg.probe is not None else [])


def rule_texts(cfg: DictConfig) -> list[str]:
    """The job's precision rules as given (``precision.rules``, then ``probe``), not yet checked."""
    return [str(r) for r in cfg.precision.rules] + ([str(cfg.probe)] if cfg.probe is not None else [])


def precision_label(cfg: DictConfig) -> str:
    """``uniform``, or a name and a short hash of the rules (and probe): tells mixed runs apart.

    The name is the precision option's (a precision file), or ``mixed`` for rules given on the command line.
    """
    rules = rule_texts(cfg)
    if not rules:
        return "uniform"
    name = "mixed" if cfg.precision.name == "uniform" else cfg.precision.name
    return f"{name}:{hashlib.sha256(json.dumps(rules).encode()).hexdigest()[:8]}"


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's resolved config as plain data (what ``result.json`` stores and reruns compare)."""
    return OmegaConf.to_container(cfg, resolve=True)


def keeps_freed_memory(cfg: DictConfig) -> bool:
    """``device.keep_freed_memory`` (false where the device group has no such key: ``cuda``)."""
    keep = OmegaConf.select(cfg, "device.keep_freed_memory", default=False)
    if not isinstance(keep, bool):
        raise ConfigError(f"device.keep_freed_memory={keep!r} must be true or false")
    return keep


DOCS_MARKERS = ("job-keys", "command-keys")  # docs/configuration.md's key tables sit between <!-- NAME --> and <!-- /NAME -->


def markdown_rows(marker: str = "job-keys") -> list[str]:
    """The rows of one of docs/configuration.md's key tables (a job's keys, or the commands' sections): key, type,
    default, allowed values, meaning."""
    keys = schema_keys() if marker == "job-keys" else [k for section, schema in COMMAND_SCHEMAS.items()
                                                        for k in schema_keys(schema, f"{section}.")]
    rows = []
    for name, f in keys:
        check = f.metadata["check"]
        default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        if f.default is dataclasses.MISSING:
            default = f.default_factory()
        rows.append(f"| `{name}` | {check.kind} | `{default}` | {check.allowed()} | {f.metadata['doc']} |")
    return rows


def write_docs_table(path: Path) -> None:
    """Rewrite the key tables between ``DOCS_MARKERS``' markers in ``path`` from the schemas."""
    text = path.read_text()
    for marker in DOCS_MARKERS:
        start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
        head, rest = text.split(start, 1)
        table = "| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n" + "\n".join(markdown_rows(marker)) + "\n"
        text = head + start + table + end + rest.split(end, 1)[1]
    path.write_text(text)


if __name__ == "__main__":  # python -m fxpsweep.sweep.config docs/configuration.md
    import sys

    write_docs_table(Path(sys.argv[1]))
