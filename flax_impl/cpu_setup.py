"""XLA:CPU settings flax_impl turns on before JAX starts: measured faster, same arithmetic.

1. **Multi-output fusion.** Left to itself, XLA:CPU copies cheap element-wise producers into every
   consumer. In a ResNet's backward pass each weight-gradient convolution's operand transpose then
   recomputes the forward BatchNorm -> residual add -> ReLU chain from three or four full activation
   tensors. The backend option ``xla_cpu_use_multi_output_fusion`` lets one fusion produce several
   outputs, so the chain is computed once. Switch: ``FLAX_IMPL_CPU_FUSION=0`` turns it off.
2. **One host device per core, up to two.** One XLA:CPU device runs a step's kernels largely one
   after another, so a second core adds little (ResNet-20: 1.25x from 1 to 2 cores, torch 1.8x).
   Two host devices (``--xla_force_host_platform_device_count=2``) each take half of every batch:
   the trainer shards it over them exactly as over two GPUs, BatchNorm statistics stay those of
   the whole batch (XLA adds the cross-device sums), and the arithmetic is the same up to summation
   order. More devices than cores is much slower (4 devices on 2 cores: 2.4x slower), and more than
   two is unmeasured, so the default is ``min(cores, 2)``. Switch: ``FLAX_IMPL_CPU_DEVICES=N``.

BENCHMARKS.md has the measurements. ``configure`` edits ``XLA_FLAGS`` (every entry point of
flax_impl calls it first; importing ``flax_impl`` does not) and leaves a setting alone when

- its switch says so, or
- ``XLA_FLAGS`` already names the flag (``--xla_backend_extra_options`` or
  ``--xla_force_host_platform_device_count``): the user's choice wins, kept as it is, or
- ``JAX_PLATFORMS`` is set and leaves out ``cpu`` (both are read by XLA's CPU backend only), or
- JAX's backends are already initialised in this process (XLA reads ``XLA_FLAGS`` once; editing it
  later would claim a setting that is not in force).

On a machine with a GPU the fusion option is harmless: XLA never hands a backend option whose key
starts with ``xla_`` to LLVM, and only the CPU compiler reads this one; the host device count
concerns the CPU client alone.

XLA reads the fusion option by its presence: ``xla_cpu_use_multi_output_fusion=false`` turns it
*on* in jaxlib 0.10 (checked by compiling); use the switch to turn it off.

``state()`` says what happened; a run's ``environment.json`` records it. A switch that holds
something else makes the trainer stop with a one-line error (an import never fails on it).
"""

from __future__ import annotations

import os
import sys

FUSION_SWITCH, DEVICES_SWITCH = "FLAX_IMPL_CPU_FUSION", "FLAX_IMPL_CPU_DEVICES"
FUSION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"
DEVICES = "--xla_force_host_platform_device_count"
MAX_DEFAULT_DEVICES = 2  # measured on 2 cores; see the docstring
_state: dict[str, str] = {}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def decide(environ, backends_initialised: bool, n_cores: int) -> tuple[str | None, dict]:
    """The XLA_FLAGS to set (None: leave as is) and what happened to each setting."""
    flags = environ.get("XLA_FLAGS", "")
    added: list[str] = []
    state: dict[str, str] = {}
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    blocked = None
    if platforms and "cpu" not in platforms:
        blocked = f"off (JAX_PLATFORMS={environ['JAX_PLATFORMS']} has no cpu)"
    elif backends_initialised:
        blocked = "off (JAX was initialised before flax_impl was imported)"

    fusion = environ.get(FUSION_SWITCH, "1").strip().lower()
    if fusion not in ("0", "1", "false", "true", "off", "on", ""):
        state["fusion"] = (
            f"invalid: {FUSION_SWITCH}={environ[FUSION_SWITCH]!r} is not a switch; "
            "set it to 0 (off) or 1 (on)"
        )
    elif fusion in ("0", "false", "off"):
        state["fusion"] = f"off ({FUSION_SWITCH}={environ[FUSION_SWITCH]})"
    elif "--xla_backend_extra_options" in flags:
        state["fusion"] = "left to XLA_FLAGS (it sets --xla_backend_extra_options)"
    elif blocked:
        state["fusion"] = blocked
    else:
        added.append(FUSION)
        state["fusion"] = "on"

    wanted = environ.get(DEVICES_SWITCH, "").strip()
    if wanted and not (wanted.isdigit() and int(wanted) >= 1):
        state["devices"] = (
            f"invalid: {DEVICES_SWITCH}={environ[DEVICES_SWITCH]!r} is not a "
            "number of devices; set it to 1 or more (1: one device, as JAX's default)"
        )
    elif DEVICES in flags:
        state["devices"] = f"left to XLA_FLAGS (it sets {DEVICES})"
    elif blocked:
        state["devices"] = blocked
    else:
        n = int(wanted) if wanted else min(n_cores, MAX_DEFAULT_DEVICES)
        why = f"{DEVICES_SWITCH}={wanted}" if wanted else f"{n_cores} cores"
        if n > 1:
            added.append(f"{DEVICES}={n}")
        state["devices"] = f"{n} ({why})"
    return (f"{flags} {' '.join(added)}".strip() if added else None), state


def _backends_initialised() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module: assume the worst
        return True
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check else True


def configure() -> dict:
    """Apply ``decide`` to os.environ once per process; returns the state."""
    if not _state:
        flags, state = decide(os.environ, _backends_initialised(), cores())
        if flags is not None:
            os.environ["XLA_FLAGS"] = flags
        _state.update(state)
    return dict(_state)


def state() -> dict:
    return dict(_state)


def check() -> None:
    """UserError if a switch held something it cannot mean (the trainer calls this)."""
    for value in _state.values():
        if value.startswith("invalid: "):
            from core.errors import UserError

            raise UserError(value[len("invalid: ") :])


def summary() -> str:
    s = _state or {"fusion": "not configured", "devices": "not configured"}
    return f"multi-output fusion {s['fusion']}; host devices {s['devices']}"


def splits(devices, *batch_sizes: int) -> bool:
    """False only where the host devices are this module's default and a batch does not split
    over them evenly: the trainer then runs on one device instead of refusing the recipe. A
    device count the user chose keeps its one-line error."""
    chosen_by_default = _state.get("devices", "").endswith(" cores)")
    return not (
        chosen_by_default
        and len(devices) > 1
        and devices[0].platform == "cpu"
        and any(b % len(devices) for b in batch_sizes)
    )
