"""MoE: the ragged (dropless, sorted) dispatch equals running every expert; routing obeys the group limit."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import SMALL, rel_err
from indexcache_jax.ffn import MoE


def _moe(seed=0):
    moe = MoE(SMALL, rngs=nnx.Rngs(seed))
    # A non-zero correction bias, so that the biased choice and the unbiased weights differ.
    moe.e_score_correction_bias[...] = jax.random.normal(jax.random.key(seed + 1), (8,)) * 0.1
    return moe


def test_ragged_dispatch_equals_all_experts_reference():
    moe = _moe()
    x = jax.random.normal(jax.random.key(2), (3, 7, SMALL.hidden_size))
    assert rel_err(moe(x), moe.dense_reference(x)) < 1e-5


def test_routing_picks_experts_from_at_most_topk_group_groups_and_scales_weights():
    moe = _moe(3)
    x = jax.random.normal(jax.random.key(4), (50, SMALL.hidden_size))
    weights, ids = moe.route(x)
    m = SMALL.moe
    groups = np.asarray(ids) // (m.n_routed_experts // m.n_group)
    assert max(len(set(row)) for row in groups.tolist()) <= m.topk_group
    assert all(len(set(row)) == m.num_experts_per_tok for row in np.asarray(ids).tolist())  # distinct experts
    np.testing.assert_allclose(weights.sum(-1), m.routed_scaling_factor, rtol=1e-5)  # norm_topk_prob, then scale
    # Weights are the unbiased sigmoid scores of the chosen experts (before normalisation).
    scores = jax.nn.sigmoid(x @ moe.gate[...])
    chosen = jnp.take_along_axis(scores, ids, -1)
    np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True) * m.routed_scaling_factor, rtol=1e-5)
