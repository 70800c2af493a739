"""Indexer scores follow SPEC §1's formula; the blocked top-k equals selection over whole rows and is causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import indexer_scores_reference, indexer_topk, indexer_topk_reference, topk_reference


def _inputs(seed, b=2, t=11, s=11, g=3, i=8):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, (b, t, g, i))
    w = jax.random.normal(k2, (b, t, g))
    k = jax.random.normal(k3, (b, s, i))
    pos = jnp.broadcast_to(jnp.arange(t) + (s - t), (b, t))
    return q, w, k, pos


def test_scores_equal_the_formula_in_float64():
    q, w, k, pos = _inputs(0)
    got = np.asarray(indexer_scores_reference(q, w, k, pos))
    qn, wn, kn = (np.asarray(x, np.float64) for x in (q, w, k))
    for b in range(2):
        for t in range(11):
            for s in range(11):
                if s > pos[b, t]:
                    assert got[b, t, s] == -np.inf
                else:
                    expected = sum(wn[b, t, g] * max(0.0, qn[b, t, g] @ kn[b, s]) for g in range(3))
                    assert got[b, t, s] == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("block_q", [1, 4, 5, 64])
@pytest.mark.parametrize("topk", [3, 11])
def test_blocked_topk_equals_whole_rows_and_never_selects_the_future(block_q, topk):
    q, w, k, pos = _inputs(1, t=9, s=12)  # queries at positions 3..11 of a 12-key buffer
    got = np.asarray(indexer_topk_reference(q, w, k, pos, topk=topk, block_q=block_q))
    expected = np.asarray(topk_reference(indexer_scores_reference(q, w, k, pos), topk))
    np.testing.assert_array_equal(got, expected)
    valid = got >= 0
    assert (got[valid] <= np.broadcast_to(np.asarray(pos)[..., None], got.shape)[valid]).all()
    # Slot n is filled iff n < number of visible keys (pos + 1).
    np.testing.assert_array_equal(valid, np.arange(topk)[None, None, :] < np.asarray(pos)[..., None] + 1)


def test_decode_dispatch_equals_prefill_row():
    q, w, k, pos = _inputs(2, t=1, s=10)
    prefill_form = indexer_topk_reference(q, w, k, pos, topk=4)
    np.testing.assert_array_equal(indexer_topk(q, w, k, pos, topk=4), prefill_form)


def test_unknown_impl_or_pallas_without_a_gpu_is_a_clear_error():
    q, w, k, pos = _inputs(3)
    with pytest.raises(ValueError, match="impl must be one of"):
        indexer_topk(q, w, k, pos, topk=2, impl="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="impl='pallas' compiles for a CUDA GPU"):
            indexer_topk(q, w, k, pos, topk=2, impl="pallas")
