"""Several JAX processes (hosts) from the command line: `jax.distributed` set up by the trainer.

    python -m flax_impl.train ... --coordinator-address HOST:PORT --num-processes N --process-id I
    python -m flax_impl.train ... --distributed auto      # Slurm, Open MPI, Kubernetes, Cloud TPU

or the same through the environment: ``JAX_COORDINATOR_ADDRESS`` (JAX's own variable),
``FLAX_IMPL_NUM_PROCESSES`` and ``FLAX_IMPL_PROCESS_ID`` (a flag wins over its variable). Every
process runs the same command; process 0 hosts the coordinator at HOST:PORT and alone prints and
writes the workdir, which every process must see. On CPUs the processes' collectives go over gloo
(JAX's default CPU collectives).

``jax.distributed.initialize`` must run before anything starts JAX's backends, so `initialize`
runs right after the command line is parsed. A peer that does not arrive within
``--peer-timeout`` seconds, or stops answering for that long, ends the others (JAX aborts them);
a peer that dies outright breaks the next collective at once, and the trainer then exits with
`core.preemption.EXIT_PEER_LOST` (76) and one line (`peer_lost`); run the same command on every
host again to resume.
"""

from __future__ import annotations

import argparse
import os

from core.errors import UserError

PEER_TIMEOUT_S = 100  # JAX's own heartbeat default
ENV_PROCESSES, ENV_PROCESS_ID, ENV_COORDINATOR = (
    "FLAX_IMPL_NUM_PROCESSES",
    "FLAX_IMPL_PROCESS_ID",
    "JAX_COORDINATOR_ADDRESS",
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("several processes (multi-host JAX)")
    g.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        help=f"process 0's address, the same for every process (or ${ENV_COORDINATOR})",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help=f"how many processes run (or ${ENV_PROCESSES})",
    )
    g.add_argument(
        "--process-id", type=int, metavar="I", help=f"this process, 0 to N-1 (or ${ENV_PROCESS_ID})"
    )
    g.add_argument(
        "--distributed",
        choices=("auto",),
        help="auto: let JAX read the cluster (Slurm, Open MPI, Kubernetes, Cloud TPU)",
    )
    g.add_argument(
        "--peer-timeout",
        type=float,
        default=PEER_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long processes wait for a peer to arrive or answer (default {PEER_TIMEOUT_S})",
    )


def settings(args: argparse.Namespace, environ=os.environ) -> dict | None:
    """The arguments of jax.distributed.initialize, or None for one process; UserError for an
    incomplete or inconsistent set."""

    def pick(flag, var, kind):
        value = getattr(args, flag, None)
        if value is None and environ.get(var, "").strip():
            try:
                value = kind(environ[var])
            except ValueError:
                raise UserError(f"${var}={environ[var]!r} is not a number") from None
        return value

    address = pick("coordinator_address", ENV_COORDINATOR, str)
    count = pick("num_processes", ENV_PROCESSES, int)
    index = pick("process_id", ENV_PROCESS_ID, int)
    timeout = getattr(args, "peer_timeout", PEER_TIMEOUT_S)
    if not timeout or timeout <= 0:
        raise UserError(f"--peer-timeout must be positive (got {timeout})")
    timeouts = {
        "initialization_timeout": int(max(1, timeout)),
        "heartbeat_timeout_seconds": int(max(1, timeout)),
        "shutdown_timeout_seconds": int(max(1, timeout)),
    }
    if getattr(args, "distributed", None) == "auto":
        given = {
            k: v
            for k, v in (
                ("coordinator_address", address),
                ("num_processes", count),
                ("process_id", index),
            )
            if v is not None
        }
        return {**given, **timeouts}
    if address is None and count is None and index is None:
        return None
    missing = [
        name
        for name, v in (
            ("--coordinator-address", address),
            ("--num-processes", count),
            ("--process-id", index),
        )
        if v is None
    ]
    if missing:
        raise UserError(
            f"several processes need --coordinator-address, --num-processes and "
            f"--process-id (or their variables); missing: {', '.join(missing)}"
        )
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--process-id {index} is not in 0..{count - 1} (--num-processes {count})")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator-address {address!r} is not HOST:PORT")
    return {"coordinator_address": address, "num_processes": count, "process_id": index, **timeouts}


def initialize(args: argparse.Namespace) -> None:
    """Join the run's processes (before JAX starts its backends); nothing for one process."""
    found = settings(args)
    if found is None:
        return
    import jax

    try:
        jax.distributed.initialize(**found)
    except (ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot start several processes ({first}); check the coordinator "
            "address, process count and id"
        ) from None
    # the rank as torchrun would name it: process 0 alone prints errors and stop lines
    os.environ["RANK"] = str(jax.process_index())


LOST = (
    "Gloo",
    "Connection reset by peer",
    "Connection closed by peer",
    "heartbeat",
    "coordination service",
    "Socket closed",
)


def peer_lost(err: BaseException) -> str | None:
    """The line to print when `err` means another process of this run died, else None."""
    from jax._src import distributed  # whether this process joined others (no backend call)

    if distributed.global_state.client is None:
        return None
    import jax

    text = str(err)
    if not any(word in text for word in LOST):
        return None
    first = text.strip().splitlines()[0][:160]
    return (
        f"process {jax.process_index()} of {jax.process_count()}: another process of this "
        f"run stopped answering ({first}); stopping too. Start every process with the same "
        "command again to resume from the last checkpoint"
    )
