"""dfkd.data: the CIFAR and ImageFolder layouts, the cache, the pickle guard, and the on-device augmentation and
batching (Tiny-ImageNet, sizes and streaming: test_data_layouts.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import dfkd.data as data
from dfkd.data import (
    ImageSet,
    check_data_path,
    iterate_batches,
    load_split,
    normalize,
    random_crop_flip,
    split_classes,
)
from dfkd.errors import DfkdError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder no other test has filled, for tests that count what gets decoded or written."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DFKD_CACHE", str(folder))
    return folder


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the ImageFolder decoder is asked for, in order."""
    calls: list[Path] = []
    real = data._decode_file

    def counting(path: Path, size: int | None = None) -> np.ndarray:
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(data, "_decode_file", counting)
    return calls


# ------------------------------------------------------------------------------ the real JPEG copy


def test_real_jpeg_test_split_loads_then_comes_from_cache(
    cifar_jpeg_root: Path, fresh_cache: Path, decode_calls: list[Path]
) -> None:
    first = load_split(cifar_jpeg_root, "test")
    assert first.images.shape == (10_000, 3, 32, 32) and first.images.dtype == torch.uint8
    assert first.labels.dtype == torch.int64
    assert first.classes == CIFAR10_CLASSES and first.num_classes == 10
    assert first.labels.bincount().tolist() == [1000] * 10
    assert first.source.startswith("imagefolder ") and "(test)" in first.source
    assert len(decode_calls) == 10_000
    # Label order and layout: the 8th cat is that file's RGB pixels in (C, H, W) order.
    cat = sorted((cifar_jpeg_root / "test" / "cat").iterdir())[7]
    expected = torch.from_numpy(np.array(Image.open(cat).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(first.images[3 * 1000 + 7], expected)

    second = load_split(cifar_jpeg_root, "test")
    assert len(decode_calls) == 10_000, "the second load decoded images instead of reading the cache"
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    assert second.classes == first.classes
    assert len(list(fresh_cache.glob("imagefolder-test-*.safetensors"))) == 1


# ----------------------------------------------------------------------------------- CIFAR pickles


def _dump(obj: object, path: Path, protocol: int, numpy1_names: bool = False) -> None:
    """Pickle `obj` to `path`; `numpy1_names` rewrites globals to the `numpy.core` names numpy 1.x writes."""
    raw = pickle.dumps(obj, protocol=protocol)
    if numpy1_names:
        assert protocol <= 3, "only text GLOBAL opcodes can be renamed in place"
        raw = raw.replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(raw)


def _batch(rng: np.random.Generator, n: int, labels: dict[bytes, int]) -> dict[bytes, Any]:
    """A CIFAR batch as the real files hold it: a dict with bytes keys and an N x 3072 uint8 array."""
    batch: dict[bytes, Any] = {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    for key, num_classes in labels.items():
        batch[key] = rng.integers(0, num_classes, n).tolist()
    return batch


def _as_images(batches: list[dict[bytes, Any]]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([b[b"data"] for b in batches])).view(-1, 3, 32, 32)


def _write_cifar10(folder: Path, protocol: int = 4, numpy1_names: bool = False) -> dict[str, list[dict[bytes, Any]]]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {
        "train": [_batch(rng, 2 + i, {b"labels": 10}) for i in range(5)],
        "test": [_batch(rng, 3, {b"labels": 10})],
    }
    for i, batch in enumerate(batches["train"], start=1):
        _dump(batch, folder / f"data_batch_{i}", protocol, numpy1_names)
    _dump(batches["test"][0], folder / "test_batch", protocol, numpy1_names)
    meta = {b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_cases_per_batch": 2, b"num_vis": 3072}
    _dump(meta, folder / "batches.meta", protocol, numpy1_names)
    return batches


@pytest.mark.parametrize(
    ("protocol", "numpy1_names"), [(3, True), (4, False), (5, False)], ids=["numpy1", "protocol4", "protocol5"]
)
@pytest.mark.parametrize("give_parent", [False, True], ids=["folder", "parent"])
def test_cifar10_python_folder(tmp_path: Path, protocol: int, numpy1_names: bool, give_parent: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar10(folder, protocol, numpy1_names)
    for split, expected in batches.items():
        loaded = load_split(tmp_path if give_parent else folder, split)  # type: ignore[arg-type]
        assert torch.equal(loaded.images, _as_images(expected))
        assert loaded.labels.tolist() == [label for b in expected for label in b[b"labels"]]
        assert loaded.classes == CIFAR10_CLASSES
        assert loaded.source == f"cifar10-python {folder.resolve()} ({split})"
        listed = split_classes(tmp_path if give_parent else folder, split)  # type: ignore[arg-type]
        assert (listed.classes, listed.source) == (loaded.classes, loaded.source)  # from the meta file alone


@pytest.mark.parametrize("give_parent", [False, True], ids=["folder", "parent"])
def test_cifar100_python_folder_uses_fine_labels(tmp_path: Path, give_parent: bool) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {split: _batch(rng, 4, {b"fine_labels": 100, b"coarse_labels": 20}) for split in ("train", "test")}
    for split, batch in batches.items():
        _dump(batch, folder / split, protocol=4)
    names = [f"class_{i:03d}".encode() for i in range(100)]
    _dump({b"fine_label_names": names, b"coarse_label_names": names[:20]}, folder / "meta", protocol=4)
    for split, batch in batches.items():
        loaded = load_split(tmp_path if give_parent else folder, split)  # type: ignore[arg-type]
        assert torch.equal(loaded.images, _as_images([batch]))
        assert loaded.labels.tolist() == batch[b"fine_labels"]
        assert loaded.num_classes == 100 and loaded.classes[42] == "class_042"
        assert split_classes(folder, split).classes == loaded.classes  # type: ignore[arg-type]


def test_cifar_is_not_resized(tmp_path: Path, fresh_cache: Path) -> None:
    """Size 32 is CIFAR's own (the same cache file as no size); any other is one error line naming the fix."""
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar10(folder)
    assert torch.equal(load_split(folder, "test", size=32).images, _as_images(batches["test"]))
    load_split(folder, "test")
    assert len(list(fresh_cache.iterdir())) == 1
    with pytest.raises(DfkdError, match="CIFAR-10 images are 32x32 and dfkd does not resize them to 64: use a model"):
        load_split(folder, "test", size=64)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsShell, _RunsExec], ids=["os.system", "exec"])
def test_malicious_pickle_is_refused(tmp_path: Path, payload: type) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    marker = tmp_path / "pwned"
    _dump({b"data": payload(marker), b"labels": [0]}, folder / "test_batch", protocol=4)
    with pytest.raises(DfkdError, match="refusing to unpickle"):
        load_split(folder, "test")
    assert not marker.exists()


def test_truncated_pickle_and_missing_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(DfkdError, match="test_batch is not a readable CIFAR pickle"):
        load_split(folder, "test")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DfkdError, match=r"lacks \['data_batch_3'\]"):
        load_split(folder, "train")


# ------------------------------------------------------------------------------------- ImageFolder


def _save_png(image: torch.Tensor, path: Path) -> None:
    """Write a (C, H, W) uint8 tensor as PNG; one channel makes a greyscale file."""
    pixels = image.permute(1, 2, 0).numpy()
    Image.fromarray(pixels[:, :, 0] if image.shape[0] == 1 else pixels).save(path)


def _write_image_folder(root: Path, classes: dict[str, dict[str, int]], size: int = 6) -> dict[str, torch.Tensor]:
    """PNG files `root/<split>/<class>/<i>.png` with random pixels; returns each split's images in load order."""
    gen = torch.Generator().manual_seed(0)
    images: dict[str, list[torch.Tensor]] = {}
    for split, counts in classes.items():
        images[split] = []
        for name in sorted(counts):
            (root / split / name).mkdir(parents=True)
            for i in range(counts[name]):
                image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
                _save_png(image, root / split / name / f"{i:02d}.png")
                images[split].append(image)
    return {split: torch.stack(stack) for split, stack in images.items() if stack}


def test_image_folder_labels_follow_sorted_class_folders(tmp_path: Path) -> None:
    counts = {"zebra": 2, "ant": 3, "moth": 1}
    expected = _write_image_folder(tmp_path / "root", {"train": counts, "test": counts})
    (tmp_path / "root" / "train" / "ant" / "notes.txt").write_text("not an image, ignored")
    (tmp_path / "root" / "train" / ".ipynb_checkpoints").mkdir()
    loaded = load_split(tmp_path / "root", "train")
    assert loaded.classes == ["ant", "moth", "zebra"]
    assert loaded.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert torch.equal(loaded.images, expected["train"])


def test_grey_image_becomes_rgb(tmp_path: Path) -> None:
    counts = {"a": 1}
    _write_image_folder(tmp_path, {"train": counts, "test": counts})
    grey = torch.arange(36, dtype=torch.uint8).view(1, 6, 6)
    _save_png(grey, tmp_path / "train" / "a" / "01.png")
    loaded = load_split(tmp_path, "train")
    assert torch.equal(loaded.images[1], grey.expand(3, 6, 6))


def test_changed_source_invalidates_cache_and_replaces_it(
    tmp_path: Path, fresh_cache: Path, decode_calls: list[Path]
) -> None:
    counts = {"a": 2, "b": 2}
    _write_image_folder(tmp_path / "root", {"train": counts, "test": counts})
    load_split(tmp_path / "root", "test")
    load_split(tmp_path / "root", "test")
    assert len(decode_calls) == 4
    changed = torch.full((3, 6, 6), 7, dtype=torch.uint8)
    target = tmp_path / "root" / "test" / "b" / "01.png"
    _save_png(changed, target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    reloaded = load_split(tmp_path / "root", "test")
    assert len(decode_calls) == 8
    assert torch.equal(reloaded.images[3], changed)
    assert len(list(fresh_cache.iterdir())) == 1, "the stale cache file was not removed"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_is_rebuilt(tmp_path: Path, fresh_cache: Path, decode_calls: list[Path], damage: str) -> None:
    counts = {"a": 2}
    expected = _write_image_folder(tmp_path / "root", {"train": counts, "test": counts})
    load_split(tmp_path / "root", "train")
    (cache_file,) = fresh_cache.iterdir()
    raw = cache_file.read_bytes()
    cache_file.write_bytes(b"\x00not safetensors" * 8 if damage == "garbage" else raw[: len(raw) // 2])
    loaded = load_split(tmp_path / "root", "train")
    assert torch.equal(loaded.images, expected["train"])
    assert len(decode_calls) == 4
    load_split(tmp_path / "root", "train")
    assert len(decode_calls) == 4, "the rebuilt cache file was not used"


def test_unwritable_cache_warns_and_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"a": 1}
    expected = _write_image_folder(tmp_path / "root", {"train": counts, "test": counts})
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DFKD_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match="cannot write the data cache"):
        loaded = load_split(tmp_path / "root", "test")
    assert torch.equal(loaded.images, expected["test"])


# -------------------------------------------------------------------------------------- user errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DfkdError, match="does not exist"):
        load_split(tmp_path / "nowhere", "train")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    (tmp_path / "cifar.tar.gz").write_bytes(b"")
    with pytest.raises(DfkdError, match="is a file, not a folder: extract it"):
        load_split(tmp_path / "cifar.tar.gz", "train")


def test_folder_matching_no_layout_lists_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DfkdError, match="matches no dataset layout") as info:
        load_split(tmp_path, "train")
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "cifar-100-python" in message and "ImageFolder" in message
    assert "\n" not in message


def test_check_data_path_names_the_layout_or_fails(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    assert check_data_path(tmp_path) == "cifar10-python"
    assert check_data_path(str(tmp_path / "cifar-10-batches-py")) == "cifar10-python"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfkdError, match="matches no dataset layout"):
        check_data_path(tmp_path / "empty")


def test_missing_classes_are_named(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": {"airplane": 1, "cat": 1}, "test": {"airplane": 1}})
    with pytest.raises(DfkdError, match=r"missing classes: test lacks \['cat'\]"):
        load_split(tmp_path, "train")


def test_empty_class_folder(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    for image in (tmp_path / "test" / "b").iterdir():
        image.unlink()
    with pytest.raises(DfkdError, match=r"class folder .*b holds no \.jpg/\.jpeg/\.png images"):
        load_split(tmp_path, "test")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": {"a": 2}, "test": {"a": 1}})
    (tmp_path / "train" / "a" / "01.png").write_bytes(b"this is not a png")
    with pytest.raises(DfkdError, match=r"cannot read image .*01\.png"):
        load_split(tmp_path, "train")


def test_images_of_different_sizes(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": {"a": 2}, "test": {"a": 1}})
    _save_png(torch.zeros((3, 5, 6), dtype=torch.uint8), tmp_path / "train" / "a" / "01.png")
    with pytest.raises(DfkdError, match="is 6x5 but .* is 6x6: resize"):
        load_split(tmp_path, "train")


# ----------------------------------------------------------------------------------------- ImageSet


def test_image_set_subset_and_to() -> None:
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    full = ImageSet(images, torch.tensor([0, 1, 2, 0, 1]), ["x", "y", "z"], "test")
    part = full.subset([4, 0])
    assert part.images[:, 0, 0, 0].tolist() == [4, 0] and part.labels.tolist() == [1, 0]
    assert len(full.subset(torch.tensor([True, False, True, False, False]))) == 2
    assert len(full.subset([])) == 0
    moved = full.to("cpu")
    assert moved.num_classes == 3 and moved.source == "test" and torch.equal(moved.images, images)


# ---------------------------------------------------------------------------- augmentation, batching


def _all_crops(image: torch.Tensor, padding: int) -> torch.Tensor:
    """Every crop the augmentation may produce, built the slow obvious way: (2p+1)^2 shifts x 2 flips."""
    _, h, w = image.shape
    padded = torch.zeros((3, h + 2 * padding, w + 2 * padding), dtype=image.dtype)
    padded[:, padding : padding + h, padding : padding + w] = image
    shifts = [padded[:, y : y + h, x : x + w] for y in range(2 * padding + 1) for x in range(2 * padding + 1)]
    return torch.stack(shifts + [crop.flip(-1) for crop in shifts])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_gives_shifted_zero_bordered_copies_and_flips_half(dtype: torch.dtype) -> None:
    padding = 4
    image = torch.arange(1, 3 * 8 * 8 + 1).view(3, 8, 8).to(dtype)  # distinct nonzero pixels: every crop differs
    batch = image.expand(1000, 3, 8, 8)
    out = random_crop_flip(batch, padding, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == dtype
    candidates = _all_crops(image, padding)
    matches = (out.flatten(1)[:, None, :] == candidates.flatten(1)[None, :, :]).all(-1)
    assert matches.sum(1).eq(1).all(), "an output is not a shifted (and maybe mirrored) zero-padded copy"
    which = matches.int().argmax(1)
    flipped = (which >= (2 * padding + 1) ** 2).float().mean().item()
    assert 0.42 < flipped < 0.58
    assert which.unique().numel() > 100, "shifts and flips should vary from image to image"
    again = random_crop_flip(batch, padding, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_random_crop_flip_known_shift() -> None:
    image = torch.arange(1, 3 * 4 * 4 + 1, dtype=torch.uint8).view(1, 3, 4, 4)
    out = random_crop_flip(image, padding=0)
    assert torch.equal(out, image) or torch.equal(out, image.flip(-1))


def test_normalize_is_exact_and_honours_channels_last() -> None:
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = normalize(images, mean, std, channels_last=False)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    last = normalize(images, mean, std, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, expected)
    assert normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3).eq(1).all()
    with pytest.raises(TypeError):
        normalize(images.float(), mean, std)


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_batches_covers_every_index_once(drop_last: bool) -> None:
    batches = list(iterate_batches(103, 10, "cpu", torch.Generator().manual_seed(0), drop_last=drop_last))
    seen = torch.cat(batches)
    assert seen.unique().numel() == seen.numel()
    if drop_last:
        assert [len(b) for b in batches] == [10] * 10
    else:
        assert [len(b) for b in batches] == [10] * 10 + [3]
        assert sorted(seen.tolist()) == list(range(103))
    assert not torch.equal(seen[:10], torch.arange(10)), "indices should be shuffled"
    again = torch.cat(list(iterate_batches(103, 10, "cpu", torch.Generator().manual_seed(0), drop_last=drop_last)))
    assert torch.equal(seen, again)


def test_channel_stats_and_input_size_of_a_known_set() -> None:
    images = torch.zeros(4, 3, 6, 6, dtype=torch.uint8)
    images[:2, 0] = 255  # channel 0: half the images white -> mean 0.5, std 0.5
    images[:, 1] = 51  # channel 1: constant 0.2 -> std 0
    images[:, 2, :3] = 255  # channel 2: the top half of every image -> mean 0.5, std 0.5
    mean, std = data.ImageSet(images, torch.zeros(4, dtype=torch.int64), ["a"], "test").channel_stats()
    assert mean == pytest.approx((0.5, 0.2, 0.5)) and std == pytest.approx((0.5, 0.0, 0.5), abs=1e-7)
    assert data.ImageSet(images, torch.zeros(4, dtype=torch.int64), ["a"], "test").input_size == 6
    with pytest.raises(DfkdError, match="6x5 images: dfkd models take square images"):
        _ = data.ImageSet(images[..., :5], torch.zeros(4, dtype=torch.int64), ["a"], "test").input_size
