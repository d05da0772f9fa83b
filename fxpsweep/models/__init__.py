"""Pretrained models: each builder returns a PretrainedModel that carries its preprocessing and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn


@dataclass
class PretrainedModel:
    """A float network ready for evaluation.

    ``transform``: the preprocessing from a decoded image to the network's
    input tensor (None where the dataset yields tensors already). ``meta``:
    published figures and provenance.
    """

    module: nn.Module
    transform: Callable | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> int:
        """How many classes the network scores: the outputs of its last conv/linear layer."""
        last = [m for m in self.module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        return last.out_features if isinstance(last, nn.Linear) else last.out_channels
