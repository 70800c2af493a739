"""Top-k token selection, reference form (the CPU fallback and ground truth for the fast selection kernel).

Convention for every top-k index tensor in this project (`indices`, int32[..., K]):
  * slots [0, n) hold the ids of the n = min(K, number of visible keys) best-scoring visible keys, in ascending
    id order; among equal scores at the cut the lower id is selected (-0.0 and +0.0 are equal scores);
  * slots [n, K) hold -1 ("invalid slot"). Consumers mask -1 slots; they never gather with them.
A key is invisible when its score is -inf (callers mask non-causal keys that way before selecting).

Why ascending ids and not score order: no consumer needs the order (attention and IndexCache use the set), the
GPU selection kernel (`topk.py`) produces ascending ids by stream compaction with no sort, and ascending ids make
the sparse attention's gathers walk the KV cache forward.
"""

import jax
import jax.numpy as jnp

INVALID = -1


def topk_reference(scores, k: int):
    """scores f32[..., S] (-inf = not visible) -> indices int32[..., k] in the convention above."""
    if k <= 0:
        raise ValueError(f"top-k needs k > 0, got {k}")
    if k > scores.shape[-1]:
        raise ValueError(f"top-k over {scores.shape[-1]} keys cannot select k={k}; cap k at the key count")
    scores = jnp.where(scores == 0, 0.0, scores)  # -0.0 ties with +0.0
    # lax.top_k sorts descending and, among equal values, returns the lower index first: that is our tie rule.
    values, indices = jax.lax.top_k(scores, k)
    past_the_end = scores.shape[-1]  # sorts after every real id, then becomes -1
    ids = jnp.sort(jnp.where(values == -jnp.inf, past_the_end, indices), axis=-1)
    return jnp.where(ids == past_the_end, INVALID, ids).astype(jnp.int32)
