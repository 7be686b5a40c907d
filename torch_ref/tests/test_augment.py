"""The fast batched augmentation against torchvision's PIL and tensor transforms."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from core import sampling
from testkit import samples
from torch_ref import augment


@pytest.mark.parametrize("size, channels, pad", [(32, 3, 4), (28, 1, 4), (32, 3, 2)])
def test_crop_flip_equals_torchvision_pil(size, channels, pad):
    """torchvision's RandomCrop(size, padding) + RandomHorizontalFlip on PIL images draw their
    offsets from torch's RNG; replaying the same RNG state through their `get_params` gives the
    offsets, which the batched path must turn into the very same pixels."""
    images, _ = samples.patterned_images(24, size, channels, 10, seed=5)
    pipeline = T.Compose([T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip()])
    ys, xs, flips, want = [], [], [], []
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if channels == 1 else img)
        torch.manual_seed(1000 + i)
        out = np.asarray(pipeline(pil))
        want.append(out.reshape(size, size, channels))
        torch.manual_seed(1000 + i)  # replay: RandomCrop pads, draws (i, j); the flip draws next
        top, left, _, _ = T.RandomCrop.get_params(TF.pad(pil, pad), (size, size))
        ys.append(top), xs.append(left), flips.append(bool(torch.rand(1) < 0.5))
    got = augment.crop_flip(
        torch.from_numpy(images), pad, torch.tensor(ys), torch.tensor(xs), torch.tensor(flips)
    )
    assert any(flips) and not all(flips) and len(set(ys)) > 1  # the test covers both branches
    assert torch.equal(got, torch.from_numpy(np.stack(want)))


def test_crop_flip_with_sampled_params_stays_in_range():
    images = torch.from_numpy(samples.patterned_images(64, 32, 3, 10)[0])
    p = sampling.augment_params(0, 0, 0, 64, 4, True, (0, 0, 0))
    out = augment.crop_flip(
        images, 4, torch.from_numpy(p.crop_y), torch.from_numpy(p.crop_x), torch.from_numpy(p.flip)
    )
    assert out.shape == images.shape and out.dtype == torch.uint8
    centre = (p.crop_y == 4) & (p.crop_x == 4) & ~p.flip
    assert centre.any() and torch.equal(out[centre], images[centre])


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_equals_torchvision_tensor_ops(channels):
    """Per image: brightness/contrast/saturation blends in the drawn order, as torchvision's
    tensor ColorJitter applies them (on one channel, saturation leaves the image alone).
    Float32 tolerance: the same formula, evaluated with broadcasting instead of per image,
    differs by at most a few ulp of values in [0, 1]."""
    images = torch.from_numpy(samples.patterned_images(16, 32, channels, 10, seed=2)[0])
    x = images.permute(0, 3, 1, 2).float() / 255
    p = sampling.augment_params(3, 0, 0, 16, 0, False, (0.4, 0.4, 0.4))
    got = augment.color_jitter(
        x.clone(), torch.from_numpy(p.jitter), torch.from_numpy(p.jitter_order)
    )
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(16):
        ref = x[i]
        for op in p.jitter_order[i]:
            ref = ops[op](ref, float(p.jitter[i, op]))
        torch.testing.assert_close(got[i], ref, rtol=0, atol=2e-6)
    assert len({tuple(o) for o in p.jitter_order}) > 1  # several orders were exercised


def test_normalize_matches_to_tensor_normalize():
    img = samples.patterned_images(4, 32, 3, 10)[0]
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ref = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(a)), mean, std) for a in img])
    got = augment.to_float_normalized(
        torch.from_numpy(img), torch.tensor(mean), torch.tensor(std), channels_last=True
    )
    assert got.is_contiguous(memory_format=torch.channels_last)
    # x/255 then (x-m)/s in float32 both ways: rounding of the two divisions, a few ulp of ~2
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
