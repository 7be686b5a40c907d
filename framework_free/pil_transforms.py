"""ImageNet preprocessing with PIL and NumPy, matching torchvision's transforms pixel for pixel.

- `random_resized_crop_params` is torchvision's ``RandomResizedCrop.get_params`` algorithm (scale
  0.08-1, ratio 3/4-4/3, ten tries, then a central crop), drawing from a NumPy generator instead of
  torch's, so that it runs without torch and is seeded by (seed, epoch, step).
- `resized_crop`, `resize_short_side` and `center_crop` make the same PIL calls torchvision makes
  (``Image.crop`` then ``Image.resize(..., BILINEAR)``; torchvision's rounding of sizes and
  offsets), so given the same parameters the uint8 pixels are identical.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

BILINEAR = Image.BILINEAR


def random_resized_crop_params(rng: np.random.Generator, width: int, height: int,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop, as torchvision's RandomResizedCrop chooses it."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, top: int, left: int, h: int, w: int, size: int) -> Image.Image:
    """torchvision.transforms.functional.resized_crop on a PIL image (bilinear)."""
    return img.crop((left, top, left + w, top + h)).resize((size, size), BILINEAR)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) with an int: the short side becomes `size`, aspect kept."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop(size) for an image at least `size` on each side."""
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def load_image(path: str, channels: int = 3) -> Image.Image:
    with open(path, "rb") as fh:
        img = Image.open(fh)
        return img.convert("RGB" if channels == 3 else "L")


def train_image(img: Image.Image, rng: np.random.Generator, size: int, hflip: bool,
                channels: int = 3) -> np.ndarray:
    """RandomResizedCrop(size) + RandomHorizontalFlip as uint8 HWC."""
    img = img.convert("RGB" if channels == 3 else "L")
    top, left, h, w = random_resized_crop_params(rng, *img.size)
    out = np.asarray(resized_crop(img, top, left, h, w, size))
    if hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out.reshape(size, size, channels)


def eval_image(img: Image.Image, resize: int, size: int, channels: int = 3) -> np.ndarray:
    """Resize(resize) + CenterCrop(size) as uint8 HWC (resize 0: centre crop only)."""
    img = img.convert("RGB" if channels == 3 else "L")
    if resize:
        img = resize_short_side(img, resize)
    return np.asarray(center_crop(img, size)).reshape(size, size, channels)
