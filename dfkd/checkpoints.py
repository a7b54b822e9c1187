"""Model checkpoints as `.safetensors` with validated metadata; `.pth` import through weights_only.

Metadata (all strings, as safetensors requires): arch, num_classes, input_size, mean, std, dataset,
and when known test_acc; any further keys (epochs, tau_mode, loss ...) are kept as extras.
Nothing is ever unpickled except through `torch.load(weights_only=True)` in `import_pth`.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from torch import nn

from dfkd.errors import DfkdError
from dfkd.files import atomic_write_bytes
from dfkd.models import create_model, model_spec
from dfkd.tensor_files import safetensors_bytes

_REQUIRED = ("arch", "num_classes", "mean", "std", "dataset")
_CORE = set(_REQUIRED) | {"input_size", "test_acc"}


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
        except ValueError as exc:
            raise DfkdError(f"checkpoint {source} has malformed metadata ({exc}): re-save it with dfkd") from None
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise DfkdError(f"checkpoint {source} needs 3 means and 3 positive stds, got {raw['mean']} / {raw['std']}")
        extra = {k: v for k, v in raw.items() if k not in _CORE}
        return cls(arch, num_classes, mean, std, raw["dataset"], input_size, test_acc, extra)


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


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, naming missing/extra keys and shape mismatches in the error."""
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise DfkdError(f"checkpoint {source} does not fit the architecture: {'; '.join(parts)}")
    bad = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if given[k].shape != v.shape]
    if bad:
        raise DfkdError(f"checkpoint {source} has tensors of the wrong shape (file vs model): {', '.join(bad[:3])}")
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


def import_pth(src: Path, dst: Path, meta: CheckpointMeta) -> str:
    """Convert a `.pth` (a bare state dict or `{"state_dict": ...}`) into a validated `.safetensors`.

    The pickle is read with `weights_only=True`, which refuses anything but tensors and plain containers.
    Returns the new file's sha256.
    """
    src = Path(src)
    if not src.is_file():
        raise DfkdError(f"{src} does not exist: pass the path of a .pth file")
    try:
        obj = torch.load(io.BytesIO(src.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise DfkdError(
            f"{src} is not a weights-only PyTorch file ({type(exc).__name__}): export its state_dict"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DfkdError(f"{src} holds no state dict of tensors: save model.state_dict() and import that")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = create_model(meta.arch, meta.num_classes)
    load_state_into(model, state, str(src))
    return save_checkpoint(Path(dst), model, meta)
