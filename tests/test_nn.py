"""`project`: the einsum every layer's weights go through, whose gradient the training step sums over query chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from indexcache_jax.nn import project

# Every spec the model uses: plain, per-head, head-summing, ellipsis (MLP, LM head), experts.
SPECS = [("btd,dq->btq", (2, 5, 24), (24, 16)), ("btq,qhe->bthe", (2, 5, 16), (16, 3, 8)),
         ("bthv,hvd->btd", (2, 5, 3, 8), (3, 8, 24)), ("...d,vd->...v", (2, 5, 24), (40, 24)),
         ("...f,fd->...d", (7, 32), (32, 24)), ("md,edf->mef", (6, 24), (4, 24, 8))]


@pytest.mark.parametrize("spec, x_shape, w_shape", SPECS)
@pytest.mark.parametrize("jit", [False, True])
def test_project_gradients_equal_autodiff_and_keep_the_weights_gradient_in_float32(spec, x_shape, w_shape, jit):
    """bf16 compute, float32 master weight: the input's gradient as autodiff gives it (in the input's dtype); the
    weight's as autodiff's, computed in float32 from the same bf16 operands, so closer to the exact gradient than
    autodiff's bf16 one and not rounded to bf16 (which a cast after a bf16 dot would leave it)."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape, jnp.bfloat16)
    w = nnx.Param(jax.random.normal(keys[1], w_shape, jnp.float32))
    out_shape = jnp.einsum(spec, x, w[...].astype(jnp.bfloat16)).shape
    cotangent = jax.random.normal(keys[2], out_shape, jnp.float32)

    def loss(einsum):
        return lambda x, w: jnp.sum(einsum(x, w).astype(jnp.float32) * cotangent)
    ours = loss(lambda x, w: project(spec, x, nnx.Param(w), jnp.bfloat16))
    autodiff = loss(lambda x, w: jnp.einsum(spec, x, w.astype(jnp.bfloat16)))
    grad = jax.grad(ours, argnums=(0, 1))
    d_x, d_w = (jax.jit(grad) if jit else grad)(x, w[...])
    want_x, want_w = jax.grad(autodiff, argnums=(0, 1))(x, w[...])
    # the exact gradient of the bf16 einsum's output (its cotangent rounded to bf16, as both see it)
    exact_w = jax.grad(lambda w: jnp.sum(jnp.einsum(spec, x.astype(jnp.float32), w) *
                                         cotangent.astype(jnp.bfloat16).astype(jnp.float32)))(
        w[...].astype(jnp.bfloat16).astype(jnp.float32))
    assert d_x.dtype == jnp.bfloat16 and d_w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(d_x, np.float32), np.asarray(want_x, np.float32))
    assert rel_err(d_w, exact_w) < 1e-5
    assert rel_err(want_w, exact_w) > 1e-4  # autodiff's: rounded to bf16
    assert np.any(np.asarray(d_w) != np.asarray(d_w.astype(jnp.bfloat16).astype(jnp.float32)))


def test_project_keeps_float32_inputs_gradient_in_float32():
    x = jax.random.normal(jax.random.key(1), (4, 24), jnp.float32)
    w = jax.random.normal(jax.random.key(2), (24, 8), jnp.float32)
    d_x, d_w = jax.grad(lambda x, w: jnp.sum(project("td,dq->tq", x, nnx.Param(w), jnp.bfloat16) ** 2),
                        argnums=(0, 1))(x, w)
    assert d_x.dtype == jnp.float32 and d_w.dtype == jnp.float32 and d_x.shape == x.shape


def test_compute_copies_cast_the_matrices_and_the_projection_reads_them_with_the_gradient_to_the_weight():
    """A copy per weight of two or more dims (not the norm's vector, not one already in the compute dtype); a
    module with copies projects with them (a doubled copy doubles the output) and sends the gradient to the
    float32 weight, as it does without them; a wrong number of copies is named."""
    from indexcache_jax.nn import RMSNorm, compute_copies, weight, with_compute_copies  # noqa: PLC0415
    from conftest import SMALL  # noqa: PLC0415

    class Two(nnx.Module):
        def __init__(self):
            self.norm = RMSNorm(24, 1e-6)
            self.w = weight(nnx.Rngs(0), SMALL, 24, 16)
            self.already = nnx.Param(jnp.ones((16, 8), jnp.bfloat16))

        def __call__(self, x):
            return project("bd,dq->bq", self.norm(x), self.w, jnp.bfloat16)

    module = Two()
    copies = compute_copies(module, jnp.bfloat16)
    assert sorted((c is None, None if c is None else c.dtype.name) for c in copies) == [
        (False, "bfloat16"), (True, None), (True, None)]
    x = jax.random.normal(jax.random.key(3), (5, 24), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(with_compute_copies(module, copies)(x), np.float32),
                                  np.asarray(module(x), np.float32))
    doubled = with_compute_copies(module, [None if c is None else 2 * c for c in copies])
    np.testing.assert_array_equal(np.asarray(doubled(x), np.float32), 2 * np.asarray(module(x), np.float32))

    def grad_of_w(make):
        graphdef, state = nnx.split(module)
        return jax.grad(lambda s: jnp.sum(make(nnx.merge(graphdef, s))(x).astype(jnp.float32)))(state)["w"][...]
    with_copies = grad_of_w(lambda m: with_compute_copies(m, compute_copies(m, jnp.bfloat16)))
    assert with_copies.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(with_copies), np.asarray(grad_of_w(lambda m: m)))
    with pytest.raises(ValueError, match="2 compute copies for a module of 3 Params"):
        with_compute_copies(module, copies[:2])
