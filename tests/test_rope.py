"""RoPE rotates pairs: norms are kept, q.k depends only on the position offset, and the two layouts are one
rotation on permuted dims."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from indexcache_jax.rope import apply_rope, rope_angles


@pytest.mark.parametrize("layout", ["interleaved", "half_split"])
def test_norm_kept_and_dot_product_depends_on_offset_only(layout):
    q, k = jax.random.normal(jax.random.key(0), (2, 8))
    def rot(x, pos):
        return apply_rope(x[None, None], *rope_angles(jnp.array([[pos]]), 8, 10000.0), layout)[0, 0]
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 7)), jnp.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(rot(q, 9) @ rot(k, 4), rot(q, 105) @ rot(k, 100), rtol=1e-4)
    assert abs(float(rot(q, 9) @ rot(k, 4) - q @ k)) > 1e-3  # and it does depend on the offset


def test_layouts_are_the_same_rotation_on_permuted_dims():
    x = jax.random.normal(jax.random.key(1), (1, 3, 2, 8))
    cos, sin = rope_angles(jnp.array([[0, 5, 11]]), 8, 500.0)
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved -> half-split order
    np.testing.assert_allclose(apply_rope(x, cos, sin, "interleaved")[..., perm],
                               apply_rope(x[..., perm], cos, sin, "half_split"), rtol=1e-5, atol=1e-6)


def test_unknown_layout_raises():
    cos, sin = rope_angles(jnp.zeros((1, 1), jnp.int32), 4, 10.0)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(jnp.ones((1, 1, 4)), cos, sin, "spiral")
