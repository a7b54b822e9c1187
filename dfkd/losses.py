"""The three distillation losses the paper compares (Rafat et al., PLoS ONE 2023), one signature.

Every loss is `loss(student_logits, teacher_logits, targets, tau, alpha=0.95) -> scalar tensor`:
logits are (N, C), `targets` are (N,) class indices, `tau` is a Python float or a tensor of shape
() or (N,) (one τ per sample, broadcast as (N, 1)). Everything is computed in fp32, whatever the
logits' dtype, because softmax at large τ and the KL's log-ratios lose too much in bf16.
Teacher logits are not detached here: the distillation loop computes them under `no_grad`, so
no gradient reaches the teacher; detaching again would hide that choice in the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.errors import DfkdError

LossFn = Callable[[Tensor, Tensor, Tensor, float | Tensor, float], Tensor]


def _tau_column(tau: float | Tensor, logits: Tensor) -> float | Tensor:
    """`tau` as a float or an fp32 tensor on the logits' device that broadcasts against (N, C)."""
    if not isinstance(tau, Tensor):
        return float(tau)
    t = tau.to(device=logits.device, dtype=torch.float32)
    if t.dim() == 0:
        return t
    if t.dim() == 1 and t.shape[0] == logits.shape[0]:
        return t.unsqueeze(1)
    raise ValueError(f"tau must be a float or a tensor of shape () or ({logits.shape[0]},), got {tuple(t.shape)}")


def _fp32_pair(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be (N, C), got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    return student_logits.float(), teacher_logits.float()


def _softened_kl(student: Tensor, teacher: Tensor, tau: float | Tensor) -> Tensor:
    """Per-sample KL(softmax(a_t/τ) ‖ softmax(a_s/τ)) summed over classes, shape (N, 1)."""
    log_p_student = F.log_softmax(student / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher / tau, dim=1)
    # log_target keeps the teacher side in log space, so a teacher probability that underflows to 0
    # contributes exactly 0 instead of 0 · log 0.
    return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1, keepdim=True)


def hkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, tau: float | Tensor, alpha: float = 0.95
) -> Tensor:
    """Hinton's KD loss (Hinton et al. 2015, as written in Rafat et al. 2023):

        L = α·τ²·KL(softmax(a_t/τ) ‖ softmax(a_s/τ)) + (1−α)·CE(y, softmax(a_s))

    The KL is summed over classes per sample and averaged over the batch ("batchmean"); with a
    per-sample τ the τ² factor multiplies each sample's KL before the mean. τ² keeps the soft
    term's gradient magnitude independent of τ. The CE uses the unsoftened student logits.
    """
    student, teacher = _fp32_pair(student_logits, teacher_logits)
    t = _tau_column(tau, student)
    soft = (_softened_kl(student, teacher, t) * t**2).mean()
    hard = F.cross_entropy(student, targets)
    return alpha * soft + (1.0 - alpha) * hard


def cmc_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, tau: float | Tensor, alpha: float = 0.95
) -> Tensor:
    """The paper's "altered CMC" (Rafat et al. 2023): squared error between τ-scaled logits,

        L = (1 / (N·C)) · Σ_i Σ_c (a_s[i,c]/τ_i − a_t[i,c]/τ_i)²

    i.e. the mean over batch and classes. `targets` and `alpha` are unused: the altered loss
    matches logits only and has no label term; they are accepted so all losses share one signature.
    """
    student, teacher = _fp32_pair(student_logits, teacher_logits)
    t = _tau_column(tau, student)
    return ((student / t - teacher / t) ** 2).mean()


def dml_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, tau: float | Tensor, alpha: float = 0.95
) -> Tensor:
    """The paper's "altered DML" (Rafat et al. 2023): KL between the τ-softened outputs,

        L = (1/N) · Σ_i KL(softmax(a_t[i]/τ_i) ‖ softmax(a_s[i]/τ_i))

    without HKD's τ² factor and with no label term, so `targets` and `alpha` are unused; they are
    accepted so all losses share one signature.
    """
    student, teacher = _fp32_pair(student_logits, teacher_logits)
    return _softened_kl(student, teacher, _tau_column(tau, student)).mean()


LOSSES: dict[str, LossFn] = {"hkd": hkd_loss, "cmc": cmc_loss, "dml": dml_loss}


def get_loss(name: str) -> LossFn:
    """The loss registered under `name`; an unknown name is a `DfkdError` listing the choices."""
    try:
        return LOSSES[name]
    except KeyError:
        raise DfkdError(f"unknown loss {name!r}: choose one of {', '.join(sorted(LOSSES))}") from None
