"""The synthetic set on disk: the one module that writes, checks and reads `<run>/synthetic/`.

    shard-00000.safetensors ...  uint8 images (N,3,H,W), targets, teacher logits at the kept iterate,
                                 per-image final loss; metadata: method, config hash, teacher sha256,
                                 index, count
    state-<index>.safetensors    the producer's state after the last shard (CMI's bank and head)
    preview.png                  a class-sorted grid of the first images of each class
Any producer (today's synthesizers, a student-aware loop) writes shards through `write_shard` (under torchrun:
`write_shard_file` on each rank, `record_shards` on rank 0), and
distillation reads them through `load_complete`. A shard counts only while its sha256 matches the
manifest, and a shard and the state after it enter the manifest in one atomic write, so a resumed
producer always continues from a state that matches its last counted shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dfkd.errors import DfkdError
from dfkd.files import atomic_write_bytes
from dfkd.manifest import synthesis_of
from dfkd.rundir import SYNTHETIC_DIR, RunDir
from dfkd.tensor_files import safetensors_bytes

STAGE = "synthesis"


class SyntheticSet:
    """The synthetic set of one run dir."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.folder = run.root / SYNTHETIC_DIR

    def shard_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.safetensors"

    def state_path(self, index: int) -> Path:
        return self.folder / f"state-{index:05d}.safetensors"

    @property
    def preview_path(self) -> Path:
        return self.folder / "preview.png"

    def valid_shards(self) -> list[Path]:
        """The leading shards whose sha256 matches the manifest, in order; stops at the first that does not."""
        shards: list[Path] = []
        while self.run.artifact_intact(path := self.shard_path(len(shards))):
            shards.append(path)
        return shards

    @staticmethod
    def shard_count(path: Path) -> int:
        """How many images a shard holds (from its metadata, without reading its tensors)."""
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["count"])

    def load(self) -> dict[str, torch.Tensor]:
        """All valid shards concatenated: images (uint8), targets, logits, losses."""
        shards = self.valid_shards()
        if not shards:
            raise DfkdError(
                f"run dir {self.run.root} has no synthetic shards: run `dfkd synthesize --run {self.run.root}` first"
            )
        parts = [load_file(str(p)) for p in shards]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def expected_images(self) -> int | None:
        """How many images the finished set holds, as its producer recorded (or the run it was copied from)."""
        section = synthesis_of(self.run.read_manifest())
        expected = section.get("images")
        if expected is None and "shared_from" in section:  # a `dfkd study` sibling reuses another run's set
            expected = synthesis_of(RunDir(Path(section["shared_from"])).read_manifest()).get("images")
        return expected

    def load_complete(self) -> dict[str, torch.Tensor]:
        """The whole set, refused when a shard is missing or damaged or the producer did not finish."""
        shards = self.load()
        expected = self.expected_images()
        if len(shards["images"]) != expected:
            raise DfkdError(
                f"the synthetic set of {self.run.root} is incomplete or damaged ({len(shards['images'])} intact "
                f"images of {expected or 'an unfinished synthesis'}): rerun `dfkd synthesize --run {self.run.root}` "
                "to finish or repair it, or see `dfkd audit`"
            )
        return shards

    def write_shard(
        self, index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str], state: dict[str, Any]
    ) -> None:
        """Write shard `index` and the producer's `state` after it, and record both in one manifest write."""
        self.record_shards([(index, self.write_shard_file(index, tensors, metadata))], state)

    def write_shard_file(self, index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
        """Write shard `index` atomically and return its sha256; it counts once `record_shards` records it
        (under torchrun each rank writes its own shards, and rank 0 records them)."""
        return atomic_write_bytes(self.shard_path(index), safetensors_bytes(tensors, metadata))

    def record_shards(self, shards: list[tuple[int, str]], state: dict[str, Any]) -> None:
        """Record written shards `(index, sha256)` and write the producer's `state` after the last of them, in
        one manifest write that also forgets the state saved before them (only the latest is kept; its file
        goes last)."""
        last = max(index for index, _ in shards)
        state_path = self.state_path(last)
        state_bytes = safetensors_bytes(state["tensors"], {"scalars": json.dumps(state["scalars"])})
        state_digest = atomic_write_bytes(state_path, state_bytes)
        first = min(index for index, _ in shards)
        previous = (self.state_path(first - 1),) if first > 0 else ()
        entries = {}
        for index, digest in shards:
            entries.update(self.run.artifact_entry(self.shard_path(index), STAGE, "shard", digest))
        self.run.update_manifest(
            forget=previous, artifacts={**entries, **self.run.artifact_entry(state_path, STAGE, "state", state_digest)}
        )
        for stale in previous:
            stale.unlink(missing_ok=True)

    def state_intact(self, index: int) -> bool:
        """Whether the producer's state after shard `index` is there and matches its manifest hash."""
        return self.run.artifact_intact(self.state_path(index))

    def read_state(self, index: int) -> dict[str, Any] | None:
        """The producer's state saved with shard `index`, checked against its manifest hash; None when
        it is missing or does not match."""
        path = self.state_path(index)
        if not self.state_intact(index):
            return None
        with safe_open(str(path), framework="pt") as f:
            scalars = json.loads(f.metadata()["scalars"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return {"tensors": tensors, "scalars": scalars}

    def prune(self, keep: int) -> None:
        """Remove every shard from index `keep` on, every state but the one after shard `keep - 1`, and
        temporaries of a killed process. Entries are forgotten before files are deleted."""
        stale = sorted(self.folder.glob("shard-*.safetensors"))[keep:]
        stale += [path for path in self.folder.glob("state-*.safetensors") if path != self.state_path(keep - 1)]
        stale += list(self.folder.glob(".*.tmp"))
        if stale:
            self.run.update_manifest(forget=tuple(stale))
        for path in stale:
            path.unlink()
