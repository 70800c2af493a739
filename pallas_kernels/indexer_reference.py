"""Lightning-indexer scores and the top-k they select, reference form (SPEC §1).

    I[b,t,s] = sum_g w[b,t,g] * ReLU(q[b,t,g,:] . k[b,s,:])     for s <= pos[b,t], else -inf

The callers fold the indexer's constant scales (index_n_heads^-0.5 and index_head_dim^-0.5) into `w`: ReLU is
positively homogeneous, so c * ReLU(a) == ReLU(c * a) for c > 0, and the kernel stays a plain weighted sum.
Shapes: B batch, T queries, S keys, G indexer heads, I indexer head width, K top-k slots.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._blocking import map_query_blocks
from pallas_kernels.topk_reference import topk_reference


def indexer_scores_reference(q, w, k, q_positions):
    """q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> scores f32[B,T,S] (-inf where s > pos)."""
    logits = jnp.einsum("btgi,bsi->btsg", q, k, preferred_element_type=jnp.float32)
    scores = jnp.einsum("btsg,btg->bts", jax.nn.relu(logits), w.astype(jnp.float32))
    visible = jnp.arange(k.shape[1])[None, None, :] <= q_positions[:, :, None]
    return jnp.where(visible, scores, -jnp.inf)


def indexer_topk_reference(q, w, k, q_positions, *, topk: int, block_q: int = 128):
    """Top-k key ids per query: q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> int32[B,T,topk].

    Blocked over queries so that at most [B, block_q, S, G] logits exist at once, never [B, T, S, G].
    """
    def one_block(q_blk, w_blk, pos_blk):
        return topk_reference(indexer_scores_reference(q_blk, w_blk, k, pos_blk), topk)

    # Padded queries sit at position -1: they see no key and select nothing.
    return map_query_blocks(one_block, block_q, (q, w, q_positions), fills=(0, 0, -1))


def indexer_topk_decode_reference(q, w, k, q_positions, *, topk: int):
    """Decode, one new token per row: q [B,G,I], w [B,G], k [B,S,I], q_positions int[B] -> int32[B,topk]."""
    return topk_reference(indexer_scores_reference(q[:, None], w[:, None], k, q_positions[:, None]), topk)[:, 0]
