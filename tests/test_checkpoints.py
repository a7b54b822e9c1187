"""dfkd.checkpoints: the .safetensors round trip, every way a file can fail to load, and `.pth` import
(the `dfkd checkpoint import` command itself: tests/test_checkpoint_import.py)."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dfkd.checkpoints import (
    CheckpointMeta,
    import_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from dfkd.errors import DfkdError
from dfkd.files import sha256_file
from dfkd.models import create_model
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD

META = CheckpointMeta(
    arch="tiny",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    dataset="cifar10 (test)",
    test_acc=87.25,
    extra={"epochs": "3", "recipe": "unit test"},
)


class NotATensor:
    """Pickled into a .pth to check weights_only refuses arbitrary objects."""

    def __init__(self) -> None:
        self.payload = "anything"


def trained_tiny(num_classes: int = 10) -> torch.nn.Module:
    """A tiny model whose weights and BN buffers all differ from a fresh one's."""
    torch.manual_seed(1)
    model = create_model("tiny", num_classes)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor).abs() + 0.1)
    return model


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = trained_tiny()
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model, META)
    return path, model


def write_raw(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------------ round trip


def test_round_trip_keeps_weights_and_metadata(tmp_path: Path) -> None:
    model = trained_tiny()
    path = tmp_path / "sub" / "tiny.safetensors"
    digest = save_checkpoint(path, model, META)
    assert digest == sha256_file(path)
    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"], "no temporary file is left"
    loaded, meta = load_checkpoint(path, arch="tiny", num_classes=10)
    assert meta == META
    assert meta.test_acc == 87.25 and meta.extra == {"epochs": "3", "recipe": "unit test"}
    assert read_meta(path) == META
    assert not loaded.training
    assert_same_weights(loaded, model)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_round_trip_without_test_acc(tmp_path: Path) -> None:
    meta = CheckpointMeta("tiny", 3, CIFAR10_MEAN, CIFAR10_STD, "toy")
    path = tmp_path / "t.safetensors"
    save_checkpoint(path, trained_tiny(3), meta)
    assert read_meta(path) == meta and read_meta(path).test_acc is None


def test_class_names_round_trip_and_old_checkpoints_have_none(tmp_path: Path) -> None:
    named = replace(META, num_classes=3, class_names=("cat", "dog", "ēl k"))
    path = tmp_path / "named.safetensors"
    save_checkpoint(path, trained_tiny(3), named)
    assert read_meta(path) == named and read_meta(path).class_names == ("cat", "dog", "ēl k")
    assert named.to_strings()["class_names"] == '["cat", "dog", "ēl k"]'
    assert named.to_json()["class_names"] == ["cat", "dog", "ēl k"] and "class_names" not in named.to_json()["extra"]
    assert META.to_json()["class_names"] is None and "class_names" not in META.to_strings()
    old = write_raw(tmp_path / "old.safetensors", weights(trained_tiny()), META.to_strings())
    assert load_checkpoint(old)[1].class_names is None, "a checkpoint from before class names still loads"


def test_reference_teacher_loads_through_the_validated_path(reference_teacher: Path) -> None:
    model, meta = load_checkpoint(reference_teacher, arch="wrn40_2", num_classes=10)
    assert meta.arch == "wrn40_2" and meta.num_classes == 10 and meta.test_acc == 91.20
    assert meta.mean == CIFAR10_MEAN and meta.std == CIFAR10_STD
    assert meta.extra == {"epochs": "200"}
    assert sum(p.numel() for p in model.parameters()) == 2_243_546


# ------------------------------------------------------------------------------------ failure modes


def test_wrong_arch_requested(saved: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(DfkdError, match="holds a tiny, not the requested wrn16_1"):
        load_checkpoint(saved[0], arch="wrn16_1")


def test_wrong_num_classes_requested(saved: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(DfkdError, match="has 10 classes, but 100 are required"):
        load_checkpoint(saved[0], num_classes=100)


def test_missing_keys(tmp_path: Path) -> None:
    state = weights(trained_tiny())
    del state["conv2.weight"], state["bn2.running_var"]
    path = write_raw(tmp_path / "m.safetensors", state, META.to_strings())
    with pytest.raises(DfkdError, match=r"missing keys \['bn2.running_var', 'conv2.weight'\]") as info:
        load_checkpoint(path)
    assert "unexpected" not in str(info.value)


def test_extra_keys(tmp_path: Path) -> None:
    state = {**weights(trained_tiny()), "head.weight": torch.zeros(2, 2)}
    path = write_raw(tmp_path / "x.safetensors", state, META.to_strings())
    with pytest.raises(DfkdError, match=r"unexpected keys \['head.weight'\]") as info:
        load_checkpoint(path)
    assert "missing" not in str(info.value)


def test_wrong_shape(tmp_path: Path) -> None:
    # 10-class weights under metadata that claims 5 classes.
    meta = CheckpointMeta("tiny", 5, CIFAR10_MEAN, CIFAR10_STD, "toy")
    path = write_raw(tmp_path / "s.safetensors", weights(trained_tiny(10)), meta.to_strings())
    with pytest.raises(DfkdError, match=r"wrong shape .*fc.weight \(10, 16\) vs \(5, 16\)"):
        load_checkpoint(path)


def test_weights_of_another_arch(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "a.safetensors", weights(create_model("wrn16_1", 10)), META.to_strings())
    with pytest.raises(DfkdError, match="does not fit the architecture: missing keys .* unexpected keys"):
        load_checkpoint(path)


@pytest.mark.parametrize("drop", [None, "arch", "num_classes", "mean", "std", "dataset"])
def test_missing_metadata(tmp_path: Path, drop: str | None) -> None:
    metadata = None if drop is None else {k: v for k, v in META.to_strings().items() if k != drop}
    path = write_raw(tmp_path / "n.safetensors", weights(trained_tiny()), metadata)
    expected = "arch, num_classes, mean, std, dataset" if drop is None else drop
    with pytest.raises(DfkdError, match=f"lacks metadata {expected}: re-save it with dfkd"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("num_classes", "ten", "malformed metadata"),
        ("test_acc", "high", "malformed metadata"),
        ("mean", "0.5,0.5", "needs 3 finite means and 3 positive finite stds"),
        ("std", "0.2,0,0.2", "needs 3 finite means and 3 positive finite stds"),
        ("mean", "nan,0.5,0.5", "needs 3 finite means and 3 positive finite stds"),
        ("std", "0.2,inf,0.2", "needs 3 finite means and 3 positive finite stds"),
        ("arch", "resnet9000", "unknown model 'resnet9000'"),
        ("class_names", "cat,dog", "malformed metadata"),
        ("class_names", '["cat", "dog"]', r"malformed metadata \(2 class names for 10 classes\)"),
        ("class_names", '["a", "b", "c", "d", "e", "f", "g", "h", "a", "b"]', "class names repeat: a, b"),
        ("class_names", '["a", "b", "c", "d", "e", "f", "g", "h", "i", " "]', "not a list of non-blank names"),
        ("class_names", '{"0": "cat"}', "not a list of non-blank names"),
    ],
)
def test_malformed_metadata(tmp_path: Path, key: str, value: str, words: str) -> None:
    path = write_raw(tmp_path / "b.safetensors", weights(trained_tiny()), {**META.to_strings(), key: value})
    with pytest.raises(DfkdError, match=words):
        read_meta(path)
    with pytest.raises(DfkdError, match=words):
        load_checkpoint(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(DfkdError, match="is corrupt or truncated .*: re-create or re-download it"):
        read_meta(path)
    with pytest.raises(DfkdError, match="is corrupt or truncated"):
        load_checkpoint(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.touch()
    with pytest.raises(DfkdError, match="is corrupt or truncated"):
        load_checkpoint(path)


def test_truncated_file(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    data = saved[0].read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DfkdError, match="is corrupt or truncated"):
        load_checkpoint(path)


def test_not_a_safetensors_path(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    path.write_bytes(saved[0].read_bytes())
    with pytest.raises(
        DfkdError, match=r"is not a .safetensors file: convert .pth files with `dfkd checkpoint import`"
    ):
        load_checkpoint(path)
    with pytest.raises(DfkdError, match="is not a .safetensors file"):
        read_meta(path)


def test_nonexistent_path(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.safetensors", tmp_path):
        with pytest.raises(DfkdError, match="does not exist: pass the path of a .safetensors file"):
            load_checkpoint(path)


# ------------------------------------------------------------------------------------ .pth import


@pytest.mark.parametrize("form", ["bare", "state_dict", "module_prefix", "state_dict_module_prefix"])
def test_pth_import(tmp_path: Path, form: str) -> None:
    model = trained_tiny()
    state = model.state_dict()
    if "module_prefix" in form:
        state = {f"module.{k}": v for k, v in state.items()}
    obj = {"state_dict": state, "epoch": 200, "best_acc": 91.2} if form.startswith("state_dict") else state
    src = tmp_path / "ckpt.pth"
    torch.save(obj, src)
    dst = tmp_path / "out" / "ckpt.safetensors"
    digest = import_checkpoint(src, dst, META)
    assert digest == sha256_file(dst)
    loaded, meta = load_checkpoint(dst, arch="tiny")
    assert meta == META
    assert_same_weights(loaded, model)


def fn_reference() -> None:
    """A module-level function: pickled by reference."""


@pytest.mark.parametrize(
    "payload",
    [NotATensor(), {"state_dict": {"w": torch.zeros(1)}, "hook": fn_reference}, os.system],
    ids=["class-instance", "function-in-dict", "os.system"],
)
def test_pth_with_arbitrary_objects_is_refused(tmp_path: Path, payload: object) -> None:
    src = tmp_path / "evil.pth"
    torch.save(payload, src)
    dst = tmp_path / "evil.safetensors"
    with pytest.raises(DfkdError, match="is not a weights-only PyTorch file"):
        import_checkpoint(src, dst, META)
    assert list(tmp_path.iterdir()) == [src], "nothing is written at or beside dst"


@pytest.mark.parametrize(
    "obj",
    [
        [torch.zeros(1)],
        {"conv1.weight": torch.zeros(1), "epoch": 3},
        {"state_dict": [1, 2]},
        torch.zeros(3),
        {1: torch.zeros(1)},
    ],
    ids=["list", "non-tensor-value", "state_dict-list", "tensor", "int-key"],
)
def test_pth_without_a_state_dict_of_tensors(tmp_path: Path, obj: object) -> None:
    src = tmp_path / "odd.pth"
    torch.save(obj, src)
    with pytest.raises(DfkdError, match="holds no state dict of tensors"):
        import_checkpoint(src, tmp_path / "odd.safetensors", META)
    assert not (tmp_path / "odd.safetensors").exists()


def test_pth_that_does_not_fit(tmp_path: Path) -> None:
    src = tmp_path / "w.pth"
    torch.save(trained_tiny(10).state_dict(), src)
    dst = tmp_path / "w.safetensors"
    meta = CheckpointMeta("tiny", 100, CIFAR10_MEAN, CIFAR10_STD, "cifar100")
    with pytest.raises(DfkdError, match="wrong shape"):
        import_checkpoint(src, dst, meta)
    assert not dst.exists()


def test_pth_import_of_garbage_and_of_nothing(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a zip or a pickle" * 10)
    with pytest.raises(DfkdError, match="is not a weights-only PyTorch file"):
        import_checkpoint(garbage, tmp_path / "g.safetensors", META)
    with pytest.raises(DfkdError, match="does not exist: pass the path of a .pth or .safetensors file"):
        import_checkpoint(tmp_path / "missing.pth", tmp_path / "m.safetensors", META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pth"]


def test_unwritable_destination(tmp_path: Path) -> None:
    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    with pytest.raises(DfkdError, match="cannot write checkpoint .*taken.safetensors"):
        save_checkpoint(folder, trained_tiny(), META)
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


def test_checkpoint_json_types_only_plain_decimal_numbers() -> None:
    from dfkd.checkpoints import _json_number

    assert [_json_number(t) for t in ("60", "-3", "0.95", "1e-3")] == [60, -3, 0.95, 0.001]
    assert [_json_number(t) for t in ("0123", "1_000", "abc", "inf", "nan", "1.")] == [
        "0123", "1_000", "abc", "inf", "nan", "1.",
    ]  # fmt: skip
