"""Top-1 / top-5 accuracy of the float network and its fixed-point simulation on the same images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm


@dataclass
class Accuracy:
    """Top-1 and top-5 accuracy in percent over ``n_images`` images."""

    top1: float
    top5: float
    n_images: int


class TopKCounter:
    """Counts, over batches, how often the label is among the k highest logits."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        self.ks = ks
        self.correct = dict.fromkeys(ks, 0)
        self.total = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k_max = min(max(self.ks), logits.shape[1])
        top = logits.topk(k_max, dim=1).indices
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
    for images, labels in tqdm(loader, desc="evaluating", unit="batch"):
        images, labels = images.to(device), labels.to(device)
        float_counter.update(float_model(images), labels)
        quant_counter.update(quant_model(images), labels)
    return float_counter.accuracy(), quant_counter.accuracy()
