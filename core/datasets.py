"""Where each recipe's data lives, fetching CIFAR when allowed, and loading in-memory splits.

Shared by both stacks. Multi-process callers pass `broadcast` (rank 0's value on every rank) and
`is_main`, so that only one process downloads and all of them agree on the outcome.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

from core import readers
from core.errors import UserError
from core.recipe import Recipe

CIFAR_MD5 = {  # the official archives' checksums (as torchvision checks them)
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)  # the dataset's documented label order


def class_names(recipe: Recipe) -> list[str]:
    """The recipe's class names, in label order: Fashion-MNIST's ten, CIFAR's from the data's
    own meta file, ImageNet's class folder names. Exactly num_classes of them: "class k" where
    the data names none (a missing meta file, a TFDS source, fewer folders than classes)."""
    names: list[str] = []
    try:
        if recipe.dataset == "fashion_mnist":
            names = list(FASHION_MNIST_CLASSES)
        elif recipe.dataset in readers.CIFAR_LAYOUT and recipe.data_source == "files":
            names = readers.read_cifar_names(recipe.dataset, resolve_data_dir(recipe))
        elif recipe.dataset == "imagenet":
            train = resolve_data_dir(recipe) / "train"
            names = sorted(d.name for d in train.iterdir() if d.is_dir())
    except (OSError, UserError):
        names = []
    names = [str(n) for n in names[: recipe.num_classes]]
    return names + [f"class {k}" for k in range(len(names), recipe.num_classes)]


def resolve_data_dir(recipe: Recipe) -> Path:
    """The recipe's data folder, or the dataset's default when data_dir is empty."""
    if recipe.data_dir:
        return Path(recipe.data_dir).expanduser()
    if recipe.dataset == "fashion_mnist":
        return Path(readers.FASHION_MNIST_SYSTEM_DIR)
    if recipe.dataset == "imagenet":
        raise UserError(
            "ImageNet has no default location: pass --data-dir with the folder that "
            "holds train/<class>/*.JPEG and val/<class>/*.JPEG"
        )
    return Path("data")


def download_cifar(dataset: str, root: Path, timeout: float = 60.0) -> str | None:
    """Fetch and extract the official CIFAR python archive into `root`.

    Returns None on success or the reason it failed. Nothing is left behind on failure: the
    archive goes to a temporary file, is checked against its md5 and extracted only then, and a
    `root` folder this call created is removed again if it stays empty.
    """
    url = readers.CIFAR_ARCHIVE[dataset]
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, suffix=".tar.gz.part") as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
            tmp.flush()
            tmp.seek(0)
            digest = hashlib.md5(tmp.read()).hexdigest()
            if digest != CIFAR_MD5[dataset]:
                return f"the download from {url} has md5 {digest}, expected {CIFAR_MD5[dataset]}"
            tmp.seek(0)
            with tarfile.open(fileobj=tmp, mode="r:gz") as tar:
                tar.extractall(root, filter="data")
        return None
    except Exception as err:  # no network, a proxy page, a bad archive: all mean "not here"
        return f"{type(err).__name__}: {err}"
    finally:
        if created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def ensure_present(recipe: Recipe, broadcast: Callable = lambda x: x, is_main: bool = True) -> Path:
    """Check the recipe's data is on disk, downloading CIFAR on the main process when allowed."""
    root = resolve_data_dir(recipe)
    if recipe.dataset == "fashion_mnist":
        if not readers.fashion_mnist_present(root):
            raise UserError(
                f"Fashion-MNIST not found in {root}: install Debian's dataset-fashion-mnist "
                f"(apt-get install dataset-fashion-mnist, files in "
                f"{readers.FASHION_MNIST_SYSTEM_DIR}) or pass --data-dir with the folder of its "
                "four IDX files"
            )
        return root
    if recipe.dataset == "imagenet":
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(
                    f"no {split}/ folder in {root}: --data-dir must hold "
                    "train/<class>/*.JPEG and val/<class>/*.JPEG"
                )
        return root
    if readers.cifar_present(recipe.dataset, root):
        return root
    reason = "download=false"
    if recipe.download:
        reason = download_cifar(recipe.dataset, root) if is_main else None
        reason = broadcast(reason)
    if reason is None and readers.cifar_present(recipe.dataset, root):
        return root
    url = readers.CIFAR_ARCHIVE[recipe.dataset]
    raise UserError(
        f"{recipe.dataset} is not in {readers.cifar_folder(recipe.dataset, root).absolute()} and "
        f"could not be downloaded ({reason}); download {url}, extract it into {root.absolute()} "
        "(or pass --data-dir with the folder that holds the extracted archive)"
    )


def load_split(recipe: Recipe, root: Path, train: bool) -> readers.ArraySplit:
    """An in-memory split (CIFAR or Fashion-MNIST), checked against the recipe, cut to its
    subset."""
    if recipe.dataset == "fashion_mnist":
        split = readers.read_fashion_mnist(root, train)
    elif recipe.dataset in readers.CIFAR_LAYOUT:
        split = readers.read_cifar(recipe.dataset, root, train)
    else:
        raise ValueError(f"{recipe.dataset} is not an in-memory dataset")
    check_split(recipe, split)
    return split.head(recipe.train_subset if train else recipe.eval_subset)


def check_split(recipe: Recipe, split: readers.ArraySplit) -> None:
    h, w, c = split.images.shape[1:]
    if c != recipe.in_channels:
        raise UserError(
            f"{recipe.dataset} images have {c} channel(s) but in_channels="
            f"{recipe.in_channels}; set in_channels={c}"
        )
    if split.num_classes > recipe.num_classes:
        raise UserError(
            f"{recipe.dataset} has {split.num_classes} classes but num_classes="
            f"{recipe.num_classes}; set num_classes={split.num_classes}"
        )
    if h != recipe.image_size:
        raise UserError(
            f"{recipe.dataset} images are {h} pixels, image_size="
            f"{recipe.image_size}; set image_size={h}"
        )


def imagenet_listing(recipe: Recipe, root: Path, train: bool):
    """(paths, labels) of an ImageFolder split, a seeded sample of it when the recipe subsets."""
    import numpy as np

    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if len(classes) > recipe.num_classes:
        raise UserError(
            f"{root / 'train'} has {len(classes)} class folders but num_classes="
            f"{recipe.num_classes}; set num_classes={len(classes)}"
        )
    paths, labels, _ = readers.list_image_folder(root / ("train" if train else "val"), classes)
    keep = recipe.train_subset if train else recipe.eval_subset
    if keep and keep < len(paths):
        # the listing is sorted by class: a head would hold the first classes only
        pick = np.sort(np.random.default_rng(recipe.seed).permutation(len(paths))[:keep])
        paths, labels = [paths[i] for i in pick], labels[pick]
    return paths, labels
