"""The run directory: its typed manifest, its artifacts and the single-writer lock.

Layout of `runs/<name>/`:
    manifest.json   resolved configs, versions, device, seeds, git commit, sha256 of every artifact
    carbon.jsonl    the hash-chained ledger of metered stages (written by `dfkd.carbon.meter`)
    synthetic/      stage 1 output (`dfkd.synthetic_set`);  student/  stage 2 output
No torch here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dfkd.carbon.ledger import LEDGER_FILE
from dfkd.errors import DfkdError
from dfkd.files import sha256_file, symlinks_under
from dfkd.manifest import MANIFEST_FILE, ArtifactEntry, Manifest, load_manifest, new_manifest, save_manifest

SYNTHETIC_DIR = "synthetic"
STUDENT_DIR = "student"
STUDENT_FILE = f"{STUDENT_DIR}/student.safetensors"  # the run's published student
ESTIMATE_FILE = "estimate.json"  # a dry run's estimate (`dfkd run --dry-run --run DIR`)
# Each stage's outputs, by manifest section: what `discard` removes.
STAGE_DIRS = {"synthesis": SYNTHETIC_DIR, "distillation": STUDENT_DIR}


def default_run_dir(name: str) -> Path:
    """`runs/<name>-<local time>`: where a run goes when no --run is given."""
    return Path("runs") / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """A run directory and its manifest. Open it with `RunDir.open(path)`; hold `lock()` while writing."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def ledger_path(self) -> Path:
        return self.root / LEDGER_FILE

    @classmethod
    def open(cls, root: Path, create: bool = True) -> RunDir:
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
                raise DfkdError(
                    f"cannot create run dir {root} ({exc.strerror}): choose a writable --run path"
                ) from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise DfkdError(f"run dir {root} is not writable: choose a writable --run path")
        links = symlinks_under(root)
        if links:
            raise DfkdError(
                f"run dir {root} holds a symbolic link, {links[0].relative_to(root)}: dfkd does not follow links "
                "in a run dir (a write would land outside it); replace it with the file itself"
            )
        return cls(root)

    def lock(self, token: str = "") -> None:
        """Take the run's exclusive lock; a second process on the same run dir is refused.

        flock is released by the kernel when the holder dies, so a killed run never blocks the next. The lock
        file holds the holder's pid and `token` (a torchrun job's ranks read it back: `lock_token`).
        """
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DfkdError(
                f"run dir {self.root} is in use by another dfkd process: wait for it to finish or use another --run"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{token}\n".encode() if token else f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._lock_fd = fd

    def lock_token(self) -> str | None:
        """The token the lock's holder wrote, as this process reads it (None if there is none)."""
        try:
            lines = (self.root / ".lock").read_text().splitlines()
        except OSError:
            return None
        return lines[1] if len(lines) > 1 else None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDir]:
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    def read_manifest(self) -> Manifest:
        """The manifest, or a fresh skeleton when the run has none yet."""
        return load_manifest(self.manifest_path) or new_manifest()

    def write_manifest(self, manifest: Manifest) -> None:
        save_manifest(self.manifest_path, manifest)

    def update_manifest(self, forget: tuple[Path, ...] = (), **sections: Any) -> Manifest:
        """Read-modify-write, one atomic write: drop the artifact entries of `forget` (files, and folders
        with everything in them), then merge `stages`/`artifacts`/top-level keys into the manifest.

        Callers forget entries before they delete the files: a kill in between leaves files without
        entries, which are never counted.
        """
        manifest = self._forgetting(forget)
        raw: dict[str, Any] = manifest  # type: ignore[assignment]  # keys are checked by the callers' sections
        for key, value in sections.items():
            if key == "stages":
                for stage, content in value.items():
                    raw["stages"].setdefault(stage, {}).update(content)
            elif key == "artifacts":
                raw["artifacts"].update(value)
            else:
                raw[key] = value
        self.write_manifest(manifest)
        return manifest

    def _forgetting(self, paths: tuple[Path, ...]) -> Manifest:
        """The manifest without the artifact entries of `paths` (files, and folders with all they hold)."""
        manifest = self.read_manifest()
        prefixes = [self.relative(path) for path in paths]
        manifest["artifacts"] = {
            key: entry
            for key, entry in manifest["artifacts"].items()
            if not any(key == prefix or key.startswith(f"{prefix}/") for prefix in prefixes)
        }
        return manifest

    def discard(self, *stages: str) -> None:
        """--overwrite: forget and remove the outputs and manifest sections of `stages`.

        The caller names every stage built on the one it replaces (a new synthetic set invalidates
        the students distilled from it). Entries and sections go in one write, before the files.
        """
        folders = [self.root / STAGE_DIRS[stage] for stage in stages]
        manifest = self._forgetting(tuple(folders))
        sections: dict[str, Any] = manifest["stages"]  # type: ignore[assignment]
        for stage in stages:
            sections.pop(stage, None)
        self.write_manifest(manifest)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def artifact_entry(
        self, path: Path, stage: str, role: str = "output", sha256: str | None = None
    ) -> dict[str, ArtifactEntry]:
        """`{relative path: {sha256, bytes, stage, role}}` for `path`, hashing it unless the hash is given."""
        digest = sha256 or sha256_file(path)
        entry: ArtifactEntry = {"sha256": digest, "bytes": Path(path).stat().st_size, "stage": stage, "role": role}
        return {self.relative(path): entry}

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
