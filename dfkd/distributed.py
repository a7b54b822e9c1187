"""Which process of a job this is, as torchrun (or `srun` with torchrun's variables) says; no torch here.

`torchrun --nproc-per-node N [--nnodes M ...] -m dfkd synthesize ...` starts N x M copies of the command and
tells each its place through the environment: RANK and WORLD_SIZE (all processes), LOCAL_RANK and
LOCAL_WORLD_SIZE (the processes of its node), GROUP_RANK (its node). `world_from_env` reads and checks
them once, `world_of` makes that the process's world while a command runs, and `current_world()` answers
"am I the primary rank?" everywhere in between; a plain `dfkd ...` is the world of one. The collectives
that ranks run together are in `dfkd.collective` (torch).

Only the commands that are built for it accept a world of several (`dfkd synthesize` today); every other
command refuses at once, in one line, before anything is read or written, so N copies never each redo a
job on one run dir.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from dfkd.errors import DfkdError


@dataclass(frozen=True)
class World:
    """This process's place in its job: rank of size, local rank of the node's local size, node of nodes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node: int = 0
    host: str = ""

    @property
    def nodes(self) -> int:
        """torchrun starts the same number of processes on every node."""
        return self.size // self.local_size

    @property
    def primary(self) -> bool:
        """Rank 0: the one that holds the run dir's lock and writes its manifest and ledger."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    @property
    def meters_host(self) -> bool:
        """Local rank 0 meters its node's CPU and RAM (codecarbon measures the whole machine): once per node."""
        return self.local_rank == 0

    def label(self) -> str:
        return f"rank {self.rank} of {self.size} (node {self.node}, {self.host or 'this host'})"


class RankError(DfkdError):
    """An error every rank stops on; `quiet` on the ranks that print nothing (the job prints it once)."""

    def __init__(self, message: str, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


def job_error(message: str) -> RankError:
    """An error that every rank of the job finds alike (a setting, not a rank's own trouble): rank 0 says it."""
    return RankError(message, quiet=not current_world().primary)


SINGLE = World(host=socket.gethostname())
_current = SINGLE


def _integer(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    raw = env.get(name, default)
    if raw is None:
        launcher = "torchrun sets it; under srun, export it from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID"
        raise DfkdError(f"WORLD_SIZE is set but {name} is not: launch with torchrun ({launcher})")
    try:
        return int(raw.strip())
    except ValueError:
        raise DfkdError(f"{name}={raw!r} is not a whole number: fix or unset the launcher's variables") from None


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The world the launcher's variables describe (the world of one when WORLD_SIZE is unset or 1), checked."""
    env = os.environ if env is None else env
    size = _integer(env, "WORLD_SIZE", "1") if (env.get("WORLD_SIZE") or "").strip() else 1
    if size < 1:
        raise DfkdError(f"WORLD_SIZE={size} is not a number of processes: unset it to run dfkd in one")
    if size == 1:
        return SINGLE
    if not env.get("MASTER_ADDR"):
        raise DfkdError("WORLD_SIZE is set but MASTER_ADDR is not: launch with torchrun (it sets the rendezvous)")
    _integer(env, "MASTER_PORT")
    rank, local_rank, local_size = (_integer(env, name) for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    if not 0 <= rank < size or not 0 <= local_rank < local_size or size % local_size:
        raise DfkdError(
            f"the launcher's variables do not describe a job (RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}, "
            f"LOCAL_WORLD_SIZE={local_size}): launch with torchrun, the same --nproc-per-node on every node"
        )
    node = _integer(env, "GROUP_RANK", str(rank // local_size))
    return World(rank, size, local_rank, local_size, node, socket.gethostname())


@contextmanager
def world_of(world: World) -> Iterator[World]:
    """Make `world` the process's world while a command runs (the CLI's commands, the Python API's callers)."""
    global _current
    before, _current = _current, world
    try:
        yield world
    finally:
        _current = before


def current_world() -> World:
    return _current


def check_single_process(what: str) -> None:
    """Refuse `what` in a world of several processes: it is built for one."""
    world = current_world()
    if world.several:
        raise job_error(
            f"{what} runs in one process, but dfkd was launched as {world.label()} (WORLD_SIZE={world.size}, "
            "e.g. by torchrun): run it without torchrun (one GPU: --device cuda:N); under torchrun, dfkd synthesize "
            "shards its batches across the ranks"
        )
