"""TFDS as a data source for flax_impl, without TensorFlow.

A TFDS data set prepared in the ``array_record`` format is read with `tfds.data_source`, which
decodes images with PIL and never imports TensorFlow (tensorflow imported before torch crashes a
process here, so it stays out of every default path). Reading is random access:

- in-memory sets (`cifar10`, `cifar100`, `fashion_mnist`) are loaded whole into an `ArraySplit`;
- `imagenet2012` is served image by image to the same PIL pipeline as ImageNet folders.

`prepare` writes a TFDS data set from arrays or encoded images in the real format (the official
builder's name, version, features and array_record shards; images encoded with PIL), which the
official builder then reads. The tests use it; it also turns Debian's Fashion-MNIST files into
``fashion_mnist`` for TFDS without a download.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from core import readers
from core.errors import CorruptData, UserError

SPLITS = {True: "train", False: "test"}
IMAGENET_SPLITS = {True: "train", False: "validation"}


def _data_dir(data_dir: str) -> str | None:
    return str(Path(data_dir).expanduser()) if data_dir else None


def open_source(name: str, data_dir: str, split: str):
    import tensorflow_datasets as tfds

    where = data_dir or "TFDS's default folder (~/tensorflow_datasets)"
    try:
        return tfds.data_source(name, data_dir=_data_dir(data_dir), split=split, download=False)
    except Exception as err:  # DatasetNotFoundError, missing array_record shards, bad info
        raise UserError(
            f"TFDS data set {name} (split {split}) is not prepared in the array_record format in "
            f"{where} ({type(err).__name__}); prepare it with `tfds build {name} "
            f"--file_format=array_record --data_dir DIR` (needs TensorFlow), or use "
            "data_source=files"
        ) from None


def load_split(name: str, data_dir: str, train: bool, recipe) -> readers.ArraySplit:
    """A whole split of a small TFDS image data set as uint8 NHWC arrays."""
    src = open_source(name, data_dir, SPLITS[train])
    subset = recipe.train_subset if train else recipe.eval_subset
    keep = min(len(src), subset) if subset else len(src)  # decode only what the run uses
    first = src[0]
    images = np.empty((keep,) + first["image"].shape, np.uint8)
    labels = np.empty(keep, np.int64)
    for i in range(keep):
        example = src[i]
        images[i], labels[i] = example["image"], example["label"]
    classes = int(src.dataset_info.features["label"].num_classes)
    return readers.ArraySplit(images, labels, classes)


class ImageSource:
    """imagenet2012 from TFDS, one decoded image at a time (for the PIL pipeline)."""

    def __init__(self, data_dir: str, train: bool):
        self.split, self.where = IMAGENET_SPLITS[train], data_dir or "~/tensorflow_datasets"
        self.src = open_source("imagenet2012", data_dir, self.split)

    def __len__(self) -> int:
        return len(self.src)

    def _record(self, i: int) -> dict:
        """Record i, decoded by TFDS (with PIL); any failure is CorruptData naming it."""
        try:
            return self.src[i]
        except Exception as err:  # whatever the decoder raises: a truncated JPEG, a bomb, ...
            raise CorruptData(
                f"record {i} of imagenet2012's {self.split} split in {self.where} does not "
                f"decode ({type(err).__name__}: {' '.join(str(err).split())[:160]}); prepare "
                "the data set again from good files and rerun the same command"
            ) from None

    def labels(self) -> np.ndarray:
        return np.asarray([self._record(i)["label"] for i in range(len(self.src))], np.int64)

    def image(self, i: int):
        from PIL import Image

        return Image.fromarray(self._record(i)["image"])


def _encode(image, fmt: str) -> bytes:
    from PIL import Image

    if isinstance(image, bytes):
        return image
    arr = np.asarray(image)
    pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format=fmt)
    return buf.getvalue()


def prepare(name: str, data_dir: str | Path, splits: dict) -> Path:
    """Write TFDS data set `name` (cifar10, cifar100, fashion_mnist, imagenet2012) into
    `data_dir` in the array_record format, from ``{split: (images, labels)}`` where images are
    uint8 HWC arrays (encoded as PNG) or already-encoded bytes (kept as they are)."""
    import tensorflow_datasets as tfds

    official = type(tfds.builder(name, data_dir=str(data_dir)))
    feature_names = set(official(data_dir=str(data_dir)).info.features.keys())
    fmt = "JPEG" if name == "imagenet2012" else "PNG"

    def examples(split, images, labels):
        for i, (img, label) in enumerate(zip(images, labels)):
            ex = {"image": _encode(img, fmt), "label": int(label)}
            if "id" in feature_names:
                ex["id"] = f"{split}_{i:05d}"
            if "coarse_label" in feature_names:
                ex["coarse_label"] = int(label) // 5
            if "file_name" in feature_names:
                ex["file_name"] = f"{split}_{i:05d}.JPEG"
            yield i, ex

    class Local(official, skip_registration=True):
        def _split_generators(self, dl_manager):
            return {split: examples(split, *arrays) for split, arrays in splits.items()}

    Local.name = official.name
    builder = Local(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    return Path(builder.data_dir)
