"""Files that are never half-written: atomic writes, sha256 hashing, timestamps and version stamps.

Every file is written to a temporary name in the same folder, fsynced, then renamed over the
target, so a killed process leaves either the old file or the new one, never half of one.
No torch here: the read side (report, audit) uses these too.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from dfkd.errors import DfkdError

_CHUNK = 1 << 20


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string with a Z suffix."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        # Name the file the caller meant, not the temporary one beside it.
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable(path: Path) -> None:
    """Check before any work that a file can be written at `path`; creates nothing that stays.

    A result that cannot be saved after hours of training is lost work, so commands check first.
    """
    path = Path(path)
    if path.is_dir():
        raise DfkdError(f"{path} is a folder: pass the path of a file to write")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DfkdError(f"cannot write {path}: {existing} is a file, not a folder; choose another location")
    try:
        if existing == path.parent:  # a real write, which also catches read-only file systems
            probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
            probe.write_bytes(b"")
            probe.unlink()
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(existing))
    except OSError as exc:
        raise DfkdError(f"cannot write {path} ({exc.strerror}): choose a writable location") from None


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write `data` to `path` atomically and return its sha256."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return sha256_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> str:
    """Write `obj` as indented JSON atomically and return the file's sha256."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def symlinks_under(root: Path) -> list[Path]:
    """Every symbolic link inside `root` (files and folders; links are not followed), sorted."""
    links = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        links += [Path(folder) / name for name in (*dirs, *files) if (Path(folder) / name).is_symlink()]
    return sorted(links)


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages whose behaviour the figures depend on."""
    versions = {"python": platform.python_version()}
    for name in ("dfkd", "torch", "torchvision", "kornia", "codecarbon", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the dfkd source tree, when it is a git checkout; None otherwise."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
