"""Readers of the on-disk formats, in NumPy only: CIFAR python pickles, IDX files, ImageFolder
trees.

Every reader returns images as uint8 arrays in NHWC order and labels as int64, checks what it read
(shapes, sizes, label ranges) and raises `UserError` with the file and the fix when something is
missing, truncated or corrupt.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from core.errors import UserError

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist

CIFAR_LAYOUT = {
    # dataset: (folder inside data_dir, train files, test file, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
}
CIFAR_ARCHIVE = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class ArraySplit:
    """One split held in memory: images uint8 (N, H, W, C), labels int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self):
        assert self.images.dtype == np.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.shape == (len(self.images),), (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> "ArraySplit":
        """The first n examples (n = 0 or n >= len: all of them)."""
        if n <= 0 or n >= len(self):
            return self
        return ArraySplit(self.images[:n], self.labels[:n], self.num_classes)


# --- CIFAR python pickles -------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickle only what CIFAR batches hold: dicts, lists, strings, bytes and NumPy arrays.

    A pickle can run arbitrary code; a downloaded file has no business asking for anything else.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _load_cifar_pickle(
    path: Path, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    fix = (
        f"delete {path.parent} and run again to download it afresh, or extract the official "
        "archive there"
    )
    try:
        with open(path, "rb") as fh:
            entry = _CifarUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"missing CIFAR file {path}; {fix}") from None
    except Exception as err:  # truncated or corrupt pickles raise many different types
        raise UserError(
            f"CIFAR file {path} is truncated or corrupt ({type(err).__name__}); {fix}"
        ) from None
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"CIFAR file {path} lacks 'data' or '{label_key}'; {fix}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(
            f"CIFAR file {path} holds data of shape {data.shape} with "
            f"{len(labels)} labels, expected (N, 3072) and N labels; {fix}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"CIFAR file {path} has labels outside 0..{num_classes - 1}; {fix}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NCHW rows -> NHWC
    return np.ascontiguousarray(images), labels


def cifar_folder(dataset: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / CIFAR_LAYOUT[dataset][0]


def read_cifar_names(dataset: str, data_dir: str | os.PathLike) -> list[str]:
    """The class names of the archive's meta file (label_names / fine_label_names); [] when
    the file is missing or unreadable (the names are only used to label pictures)."""
    meta, key = (
        ("batches.meta", "label_names") if dataset == "cifar10" else ("meta", "fine_label_names")
    )
    try:
        with open(cifar_folder(dataset, data_dir) / meta, "rb") as fh:
            entry = _CifarUnpickler(fh, encoding="latin1").load()
        return [str(n) for n in entry[key]]
    except Exception:  # missing, truncated, or not the expected dict: no names
        return []


def cifar_present(dataset: str, data_dir: str | os.PathLike) -> bool:
    folder, train_files, test_file, _, _ = CIFAR_LAYOUT[dataset]
    root = Path(data_dir) / folder
    return all((root / f).is_file() for f in train_files + [test_file])


def read_cifar(dataset: str, data_dir: str | os.PathLike, train: bool) -> ArraySplit:
    """CIFAR-10/100 from torchvision's on-disk layout (the extracted python archive)."""
    folder, train_files, test_file, label_key, num_classes = CIFAR_LAYOUT[dataset]
    root = Path(data_dir) / folder
    files = train_files if train else [test_file]
    parts = [_load_cifar_pickle(root / f, label_key, num_classes) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArraySplit(images, labels, num_classes)


def write_cifar(dataset: str, data_dir: str | os.PathLike, train: tuple, test: tuple) -> Path:
    """Write (images NHWC uint8, labels) pairs in the CIFAR python format (for tests and tools)."""
    folder, train_files, test_file, label_key, _ = CIFAR_LAYOUT[dataset]
    root = Path(data_dir) / folder
    root.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train[0])), len(train_files))
    for name, idx in zip(train_files, chunks):
        _write_cifar_pickle(root / name, train[0][idx], train[1][idx], label_key)
    _write_cifar_pickle(root / test_file, test[0], test[1], label_key)
    with open(root / ("batches.meta" if dataset == "cifar10" else "meta"), "wb") as fh:
        if dataset == "cifar10":
            meta = {"label_names": [f"class_{i}" for i in range(10)], "num_vis": 3072}
        else:
            meta = {
                "fine_label_names": [f"fine_{i}" for i in range(100)],
                "coarse_label_names": [f"coarse_{i}" for i in range(20)],
            }
        _Py2Pickler(fh, protocol=2).dump(meta)
    return root


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose opcodes can be chosen
    """Pickle as Python 2's cPickle wrote the CIFAR batches: byte strings for every str and bytes,
    and NumPy's globals under their old ``numpy.core`` names. Readers must load these files with
    ``encoding="latin1"`` exactly as they load the official archive."""

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy"):
            module = module.replace("numpy._core", "numpy.core")
            name = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[str] = save_str
    dispatch[bytes] = save_bytes


def _write_cifar_pickle(path: Path, images: np.ndarray, labels: np.ndarray, label_key: str):
    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
    entry = {
        "batch_label": path.name,
        "data": rows.astype(np.uint8),
        label_key: [int(v) for v in labels],
        "filenames": [f"{i}.png" for i in range(len(rows))],
    }
    if label_key == "fine_labels":
        entry["coarse_labels"] = [int(v) // 5 for v in labels]
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(entry)


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped when its name ends in .gz); only unsigned-byte data is expected."""
    path = Path(path)
    fix = "reinstall the data (e.g. apt-get install --reinstall dataset-fashion-mnist)"
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise UserError(f"missing IDX file {path}; {fix} or pass --data-dir") from None
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UserError(f"IDX file {path} is truncated or corrupt ({err}); {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number); {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"IDX file {path} has a truncated header; {fix}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise UserError(
            f"IDX file {path} holds {len(raw) - header} bytes of data, its header "
            f"promises {expected} for shape {shape}; {fix}"
        )
    # a writable copy: torch refuses to wrap read-only memory without a warning
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzipped when the name ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob += array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(blob)


FASHION_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):  # also torchvision's layout
        for name in (stem + ".gz", stem):
            if (sub / name).is_file():
                return sub / name
    return None


def fashion_mnist_present(data_dir: str | os.PathLike) -> bool:
    folder = Path(data_dir)
    return all(_find_idx(folder, s) for pair in FASHION_FILES.values() for s in pair)


def read_fashion_mnist(data_dir: str | os.PathLike, train: bool) -> ArraySplit:
    """Fashion-MNIST from a folder of IDX files (gzipped or not), as Zalando ships them."""
    folder = Path(data_dir)
    paths = [_find_idx(folder, stem) for stem in FASHION_FILES[train]]
    if None in paths:
        raise UserError(
            f"no Fashion-MNIST IDX files ({FASHION_FILES[train][0]}[.gz] and its labels) in "
            f"{folder}; install Debian's dataset-fashion-mnist (files in "
            f"{FASHION_MNIST_SYSTEM_DIR}) or pass --data-dir with the folder that holds them"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(
            f"Fashion-MNIST files in {folder} disagree: images {images.shape}, "
            f"labels {labels.shape}; reinstall the data"
        )
    if len(labels) and labels.max() >= 10:
        raise UserError(f"Fashion-MNIST labels in {paths[1]} exceed 9; reinstall the data")
    return ArraySplit(np.ascontiguousarray(images[..., None]), labels.astype(np.int64), 10)


# --- ImageFolder ----------------------------------------------------------------------------------


def list_image_folder(root: str | os.PathLike, classes: list[str] | None = None):
    """List an ImageFolder tree: root/<class>/<image>. Returns (paths, labels, classes).

    Classes are the sorted sub-folder names (torchvision's rule); pass `classes` to read a val/
    folder against the train/ classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"image folder {root} does not exist; pass --data-dir with a folder that "
            "holds train/<class>/*.JPEG and val/<class>/*.JPEG"
        )
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        extra = sorted(set(found) - set(classes))[:3]
        raise UserError(
            f"{root} has class folders that train/ lacks (e.g. {extra}); the two "
            "splits must share their class folders"
        )
    if not classes:
        raise UserError(
            f"image folder {root} has no class sub-folders; expected {root}/<class>/<image files>"
        )
    paths, labels = [], []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(index)
    if not paths:
        raise UserError(
            f"image folder {root} holds no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)"
        )
    return paths, np.asarray(labels, dtype=np.int64), classes


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images scaled to [0, 1] (how recipe stats are
    made)."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(x.mean(0).round(4).tolist()), tuple(x.std(0).round(4).tolist())


__all__ = [
    "ArraySplit",
    "read_cifar",
    "write_cifar",
    "cifar_present",
    "cifar_folder",
    "read_idx",
    "write_idx",
    "read_fashion_mnist",
    "fashion_mnist_present",
    "list_image_folder",
    "channel_stats",
    "FASHION_MNIST_SYSTEM_DIR",
    "CIFAR_ARCHIVE",
]
