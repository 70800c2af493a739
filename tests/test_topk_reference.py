"""The top-k convention: the best visible keys in ascending id order, ties to the lower id, then -1 slots."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import INVALID, topk_reference


def _expected(scores: np.ndarray, k: int) -> np.ndarray:
    """Brute force: rank by (-score, id) over the finite entries, keep k, list them by id, pad with -1."""
    out = np.full(scores.shape[:-1] + (k,), INVALID, np.int64)
    for idx in np.ndindex(scores.shape[:-1]):
        row = scores[idx]
        ranked = sorted((i for i in range(row.size) if np.isfinite(row[i])), key=lambda i: (-row[i], i))
        out[idx][:min(k, len(ranked))] = sorted(ranked[:k])
    return out


def test_fewer_visible_than_k_leaves_invalid_slots():
    scores = jnp.array([[0.5, -jnp.inf, -jnp.inf, -jnp.inf], [0.1, 0.9, -jnp.inf, -jnp.inf]])
    np.testing.assert_array_equal(topk_reference(scores, 3), [[0, -1, -1], [0, 1, -1]])


def test_ties_go_to_the_lower_id():
    scores = jnp.array([[1.0, 2.0, 2.0, 1.0, 2.0]])
    np.testing.assert_array_equal(topk_reference(scores, 2), [[1, 2]])
    np.testing.assert_array_equal(topk_reference(scores, 4), [[0, 1, 2, 4]])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 24), st.data())
def test_matches_brute_force_on_random_rows(rows, keys, data):
    k = data.draw(st.integers(1, keys))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Few distinct values so ties are common; some keys invisible.
    scores = rng.integers(0, 5, (rows, keys)).astype(np.float32)
    scores[rng.random((rows, keys)) < 0.3] = -np.inf
    got = np.asarray(topk_reference(jnp.asarray(scores), k))
    np.testing.assert_array_equal(got, _expected(scores, k))
