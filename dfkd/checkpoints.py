"""Model checkpoints as `.safetensors` with validated metadata; `.pth` import through weights_only.

Metadata (all strings, as safetensors requires): arch, num_classes, input_size, mean, std, dataset,
and when known test_acc and class_names (a JSON list, in label order); any further keys (epochs,
tau_mode, loss ...) are kept as extras. Nothing is ever unpickled except through
`torch.load(weights_only=True)` in `import_checkpoint`.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from torch import nn

from dfkd.errors import DfkdError, first_line
from dfkd.files import atomic_write_bytes
from dfkd.models import create_model, model_spec
from dfkd.tensor_files import safetensors_bytes

_REQUIRED = ("arch", "num_classes", "mean", "std", "dataset")
_CORE = set(_REQUIRED) | {"input_size", "test_acc", "class_names"}
# What `import_checkpoint` reads: a PyTorch pickle (through weights_only) or a safetensors file.
_PICKLE_SUFFIXES = (".pth", ".pt")


Stats = tuple[float, float, float]


def as_recorded(values: tuple[float, ...]) -> Stats:
    """Normalisation figures as a checkpoint's metadata keeps them (6 significant digits)."""
    first, second, third = (float(f"{v:g}") for v in values)
    return first, second, third


_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")


def _json_number(text: str) -> int | float | str:
    """`text` as an int or a float when it is written as a plain decimal number, else unchanged (so "0123",
    "1_000" or an all-digit commit hash with a leading zero stay text)."""
    if not _NUMBER.fullmatch(text):
        return text
    value = float(text)
    if not math.isfinite(value):
        return text
    return int(text) if text.lstrip("-").isdigit() else value


def _valid_class_names(names: object, num_classes: int) -> tuple[str, ...]:
    """`names` as a tuple when they are `num_classes` distinct non-blank strings, else a `ValueError` saying why:
    a name list that does not pair up with the logits would label every class wrongly."""
    if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
        raise ValueError("class_names is not a list of non-blank names")
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"class names repeat: {', '.join(repeated[:3])}")
    return tuple(names)


def read_class_names(path: Path, num_classes: int) -> tuple[str, ...]:
    """The class names in `path`, one a line in label order (surrounding spaces and blank lines ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise DfkdError(f"cannot read class names from {path} ({reason}): pass a text file, one name a line") from None
    try:
        return _valid_class_names([line.strip() for line in lines if line.strip()], num_classes)
    except ValueError as exc:
        raise DfkdError(f"{path}: {exc}: give one distinct name per class, one a line, in label order") from None


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself; `extra` holds keys beyond the core ones."""

    arch: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dataset: str
    input_size: int = 32
    test_acc: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None  # in label order; None for checkpoints that do not name them

    def to_strings(self) -> dict[str, str]:
        out = {
            "arch": self.arch,
            "num_classes": str(self.num_classes),
            "input_size": str(self.input_size),
            "mean": ",".join(f"{v:g}" for v in self.mean),  # as_recorded: the same 6 significant digits
            "std": ",".join(f"{v:g}" for v in self.std),
            "dataset": self.dataset,
        }
        if self.test_acc is not None:
            out["test_acc"] = f"{self.test_acc:.2f}"
        if self.class_names is not None:
            out["class_names"] = json.dumps(list(self.class_names), ensure_ascii=False)
        out.update({k: str(v) for k, v in self.extra.items()})
        return out

    def to_json(self) -> dict[str, Any]:
        """The metadata with JSON types: numbers as numbers (`test_acc` in %), mean and std as lists; an
        extra value that reads as a number becomes one, the rest stay text."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "dataset": self.dataset,
            "test_acc": self.test_acc,
            "class_names": None if self.class_names is None else list(self.class_names),
            "extra": {key: _json_number(value) for key, value in self.extra.items()},
        }

    @classmethod
    def from_strings(cls, raw: dict[str, str] | None, source: str) -> CheckpointMeta:
        raw = raw or {}
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise DfkdError(
                f"checkpoint {source} lacks metadata {', '.join(missing)}: re-save it with dfkd "
                "(dfkd checkpoint import for .pth files)"
            )
        try:
            mean = tuple(float(v) for v in raw["mean"].split(","))
            std = tuple(float(v) for v in raw["std"].split(","))
            num_classes = int(raw["num_classes"])
            arch = raw["arch"]
            input_size = int(raw.get("input_size", model_spec(arch).input_size))
            test_acc = float(raw["test_acc"]) if raw.get("test_acc") not in (None, "") else None
            if test_acc is not None and not 0.0 <= test_acc <= 100.0:  # also refuses NaN
                raise ValueError(f"test_acc {raw['test_acc']} is not a percentage in [0, 100]")
            # json.JSONDecodeError is a ValueError too
            names = _valid_class_names(json.loads(raw["class_names"]), num_classes) if "class_names" in raw else None
        except ValueError as exc:
            raise DfkdError(f"checkpoint {source} has malformed metadata ({exc}): re-save it with dfkd") from None
        if len(mean) != 3 or len(std) != 3 or not all(map(math.isfinite, mean + std)) or min(std) <= 0:
            raise DfkdError(
                f"checkpoint {source} needs 3 finite means and 3 positive finite stds, got {raw['mean']} / {raw['std']}"
            )
        extra = {k: v for k, v in raw.items() if k not in _CORE}
        return cls(arch, num_classes, mean, std, raw["dataset"], input_size, test_acc, extra, names)


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and BN buffers, minus `num_batches_tracked` (the public checkpoints omit it)."""
    return {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def checkpoint_bytes(model: nn.Module, meta: CheckpointMeta) -> bytes:
    return safetensors_bytes(_state_for_saving(model), meta.to_strings())


def save_checkpoint(path: Path, model: nn.Module, meta: CheckpointMeta) -> str:
    """Write model + metadata atomically to `path`; returns the file's sha256.

    An unwritable path (a folder, no permission, a full disk) is the user's to fix, so it is a `DfkdError`;
    so are weights that hold NaN or infinity (a diverged training): such a model is never written.
    """
    broken = [
        name for name, value in model.state_dict().items() if value.is_floating_point() and not value.isfinite().all()
    ]
    if broken:
        raise DfkdError(
            f"not writing {path}: {len(broken)} weight tensors hold NaN or infinity (first {broken[0]}), "
            "so training diverged: lower the learning rate (--lr) and run again"
        )
    try:
        return atomic_write_bytes(Path(path), checkpoint_bytes(model, meta))
    except OSError as exc:
        raise DfkdError(
            f"cannot write checkpoint {path} ({exc.strerror}): choose a writable .safetensors file path"
        ) from None


def read_meta(path: Path) -> CheckpointMeta:
    """Read and validate only the metadata of a `.safetensors` checkpoint."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        raise DfkdError(f"checkpoint {path} is corrupt or truncated ({exc}): re-create or re-download it") from None
    meta = CheckpointMeta.from_strings(raw, str(path))
    model_spec(meta.arch)
    return meta


def _existing(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"checkpoint {path} does not exist: pass the path of a .safetensors file")
    if path.suffix != ".safetensors":
        raise DfkdError(f"{path} is not a .safetensors file: convert .pth files with `dfkd checkpoint import`")
    return path


def load_state_into(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, num_classes: int | None = None
) -> None:
    """Load `state` into `model`, naming the first missing/extra keys and the shapes that differ (file vs model).

    With `num_classes` (what an import was told), weights that differ from the model only in the rows of
    its head are blamed on that number: the error says how many classes they predict.
    """
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        parts = [
            f"{kind} keys {keys[:5]}{f' ... ({len(keys)} in all)' if len(keys) > 5 else ''}"
            for kind, keys in (("missing", missing), ("unexpected", extra))
            if keys
        ]
        raise DfkdError(f"checkpoint {source} does not fit the architecture: {'; '.join(parts)}")
    bad = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items() if given[k].shape != v.shape]
    if bad:
        shapes = ", ".join(f"{k} {file} vs {wanted}" for k, file, wanted in bad[:3])
        # The head's tensors (weight, bias) have one row per class: only their first dimension differs.
        rows = [file[0] for _, file, wanted in bad if file[1:] == wanted[1:] and wanted[:1] == (num_classes,)]
        if len(rows) == len(bad) and len(set(rows)) == 1:
            predicted = rows[0]
            raise DfkdError(
                f"{source}: the weights predict {predicted} classes, not {num_classes}: pass --num-classes {predicted} "
                f"(the head has the wrong shape, file vs model: {shapes})"
            )
        raise DfkdError(f"checkpoint {source} has tensors of the wrong shape (file vs model): {shapes}")
    model.load_state_dict(given, strict=False)


def load_checkpoint(
    path: Path,
    arch: str | None = None,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, CheckpointMeta]:
    """Load a validated checkpoint into a fresh model in eval mode.

    `arch` / `num_classes`, when given, must match the metadata; any mismatch is a `DfkdError`.
    """
    path = _existing(path)
    data = path.read_bytes()
    meta = read_meta(path)
    if arch is not None and meta.arch != arch:
        raise DfkdError(f"checkpoint {path} holds a {meta.arch}, not the requested {arch}: pass a {arch} checkpoint")
    if num_classes is not None and meta.num_classes != num_classes:
        raise DfkdError(
            f"checkpoint {path} has {meta.num_classes} classes, but {num_classes} are required: "
            "pass a checkpoint for the same dataset"
        )
    try:
        state = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise DfkdError(f"checkpoint {path} is corrupt or truncated ({exc}): re-create or re-download it") from None
    model = create_model(meta.arch, meta.num_classes)
    load_state_into(model, state, str(path))
    broken = [name for name, value in state.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        raise DfkdError(
            f"checkpoint {path} holds NaN or infinity in {len(broken)} tensors (first {broken[0]}): "
            "it cannot be used; re-train or re-download it"
        )
    return model.to(device).eval(), meta


def _read_state(src: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth`/`.pt` (a bare state dict or `{"state_dict": ...}`) or a `.safetensors` file,
    without the `module.` prefix that `nn.DataParallel` adds to every key."""
    if src.suffix not in (*_PICKLE_SUFFIXES, ".safetensors"):
        raise DfkdError(f"{src} is neither a .pth/.pt nor a .safetensors file: save the model's state_dict as one")
    data = src.read_bytes()
    if src.suffix == ".safetensors":
        try:
            state = st_load(data)
        except (SafetensorError, ValueError) as exc:
            raise DfkdError(f"{src} is corrupt or truncated ({exc}): re-export or re-download it") from None
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise DfkdError(
                f"{src} is not a weights-only PyTorch file ({type(exc).__name__}): export its state_dict"
            ) from None
        found = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(found, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in found.items()
        ):
            raise DfkdError(f"{src} holds no state dict of tensors: save model.state_dict() and import that")
        state = found
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_input_size(model: nn.Module, meta: CheckpointMeta) -> None:
    """One forward pass of `model` (in eval mode) on a blank image of the recorded size: a size the architecture
    cannot take (too small for its downsampling, or not the one a fixed-size model expects) fails at import,
    not at the start of a run."""
    size = meta.input_size
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception as exc:  # noqa: BLE001 - zoo models fail on a bad size with Runtime-, Value- or AssertionError
        reason = first_line(exc)
        raise DfkdError(
            f"{meta.arch} cannot classify {size}x{size} images ({reason}): pass the --input-size the weights were "
            "trained at"
        ) from None


def import_checkpoint(src: Path, dst: Path, meta: CheckpointMeta) -> str:
    """Convert another tool's weights (`.pth`/`.pt` or `.safetensors`) into a validated checkpoint at `dst`.

    A pickle is read with `weights_only=True`, which refuses anything but tensors and plain containers. A
    safetensors source gives only its tensors: its own metadata (free-form, often just `{"format": "pt"}`) is
    ignored and `meta` is what the new checkpoint records. The weights must fit `meta.arch` with
    `meta.num_classes` classes and the model must take `meta.input_size` images before `dst` is written
    (atomically), so a failed import leaves no file. Returns the new file's sha256.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise DfkdError(f"destination {dst} must end in .safetensors")
    if not src.is_file():
        raise DfkdError(f"{src} does not exist: pass the path of a .pth or .safetensors file")
    if dst.resolve() == src.resolve():
        raise DfkdError(f"{dst} is the source file itself: write the imported checkpoint to another path")
    state = _read_state(src)
    model = create_model(meta.arch, meta.num_classes)
    load_state_into(model, state, str(src), meta.num_classes)
    _check_input_size(model.eval(), meta)
    return save_checkpoint(dst, model, meta)
