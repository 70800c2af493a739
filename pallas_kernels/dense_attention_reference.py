"""Causal dense MLA attention in its training ("MHA") form, reference: what the dense stages attend with.

Every head h of query t attends over every key s <= q_positions[b,t] with per-head keys and values (expanded from
the latent rows by W_kvb, `mla.MLAttention.expand_keys`) and the rope key shared by all heads:

    logits[b,h,t,s] = scale * (q_nope[b,t,h,:] . k_nope[b,s,h,:] + q_rope[b,t,h,:] . k_rope[b,s,:])
    out[b,t,h,:]    = sum_s softmax_s(logits[b,h,t,:]) * values[b,s,h,:]
    dist[b,t,s]     = 1/H sum_h softmax_s(logits[b,h,t,:])[s]      (the dense warm-up's distillation target)

This form materialises the [B,H,T,S] fp32 logits (8.6 GB per 1024 queries of a 128K context at 128 heads): the
ground truth and the CPU path; `dense_attention` is the GPU kernel pair that never stores them.
Shapes: B batch, T queries, S keys, H heads, N qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._softmax import log_sum_exp, probabilities


def dense_logits(q_nope, q_rope, k_nope, k_rope, q_positions, *, scale: float, mask=None):
    """-> scaled logits f32[B,H,T,S], -inf where key s is not visible to query t: s > q_positions[b,t] or (mask
    bool[B,T,S] given) not mask[b,t,s]."""
    logits = (jnp.einsum("bthn,bshn->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bthp,bsp->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
    visible = jnp.arange(k_nope.shape[1])[None, None, :] <= q_positions[:, :, None]  # [B,T,S]
    if mask is not None:
        visible = visible & mask
    return jnp.where(visible[:, None], logits * scale, -jnp.inf)


def dense_attention_reference(q_nope, q_rope, k_nope, k_rope, values, q_positions, *, scale: float,
                              return_lse: bool = False, mask=None):
    """q_nope [B,T,H,N], q_rope [B,T,H,P], k_nope [B,S,H,N], k_rope [B,S,P], values [B,S,H,V], q_positions int[B,T]
    -> out [B,T,H,V] (dtype of values), or with return_lse (out, lse f32[B,T,H]: each head's log-sum-exp over its
    visible keys, -inf where none is). A query with nothing visible gets zeros. mask bool[B,T,S]: also hide key s
    from query t where False (what makes this the ground truth of sparse attention). Differentiable (autodiff)."""
    logits = dense_logits(q_nope, q_rope, k_nope, k_rope, q_positions, scale=scale, mask=mask)
    lse = log_sum_exp(logits)  # [B,H,T]
    probs = probabilities(logits, lse)
    out = jnp.einsum("bhts,bshv->bthv", probs.astype(values.dtype), values)
    return (out, jnp.moveaxis(lse, 1, 2)) if return_lse else out


def dense_attention_distribution_reference(q_nope, q_rope, k_nope, k_rope, q_positions, *, scale: float, lse=None,
                                           mask=None):
    """The head-averaged attention distribution over all keys -> f32[B,T,S] (0 where not visible). lse f32[B,T,H]:
    the attention's log-sum-exp (`dense_attention_reference(..., return_lse=True)`), used as given; None computes
    it. Inputs as in `dense_attention_reference`."""
    logits = dense_logits(q_nope, q_rope, k_nope, k_rope, q_positions, scale=scale, mask=mask)
    lse = log_sum_exp(logits) if lse is None else jnp.moveaxis(lse, 2, 1)
    return jnp.mean(probabilities(logits, lse), axis=1)


def dense_attention_with_distribution_reference(q_nope, q_rope, k_nope, k_rope, values, q_positions, *,
                                                scale: float, mask=None):
    """(`dense_attention_reference`'s out, `dense_attention_distribution_reference`'s distribution, stop-gradient)
    from one set of logits. Inputs as in `dense_attention_reference`."""
    logits = dense_logits(q_nope, q_rope, k_nope, k_rope, q_positions, scale=scale, mask=mask)
    probs = probabilities(logits, log_sum_exp(logits))
    out = jnp.einsum("bhts,bshv->bthv", probs.astype(values.dtype), values)
    return out, jax.lax.stop_gradient(jnp.mean(probs, axis=1))
