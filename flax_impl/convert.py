"""Weights both ways between torch (torch_ref or torchvision state_dicts) and flax_impl variables.

    torch_to_flax(state_dict) -> {"params": ..., "batch_stats": ...}
    flax_to_torch(variables) -> state_dict (an OrderedDict of torch tensors)

Names: torch's ``layer2.0.downsample.1.running_var`` is Flax's
``batch_stats/layer2_0/downsample_1/var``. Layouts: convolution weights OIHW <-> HWIO kernels,
linear weights (out, in) <-> (in, out) kernels; BatchNorm ``weight``/``bias`` <->
``scale``/``bias``,
``running_mean``/``running_var`` <-> ``mean``/``var``, and ``num_batches_tracked`` is carried as an
int32 counter. Only transposes and copies: the round trip is bit-exact, in float32 and float64.
torch is imported only by `flax_to_torch` (and only if you call it).
"""

from __future__ import annotations

import collections
import re

import numpy as np

_STATS = {
    "running_mean": "mean",
    "running_var": "var",
    "num_batches_tracked": "num_batches_tracked",
}
_STATS_BACK = {v: k for k, v in _STATS.items()}


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor; no torch import needed to read it
        t = t.detach().cpu().numpy()
    return np.array(t, copy=True)  # never alias the caller's buffers (torch updates them in place)


def _module_path(parts: list[str]) -> list[str]:
    """["layer1", "0", "downsample", "1"] -> ["layer1_0", "downsample_1"]."""
    out = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return out


def torch_to_flax(state_dict) -> dict:
    """A torch ResNet state_dict as flax_impl variables (nested dicts of NumPy arrays)."""
    by_module: dict[tuple, dict] = collections.defaultdict(dict)
    for key, value in state_dict.items():
        *mod, leaf = key.split(".")
        by_module[tuple(mod)][leaf] = _to_numpy(value)
    variables = {"params": {}, "batch_stats": {}}
    for mod, leaves in by_module.items():
        path = _module_path(list(mod))
        bn = "running_mean" in leaves
        for leaf, arr in leaves.items():
            if leaf in _STATS:
                coll, name = "batch_stats", _STATS[leaf]
                if leaf == "num_batches_tracked":
                    arr = arr.astype(np.int32)
            elif leaf == "weight" and bn:
                coll, name = "params", "scale"
            elif leaf == "weight" and arr.ndim == 4:
                coll, name, arr = "params", "kernel", arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            elif leaf == "weight" and arr.ndim == 2:
                coll, name, arr = "params", "kernel", arr.T  # (out, in) -> (in, out)
            elif leaf == "bias":
                coll, name = "params", "bias"
            else:
                raise KeyError(f"cannot place torch key {'.'.join(mod + (leaf,))}")
            node = variables[coll]
            for p in path:
                node = node.setdefault(p, {})
            node[name] = np.array(arr, order="C")  # (ascontiguousarray would make 0-d 1-d)
    return variables


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _torch_name(path: tuple) -> str:
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path)


def flax_to_torch(variables) -> "collections.OrderedDict":
    """flax_impl variables as a torch state_dict with torch_ref's / torchvision's keys."""
    import torch

    out = collections.OrderedDict()
    for coll in ("params", "batch_stats"):
        for path, value in _flatten(variables.get(coll, {})):  # params alone: e.g. gradients
            *mod, leaf = path
            arr = np.asarray(value)
            if coll == "batch_stats":
                name = _STATS_BACK[leaf]
                if name == "num_batches_tracked":
                    arr = arr.astype(np.int64)
            elif leaf == "kernel":
                name = "weight"
                arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
            elif leaf == "scale":
                name = "weight"
            else:
                name = leaf
            out[f"{_torch_name(tuple(mod))}.{name}"] = torch.from_numpy(np.array(arr, order="C"))
    return out


__all__ = ["torch_to_flax", "flax_to_torch"]


def read_orbax(step_dir) -> tuple[dict, dict]:
    """(meta, variables) of a flax_impl checkpoint step folder (RUN/checkpoints/best/1234):
    the run driver's record and {"params", "batch_stats"} as NumPy, without a template or
    any device (the saved sharding is not needed)."""
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
    variables = {k: jax.tree_util.tree_map(np.asarray, state[k]) for k in ("params", "batch_stats")}
    return meta, variables


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
