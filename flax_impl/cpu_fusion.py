"""XLA:CPU's multi-output fusion, on by default for flax_impl.

Left to itself, XLA:CPU copies cheap element-wise producers into every consumer. In a ResNet's
backward pass that means each weight-gradient convolution's operand transpose recomputes the
forward BatchNorm -> residual add -> ReLU chain from three or four full activation tensors. The
backend option ``xla_cpu_use_multi_output_fusion`` lets one fusion produce several outputs instead,
so the chain is computed once: the ResNet-20 train step runs about 1.1-1.2x faster on this project's
2-core benchmark machine (BENCHMARKS.md), with the same result up to float32 summation order.

``configure`` adds ``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion`` to ``XLA_FLAGS``
before JAX initialises its backends (importing ``flax_impl`` calls it). It leaves the flags alone when

- ``FLAX_IMPL_CPU_FUSION=0`` is set (the switch to turn it off), or
- ``XLA_FLAGS`` already names ``--xla_backend_extra_options`` (the user's choice wins: their options
  are kept as they are, without this one), or
- ``JAX_PLATFORMS`` is set and leaves out ``cpu`` (the option is read by XLA's CPU compiler only), or
- JAX's backends are already initialised in this process (XLA reads ``XLA_FLAGS`` once; changing it
  later would claim a setting that is not in force).

XLA reads the option by its presence: ``xla_cpu_use_multi_output_fusion=false`` turns it *on* in
jaxlib 0.10 (checked by compiling); use the switch to turn it off.

``state()`` says which of these happened; the run's ``environment.json`` records it. A switch that is
neither on nor off leaves the flags alone and makes the trainer stop with a one-line error.
"""

from __future__ import annotations

import os
import sys

SWITCH = "FLAX_IMPL_CPU_FUSION"
OPTION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"
_state = "not configured"


def decide(environ, backends_initialised: bool) -> tuple[str | None, str]:
    """The XLA_FLAGS to set (None: leave as is) and a one-line reason, from the environment."""
    flags = environ.get("XLA_FLAGS", "")
    switch = environ.get(SWITCH, "1").strip().lower()
    if switch not in ("0", "1", "false", "true", "off", "on", ""):
        return None, (f"invalid: {SWITCH}={environ[SWITCH]!r} is not a switch; set it to 0 (off) "
                      "or 1 (on)")
    if switch in ("0", "false", "off"):
        return None, f"off ({SWITCH}={environ[SWITCH]})"
    if "--xla_backend_extra_options" in flags:
        return None, "left to XLA_FLAGS (it sets --xla_backend_extra_options)"
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and "cpu" not in platforms:
        return None, f"off (JAX_PLATFORMS={environ['JAX_PLATFORMS']} has no cpu)"
    if backends_initialised:
        return None, "off (JAX was initialised before flax_impl was imported)"
    return f"{flags} {OPTION}".strip(), "on"


def _backends_initialised() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module: assume the worst
        return True
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check else True


def configure() -> str:
    """Apply ``decide`` to os.environ once per process; returns the state."""
    global _state
    if _state == "not configured":
        flags, _state = decide(os.environ, _backends_initialised())
        if flags is not None:
            os.environ["XLA_FLAGS"] = flags
    return _state


def state() -> str:
    return _state


def check() -> None:
    """UserError if the switch held something other than on or off (the trainer calls this; an
    import must not fail on it)."""
    if _state.startswith("invalid: "):
        from framework_free.errors import UserError

        raise UserError(_state[len("invalid: "):])
