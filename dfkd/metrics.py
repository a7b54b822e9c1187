"""Classification metrics for a student or teacher, as in Rafat et al. (PLoS ONE 2023), Table 5.

All figures come from one confusion matrix M (rows = true class, columns = predicted class) over
n samples; with row sums r_c, column sums k_c:
    accuracy      = 100 · Σ_c M[c,c] / n
    precision_c   = 100 · M[c,c] / k_c,  recall_c = 100 · M[c,c] / r_c,  F1_c = 2·P·R / (P + R)
    Cohen's kappa = (p_o − p_e) / (1 − p_e),  p_o = Σ_c M[c,c] / n,  p_e = Σ_c r_c·k_c / n²
Every share (accuracy, precision, recall, F1 and their macro means) is a percentage; kappa is not a
share and stays in [−1, 1]. The result's `units` says so, for whoever reads the JSON.
A ratio with a zero denominator (a class never predicted, never present, or P = R = 0) is reported
as 0 rather than NaN, so the result stays JSON-valid and averages stay defined; macro averages are
the plain means over all `num_classes` classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

UNITS = {
    "accuracy, precision, recall, f1, macro_*": "percent",
    "kappa": "Cohen's kappa, -1 to 1 (0 = chance agreement)",
    "support, count, confusion_matrix": "images",
}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """The (num_classes, num_classes) int64 count matrix, rows = true class, columns = predicted."""
    if preds.shape != targets.shape or preds.dim() != 1:
        raise ValueError(f"preds and targets must both be (N,), got {tuple(preds.shape)} and {tuple(targets.shape)}")
    preds = preds.long().cpu()
    targets = targets.long().cpu()
    for name, t in (("preds", preds), ("targets", targets)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} must be class indices in [0, {num_classes}), got [{t.min()}, {t.max()}]")
    flat = torch.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_metrics(
    preds: Tensor, targets: Tensor, num_classes: int, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1 (all %), Cohen's kappa and the confusion matrix.

    `preds` and `targets` are (N,) class indices. Returns a JSON-ready dict with keys count, units,
    accuracy, macro_precision, macro_recall, macro_f1, kappa, per_class (a list, one dict per class
    with name, precision, recall, f1, support) and confusion_matrix (nested lists, rows = true).
    See the module docstring for the formulas and the zero-denominator rule.
    """
    names = class_names if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    matrix = confusion_matrix(preds, targets, num_classes).tolist()
    n = sum(map(sum, matrix))
    if n == 0:
        raise ValueError("classification metrics need at least one sample")
    row_sums = [sum(row) for row in matrix]
    col_sums = [sum(col) for col in zip(*matrix)]
    correct = sum(matrix[c][c] for c in range(num_classes))

    per_class = []
    for c, name in enumerate(names):
        precision = 100.0 * _ratio(matrix[c][c], col_sums[c])
        recall = 100.0 * _ratio(matrix[c][c], row_sums[c])
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class.append({"name": name, "precision": precision, "recall": recall, "f1": f1, "support": row_sums[c]})

    observed = correct / n
    expected = sum(r * k for r, k in zip(row_sums, col_sums)) / n**2
    return {
        "count": n,
        "units": UNITS,
        "accuracy": 100.0 * observed,
        "macro_precision": sum(m["precision"] for m in per_class) / num_classes,
        "macro_recall": sum(m["recall"] for m in per_class) / num_classes,
        "macro_f1": sum(m["f1"] for m in per_class) / num_classes,
        # p_e = 1 only when every sample is true and predicted as one class: agreement beyond
        # chance is then unmeasurable, reported as 0 by the zero-denominator rule.
        "kappa": _ratio(observed - expected, 1.0 - expected),
        "per_class": per_class,
        "confusion_matrix": matrix,
    }


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Percentage of samples on which student and teacher predict the same class (argmax)."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2 or not len(student_logits):
        raise ValueError(
            f"logits must both be non-empty (N, C), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    same = student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)
    return 100.0 * same.float().mean().item()
