"""Sparse MLA attention over gathered latent KV, reference form (prefill and decode).

MLA in its absorbed ("MQA") form: every head of a query attends over the same latent keys kv[b,s,:] (c_kv ++ k_rope,
L = R + P wide; 576 in DeepSeek-V3.2) and takes the first R dims (c_kv) as values. Query t of row b attends only to
the keys listed in indices[b,t,:] (the top-k convention of `topk_reference`: -1 slots are ignored):

    out[b,t,h,:] = sum_j softmax_j(scale * q[b,t,h,:] . kv[b, idx_j, :]) * kv[b, idx_j, :R]

Shapes: B batch, T queries, S keys, H heads, L latent key width, R value width, K top-k slots.
"""

import jax.numpy as jnp

from pallas_kernels._blocking import gather_slot_rows, map_query_blocks


def _slot_probs(q, rows, valid, scale):
    """q [B,T,H,L], rows [B,T,K,L], valid bool[B,T,K] -> softmax over the valid slots f32[B,T,H,K]."""
    logits = jnp.einsum("bthl,btkl->bthk", q, rows, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    # A query with no valid slot (only a padded, position -1 query) gets zeros instead of NaN.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(logits - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    return probs / jnp.where(denom > 0, denom, 1.0)


def _attend_gathered(q, kv, indices, scale, value_dim):
    """q [B,T,H,L], kv [B,S,L], indices [B,T,K] -> out [B,T,H,R]; gathers [B,T,K,L], never per head."""
    rows = gather_slot_rows(kv, indices)
    probs = _slot_probs(q, rows, indices >= 0, scale)
    out = jnp.einsum("bthk,btkr->bthr", probs.astype(kv.dtype), rows[..., :value_dim],
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def sparse_attention_distribution(q, kv, indices, *, scale: float, block_q: int = 64):
    """The attention distribution over the slots, averaged over heads (= summed, then L1-normalised): what the
    indexer is distilled towards. q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] -> f32[B,T,K] (0 at -1 slots)."""
    def one_block(q_blk, idx_blk):
        return jnp.mean(_slot_probs(q_blk, gather_slot_rows(kv, idx_blk), idx_blk >= 0, scale), axis=2)
    return map_query_blocks(one_block, block_q, (q, indices), fills=(0, -1))


def sparse_mla_reference(q, kv, indices, *, scale: float, value_dim: int, block_q: int = 64):
    """Prefill: q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] -> out [B,T,H,R=value_dim].

    Blocked over queries: at most [B, block_q, K, L] gathered rows and [B, block_q, H, K] logits exist at once.
    """
    return map_query_blocks(lambda q_blk, idx_blk: _attend_gathered(q_blk, kv, idx_blk, scale, value_dim),
                            block_q, (q, indices), fills=(0, -1))


def sparse_mla_decode_reference(q, kv, indices, *, scale: float, value_dim: int):
    """Decode, one new token per row: q [B,H,L], kv [B,S,L], indices int32[B,K] -> out [B,H,R]."""
    return _attend_gathered(q[:, None], kv, indices[:, None], scale, value_dim)[:, 0]
