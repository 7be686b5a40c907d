"""Small data sets written in the real on-disk formats, for tests and benchmarks.

Images carry a class-dependent pattern plus noise, so a model can learn them a little, but they
are for exercising pipelines, not for claims about accuracy (those use real Fashion-MNIST).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from core import readers


def patterned_images(n: int, size: int, channels: int, num_classes: int, seed: int = 0):
    """(images uint8 NHWC, labels int64): a per-class intensity gradient plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((n, size, size, channels), np.uint8)
    # In chunks: float64 temporaries of a whole 50,000-image set would take ~5 GiB. The noise is
    # drawn in the same order as one big draw, so the images do not depend on the chunk size.
    chunk = 4096
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        angle = 2 * np.pi * labels[start:stop, None, None] / num_classes
        base = 0.5 + 0.35 * np.sin(angle + 3 * (xx * np.cos(angle) + yy * np.sin(angle)))
        noise = rng.normal(0, 0.12, (stop - start, size, size, channels))
        img = np.clip(base[..., None] + noise, 0, 1)
        out[start:stop] = (img * 255).round()
    return out, labels.astype(np.int64)


def write_fashion_mnist(
    folder: str | Path, n_train: int = 256, n_test: int = 128, gz: bool = True, seed: int = 0
) -> Path:
    """A Fashion-MNIST-shaped set: four IDX files, 28x28 grey images, 10 classes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for train, n, s in ((True, n_train, seed), (False, n_test, seed + 1)):
        images, labels = patterned_images(n, 28, 1, 10, s)
        img_name, lab_name = readers.FASHION_FILES[train]
        readers.write_idx(folder / (img_name + suffix), images[..., 0])
        readers.write_idx(folder / (lab_name + suffix), labels.astype(np.uint8))
    return folder


def write_cifar(
    folder: str | Path,
    dataset: str = "cifar10",
    n_train: int = 250,
    n_test: int = 100,
    seed: int = 0,
) -> Path:
    """A CIFAR-shaped set in the python-pickle layout torchvision extracts."""
    classes = 10 if dataset == "cifar10" else 100
    train = patterned_images(n_train, 32, 3, classes, seed)
    test = patterned_images(n_test, 32, 3, classes, seed + 1)
    readers.write_cifar(dataset, folder, train, test)
    return Path(folder)


def write_image_folder(
    folder: str | Path,
    classes: int = 3,
    per_class: tuple[int, int] = (4, 2),
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
) -> Path:
    """train/<class>/*.JPEG and val/<class>/*.JPEG, ImageNet's layout, as real JPEG files."""
    from PIL import Image

    folder = Path(folder)
    for split, count in zip(("train", "val"), per_class):
        images, _ = patterned_images(classes * count, max(size), 3, classes, seed)
        for c in range(classes):
            d = folder / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                arr = images[c * count + i][: size[1], : size[0]]
                Image.fromarray(arr).save(d / f"img_{c}_{i}.JPEG", quality=90)
        seed += 1
    return folder


def png_bytes(width: int, height: int, pixels: np.ndarray | None = None) -> bytes:
    """A PNG file written by hand: 8-bit RGB header only when `pixels` is None (no pixel data:
    a decompression bomb's header of any claimed size in 57 bytes; 16000 x 12000 is past PIL's
    limit), else `pixels` (uint8 or uint16, H x W x 3) as 8- or 16-bit RGB, which PIL itself
    cannot write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    depth = 8 if pixels is None or pixels.dtype == np.uint8 else 16
    body = b""
    if pixels is not None:
        rows = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1)
        body = chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + r.tobytes() for r in rows)))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IEND", b"")


def sideways_jpeg(path: str | Path, upright: np.ndarray, quality: int = 95) -> None:
    """`upright` (uint8 HW or HWC) stored as a phone stores a photo taken sideways: the pixels
    turned 90 degrees counter-clockwise, with EXIF orientation 6 ("turn 90 degrees clockwise
    to show") saying how to turn them back."""
    from PIL import Image

    img = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored rows are the picture's columns, right to left
    img.save(path, quality=quality, exif=exif)


def tensorboard_scalars(workdir: str | Path, skip: tuple[str, ...] = ("Throughput/", "Time/")):
    """{tag: [(step, value), ...]} of a run's TensorBoard files as TensorBoard reads them, every
    step in order; tags starting with `skip` (wall-clock measurements) left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(workdir) / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {
        tag: [(e.step, e.value) for e in ea.Scalars(tag)]
        for tag in sorted(ea.Tags()["scalars"])
        if not tag.startswith(skip)
    }
