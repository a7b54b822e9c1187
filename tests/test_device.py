"""Device choice: `auto`, explicit devices, and a CUDA device always pinned to its index."""

from __future__ import annotations

import pytest
import torch

from dfkd.device import resolve_device
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
