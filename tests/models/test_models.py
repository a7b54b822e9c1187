"""dfkd.models: every registered model's shapes, the known parameter counts, and the public checkpoints' names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.nn import functional as F

from dfkd.errors import DfkdError
from dfkd.models import create_model, list_models, model_spec
from synthesizers.bn_stats import batchnorm_layers

PAPER_PARAMS = {"wrn40_2": 2_243_546, "wrn16_1": 175_066}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_features(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10).train()
    x = torch.randn(2, 3, model_spec(name).input_size, model_spec(name).input_size)
    logits = model(x)
    assert logits.shape == (2, 10) and logits.dtype == torch.float32
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    missing_grads = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing_grads
    assert model.fc.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features)
        assert model.fc.in_features == model.num_features
        # forward is fc(forward_features): the synthesis figures rely on that split.
        torch.testing.assert_close(model.fc(features), model(x))
    assert batchnorm_layers(model), "model inversion needs BatchNorm layers to match"


@pytest.mark.parametrize("name", list_models())
def test_num_classes_sets_the_head(name: str) -> None:
    model = create_model(name, 100)
    assert model.fc.out_features == 100
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", [n for n in list_models() if model_spec(n).params_at_10_classes is not None])
def test_parameter_count_matches_the_registry(name: str) -> None:
    assert n_params(create_model(name, 10)) == model_spec(name).params_at_10_classes


def test_paper_parameter_counts() -> None:
    for name, count in PAPER_PARAMS.items():
        assert model_spec(name).params_at_10_classes == count
        assert n_params(create_model(name, 10)) == count


def test_registry_holds_the_wrn_family_and_tiny() -> None:
    assert list_models() == sorted(["wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "tiny"])


def test_unknown_model_lists_the_valid_names() -> None:
    with pytest.raises(DfkdError, match="unknown model 'resnet50'") as info:
        create_model("resnet50", 10)
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_fewer_than_two_classes_is_refused(num_classes: int) -> None:
    with pytest.raises(DfkdError, match="num_classes must be at least 2"):
        create_model("tiny", num_classes)


@pytest.mark.parametrize("which", ["reference_teacher", "reference_student"])
def test_public_checkpoint_names_and_shapes_match(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    with safe_open(str(path), framework="pt") as f:
        arch = f.metadata()["arch"]
        file_shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    ours = {
        key: tuple(value.shape)
        for key, value in create_model(arch, 10).state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    assert sorted(file_shapes) == sorted(ours)
    assert file_shapes == ours
