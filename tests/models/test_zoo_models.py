"""Issue 13 (first part): models named from torchvision's and timm's zoos through the one registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dfkd.checkpoints import CheckpointMeta, load_checkpoint, save_checkpoint
from dfkd.cli import app
from dfkd.config.distill import DistillConfig
from dfkd.errors import DfkdError
from dfkd.models import create_model, model_spec
from dfkd.models.heads import classifier, pooled_features

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize(
    ("name", "features"), [("torchvision:resnet18", 512), ("torchvision:mobilenet_v3_small", 1024)]
)
def test_a_torchvision_classifier_is_a_model_like_the_built_ins(name: str, features: int) -> None:
    spec = model_spec(name)
    assert (spec.name, spec.input_size, (spec.mean, spec.std)) == (name, 224, IMAGENET)
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    images = torch.randn(2, 3, 64, 64)  # any size: the zoos' classifiers pool globally
    with torch.no_grad():
        logits, pooled = model(images), pooled_features(model, images)
        assert logits.shape == (2, 10) and pooled.shape == (2, features)
        torch.testing.assert_close(classifier(model)(pooled), logits)
    with pytest.raises(DfkdError, match="positive|at least 2"):
        create_model(name, 1)


def test_built_ins_keep_their_own_pooled_features() -> None:
    model = create_model("wrn16_1", 10).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(model, images), model.forward_features(images))


def test_unknown_zoo_models_name_close_matches_and_a_missing_timm_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DfkdError, match=r"unknown torchvision model 'resnet19' \(close: torchvision:resnet18"):
        model_spec("torchvision:resnet19")
    with pytest.raises(DfkdError, match="name a model as torchvision:<name> or timm:<name>"):
        model_spec("keras:resnet18")
    with pytest.raises(DfkdError, match="or torchvision:<name> or timm:<name>"):
        model_spec("resnet18")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(
        DfkdError, match=r"timm:resnet18 needs timm, which is not installed: pip install 'dfkd\[timm\]'"
    ):
        model_spec("timm:resnet18")
    with pytest.raises(DfkdError, match="unknown torchvision model"):
        DistillConfig(student="torchvision:nope")
    assert DistillConfig(student="torchvision:resnet18").student == "torchvision:resnet18"


def test_a_timm_model_when_timm_is_installed() -> None:
    pytest.importorskip("timm")
    spec = model_spec("timm:resnet18")
    assert spec.input_size == 224 and spec.mean == IMAGENET[0]
    model = create_model("timm:resnet18", 10).eval()
    with torch.no_grad():
        assert pooled_features(model, torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_a_zoo_checkpoint_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", 10)
    meta = CheckpointMeta("torchvision:resnet18", 10, IMAGENET[0], IMAGENET[1], "toy", input_size=64)
    path = tmp_path / "r18.safetensors"
    save_checkpoint(path, model, meta)
    loaded, read = load_checkpoint(path)
    assert (read.arch, read.input_size) == ("torchvision:resnet18", 64)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_dfkd_models_describes_one_and_says_how_to_name_the_zoos() -> None:
    runner = CliRunner()
    described = runner.invoke(app, ["models", "torchvision:resnet18", "--json"])
    assert described.exit_code == 0, described.output
    info = json.loads(described.stdout)
    assert (info["parameters"], info["features"], info["input_size"]) == (11_181_642, 512, 224)
    assert info["forward_flops_per_image"] == pytest.approx(3.63e9, rel=0.01)  # 1.8 GMACs at 224x224
    listing = runner.invoke(app, ["models"])
    assert "wrn40_2" in listing.stdout and "torchvision:<name>" in listing.stdout and "timm:<name>" in listing.stdout


TINY_SETTINGS = {
    "cmi": {"nz": 16, "ngf": 8, "head_dim": 16, "bank_size": 64, "num_negatives": 8},
    "fast": {"nz": 16, "ngf": 8},
    "deepinversion": {},
}


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("method", sorted(TINY_SETTINGS))
def test_every_method_inverts_a_torchvision_teacher_at_its_size(method: str, size: int) -> None:
    from dfkd.config.overrides import apply_overrides
    from synthesizers import get_synthesizer, method_config_class

    torch.manual_seed(0)
    teacher = create_model("torchvision:resnet18", 10).eval()
    spec = model_spec("torchvision:resnet18")
    config = apply_overrides(method_config_class(method)(), {"iterations": 2, **TINY_SETTINGS[method]}, "setting")
    synthesizer = get_synthesizer(method)(teacher, config, torch.device("cpu"), spec.mean, spec.std, 10, size)
    batch = synthesizer.synthesize(torch.arange(4) % 10)
    assert batch.images.shape == (4, 3, size, size) and batch.logits.shape == (4, 10)
    assert torch.isfinite(batch.losses).all() and 0 <= float(batch.images.min()) <= float(batch.images.max()) <= 1
