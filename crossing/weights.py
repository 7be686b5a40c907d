"""Weights both ways between torch (torch_ref or torchvision state_dicts) and flax_impl variables,
in NumPy: no framework is imported (but `torch_state_dict`, which makes torch tensors).

    torch_to_flax(state_dict) -> {"params": ..., "batch_stats": ...}   (NumPy arrays)
    flax_to_torch(variables) -> state_dict                              (NumPy arrays)

Names: torch's ``layer2.0.downsample.1.running_var`` is Flax's
``batch_stats/layer2_0/downsample_1/var``. Layouts: convolution weights OIHW <-> HWIO kernels,
linear weights (out, in) <-> (in, out) kernels; BatchNorm ``weight``/``bias`` <->
``scale``/``bias``, ``running_mean``/``running_var`` <-> ``mean``/``var``, and
``num_batches_tracked`` is carried as an int32 counter. Only transposes and copies: the round
trip is bit-exact, in float32 and float64. A state_dict of torch tensors is read without
importing torch.
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


def flax_to_torch(variables) -> "collections.OrderedDict[str, np.ndarray]":
    """flax_impl variables as a torch state_dict with torch_ref's / torchvision's keys, as NumPy
    arrays (`torch_state_dict` makes them tensors)."""
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
            out[f"{_torch_name(tuple(mod))}.{name}"] = np.array(arr, order="C")
    return out


def torch_state_dict(variables) -> "collections.OrderedDict":
    """`flax_to_torch` as torch tensors, ready for `load_state_dict` (torch imported here)."""
    import torch

    return collections.OrderedDict(
        (k, torch.from_numpy(v)) for k, v in flax_to_torch(variables).items()
    )
