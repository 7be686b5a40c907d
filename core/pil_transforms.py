"""ImageNet preprocessing with PIL and NumPy, matching torchvision's transforms pixel for pixel.

- `random_resized_crop_params` is torchvision's ``RandomResizedCrop.get_params`` algorithm (scale
  0.08-1, ratio 3/4-4/3, ten tries, then a central crop), drawing from a NumPy generator instead of
  torch's, so that it runs without torch and is seeded by (seed, epoch, step).
- `resized_crop`, `resize_short_side` and `center_crop` make the same PIL calls torchvision makes
  (``Image.crop`` then ``Image.resize(..., BILINEAR)``; torchvision's rounding of sizes and
  offsets), so given the same parameters the uint8 pixels are identical.
- `open_image` is the one decoder of image files, for training folders, predict and the demo:
  any failure, for any reason PIL gives, is a `BadImage` with a one-line reason; images over a
  pixel limit are refused before they are decoded; 16-bit and float images are scaled to 8 bits.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import CorruptData
from core.recipe import PIL_PIXEL_LIMIT  # the default limit: where PIL's own lies

BILINEAR = Image.BILINEAR
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def random_resized_crop_params(
    rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
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


class BadImage(Exception):
    """An image file that does not decode. `reason` is one line; `too_large`: it was refused
    for its pixel count (the caller names the setting that raises the limit)."""

    def __init__(self, path: str, reason: str, pixels: int = 0):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.pixels = str(path), reason, pixels

    def __reduce__(self):  # pickled whole: a DataLoader worker hands one back as its sample
        return type(self), (self.path, self.reason, self.pixels)

    @property
    def too_large(self) -> bool:
        return self.pixels > 0

    def as_corrupt_data(self) -> CorruptData:
        """The line that stops a run (training or test data), naming the recipe's setting."""
        if self.too_large:
            return CorruptData(
                f"image file {self.path} is refused: {self.reason}; if the file is trusted, "
                f"rerun the same command with max_image_pixels={self.pixels} (or 0 for no "
                "limit), else replace it with a smaller copy"
            )
        return CorruptData(
            f"image file {self.path} is corrupt or not an image ({self.reason}); replace it "
            "with a good copy (removing it changes the training set, which a resumed run "
            "refuses) and rerun the same command"
        )


def _reason(err: BaseException, path) -> str:
    """An exception as one short line, without the path the caller names anyway."""
    if isinstance(err, UnidentifiedImageError):  # its text names an internal file object
        return f"{type(err).__name__}: not in any image format PIL reads"
    text = str(err).replace(repr(str(path)), "it").replace(str(path), "it")
    text = " ".join(text.split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """A decoded image as grey ("L", channels 1) or "RGB" (3), 8 bits per channel. 16-bit grey
    (I;16 and its byte orders, and "I", what PIL makes of 16-bit files) is scaled from 0..65535
    and float ("F") from 0..1, as an image viewer shows them; PIL's own convert would clip
    them to 0..255 and make almost every pixel white. 16-bit colour PNGs PIL already reads as
    8-bit "RGB"/"RGBA"; palette, CMYK, alpha and bilevel images convert as PIL converts them."""
    mode = "RGB" if channels == 3 else "L"
    if img.mode == mode:
        return img
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = (
            np.clip(np.nan_to_num(a), 0, 1) * 255 if img.mode == "F" else np.clip(a, 0, 65535) / 257
        )  # 257 = 65535 / 255: 8-bit x stored as 257 x
        img = Image.fromarray(np.rint(a).astype(np.uint8))
    return img.convert(mode)


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (a phone photo stored sideways). A broken
    EXIF block leaves the image as stored, as viewers do."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed metadata is no reason to refuse the pixels
        return img


def _replace_pil_guard() -> None:
    """PIL's decompression-bomb guard is a module global that no call can override (a warning
    above 89 M pixels, an error above twice that); open_image applies its own limit instead,
    the same by default, named in its message and raised by a setting."""
    Image.MAX_IMAGE_PIXELS = None


def open_image(
    path: str | os.PathLike,
    channels: int = 3,
    max_pixels: int = PIL_PIXEL_LIMIT,
    exif: bool = False,
) -> Image.Image:
    """Decode an image file into a grey or RGB PIL image (`to_channels`), fully loaded.

    Any failure (a truncated or unidentified file, a decompression bomb, a decoder's own
    error, an unsupported mode) raises `BadImage` with a one-line reason; so does an image of
    more than `max_pixels` pixels (0 = no limit), checked from the header before decoding.
    `exif`: turn the image upright by its EXIF orientation (user images: predict and the
    demo); training and test folders are read as stored, as torchvision's ImageFolder does."""
    _replace_pil_guard()
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise BadImage(path, "the file is empty (0 bytes)")
            img = Image.open(fh)
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise BadImage(
                    path,
                    f"it has {w}x{h} = {w * h:,} pixels, more than the limit of "
                    f"{max_pixels:,} (a guard against decompression bombs)",
                    pixels=w * h,
                )
            img.load()
    except BadImage:
        raise
    except Exception as err:  # every decoder failure is a bad image
        raise BadImage(path, _reason(err, path)) from None
    try:
        return to_channels(upright(img) if exif else img, channels)
    except Exception as err:  # e.g. a mode PIL cannot convert
        raise BadImage(path, _reason(err, path)) from None


def train_image(
    img: Image.Image, rng: np.random.Generator, size: int, hflip: bool, channels: int = 3
) -> np.ndarray:
    """RandomResizedCrop(size) + RandomHorizontalFlip as uint8 HWC."""
    img = to_channels(img, channels)
    top, left, h, w = random_resized_crop_params(rng, *img.size)
    out = np.asarray(resized_crop(img, top, left, h, w, size))
    if hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out.reshape(size, size, channels)


def eval_image(img: Image.Image, resize: int, size: int, channels: int = 3) -> np.ndarray:
    """Resize(resize) + CenterCrop(size) as uint8 HWC (resize 0: centre crop only)."""
    img = to_channels(img, channels)
    if resize:
        img = resize_short_side(img, resize)
    return np.asarray(center_crop(img, size)).reshape(size, size, channels)
