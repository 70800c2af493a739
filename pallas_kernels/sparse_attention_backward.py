"""Backward of sparse MLA attention on the GPU: d_q per query, d_kv scattered into the latent cache with atomics.

For one query token and a block of heads (shapes as in `sparse_attention_reference`; p the forward's softmax over
the token's slots, rebuilt from its log-sum-exp lse; dO the output's cotangent; delta = sum_r dO * out):

    dP[h,j]   = dO[h] . kv[idx_j, :R]                dS[h,j] = p[h,j] * (dP[h,j] - delta[h])
    d_q[h]    = scale * sum_j dS[h,j] kv[idx_j]      (all L = R + P dims)
    d_kv[idx_j] += scale * sum_h dS[h,j] q[h]  +  [sum_h p[h,j] dO[h], 0]   (values are the first R dims)

Two kernels, each walking a token's slots block_k at a time and gathering the latent rows inside the kernel in
column pieces like the forward (`_latent_slots`). The d_q kernel (one program per token and head block) keeps d_q
in registers, one slice per piece. d_kv is a scatter: many tokens select the same key, so the d_kv kernel (one
program per token) sums a slot block's contribution over all heads, block_h at a time, and adds it into an fp32
[B, S+1, L] buffer with relaxed atomic adds (`_triton_ops`), one per piece.
Both rebuild the probabilities: a second pass of matmuls costs less than per-head-block atomics (measured on an
H100: a single kernel adding per head block was 1.7x slower than XLA's gradient of the reference). Row S is a sink
for the -1 slots of a block that also has valid ones, whose adds are discarded; a block of -1 slots only is skipped
(`_pallas.skip_blocks_without_slots`). A slot id repeated within a token (not produced by our top-k, but valid
input) adds once per occurrence, on the GPU and in interpret mode alike, as the reference's gradient does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._latent_slots import LatentSlots
from pallas_kernels._pallas import compiler_params, skip_blocks_without_slots
from pallas_kernels._triton_ops import atomic_add_relaxed


_MATMUL = (((1,), (0,)), ((), ()))


def _head_stats(lse_ref, delta_ref, heads):
    """lse and delta of the heads `heads` (a pl.ds). A head with no valid slot (lse = -inf) or a padded head
    (lse = +inf) must get p = 0 everywhere, so both become +inf."""
    lse = lse_ref[heads]
    return jnp.where(lse == -jnp.inf, jnp.inf, lse), delta_ref[heads]


def _probs_and_grads(slots, q_ref, d_out_ref, heads, lse, delta, ids, values, k_rope, *, scale, precision):
    """A [Hb heads, block_k slots] tile -> (p f32, dS f32), both 0 at -1 slots and for heads with lse = +inf."""
    logits = slots.dot_rows(q_ref, heads, values, k_rope, precision=precision) * scale
    probs = jnp.exp(jnp.where(ids[None, :] >= 0, logits, -jnp.inf) - lse[:, None])
    d_probs = slots.dot_rows(d_out_ref, heads, values, k_rope, precision=precision, with_rope=False)
    return probs, probs * (d_probs - delta[:, None])


def _d_q_kernel(q_ref, kv_ref, idx_ref, d_out_ref, lse_ref, delta_ref, d_q_ref, *, scale: float, value_dim: int,
                rope_dim: int, block_k: int, num_keys: int, precision):
    # q_ref [Hb, R+P], kv_ref [S, R+P], idx_ref [K], d_out_ref [Hb, R], lse_ref/delta_ref f32[Hb], d_q_ref [Hb, R+P]
    heads = pl.ds(0, q_ref.shape[0])
    lse, delta = _head_stats(lse_ref, delta_ref, heads)
    slots = LatentSlots(kv_ref, idx_ref, value_dim=value_dim, rope_dim=rope_dim, block_k=block_k,
                        num_keys=num_keys)

    def matmul(a, b):
        return lax.dot_general(a, b, _MATMUL, preferred_element_type=jnp.float32, precision=precision)

    def slot_block(j, carry):
        d_q_values, d_q_rope = carry
        ids, values, k_rope = slots.gather(j)
        _, d_logits = _probs_and_grads(slots, q_ref, d_out_ref, heads, lse, delta, ids, values, k_rope,
                                       scale=scale, precision=precision)
        ds = d_logits.astype(kv_ref.dtype)
        d_q_values = tuple(acc + matmul(ds, piece) for acc, piece in zip(d_q_values, values, strict=True))
        return d_q_values, d_q_rope + matmul(ds, k_rope)

    num_heads = q_ref.shape[0]
    init = (tuple(jnp.zeros((num_heads, slots.piece), jnp.float32) for _ in slots.starts),
            jnp.zeros((num_heads, rope_dim), jnp.float32))
    d_q_values, d_q_rope = lax.fori_loop(0, slots.num_blocks, slot_block, init)
    for start, acc in zip(slots.starts, d_q_values, strict=True):
        d_q_ref[:, pl.ds(start, slots.piece)] = (acc * scale).astype(d_q_ref.dtype)
    d_q_ref[:, pl.ds(value_dim, rope_dim)] = (d_q_rope * scale).astype(d_q_ref.dtype)


def _d_kv_kernel(q_ref, kv_ref, idx_ref, d_out_ref, lse_ref, delta_ref, _d_kv_zeros_ref, d_kv_ref, *,
                 scale: float, value_dim: int, rope_dim: int, block_k: int, block_h: int, num_keys: int, precision):
    # q_ref [H, R+P] (every head of this token), kv_ref [S, R+P], idx_ref [K], d_out_ref [H, R],
    # lse_ref/delta_ref f32[H], d_kv_ref f32[S+1, R+P] (aliased with _d_kv_zeros_ref: it starts at zero)
    slots = LatentSlots(kv_ref, idx_ref, value_dim=value_dim, rope_dim=rope_dim, block_k=block_k,
                        num_keys=num_keys)

    def dot_t(a, b):  # a [Hb, block_k], b [Hb, X] -> a^T b [block_k, X]
        return lax.dot_general(a.T, b, _MATMUL, preferred_element_type=jnp.float32, precision=precision)

    # Blocks of -1 slots only (the tails of the early tokens' lists in a causal sequence) are skipped, not sent to
    # the sink row, which every program would hammer at once (the indexer's slot-scores backward, built the same
    # way, went from 11.2 to 1.8 ms on an H100 at T = 4096; this kernel's gain is not measured).
    @functools.partial(skip_blocks_without_slots, idx_ref, block_k)
    def slot_block(j, _):
        ids, values, k_rope = slots.gather(j)

        def head_block(h, acc):
            d_values, d_rope = acc
            heads = pl.ds(h * block_h, block_h)
            lse, delta = _head_stats(lse_ref, delta_ref, heads)
            probs, d_logits = _probs_and_grads(slots, q_ref, d_out_ref, heads, lse, delta, ids, values, k_rope,
                                               scale=scale, precision=precision)
            ds, probs = d_logits.astype(q_ref.dtype), probs.astype(d_out_ref.dtype)
            d_values = tuple(acc + dot_t(ds, q_ref[heads, pl.ds(start, slots.piece)]) * scale
                             + dot_t(probs, d_out_ref[heads, pl.ds(start, slots.piece)])
                             for acc, start in zip(d_values, slots.starts, strict=True))
            return d_values, d_rope + dot_t(ds, q_ref[heads, pl.ds(value_dim, rope_dim)]) * scale

        init = (tuple(jnp.zeros((block_k, slots.piece), jnp.float32) for _ in slots.starts),
                jnp.zeros((block_k, rope_dim), jnp.float32))
        d_values, d_rope = lax.fori_loop(0, q_ref.shape[0] // block_h, head_block, init)
        sink = jnp.where(ids >= 0, ids, num_keys)[:, None]
        for start, d_piece in zip(slots.starts, d_values, strict=True):
            atomic_add_relaxed(d_kv_ref, (sink, slots.columns(start, slots.piece)[None, :]), d_piece)
        atomic_add_relaxed(d_kv_ref, (sink, slots.columns(value_dim, rope_dim)[None, :]), d_rope)
        return 0

    lax.fori_loop(0, slots.num_blocks, slot_block, 0)


def _common(q, kv, scale: float, value_dim: int, rope_dim: int, block_k: int) -> dict:
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    return dict(scale=scale, value_dim=value_dim, rope_dim=rope_dim, block_k=block_k, num_keys=kv.shape[1],
                precision=precision)


def sparse_d_q_call(q, kv, indices, d_out, lse, delta, *, scale: float, value_dim: int, rope_dim: int,
                    block_k: int, block_h: int, num_warps: int, interpret: bool):
    """Padded operands as `sparse_backward_call` -> d_q [B,T,Hp,L] (dtype of q)."""
    batch, num_q, heads, width = q.shape
    num_keys, slots = kv.shape[1], indices.shape[-1]
    params = None if interpret else compiler_params(num_warps, num_stages=2)
    # one program per (head block, token), head blocks fastest (measured faster than tokens fastest at 128K)
    return pl.pallas_call(
        functools.partial(_d_q_kernel, **_common(q, kv, scale, value_dim, rope_dim, block_k)),
        grid=(heads // block_h, num_q, batch),
        in_specs=[pl.BlockSpec((None, None, block_h, width), lambda h, t, b: (b, t, h, 0)),
                  pl.BlockSpec((None, num_keys, width), lambda h, t, b: (b, 0, 0)),
                  pl.BlockSpec((None, None, slots), lambda h, t, b: (b, t, 0)),
                  pl.BlockSpec((None, None, block_h, value_dim), lambda h, t, b: (b, t, h, 0)),
                  pl.BlockSpec((None, None, block_h), lambda h, t, b: (b, t, h)),
                  pl.BlockSpec((None, None, block_h), lambda h, t, b: (b, t, h))],
        out_specs=pl.BlockSpec((None, None, block_h, width), lambda h, t, b: (b, t, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=params, name="sparse_mla_backward_q",
    )(q, kv, indices, d_out, lse, delta)


def sparse_d_kv_call(q, kv, indices, d_out, lse, delta, *, scale: float, value_dim: int, rope_dim: int,
                     block_k: int, block_h: int, num_warps: int, interpret: bool):
    """Padded operands as `sparse_backward_call` -> d_kv f32[B,S,L]."""
    batch, num_q, heads, width = q.shape
    num_keys, slots = kv.shape[1], indices.shape[-1]
    params = None if interpret else compiler_params(num_warps, num_stages=2)
    # one program per token sums every head's contribution to a slot block before one (relaxed) atomic add, so
    # the atomics are per token, not per head block
    d_kv = pl.pallas_call(
        functools.partial(_d_kv_kernel, block_h=block_h, **_common(q, kv, scale, value_dim, rope_dim, block_k)),
        grid=(num_q, batch),
        in_specs=[pl.BlockSpec((None, None, heads, width), lambda t, b: (b, t, 0, 0)),
                  pl.BlockSpec((None, num_keys, width), lambda t, b: (b, 0, 0)),
                  pl.BlockSpec((None, None, slots), lambda t, b: (b, t, 0)),
                  pl.BlockSpec((None, None, heads, value_dim), lambda t, b: (b, t, 0, 0)),
                  pl.BlockSpec((None, None, heads), lambda t, b: (b, t, 0)),
                  pl.BlockSpec((None, None, heads), lambda t, b: (b, t, 0)),
                  pl.BlockSpec((None, num_keys + 1, width), lambda t, b: (b, 0, 0))],
        out_specs=pl.BlockSpec((None, num_keys + 1, width), lambda t, b: (b, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, num_keys + 1, width), jnp.float32),
        input_output_aliases={6: 0},
        interpret=interpret, compiler_params=params, name="sparse_mla_backward_kv",
    )(q, kv, indices, d_out, lse, delta, jnp.zeros((batch, num_keys + 1, width), jnp.float32))
    return d_kv[:, :num_keys]


def sparse_backward_call(q, kv, indices, d_out, lse, delta, **kwargs):
    """Padded operands (as `sparse_attention.pad_to_tiles` makes them): q [B,T,Hp,L], kv [B,S,L], indices int32[B,T,Kp]
    (-1 padded to a multiple of block_k), d_out [B,T,Hp,R], lse/delta f32[B,T,Hp] (padded heads: lse = +inf) ->
    d_q [B,T,Hp,L] (dtype of q), d_kv f32[B,S,L]. Keywords: scale, value_dim, rope_dim, block_k, block_h,
    num_warps, interpret."""
    return (sparse_d_q_call(q, kv, indices, d_out, lse, delta, **kwargs),
            sparse_d_kv_call(q, kv, indices, d_out, lse, delta, **kwargs))
