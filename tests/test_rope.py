"""RoPE rotates pairs: norms are kept, q.k depends only on the position offset, and the two layouts are one
rotation on permuted dims."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL
from indexcache_jax.config import RopeScaling
from indexcache_jax.rope import apply_rope, rope_angles, rope_inv_freq


def angles(positions, dim, theta, rope_scaling=None):
    config = dataclasses.replace(SMALL, qk_rope_head_dim=dim, rope_theta=theta, rope_scaling=rope_scaling)
    return rope_angles(jnp.asarray(positions), config)


@pytest.mark.parametrize("layout", ["interleaved", "half_split"])
def test_norm_kept_and_dot_product_depends_on_offset_only(layout):
    q, k = jax.random.normal(jax.random.key(0), (2, 8))
    def rot(x, pos):
        return apply_rope(x[None, None], *angles([[pos]], 8, 10000.0), layout)[0, 0]
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 7)), jnp.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(rot(q, 9) @ rot(k, 4), rot(q, 105) @ rot(k, 100), rtol=1e-4)
    assert abs(float(rot(q, 9) @ rot(k, 4) - q @ k)) > 1e-3  # and it does depend on the offset


def test_layouts_are_the_same_rotation_on_permuted_dims():
    x = jax.random.normal(jax.random.key(1), (1, 3, 2, 8))
    cos, sin = angles([[0, 5, 11]], 8, 500.0)
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved -> half-split order
    np.testing.assert_allclose(apply_rope(x, cos, sin, "interleaved")[..., perm],
                               apply_rope(x[..., perm], cos, sin, "half_split"), rtol=1e-5, atol=1e-6)


def test_unknown_layout_raises():
    cos, sin = angles(jnp.zeros((1, 1), jnp.int32), 4, 10.0)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(jnp.ones((1, 1, 4)), cos, sin, "spiral")


def test_yarn_keeps_fast_pairs_interpolates_slow_ones_and_scales():
    """YaRN in float64 from its definition: pairs rotating more than beta_fast times over the original context keep
    their frequency, pairs rotating fewer than beta_slow times are divided by the factor, a ramp blends between;
    cos/sin carry mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    dim, theta = 32, 10000.0
    yarn = RopeScaling(factor=8.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                       mscale_all_dim=0.5)
    config = dataclasses.replace(SMALL, qk_rope_head_dim=dim, rope_theta=theta, rope_scaling=yarn)
    base = theta ** (-np.arange(0, dim, 2) / dim)
    rotations = 4096 * base / (2 * np.pi)  # turns of each pair over the original context
    got = rope_inv_freq(config)
    fast, slow = rotations > 32.0 * 1.5, rotations < 1.0 / 1.5  # clear of the ramp's rounded ends
    assert fast.any() and slow.any()
    np.testing.assert_allclose(got[fast], base[fast], rtol=1e-6)
    np.testing.assert_allclose(got[slow], base[slow] / 8.0, rtol=1e-6)
    assert np.all(np.diff(got) < 0)  # still a decreasing set of frequencies
    cos, sin = rope_angles(jnp.array([[3]]), config)
    factor = (0.1 * np.log(8.0) + 1) / (0.1 * 0.5 * np.log(8.0) + 1)
    np.testing.assert_allclose(np.hypot(cos, sin), factor, rtol=1e-6)
    assert abs(config.softmax_scale / config.qk_head_dim ** -0.5 - (0.1 * 0.5 * np.log(8.0) + 1) ** 2) < 1e-9
