"""``python -m benchmarks.conv_profile``: where flax_impl's CPU step time goes.

Times forward + backward (both input and weight gradients) of each distinct 3x3 convolution of
ResNet-20 at batch 128 on 28x28 input, in torch (oneDNN) and in XLA:CPU, and sums them over the
network's 19 convolutions. If XLA's convolutions alone account for the gap between the two
frameworks' train steps, the limit is XLA:CPU's convolution kernels, not flax_impl's code.
"""

from __future__ import annotations

import time

import numpy as np

# (in channels, out channels, input size, stride, how many times ResNet-20 (28 px) has it)
CONVS = [(1, 16, 28, 1, 1), (16, 16, 28, 1, 6), (16, 32, 28, 2, 1), (32, 32, 14, 1, 5),
         (32, 64, 14, 2, 1), (64, 64, 7, 1, 5)]
BATCH = 128


def _time(fn, reps=20) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def torch_conv(cin, cout, size, stride) -> float:
    import torch
    import torch.nn.functional as F

    x = torch.randn(BATCH, cin, size, size).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(cout, cin, 3, 3, requires_grad=True)

    def step():
        y = F.conv2d(x, w, stride=stride, padding=1)
        y.sum().backward()

    return _time(step)


def xla_conv(cin, cout, size, stride) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, size, size, cin)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, cin, cout)), jnp.float32)

    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.sum()

    g = jax.jit(jax.grad(f, argnums=(0, 1)))
    return _time(lambda: jax.block_until_ready(g(x, w)))


def main() -> int:
    rows = ["| conv (cin -> cout, input, stride) x count | torch fwd+bwd ms | XLA fwd+bwd ms | "
            "XLA / torch |", "| --- | --- | --- | --- |"]
    tot_t = tot_x = 0.0
    for cin, cout, size, stride, count in CONVS:
        t, x = torch_conv(cin, cout, size, stride), xla_conv(cin, cout, size, stride)
        tot_t += count * t
        tot_x += count * x
        rows.append(f"| {cin}->{cout}, {size}px, /{stride} x{count} | {1e3 * t:.1f} | "
                    f"{1e3 * x:.1f} | {x / t:.2f} |")
    rows.append(f"| all 19 convolutions of ResNet-20 | {1e3 * tot_t:.0f} | {1e3 * tot_x:.0f} | "
                f"{tot_x / tot_t:.2f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
