"""``python -m benchmarks.conv_profile``: where flax_impl's CPU step time goes.

Times each distinct 3x3 convolution of ResNet-20 (batch 128, 32 px input: the cifar10 recipe)
three ways, in torch (oneDNN, channels_last) and in XLA:CPU (NHWC): the forward, the gradient
with respect to the input, and the gradient with respect to the weights, each on its own with a
random output gradient, so that no framework can skip or fold work. The sums over the network's
19 convolutions are then set beside the whole network's train-mode forward+backward in each
framework: what the convolutions do not explain is BatchNorm, ReLU, the additions and the head.
If XLA's convolution kernels alone make up most of the gap, the limit is XLA:CPU, not
flax_impl's code.
"""

from __future__ import annotations

import numpy as np

from benchmarks.timing import median_seconds

# (in channels, out channels, input size, stride, how many times ResNet-20 at 32 px has it)
CONVS = [
    (3, 16, 32, 1, 1),
    (16, 16, 32, 1, 6),
    (16, 32, 32, 2, 1),
    (32, 32, 16, 1, 5),
    (32, 64, 16, 2, 1),
    (64, 64, 8, 1, 5),
]
BATCH = 128
PARTS = ("forward", "grad input", "grad weight")


def _time(fn) -> float:
    return median_seconds(fn, repeats=10, warmup=3)


def _arrays(cin, cout, size, stride):
    rng = np.random.default_rng(0)
    out = (size + 2 - 3) // stride + 1
    return (
        rng.normal(size=(BATCH, size, size, cin)).astype(np.float32),
        rng.normal(size=(3, 3, cin, cout)).astype(np.float32),
        rng.normal(size=(BATCH, out, out, cout)).astype(np.float32),
    )


def torch_conv(cin, cout, size, stride) -> dict:
    import torch
    import torch.nn.functional as F

    x_np, w_np, ct_np = _arrays(cin, cout, size, stride)
    cl = torch.channels_last
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=cl).requires_grad_()
    w = torch.from_numpy(w_np).permute(3, 2, 0, 1).contiguous(memory_format=cl).requires_grad_()
    ct = torch.from_numpy(ct_np).permute(0, 3, 1, 2).contiguous(memory_format=cl)

    def forward():
        with torch.no_grad():
            F.conv2d(x, w, stride=stride, padding=1)

    y = F.conv2d(x, w, stride=stride, padding=1)
    return {
        "forward": _time(forward),
        "grad input": _time(lambda: torch.autograd.grad(y, x, ct, retain_graph=True)),
        "grad weight": _time(lambda: torch.autograd.grad(y, w, ct, retain_graph=True)),
    }


def xla_conv(cin, cout, size, stride) -> dict:
    import jax
    import jax.numpy as jnp

    x, w, ct = (jnp.asarray(a) for a in _arrays(cin, cout, size, stride))

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    fwd = jax.jit(conv)
    gx = jax.jit(lambda x, w, ct: jax.vjp(lambda x: conv(x, w), x)[1](ct))
    gw = jax.jit(lambda x, w, ct: jax.vjp(lambda w: conv(x, w), w)[1](ct))
    return {
        "forward": _time(lambda: jax.block_until_ready(fwd(x, w))),
        "grad input": _time(lambda: jax.block_until_ready(gx(x, w, ct))),
        "grad weight": _time(lambda: jax.block_until_ready(gw(x, w, ct))),
    }


def torch_network() -> float:
    import torch
    import torch.nn.functional as F

    from torch_ref.models import resnet20

    model = resnet20().to(memory_format=torch.channels_last).train()
    x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(BATCH) % 10

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return _time(step)


def xla_network() -> float:
    import jax
    import jax.numpy as jnp
    import optax

    from flax_impl.models import resnet20

    model = resnet20()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 32, 32, 3)), jnp.float32)
    y = jnp.arange(BATCH) % 10
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad = jax.jit(jax.grad(loss))
    return _time(lambda: jax.block_until_ready(grad(variables["params"])))


def main() -> int:
    rows = [
        "| conv (cin -> cout, input, stride) x count | part | torch ms | XLA ms | XLA / torch |",
        "| --- | --- | --- | --- | --- |",
    ]
    totals = {(fw, part): 0.0 for fw in ("torch", "xla") for part in PARTS}
    for cin, cout, size, stride, count in CONVS:
        t, x = torch_conv(cin, cout, size, stride), xla_conv(cin, cout, size, stride)
        for part in PARTS:
            totals[("torch", part)] += count * t[part]
            totals[("xla", part)] += count * x[part]
            rows.append(
                f"| {cin}->{cout}, {size}px, /{stride} x{count} | {part} | "
                f"{1e3 * t[part]:.1f} | {1e3 * x[part]:.1f} | {x[part] / t[part]:.2f} |"
            )
    conv_t = conv_x = 0.0
    for part in PARTS:
        tt, tx = totals[("torch", part)], totals[("xla", part)]
        conv_t, conv_x = conv_t + tt, conv_x + tx
        rows.append(
            f"| all 19 convolutions | {part} | {1e3 * tt:.0f} | {1e3 * tx:.0f} | {tx / tt:.2f} |"
        )
    rows.append(
        f"| all 19 convolutions | all three | {1e3 * conv_t:.0f} | {1e3 * conv_x:.0f} | "
        f"{conv_x / conv_t:.2f} |"
    )
    net_t, net_x = torch_network(), xla_network()
    rows.append(
        f"| whole ResNet-20, train-mode forward+backward | - | {1e3 * net_t:.0f} | "
        f"{1e3 * net_x:.0f} | {net_x / net_t:.2f} |"
    )
    rows.append(
        f"| the rest (BatchNorm, ReLU, additions, head) | - | {1e3 * (net_t - conv_t):.0f} "
        f"| {1e3 * (net_x - conv_x):.0f} | - |"
    )
    gap = net_x - net_t
    print("\n".join(rows))
    print(
        f"\nOf the {1e3 * gap:.0f} ms gap per step, the convolutions account for "
        f"{1e3 * (conv_x - conv_t):.0f} ms ({100 * (conv_x - conv_t) / gap:.0f}%)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
