"""Process-group set-up for torchrun, and the few collective operations the trainer needs.

``torchrun --nproc_per_node=N -m torch_ref.train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; we
then join a process group (NCCL when the process has a GPU, gloo otherwise). Without those
variables everything here is a no-op on one process, so single-process code never branches.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as tdist


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            tdist.barrier()

    def broadcast_object(self, obj):
        """rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (in float64, so counts and sums stay exact)."""
        if self.enabled:
            values = values.to(torch.float64)
            tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
        return values

    def close(self):
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


def rank_from_environment() -> int:
    """This process's rank as torchrun describes it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def from_environment(device_type: str) -> Dist:
    """Join the process group torchrun describes, or return a single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(rank, world, local, backend)


def pick_device(requested: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there (or asked for), else cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from core.errors import UserError

        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Socket Timeout",
    "timed out",
    "NCCL communicator was aborted",
    "recvBytes",
    "sendBytes",
)


def peer_lost(err: BaseException) -> str | None:
    """The line to print when `err` means another process of this run died, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or not isinstance(err, RuntimeError):  # DistBackendError is a RuntimeError
        return None  # (the process group may be torn down already: the run's `finally`)
    text = str(err)
    collective = isinstance(err, getattr(tdist, "DistError", ())) or any(
        name in text for name in ("gloo", "NCCL", "c10d", "ProcessGroup")
    )
    if not collective or not any(word in text for word in LOST):
        return None
    first = text.strip().splitlines()[0][:160]
    return (
        f"rank {os.environ.get('RANK', '?')} of {world}: another process of this run "
        f"stopped answering ({first}); stopping too. Start the run again with the same "
        "command to resume from the last checkpoint"
    )
