"""Whether dfkd was launched as one process of several (torchrun, `srun`): not supported yet.

Every stage, the run dir's lock, the manifest and the meter are single-process today. Launched by
`torchrun --nproc-per-node N` (which sets WORLD_SIZE), N copies would each start the whole job on the same
run dir: one would hold the lock and the others stop on it, after loading everything, or, on separate run
dirs, the job would be done N times and metered N times. So a command launched that way stops at once, in
one line, before anything is read or written. (Sharded synthesis, DDP distillation and a rank-aware
ledger are issue 15.) No torch here.
"""

from __future__ import annotations

import os

from dfkd.errors import DfkdError


def check_single_process() -> None:
    """Refuse to run as one of several processes (`WORLD_SIZE` > 1, as torchrun and torch.distributed set it)."""
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        world = int(raw)
    except ValueError:
        raise DfkdError(f"WORLD_SIZE={raw!r} is not a number of processes: unset it to run dfkd in one") from None
    if world > 1:
        rank = os.environ.get("RANK", "?")
        raise DfkdError(
            f"dfkd was launched as process {rank} of {world} (WORLD_SIZE={world}, e.g. by torchrun), but runs in one "
            "process only for now: each would redo the whole job on the same run dir; run the command without "
            "torchrun (one GPU: --device cuda:N)"
        )
