"""The run directory: atomic writes, sha256 hashing, the manifest and the single-writer lock.

Layout of `runs/<name>/`:
    manifest.json   resolved configs, versions, device, seeds, git commit, sha256 of every artifact
    carbon.jsonl    the hash-chained ledger of metered stages (written by `dfkd.meter`)
    synthetic/      stage 1 output;  student/  stage 2 output
Every file is written to a temporary name in the same folder, fsynced, then renamed over the
target, so a killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from dfkd.errors import DfkdError

MANIFEST_SCHEMA = "dfkd.manifest/1"
_CHUNK = 1 << 20


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string with a Z suffix."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write `data` to `path` atomically and return its sha256."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return sha256_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> str:
    """Write `obj` as indented JSON atomically and return the file's sha256."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunDir:
    """A run directory and its manifest. Open it with `RunDir.open(path)`; hold `lock()` while writing."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def ledger_path(self) -> Path:
        return self.root / "carbon.jsonl"

    @classmethod
    def open(cls, root: Path, create: bool = True) -> "RunDir":
        """Open (and with `create`, make) a run directory; an unusable path is a `DfkdError`."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise DfkdError(f"run dir {root} exists and is not a directory: pass --run with a directory path")
        if not root.exists():
            if not create:
                raise DfkdError(f"run dir {root} does not exist: pass the --run of an earlier stage")
            try:
                root.mkdir(parents=True)
            except OSError as exc:
                raise DfkdError(f"cannot create run dir {root} ({exc.strerror}): choose a writable --run path") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise DfkdError(f"run dir {root} is not writable: choose a writable --run path")
        return cls(root)

    def lock(self) -> None:
        """Take the run's exclusive lock; a second process on the same run dir is refused.

        flock is released by the kernel when the holder dies, so a killed run never blocks the next.
        """
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DfkdError(
                f"run dir {self.root} is in use by another dfkd process: wait for it to finish or use another --run"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunDir"]:
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or a fresh skeleton when the run has none yet."""
        if not self.manifest_path.exists():
            return {
                "schema": MANIFEST_SCHEMA,
                "created": utc_now(),
                "versions": package_versions(),
                "git_commit": git_commit(),
                "host": {"platform": platform.platform(), "python": sys.version.split()[0]},
                "stages": {},
                "artifacts": {},
            }
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DfkdError(f"manifest {self.manifest_path} is unreadable ({exc}): restore it or start a new --run") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = utc_now()
        atomic_write_json(self.manifest_path, manifest)

    def update_manifest(self, **sections: Any) -> dict[str, Any]:
        """Read-modify-write: merge `stages`/top-level keys into the manifest and write it atomically."""
        manifest = self.read_manifest()
        for key, value in sections.items():
            if key == "stages":
                for stage, content in value.items():
                    manifest["stages"].setdefault(stage, {}).update(content)
            elif key == "artifacts":
                manifest["artifacts"].update(value)
            else:
                manifest[key] = value
        self.write_manifest(manifest)
        return manifest

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def artifact_entry(self, path: Path, stage: str, role: str = "output", sha256: str | None = None) -> dict[str, Any]:
        """`{relative path: {sha256, bytes, stage, role}}` for `path`, hashing it unless the hash is given."""
        digest = sha256 or sha256_file(path)
        return {self.relative(path): {"sha256": digest, "bytes": Path(path).stat().st_size, "stage": stage, "role": role}}

    def artifact_intact(self, path: Path) -> bool:
        """Whether `path` exists and its sha256 equals the manifest's entry for it."""
        if not Path(path).exists():
            return False
        entry = self.read_manifest()["artifacts"].get(self.relative(path))
        return entry is not None and entry["sha256"] == sha256_file(path)

    def record_artifact(self, path: Path, stage: str, role: str = "output", sha256: str | None = None) -> str:
        """Hash `path` (unless its hash is given) and record it in the manifest; returns the sha256."""
        entry = self.artifact_entry(path, stage, role, sha256)
        self.update_manifest(artifacts=entry)
        return next(iter(entry.values()))["sha256"]

    def forget_artifacts(self, prefix: str) -> None:
        """Drop manifest entries under `prefix` (used by --overwrite before files are removed)."""
        manifest = self.read_manifest()
        manifest["artifacts"] = {k: v for k, v in manifest["artifacts"].items() if not k.startswith(prefix)}
        self.write_manifest(manifest)
