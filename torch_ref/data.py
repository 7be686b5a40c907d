"""Data for torch_ref: the data plan's batches, loaded, decoded and placed with torch.

- ``pipeline="fast"`` (default for CIFAR and Fashion-MNIST): the whole split sits in memory as a
  uint8 tensor (on the GPU when there is one); each step gathers its examples and augments them as
  one batch with tensor ops (`torch_ref.augment`). No DataLoader, no PIL, no worker processes.
- ``pipeline="dataloader"``: seed 000/002's pipeline, a DataLoader whose workers run PIL
  transforms one image at a time; the only way for ImageNet folders. The workers apply the draws
  the plan hands them with each index, so the batches do not depend on the number of workers.
  CIFAR and Fashion-MNIST images are cropped, flipped, jittered and normalised in the workers,
  as the seeds do; ImageNet images are decoded and cropped there (RandomResizedCrop, exactly as
  flax_impl crops them) and jittered and normalised as a batch on the device.

Every step's examples and random draws come from `core.sampling.TrainPlan`, so both
pipelines and both stacks see the same examples at each step on one process or under DDP, a
resumed run continues exactly, and both evaluate every test image exactly once.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context as mp_context
import re
import signal
import weakref
from multiprocessing import popen_fork, popen_forkserver, popen_spawn_posix
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from core import datasets, pil_transforms, preemption, readers, sampling, trivial_augment
from core.prefetch import Prefetch
from core.datasets import load_split, resolve_data_dir
from core.errors import UserError, WorkerFailed
from core.recipe import Recipe
from torch_ref import augment
from torch_ref.distributed import Dist


def ensure_present(recipe: Recipe, dist: Dist) -> Path:
    """The recipe's data folder; rank 0 downloads CIFAR when allowed (core.datasets)."""
    if recipe.data_source != "files":
        raise UserError(
            "torch_ref reads data files only (data_source=files); TFDS sources are for flax_impl"
        )
    return datasets.ensure_present(recipe, dist.broadcast_object, dist.is_main)


# --- batches --------------------------------------------------------------------------------------
# What the trainer consumes: `steps` per epoch and ``epoch(e, start)`` yielding
# ``(x, targets, n_global)``: this process's inputs, their labels (`augment.Targets`: with the
# partners' labels and weights under MixUp/CutMix) and the size of the global batch they belong to
# (the loss is
# weighted by n_local * world / n_global so that DDP's gradient average equals the mean over the
# global batch even when shares differ by one). Eval batches are ``(x, y)``.


def _stats(recipe: Recipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(recipe.mean, dtype=torch.float32, device=device),
        torch.tensor(recipe.std, dtype=torch.float32, device=device),
    )


def _as_tensors(params: sampling.AugmentParams, device) -> sampling.AugmentParams:
    return sampling.AugmentParams(
        *(
            torch.from_numpy(np.asarray(v)).to(device, non_blocking=True)
            for v in (params.crop_y, params.crop_x, params.flip, params.jitter, params.jitter_order)
        )
    )


class InMemoryTrain:
    """The fast path: uint8 NHWC tensor on `device`, batched crop/flip/jitter per step."""

    def __init__(self, split: readers.ArraySplit, recipe: Recipe, device, dist: Dist):
        self.images = torch.from_numpy(split.images).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.recipe, self.device = recipe, device
        self.plan = sampling.TrainPlan(
            recipe, len(split), recipe.batch_size, dist.world_size, dist.rank
        )
        self.steps, self.num_examples = self.plan.steps, len(split)
        self.mean, self.std = _stats(recipe, device)
        self.jitter = any(recipe.color_jitter)
        # TrivialAugment runs on the host, per image, after the crop and flip (core)
        self.host_images = split.images if recipe.trivial_augment else None

    def batch(self, sp: sampling.StepPlan):
        r = self.recipe
        p = _as_tensors(sp.local_params, self.device)
        idx = torch.from_numpy(sp.slice.local_indices).to(self.device, non_blocking=True)
        if sp.trivial is None:
            raw = augment.crop_flip(self.images[idx], r.crop_padding, p.crop_y, p.crop_x, p.flip)
        else:
            lp = sp.local_params
            raw = trivial_augment.augment_rows(
                self.host_images[sp.slice.local_indices],
                r.crop_padding,
                lp.crop_y,
                lp.crop_x,
                lp.flip,
                sp.local_trivial,
            )
            raw = torch.from_numpy(raw).to(self.device, non_blocking=True)
        x = augment.to_float_normalized(raw, self.mean, self.std, r.channels_last, p, self.jitter)
        x, targets = augment.regularise(x, self.labels[idx], sp.local_regularisers)
        return x, targets, sp.slice.global_size

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        batches = (self.batch(sp) for sp in self.plan.epoch(epoch, start_step))
        if self.host_images is None:
            return batches
        # TrivialAugment's host work for the next batches runs while this one trains
        return iter(Prefetch(batches))


class InMemoryEval:
    """Exact eval on the in-memory test split: this process's contiguous shard, in order."""

    def __init__(self, split: readers.ArraySplit, recipe: Recipe, device, dist: Dist):
        start, stop = sampling.eval_shard(len(split), dist.world_size, dist.rank)
        self.images = torch.from_numpy(split.images[start:stop]).to(device)
        self.labels = torch.from_numpy(split.labels[start:stop]).to(device)
        self.recipe, self.num_examples = recipe, len(split)
        self.mean, self.std = _stats(recipe, device)

    def __iter__(self):
        bs = self.recipe.eval_batch_size
        for i in range(0, len(self.labels), bs):
            x = augment.to_float_normalized(
                self.images[i : i + bs], self.mean, self.std, self.recipe.channels_last
            )
            yield x, self.labels[i : i + bs]


# --- the DataLoader + PIL path --------------------------------------------------------------------


class Item(NamedTuple):
    """One training example as the plan hands it to a DataLoader worker: which image, and the
    draws that shape it (crop offsets, flip and colour jitter for in-memory sets; the step and
    position that seed an ImageNet image's RandomResizedCrop)."""

    index: int
    epoch: int
    step: int
    position: int  # in the global batch
    crop_y: int
    crop_x: int
    flip: bool
    jitter: tuple
    jitter_order: tuple
    trivial: tuple = ()  # TrivialAugment's (op, bin, sign), when the recipe has it


def pil_train_transform(img, item: Item, recipe: Recipe) -> torch.Tensor:
    """torchvision's RandomCrop(padding) + RandomHorizontalFlip (+ TrivialAugmentWide) +
    ColorJitter + ToTensor + Normalize on a PIL image, as the seeds compose them, with the
    plan's draws instead of torch's random numbers (the same functional calls torchvision's
    classes make)."""
    import torchvision.transforms.functional as TF

    if recipe.crop_padding:
        img = TF.crop(
            TF.pad(img, recipe.crop_padding),
            item.crop_y,
            item.crop_x,
            recipe.image_size,
            recipe.image_size,
        )
    if item.flip:
        img = TF.hflip(img)
    if item.trivial:
        img = trivial_augment.apply_pil(img, *item.trivial)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for op in item.jitter_order:
        if recipe.color_jitter[op]:  # torchvision skips an adjustment of strength 0
            img = adjust[op](img, float(item.jitter[op]))
    return TF.normalize(TF.to_tensor(img), recipe.mean, recipe.std)


def pil_eval_transform(img, recipe: Recipe) -> torch.Tensor:
    import torchvision.transforms.functional as TF

    return TF.normalize(TF.to_tensor(img), recipe.mean, recipe.std)


class ArrayImages(torch.utils.data.Dataset):
    """An in-memory uint8 split served as PIL images, as torchvision's CIFAR10 class does; a
    training `Item` is transformed with its draws, a plain index (eval) only normalised."""

    uint8_out = False  # yields normalised float CHW tensors

    def __init__(self, split: readers.ArraySplit, recipe: Recipe):
        self.images, self.labels, self.recipe = split.images, split.labels, recipe

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        from PIL import Image

        i = item.index if isinstance(item, Item) else item
        img = self.images[i]
        img = Image.fromarray(img[..., 0], mode="L") if img.shape[-1] == 1 else Image.fromarray(img)
        x = (
            pil_train_transform(img, item, self.recipe)
            if isinstance(item, Item)
            else pil_eval_transform(img, self.recipe)
        )
        return x, int(self.labels[i])


def collate(samples: list):
    """torch's default_collate, except that a batch holding an image that did not decode is
    that image's `pil_transforms.BadImage` (the first one), so the worker's reason reaches the
    trainer without an exception crossing from the worker process."""
    for s in samples:
        if isinstance(s, pil_transforms.BadImage):
            return s
    return torch.utils.data.default_collate(samples)


class FolderImages(torch.utils.data.Dataset):
    """An ImageFolder listing (core.readers.list_image_folder) decoded with PIL and
    cropped by `core.pil_transforms` (what flax_impl does): a training `Item` with
    RandomResizedCrop (+ flip) from the plan's per-image generator, a plain index with Resize +
    CenterCrop. Yields uint8 HWC; jitter and normalisation run batched on the device.

    A file that does not decode, for whatever reason PIL gives (or over `max_image_pixels`),
    comes back as its `BadImage` (see `collate`), and the trainer stops with the file and the
    reason in one line, between two steps.
    """

    uint8_out = True

    def __init__(self, paths: list[str], labels: np.ndarray, recipe: Recipe):
        self.paths, self.labels, self.recipe = paths, labels, recipe

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        r = self.recipe
        i = item.index if isinstance(item, Item) else item
        try:
            img = pil_transforms.open_image(self.paths[i], r.in_channels, r.max_image_pixels)
        except pil_transforms.BadImage as bad:
            return bad
        if isinstance(item, Item):
            rng = sampling.image_rng(r.seed, item.epoch, item.step, item.position)
            out = pil_transforms.train_image(img, rng, r.train_size, r.hflip, r.in_channels)
            if item.trivial:
                out = trivial_augment.apply(out, *item.trivial)
        else:
            out = pil_transforms.eval_image(img, r.eval_resize, r.eval_size, r.in_channels)
        return torch.from_numpy(np.array(out)), int(self.labels[i])  # a writable copy


class PlanSampler(torch.utils.data.Sampler):
    """Yields, for each step of an epoch, this process's `Item`s (the plan's order and draws).

    Replaces DistributedSampler + BatchSampler: `set_epoch` reshuffles as DistributedSampler's
    does; `start_step` resumes mid-epoch; nothing is padded, so no example is duplicated.
    """

    def __init__(self, plan: sampling.TrainPlan):
        self.plan, self.epoch_index, self.start = plan, 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.epoch_index, self.start = epoch, start_step

    def __len__(self):
        return self.plan.steps - self.start

    def __iter__(self):
        for sp in self.plan.epoch(self.epoch_index, self.start):
            p, sl = sp.params, sp.slice
            yield [
                Item(
                    int(sl.global_indices[k]),
                    sp.epoch,
                    sp.step,
                    k,
                    int(p.crop_y[k]),
                    int(p.crop_x[k]),
                    bool(p.flip[k]),
                    tuple(p.jitter[k].tolist()),
                    tuple(p.jitter_order[k].tolist()),
                    () if sp.trivial is None else tuple(sp.trivial[k].tolist()),
                )
                for k in range(sl.start, sl.stop)
            ]


# DataLoader workers ignore SIGTERM (preemption.quiet_worker), so ending one by force must be
# SIGKILL: torch's shutdown of a worker that does not stop by itself and multiprocessing's at
# exit (which calls Popen.terminate directly, and would otherwise wait on it forever) both call
# Popen.terminate. Every worker's Popen is remembered, to say how a dead one ended.
_WORKERS_STARTED: "weakref.WeakSet" = weakref.WeakSet()


class _KillOnTerminate:
    def terminate(self):
        self.kill()


class _ForkPopen(_KillOnTerminate, popen_fork.Popen):
    pass


class _SpawnPopen(_KillOnTerminate, popen_spawn_posix.Popen):
    pass


class _ForkServerPopen(_KillOnTerminate, popen_forkserver.Popen):
    pass


def _started(popen):
    _WORKERS_STARTED.add(popen)
    return popen


# module-level, so that spawn and forkserver can pickle them
class _ForkWorker(mp_context.ForkProcess):
    @staticmethod
    def _Popen(process_obj):
        return _started(_ForkPopen(process_obj))


class _SpawnWorker(mp_context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj):
        return _started(_SpawnPopen(process_obj))


class _ForkServerWorker(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _started(_ForkServerPopen(process_obj))


_WORKERS = {"fork": _ForkWorker, "spawn": _SpawnWorker, "forkserver": _ForkServerWorker}


def worker_context():
    """The platform's default multiprocessing context, with one change: ending a worker by
    force is SIGKILL (see above), since workers ignore SIGTERM."""
    method = multiprocessing.get_start_method()
    context = type(multiprocessing.get_context(method))()
    context.Process = _WORKERS[method]
    return context


def _no_sigchld_raise() -> None:
    """Keep torch's SIGCHLD handler out. It raises from a signal handler when a worker dies,
    wherever the main thread then is: inside an optimizer step or a checkpoint write, whose
    state it would leave half-done. Without it the DataLoader finds a dead worker while it
    waits for a batch (it checks every few seconds), which is between two steps, where
    `loader_batches` turns it into one line after a checkpoint of the last completed step."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True  # what torch sets once it installed its own


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _how_it_ended(message: str) -> str:
    """'pid 123, killed by SIGKILL' for the workers a torch message names, from their Popen."""
    named = re.search(r"pid(?:\(s\))? ([\d, ]+)", message)
    pids = {int(p) for p in re.findall(r"\d+", named.group(1))} if named else set()
    ended = []
    for popen in list(_WORKERS_STARTED):
        code = popen.returncode if popen.returncode is not None else popen.poll()
        if popen.pid in pids and code is not None:
            how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
            ended.append(f"pid {popen.pid}, {how}")
    return "; ".join(ended) or message.strip().rstrip(".")


def worker_failure(err: BaseException) -> WorkerFailed:
    """A DataLoader's error, raised in the main process for a worker, as one line."""
    text = str(err)
    if isinstance(err, RuntimeError) and text.startswith("DataLoader worker"):
        how = _how_it_ended(text)
        oom = (
            "; the kernel's out-of-memory killer sends SIGKILL when memory runs out: a "
            "resumed run may lower num_workers"
            if "SIGKILL" in how
            else ""
        )
        return WorkerFailed(f"a data-loading worker died ({how}){oom}; rerun the same command")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else type(err).__name__
    if not last.startswith(type(err).__name__):
        last = f"{type(err).__name__}: {last}"
    return WorkerFailed(
        f"a data-loading worker raised {last} (rerun with num_workers=0 to see "
        "its traceback in this process)"
    )


def loader_batches(loader, workers: int) -> Iterator:
    """The batches of a DataLoader, stopping between two of them with one line: an image that
    does not decode is CorruptData with its path and reason; a worker that died (killed, out
    of memory) or raised is WorkerFailed (with workers=0 an exception keeps its traceback:
    it is this process's own)."""
    it = None
    while True:
        try:
            if it is None:
                it = iter(loader)
            batch = next(it)
        except StopIteration:
            return
        except Exception as err:
            if workers == 0:
                raise
            raise worker_failure(err) from None
        if isinstance(batch, pil_transforms.BadImage):
            raise batch.as_corrupt_data()
        yield batch


class LoaderTrain:
    def __init__(self, dataset, recipe: Recipe, device, dist: Dist):
        self.plan = sampling.TrainPlan(
            recipe, len(dataset), recipe.batch_size, dist.world_size, dist.rank
        )
        self.sampler = PlanSampler(self.plan)
        self.steps, self.num_examples = self.plan.steps, len(dataset)
        self.recipe, self.device, self.dataset = recipe, device, dataset
        self.mean, self.std = _stats(recipe, device)
        workers = self.workers = recipe.num_workers
        if workers:
            _no_sigchld_raise()
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=torch.device(device).type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=preemption.quiet_worker,  # the trainer handles the job's signals
            multiprocessing_context=worker_context() if workers > 0 else None,
            generator=torch.Generator().manual_seed(recipe.seed),
        )  # leave torch's RNG alone

    def epoch(self, epoch: int, start_step: int = 0):
        r = self.recipe
        self.sampler.set_epoch(epoch, start_step)
        fmt = torch.channels_last if r.channels_last else torch.contiguous_format
        perm = sampling.epoch_order(self.num_examples, r.seed, epoch, r.repeated_augmentation)
        for step, (x, y) in enumerate(loader_batches(self.loader, self.workers), start=start_step):
            sp = self.plan.step(epoch, step, perm)
            x = x.to(self.device, non_blocking=True)
            if self.dataset.uint8_out:  # colour jitter and normalisation, batched
                x = augment.to_float_normalized(
                    x,
                    self.mean,
                    self.std,
                    r.channels_last,
                    _as_tensors(sp.local_params, self.device),
                    any(r.color_jitter),
                )
            x, targets = augment.regularise(
                x, y.to(self.device, non_blocking=True), sp.local_regularisers
            )
            yield x.contiguous(memory_format=fmt), targets, sp.slice.global_size


class LoaderEval:
    def __init__(self, dataset, recipe: Recipe, device, dist: Dist):
        start, stop = sampling.eval_shard(len(dataset), dist.world_size, dist.rank)
        self.num_examples, self.recipe, self.device, self.dataset = (
            len(dataset),
            recipe,
            device,
            dataset,
        )
        self.mean, self.std = _stats(recipe, device)
        if recipe.num_workers:
            _no_sigchld_raise()
        self.loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(start, stop)),
            collate_fn=collate,
            batch_size=recipe.eval_batch_size,
            shuffle=False,
            num_workers=recipe.num_workers,
            pin_memory=torch.device(device).type == "cuda",
            worker_init_fn=preemption.quiet_worker,
            multiprocessing_context=worker_context() if recipe.num_workers > 0 else None,
        )

    def __iter__(self):
        r = self.recipe
        fmt = torch.channels_last if r.channels_last else torch.contiguous_format
        for x, y in loader_batches(self.loader, r.num_workers):
            x = x.to(self.device, non_blocking=True)
            if self.dataset.uint8_out:
                x = augment.to_float_normalized(x, self.mean, self.std, r.channels_last)
            yield x.contiguous(memory_format=fmt), y.to(self.device, non_blocking=True)


def _dataset(recipe: Recipe, dist: Dist, train: bool):
    root = ensure_present(recipe, dist)
    if recipe.dataset == "imagenet":
        paths, labels = datasets.imagenet_listing(recipe, root, train)
        return FolderImages(paths, labels, recipe)
    split = load_split(recipe, root, train)
    return split if recipe.pipeline == "fast" else ArrayImages(split, recipe)


def build_train(recipe: Recipe, device, dist: Dist):
    """The training batches of a recipe; UserError when the data is not there."""
    data = _dataset(recipe, dist, train=True)
    if isinstance(data, readers.ArraySplit):
        return InMemoryTrain(data, recipe, device, dist)
    return LoaderTrain(data, recipe, device, dist)


def build_eval(recipe: Recipe, device, dist: Dist):
    """The test batches of a recipe, sharded so that every image is evaluated exactly once."""
    data = _dataset(recipe, dist, train=False)
    if isinstance(data, readers.ArraySplit):
        return InMemoryEval(data, recipe, device, dist)
    return LoaderEval(data, recipe, device, dist)


__all__ = [
    "build_train",
    "build_eval",
    "resolve_data_dir",
    "ensure_present",
    "load_split",
    "InMemoryTrain",
    "InMemoryEval",
    "LoaderTrain",
    "LoaderEval",
    "PlanSampler",
    "Item",
    "pil_train_transform",
]
