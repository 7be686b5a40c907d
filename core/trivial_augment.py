"""TrivialAugment Wide (Müller & Hutter, ICCV 2021) on uint8 images, as torchvision applies it.

Each training image gets one operation, chosen uniformly from the 14 below, at one of 31
magnitudes (chosen uniformly), negated with probability 1/2 for the signed operations. The
choices come from the data plan (`core.sampling`: three integers per image, keyed by seed,
epoch, step and the image's place in the global batch); the operations run here, on the host, on
the uint8 image after its crop and flip and before normalisation, for both stacks and every
pipeline, so the two stacks see the same pixels by construction.

The operations are the PIL calls torchvision's ``TrivialAugmentWide`` makes on a PIL image (its
PIL back end; the four look-up-table ones computed in numpy, the tables built as PIL builds
them), with bilinear interpolation, as torchvision's classification recipe configures
it (``--auto-augment ta_wide``; the class's own default is nearest), and a fill of 0 for the
pixels a geometric operation uncovers. Given the same operation, magnitude and sign, the pixels
equal torchvision's (parity_tests/test_trivial_augment.py compares every operation with
torchvision itself; its tensor back end rounds differently, and the test states by how much).
The magnitudes are torchvision's wide space: shears and colour factors up to 0.99, translations
up to 32 pixels whatever the image size, rotations up to 135 degrees, posterize 8 down to 2 bits,
solarize thresholds 255 down to 0.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

BINS = 31  # torchvision's num_magnitude_bins
# torchvision's order: an image's operation is OPS[draw]
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
    | {"Brightness", "Color", "Contrast", "Sharpness"}
)
_RANGES = {  # op: (first, last) of its evenly spaced magnitudes
    "ShearX": (0.0, 0.99),
    "ShearY": (0.0, 0.99),
    "TranslateX": (0.0, 32.0),
    "TranslateY": (0.0, 32.0),
    "Rotate": (0.0, 135.0),
    "Brightness": (0.0, 0.99),
    "Color": (0.0, 0.99),
    "Contrast": (0.0, 0.99),
    "Sharpness": (0.0, 0.99),
    "Solarize": (255.0, 0.0),
}


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """Evenly spaced float32 values as torch.linspace computes them in float32, so that every
    magnitude is torchvision's to the bit: a float32 step, the first half counted up from
    `start` and the second down from `end`, each value rounded once (a fused multiply-add)."""
    start32, end32 = np.float64(np.float32(start)), np.float64(np.float32(end))
    step = np.float64(np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    out = np.where(i < steps // 2, start32 + step * i, end32 - step * (steps - 1 - i))
    return out.astype(np.float32)


def magnitudes(op: str, bins: int = BINS) -> np.ndarray:
    """The magnitudes an operation chooses from (one value, 0, for the unparametrised ones)."""
    if op in _RANGES:
        return _linspace32(*_RANGES[op], bins)
    if op == "Posterize":  # bits: 8 at the first bin down to 2 at the last
        return (8 - np.round(np.arange(bins) / np.float32((bins - 1) / 6))).astype(np.int64)
    return np.zeros(1, np.float32)


_TABLES = {op: magnitudes(op) for op in OPS}


def magnitude(op_index: int, bin_index: int, negative: bool) -> float:
    """The signed magnitude of the draws (op, bin, sign), as torchvision's forward picks it."""
    op = OPS[op_index]
    table = _TABLES[op]
    value = float(table[bin_index]) if len(table) > 1 else 0.0
    return -value if negative and op in SIGNED else value


def _inverse_affine(center, angle, translate, shear) -> list[float]:
    """PIL's coefficients (output pixel -> input pixel) of a rotation by `angle` degrees and
    shears (degrees) about `center`, then a translation, at scale 1: the matrix torchvision
    hands PIL for the same arguments, computed in the same order so that it is the same to the
    bit."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]  # the inverse of [[a, b], [c, d]], whose determinant is 1
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def _fill(img: Image.Image):
    return 0 if img.mode == "L" else (0,) * len(img.getbands())


def _affine(img: Image.Image, center, translate=(0, 0), shear=(0.0, 0.0)) -> Image.Image:
    matrix = _inverse_affine(center, 0.0, translate, shear)
    return img.transform(img.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=_fill(img))


def apply_pil(img: Image.Image, op_index: int, bin_index: int, negative: bool) -> Image.Image:
    """One operation on a grey ("L") or "RGB" PIL image."""
    op = OPS[op_index]
    m = magnitude(op_index, bin_index, negative)
    if op == "ShearX":  # about the top-left corner, the shear's angle atan(m), in degrees
        return _affine(img, (0.0, 0.0), shear=(math.degrees(math.atan(m)), 0.0))
    if op == "ShearY":
        return _affine(img, (0.0, 0.0), shear=(0.0, math.degrees(math.atan(m))))
    width, height = img.size
    if op == "TranslateX":  # whole pixels, about the centre
        return _affine(img, (width * 0.5, height * 0.5), translate=(int(m), 0))
    if op == "TranslateY":
        return _affine(img, (width * 0.5, height * 0.5), translate=(0, int(m)))
    if op == "Rotate":
        return img.rotate(m, Image.BILINEAR, False, None, fillcolor=_fill(img))
    enhance = {
        "Brightness": ImageEnhance.Brightness,
        "Color": ImageEnhance.Color,
        "Contrast": ImageEnhance.Contrast,
        "Sharpness": ImageEnhance.Sharpness,
    }
    if op in enhance:
        return enhance[op](img).enhance(1.0 + m)
    if op == "Posterize":
        return ImageOps.posterize(img, int(m))
    if op == "Solarize":
        return ImageOps.solarize(img, m)
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    return img  # Identity


def _autocontrast_lut(hist: np.ndarray) -> np.ndarray:
    """ImageOps.autocontrast's table for one band (no cut-off): the darkest value present goes
    to 0 and the lightest to 255, each entry truncated as `int()` does (the same float64 sums)."""
    present = np.flatnonzero(hist)  # never empty: an image has at least one pixel
    lo, hi = present[0], present[-1]
    if hi <= lo:
        return np.arange(256)
    scale = 255.0 / (hi - lo)
    return np.clip(np.trunc(np.arange(256) * scale + (-lo * scale)), 0, 255)


def _equalize_lut(hist: np.ndarray) -> np.ndarray:
    """ImageOps.equalize's table for one band: entry i is (step // 2 + the count below i) //
    step, step being the count of all but the lightest value present over 255."""
    present = hist[hist > 0]
    step = (int(present.sum()) - int(present[-1])) // 255 if present.size > 1 else 0
    if not step:
        return np.arange(256)
    below = np.concatenate([[0], np.cumsum(hist)[:-1]])
    return (step // 2 + below) // step


def _lut_op(image: np.ndarray, table) -> np.ndarray:
    """A look-up table per band, as PIL's Image.point applies it to an "L" or "RGB" image
    (entries clipped to 0..255)."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        band = image[..., c]
        hist = np.bincount(band.ravel(), minlength=256)
        out[..., c] = np.clip(table(hist), 0, 255).astype(np.uint8)[band]
    return out


def apply(image: np.ndarray, op_index: int, bin_index: int, negative: bool) -> np.ndarray:
    """One operation on a uint8 HWC image (1 or 3 channels); a new array of the same shape.
    The four look-up-table operations run in numpy, the tables built as ImageOps builds them
    (the same pixels, core/tests/test_trivial_augment.py; 2-35 us an image against 55-160 us
    for a PIL round trip on 28x28 images); the others go through PIL (`apply_pil`)."""
    if op_index == 0:
        return image
    op = OPS[op_index]
    if op == "Posterize":
        bits = int(magnitude(op_index, bin_index, negative))  # the low 8 - bits bits cleared
        return image & np.uint8(~(2 ** (8 - bits) - 1) & 0xFF)
    if op == "Solarize":  # values at or above the threshold inverted
        threshold = magnitude(op_index, bin_index, negative)
        return np.where(image < threshold, image, 255 - image).astype(np.uint8)
    if op == "AutoContrast":
        return _lut_op(image, _autocontrast_lut)
    if op == "Equalize":
        return _lut_op(image, _equalize_lut)
    grey = image.shape[-1] == 1
    img = Image.fromarray(image[..., 0] if grey else image, "L" if grey else "RGB")
    return np.asarray(apply_pil(img, op_index, bin_index, negative)).reshape(image.shape)


def apply_batch(images: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Each image of a uint8 NHWC batch with its row of `draws` (op, bin, negative)."""
    out = images.copy()
    for i, (op, bin_index, negative) in enumerate(draws):
        if op:
            out[i] = apply(images[i], int(op), int(bin_index), bool(negative))
    return out


def draw(rng: np.random.Generator, batch: int) -> np.ndarray:
    """(batch, 3) int32: each image's operation, magnitude bin and sign (1 = negated)."""
    return np.stack(
        [
            rng.integers(0, len(OPS), batch),
            rng.integers(0, BINS, batch),
            rng.integers(0, 2, batch),
        ],
        axis=1,
    ).astype(np.int32)


def crop_flip(images: np.ndarray, pad: int, crop_y, crop_x, flip) -> np.ndarray:
    """torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip on a uint8 NHWC batch
    with the plan's offsets and flips: what the stacks' batched crop does on the device, here
    on the host, ahead of TrivialAugment (which torchvision applies after them)."""
    n, h, w, _ = images.shape
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = np.asarray(crop_y, np.int64)[:, None] + np.arange(h)  # (n, h) source rows
    cols = np.asarray(crop_x, np.int64)[:, None] + np.arange(w)  # (n, w) source columns
    cols = np.where(np.asarray(flip, bool)[:, None], cols[:, ::-1], cols)
    return images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment_rows(images: np.ndarray, pad: int, crop_y, crop_x, flip, draws) -> np.ndarray:
    """Crop and flip (`crop_flip`), then each image's TrivialAugment operation (`draws`)."""
    if images.dtype != np.uint8:
        raise TypeError(
            f"trivial_augment works on 8-bit images; these are {images.dtype}: "
            "set trivial_augment=false or read the data as uint8"
        )
    return apply_batch(crop_flip(images, pad, crop_y, crop_x, flip), draws)
