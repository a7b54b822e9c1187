"""dfkd.data beyond CIFAR: ImageFolders at any size, the Tiny-ImageNet layout, and splits streamed from disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd.data import (
    ImageSet,
    StreamedSplit,
    check_data_path,
    load_split,
    resident_bytes,
    split_shape,
    split_size,
)
from dfkd.errors import DfkdError
from dfkd.models import create_model
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD
from dfkd.stages.evaluate import evaluate_on, predict_logits

WNIDS = ["n03000002", "n01000001", "n02000003"]  # not sorted: labels must follow the sorted order


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder no other test has filled, for tests that count what gets written."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DFKD_CACHE", str(folder))
    return folder


def _jpeg(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def _decoded(path: Path) -> torch.Tensor:
    """The file's pixels as (3, H, W) uint8, read the plain PIL way."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def _image_folder(root: Path, sizes: list[tuple[int, int]], classes: int = 2) -> Path:
    """train/ and test/ with `classes` folders, each holding one JPEG per (width, height) in `sizes`."""
    for split in ("train", "test"):
        for c in range(classes):
            for i, (width, height) in enumerate(sizes):
                _jpeg(root / split / f"class{c}" / f"{i}.jpg", width, height, seed=100 * c + i)
    return root


def _tiny_imagenet(root: Path, per_class: int = 3) -> tuple[Path, list[tuple[str, str]]]:
    """A Tiny-ImageNet root as the zip extracts it; returns val's (file, wnid) rows in annotation order."""
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            _jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 64, 64, seed=c * 10 + i)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    rows = [(f"val_{i}.JPEG", WNIDS[i % 3]) for i in range(7)]
    for i, (name, _) in enumerate(rows):
        _jpeg(root / "val" / "images" / name, 64, 64, seed=1000 + i)
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t1\t2\t40\t50\n" for n, w in rows))
    for i in range(2):
        _jpeg(root / "test" / "images" / f"test_{i}.JPEG", 64, 64, seed=2000 + i)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    return root, rows


def _one_line(info: pytest.ExceptionInfo[DfkdError]) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------- sizes


def test_image_folder_at_its_own_size_is_unchanged_and_smaller_is_resized(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "root", [(64, 64)] * 3)
    plain = load_split(root, "train")
    assert plain.images.shape == (6, 3, 64, 64)
    assert torch.equal(load_split(root, "train", size=64).images, plain.images)
    small = load_split(root, "train", size=32)
    assert small.images.shape == (6, 3, 32, 32) and small.input_size == 32
    assert torch.equal(small.labels, plain.labels) and small.classes == plain.classes
    # Shorter side to int(32 / 0.875) = 36, then the centre 32x32 (offset 2).
    first = Image.open(root / "train" / "class0" / "0.jpg").convert("RGB")
    expected = first.resize((36, 36), Image.Resampling.BILINEAR).crop((2, 2, 34, 34))
    assert torch.equal(small.images[0], torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def test_resize_matches_torchvision_reference_eval_transform(tmp_path: Path) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    root = _image_folder(tmp_path / "root", [(500, 375), (375, 500), (224, 224), (301, 260)], classes=1)
    loaded = load_split(root, "test", size=224)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    for i, image in enumerate(loaded.images):
        path = root / "test" / "class0" / f"{i}.jpg"
        if i == 2:  # already 224x224: kept, where torchvision would enlarge it to 256 and crop it again
            assert torch.equal(image, _decoded(path))
            continue
        expected = np.array(reference(Image.open(path).convert("RGB")))
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1)), f"image {i}"


def test_mixed_sizes_load_at_a_size(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "root", [(64, 48), (50, 80), (32, 32), (33, 32)])
    with pytest.raises(DfkdError, match="resize the dataset's images to one size"):
        load_split(root, "train")
    loaded = load_split(root, "train", size=32)
    assert loaded.images.shape == (8, 3, 32, 32)
    assert torch.equal(loaded.images[2], _decoded(root / "train" / "class0" / "2.jpg")), "32x32 is kept as it is"
    assert split_shape(root) == (2, 64)  # the first training image's side


def test_each_size_has_its_own_cache_file(tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _image_folder(tmp_path / "root", [(64, 64)] * 2)
    first = {size: load_split(root, "test", size=size) for size in (None, 32, 48)}
    names = sorted(path.name for path in fresh_cache.iterdir())
    assert len(names) == 3 and sum("-32px-" in n for n in names) == 1 and sum("-48px-" in n for n in names) == 1
    monkeypatch.setattr("dfkd.data._decode_file", lambda *args: pytest.fail("decoded instead of reading the cache"))
    for size, loaded in first.items():
        assert torch.equal(load_split(root, "test", size=size).images, loaded.images)


def test_a_size_must_be_positive(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "root", [(8, 8)])
    with pytest.raises(DfkdError, match="image size 0 is not a size"):
        load_split(root, "test", size=0)


# --------------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_is_detected_and_test_reads_val(tmp_path: Path) -> None:
    root, rows = _tiny_imagenet(tmp_path / "tiny-imagenet-200")
    assert check_data_path(root) == "tiny-imagenet"
    assert split_shape(root) == (3, 64)
    assert split_size(root, "train") == 9 and split_size(root, "test") == 7
    test = load_split(root, "test")
    assert test.classes == sorted(WNIDS) and test.source == f"tiny-imagenet {root.resolve()} (test)"
    assert test.labels.tolist() == [sorted(WNIDS).index(wnid) for _, wnid in rows]
    for i, (name, _) in enumerate(rows):
        assert torch.equal(test.images[i], _decoded(root / "val" / "images" / name))
    train = load_split(root, "train", size=32)
    assert train.images.shape == (9, 3, 32, 32) and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_tiny_imagenet_val_names_an_unknown_wnid(tmp_path: Path) -> None:
    root, _ = _tiny_imagenet(tmp_path)
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(DfkdError) as info:
        check_data_path(root)
    assert "line 8 names class 'n09999999', which train/ has no folder for: restore" in _one_line(info)


def test_tiny_imagenet_val_lists_a_missing_file(tmp_path: Path) -> None:
    root, _ = _tiny_imagenet(tmp_path)
    (root / "val" / "images" / "val_3.JPEG").unlink()
    with pytest.raises(DfkdError) as info:
        load_split(root, "test")
    assert "line 4 lists val_3.JPEG, which" in _one_line(info) and "restore the file" in str(info.value)


def test_tiny_imagenet_class_without_images_folder(tmp_path: Path) -> None:
    root, _ = _tiny_imagenet(tmp_path)
    (root / "train" / "n00000000").mkdir()
    (root / "train" / "n00000000" / "n00000000_boxes.txt").write_text("")
    with pytest.raises(DfkdError) as info:
        load_split(root, "train")
    assert "class folder" in _one_line(info) and "n00000000 has no images/ folder" in str(info.value)
    with pytest.raises(DfkdError, match="has no images/ folder"):
        check_data_path(root)


# ------------------------------------------------------------------------------------- streaming


def _batches(split: ImageSet | StreamedSplit, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    images, labels = zip(*split.batches(batch_size, "cpu"))
    return torch.cat(images), torch.cat(labels), [len(batch) for batch in labels]


def test_stream_gives_the_resident_batches_and_metrics(
    tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = _tiny_imagenet(tmp_path / "tiny")
    resident = load_split(root, "test", size=32, stream=True)
    assert isinstance(resident, ImageSet), "under the budget a split stays resident"
    cached = set(fresh_cache.iterdir())
    monkeypatch.setenv("DFKD_RESIDENT_BYTES", str(7 * 3 * 32 * 32 - 1))
    streamed = load_split(root, "test", size=32, stream=True)
    assert isinstance(streamed, StreamedSplit) and streamed.workers >= 1
    assert set(fresh_cache.iterdir()) == cached, "a streamed split wrote a cache file"
    assert isinstance(load_split(root, "test", size=32), ImageSet), "without stream=True the split stays resident"
    assert (len(streamed), streamed.input_size, streamed.num_classes) == (7, 32, 3)
    assert streamed.classes == resident.classes and streamed.source == resident.source
    assert torch.equal(streamed.labels, resident.labels)

    images, labels, sizes = _batches(streamed, 3)
    assert sizes == [3, 3, 1] and _batches(resident, 3)[2] == sizes
    assert images.dtype == torch.uint8 and torch.equal(images, resident.images)
    assert torch.equal(labels, resident.labels)

    torch.manual_seed(0)
    model = create_model("tiny", 3).eval()
    cpu = torch.device("cpu")
    args = (CIFAR10_MEAN, CIFAR10_STD, cpu)
    streamed_logits = predict_logits(model, streamed, *args, batch_size=2, precision="fp32")
    assert torch.equal(streamed_logits, predict_logits(model, resident.images, *args, batch_size=2, precision="fp32"))
    streamed.workers = 0  # the same batches decoded in this process
    metrics = evaluate_on(model, streamed, *args, precision="fp32")
    assert metrics == evaluate_on(model, resident, *args, precision="fp32")
    assert metrics["count"] == 7


def test_stream_without_a_size_takes_the_files_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _image_folder(tmp_path / "root", [(16, 16)] * 3)
    monkeypatch.setenv("DFKD_RESIDENT_BYTES", "1")
    streamed = load_split(root, "test", stream=True)
    assert isinstance(streamed, StreamedSplit) and streamed.input_size == 16
    streamed.workers = 0
    assert torch.equal(_batches(streamed, 4)[0], load_split(root, "test").images)
    _jpeg(root / "test" / "class1" / "1.jpg", 16, 12, seed=0)
    with pytest.raises(DfkdError, match=r"1\.jpg is 16x12 but .*0\.jpg is 16x16: resize"):
        _batches(streamed, 4)


def test_stream_error_in_a_worker_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _image_folder(tmp_path / "root", [(16, 16)] * 2)
    (root / "test" / "class1" / "0.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setenv("DFKD_RESIDENT_BYTES", "1")
    streamed = load_split(root, "test", size=16, stream=True)
    assert isinstance(streamed, StreamedSplit)
    streamed.workers = 1
    with pytest.raises(DfkdError) as info:
        _batches(streamed, 2)
    assert _one_line(info).startswith(f"cannot read image {root.resolve() / 'test' / 'class1' / '0.jpg'} (")


def test_resident_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFKD_RESIDENT_BYTES", raising=False)
    assert resident_bytes() == 4 << 30
    monkeypatch.setenv("DFKD_RESIDENT_BYTES", "1000")
    assert resident_bytes() == 1000
    monkeypatch.setenv("DFKD_RESIDENT_BYTES", "4GB")
    with pytest.raises(DfkdError, match="DFKD_RESIDENT_BYTES='4GB' is not a whole number of bytes"):
        resident_bytes()


# ------------------------------------------------------------------------ from import to evaluation


@pytest.mark.parametrize("layout", ["tiny-imagenet", "imagefolder"])
def test_a_torchvision_teacher_imported_from_its_pth_is_evaluated_on_64px_data(
    tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's path end to end: torchvision's own ResNet-18 saved as a .pth, imported at 64 px with its class
    names, then `dfkd evaluate` on a Tiny-ImageNet root or an ImageFolder of 96x96 JPEGs (resized to 64),
    resident and streamed alike, with the predictions the model itself gives."""
    import torchvision
    from typer.testing import CliRunner

    from dfkd.checkpoints import load_checkpoint
    from dfkd.cli import app

    if layout == "tiny-imagenet":
        data, _ = _tiny_imagenet(tmp_path / "tiny")
        names = sorted(WNIDS)
    else:
        data = _image_folder(tmp_path / "folder", [(96, 96)] * 3, classes=3)
        names = ["class0", "class1", "class2"]
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=3)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    checkpoint = tmp_path / "r18.safetensors"
    runner = CliRunner()
    imported = runner.invoke(
        app,
        ["checkpoint", "import", str(tmp_path / "r18.pth"), str(checkpoint), "--arch", "torchvision:resnet18"]
        + ["--num-classes", "3", "--input-size", "64", "--class-names", str(tmp_path / "names.txt")],
    )
    assert imported.exit_code == 0, imported.output
    model, meta = load_checkpoint(checkpoint)
    assert meta.class_names == tuple(names) and meta.input_size == 64
    test = load_split(data, "test", 64)
    expected = predict_logits(model, test.images, meta.mean, meta.std, torch.device("cpu"), precision="fp32")
    accuracy = 100 * float((expected.argmax(1) == test.labels).float().mean())
    monkeypatch.setenv("DFKD_PRECISION", "fp32")
    for budget in ("4294967296", "1"):  # resident, then streamed from disk
        monkeypatch.setenv("DFKD_RESIDENT_BYTES", budget)
        result = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(data), "--device", "cpu", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["accuracy"] == pytest.approx(accuracy)


def test_a_split_too_big_for_memory_is_refused_before_decoding_unless_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: Path
) -> None:
    import dfkd.data as data

    root = _image_folder(tmp_path / "folder", [(64, 64)] * 3)
    monkeypatch.setattr(data, "free_memory_bytes", lambda device: 3 * 64 * 64 * 5)  # 5 of the 6 images
    with pytest.raises(DfkdError, match=r"holds 6 images, .* GiB decoded at 64x64, more than the .* available") as info:
        load_split(root, "train")
    assert "\n" not in str(info.value) and not any(fresh_cache.glob("*")), "refused before decoding or caching"
    monkeypatch.setenv("DFKD_RESIDENT_BYTES", "1")
    assert isinstance(load_split(root, "test", stream=True), StreamedSplit)  # evaluation streams it instead
