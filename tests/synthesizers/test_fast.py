"""Fast-DFKD: the meta-learned shared generator, its BN momentum, its state, and the adversarial term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd.models import create_model
from synthesizers import FastConfig
from synthesizers.base import adversarial_term, competition_term, frozen_student
from synthesizers.bn_stats import BatchNormStatistics
from synthesizers.cmi import CMI
from synthesizers.configs import CMIConfig, DeepInversionConfig
from synthesizers.deepinversion import DeepInversion
from synthesizers.fast import Fast

CPU = torch.device("cpu")
MEAN, STD = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)
SMALL = FastConfig(iterations=3, nz=16, ngf=8, log_every=1)


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny", 10).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 1)
    return model.eval()


def make(teacher: nn.Module, config: FastConfig = SMALL) -> Fast:
    torch.manual_seed(0)
    return Fast(teacher, config, CPU, MEAN, STD, num_classes=10)


def test_the_meta_step_moves_the_shared_initialisation_toward_the_adapted_generator(tiny: nn.Module) -> None:
    fast = make(tiny)
    before = [p.detach().clone() for p in fast.generator.parameters()]
    adapted = [p.detach().clone() for p in fast.generator.parameters()]
    fast.synthesize(torch.arange(8) % 10)
    after = list(fast.generator.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after)), "the shared initialisation is learnt"
    # The inner copy started where the shared generator was: only the meta step changed the shared one.
    assert all(torch.equal(b, a) for b, a in zip(before, adapted))
    assert fast.batches == 1 and len(fast.statistics.averages) == len(list(fast.statistics._handles))


def test_reptile_step_direction() -> None:
    """θ moves toward θ' (grad = θ − θ'), at the published meta lr = lr × g_steps."""
    teacher = create_model("tiny", 10).eval()
    fast = make(teacher)
    target = [p.detach() + 1.0 for p in fast.generator.parameters()]
    adapted = make(teacher).generator
    with torch.no_grad():
        for p, t in zip(adapted.parameters(), target):
            p.copy_(t)
    before = [p.detach().clone() for p in fast.generator.parameters()]
    fast.meta_step(adapted)
    assert fast.meta_optimizer.param_groups[0]["lr"] == pytest.approx(SMALL.lr * SMALL.iterations)
    for b, p in zip(before, fast.generator.parameters()):
        assert bool(((p - b) > 0).all()), "every weight moved toward the adapted one"


def _bn_stats(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]]:
    """(mean, biased var, layer) at every BN input, captured independently of `bn_stats`."""
    found: list[tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]] = []

    def capture(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        var, mean = torch.var_mean(args[0], dim=(0, 2, 3), correction=0)
        found.append((mean, var, layer))  # type: ignore[arg-type]

    handles = [m.register_forward_pre_hook(capture) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return found


def test_bn_momentum_blends_this_batch_with_the_average_of_earlier_ones(tiny: nn.Module) -> None:
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32) * 3
    with BatchNormStatistics(tiny, momentum=0.9) as stats, torch.no_grad():
        tiny(x1)
        first = float(stats.loss())
        stats.update_momentum()
        stats.reset()
        tiny(x2)
        blended = float(stats.loss())
    one, two = _bn_stats(tiny, x1), _bn_stats(tiny, x2)

    def distance(pairs: list[tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]]) -> float:
        return sum(
            float(torch.linalg.vector_norm(m - bn.running_mean) + torch.linalg.vector_norm(v - bn.running_var))
            for m, v, bn in pairs
        )

    assert first == pytest.approx(distance(one), rel=1e-5), "the first batch is matched on its own"
    mixed = [(0.9 * m1 + 0.1 * m2, 0.9 * v1 + 0.1 * v2, bn) for (m1, v1, bn), (m2, v2, _) in zip(one, two)]
    assert blended == pytest.approx(distance(mixed), rel=1e-5)
    assert blended != pytest.approx(distance(two), rel=1e-3)


def test_state_round_trip_continues_as_if_uninterrupted(tiny: nn.Module) -> None:
    targets = torch.arange(8) % 10
    straight = make(tiny)
    torch.manual_seed(1)
    straight.synthesize(targets)
    torch.manual_seed(2)
    expected = straight.synthesize(targets).images

    first = make(tiny)
    torch.manual_seed(1)
    first.synthesize(targets)
    state = first.state_dict()
    assert state["scalars"]["batches"] == 1 and any(k.startswith("meta_optimizer.") for k in state["tensors"])
    resumed = make(tiny)
    resumed.load_state_dict(state)
    torch.manual_seed(2)
    torch.testing.assert_close(resumed.synthesize(targets).images, expected, rtol=0, atol=0)


def test_a_state_of_another_generator_is_refused(tiny: nn.Module) -> None:
    state = make(tiny).state_dict()
    with pytest.raises(ValueError, match="ngf=8, this generator has 16"):
        make(tiny, FastConfig(iterations=3, nz=16, ngf=16)).load_state_dict(state)


def test_adversarial_term_pushes_toward_disagreement() -> None:
    """A hand-built pair: teacher and student agree on class 0; descending the term widens their gap."""
    teacher = torch.tensor([[3.0, 1.0, 0.0]])
    student = torch.tensor([[2.0, 1.5, 0.0]], requires_grad=True)
    term = adversarial_term(student, teacher)
    assert float(term.detach()) < 0
    term.sum().backward()
    stepped = student.detach() - 0.5 * student.grad
    kl = lambda s: float((teacher.softmax(1) * (teacher.log_softmax(1) - s.log_softmax(1))).sum())  # noqa: E731
    assert kl(stepped) > kl(student.detach()), "a descent step raises the divergence"
    disagree = adversarial_term(torch.tensor([[0.0, 3.0, 0.0]]), teacher)
    assert float(disagree) == 0.0, "where they already disagree the term is silent"


def test_a_student_adds_the_term_after_the_warm_up_and_is_left_as_it_was(tiny: nn.Module) -> None:
    # A student close to the teacher: it agrees on most images, so the term has something to push on.
    student = create_model("tiny", 10)
    student.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        student.fc.weight.add_(0.3 * torch.randn_like(student.fc.weight))
    student.train()
    weights = [p.detach().clone() for p in student.parameters()]
    targets = torch.arange(8) % 10
    config = FastConfig(iterations=3, nz=16, ngf=8, warmup_batches=1)
    warm, plain = make(tiny, config), make(tiny, config)
    torch.manual_seed(3)
    during_warm_up = warm.synthesize(targets, student=student)
    torch.manual_seed(3)
    alone = plain.synthesize(targets)
    assert torch.equal(during_warm_up.losses, alone.losses), "no adversarial term during the warm-up"
    torch.manual_seed(4)
    with_student = warm.synthesize(targets, student=student)
    torch.manual_seed(4)
    without = plain.synthesize(targets)
    assert not torch.equal(with_student.losses, without.losses), "after the warm-up the term enters the loss"
    assert student.training and all(p.requires_grad and p.grad is None for p in student.parameters())
    assert all(torch.equal(w, p) for w, p in zip(weights, student.parameters()))


def test_frozen_student_restores_mode_and_flags() -> None:
    student = create_model("tiny", 10).train()
    next(student.parameters()).requires_grad_(False)
    with frozen_student(student):
        assert not student.training and not any(p.requires_grad for p in student.parameters())
    assert student.training and [p.requires_grad for p in student.parameters()][0] is False


def test_competition_term_pushes_toward_disagreement() -> None:
    """Adaptive DeepInversion's 1 − JS: lowest where the two disagree, and its gradient with respect to
    the images' logits moves the student's and the teacher's distributions apart."""
    teacher = torch.tensor([[4.0, 0.0, 0.0]])
    same = competition_term(teacher.clone(), teacher, 3.0)
    apart = competition_term(torch.tensor([[0.0, 4.0, 0.0]]), teacher, 3.0)
    assert same.item() == pytest.approx(1.0) and apart.item() < same.item()
    student = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    competition_term(student, teacher, 3.0).sum().backward()
    assert student.grad is not None
    stepped = (student - 0.5 * student.grad).detach()
    assert competition_term(stepped, teacher, 3.0).item() < competition_term(student.detach(), teacher, 3.0).item()


def test_deepinversion_adds_its_competition_term_only_with_a_student(tiny: nn.Module) -> None:
    student = create_model("tiny", 10)
    weights = [p.detach().clone() for p in student.parameters()]
    config = DeepInversionConfig(iterations=2, competition_weight=1.0)
    runs = []
    for with_student in (False, True):
        di = DeepInversion(tiny, config, CPU, MEAN, STD, 10)
        torch.manual_seed(1)
        runs.append(di.synthesize(torch.arange(8) % 10, student=student if with_student else None))
    assert not torch.equal(runs[0].losses, runs[1].losses)
    assert all(torch.equal(w, p) for w, p in zip(weights, student.parameters()))


def test_cmi_adds_its_adversarial_term_only_with_a_student(tiny: nn.Module) -> None:
    student = create_model("tiny", 10)
    student.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        student.fc.weight.add_(0.3 * torch.randn_like(student.fc.weight))
    config = CMIConfig(iterations=2, nz=16, ngf=8, head_dim=8, bank_size=16, num_negatives=4)
    runs = []
    for with_student in (False, True):
        torch.manual_seed(0)
        cmi = CMI(tiny, config, CPU, MEAN, STD, 10)
        torch.manual_seed(1)
        runs.append(cmi.synthesize(torch.arange(8) % 10, student=student if with_student else None))
    assert not torch.equal(runs[0].losses, runs[1].losses)


def test_student_only_settings_do_not_change_a_two_stage_set(tiny: nn.Module) -> None:
    """Without a student the adversarial settings cannot change the images, so they stay out of the hash."""
    from dfkd.config.synthesis import SynthesisConfig
    from dfkd.stages.synthesis import PreparedSynthesis

    def hash_of(method_config: object) -> str:
        config = SynthesisConfig(method="fast", teacher="t", device="cpu")
        return PreparedSynthesis(config, method_config, tiny, None, "sha", CPU).config_hash  # type: ignore[arg-type]

    assert hash_of(FastConfig(adv_weight=3.0, warmup_batches=0)) == hash_of(FastConfig())
    assert hash_of(FastConfig(ce_weight=1.0)) != hash_of(FastConfig())


def test_a_size_the_generator_cannot_make_is_refused_when_built(tiny: nn.Module) -> None:
    for build in (
        lambda: Fast(tiny, SMALL, CPU, MEAN, STD, 10, image_size=30),
        lambda: CMI(tiny, CMIConfig(nz=16, ngf=8, head_dim=8, bank_size=16, num_negatives=4), CPU, MEAN, STD, 10, 30),
    ):
        with pytest.raises(ValueError, match="image_size must be a multiple of 4, got 30"):
            build()
