"""core.pil_transforms against torchvision's own transforms, on real JPEG files."""

import numpy as np
import pytest
import torch

from core import pil_transforms as pt
from testkit import samples

T = pytest.importorskip("torchvision.transforms")
TF = pytest.importorskip("torchvision.transforms.functional")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = samples.write_image_folder(
        tmp_path_factory.mktemp("jpegs"), classes=2, per_class=(3, 1), size=(61, 45)
    )
    return sorted(str(p) for p in root.rglob("*.JPEG"))


def test_eval_transform_is_torchvisions(jpegs):
    """Resize(256) + CenterCrop(224), scaled down to Resize(36) + CenterCrop(32): same pixels."""
    ref = T.Compose([T.Resize(36), T.CenterCrop(32)])
    for path in jpegs:
        img = pt.open_image(path)
        assert np.array_equal(pt.eval_image(img, 36, 32), np.asarray(ref(img)))


def test_resized_crop_is_torchvisions_given_the_same_box(jpegs):
    rng = np.random.default_rng(0)
    for path in jpegs:
        img = pt.open_image(path)
        top, left, h, w = pt.random_resized_crop_params(rng, *img.size)
        want = np.asarray(TF.resized_crop(img, top, left, h, w, [32, 32]))
        assert np.array_equal(np.asarray(pt.resized_crop(img, top, left, h, w, 32)), want)


def test_crop_box_distribution_follows_torchvisions_rule():
    """The same algorithm as RandomResizedCrop.get_params: area fraction in [0.08, 1], aspect
    ratio in [3/4, 4/3] (up to rounding of the sides), box inside the image."""
    rng = np.random.default_rng(1)
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = pt.random_resized_crop_params(rng, 400, 300)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        fractions.append(h * w / (400 * 300))
        ratios.append(w / h)
    assert 0.075 <= min(fractions) and max(fractions) <= 1.0
    assert 0.7 <= min(ratios) and max(ratios) <= 1.4
    # torchvision's own draws, for comparison of the mean box size: a box's area fraction has a
    # standard deviation of ~0.27 around ~0.5, so each mean of 2000 draws is good to ~1.2% and
    # their difference to ~1.7%; 5% is three of those, while another scale range (e.g. 0.25-1)
    # moves the mean by ~20%
    torch.manual_seed(1)
    img = torch.zeros(3, 300, 400)
    theirs = [
        np.prod(T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])[2:]) / (400 * 300)
        for _ in range(2000)
    ]
    assert abs(np.mean(fractions) - np.mean(theirs)) < 0.05 * np.mean(theirs)


def test_fallback_is_the_central_crop():
    class NeverFits:  # every try draws an impossible box, as for very thin images
        def uniform(self, lo, hi):
            return hi

        def integers(self, lo, hi):
            raise AssertionError("not reached")

    for width, height in ((1000, 10), (10, 1000), (300, 300)):
        ours = pt.random_resized_crop_params(NeverFits(), width, height, scale=(50.0, 50.0))
        theirs = T.RandomResizedCrop.get_params(
            torch.zeros(3, height, width), [50.0, 50.0], [3 / 4, 4 / 3]
        )
        assert ours == tuple(theirs)


# --- open_image: every failure one line, the pixel limit, 16-bit and float images, EXIF -----------


def _bad(path, **kw):
    with pytest.raises(pt.BadImage) as info:
        pt.open_image(path, **kw)
    assert "\n" not in info.value.reason
    return info.value


def test_any_decoding_failure_is_a_bad_image_with_its_reason(jpegs, tmp_path, monkeypatch):
    """PIL's decoders raise OSError, ValueError, SyntaxError, DecompressionBombError (an
    Exception of its own) and, deep inside, MemoryError or anything else: each is a BadImage."""
    cases = {
        "empty.png": b"",
        "text.jpg": b"this is not a JPEG",
        "truncated.JPEG": open(jpegs[0], "rb").read()[:300],
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        assert not _bad(tmp_path / name).too_large, name
    assert "UnidentifiedImageError" in _bad(tmp_path / "text.jpg").reason
    assert "OSError" in _bad(tmp_path / "truncated.JPEG").reason

    from PIL import ImageFile

    def no_memory(self):
        raise MemoryError("the decoder ran out")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    assert _bad(jpegs[0]).reason == "MemoryError: the decoder ran out"


def test_the_pixel_limit_is_checked_from_the_header(tmp_path):
    """A 57-byte PNG that claims 16000 x 12000 pixels (past PIL's limit) is refused for its size
    before anything is decoded; a higher limit or none lets it through to the decoder, which
    then finds no pixel data."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(samples.png_bytes(16000, 12000))
    err = _bad(bomb)
    assert err.too_large and err.pixels == 192_000_000
    assert "16000x12000 = 192,000,000 pixels, more than the limit of 178,956,970" in err.reason
    assert _bad(bomb, max_pixels=1000).too_large
    for limit in (0, 200_000_000):
        assert not _bad(bomb, max_pixels=limit).too_large
    small = tmp_path / "small.png"
    pt.Image.new("RGB", (40, 30)).save(small)
    assert pt.open_image(small, max_pixels=1200).size == (40, 30)  # at the limit: fine
    assert _bad(small, max_pixels=1199).pixels == 1200


def test_the_default_limit_is_where_pil_refuses():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"],
        capture_output=True,
        text=True,
    )
    assert pt.PIL_PIXEL_LIMIT == 2 * int(out.stdout)  # PIL errors above twice its warning level


def _eight_bit_copies(tmp_path, grey: np.ndarray, rgb: np.ndarray) -> dict:
    """Files holding the same picture as 16-bit and float images, each with its 8-bit value
    x stored as a viewer reads it back: 257 x of 65535, or x / 255 of 1.0."""
    from PIL import Image

    wide = grey.astype(np.uint16) * 257
    files = {
        "I;16 png": (tmp_path / "i16.png", Image.fromarray(wide)),
        "I;16B tiff": (
            tmp_path / "i16b.tif",
            Image.frombytes("I;16B", grey.shape[::-1], wide.astype(">u2").tobytes()),
        ),
        "I tiff": (tmp_path / "i32.tif", Image.fromarray(wide.astype(np.int32))),
        "F tiff": (tmp_path / "f.tif", Image.fromarray(grey.astype(np.float32) / 255)),
    }
    for path, img in files.values():
        img.save(path)
    # 16-bit RGB: PIL has no such mode to save from
    (tmp_path / "rgb16.png").write_bytes(
        samples.png_bytes(rgb.shape[1], rgb.shape[0], rgb.astype(np.uint16) * 257)
    )
    files["RGB 16-bit png"] = (tmp_path / "rgb16.png", None)
    return {k: v[0] for k, v in files.items()}


def test_16_bit_and_float_images_are_their_8_bit_copies(tmp_path):
    """Every value 0..255 in the picture: each 16-bit or float file decodes to exactly the 8-bit
    pixels (PIL's own convert clips them: every non-zero 16-bit pixel would be white)."""
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([grey, grey[::-1], grey.T], -1)
    for mode, path in _eight_bit_copies(tmp_path, grey, rgb).items():
        if mode.startswith("RGB"):
            assert np.array_equal(np.asarray(pt.open_image(path, 3)), rgb), mode
            continue
        assert pt.Image.open(path).mode == mode.split()[0], mode
        assert np.array_equal(np.asarray(pt.open_image(path, 1)), grey), mode
        assert np.array_equal(np.asarray(pt.open_image(path, 3))[..., 1], grey), mode
    clipped = np.asarray(pt.Image.open(tmp_path / "i16.png").convert("L"))
    assert (clipped == 255).mean() > 0.99  # what PIL alone makes of it


def test_exif_orientation_is_applied_only_when_asked(tmp_path):
    """A phone's sideways JPEG (EXIF orientation 6) is upright for predict and the demo
    (exif=True) and as stored for training folders, as torchvision's ImageFolder reads it."""
    picture = np.zeros((28, 20), np.uint8)
    picture[:6] = 255  # a bright top band
    samples.sideways_jpeg(tmp_path / "phone.jpg", picture)
    stored = np.asarray(pt.open_image(tmp_path / "phone.jpg", 1))
    upright = np.asarray(pt.open_image(tmp_path / "phone.jpg", 1, exif=True))
    assert stored.shape == (20, 28) and upright.shape == (28, 20)
    assert np.abs(upright.astype(int) - picture).max() <= 8  # JPEG at quality 95
    assert np.array_equal(np.asarray(torchvision_folder_image(tmp_path / "phone.jpg")), stored)


def torchvision_folder_image(path):
    from torchvision.datasets.folder import pil_loader

    return pil_loader(str(path)).convert("L")
