"""What the ranks of a torchrun job do together: the process group, agreeing on errors, and the few
collectives the stages need (gathering rows, averaging a state, summing a count).

NCCL on CUDA, gloo on CPU. In a world of one (`dfkd.distributed.SINGLE`) every function here is the
identity, so a stage calls them unconditionally and a single process pays nothing.

Errors: a refusal found on one rank must stop every rank, not leave the others waiting in a collective.
`agree` gathers each rank's outcome and raises the first error on all of them; the ranks other than the
one that found it raise it `quiet`, so the job prints it once.
"""

from __future__ import annotations

import datetime as _dt
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dfkd.distributed import SINGLE, RankError, current_world, world_of
from dfkd.errors import DfkdError
from dfkd.rundir import RunDir

T = TypeVar("T")
# Long enough for rank 0's preview and quality figures while the others wait; a dead rank still ends the job
# (torchrun stops the others when one exits).
TIMEOUT = _dt.timedelta(minutes=30)


def local_gpu() -> int:
    """This rank's GPU: number LOCAL_RANK of its node's, or the only one it sees (a scheduler that binds one
    GPU to each task, as SLURM's --gpus-per-task does)."""
    world, count = current_world(), torch.cuda.device_count()
    if count == 1:
        return 0
    if world.local_rank >= count:
        raise DfkdError(
            f"{world.label()} needs GPU {world.local_rank}, but this node has {count}: "
            "launch at most one process per GPU (torchrun --nproc-per-node)"
        )
    return world.local_rank


def use_local_gpu() -> None:
    """Make this rank's GPU (`local_gpu`) the current one, so `--device auto` or `cuda` resolves to it."""
    if current_world().several and torch.cuda.is_available():
        torch.cuda.set_device(local_gpu())


def join(device: torch.device) -> None:
    """Start the job's process group (NCCL for CUDA devices, gloo for CPU); nothing in a world of one."""
    world = current_world()
    if not world.several or dist.is_initialized():
        return
    if device.type == "cuda" and device.index != local_gpu():
        raise DfkdError(
            f"{world.label()} runs on cuda:{local_gpu()} (its LOCAL_RANK), not {device}: drop --device "
            "or pass --device cuda under torchrun"
        )
    if device.type == "cuda":
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)


@contextmanager
def joined(device: torch.device) -> Iterator[None]:
    """`join` for the duration of a command; the process group ends with it (one the caller started, as a
    script of its own under torchrun may, is left as it was)."""
    started = not dist.is_initialized()
    join(device)
    try:
        yield
    finally:
        if started:
            leave()


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def backend() -> str | None:
    return str(dist.get_backend()) if dist.is_initialized() else None


def agree(work: Callable[[], T]) -> T:
    """`work()` on every rank; an error any rank raises (a `DfkdError`) is raised on every rank."""
    error: str | None = None
    result: Any = None
    try:
        result = work()
    except DfkdError as exc:
        if not current_world().several:
            raise
        error = str(exc)
    first = _first_error(error)
    if first is not None:
        rank, message = first
        raise RankError(message if rank == 0 else f"rank {rank}: {message}", quiet=rank != current_world().rank)
    return result


def _first_error(error: str | None) -> tuple[int, str] | None:
    if not current_world().several:
        return None if error is None else (0, error)
    errors: list[str | None] = [None] * current_world().size
    dist.all_gather_object(errors, error)
    return next(((rank, message) for rank, message in enumerate(errors) if message is not None), None)


def from_primary(work: Callable[[], T]) -> T:
    """`work()` on rank 0 alone (what writes the run dir), run as a world of one; its result, or its error,
    reaches every rank."""
    world = current_world()
    if not world.several:
        return work()
    box: list[Any] = [None]
    error: str | None = None
    if world.primary:
        try:
            with world_of(SINGLE):  # rank 0 alone: a stage it meters meanwhile is its own (no collectives)
                box[0] = work()
        except DfkdError as exc:
            error = str(exc)
    outcome: list[Any] = [(error, box[0])]
    dist.broadcast_object_list(outcome, src=0)
    error, value = outcome[0]
    if error is not None:
        raise RankError(error, quiet=not world.primary)
    return value


def gather_objects(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not current_world().several:
        return [value]
    values: list[Any] = [None] * current_world().size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: T) -> T:
    """Rank 0's `value` on every rank."""
    if not current_world().several:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if current_world().several:
        dist.barrier()


def all_sum(count: int, device: torch.device) -> int:
    """The sum of every rank's `count`."""
    if not current_world().several:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """`value`'s mean over the ranks (a copy), on every rank."""
    if not current_world().several:
        return value
    summed = value.detach().clone()
    dist.all_reduce(summed)
    return summed / current_world().size


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` under DistributedDataParallel (gradients averaged over the ranks in backward), or itself in a
    world of one. The wrapper starts from rank 0's weights and buffers."""
    if not current_world().several:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` (any number, the same trailing shape), concatenated in rank order, on every rank."""
    if not current_world().several:
        return rows
    counts = [int(c) for c in gather_objects(rows.shape[0])]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def mean_state(tensors: dict[str, torch.Tensor], made: bool) -> dict[str, torch.Tensor]:
    """A state every rank ends a round with: each tensor's mean over the ranks that `made` work this round from
    the same starting state (integer tensors, an optimiser's step count, take the largest). Computed alike on
    every rank from every rank's CPU copy, so the result is the same bits everywhere, also where a rank that
    did no work yet has fewer tensors (an optimiser that never stepped)."""
    if not current_world().several:
        return tensors
    states = [state for did, state in gather_objects((made, tensors)) if did]
    if not states:
        return tensors
    merged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            merged[name] = (torch.stack([state[name].double() for state in states]).mean(0)).to(first.dtype)
        else:
            merged[name] = torch.stack([state[name] for state in states]).amax(0)
    return merged


@contextmanager
def job_lock(root: Path, create: bool = True) -> Iterator[RunDir]:
    """The run dir (made with `create`), locked for this job: rank 0 takes the lock (a second job is still
    refused) and writes a token into it that every other rank must read back, so a run dir that is not one
    shared folder for every rank (a path on each node's local disk) is refused before any work, in one line."""
    world = current_world()
    if not world.several:
        run = RunDir.open(root, create)
        with run.locked():
            yield run
        return

    def lock() -> str:
        primary = RunDir.open(root, create)
        primary.lock(token := secrets.token_hex(16))
        locks.append(primary)
        return token

    locks: list[RunDir] = []
    token = from_primary(lock)
    try:

        def check() -> RunDir:
            if world.primary:
                return locks[0]
            run = RunDir.open(root, create=False) if root.is_dir() else None
            if run is None or run.lock_token() != token:
                raise DfkdError(
                    f"run dir {root} on {world.host} is not the one rank 0 locked (it does not hold rank 0's lock "
                    "token): under torchrun the run dir must be one folder every rank reaches, on a filesystem "
                    "every node shares (NFS, Lustre ...); pass such a --run"
                )
            return run

        yield agree(check)
        barrier()
    finally:
        for run in locks:
            run.unlock()
