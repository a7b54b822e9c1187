"""Metrics on a hand-made confusion matrix, every expected number derived in the comments."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dfkd.metrics import classification_metrics, top1_agreement

# 3 classes, 10 samples.      predicted 0  1  2   row sum
#   true 0 (4 samples)                  3  1  0   4
#   true 1 (3 samples)                  1  2  0   3
#   true 2 (3 samples)                  1  2  0   3
#   column sum                          5  5  0
TARGETS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDS = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 1, 1])


def test_hand_made_confusion() -> None:
    m = classification_metrics(PREDS, TARGETS, 3, ["cat", "dog", "eel"])
    assert m["count"] == 10
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [1, 2, 0]]
    # 3 + 2 + 0 correct out of 10
    assert m["accuracy"] == pytest.approx(50.0)
    cat, dog, eel = m["per_class"]
    assert [c["name"] for c in m["per_class"]] == ["cat", "dog", "eel"]
    assert [c["support"] for c in m["per_class"]] == [4, 3, 3]
    # cat: P = 3/5, R = 3/4, F1 = 2·0.6·0.75/1.35 = 2/3
    assert (cat["precision"], cat["recall"], cat["f1"]) == pytest.approx((60, 75, 200 / 3))
    # dog: P = 2/5, R = 2/3, F1 = 2·(0.4·2/3)/(0.4 + 2/3) = 0.5
    assert (dog["precision"], dog["recall"], dog["f1"]) == pytest.approx((40, 200 / 3, 50))
    # eel is never predicted: precision 0/0 is reported as 0, not NaN; recall 0/3 = 0; F1 0.
    assert (eel["precision"], eel["recall"], eel["f1"]) == (0.0, 0.0, 0.0)
    # macro: P = (0.6 + 0.4 + 0)/3 = 1/3; R = (0.75 + 2/3 + 0)/3 = 17/36; F1 = (2/3 + 1/2 + 0)/3 = 7/18 (as %)
    assert m["macro_precision"] == pytest.approx(100 / 3)
    assert m["macro_recall"] == pytest.approx(100 * 17 / 36)
    assert m["macro_f1"] == pytest.approx(100 * 7 / 18)
    assert m["units"]["accuracy, precision, recall, f1, macro_*"] == "percent"
    # kappa: p_o = 0.5; p_e = (4·5 + 3·5 + 3·0)/100 = 0.35; (0.5 − 0.35)/(1 − 0.35) = 0.15/0.65 = 3/13
    assert m["kappa"] == pytest.approx(3 / 13)
    assert all(math.isfinite(v) for v in (m["macro_precision"], m["macro_f1"], m["kappa"]))
    json.dumps(m, allow_nan=False)


def test_default_class_names_and_perfect_predictions() -> None:
    m = classification_metrics(TARGETS, TARGETS, 3)
    assert [c["name"] for c in m["per_class"]] == ["0", "1", "2"]
    assert m["accuracy"] == 100.0
    assert m["kappa"] == pytest.approx(1.0)
    assert m["macro_f1"] == pytest.approx(100.0)


def test_kappa_is_zero_when_chance_agreement_is_total() -> None:
    # Every sample true and predicted as class 1: p_o = p_e = 1, kappa 0/0 -> reported as 0.
    ones = torch.ones(5, dtype=torch.long)
    assert classification_metrics(ones, ones, 3)["kappa"] == 0.0


def test_chance_level_predictions_give_zero_kappa() -> None:
    # 2 classes, rows (1, 1) / (1, 1): p_o = 0.5, p_e = (2·2 + 2·2)/16 = 0.5 -> kappa 0.
    m = classification_metrics(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]), 2)
    assert m["kappa"] == pytest.approx(0.0)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(PREDS, TARGETS, 3, ["a", "b"])
    with pytest.raises(ValueError, match="at least one sample"):
        classification_metrics(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)


def test_top1_agreement() -> None:
    # argmaxes: student (1, 0, 2, 2), teacher (1, 0, 0, 2) -> 3 of 4 agree = 75 %
    student = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.5, 2.0]])
    teacher = torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.0, 1.0], [4.0, 0.0, 3.0], [0.0, 0.0, 1.0]])
    assert top1_agreement(student, teacher) == pytest.approx(75.0)
    assert top1_agreement(student, student) == 100.0
