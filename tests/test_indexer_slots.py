"""The indexer's scores over selected slots (`pallas_kernels.indexer_slots`): forward and gradients equal the
float32 reference's, in interpret mode on every platform and compiled on a CUDA GPU (impl "pallas").

Shapes are ragged: heads and widths below the tensor-core minimum, slot counts that are not a multiple of the
slot block, -1 slots (a query with none valid), ids repeated within a token, batch > 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from indexcache_jax.distill import masked_log_softmax
from indexcache_jax.indexer import LightningIndexer
from pallas_kernels import dispatch
from pallas_kernels.indexer_reference import indexer_slot_scores_reference
from pallas_kernels.indexer_slots import indexer_slot_scores_pallas, indexer_slot_scores_trainable

ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["interpret"] + (["pallas"] if ON_GPU else [])
# (B, T, S, G, I, K): below the dot minimum; several slot blocks with a ragged last one; DeepSeek-like widths
SHAPES = [(2, 5, 37, 3, 12, 19), (1, 6, 300, 8, 32, 150), (1, 3, 90, 64, 128, 70)]


def _inputs(seed, b, t, s, g, i, k, dtype):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, g, i), dtype)
    w = jax.random.normal(ks[1], (b, t, g), jnp.float32)
    keys = jax.random.normal(ks[2], (b, s, i), dtype)
    ids = jax.random.randint(ks[3], (b, t, k), 0, s)  # repeats within a token occur at these sizes
    drop = jax.random.uniform(ks[4], (b, t, k)) < 0.25
    ids = jnp.where(drop, -1, ids).at[0, 0].set(-1)  # -1 slots, and one query with no valid slot
    return q, w, keys, ids.astype(jnp.int32)


def _has_repeats(ids):
    rows = np.asarray(ids).reshape(-1, ids.shape[-1])
    return any(len(set(r[r >= 0])) < (r >= 0).sum() for r in rows)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", SHAPES)
def test_slot_scores_and_gradients_equal_the_float32_reference(impl, dtype, tol, shape):
    """Scores, d_q, d_w and d_k for a random cotangent on every slot (the -1 ones included: they must take no
    gradient) against autodiff of the reference in float32."""
    q, w, keys, ids = _inputs(1, *shape, dtype)
    assert _has_repeats(ids) or shape[-1] < 20
    d_scores = jax.random.normal(jax.random.key(2), ids.shape, jnp.float32)
    with jax.default_matmul_precision("highest"):
        want, vjp = jax.vjp(lambda *a: indexer_slot_scores_reference(*a, ids), q.astype(jnp.float32), w,
                            keys.astype(jnp.float32))
        want_grads = vjp(d_scores)
        got, vjp = jax.vjp(lambda *a: indexer_slot_scores_trainable(*a, ids, impl == "interpret"), q, w, keys)
        got_grads = vjp(d_scores)
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32 and got.shape == ids.shape
    assert (got[np.asarray(ids) < 0] == 0).all()
    bound = max(tol, 2e-3) if impl == "pallas" else tol  # the GPU's f32 dots run as 3 bf16 passes
    assert rel_err(got, want) < bound
    for name, g, ref, dt in zip(("d_q", "d_w", "d_k"), got_grads, want_grads, (dtype, jnp.float32, dtype),
                                strict=True):
        assert g.dtype == dt, name
        assert rel_err(g, ref) < bound, name


@pytest.mark.parametrize("impl", IMPLS)
def test_slot_scores_under_jit_vmap_equal_unmapped(impl):
    q, w, keys, ids = _inputs(3, 3, 4, 40, 4, 16, 21, jnp.float32)
    d_scores = jax.random.normal(jax.random.key(4), ids.shape, jnp.float32)

    def loss(q, w, keys, ids, d_scores):
        return jnp.sum(indexer_slot_scores_trainable(q[None], w[None], keys[None], ids[None], impl == "interpret")
                       * d_scores)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    mapped = jax.jit(jax.vmap(grad))(q, w, keys, ids, d_scores)
    for b in range(3):
        single = grad(q[b], w[b], keys[b], ids[b], d_scores[b])
        for got, want in zip(mapped, single, strict=True):
            np.testing.assert_allclose(np.asarray(got[b]), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_slot_scores_name_the_mismatched_input():
    q, w, keys, ids = _inputs(5, 1, 4, 20, 4, 16, 8, jnp.float32)
    for name, bad in (("w", (q, w[:, :, :3], keys, ids)), ("indices", (q, w, keys, ids[:, :3])),
                      ("k", (q, w, keys[:, :, :8], ids))):
        with pytest.raises(ValueError, match=rf"\b{name} has shape"):
            indexer_slot_scores_pallas(*bad, interpret=True)


def test_log_probs_over_slots_use_the_dispatch():
    """The model's sparse-stage distillation reads the indexer through `LightningIndexer.log_probs`: the kernel
    (interpret) and the reference give the same log-probabilities and the same gradients."""
    q, w, keys, ids = _inputs(6, 2, 5, 33, 4, 16, 17, jnp.float32)
    target = jax.nn.softmax(jax.random.normal(jax.random.key(7), ids.shape), axis=-1)

    def loss(impl):
        return lambda *a: -jnp.sum(target * LightningIndexer.log_probs(*a, None, ids, impl=impl))

    with jax.default_matmul_precision("highest"):
        want, want_grads = jax.value_and_grad(loss("reference"), argnums=(0, 1, 2))(q, w, keys)
        got, got_grads = jax.value_and_grad(loss("interpret"), argnums=(0, 1, 2))(q, w, keys)
        direct = dispatch.indexer_slot_scores(q, w, keys, ids, impl="interpret")
        logp = LightningIndexer.log_probs(q, w, keys, None, ids, impl="interpret")
    np.testing.assert_allclose(np.asarray(logp), np.asarray(masked_log_softmax(direct, ids >= 0)), rtol=1e-6)
    assert rel_err(got, want) < 1e-5
    for g, ref in zip(got_grads, want_grads, strict=True):
        assert rel_err(g, ref) < 1e-5
