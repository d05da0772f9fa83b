"""Precision rules: per-layer word lengths, addressed by the layer names that ``layers.md`` and ``formats.json`` use.

A rule is one line of text, a glob pattern over layer names and the word
lengths it sets (bits, sign included)::

    layer4.* weight=4 output=6
    fc weight=8 bias=16
    conv1 acc=24

Keys: ``weight``, ``bias``, ``acc`` (conv/linear layers) and ``output`` (any
register: conv/linear, residual add, pooling, concatenation, and the network
input, named after the model's input argument, e.g. ``x``). What no rule sets
keeps the global ``param_bits`` / ``bias_bits`` / ``fwd_bits`` / ``acc_bits``.
Where rules overlap, the later rule wins, key by key. A rule that matches no
layer, or sets a register that none of the layers it matches has, is an
error that names the closest layer names.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from fxpsweep.core.fixedpoint import MAX_BITS, MIN_BITS
from fxpsweep.core.errors import ConfigError

KEYS = ("weight", "bias", "output", "acc")
DOT_ONLY = ("weight", "bias", "acc")  # registers of conv/linear layers only


@dataclass(frozen=True)
class Rule:
    """A glob ``pattern`` over layer names and the word lengths it sets, e.g. ``{"weight": 4}``."""

    pattern: str
    bits: tuple[tuple[str, int], ...]
    source: str = "precision.rules"  # where it was given, for error messages

    def __str__(self) -> str:
        return " ".join([self.pattern, *(f"{k}={v}" for k, v in self.bits)])


def parse_rule(text: object, where: str = "precision.rules") -> Rule:
    """``"PATTERN key=bits ..."`` as a Rule; a bad rule is a ConfigError naming it and what is allowed."""
    if not isinstance(text, str) or not text.split():
        raise ConfigError(f"{where}: {text!r} is not a rule; write 'PATTERN key=bits ...', e.g. 'layer4.* weight=4 output=6'")
    pattern, *settings = text.split()
    if not settings:
        raise ConfigError(f"{where}: rule {text!r} sets nothing; add key=bits with key in {', '.join(KEYS)}")
    bits = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in KEYS:
            raise ConfigError(f"{where}: {setting!r} in rule {text!r} is not key=bits; keys: {', '.join(KEYS)}")
        if not value.isdigit() or not MIN_BITS <= int(value) <= MAX_BITS:
            raise ConfigError(
                f"{where}: {setting} in rule {text!r} is not a word length; allowed: an integer from {MIN_BITS} to {MAX_BITS} (sign bit included)"
            )
        if key in dict(bits):
            raise ConfigError(f"{where}: rule {text!r} sets {key} twice; give each of {', '.join(KEYS)} at most once")
        bits.append((key, int(value)))
    return Rule(pattern, tuple(bits), where)


def resolve(rules: list[Rule], layers: dict[str, bool]) -> dict[str, dict[str, int]]:
    """Per layer name, the word lengths the rules set (later rules win).

    ``layers``: every layer name and whether it is a conv/linear layer (has weights, bias, accumulator).
    """
    assigned: dict[str, dict[str, int]] = {}
    for rule in rules:
        matched = [name for name in layers if fnmatch.fnmatchcase(name, rule.pattern)]
        if not matched:
            close = difflib.get_close_matches(rule.pattern, list(layers), n=5, cutoff=0.3) or list(layers)[:5]
            raise ConfigError(f"{rule.source}: rule {str(rule)!r} matches no layer; closest layer names: {', '.join(close)}")
        for key, value in rule.bits:
            targets = [name for name in matched if layers[name] or key not in DOT_ONLY]
            if not targets:
                raise ConfigError(
                    f"{rule.source}: rule {str(rule)!r} sets {key}, but the layers it matches ({', '.join(matched[:5])}) "
                    "have none: only conv/linear layers have weight, bias and acc"
                )
            for name in targets:
                assigned.setdefault(name, {})[key] = value
    return assigned
