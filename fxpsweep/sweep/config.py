"""A job's configuration, declared once: every key's type, default, check and meaning.

``JobConfig`` is the schema. Everything else about a key is derived from its
field: the defaults Hydra composes (registered with ``ConfigStore`` as
``job_schema``, the first entry of ``conf/config.yaml``'s defaults list), the
check ``check_config`` runs before any work, the fixed-point settings
(``quant_settings``: the fields with a ``setting``), the job identity that
names a result's row and column (``job_identity``), and the key table of
``docs/configuration.md`` (``markdown_rows``).

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
class Folder:
    """A folder path; where ``writable``, one that exists or can be made, and can be written."""

    writable: bool = False
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
    return field(default=default, metadata={"check": check, "doc": doc, "setting": setting, "names_job": names_job})


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
    cache_dir: str = key('${oc.env:FXPSWEEP_CACHE,"~/.cache/fxpsweep"}', Folder(writable=True),
                         "images, calibration statistics, float predictions, weight formats, kernel choices")
    dry_run: bool = key(False, Flag(), "list the sweep's jobs and whether each is done, damaged, failed, incomplete or new; run nothing")
    data_dir: str = key("${oc.env:FXPSWEEP_DATA,../shared/data}", Folder(),
                        "real weights and images of the bundled real-data configs")


ConfigStore.instance().store(name="job_schema", node=dataclasses.asdict(JobConfig()))


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
COMMAND_SECTIONS = ("search", "sensitivity", "export", "finetune")  # what the other commands add, checked by them
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
    top = list(dict.fromkeys(name.split(".")[0] for name, _ in schema_keys())) + [*GROUPS, *COMMAND_SECTIONS]
    _known_keys(cfg, "", top)
    for f in dataclasses.fields(JobConfig):
        if "check" not in f.metadata:  # a section of keys (calibration.*)
            _known_keys(cfg[f.name], f"{f.name}.", [g.name for g in dataclasses.fields(f.default_factory)])
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


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad value of a job's config, before any work."""
    check_keys(cfg)
    for name, f in schema_keys():
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


DOCS_MARKER = "job-keys"  # docs/configuration.md's key table sits between <!-- job-keys --> and <!-- /job-keys -->


def markdown_rows() -> list[str]:
    """The rows of docs/configuration.md's key table: key, type, default, allowed values, meaning."""
    rows = []
    for name, f in schema_keys():
        check = f.metadata["check"]
        default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        rows.append(f"| `{name}` | {check.kind} | `{default}` | {check.allowed()} | {f.metadata['doc']} |")
    return rows


def write_docs_table(path: Path) -> None:
    """Rewrite the key table between ``DOCS_MARKER``'s markers in ``path`` from the schema."""
    text = path.read_text()
    start, end = f"<!-- {DOCS_MARKER} -->\n", f"<!-- /{DOCS_MARKER} -->"
    head, rest = text.split(start, 1)
    table = "| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n" + "\n".join(markdown_rows()) + "\n"
    path.write_text(head + start + table + end + rest.split(end, 1)[1])


if __name__ == "__main__":  # python -m fxpsweep.sweep.config docs/configuration.md
    import sys

    write_docs_table(Path(sys.argv[1]))
