"""Top-1/top-5 counting: ties between logits rank by class index, as a hardware argmax keeps the first maximum."""

from __future__ import annotations

import torch

from fxpsweep.sweep.evaluate import Predictions, ranked_classes


def test_equal_logits_rank_by_class_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0]])
    assert ranked_classes(logits, 5).tolist() == [[1, 2, 4, 6, 5]]


def test_a_tie_with_a_lower_class_is_a_top1_miss() -> None:
    logits = torch.tensor([[2.0, 2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 2.0, 0.0, 0.0, 0.0]])
    accuracy = Predictions(ranked_classes(logits, 5), torch.tensor([0, 2])).accuracy()
    assert (accuracy.top1, accuracy.top5, accuracy.n_images) == (50.0, 100.0, 2)
