"""Top-1 / top-5 accuracy of the float network and its fixed-point simulation on the same images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxpsweep.progress import progress


@dataclass
class Accuracy:
    """Top-1 and top-5 accuracy in percent over ``n_images`` images."""

    top1: float
    top5: float
    n_images: int


def ranked_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` classes with the highest logits per row, best first; equal logits rank by class index.

    Fixed-point logits tie often at narrow words; the lower class index wins,
    as a hardware argmax that keeps the first maximum does (``topk`` leaves
    the order of ties unspecified).
    """
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]


class TopKCounter:
    """Counts, over batches, how often the label is among the k highest logits (ties: see ``ranked_classes``)."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        self.ks = ks
        self.correct = dict.fromkeys(ks, 0)
        self.total = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k_max = min(max(self.ks), logits.shape[1])
        top = ranked_classes(logits, k_max)
        hits = top == labels.unsqueeze(1)
        for k in self.ks:
            self.correct[k] += int(hits[:, :k].any(dim=1).sum())
        self.total += len(labels)

    def accuracy(self) -> Accuracy:
        pct = {k: 100.0 * c / max(self.total, 1) for k, c in self.correct.items()}
        return Accuracy(pct[1], pct[5], self.total)


@torch.no_grad()
def evaluate_pair(float_model: nn.Module, quant_model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Accuracy, Accuracy]:
    """Accuracy of ``float_model`` and ``quant_model`` over every batch of ``loader``."""
    float_counter, quant_counter = TopKCounter(), TopKCounter()
    for images, labels in progress(loader, desc="evaluating", unit="batch"):
        images, labels = images.to(device), labels.to(device)
        float_counter.update(float_model(images), labels)
        quant_counter.update(quant_model(images), labels)
    return float_counter.accuracy(), quant_counter.accuracy()
