"""Device choice: `auto`, explicit devices, and a CUDA device always pinned to its index."""

from __future__ import annotations

import pytest
import torch

from dfkd.device import (
    autocast,
    default_precision,
    legacy_precision,
    native_bf16,
    prepare_model,
    resolve_device,
    uses_channels_last,
)
from dfkd.errors import DfkdError


def test_cpu_and_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DfkdError, match="CUDA is not available here: use --device cpu or auto"):
        resolve_device("cuda")


def test_cuda_is_pinned_to_the_current_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)


@pytest.mark.parametrize("spec", ["banana", "mps", "cuda:x"])
def test_unknown_or_unsupported_devices_are_user_errors(spec: str) -> None:
    with pytest.raises(DfkdError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_precision_is_bf16_where_native_and_dfkd_precision_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("DFKD_PRECISION", raising=False)
    assert default_precision(cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert native_bf16(torch.device("cuda", 0)) and legacy_precision(cpu) == "fp32"
    for chosen in ("bf16", "fp32"):
        monkeypatch.setenv("DFKD_PRECISION", chosen)
        assert default_precision(cpu) == chosen
    monkeypatch.setenv("DFKD_PRECISION", "fp16")
    with pytest.raises(DfkdError, match="DFKD_PRECISION='fp16' is not a precision: use auto, bf16 or fp32"):
        default_precision(cpu)


def test_bf16_autocast_and_channels_last_follow_the_precision() -> None:
    cpu = torch.device("cpu")
    model = torch.nn.Conv2d(3, 4, 3)
    assert prepare_model(model, cpu, "bf16").weight.is_contiguous(memory_format=torch.channels_last)
    with autocast(cpu, "bf16"):
        assert model(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert model(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    assert not uses_channels_last(cpu, "fp32") and uses_channels_last(torch.device("cuda", 0), "fp32")
