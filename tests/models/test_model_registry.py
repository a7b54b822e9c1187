"""The model registry: constructors registered by decorator, with their input size and normalisation."""

from __future__ import annotations

import pytest

import dfkd.models.registry as registry
from dfkd.errors import DfkdError
from dfkd.models import create_model, list_models, model_spec, register_model
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD


def test_built_ins_carry_their_input_size_and_statistics() -> None:
    assert list_models() == ["tiny", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2"]
    spec = model_spec("wrn40_2")
    assert (spec.name, spec.input_size, spec.mean, spec.std) == ("wrn40_2", 32, CIFAR10_MEAN, CIFAR10_STD)
    assert spec.params_at_10_classes == sum(p.numel() for p in create_model("wrn40_2", 10).parameters())


def test_a_decorated_constructor_is_registered_under_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model(description="tiny at 64 px", input_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    def tiny64(num_classes: int) -> object:
        return create_model("tiny", num_classes)

    assert "tiny64" in list_models() and model_spec("tiny64").input_size == 64
    assert create_model("tiny64", 3).fc.out_features == 3
    with pytest.raises(ValueError, match="registered twice"):
        register_model(description="again", input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)(tiny64)


def test_unknown_names_and_too_few_classes_are_user_errors() -> None:
    with pytest.raises(DfkdError, match="unknown model 'resnet9000': choose one of tiny, wrn16_1"):
        model_spec("resnet9000")
    with pytest.raises(DfkdError, match="num_classes must be at least 2"):
        create_model("tiny", 1)
