"""torch_ref.models against torchvision and He et al."""

import pytest
import torch
import torchvision.models as tvm

from core.model_table import IMAGENET_MODELS
from torch_ref import models


def count(m):
    return sum(p.numel() for p in m.parameters())


def he_option_a_count(n: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """Parameters of He et al.'s CIFAR ResNet (option A), counted from the paper's description:
    a 3x3 stem to 16 channels, stages of n two-conv basic blocks at 16/32/64, BN after every conv
    (2 parameters per channel), a linear head."""
    total = 9 * in_channels * 16 + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += 9 * cin * width + 9 * width * width + 4 * width
            cin = width
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize(
    "depth, published",
    [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962)],
)
def test_cifar_counts(depth, published):
    """Option A has no shortcut parameters; projection adds a 1x1 conv + BN at the two stage changes
    (16*32 + 2*32 + 32*64 + 2*64 = 2,752). Published counts: He et al. Table 6 (0.27M ... 1.7M),
    exact figures as reproduced by common CIFAR ResNet ports."""
    n = (depth - 2) // 6
    fn = getattr(models, f"resnet{depth}")
    assert count(fn(shortcut="identity")) == he_option_a_count(n) == published
    assert count(fn(shortcut="projection")) == published + 2_752
    assert count(models.resnet20()) == 272_474  # the seed's default (projection)


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_family_is_torchvision(name):
    ours, theirs = getattr(models, name)(), getattr(tvm, name)()
    assert count(ours) == count(theirs)
    sd = theirs.state_dict()
    assert list(ours.state_dict()) == list(sd)  # same keys, same order
    ours.load_state_dict(sd, strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64)  # small input: the layers do not care, and it stays quick
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))  # same weights, same ops: bit-identical


def test_cifar_stem_keeps_torchvision_keys():
    ours, ref = models.resnet50(num_classes=100, stem="cifar"), tvm.resnet50(num_classes=100)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.conv1.weight.shape == (64, 3, 3, 3)
    assert ours(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_in_channels_and_shapes():
    m = models.resnet20(in_channels=1)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    m = models.resnet20(shortcut="identity")
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert models.resnet18(num_classes=7, in_channels=1)(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_identity_shortcut_is_option_a():
    sc = models.ShortcutA(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])  # the old channels, subsampled, centred
    assert not y[:, :8].any() and not y[:, 24:].any()  # zero-padded new channels


def test_kaiming_fan_out_init():
    torch.manual_seed(0)
    m = models.resnet50()
    w = m.layer3[0].conv2.weight  # 3x3, 256 -> 256
    expected_std = (2.0 / (w.shape[0] * 9)) ** 0.5
    assert abs(w.std().item() / expected_std - 1) < 0.02  # 590k samples: std error ~0.1%
    assert torch.equal(m.bn1.weight, torch.ones(64)) and torch.equal(m.bn1.bias, torch.zeros(64))


def test_bad_arguments():
    with pytest.raises(ValueError):
        models.resnet20(shortcut="zero")
    with pytest.raises(ValueError):
        models.resnet18(stem="tiny")
