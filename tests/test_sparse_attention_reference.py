"""Sparse MLA over gathered latent rows equals softmax attention restricted to the listed keys (float64 check)."""

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err
from pallas_kernels import sparse_mla_decode_reference, sparse_mla_reference


def _numpy_sparse(q, kv, idx, scale, r):
    q, kv = np.asarray(q, np.float64), np.asarray(kv, np.float64)
    b_, t_, h_, _ = q.shape
    out = np.zeros((b_, t_, h_, r))
    for b in range(b_):
        for t in range(t_):
            keys = [int(i) for i in idx[b, t] if i >= 0]
            if not keys:
                continue
            rows = kv[b, keys]  # [k, L]
            logits = scale * q[b, t] @ rows.T  # [H, k]
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, t] = p @ rows[:, :r]
    return out


def _random_indices(rng, b, t, s, k):
    """Distinct ids per query with some -1 slots, as the indexer would produce."""
    idx = np.full((b, t, k), -1, np.int32)
    for bi in range(b):
        for ti in range(t):
            n = rng.integers(1, min(k, s) + 1)
            idx[bi, ti, :n] = rng.choice(s, n, replace=False)
    return idx


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 12), st.integers(1, 6), st.integers(1, 3),
       st.integers(0, 2**31 - 1))
def test_matches_float64_softmax_over_listed_keys(b, t, s, k, h, seed):
    rng = np.random.default_rng(seed)
    r, p = 8, 4
    q = rng.standard_normal((b, t, h, r + p)).astype(np.float32)
    kv = rng.standard_normal((b, s, r + p)).astype(np.float32)
    idx = _random_indices(rng, b, t, s, k)
    got = sparse_mla_reference(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx), scale=0.3, value_dim=r,
                               block_q=4)
    assert rel_err(got, _numpy_sparse(q, kv, idx, 0.3, r)) < 1e-5


def test_bf16_inputs_stay_within_bf16_error():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 16, 4, 24)).astype(np.float32)
    kv = rng.standard_normal((2, 40, 24)).astype(np.float32)
    idx = _random_indices(rng, 2, 16, 40, 8)
    got = sparse_mla_reference(jnp.asarray(q, jnp.bfloat16), jnp.asarray(kv, jnp.bfloat16), jnp.asarray(idx),
                               scale=0.2, value_dim=16)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, _numpy_sparse(q, kv, idx, 0.2, 16)) < 2e-2


def test_duplicate_free_order_does_not_matter_and_invalid_slots_are_ignored():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 3, 2, 12)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, 9, 12)), jnp.float32)
    idx = jnp.array([[[4, 1, 7, -1, -1], [2, -1, 8, -1, 0], [5, 6, 3, 0, 1]]], jnp.int32)
    shuffled = idx[..., ::-1]
    a = sparse_mla_reference(q, kv, idx, scale=0.5, value_dim=8)
    np.testing.assert_allclose(a, sparse_mla_reference(q, kv, shuffled, scale=0.5, value_dim=8), rtol=1e-6)
    # Invalid slots are gathered from row 0 internally; changing row 0 must not affect query 0 (which does not
    # list it) but must affect query 1 (which does).
    b = sparse_mla_reference(q, kv.at[0, 0].set(100.0), idx, scale=0.5, value_dim=8)
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-6)
    assert not np.allclose(a[:, 1], b[:, 1])


def test_decode_form_equals_one_query_prefill():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((3, 1, 4, 12)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((3, 20, 12)), jnp.float32)
    idx = jnp.asarray(_random_indices(rng, 3, 1, 20, 6))
    np.testing.assert_allclose(sparse_mla_decode_reference(q[:, 0], kv, idx[:, 0], scale=0.4, value_dim=8),
                               sparse_mla_reference(q, kv, idx, scale=0.4, value_dim=8)[:, 0], rtol=1e-6)


def test_gradients_flow_through_the_reference():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 12)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, 6, 12)), jnp.float32)
    idx = jnp.asarray(_random_indices(rng, 1, 4, 6, 3))
    loss = lambda q, kv: jnp.sum(sparse_mla_reference(q, kv, idx, scale=0.5, value_dim=8) ** 2)  # noqa: E731
    jax.test_util.check_grads(loss, (q, kv), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
