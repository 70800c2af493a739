"""Top-k token selection, reference form (the CPU fallback and ground truth for the fast selection kernel).

Convention for every top-k index tensor in this project (`indices`, int32[..., K]):
  * slots [0, n) hold the ids of the n = min(K, number of visible keys) best-scoring visible keys, in descending
    score order; equal scores are ordered by ascending key id (the lower id wins a tie at the cut);
  * slots [n, K) hold -1 ("invalid slot"). Consumers mask -1 slots; they never gather with them.
A key is invisible when its score is -inf (callers mask non-causal keys that way before selecting).
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
    # lax.top_k sorts descending and, among equal values, returns the lower index first: that is our tie rule.
    values, indices = jax.lax.top_k(scores, k)
    return jnp.where(values == -jnp.inf, INVALID, indices).astype(jnp.int32)
