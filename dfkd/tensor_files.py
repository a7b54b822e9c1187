"""safetensors files whose bytes depend only on their content.

safetensors writes a file's metadata in hash-map order, which changes from one process to the next,
so two runs with the same seed made byte-different shards and students with different sha256. Every
tensor file dfkd writes goes through `safetensors_bytes`, which rewrites the header in one canonical
order (sorted keys, no spaces, padded to 8 bytes as the format requires); the tensor data is untouched.
"""

from __future__ import annotations

import json
import struct

from safetensors.torch import save
from torch import Tensor

_LENGTH = struct.Struct("<Q")


def canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in canonical order."""
    (length,) = _LENGTH.unpack_from(data)
    header = json.loads(data[_LENGTH.size : _LENGTH.size + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return _LENGTH.pack(len(text)) + text + data[_LENGTH.size + length :]


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save(tensors, metadata)`, canonical: the same input gives the same bytes."""
    return canonical_header(save(tensors, metadata=metadata))
