"""Top-1/top-5 counting: ties between logits rank by class index, as a hardware argmax keeps the first maximum;
the paired counts against float and the error of the drop they give."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from fxpsweep.precision.search import Evaluation
from fxpsweep.engine.evaluate import Predictions, paired_top1, ranked_classes


def test_equal_logits_rank_by_class_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0]])
    assert ranked_classes(logits, 5).tolist() == [[1, 2, 4, 6, 5]]


def test_a_tie_with_a_lower_class_is_a_top1_miss() -> None:
    logits = torch.tensor([[2.0, 2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 2.0, 0.0, 0.0, 0.0]])
    accuracy = Predictions(ranked_classes(logits, 5), torch.tensor([0, 2])).accuracy()
    assert (accuracy.top1, accuracy.top5, accuracy.n_images) == (50.0, 100.0, 2)


def test_paired_counts_and_the_error_of_the_drop_match_a_per_image_count() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (997,), generator=generator)
    float_top = torch.where(torch.rand(997, generator=generator) < 0.8, labels, (labels + 1) % 10)
    quant_top = torch.where(torch.rand(997, generator=generator) < 0.1, (labels + 2) % 10, float_top)
    quant_top = torch.where(torch.rand(997, generator=generator) < 0.05, labels, quant_top)
    as_predictions = lambda top: Predictions(top.unsqueeze(1), labels)  # noqa: E731
    lost, gained = paired_top1(as_predictions(float_top), as_predictions(quant_top))
    difference = [int(f == y) - int(q == y) for f, q, y in zip(float_top.tolist(), quant_top.tolist(), labels.tolist())]
    assert (lost, gained) == (difference.count(1), difference.count(-1)) and lost > gained > 0
    evaluation = Evaluation("uniform", 8, None, [], "search", 997, 0.0, 0.0, lost, gained, None, 0.0, 0.0, False)
    assert evaluation.drop == pytest.approx(100 * statistics.fmean(difference))
    assert evaluation.drop_error == pytest.approx(100 * statistics.pstdev(difference) / math.sqrt(997))
