"""Sparse MLA attention over gathered latent KV, reference form (prefill and decode).

MLA in its absorbed ("MQA") form: every head of a query attends over the same latent keys kv[b,s,:] (c_kv ++ k_rope,
L = R + P wide; 576 in DeepSeek-V3.2) and takes the first R dims (c_kv) as values. Query t of row b attends only to
the keys listed in indices[b,t,:] (the top-k convention of `topk_reference`: -1 slots are ignored):

    out[b,t,h,:] = sum_j softmax_j(scale * q[b,t,h,:] . kv[b, idx_j, :]) * kv[b, idx_j, :R]

Shapes: B batch, T queries, S keys, H heads, L latent key width, R value width, K top-k slots.
"""

import jax.numpy as jnp

from pallas_kernels._blocking import gather_slot_rows, map_query_blocks
from pallas_kernels._softmax import log_sum_exp, probabilities


def _slot_logits(q, rows, valid, scale):
    """q [B,T,H,L], rows [B,T,K,L], valid bool[B,T,K] -> scaled logits f32[B,T,H,K], -inf at invalid slots."""
    logits = jnp.einsum("bthl,btkl->bthk", q, rows, preferred_element_type=jnp.float32) * scale
    return jnp.where(valid[:, :, None, :], logits, -jnp.inf)


def _attend_gathered(q, kv, indices, scale, value_dim):
    """q [B,T,H,L], kv [B,S,L], indices [B,T,K] -> (out [B,T,H,R], lse f32[B,T,H]); gathers [B,T,K,L], never
    per head."""
    rows = gather_slot_rows(kv, indices)
    logits = _slot_logits(q, rows, indices >= 0, scale)
    lse = log_sum_exp(logits)
    out = jnp.einsum("bthk,btkr->bthr", probabilities(logits, lse).astype(kv.dtype), rows[..., :value_dim],
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype), lse


def sparse_attention_distribution_reference(q, kv, indices, *, scale: float, lse=None, block_q: int = 64):
    """The attention distribution over the slots, averaged over heads (= summed, then L1-normalised): what the
    indexer is distilled towards. q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] -> f32[B,T,K] (0 at -1 slots).
    lse f32[B,T,H]: the attention's log-sum-exp (`sparse_mla_reference(..., return_lse=True)`), used as given;
    None computes it."""
    def one_block(q_blk, idx_blk, *lse_blk):
        logits = _slot_logits(q_blk, gather_slot_rows(kv, idx_blk), idx_blk >= 0, scale)
        return jnp.mean(probabilities(logits, lse_blk[0] if lse_blk else log_sum_exp(logits)), axis=2)
    if lse is None:
        return map_query_blocks(one_block, block_q, (q, indices), fills=(0, -1))
    return map_query_blocks(one_block, block_q, (q, indices, lse), fills=(0, -1, -jnp.inf))


def sparse_mla_reference(q, kv, indices, *, scale: float, value_dim: int, block_q: int = 64,
                         return_lse: bool = False):
    """Prefill: q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] -> out [B,T,H,R=value_dim], or with return_lse
    (out, lse f32[B,T,H]): each head's log-sum-exp of its scaled logits over the valid slots, -inf where none is.

    Blocked over queries: at most [B, block_q, K, L] gathered rows and [B, block_q, H, K] logits exist at once.
    """
    out, lse = map_query_blocks(lambda q_blk, idx_blk: _attend_gathered(q_blk, kv, idx_blk, scale, value_dim),
                                block_q, (q, indices), fills=(0, -1))
    return (out, lse) if return_lse else out


def sparse_mla_decode_reference(q, kv, indices, *, scale: float, value_dim: int, return_lse: bool = False):
    """Decode, one new token per row: q [B,H,L], kv [B,S,L], indices int32[B,K] -> out [B,H,R] (and lse f32[B,H]
    with return_lse)."""
    out, lse = _attend_gathered(q[:, None], kv, indices[:, None], scale, value_dim)
    return (out[:, 0], lse[:, 0]) if return_lse else out[:, 0]
