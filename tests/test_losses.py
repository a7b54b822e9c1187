"""Golden values for the three KD losses, derived by hand with `math`, never with torch's own functions."""

from __future__ import annotations

import math

import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.losses import LOSSES, cmc_loss, dml_loss, get_loss, hkd_loss


def _softmax(row: list[float], tau: float) -> list[float]:
    exps = [math.exp(v / tau) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# Two classes, τ = 2: teacher logits (2·ln 3, 0) soften to (3/4, 1/4); student logits (0, 0) to (1/2, 1/2).
# KL = 3/4·ln(3/2) + 1/4·ln(1/2) ≈ 0.130812; CE(y=0, softmax(0, 0)) = ln 2.
TEACHER_2 = torch.tensor([[2 * math.log(3), 0.0]])
STUDENT_2 = torch.tensor([[0.0, 0.0]])
KL_2 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)

# Three samples, four classes, for the by-row comparisons.
STUDENT = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, -0.5, 3.0, 1.0], [-2.0, 0.0, 1.0, 4.0]])
TEACHER = torch.tensor([[2.0, 0.0, 1.0, 0.5], [0.0, 1.0, 2.5, -1.0], [1.0, 1.0, -1.0, 3.0]])
TARGETS = torch.tensor([1, 2, 3])


def test_hkd_two_class_golden() -> None:
    # 0.95 · τ² · KL + 0.05 · ln 2 = 0.95 · 4 · 0.130812 + 0.05 · 0.693147 ≈ 0.531743
    expected = 0.95 * 4 * KL_2 + 0.05 * math.log(2)
    got = hkd_loss(STUDENT_2, TEACHER_2, torch.tensor([0]), 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.531743, abs=1e-6)


def test_dml_two_class_golden_has_no_tau_squared() -> None:
    got = dml_loss(STUDENT_2, TEACHER_2, torch.tensor([0]), 2.0)
    assert got.item() == pytest.approx(KL_2, rel=1e-6)
    assert KL_2 == pytest.approx(0.130812, abs=1e-6)


def test_cmc_golden() -> None:
    # τ = 2: (s − t)/τ = (−1, 2, −1)/2 → squares 0.25, 1, 0.25 → mean over 3 classes = 0.5
    got = cmc_loss(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([0]), 2.0)
    assert got.item() == pytest.approx(0.5)


def test_hkd_batch_matches_hand_computation() -> None:
    tau, alpha = 3.0, 0.7
    rows = []
    for s, t, y in zip(STUDENT.tolist(), TEACHER.tolist(), TARGETS.tolist()):
        kl = _kl(_softmax(t, tau), _softmax(s, tau))
        ce = -math.log(_softmax(s, 1.0)[y])
        rows.append(alpha * tau**2 * kl + (1 - alpha) * ce)
    got = hkd_loss(STUDENT, TEACHER, TARGETS, tau, alpha)
    assert got.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)


def test_dml_and_cmc_batch_match_hand_computation() -> None:
    tau = 5.0
    kls = [_kl(_softmax(t, tau), _softmax(s, tau)) for s, t in zip(STUDENT.tolist(), TEACHER.tolist())]
    sq = [((a - b) / tau) ** 2 for s, t in zip(STUDENT.tolist(), TEACHER.tolist()) for a, b in zip(s, t)]
    assert dml_loss(STUDENT, TEACHER, TARGETS, tau).item() == pytest.approx(sum(kls) / 3, rel=1e-5)
    assert cmc_loss(STUDENT, TEACHER, TARGETS, tau).item() == pytest.approx(sum(sq) / 12, rel=1e-5)


def test_identical_logits_leave_only_the_label_term() -> None:
    # KL(p ‖ p) = 0 and the CMC error is 0, whatever τ.
    ce = sum(-math.log(_softmax(s, 1.0)[y]) for s, y in zip(STUDENT.tolist(), TARGETS.tolist())) / 3
    assert hkd_loss(STUDENT, STUDENT, TARGETS, 7.0).item() == pytest.approx(0.05 * ce, rel=1e-5)
    assert dml_loss(STUDENT, STUDENT, TARGETS, 7.0).item() == pytest.approx(0.0, abs=1e-7)
    assert cmc_loss(STUDENT, STUDENT, TARGETS, 7.0).item() == 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_per_sample_tau_is_the_mean_of_per_row_fixed_tau_losses(name: str) -> None:
    loss = LOSSES[name]
    taus = [1.5, 4.0, 10.0]
    per_row = [loss(STUDENT[i : i + 1], TEACHER[i : i + 1], TARGETS[i : i + 1], taus[i]).item() for i in range(3)]
    got = loss(STUDENT, TEACHER, TARGETS, torch.tensor(taus))
    assert got.shape == ()
    assert got.item() == pytest.approx(sum(per_row) / 3, rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_scalar_tensor_tau_equals_float_tau(name: str) -> None:
    loss = LOSSES[name]
    assert loss(STUDENT, TEACHER, TARGETS, torch.tensor(3.0)).item() == pytest.approx(
        loss(STUDENT, TEACHER, TARGETS, 3.0).item(), rel=1e-6
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_logits_are_computed_in_fp32(name: str) -> None:
    loss = LOSSES[name]
    s16, t16 = STUDENT.bfloat16(), TEACHER.bfloat16()
    got = loss(s16, t16, TARGETS, 4.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loss(s16.float(), t16.float(), TARGETS, 4.0).item(), rel=1e-6)


def test_gradients_reach_the_student() -> None:
    student = STUDENT.clone().requires_grad_()
    hkd_loss(student, TEACHER, TARGETS, torch.tensor([2.0, 3.0, 4.0])).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_mismatched_tau_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="tau must be"):
        hkd_loss(STUDENT, TEACHER, TARGETS, torch.tensor([2.0, 3.0]))


def test_get_loss() -> None:
    assert get_loss("hkd") is hkd_loss
    assert set(LOSSES) == {"hkd", "cmc", "dml"}
    with pytest.raises(DfkdError, match="unknown loss 'kd': choose one of cmc, dml, hkd"):
        get_loss("kd")
