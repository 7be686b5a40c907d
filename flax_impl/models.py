"""ResNets in Flax linen, NHWC, written to compute what torch_ref.models computes.

The same families, names and arguments as `torch_ref.models`. Where Flax's defaults differ from
PyTorch's, this file does what PyTorch does:

- Padding is explicit: ``((1, 1), (1, 1))`` for 3x3 convolutions, ``((3, 3), (3, 3))`` for the 7x7
  stem, ``((1, 1), (1, 1))`` for the max-pool. Flax's ``'SAME'`` pads stride-2 layers asymmetrically
  (more at the end), which shifts every downsampled feature map by a pixel against PyTorch.
- `BatchNorm` here follows torch.nn.BatchNorm2d: epsilon 1e-5; running statistics move by
  ``momentum=0.1`` towards the batch's (Flax's own BatchNorm calls that momentum 0.9); the running
  variance takes the *unbiased* batch variance (n/(n-1)), while normalisation uses the biased one;
  and ``num_batches_tracked`` counts train-mode calls, so a torch state_dict round-trips whole.
- Initialisation draws from PyTorch's distributions: Kaiming-normal fan_out for convolutions,
  PyTorch's default uniform(+-1/sqrt(fan_in)) for the linear layer's weight and bias.

Variables are ``{"params": ..., "batch_stats": ...}``; module names mirror torch's state_dict keys
(``layer2_0/downsample_0`` for ``layer2.0.downsample.0``), see `crossing.weights`.
``dtype`` is the compute dtype (bfloat16 for mixed precision); parameters and BatchNorm statistics
stay float32 (or whatever ``param_dtype`` says, e.g. float64 for the parity proofs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

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
    "BatchNorm",
    "CifarResNet",
    "ResNet",
]

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal_ fan_out


def torch_linear_init(fan_in: int):
    """PyTorch's nn.Linear default: weight and bias uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d's semantics over the last axis of an NHWC tensor.

    Under `jax.jit` with the batch sharded over a mesh, the means below are over the global batch:
    XLA inserts the cross-device reductions, so there is no axis_name to pass.
    """

    momentum: float = 0.1  # torch's convention: new = (1 - momentum) * old + momentum * batch
    epsilon: float = 1e-5
    unbiased_running_var: bool = True  # torch's; False is Flax's (the parity traps use it)
    dtype: Any = None  # output dtype; statistics are computed in param_dtype
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), self.param_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), self.param_dtype)
        tracked = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        xf = x.astype(self.param_dtype)
        if train:
            axes = tuple(range(x.ndim - 1))
            if mask is None:
                n = x.size // c
                mean = jnp.mean(xf, axes)
                var = jnp.mean(jnp.square(xf - mean), axes)  # biased: what normalisation uses
                unbias = n / max(n - 1, 1) if self.unbiased_running_var else 1.0
            else:  # statistics of the real examples of a padded batch only
                w = mask.astype(xf.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
                n = jnp.sum(w) * (x.size // (c * x.shape[0]))
                mean = jnp.sum(xf * w, axes) / n
                var = jnp.sum(jnp.square(xf - mean) * w, axes) / n
                unbias = n / jnp.maximum(n - 1, 1) if self.unbiased_running_var else 1.0
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * unbias
                tracked.value = tracked.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        y = (xf - mean) * inv + bias
        return y.astype(self.dtype or x.dtype)


class _Net(nn.Module):
    """Helpers shared by both families: torch-padded conv and BN with the module's dtypes."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def conv(self, features, kernel, stride=1, name=None):
        pad = (kernel - 1) // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            (stride, stride),
            [(pad, pad), (pad, pad)],
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_init,
            name=name,
        )

    def bn(self, name=None):
        return BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def head(self, x, num_classes):
        x = jnp.mean(x, axis=(1, 2))  # global average pooling
        fan_in = x.shape[-1]
        return nn.Dense(
            num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_linear_init(fan_in),
            bias_init=torch_linear_init(fan_in),
            name="fc",
        )(x)


class BasicBlock(_Net):
    features: int = 64
    stride: int = 1
    shortcut: str = "projection"  # projection | identity (option A) | none

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        out = self.conv(self.features, 3, self.stride, "conv1")(x)
        out = nn.relu(self.bn(name="bn1")(out, train, mask))
        out = self.bn(name="bn2")(self.conv(self.features, 3, 1, "conv2")(out), train, mask)
        return nn.relu(out + _shortcut(self, x, self.features, train, mask))


class Bottleneck(_Net):
    features: int = 64
    stride: int = 1
    shortcut: str = "projection"

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        out = nn.relu(self.bn(name="bn1")(self.conv(self.features, 1, 1, "conv1")(x), train, mask))
        out = self.conv(self.features, 3, self.stride, "conv2")(out)
        out = nn.relu(self.bn(name="bn2")(out, train, mask))
        out = self.bn(name="bn3")(self.conv(self.features * 4, 1, 1, "conv3")(out), train, mask)
        return nn.relu(out + _shortcut(self, x, self.features * 4, train, mask))


def _shortcut(block: _Net, x, out_features: int, train: bool, mask=None):
    if block.shortcut == "none":
        return x
    if block.shortcut == "identity":  # He et al.'s option A: subsample, zero-pad channels
        x = x[:, :: block.stride, :: block.stride, :]
        extra = out_features - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    y = block.conv(out_features, 1, block.stride, "downsample_0")(x)
    return block.bn(name="downsample_1")(y, train, mask)


class CifarResNet(_Net):
    """He et al.'s CIFAR ResNet (see torch_ref.models.CifarResNet; depths in model_table)."""

    spec: model_table.Spec = model_table.MODELS["resnet20"]
    num_classes: int = 10
    shortcut: str = "projection"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        """x: NHWC images; mask: (N,) 1 for real examples, 0 for padding (train-mode BN)."""
        if self.shortcut not in ("projection", "identity"):
            raise ValueError(f"shortcut must be 'projection' or 'identity', got {self.shortcut!r}")
        cin = self.spec.widths[0]
        x = x.astype(self.dtype)
        x = nn.relu(self.bn(name="bn1")(self.conv(cin, 3, 1, "conv1")(x), train, mask))
        for i, (width, n) in enumerate(zip(self.spec.widths, self.spec.stages)):
            for b in range(n):
                stride = model_table.stride(i, b)
                kind = self.shortcut if (stride != 1 or cin != width) else "none"
                x = BasicBlock(
                    features=width,
                    stride=stride,
                    shortcut=kind,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{i + 1}_{b}",
                )(x, train, mask)
                cin = width
        return self.head(x, self.num_classes)


class ResNet(_Net):
    """torchvision's ResNet layout with an ImageNet or CIFAR stem (see torch_ref.models.ResNet)."""

    spec: model_table.Spec = model_table.MODELS["resnet18"]
    num_classes: int = 1000
    stem: str = "imagenet"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        """x: NHWC images; mask: (N,) 1 for real examples, 0 for padding (train-mode BN)."""
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.relu(self.bn(name="bn1")(self.conv(64, 7, 2, "conv1")(x), train, mask))
            x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))  # pads with -inf, as torch
        elif self.stem == "cifar":
            x = nn.relu(self.bn(name="bn1")(self.conv(64, 3, 1, "conv1")(x), train, mask))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        block = Bottleneck if self.spec.block == "bottleneck" else BasicBlock
        cin = 64
        for i, (planes, count) in enumerate(zip(self.spec.widths, self.spec.stages)):
            for b in range(count):
                stride = model_table.stride(i, b)
                out = planes * self.spec.expansion
                kind = "projection" if (stride != 1 or cin != out) else "none"
                x = block(
                    features=planes,
                    stride=stride,
                    shortcut=kind,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{i + 1}_{b}",
                )(x, train, mask)
                cin = out
        return self.head(x, self.num_classes)


def _cifar(name: str):
    def make(
        num_classes=10,
        in_channels=3,
        shortcut="projection",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ) -> CifarResNet:
        del in_channels  # Flax infers input channels from the data
        return CifarResNet(
            spec=model_table.MODELS[name],
            num_classes=num_classes,
            shortcut=shortcut,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    make.__name__ = make.__qualname__ = name
    return make


def _imagenet(name: str):
    def make(
        num_classes=1000, stem="imagenet", in_channels=3, dtype=jnp.float32, param_dtype=jnp.float32
    ) -> ResNet:
        del in_channels
        return ResNet(
            spec=model_table.MODELS[name],
            num_classes=num_classes,
            stem=stem,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    make.__name__ = make.__qualname__ = name
    return make


resnet20, resnet32, resnet44, resnet56, resnet110 = map(_cifar, model_table.CIFAR_MODELS)
resnet18, resnet34, resnet50, resnet101, resnet152 = map(_imagenet, model_table.IMAGENET_MODELS)


def build_model(recipe, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    fn = globals()[recipe.model]
    if recipe.is_cifar_family:
        return fn(recipe.num_classes, recipe.in_channels, recipe.shortcut, dtype, param_dtype)
    return fn(recipe.num_classes, recipe.stem, recipe.in_channels, dtype, param_dtype)
