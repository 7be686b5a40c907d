"""What flax_impl's models and conversion do beyond the cross-framework proofs in parity_tests
(parameter counts, round trips, float64 agreement and the padding/BatchNorm traps are there)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flax_impl import models as fm


def test_batchnorm_masked_statistics_equal_the_real_rows():
    """A padded batch with mask 0 on the padding gives the statistics of the real rows alone."""
    bn = fm.BatchNorm(param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 5)) * 3 + 1
    v = bn.init(jax.random.PRNGKey(1), x, False)
    y_real, s_real = bn.apply(v, x[:4], True, mutable=["batch_stats"])
    padded = x.at[4:].set(1e3)  # garbage in the padding must not leak in
    y_pad, s_pad = bn.apply(
        v, padded, True, jnp.array([1, 1, 1, 1, 0, 0.0]), mutable=["batch_stats"]
    )
    # the masked sums add the same 64 float32 values per channel as the unmasked ones, in
    # another order: they differ by a few float32 ulps of values of size ~3 (2e-6 covers ~8
    # ulps), while padding leaking in (1e3 in a third of the rows) would move them by ~1e2
    np.testing.assert_allclose(y_pad[:4], y_real, rtol=0, atol=2e-6)
    for k in ("mean", "var"):
        np.testing.assert_allclose(s_pad["batch_stats"][k], s_real["batch_stats"][k], rtol=2e-6)


def test_the_public_mapping_does_not_import_torch():
    """`flax_impl.convert` (the names users import) is the NumPy mapping; it needs no torch."""
    code = (
        "import sys, numpy as np; import flax_impl.convert as c; "
        "v = c.torch_to_flax({'fc.weight': np.ones((2, 3), np.float32)}); "
        "print('torch' in sys.modules, v['params']['fc']['kernel'].shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "(3,", "2)"]
