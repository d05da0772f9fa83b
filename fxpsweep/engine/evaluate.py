"""Top-1 / top-5 accuracy: the classes each network ranks highest on every image, and how often the label is among them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxpsweep.core.progress import progress

TOP_K = 5


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


@dataclass
class Predictions:
    """The ``TOP_K`` best classes of every image (best first, see ``ranked_classes``) and its label."""

    top: torch.Tensor  # (N, min(TOP_K, classes)) int64
    labels: torch.Tensor  # (N,) int64

    def accuracy(self) -> Accuracy:
        hits = self.top == self.labels.unsqueeze(1)
        n = len(self.labels)
        pct = [100.0 * float(hits[:, :k].any(1).sum()) / max(n, 1) for k in (1, TOP_K)]
        return Accuracy(pct[0], pct[1], n)

    def top1_correct(self) -> torch.Tensor:
        """(N,) bool: whether each image's best class is its label."""
        return self.top[:, 0] == self.labels

    def plain(self) -> dict[str, torch.Tensor]:
        """As a dict of tensors (what ``storage.cached`` keeps)."""
        return {"top": self.top, "labels": self.labels}


def paired_top1(reference: Predictions, other: Predictions) -> tuple[int, int]:
    """(images ``reference`` gets right and ``other`` wrong, images ``other`` gets right and ``reference`` wrong).

    The two counts that a paired comparison of top-1 on the same images rests
    on: the drop is their difference, its sampling error grows with their sum.
    """
    ref, oth = reference.top1_correct(), other.top1_correct()
    return int((ref & ~oth).sum()), int((~ref & oth).sum())


@torch.no_grad()
def predict(models: list[nn.Module], loader: DataLoader, device: torch.device, desc: str = "evaluating") -> list[Predictions]:
    """The predictions of each of ``models`` on every image of ``loader``, in one pass over the images."""
    tops: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    for images, batch_labels in progress(loader, desc=desc, unit="batch"):
        images = images.to(device)
        for found, model in zip(tops, models):
            logits = model(images)
            found.append(ranked_classes(logits, min(TOP_K, logits.shape[1])).cpu())
        labels.append(torch.as_tensor(batch_labels).cpu())
    label_tensor = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    return [Predictions(torch.cat(found) if found else torch.zeros(0, TOP_K, dtype=torch.int64), label_tensor) for found in tops]
