"""Either stack's checkpoint read as NumPy, importing neither stack: a torch_ref .pt file with
torch, a flax_impl step folder with Orbax. `read_other_stack` is the one branch that predict,
--eval-only, the ONNX export and the demo take for a checkpoint of the stack they are not."""

from __future__ import annotations

import sys

import numpy as np

from core import predict
from core.recipe import Recipe
from crossing import weights

OTHER = {"torch_ref": "flax_impl", "flax_impl": "torch_ref"}


def read_other_stack(path, into: str, recipe: Recipe, which: str = "model") -> tuple[dict, dict]:
    """(meta, weights) of a checkpoint of the stack that is not `into`, its model checked
    against `recipe`, converted for `into`: torch_ref gets a state_dict of torch tensors,
    flax_impl {"params", "batch_stats"} of NumPy arrays; `which`: the model's weights or its
    EMA's. A note on stderr says so. `meta` is the driver's record of the run (epoch,
    global_step, recipe, model, ...)."""
    if into == "torch_ref":
        meta, variables = read_flax(path, which)
        predict.check_model(meta, recipe, str(path))
        converted = weights.torch_state_dict(variables)
    else:
        meta = read_torch(path)
        predict.check_model(meta, recipe, str(path))
        converted = weights.torch_to_flax(predict.torch_weights(meta, which, path))
    framework = "torch" if into == "torch_ref" else "Flax"
    print(
        f"note: {path} is a {OTHER[into]} checkpoint; converted to {framework} with "
        "crossing.weights",
        file=sys.stderr,
    )
    return meta, converted


def read_flax(step_dir, which: str = "model") -> tuple[dict, dict]:
    """(meta, variables) of a flax_impl checkpoint step folder (RUN/checkpoints/best/1234):
    the run driver's record and {"params", "batch_stats"} (of the model, or of its EMA) as
    NumPy, without a template or any device (the saved sharding is not needed)."""
    from pathlib import Path

    import jax
    import orbax.checkpoint as ocp

    from core.errors import UserError

    p = Path(step_dir).absolute()
    manager = ocp.CheckpointManager(
        p.parent,
        item_names=("state", "meta"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
    )
    try:
        meta = dict(
            manager.restore(int(p.name), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        )
        # as NumPy arrays, whatever devices the run was sharded over (a torch command, or
        # flax_impl with another device count, reads a checkpoint of 2 host devices)
        tree = manager.item_metadata(int(p.name))["state"].tree
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = manager.restore(
            int(p.name),
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=as_numpy)),
        )["state"]
    except Exception as err:  # truncated files, foreign trees
        raise UserError(
            f"checkpoint {p} cannot be read ({type(err).__name__}); pass another --checkpoint"
        ) from None
    finally:
        manager.close()
    chosen = predict.flax_variables(state, which, p)
    return meta, {k: jax.tree_util.tree_map(np.asarray, v) for k, v in chosen.items()}


def read_torch(path) -> dict:
    """A torch_ref checkpoint file (torch imported here, lazily): the driver's record with the
    model's state_dict under "model_state"; a one-line UserError if it is not one."""
    import torch

    from core.errors import UserError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as err:  # truncated zip, bad pickle, foreign content
        raise UserError(
            f"{path} is truncated, corrupt or not a torch_ref checkpoint "
            f"({type(err).__name__}); pass another --checkpoint"
        ) from None
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("torch_ref/"):
        raise UserError(f"{path} is not a torch_ref checkpoint; pass another --checkpoint")
    return state
