"""Datasets as uint8 tensors, decoded once and cached; crop/flip and batching on the training device.

CIFAR fits in memory (150 MB for 50k images as uint8), so a whole split lives on the training device
and a step is a few kernels (index, crop/flip, normalise): no DataLoader workers, no PIL, no host sync.

`load_split` accepts three layouts:
    cifar10-python   torchvision's `cifar-10-batches-py` (data_batch_1..5, test_batch, batches.meta)
    cifar100-python  torchvision's `cifar-100-python` (train, test, meta; the 100 fine labels)
    imagefolder      a root with train/<class>/*.{jpg,jpeg,png} and test/<class>/...; class folders
                     sorted alphabetically give the label order, as torchvision's ImageFolder does
The CIFAR folders may be given directly or through the folder that holds them.

A decoded split is cached as `.safetensors` in `$DFKD_CACHE` (default `~/.cache/dfkd`) under the
sha256 of the source path, split, layout and every source file's (name, size, mtime_ns), so an edited
dataset is decoded again. CIFAR pickles go through an unpickler that builds numpy arrays and nothing
else, so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.nn import functional as F

from dfkd.errors import DfkdError
from dfkd.files import atomic_write_bytes
from dfkd.tensor_files import safetensors_bytes

Split = Literal["train", "test"]
Layout = Literal["cifar10-python", "cifar100-python", "imagefolder"]

# Part of every cache key: bump it when decoding changes, so older cache files stop matching.
_CACHE_FORMAT = "dfkd.data/1"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CHUNK = 512
_STATS_BYTES = 256 << 20  # working memory of `ImageSet.channel_stats`, whatever the image size
_ACCEPTED = (
    "a CIFAR-10 python folder (cifar-10-batches-py, or the folder holding it), "
    "a CIFAR-100 python folder (cifar-100-python, or the folder holding it), "
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
        if height != width:
            raise DfkdError(f"{self.source} holds {height}x{width} images: dfkd models take square images")
        return int(height)

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


def load_split(path: Path | str, split: Split) -> ImageSet:
    """Load the `split` of the dataset at `path` (any layout in the module docstring), from cache if unchanged."""
    if split not in ("train", "test"):
        raise DfkdError(f"split {split!r} is unknown: use train or test")
    layout, root = _find_layout(Path(path).expanduser())
    root = root.resolve()
    if layout == "imagefolder":
        classes, files = _list_image_folder(root, split)
        sources = [file for file, _ in files]
    else:
        fmt = _CIFAR[layout]
        sources = [root / name for name in (fmt.meta, *fmt.splits[split])]
        missing = [file.name for file in sources if not file.is_file()]
        if missing:
            raise DfkdError(f"{fmt.name} folder {root} lacks {missing}: download the dataset again")
    cache_file = _cache_file(root, split, layout, sources)
    source = f"{layout} {root} ({split})"
    cached = _read_cache(cache_file)
    if cached is not None:
        return ImageSet(*cached, source=source)
    if layout == "imagefolder":
        images, labels = _decode_images(files)
    else:
        images, labels, classes = _read_cifar(root, _CIFAR[layout], split)
    _write_cache(cache_file, images, labels, classes)
    return ImageSet(images, labels, classes, source)


def check_data_path(path: Path | str) -> Layout:
    """The layout at `path`, or a `DfkdError`: lets a command fail before it makes a run dir or meters a stage.

    For an ImageFolder this also lists both splits' class folders (cheap; no image is decoded).
    """
    layout, root = _find_layout(Path(path).expanduser())
    if layout == "imagefolder":
        for split in ("train", "test"):
            _list_image_folder(root, split)
    return layout


def split_shape(path: Path | str) -> tuple[int, int]:
    """(number of classes, image side) of the dataset at `path`, without decoding a split: CIFAR is
    32x32 with 10 or 100 classes; an ImageFolder has its class folders and its first training image's side."""
    layout, root = _find_layout(Path(path).expanduser())
    if layout != "imagefolder":
        return (10 if layout == "cifar10-python" else 100), 32
    classes, files = _list_image_folder(root, "train")
    with Image.open(files[0][0]) as image:
        return len(classes), image.size[0]


def split_size(path: Path | str, split: Split) -> int:
    """How many images one split holds, without decoding it (CIFAR: 50,000 train, 10,000 test)."""
    layout, root = _find_layout(Path(path).expanduser())
    if layout != "imagefolder":
        return 50_000 if split == "train" else 10_000
    return len(_list_image_folder(root, split)[1])


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
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return "imagefolder"
    return None


# ---------------------------------------------------------------------------------------- ImageFolder


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
        images = sorted(
            entry.name
            for entry in os.scandir(folder)
            if entry.name.lower().endswith(_IMAGE_SUFFIXES) and entry.is_file()
        )
        if not images:
            raise DfkdError(f"class folder {folder} holds no .jpg/.jpeg/.png images: add images or delete the folder")
        files.extend((folder / image, label) for image in images)
    return classes, files


def _decode_file(path: Path) -> np.ndarray:
    """One image file as (H, W, 3) uint8 RGB; grey, palette and RGBA images are converted to RGB.

    PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfkdError(f"cannot read image {path} ({reason}): replace or delete the file") from None


def _decode_images(files: list[tuple[Path, int]]) -> tuple[Tensor, Tensor]:
    """Decode every file into one preallocated array; all images must share one size.

    Threads overlap file reads and PIL's decoding, which release the GIL: 50k CIFAR JPEGs take about
    3.5 s on 2 cores.
    """
    first = _decode_file(files[0][0])
    pixels = np.empty((len(files), *first.shape), dtype=np.uint8)
    pixels[0] = first

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + _CHUNK, len(files))):
            image = _decode_file(files[i][0])
            if image.shape != first.shape:
                raise DfkdError(
                    f"image {files[i][0]} is {image.shape[1]}x{image.shape[0]} but {files[0][0]} is "
                    f"{first.shape[1]}x{first.shape[0]}: resize the dataset's images to one size"
                )
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


def _read_cifar(root: Path, fmt: _CifarFormat, split: Split) -> tuple[Tensor, Tensor, list[str]]:
    """Images, labels and class names of one split; rows of `data` are 1024 R, 1024 G, 1024 B bytes."""
    names = _unpickle(root / fmt.meta).get(fmt.names_key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DfkdError(f"{root / fmt.meta} has no {fmt.names_key.decode()} list: download the dataset again")
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
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


def _cache_file(root: Path, split: Split, layout: Layout, sources: list[Path]) -> Path:
    """The cache path for this exact content: the name changes when any source file's size or mtime does.

    The readable prefix (layout, split, a digest of the place) lets a new version replace the stale one.
    """
    listing = []
    for file in sources:
        stat = file.stat()
        listing.append((file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    listing.sort()
    content = hashlib.sha256(json.dumps([_CACHE_FORMAT, str(root), split, layout, listing]).encode()).hexdigest()
    place = hashlib.sha256(json.dumps([str(root), split, layout]).encode()).hexdigest()
    return cache_dir() / f"{layout}-{split}-{place[:16]}-{content[:32]}.safetensors"


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
