"""flax_impl.models and flax_impl.convert against torch_ref (float64: the arithmetic is the same)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_impl import convert, models as fm
from torch_ref import models as tm

ALL = [("resnet20", {}), ("resnet20", {"shortcut": "identity"}), ("resnet32", {}),
       ("resnet44", {}), ("resnet56", {}), ("resnet110", {"shortcut": "identity"}),
       ("resnet18", {}), ("resnet34", {"stem": "cifar"}), ("resnet50", {}),
       ("resnet101", {"stem": "cifar"}), ("resnet152", {})]


def count(tree):
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name, kw", ALL)
def test_parameter_counts_and_round_trip(name, kw):
    torch_model = getattr(tm, name)(**kw)
    flax_model = getattr(fm, name)(**kw)
    variables = jax.eval_shape(lambda: flax_model.init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 32, 32, 3)), False))
    assert count(variables["params"]) == sum(p.numel() for p in torch_model.parameters())
    sd = torch_model.state_dict()
    converted = convert.torch_to_flax(sd)
    # the converted tree has exactly the structure and shapes flax_impl's init makes
    assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda x: 0, variables))
    shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), converted)
    assert shapes == jax.tree_util.tree_map(lambda x: tuple(x.shape), variables)
    back = convert.flax_to_torch(converted)
    assert set(back) == set(sd)  # (load_state_dict(strict=True) compares names, not order)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            m.num_batches_tracked.fill_(7)


@pytest.mark.parametrize("name, kw, size", [("resnet20", {}, 32),
                                            ("resnet20", {"shortcut": "identity"}, 32),
                                            ("resnet18", {}, 64), ("resnet50", {"stem": "cifar"}, 32)])
def test_float64_logits_and_bn_statistics_agree(name, kw, size):
    """In float64 the two stacks do the same arithmetic up to summation order: agreement to
    1e-10 relative (measured ~1e-15 on logits, ~1e-13 on statistics), far below any real
    difference such as asymmetric padding or a biased running variance (>= 1e-3)."""
    with jax.enable_x64(True):
        torch.manual_seed(0)
        t = getattr(tm, name)(**kw).double()
        _randomise_bn(t)
        f = getattr(fm, name)(**kw, dtype=jnp.float64, param_dtype=jnp.float64)
        v = convert.torch_to_flax(t.state_dict())
        x = torch.randn(3, 3, size, size, dtype=torch.float64)
        xf = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
        t.eval()
        with torch.no_grad():
            want = t(x).numpy()
        got = np.asarray(f.apply(v, xf, train=False))
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-10
        t.train()
        want = t(x).detach().numpy()
        got, updates = f.apply(v, xf, train=True, mutable=["batch_stats"])
        assert np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want) < 1e-10
        after = convert.flax_to_torch({"params": v["params"], "batch_stats": updates["batch_stats"]})
        for key, value in t.state_dict().items():
            if "running" in key:
                diff = (after[key] - value).norm() / value.norm()
                assert diff < 1e-10, (key, float(diff))
            if "num_batches_tracked" in key:
                assert int(after[key]) == int(value) == 8


def test_batchnorm_masked_statistics_equal_the_real_rows():
    """A padded batch with mask 0 on the padding gives the statistics of the real rows alone."""
    bn = fm.BatchNorm(param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 5)) * 3 + 1
    v = bn.init(jax.random.PRNGKey(1), x, False)
    y_real, s_real = bn.apply(v, x[:4], True, mutable=["batch_stats"])
    padded = x.at[4:].set(1e3)  # garbage in the padding must not leak in
    y_pad, s_pad = bn.apply(v, padded, True, jnp.array([1, 1, 1, 1, 0, 0.]),
                            mutable=["batch_stats"])
    np.testing.assert_allclose(y_pad[:4], y_real, rtol=0, atol=2e-6)  # float32 sums, 2 orders
    for k in ("mean", "var"):
        np.testing.assert_allclose(s_pad["batch_stats"][k], s_real["batch_stats"][k], rtol=2e-6)


def test_stride2_padding_is_torchs_not_same():
    """Flax's 'SAME' pads a stride-2 3x3 convolution (0, 1); torch pads (1, 1). The port must
    follow torch, which this checks directly on one layer."""
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    want = torch.nn.functional.conv2d(x, w, stride=2, padding=1).numpy().transpose(0, 2, 3, 1)
    import flax.linen as nn

    with jax.enable_x64(True):
        ours = nn.Conv(4, (3, 3), (2, 2), [(1, 1), (1, 1)], use_bias=False, dtype=jnp.float64,
                       param_dtype=jnp.float64)
        same = nn.Conv(4, (3, 3), (2, 2), "SAME", use_bias=False, dtype=jnp.float64,
                       param_dtype=jnp.float64)
        params = {"params": {"kernel": jnp.asarray(w.numpy().transpose(2, 3, 1, 0))}}
        xf = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
        np.testing.assert_allclose(ours.apply(params, xf), want, rtol=1e-12)
        assert not np.allclose(same.apply(params, xf), want, rtol=1e-3)


def test_convert_does_not_import_torch():
    code = ("import sys, numpy as np; import flax_impl.convert as c; "
            "v = c.torch_to_flax({'fc.weight': np.ones((2, 3), np.float32)}); "
            "print('torch' in sys.modules, v['params']['fc']['kernel'].shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "(3,", "2)"]
