"""Bring your own network: any ``nn.Module`` plus a state dict file.

A model config names the architecture (anything Hydra can instantiate), the
checkpoint path, where the state dict sits inside the file, a key prefix to
strip (``module.`` from DataParallel) and the preprocessing; see docs/models-and-datasets.md.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from fxpsweep.core.errors import ConfigError
from fxpsweep.models import PretrainedModel
from fxpsweep.core.storage import fetch_file, load_checkpoint


def from_state_dict(
    architecture: nn.Module,
    path: str,
    url: str | None = None,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
    transform: Callable | None = None,
    published_top1: float | None = None,
    missing_hint: str = "set the model's checkpoint to the state dict file",
) -> PretrainedModel:
    """``architecture`` with the weights of the checkpoint at ``path`` (downloaded from ``url`` if missing), loaded strictly."""
    file = fetch_file(path, url, missing_hint)
    state = load_checkpoint(file)
    if state_dict_key:
        if not isinstance(state, dict) or state_dict_key not in state:
            keys = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise ConfigError(f"checkpoint {path} has no {state_dict_key!r} entry (it has: {keys})")
        state = state[state_dict_key]
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    result = architecture.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"checkpoint {path} does not fit {type(architecture).__name__}: "
            f"missing {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''} "
            "(set strip_prefix or state_dict_key?)"
        )
    meta = {"checkpoint": str(file), "published_top1": published_top1}
    return PretrainedModel(architecture.eval(), transform, meta)
