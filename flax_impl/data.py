"""Batches for flax_impl, from the same readers, order and augmentation draws as torch_ref.

Each batch is a dict of NumPy arrays holding this process's rows of one global batch, padded to a
fixed size with ``mask`` 0 (see `flax_impl.steps`):

- in-memory sets (CIFAR, Fashion-MNIST, or a TFDS set loaded whole): the images sit on the devices
  (`source`) and a batch carries row indices plus crop/flip/jitter draws; the gather and the
  augmentation run inside the jitted step.
- ImageNet folders: threads decode JPEGs with PIL and crop them exactly as torchvision would
  (`core.pil_transforms`); batches carry uint8 images, and the colour jitter and
  normalisation run inside the jitted step.

Training order and every augmentation draw come from the data plan
(`core.sampling.TrainPlan`), keyed by (seed, epoch, step): a resumed run sees the same
batches whatever the number of decoding threads, and torch_ref on the same seed sees the same
ones too.
"""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np

from core import datasets, pil_transforms, readers, sampling, trivial_augment
from core.prefetch import Prefetch
from core.errors import UserError
from core.recipe import Recipe

TFDS_NAMES = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "fashion_mnist": "fashion_mnist",
    "imagenet": "imagenet2012",
}


def _pad(array: np.ndarray, rows: int) -> np.ndarray:
    if len(array) == rows:
        return array
    pad = np.zeros((rows - len(array),) + array.shape[1:], array.dtype)
    return np.concatenate([array, pad])


class _Rows:
    """Which rows of each global batch this process feeds (all of them on one process).

    A batch is padded to the global batch size, or, when the data has fewer examples than
    that, to the number of examples rounded up to a multiple of `multiple` (the devices the
    batch splits over): a batch larger than the set is the set, as in torch_ref."""

    def __init__(
        self,
        global_batch: int,
        process_index: int,
        process_count: int,
        num_examples: int | None = None,
        multiple: int = 1,
    ):
        if global_batch % process_count:
            raise UserError(
                f"the global batch of {global_batch} does not split over "
                f"{process_count} processes; change batch_size"
            )
        rows = global_batch
        if num_examples is not None and num_examples < global_batch:
            m = math.lcm(multiple, process_count)
            rows = min(global_batch, max(1, -(-num_examples // m)) * m)
        self.per_process = rows // process_count
        self.start = process_index * self.per_process

    def take(self, values: np.ndarray) -> np.ndarray:
        """This process's rows of a (possibly short) global-batch array, padded to full size."""
        return _pad(values[self.start : self.start + self.per_process], self.per_process)

    def mask(self, n_real: int) -> np.ndarray:
        idx = np.arange(self.start, self.start + self.per_process)
        return (idx < n_real).astype(np.float32)


class InMemoryTrain:
    """Training batches over an in-memory split whose arrays the trainer puts on the devices."""

    def __init__(
        self,
        split: readers.ArraySplit,
        recipe: Recipe,
        global_batch: int,
        process_index: int = 0,
        process_count: int = 1,
        mix_groups: int = 1,
        pad_multiple: int = 1,
    ):
        self.recipe, self.global_batch = recipe, global_batch
        self.arrays = (split.images, split.labels.astype(np.int32))
        self.arrays_labels = self.arrays[1]
        self.num_examples = len(split)
        self.rows = _Rows(
            global_batch, process_index, process_count, self.num_examples, pad_multiple
        )
        self.plan = sampling.TrainPlan(
            recipe, self.num_examples, global_batch, mix_groups=mix_groups, deal=process_count
        )
        self.steps = self.plan.steps
        self.jitter = any(recipe.color_jitter)
        if recipe.trivial_augment:
            # TrivialAugment runs on the host, per image, after the crop and flip (core): the
            # batches carry their images, and only the test split is held on the devices
            self.images, self.arrays = split.images, None

    def batch(self, sp: sampling.StepPlan) -> dict:
        p, rows = sp.params, self.rows
        if sp.trivial is not None:
            part = slice(rows.start, rows.start + rows.per_process)
            images = trivial_augment.augment_rows(
                self.images[sp.slice.global_indices[part]],
                self.recipe.crop_padding,
                p.crop_y[part],
                p.crop_x[part],
                p.flip[part],
                sp.trivial[part],
            )
            batch = {
                "images": _pad(images, rows.per_process),
                "labels": rows.take(self.arrays_labels[sp.slice.global_indices]),
                "mask": rows.mask(sp.slice.global_size),
            }
        else:
            batch = {
                "index": rows.take(sp.slice.global_indices.astype(np.int32)),
                "mask": rows.mask(sp.slice.global_size),
                "crop_y": rows.take(p.crop_y.astype(np.int32)),
                "crop_x": rows.take(p.crop_x.astype(np.int32)),
                "flip": rows.take(p.flip),
            }
        if self.jitter:
            batch["jitter"] = self.rows.take(p.jitter)
            batch["jitter_order"] = self.rows.take(p.jitter_order.astype(np.int32))
        if sp.regularisers is not None:
            batch.update(regulariser_rows(self.rows, sp.regularisers))
        return batch

    def epoch(self, epoch: int, start_step: int = 0):
        batches = (self.batch(sp) for sp in self.plan.epoch(epoch, start_step))
        # TrivialAugment's host work for the next batches runs while this one trains
        return batches if self.arrays is not None else iter(Prefetch(batches))


class InMemoryEval:
    """Exact eval: the test split in order, the last batch padded and masked."""

    def __init__(
        self,
        split: readers.ArraySplit,
        recipe: Recipe,
        global_batch: int,
        process_index: int = 0,
        process_count: int = 1,
        pad_multiple: int = 1,
    ):
        self.arrays = (split.images, split.labels.astype(np.int32))
        self.num_examples, self.global_batch = len(split), global_batch
        self.rows = _Rows(
            global_batch, process_index, process_count, self.num_examples, pad_multiple
        )

    def __iter__(self):
        for start in range(0, self.num_examples, self.global_batch):
            idx = np.arange(
                start, min(start + self.global_batch, self.num_examples), dtype=np.int32
            )
            yield {"index": self.rows.take(idx), "mask": self.rows.mask(len(idx))}


class ImageFiles:
    """Images by index from an ImageFolder listing, decoded by `pil_transforms.open_image`: a
    file that does not decode, for whatever reason, is CorruptData with its path and reason."""

    def __init__(self, paths, labels, channels: int, max_pixels: int):
        self.paths, self.labels, self.channels = paths, labels.astype(np.int32), channels
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.paths)

    def image(self, i: int):
        try:
            return pil_transforms.open_image(self.paths[i], self.channels, self.max_pixels)
        except pil_transforms.BadImage as bad:
            raise bad.as_corrupt_data() from None


class _Images:
    """Images decoded by a pool of threads (PIL releases the GIL while it decodes and resizes)."""

    def __init__(
        self,
        images,
        recipe: Recipe,
        global_batch: int,
        process_index: int = 0,
        process_count: int = 1,
        pad_multiple: int = 1,
    ):
        self.images, self.labels = images, images.labels
        self.recipe, self.global_batch = recipe, global_batch
        self.num_examples = len(images)
        self.rows = _Rows(
            global_batch, process_index, process_count, self.num_examples, pad_multiple
        )
        self.process_count = process_count
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, recipe.num_workers))
        self.arrays = None  # nothing held on the devices: batches carry their images


class ImagesTrain(_Images):
    """ImageNet-style training batches: threads decode and crop images exactly as torchvision
    would (RandomResizedCrop + flip, `core.pil_transforms`) into uint8 batches, each
    image with its own generator from the plan, so the thread that does it does not matter."""

    def __init__(self, *args, mix_groups: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = sampling.TrainPlan(
            self.recipe,
            self.num_examples,
            self.global_batch,
            mix_groups=mix_groups,
            deal=self.process_count,
        )
        self.steps = self.plan.steps

    def _load(self, i: int, rng: np.random.Generator, trivial=None) -> np.ndarray:
        r = self.recipe
        out = pil_transforms.train_image(
            self.images.image(int(i)), rng, r.train_size, r.hflip, r.in_channels
        )
        return out if trivial is None else trivial_augment.apply(out, *trivial)

    def batch(self, sp: sampling.StepPlan) -> dict:
        r, rows, sl = self.recipe, self.rows, sp.slice
        positions = range(rows.start, min(rows.start + rows.per_process, sl.global_size))
        images = np.zeros((0, r.train_size, r.train_size, r.in_channels), np.uint8)
        if positions:  # a short last batch can leave a process no rows
            images = np.stack(
                list(
                    self.pool.map(
                        self._load,
                        sl.global_indices[rows.start :],
                        [sp.image_rng(k) for k in positions],
                        [None if sp.trivial is None else sp.trivial[k] for k in positions],
                    )
                )
            )
        batch = {
            "images": _pad(images, rows.per_process),
            "labels": rows.take(self.labels[sl.global_indices]),
            "mask": rows.mask(sl.global_size),
        }
        if any(r.color_jitter):
            batch["jitter"] = rows.take(sp.params.jitter)
            batch["jitter_order"] = rows.take(sp.params.jitter_order.astype(np.int32))
        if sp.regularisers is not None:
            batch.update(regulariser_rows(rows, sp.regularisers))
        return batch

    def epoch(self, epoch: int, start_step: int = 0):
        return Prefetch(self.batch(sp) for sp in self.plan.epoch(epoch, start_step))


class ImagesEval(_Images):
    """Resize + centre crop (torchvision's eval transform), every image once, padded batches."""

    def _load(self, i: int) -> np.ndarray:
        r = self.recipe
        return pil_transforms.eval_image(
            self.images.image(int(i)), r.eval_resize, r.eval_size, r.in_channels
        )

    def _batches(self):
        r = self.recipe
        for start in range(0, self.num_examples, self.global_batch):
            idx = np.arange(start, min(start + self.global_batch, self.num_examples))
            mine = idx[self.rows.start : self.rows.start + self.rows.per_process]
            shape = (0, r.eval_size, r.eval_size, r.in_channels)
            images = (
                np.stack(list(self.pool.map(self._load, mine)))
                if len(mine)
                else np.zeros(shape, np.uint8)
            )
            yield {
                "images": _pad(images, self.rows.per_process),
                "labels": self.rows.take(self.labels[idx]),
                "mask": self.rows.mask(len(idx)),
            }

    def __iter__(self):
        return iter(Prefetch(self._batches()))


def _tfds_split(recipe: Recipe, train: bool) -> readers.ArraySplit:
    """A whole TFDS split as arrays, read with `tfds.data_source` (array_record; no TensorFlow)."""
    from flax_impl import tfds_source

    return tfds_source.load_split(TFDS_NAMES[recipe.dataset], recipe.data_dir, train, recipe)


def load_in_memory(recipe: Recipe, train: bool) -> readers.ArraySplit:
    if recipe.data_source == "tfds":
        split = _tfds_split(recipe, train)
        datasets.check_split(recipe, split)
        return split.head(recipe.train_subset if train else recipe.eval_subset)
    root = datasets.ensure_present(recipe)
    return datasets.load_split(recipe, root, train)


def _imagenet_images(recipe: Recipe, train: bool):
    if recipe.data_source == "tfds":
        from flax_impl import tfds_source

        images = tfds_source.ImageSource(recipe.data_dir, train)
        images.labels = images.labels()
        subset = recipe.train_subset if train else recipe.eval_subset
        if subset and subset < len(images):
            raise UserError(
                "train_subset/eval_subset are not supported for imagenet2012 from "
                "TFDS; use ImageNet folders for subsets"
            )
        return images
    root = datasets.ensure_present(recipe)
    paths, labels = datasets.imagenet_listing(recipe, root, train)
    return ImageFiles(paths, labels, recipe.in_channels, recipe.max_image_pixels)


def build_train(
    recipe: Recipe,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    mix_groups: int = 1,
    pad_multiple: int = 1,
):
    """Training batches for a recipe; UserError when the data is not there. `mix_groups`: the
    data-parallel replicas whose shares MixUp/CutMix partners stay within (as torch_ref's DDP
    processes); `pad_multiple`: the devices a batch splits over."""
    where = dict(
        process_index=process_index,
        process_count=process_count,
        mix_groups=mix_groups,
        pad_multiple=pad_multiple,
    )
    if recipe.dataset == "imagenet":
        return ImagesTrain(_imagenet_images(recipe, True), recipe, global_batch, **where)
    return InMemoryTrain(load_in_memory(recipe, True), recipe, global_batch, **where)


def regulariser_rows(rows: "_Rows | None", d) -> dict:
    """The batch entries of a step's Cutout/MixUp/CutMix draws (core.regularisers):
    per row, so that the jitted step's arithmetic is row-wise (flax_impl.augment.regularise);
    `rows` picks this process's rows (None: the whole global batch). lam and 1 - lam stay the
    host's float64 numbers until the device casts them."""
    take = rows.take if rows is not None else (lambda a: a)
    n = len(d.partner)
    erase = {} if d.erase is None else {"erase": take(d.erase)}
    return erase | {
        "holes": take(d.holes),
        "partner": take(d.partner),
        "lam": take(np.full(n, d.lam)),
        "one_minus_lam": take(np.full(n, d.one_minus_lam)),
        "mix_kind": take(np.full(n, d.kind, np.int32)),
        "box": take(np.tile(d.box, (n, 1))),
    }


def build_eval(
    recipe: Recipe,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    pad_multiple: int = 1,
):
    """Test batches for a recipe, every image exactly once."""
    where = dict(
        process_index=process_index, process_count=process_count, pad_multiple=pad_multiple
    )
    if recipe.dataset == "imagenet":
        return ImagesEval(_imagenet_images(recipe, False), recipe, global_batch, **where)
    return InMemoryEval(load_in_memory(recipe, False), recipe, global_batch, **where)


__all__ = [
    "build_train",
    "build_eval",
    "InMemoryTrain",
    "InMemoryEval",
    "ImagesTrain",
    "ImagesEval",
    "ImageFiles",
]
