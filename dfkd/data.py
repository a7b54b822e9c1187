"""Datasets as uint8 tensors, decoded once and cached; crop/flip and batching on the training device.

CIFAR fits in memory (150 MB for 50k images as uint8), so a whole split lives on the training device
and a step is a few kernels (index, crop/flip, normalise): no DataLoader workers, no PIL, no host sync.

`load_split` accepts four layouts:
    cifar10-python   torchvision's `cifar-10-batches-py` (data_batch_1..5, test_batch, batches.meta)
    cifar100-python  torchvision's `cifar-100-python` (train, test, meta; the 100 fine labels)
    tiny-imagenet    the Tiny-ImageNet zip's root: train/<wnid>/images/*.JPEG, and val/images/ labelled by
                     val/val_annotations.txt (file, wnid, box); split "test" reads val, since the zip's
                     test/ images carry no labels; sorted train/ wnids give the label order
    imagefolder      a root with train/<class>/*.{jpg,jpeg,png} and test/<class>/...; class folders
                     sorted alphabetically give the label order, as torchvision's ImageFolder does
The CIFAR folders may be given directly or through the folder that holds them. Tiny-ImageNet is
recognised before ImageFolder: its root also holds train/ and test/, which would read as class folders.

Given a `size`, every file image that is not size x size is resized (bilinear, antialiased: shorter side
to int(size / 0.875)) and centre-cropped to size x size, as torchvision's reference eval transform
(Resize(256) + CenterCrop(224)) does, so a dataset of mixed sizes loads; without one, all images must
share one size. CIFAR is not resized: its 32x32 pixels hold nothing a larger input could use, and at
224 px a training split would take 7.5 GB, so another size is a `DfkdError`.

A file split that decoded would exceed `resident_bytes()` (4 GiB, or `$DFKD_RESIDENT_BYTES`) comes back,
to callers that ask with `stream=True`, as a `StreamedSplit`, decoded batch by batch from disk by
DataLoader workers; smaller splits, CIFAR included, stay resident (on the device) as an `ImageSet`.
Both give `batches(batch_size, device)`, the interface evaluation reads.

A decoded split is cached as `.safetensors` in `$DFKD_CACHE` (default `~/.cache/dfkd`) under the
sha256 of the source path, split, layout, size (when given) and every source file's (name, size,
mtime_ns), so an edited dataset is decoded again; a streamed split is never cached. CIFAR pickles go
through an unpickler that builds numpy arrays and nothing else, so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal, overload

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from dfkd.device import free_memory_bytes
from dfkd.errors import DfkdError, first_line
from dfkd.files import atomic_write_bytes
from dfkd.tensor_files import safetensors_bytes

Split = Literal["train", "test"]
Layout = Literal["cifar10-python", "cifar100-python", "tiny-imagenet", "imagefolder"]

# Part of every cache key: bump it when decoding changes, so older cache files stop matching.
_CACHE_FORMAT = "dfkd.data/1"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CHUNK = 512
_STATS_BYTES = 256 << 20  # working memory of `ImageSet.channel_stats`, whatever the image size
# Decoded bytes a split may take and still be held whole: Tiny-ImageNet's training split at 64 px
# (1.2 GB) fits beside a model on any GPU; ImageNet at 224 px (190 GB) streams.
_RESIDENT_BYTES = 4 << 30
_CROP_FRACTION = 0.875  # torchvision's reference eval transform: Resize(256) then CenterCrop(224)
_ACCEPTED = (
    "a CIFAR-10 python folder (cifar-10-batches-py, or the folder holding it), "
    "a CIFAR-100 python folder (cifar-100-python, or the folder holding it), "
    "a Tiny-ImageNet root with train/<wnid>/images/, val/images/ and val/val_annotations.txt, "
    "or an ImageFolder root with train/<class>/ and test/<class>/ folders of .jpg/.png images"
)


@dataclass
class ImageSet:
    """One split: `images` (N, 3, H, W) uint8, `labels` (N,) int64, class names in label order."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"images {tuple(self.images.shape)} and labels {tuple(self.labels.shape)} do not pair up")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> ImageSet:
        """The same split with images and labels on `device` (still uint8: 4x less memory than float)."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    @property
    def input_size(self) -> int:
        """The side of the (square) images; non-square images are a `DfkdError`."""
        height, width = self.images.shape[-2:]
        return _square_side(self.source, int(height), int(width))

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
        """(uint8 images, labels) on `device`, `batch_size` at a time in order: what `StreamedSplit` yields too,
        so an evaluation reads either the same way."""
        for start in range(0, len(self), batch_size):
            yield (
                self.images[start : start + batch_size].to(device, non_blocking=True),
                self.labels[start : start + batch_size].to(device, non_blocking=True),
            )

    def channel_stats(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Per-channel mean and std of the pixels in [0, 1], summed in float64 over chunks of images."""
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        per_image = self.images[0].numel() * 8 * 2  # float64, and its square
        step = max(1, _STATS_BYTES // per_image)
        for start in range(0, len(self), step):
            chunk = self.images[start : start + step].to("cpu", torch.float64).div_(255)
            total += chunk.sum(dim=(0, 2, 3))
            squares += chunk.square().sum(dim=(0, 2, 3))
        count = len(self) * self.images.shape[-2] * self.images.shape[-1]
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]

    def subset(self, indices: Tensor | Sequence[int]) -> ImageSet:
        """The images at `indices` (integer positions or a boolean mask), on the set's device."""
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(indices, dtype=torch.int64)
        indices = indices.to(self.images.device)
        return replace(self, images=self.images[indices], labels=self.labels[indices])


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass
class StreamedSplit:
    """A file split too big to keep decoded (see `resident_bytes`): its files and labels (from the listing,
    no image decoded), decoded `batch_size` at a time by `workers` DataLoader processes in `batches`.

    `size` is the side images are resized to, or None to take the files as they are; `shape` (H, W) is what
    every image must come out as (the first file's when `size` is None, where another size is an error).
    """

    files: list[Path]
    labels: Tensor
    classes: list[str]
    source: str
    size: int | None
    shape: tuple[int, int]
    workers: int = field(default_factory=_default_workers)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> int:
        """The side of the (square) images; non-square images are a `DfkdError`."""
        return _square_side(self.source, *self.shape)

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
        """(uint8 images (N, 3, H, W), labels) on `device`, in file order, as `ImageSet.batches` gives them.

        Batches are decoded in worker processes while the caller computes, into pinned memory when the
        device is CUDA (so the copy overlaps); workers end with the epoch, holding nothing between calls.
        """
        device = torch.device(device)
        loader = DataLoader(
            _DecodedFiles(self),
            batch_size=batch_size,
            num_workers=self.workers,
            collate_fn=_stack_or_error,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        start = 0
        for batch in loader:
            if isinstance(batch, str):
                raise DfkdError(batch)
            end = start + len(batch)
            yield batch.to(device, non_blocking=True), self.labels[start:end].to(device, non_blocking=True)
            start = end


# A split as evaluation reads it: resident, or streamed from disk (both give `batches`, `labels`, `classes`).
AnySplit = ImageSet | StreamedSplit


class _DecodedFiles(Dataset[Tensor | str]):
    """A `StreamedSplit`'s images one file at a time, as (3, H, W) uint8, or the one-line reason a file failed.

    Errors are returned, not raised: raised in a worker, a `DfkdError` would reach the caller rewrapped
    with the worker's traceback in its message, and dfkd's errors are one line.
    """

    def __init__(self, split: StreamedSplit) -> None:
        self.files, self.size, self.shape = split.files, split.size, split.shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor | str:
        try:
            pixels = _decode_file(self.files[index], self.size)
            if pixels.shape[:2] != self.shape:
                raise _mixed_sizes(self.files[index], pixels.shape, self.files[0], self.shape)
        except DfkdError as exc:
            return str(exc)
        return torch.tensor(pixels).permute(2, 0, 1)  # a copy: PIL's array is read-only


def _stack_or_error(items: list[Tensor | str]) -> Tensor | str:
    """One batch of images, or the first error among them (see `_DecodedFiles`)."""
    images: list[Tensor] = []
    for item in items:
        if isinstance(item, str):
            return item
        images.append(item)
    return torch.stack(images)


def _square_side(source: str, height: int, width: int) -> int:
    if height != width:
        raise DfkdError(f"{source} holds {height}x{width} images: dfkd models take square images")
    return height


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str  # the folder torchvision's download creates
    meta: str
    names_key: bytes
    labels_key: bytes
    splits: dict[str, tuple[str, ...]]


_CIFAR: dict[Layout, _CifarFormat] = {
    "cifar10-python": _CifarFormat(
        "CIFAR-10",
        "cifar-10-batches-py",
        "batches.meta",
        b"label_names",
        b"labels",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    ),
    "cifar100-python": _CifarFormat(
        "CIFAR-100",
        "cifar-100-python",
        "meta",
        b"fine_label_names",
        b"fine_labels",
        {"train": ("train",), "test": ("test",)},
    ),
}


@overload
def load_split(
    path: Path | str, split: Split, size: int | None = None, *, stream: Literal[False] = False
) -> ImageSet: ...


@overload
def load_split(
    path: Path | str, split: Split, size: int | None = None, *, stream: bool
) -> ImageSet | StreamedSplit: ...


def load_split(
    path: Path | str, split: Split, size: int | None = None, *, stream: bool = False
) -> ImageSet | StreamedSplit:
    """Load the `split` of the dataset at `path` (any layout in the module docstring), from cache if unchanged.

    With `size`, file images are resized and centre-cropped to size x size (see the module docstring).
    With `stream`, a file split over `resident_bytes()` decoded comes back as a `StreamedSplit` instead:
    only callers that read it through `batches` ask, since training indexes the whole split on the device.
    """
    if split not in ("train", "test"):
        raise DfkdError(f"split {split!r} is unknown: use train or test")
    if size is not None and size < 1:
        raise DfkdError(f"image size {size} is not a size: give a positive number of pixels")
    layout, root = _find_layout(Path(path).expanduser())
    root = root.resolve()
    source = f"{layout} {root} ({split})"
    if layout in _CIFAR:
        fmt = _CIFAR[layout]
        if size not in (None, 32):
            raise DfkdError(
                f"{fmt.name} images are 32x32 and dfkd does not resize them to {size}: use a model whose input "
                "size is 32, or save the images as an ImageFolder, which is resized"
            )
        size = None  # nothing to resize: the same cache file as without a size
        sources = [root / name for name in (fmt.meta, *fmt.splits[split])]
        missing = [file.name for file in sources if not file.is_file()]
        if missing:
            raise DfkdError(f"{fmt.name} folder {root} lacks {missing}: download the dataset again")
    else:
        classes, files = _list_split(root, layout, split)
        sources = [file for file, _ in files]
        width, height = (size, size) if size is not None else _image_size(sources[0])
        decoded = len(files) * 3 * height * width
        if stream and decoded > resident_bytes():
            labels = torch.tensor([label for _, label in files], dtype=torch.int64)
            return StreamedSplit(sources, labels, classes, source, size, (height, width))
        available = free_memory_bytes(torch.device("cpu"))  # a split is decoded on the host before it moves
        if decoded > available:  # decoding would swap the machine to a halt, or be killed, hours in
            raise DfkdError(
                f"{source} holds {len(files):,} images, {decoded / 2**30:.3g} GiB decoded at {width}x{height}, more "
                f"than the {available / 2**30:.3g} GiB of memory available: training on real data holds its split in "
                "memory; use a smaller split or image size, or a machine with more memory"
            )
    cache_file = _cache_file(root, split, layout, sources, size)
    cached = _read_cache(cache_file)
    if cached is not None:
        return ImageSet(*cached, source=source)
    if layout in _CIFAR:
        images, labels, classes = _read_cifar(root, _CIFAR[layout], split)
    else:
        images, labels = _decode_images(files, size)
    _write_cache(cache_file, images, labels, classes)
    return ImageSet(images, labels, classes, source)


def resident_bytes() -> int:
    """The decoded size above which `load_split(..., stream=True)` streams a file split: `$DFKD_RESIDENT_BYTES`,
    else 4 GiB."""
    raw = os.environ.get("DFKD_RESIDENT_BYTES", "").strip()
    if not raw:
        return _RESIDENT_BYTES
    try:
        return int(raw)
    except ValueError:
        raise DfkdError(
            f"DFKD_RESIDENT_BYTES={raw!r} is not a whole number of bytes: set it to one (4 GiB is {_RESIDENT_BYTES}) "
            "or unset it"
        ) from None


def check_data_path(path: Path | str) -> Layout:
    """The layout at `path`, or a `DfkdError`: lets a command fail before it makes a run dir or meters a stage.

    For a file layout this also lists both splits (cheap; no image is decoded).
    """
    layout, root = _find_layout(Path(path).expanduser())
    if layout not in _CIFAR:
        for split in ("train", "test"):
            _list_split(root, layout, split)
    return layout


def split_shape(path: Path | str) -> tuple[int, int]:
    """(number of classes, image side) of the dataset at `path`, without decoding a split: CIFAR is
    32x32 with 10 or 100 classes; a file layout has its classes and its first training image's side."""
    layout, root = _find_layout(Path(path).expanduser())
    if layout in _CIFAR:
        return (10 if layout == "cifar10-python" else 100), 32
    classes, files = _list_split(root, layout, "train")
    return len(classes), _image_size(files[0][0])[0]


@dataclass(frozen=True)
class SplitClasses:
    """The class names of a split in label order, and where they come from, read without decoding an image."""

    classes: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_classes(path: Path | str, split: Split) -> SplitClasses:
    """The classes of one split of the dataset at `path` (CIFAR: its meta file; file layouts: their listing), so
    a command can check them against a checkpoint before it makes a run dir or decodes anything."""
    layout, root = _find_layout(Path(path).expanduser())
    root = root.resolve()
    source = f"{layout} {root} ({split})"
    if layout in _CIFAR:
        fmt = _CIFAR[layout]
        return SplitClasses(_cifar_class_names(root, fmt), source)
    return SplitClasses(_list_split(root, layout, split)[0], source)


def split_size(path: Path | str, split: Split) -> int:
    """How many images one split holds, without decoding it (CIFAR: 50,000 train, 10,000 test)."""
    layout, root = _find_layout(Path(path).expanduser())
    if layout in _CIFAR:
        return 50_000 if split == "train" else 10_000
    return len(_list_split(root, layout, split)[1])


def cache_dir() -> Path:
    """Where decoded splits are kept: `$DFKD_CACHE`, else `~/.cache/dfkd`."""
    return Path(os.environ.get("DFKD_CACHE") or Path.home() / ".cache" / "dfkd")


def _find_layout(path: Path) -> tuple[Layout, Path]:
    if not path.exists():
        raise DfkdError(f"data path {path} does not exist: pass the folder that holds the dataset")
    if not path.is_dir():
        raise DfkdError(f"data path {path} is a file, not a folder: extract it and pass the extracted folder")
    own = _layout_of(path)
    if own is not None:
        return own, path
    found = [(layout, path / fmt.folder) for layout, fmt in _CIFAR.items() if _layout_of(path / fmt.folder) == layout]
    if len(found) > 1:
        raise DfkdError(f"{path} holds both {found[0][1].name} and {found[1][1].name}: pass the one you mean")
    if not found:
        raise DfkdError(f"{path} matches no dataset layout: pass {_ACCEPTED}")
    return found[0]


def _layout_of(folder: Path) -> Layout | None:
    for layout, fmt in _CIFAR.items():
        batches = [name for names in fmt.splits.values() for name in names]
        if (folder / fmt.meta).is_file() and any((folder / name).is_file() for name in batches):
            return layout
    if (folder / "train").is_dir() and (folder / "val" / "val_annotations.txt").is_file():
        return "tiny-imagenet"
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return "imagefolder"
    return None


# ------------------------------------------------------------------------------ ImageFolder, Tiny-ImageNet


def _list_split(root: Path, layout: Layout, split: Split) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) pairs of one split of a file layout."""
    return (_list_tiny_imagenet if layout == "tiny-imagenet" else _list_image_folder)(root, split)


def _class_names(folder: Path) -> list[str]:
    # Dot folders (.ipynb_checkpoints, .git) are tool clutter, never classes.
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def _list_image_folder(root: Path, split: Split) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) pairs of one split, after checking both splits name the same classes.

    Both splits are checked whichever is loaded: a class missing from one would shift every later label.
    """
    names = {side: _class_names(root / side) for side in ("train", "test")}
    if names["train"] != names["test"]:
        gaps = [
            f"{side} lacks {sorted(set(names[other]) - set(names[side]))}"
            for side, other in (("train", "test"), ("test", "train"))
            if set(names[other]) - set(names[side])
        ]
        raise DfkdError(
            f"ImageFolder {root} has different class folders in train/ and test/ "
            f"(missing classes: {'; '.join(gaps)}): give both splits the same class folders"
        )
    classes = names[split]
    if not classes:
        raise DfkdError(f"{root / split} holds no class folders: put each class's images in {root / split}/<class>/")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / split / name
        files.extend((folder / image, label) for image in _images_in(folder))
    return classes, files


def _list_tiny_imagenet(root: Path, split: Split) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (the sorted wnids of train/) and (file, label) pairs; split "test" is the labelled val/.

    val/ files come in val_annotations.txt's order; its other columns (the boxes) are not needed.
    """
    classes = _class_names(root / "train")
    if not classes:
        raise DfkdError(f"{root / 'train'} holds no class folders: extract the Tiny-ImageNet zip again")
    if split == "train":
        files: list[tuple[Path, int]] = []
        for label, wnid in enumerate(classes):
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise DfkdError(
                    f"Tiny-ImageNet class folder {folder.parent} has no images/ folder: "
                    "put its images in images/ or delete the folder"
                )
            files.extend((folder / image, label) for image in _images_in(folder))
        return classes, files
    annotations, images = root / "val" / "val_annotations.txt", root / "val" / "images"
    try:
        present = {entry.name for entry in os.scandir(images) if entry.is_file()}
    except OSError:
        raise DfkdError(f"Tiny-ImageNet folder {root} has no val/images/ folder: extract the zip again") from None
    labels = {wnid: label for label, wnid in enumerate(classes)}
    files = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, wnid = ([*line.split("\t"), ""])[:2]
        where = f"{annotations} line {number}"
        if wnid not in labels:
            raise DfkdError(
                f"{where} names class {wnid!r}, which train/ has no folder for: "
                "restore that class's train/ folder or extract the zip again"
            )
        if name not in present:
            raise DfkdError(f"{where} lists {name}, which {images} lacks: restore the file or extract the zip again")
        files.append((images / name, labels[wnid]))
    if not files:
        raise DfkdError(f"{annotations} lists no images: extract the Tiny-ImageNet zip again")
    return classes, files


def _images_in(folder: Path) -> list[str]:
    """The sorted names of the .jpg/.jpeg/.png files (any case) in `folder`, of which there must be some."""
    images = sorted(
        entry.name for entry in os.scandir(folder) if entry.name.lower().endswith(_IMAGE_SUFFIXES) and entry.is_file()
    )
    if not images:
        raise DfkdError(f"class folder {folder} holds no .jpg/.jpeg/.png images: add images or delete the folder")
    return images


def _unreadable(path: Path, exc: Exception) -> DfkdError:
    reason = first_line(exc)
    return DfkdError(f"cannot read image {path} ({reason}): replace or delete the file")


_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding its pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except _PIL_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _decode_file(path: Path, size: int | None = None) -> np.ndarray:
    """One image file as (H, W, 3) uint8 RGB; grey, palette and RGBA images are converted to RGB; with
    `size`, resized and centre-cropped to size x size unless it already is.

    PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
    """
    try:
        with Image.open(path) as image:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = _resize_crop(rgb, size)
            return np.asarray(rgb)
    except _PIL_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's reference eval transform at `size`: Resize(int(size / 0.875)) then CenterCrop(size),
    with its arithmetic (the long side truncated, the crop offset rounded) and PIL's antialiased bilinear,
    so a model trained through torchvision sees the pixels it was trained on."""
    width, height = image.size
    short = int(size / _CROP_FRACTION)
    if width <= height:
        width, height = short, int(short * height / width)
    else:
        width, height = int(short * width / height), short
    left, top = round((width - size) / 2), round((height - size) / 2)
    return image.resize((width, height), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))


def _mixed_sizes(path: Path, shape: tuple[int, ...], first: Path, first_shape: tuple[int, ...]) -> DfkdError:
    """The error for an image of another (H, W) than the split's first."""
    return DfkdError(
        f"image {path} is {shape[1]}x{shape[0]} but {first} is {first_shape[1]}x{first_shape[0]}: "
        "resize the dataset's images to one size"
    )


def _decode_images(files: list[tuple[Path, int]], size: int | None = None) -> tuple[Tensor, Tensor]:
    """Decode (and, given `size`, resize) every file into one preallocated array; all images must come out
    one size.

    Threads overlap file reads and PIL's decoding, which release the GIL: 50k CIFAR JPEGs take about
    3.5 s on 2 cores.
    """
    first = _decode_file(files[0][0], size)
    pixels = np.empty((len(files), *first.shape), dtype=np.uint8)
    pixels[0] = first

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + _CHUNK, len(files))):
            image = _decode_file(files[i][0], size)
            if image.shape != first.shape:
                raise _mixed_sizes(files[i][0], image.shape, files[0][0], first.shape)
            pixels[i] = image

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        # list() re-raises the first error a chunk met.
        list(pool.map(decode_chunk, range(1, len(files), _CHUNK)))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([label for _, label in files], dtype=torch.int64)


# ------------------------------------------------------------------------------------- CIFAR pickles


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: what rebuilds a numpy array.

    Files written by numpy 1.x name `numpy.core`, by numpy 2.x `numpy._core`; both map to this numpy's
    functions, so neither needs the deprecated `numpy.core` import. `_frombuffer` is how pickle
    protocol 5 (Python 3.14's default) stores arrays.
    """
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26 has no numpy._core
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]
    return allowed


_NUMPY_GLOBALS = _numpy_globals()


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: containers, bytes, numbers and numpy arrays, and no other callable.

    A plain `pickle.load` would call whatever the file names (os.system included); here every global
    outside `_NUMPY_GLOBALS` is refused before it is imported.
    """

    def __init__(self, file: IO[bytes], source: Path) -> None:
        # CIFAR was pickled by Python 2: its strings are bytes, and "bytes" keeps them so (keys like b"data").
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        found = _NUMPY_GLOBALS.get((module, name))
        if found is None:
            raise DfkdError(
                f"{self._source} asks to load {module}.{name}, which no CIFAR file needs: refusing to unpickle it; "
                "download the dataset again from its official source"
            )
        return found


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, path).load()
    except DfkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is the file's fault
        raise DfkdError(
            f"{path} is not a readable CIFAR pickle ({type(exc).__name__}): download the dataset again"
        ) from None
    if not isinstance(content, dict):
        raise DfkdError(f"{path} holds a {type(content).__name__}, not a CIFAR dict: download the dataset again")
    return content


def _cifar_class_names(root: Path, fmt: _CifarFormat) -> list[str]:
    """The class names in the CIFAR folder's meta file, in label order."""
    names = _unpickle(root / fmt.meta).get(fmt.names_key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DfkdError(f"{root / fmt.meta} has no {fmt.names_key.decode()} list: download the dataset again")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def _read_cifar(root: Path, fmt: _CifarFormat, split: Split) -> tuple[Tensor, Tensor, list[str]]:
    """Images, labels and class names of one split; rows of `data` are 1024 R, 1024 G, 1024 B bytes."""
    classes = _cifar_class_names(root, fmt)
    images, labels = [], []
    for name in fmt.splits[split]:
        batch = _unpickle(root / name)
        data, batch_labels = batch.get(b"data"), batch.get(fmt.labels_key)
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32
            or not isinstance(batch_labels, (list, np.ndarray))
            or len(batch_labels) != len(data)
        ):
            raise DfkdError(
                f"{root / name} is not a {fmt.name} batch (uint8 data of N x 3072 with N "
                f"{fmt.labels_key.decode()}): download the dataset again"
            )
        images.append(torch.tensor(data).view(-1, 3, 32, 32))
        try:
            labels.append(torch.tensor(np.asarray(batch_labels, dtype=np.int64)))
        except (TypeError, ValueError):
            raise DfkdError(f"{root / name} has non-integer labels: download the dataset again") from None
    all_labels = torch.cat(labels)
    if len(all_labels) and (all_labels.min() < 0 or all_labels.max() >= len(classes)):
        raise DfkdError(
            f"{fmt.name} folder {root} has labels outside 0..{len(classes) - 1}: download the dataset again"
        )
    return torch.cat(images), all_labels, classes


# --------------------------------------------------------------------------------------------- cache


def _cache_file(root: Path, split: Split, layout: Layout, sources: list[Path], size: int | None) -> Path:
    """The cache path for this exact content: the name changes when any source file's size or mtime does.

    The readable prefix (layout, split, size, a digest of the place) lets a new version replace the stale
    one, and keeps one file per size. A size joins the key only when given, so the unresized splits cached
    before sizes existed still match.
    """
    listing = []
    for file in sources:
        stat = file.stat()
        listing.append((file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    listing.sort()
    scope: list[object] = [str(root), split, layout] if size is None else [str(root), split, layout, size]
    content = hashlib.sha256(json.dumps([_CACHE_FORMAT, *scope, listing]).encode()).hexdigest()
    place = hashlib.sha256(json.dumps(scope).encode()).hexdigest()
    sized = "" if size is None else f"-{size}px"
    return cache_dir() / f"{layout}-{split}{sized}-{place[:16]}-{content[:32]}.safetensors"


def _read_cache(path: Path) -> tuple[Tensor, Tensor, list[str]] | None:
    """The cached split, or None when absent or damaged: a bad cache file is rebuilt, never fatal."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            classes = json.loads((f.metadata() or {})["classes"])
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None
    sound = (
        isinstance(classes, list)
        and all(isinstance(c, str) for c in classes)
        and images.dtype == torch.uint8
        and images.ndim == 4
        and labels.dtype == torch.int64
        and labels.shape == images.shape[:1]
        and len(labels) > 0
        and 0 <= int(labels.min())
        and int(labels.max()) < len(classes)
    )
    return (images, labels, classes) if sound else None


def _write_cache(path: Path, images: Tensor, labels: Tensor, classes: list[str]) -> None:
    data = safetensors_bytes(
        {"images": images, "labels": labels}, metadata={"format": _CACHE_FORMAT, "classes": json.dumps(classes)}
    )
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        # The split is already decoded; an unwritable cache only costs the next run the decoding.
        warnings.warn(
            f"cannot write the data cache {path} ({exc.strerror}): set DFKD_CACHE to a writable folder",
            stacklevel=3,
        )
        return
    prefix = path.name.rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{prefix}-*.safetensors"):
        if stale != path:
            stale.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ on-device training


def random_crop_flip(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Per image: a random crop of the zero-padded image (shift up to `padding` px) and a flip with p=0.5.

    The standard CIFAR augmentation (torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip)
    as one gather over the whole batch on its device: no per-image Python and no host sync.
    Works for any dtype; `generator`, when given, must live on `images.device`.
    """
    if images.ndim != 4:
        raise ValueError(f"random_crop_flip needs (N, C, H, W) images, got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    flip = torch.rand((n, 1), device=device, generator=generator) < 0.5
    columns = torch.arange(w, device=device)
    rows = top + torch.arange(h, device=device)  # (n, h): padded rows each output row reads
    cols = left + torch.where(flip, columns.flip(0), columns)  # (n, w): reversed for flipped images
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> Tensor:
    """`(x / 255 - mean) / std` per channel as float32, optionally in channels-last memory format.

    mean/std reach the device by a non-blocking copy: from pageable memory it is staged at once and
    returns without waiting for the GPU (measured 0.1 ms behind 200 ms of queued work on an H100),
    where `torch.tensor(..., device="cuda")` waits for all queued work, i.e. a host sync every step.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    if images.ndim != 4 or not len(mean) == len(std) == images.shape[1]:
        raise ValueError(
            f"normalize needs (N, C, H, W) images and C means and stds, got {tuple(images.shape)}, {mean}, {std}"
        )
    stats = torch.tensor([list(mean), list(std)], dtype=torch.float32).to(images.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out = images.to(torch.float32).div_(255)  # .to keeps the memory format
    return out.sub_(stats[0].view(1, -1, 1, 1)).div_(stats[1].view(1, -1, 1, 1))


def stratified_subset(labels: Tensor, count: int, seed: int) -> Tensor:
    """`count` indices spread evenly over the classes (for quick runs on a slice of the data)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    ranks = torch.empty_like(order)
    sorted_labels = labels[order]
    for c in sorted_labels.unique():
        mask = sorted_labels == c
        ranks[mask] = torch.arange(int(mask.sum()))
    return order[torch.argsort(ranks, stable=True)[:count]]


def iterate_batches(
    num: int,
    batch_size: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    drop_last: bool = True,
) -> Iterator[Tensor]:
    """One epoch of shuffled index batches, drawn on `device` so they index an on-device ImageSet directly.

    With `drop_last` the final short batch is skipped, so every step has the same shape (steady BN
    statistics, no recompilation); then fewer than `batch_size` items yield nothing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(num, generator=generator, device=device)
    end = num - num % batch_size if drop_last else num
    return (order[start : start + batch_size] for start in range(0, end, batch_size))
