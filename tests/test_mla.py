"""MLA: the training form equals the absorbed (MQA) form, and sparse attention equals dense attention when the
selection keeps every key, or dense attention masked to the selected keys when it does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SMALL, rel_err
from indexcache_jax.mla import MLAttention
from indexcache_jax.rope import rope_angles
from pallas_kernels import topk_reference


def _setup(seed=0, b=2, t=10):
    attn = MLAttention(SMALL, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (b, t, SMALL.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    rope = rope_angles(pos, SMALL)
    _, q_nope, q_rope = attn.queries(x, rope)
    return attn, q_nope, q_rope, attn.latent(x, rope), pos


def _all_earlier(b, t):
    """Every visible key, in the top-k convention: query t lists 0..t, then -1."""
    ids = np.arange(t)[None, :].repeat(t, 0)
    return jnp.asarray(np.where(ids <= np.arange(t)[:, None], ids, -1)[None].repeat(b, 0), jnp.int32)


def test_training_form_equals_absorbed_form():
    attn, q_nope, q_rope, kv, pos = _setup()
    dense_mha = attn.attend_dense(q_nope, q_rope, kv, pos)
    sparse_mqa_all_keys = attn.attend_sparse(q_nope, q_rope, kv, _all_earlier(2, 10))
    assert rel_err(sparse_mqa_all_keys, dense_mha) < 1e-5


@pytest.mark.parametrize("k", [3, 6])
def test_sparse_equals_dense_with_the_topk_mask(k):
    attn, q_nope, q_rope, kv, pos = _setup(seed=4)
    scores = jax.random.normal(jax.random.key(9), (2, 10, 10))
    scores = jnp.where(jnp.arange(10)[None, None, :] <= pos[..., None], scores, -jnp.inf)
    idx = topk_reference(scores, k)
    mask = jnp.zeros((2, 10, 10), bool).at[jnp.arange(2)[:, None, None], jnp.arange(10)[None, :, None],
                                           jnp.where(idx >= 0, idx, 0)].max(idx >= 0)
    dense_masked = attn.attend_dense(q_nope, q_rope, kv, pos, mask=mask)
    sparse = attn.attend_sparse(q_nope, q_rope, kv, idx)
    assert rel_err(sparse, dense_masked) < 1e-5
    assert rel_err(sparse, attn.attend_dense(q_nope, q_rope, kv, pos)) > 1e-2  # the selection does matter


def test_bf16_compute_stays_within_bf16_error():
    import dataclasses
    cfg = dataclasses.replace(SMALL, dtype="bfloat16")
    attn32, q_nope, q_rope, kv, pos = _setup(seed=5)
    graphdef, state = nnx.split(attn32)
    attn16 = nnx.merge(nnx.split(MLAttention(cfg, rngs=nnx.Rngs(5)))[0], state)
    out16 = attn16.attend_sparse(q_nope.astype(jnp.bfloat16), q_rope.astype(jnp.bfloat16),
                                 kv.astype(jnp.bfloat16), _all_earlier(2, 10))
    assert out16.dtype == jnp.bfloat16
    assert rel_err(out16, attn32.attend_dense(q_nope, q_rope, kv, pos)) < 3e-2


def test_dense_attention_over_keys_expanded_beforehand_has_the_same_gradient():
    """attend_dense given `expanded` behind a stop-gradient (as the block makes it, once for all query chunks)
    against expanding inside: the same output and the same gradient in the queries, the latent rows and every
    weight (`reuse_expanded_keys` takes the expansion's gradient into the latent rows and W_kvb itself)."""
    attn, q_nope, q_rope, kv, pos = _setup(seed=6)
    graphdef, state = nnx.split(attn)
    cotangent = jax.random.normal(jax.random.key(7), (2, 10, SMALL.hidden_size))

    def objective(state, q_nope, q_rope, kv, beforehand):
        attn = nnx.merge(graphdef, state)
        expanded = jax.lax.stop_gradient(attn.expand_keys(kv)) if beforehand else None
        return jnp.sum(attn.attend_dense(q_nope, q_rope, kv, pos, expanded=expanded) * cotangent)

    def value_and_grads(beforehand):
        return jax.value_and_grad(objective, argnums=(0, 1, 2, 3))(state, q_nope, q_rope, kv, beforehand)

    (want_value, want), (got_value, got) = value_and_grads(False), value_and_grads(True)
    assert abs(float(got_value) - float(want_value)) <= 1e-6 * abs(float(want_value))
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(want)]
    assert any("kv_b_proj" in path for path in paths)
    for path, g, w in zip(paths, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if "indexer" not in path and np.abs(np.asarray(w)).max() > 0:
            assert rel_err(g, w) < 1e-5, path
        else:
            assert np.abs(np.asarray(g)).max() == 0, path
