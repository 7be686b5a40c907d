"""ResNets in PyTorch: He et al.'s CIFAR family and torchvision's ImageNet family.

CIFAR family (seed 000; He et al. 2015, section 4.2): a 3x3 stem with 16 channels, three stages of
n basic blocks at 16/32/64 channels, global average pooling and a linear head; depth 6n+2 gives
resnet20/32/44/56/110. Where a block changes shape the shortcut is either a 1x1 convolution with
BatchNorm (``shortcut="projection"``, the seed's choice: 272,474 parameters for ResNet-20) or He et
al.'s parameter-free option A (``shortcut="identity"``: stride-2 subsampling and zero-padded
channels, 269,722 parameters).

ImageNet family (seed 002; torchvision's layout, so `state_dict()` keys and parameter counts equal
torchvision's): basic blocks for resnet18/34, bottlenecks with the stride on the 3x3 convolution
(ResNet v1.5) for resnet50/101/152. ``stem="cifar"`` swaps the 7x7/2 convolution and max-pool for a
3x3/1 convolution and no pooling (seed 002's CIFAR-100 adaptation); the keys stay the same.

Initialisation everywhere: convolutions Kaiming-normal with fan_out (seed 002, torchvision),
BatchNorm weight 1 and bias 0, the linear head PyTorch's default.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import model_table

__all__ = [
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "build_model",
]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ShortcutA(nn.Module):
    """He et al.'s option A: take every other pixel and zero-pad the new channels. No parameters."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # pad channels symmetrically: F.pad's last pair pads dim 1 when given 6 numbers
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # v1.5: stride on the 3x3, as torchvision
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: stages of basic blocks at 16, 32, 64 channels (model_table)."""

    def __init__(
        self,
        spec: model_table.Spec,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "projection",
    ):
        super().__init__()
        if shortcut not in ("projection", "identity"):
            raise ValueError(f"shortcut must be 'projection' or 'identity', got {shortcut!r}")
        cin = spec.widths[0]
        self.conv1 = conv3x3(in_channels, cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        for i, (width, n) in enumerate(zip(spec.widths, spec.stages)):
            blocks = []
            for b in range(n):
                stride = model_table.stride(i, b)
                down = None
                if stride != 1 or cin != width:
                    down = (
                        _projection(cin, width, stride)
                        if shortcut == "projection"
                        else ShortcutA(cin, width, stride)
                    )
                blocks.append(BasicBlock(cin, width, stride, down))
                cin = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet(nn.Module):
    """torchvision's ResNet layout, with an ImageNet (7x7/2 + max-pool) or CIFAR (3x3/1) stem."""

    def __init__(
        self,
        spec: model_table.Spec,
        num_classes: int = 1000,
        stem: str = "imagenet",
        in_channels: int = 3,
    ):
        super().__init__()
        block = Bottleneck if spec.block == "bottleneck" else BasicBlock
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = conv3x3(in_channels, 64)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        cin = 64
        for i, (planes, count) in enumerate(zip(spec.widths, spec.stages)):
            stride = model_table.stride(i, 0)
            down = None
            if stride != 1 or cin != planes * block.expansion:
                down = _projection(cin, planes * block.expansion, stride)
            blocks = [block(cin, planes, stride, down)]
            cin = planes * block.expansion
            blocks += [block(cin, planes) for _ in range(1, count)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar(name: str):
    def make(num_classes=10, in_channels=3, shortcut="projection") -> CifarResNet:
        return CifarResNet(model_table.MODELS[name], num_classes, in_channels, shortcut)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{name}: He et al.'s CIFAR ResNet of depth {name[6:]}."
    return make


def _imagenet(name: str):
    def make(num_classes=1000, stem="imagenet", in_channels=3) -> ResNet:
        return ResNet(model_table.MODELS[name], num_classes, stem, in_channels)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{name}: torchvision's layout, with an ImageNet or CIFAR stem."
    return make


resnet20, resnet32, resnet44, resnet56, resnet110 = map(_cifar, model_table.CIFAR_MODELS)
resnet18, resnet34, resnet50, resnet101, resnet152 = map(_imagenet, model_table.IMAGENET_MODELS)


def build_model(recipe) -> nn.Module:
    """The model a recipe names."""
    fn = globals()[recipe.model]
    if recipe.is_cifar_family:
        return fn(recipe.num_classes, recipe.in_channels, recipe.shortcut)
    return fn(recipe.num_classes, recipe.stem, recipe.in_channels)
