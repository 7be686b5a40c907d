"""Data for torch_ref: where it lives, how it is read, and the two ways batches are made.

- ``pipeline="fast"`` (default for CIFAR and Fashion-MNIST): the whole split sits in memory as a
  uint8 tensor (on the GPU when there is one); each step gathers its examples and augments them as
  one batch with tensor ops (`torch_ref.augment`). No DataLoader, no PIL, no worker processes.
- ``pipeline="dataloader"``: seed 000/002's pipeline, a DataLoader whose workers run torchvision's
  PIL transforms one image at a time; the only way for ImageNet folders.

Both take their order from `framework_free.sampling`, so both see the same examples at each step on
one process or under DDP, and both evaluate every test image exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from framework_free import datasets, readers, sampling
from framework_free.datasets import load_split, resolve_data_dir
from framework_free.errors import CorruptData, UserError
from framework_free.recipe import Recipe
from torch_ref import augment
from torch_ref.distributed import Dist

def ensure_present(recipe: Recipe, dist: Dist) -> Path:
    """The recipe's data folder; rank 0 downloads CIFAR when allowed (framework_free.datasets)."""
    if recipe.data_source != "files":
        raise UserError("torch_ref reads data files only (data_source=files); TFDS sources are "
                        "for flax_impl")
    return datasets.ensure_present(recipe, dist.broadcast_object, dist.is_main)


# --- batches ---------------------------------------------------------------------------------------


class Batches:
    """What the trainer consumes: `steps` per epoch and ``epoch(e, start)`` yielding batches.

    Each train batch is ``(x, y, n_global)``: this process's inputs and labels and the size of the
    global batch they belong to (the loss is weighted by n_local * world / n_global so that DDP's
    gradient average equals the mean over the global batch even when shares differ by one).
    """

    steps: int
    num_examples: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        raise NotImplementedError


def _stats(recipe: Recipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(recipe.mean, dtype=torch.float32, device=device),
            torch.tensor(recipe.std, dtype=torch.float32, device=device))


class InMemoryTrain(Batches):
    """The fast path: uint8 NHWC tensor on `device`, batched crop/flip/jitter per step."""

    def __init__(self, split: readers.ArraySplit, recipe: Recipe, device, dist: Dist):
        self.images = torch.from_numpy(split.images).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.recipe, self.device, self.dist = recipe, device, dist
        self.num_examples = len(split)
        self.global_batch = recipe.batch_size * dist.world_size
        self.steps = sampling.steps_in_epoch(self.num_examples, self.global_batch,
                                             recipe.drop_last, dist.world_size)
        self.mean, self.std = _stats(recipe, device)
        self.jitter = any(recipe.color_jitter)

    def batch(self, epoch: int, step: int, perm: np.ndarray):
        r = self.recipe
        sl = sampling.step_slice(perm, step, r.batch_size, self.dist.world_size, self.dist.rank)
        params = sampling.augment_params(r.seed, epoch, step, sl.global_size, r.crop_padding,
                                         r.hflip, r.color_jitter)[sl.start:sl.stop]
        dev = self.device
        idx = torch.from_numpy(sl.local_indices).to(dev, non_blocking=True)
        raw = augment.crop_flip(self.images[idx], r.crop_padding,
                                torch.from_numpy(params.crop_y).to(dev, non_blocking=True),
                                torch.from_numpy(params.crop_x).to(dev, non_blocking=True),
                                torch.from_numpy(params.flip).to(dev, non_blocking=True))
        x = augment.to_float_normalized(raw, self.mean, self.std, r.channels_last, params,
                                        self.jitter)
        return x, self.labels[idx], sl.global_size

    def epoch(self, epoch: int, start_step: int = 0):
        perm = sampling.epoch_permutation(self.num_examples, self.recipe.seed, epoch)
        for step in range(start_step, self.steps):
            yield self.batch(epoch, step, perm)


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
            x = augment.to_float_normalized(self.images[i:i + bs], self.mean, self.std,
                                            self.recipe.channels_last)
            yield x, self.labels[i:i + bs]


# --- the DataLoader + PIL path ----------------------------------------------------------------------


class ArrayImages(torch.utils.data.Dataset):
    """An in-memory uint8 split served as PIL images, as torchvision's CIFAR10 class does."""

    def __init__(self, split: readers.ArraySplit, transform):
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        img = self.images[i]
        img = Image.fromarray(img[..., 0], mode="L") if img.shape[-1] == 1 else Image.fromarray(img)
        return self.transform(img), int(self.labels[i])


class FolderImages(torch.utils.data.Dataset):
    """An ImageFolder listing (framework_free.readers.list_image_folder) decoded with PIL.

    A file that does not decode comes back as a blank image with label -(index + 1), so that no
    exception has to cross from a worker process; `check_labels` turns it into a CorruptData
    error naming the file, in the main process, between two steps.
    """

    def __init__(self, paths: list[str], labels: np.ndarray, transform, channels: int = 3,
                 size: int = 224):
        self.paths, self.labels, self.transform = paths, labels, transform
        self.mode = "RGB" if channels == 3 else "L"
        self.blank = torch.zeros(channels, size, size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with open(self.paths[i], "rb") as fh:
                img = Image.open(fh).convert(self.mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return self.blank, -(i + 1)
        return self.transform(img), int(self.labels[i])

    def check_labels(self, labels: torch.Tensor, indices=None) -> None:
        bad = labels[labels < 0]
        if len(bad):
            path = self.paths[-int(bad[0]) - 1]
            raise CorruptData(f"image file {path} is corrupt or not an image; remove or replace "
                              "it, then rerun the same command (a checkpoint of the last "
                              "completed step was written; the run resumes there)")


def pil_transforms(recipe: Recipe, train: bool):
    """torchvision transforms as the seeds write them (v1 API, PIL input)."""
    import torchvision.transforms as T

    steps = []
    if train:
        if recipe.random_resized_crop:
            steps.append(T.RandomResizedCrop(recipe.image_size))
        elif recipe.crop_padding:
            steps.append(T.RandomCrop(recipe.image_size, padding=recipe.crop_padding))
        if recipe.hflip:
            steps.append(T.RandomHorizontalFlip())
        if any(recipe.color_jitter):
            steps.append(T.ColorJitter(*recipe.color_jitter))
    elif recipe.eval_resize:
        steps += [T.Resize(recipe.eval_resize), T.CenterCrop(recipe.image_size)]
    steps += [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]
    return T.Compose(steps)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yields this process's indices for each step of an epoch (framework_free.sampling's order).

    Replaces DistributedSampler + BatchSampler: `set_epoch` reshuffles as DistributedSampler's does;
    `set_start` resumes mid-epoch; nothing is padded, so no example is duplicated.
    """

    def __init__(self, num_examples: int, recipe: Recipe, dist: Dist):
        self.n, self.recipe, self.dist = num_examples, recipe, dist
        self.steps = sampling.steps_in_epoch(num_examples, recipe.batch_size * dist.world_size,
                                             recipe.drop_last, dist.world_size)
        self.epoch_index, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.epoch_index, self.start = epoch, start_step

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        perm = sampling.epoch_permutation(self.n, self.recipe.seed, self.epoch_index)
        for step in range(self.start, self.steps):
            sl = sampling.step_slice(perm, step, self.recipe.batch_size, self.dist.world_size,
                                     self.dist.rank)
            yield [int(i) for i in sl.local_indices]

    def global_size(self, step: int) -> int:
        g = self.recipe.batch_size * self.dist.world_size
        return min(g, self.n - step * g)


class LoaderTrain(Batches):
    def __init__(self, dataset, recipe: Recipe, device, dist: Dist):
        self.sampler = ShardedBatchSampler(len(dataset), recipe, dist)
        self.steps, self.num_examples = self.sampler.steps, len(dataset)
        self.recipe, self.device = recipe, device
        workers = recipe.num_workers
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(recipe.seed))

    def epoch(self, epoch: int, start_step: int = 0):
        self.sampler.set_epoch(epoch, start_step)
        fmt = torch.channels_last if self.recipe.channels_last else torch.contiguous_format
        check = getattr(self.loader.dataset, "check_labels", None)
        for step, (x, y) in enumerate(self.loader, start=start_step):
            if check is not None:
                check(y)  # on the CPU labels: no device sync
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
            yield x, y.to(self.device, non_blocking=True), self.sampler.global_size(step)


class LoaderEval:
    def __init__(self, dataset, recipe: Recipe, device, dist: Dist):
        start, stop = sampling.eval_shard(len(dataset), dist.world_size, dist.rank)
        self.num_examples, self.recipe, self.device = len(dataset), recipe, device
        self.loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(start, stop)),
            batch_size=recipe.eval_batch_size, shuffle=False, num_workers=recipe.num_workers,
            pin_memory=torch.device(device).type == "cuda")

    def __iter__(self):
        fmt = torch.channels_last if self.recipe.channels_last else torch.contiguous_format
        dataset = self.loader.dataset.dataset  # the Subset's underlying data set
        check = getattr(dataset, "check_labels", None)
        for x, y in self.loader:
            if check is not None:
                check(y)
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                   y.to(self.device, non_blocking=True))


def _imagenet_listing(recipe: Recipe, root: Path, train: bool) -> "FolderImages":
    paths, labels = datasets.imagenet_listing(recipe, root, train)
    return FolderImages(paths, labels, pil_transforms(recipe, train), recipe.in_channels,
                        recipe.image_size)


def build_train(recipe: Recipe, device, dist: Dist) -> Batches:
    """The training batches of a recipe; UserError when the data is not there."""
    root = ensure_present(recipe, dist)
    if recipe.dataset == "imagenet":
        return LoaderTrain(_imagenet_listing(recipe, root, True), recipe, device, dist)
    split = load_split(recipe, root, train=True)
    if recipe.pipeline == "fast":
        return InMemoryTrain(split, recipe, device, dist)
    return LoaderTrain(ArrayImages(split, pil_transforms(recipe, True)), recipe, device, dist)


def build_eval(recipe: Recipe, device, dist: Dist):
    """The test batches of a recipe, sharded so that every image is evaluated exactly once."""
    root = ensure_present(recipe, dist)
    if recipe.dataset == "imagenet":
        return LoaderEval(_imagenet_listing(recipe, root, False), recipe, device, dist)
    split = load_split(recipe, root, train=False)
    if recipe.pipeline == "fast":
        return InMemoryEval(split, recipe, device, dist)
    return LoaderEval(ArrayImages(split, pil_transforms(recipe, False)), recipe, device, dist)


__all__ = ["build_train", "build_eval", "resolve_data_dir", "ensure_present", "load_split",
           "InMemoryTrain", "InMemoryEval", "LoaderTrain", "LoaderEval", "pil_transforms",
           "ShardedBatchSampler"]
