"""dfkd evaluate on the reference teacher: 91.18 % in fp32 on the CPU on the JPEG test split.

The 10k-image WRN-40-2 evaluation takes about a minute on two CPU cores, so it runs once, through
the CLI's --json (which calls `evaluate_checkpoint` on the CPU), and every check reads that result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from dfkd.checkpoints import CheckpointMeta, load_checkpoint, save_checkpoint
from dfkd.cli import app
from dfkd.data import load_split
from dfkd.device import prepare_model
from dfkd.errors import DfkdError
from dfkd.models import create_model
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD
from dfkd.stages.evaluate import evaluate_checkpoint, evaluate_on, predict_logits

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def teacher_metrics(
    reference_teacher: Path, cifar_jpeg_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as patch:
        # Module fixtures run before conftest's function-scoped cache isolation: point at the same folder.
        patch.setenv("DFKD_CACHE", str(tmp_path_factory.getbasetemp() / "dfkd-cache"))
        result = CliRunner().invoke(
            app, ["evaluate", str(reference_teacher), "--data", str(cifar_jpeg_root), "--device", "cpu", "--json"]
        )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


@pytest.mark.slow
def test_reference_teacher_accuracy(teacher_metrics: dict[str, Any], reference_teacher: Path) -> None:
    assert teacher_metrics["count"] == 10_000
    assert teacher_metrics["accuracy"] == pytest.approx(91.18, abs=0.1)
    assert teacher_metrics["model"] == {"path": str(reference_teacher), "arch": "wrn40_2", "num_classes": 10}
    assert teacher_metrics["data"].startswith("imagefolder ") and teacher_metrics["data"].endswith("(test)")


@pytest.mark.slow
def test_reference_teacher_metrics_are_consistent(teacher_metrics: dict[str, Any]) -> None:
    confusion = teacher_metrics["confusion_matrix"]
    assert len(confusion) == 10 and all(len(row) == 10 for row in confusion)
    n = sum(map(sum, confusion))
    assert n == 10_000
    diagonal = [confusion[c][c] for c in range(10)]
    assert sum(diagonal) / 100 == pytest.approx(teacher_metrics["accuracy"])
    rows = [sum(row) for row in confusion]
    cols = [sum(col) for col in zip(*confusion)]
    per_class = teacher_metrics["per_class"]
    assert [row["name"] for row in per_class] == CIFAR10_CLASSES
    assert [row["support"] for row in per_class] == rows == [1000] * 10
    for c, row in enumerate(per_class):
        assert row["recall"] == pytest.approx(100 * diagonal[c] / rows[c])
        assert row["precision"] == pytest.approx(100 * diagonal[c] / cols[c])
        assert row["f1"] == pytest.approx(2 * row["precision"] * row["recall"] / (row["precision"] + row["recall"]))
    assert teacher_metrics["macro_recall"] == pytest.approx(teacher_metrics["accuracy"])  # balanced classes, both %
    assert teacher_metrics["macro_f1"] == pytest.approx(sum(r["f1"] for r in per_class) / 10)
    observed = sum(diagonal) / n
    expected = sum(r * k for r, k in zip(rows, cols)) / n**2
    assert teacher_metrics["kappa"] == pytest.approx((observed - expected) / (1 - expected))
    # A 91 % classifier on 10 balanced classes: kappa = (0.9118 - 0.1) / 0.9, give or take the column sums.
    assert teacher_metrics["kappa"] == pytest.approx((0.9118 - 0.1) / 0.9, abs=0.002)


def test_api_on_a_slice(reference_student: Path, cifar_jpeg_root: Path) -> None:
    """Batching leaves the logits alone, features feed fc, and evaluate_on scores the argmax against the labels.

    The WRN-16-1 reference (87.04 %) keeps this cheap; the teacher's full evaluation is the fixture above.
    """
    model, meta = load_checkpoint(reference_student)
    subset = load_split(cifar_jpeg_root, "test").subset(torch.arange(0, 10_000, 100))
    cpu = torch.device("cpu")
    whole = predict_logits(model, subset.images, meta.mean, meta.std, cpu, precision="fp32")
    batched = predict_logits(model, subset.images, meta.mean, meta.std, cpu, batch_size=40, precision="fp32")
    assert whole.shape == (100, 10) and whole.dtype == torch.float32
    torch.testing.assert_close(batched, whole, rtol=1e-4, atol=1e-4)
    features = predict_logits(
        model, subset.images, meta.mean, meta.std, cpu, batch_size=40, features=True, precision="fp32"
    )
    assert features.shape == (100, model.num_features)
    torch.testing.assert_close(model.fc(features), whole, rtol=1e-4, atol=1e-4)
    metrics = evaluate_on(model, subset, meta.mean, meta.std, cpu, precision="fp32")
    assert metrics["count"] == 100
    assert metrics["accuracy"] == pytest.approx((whole.argmax(1) == subset.labels).sum().item())
    assert [row["support"] for row in metrics["per_class"]] == [10] * 10
    assert metrics["accuracy"] > 75


def test_bf16_logits_stay_close_to_fp32_and_come_back_in_fp32(reference_student: Path, cifar_jpeg_root: Path) -> None:
    """bf16 autocast (dfkd's default where the device computes bf16 natively) keeps the classifier's decisions."""
    model, meta = load_checkpoint(reference_student)
    subset = load_split(cifar_jpeg_root, "test").subset(torch.arange(0, 10_000, 50))
    cpu = torch.device("cpu")
    exact = predict_logits(model, subset.images, meta.mean, meta.std, cpu, precision="fp32")
    fast = predict_logits(prepare_model(model, cpu, "bf16"), subset.images, meta.mean, meta.std, cpu, precision="bf16")
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact), "bf16 did run"
    assert (fast - exact).abs().max() < 0.5
    assert (fast.argmax(1) == exact.argmax(1)).float().mean() >= 0.97


def test_class_count_mismatch_is_refused(tmp_path: Path, cifar_jpeg_root: Path) -> None:
    path = tmp_path / "three.safetensors"
    save_checkpoint(path, create_model("tiny", 3), CheckpointMeta("tiny", 3, CIFAR10_MEAN, CIFAR10_STD, "toy"))
    with pytest.raises(DfkdError, match=r"predicts 3 classes but imagefolder .* has 10: evaluate on the dataset"):
        evaluate_checkpoint(path, cifar_jpeg_root, torch.device("cpu"))
