"""Backward of sparse MLA attention on the GPU: d_q per query, d_kv scattered into the latent cache with atomics.

For one query token and a block of heads (shapes as in `sparse_attention_reference`; p the forward's softmax over
the token's slots, rebuilt from its log-sum-exp lse; dO the output's cotangent; delta = sum_r dO * out):

    dP[h,j]   = dO[h] . kv[idx_j, :R]                dS[h,j] = p[h,j] * (dP[h,j] - delta[h])
    d_q[h]    = scale * sum_j dS[h,j] kv[idx_j]      (all L = R + P dims)
    d_kv[idx_j] += scale * sum_h dS[h,j] q[h]  +  [sum_h p[h,j] dO[h], 0]   (values are the first R dims)

Two kernels, each walking a token's slots block_k at a time and gathering the latent rows inside the kernel like
the forward. The d_q kernel (one program per token and head block) keeps d_q in registers. d_kv is a scatter: many
tokens select the same key, so the d_kv kernel (one program per token) sums a slot block's contribution over all
heads, block_h at a time, and adds it into an fp32 [B, S+1, L] buffer with one relaxed atomic add (`_triton_ops`).
Both rebuild the probabilities: a second pass of matmuls costs less than per-head-block atomics (measured on an
H100: a single kernel adding per head block was 1.7x slower than XLA's gradient of the reference). Row S is a sink for -1 slots,
so that no slot adds into a real row twice within one atomic call (the interpreter applies an indexed add as one
gather-then-set, which would drop a duplicate; the top-k convention has no other repeated ids).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._pallas import compiler_params, load
from pallas_kernels._triton_ops import atomic_add_relaxed


_CONTRACT_LAST = (((1,), (1,)), ((), ()))
_MATMUL = (((1,), (0,)), ((), ()))


class _Slots:
    """One program's view of a token: its slot ids and the gathered latent rows of a block of them."""

    def __init__(self, kv_ref, idx_ref, *, value_dim: int, rope_dim: int, block_k: int, num_keys: int):
        self.kv_ref, self.idx_ref, self.block_k, self.num_keys = kv_ref, idx_ref, block_k, num_keys
        self.nope_cols = lax.iota(jnp.int32, value_dim)
        self.rope_cols = value_dim + lax.iota(jnp.int32, rope_dim)

    def gather(self, j):
        """Slot block j -> (ids int32[block_k], kv_nope [block_k, R], k_rope [block_k, P])."""
        ids = self.idx_ref[pl.ds(j * self.block_k, self.block_k)]
        rows = jnp.clip(ids, 0, self.num_keys - 1)  # -1 slots read row 0; their probabilities are 0
        return (ids, load(self.kv_ref.at[rows[:, None], self.nope_cols[None, :]]),
                load(self.kv_ref.at[rows[:, None], self.rope_cols[None, :]]))


def _probs_and_grads(q_nope, q_rope, d_out, lse, delta, ids, kv_nope, k_rope, *, scale, precision):
    """A [Hb heads, block_k slots] tile -> (p f32, dS f32), both 0 at -1 slots and for heads with lse = +inf."""
    def dot(a, b):
        return lax.dot_general(a, b, _CONTRACT_LAST, preferred_element_type=jnp.float32, precision=precision)
    logits = (dot(q_nope, kv_nope) + dot(q_rope, k_rope)) * scale
    probs = jnp.exp(jnp.where(ids[None, :] >= 0, logits, -jnp.inf) - lse[:, None])
    return probs, probs * (dot(d_out, kv_nope) - delta[:, None])


def _load_heads(q_ref, d_out_ref, lse_ref, delta_ref, heads, *, value_dim, rope_dim):
    """q_nope, q_rope, d_out, lse, delta for the heads `heads` (a pl.ds) of this token."""
    lse = lse_ref[heads]
    # A head with no valid slot (lse = -inf) or a padded head (lse = +inf) must get p = 0 everywhere.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    return (q_ref[heads, pl.ds(0, value_dim)], q_ref[heads, pl.ds(value_dim, rope_dim)], d_out_ref[heads, :],
            lse, delta_ref[heads])


def _d_q_kernel(q_ref, kv_ref, idx_ref, d_out_ref, lse_ref, delta_ref, d_q_ref, *, scale: float, value_dim: int,
                rope_dim: int, block_k: int, num_keys: int, precision):
    # q_ref [Hb, R+P], kv_ref [S, R+P], idx_ref [K], d_out_ref [Hb, R], lse_ref/delta_ref f32[Hb], d_q_ref [Hb, R+P]
    heads = q_ref.shape[0]
    q_nope, q_rope, d_out, lse, delta = _load_heads(q_ref, d_out_ref, lse_ref, delta_ref, pl.ds(0, heads),
                                                    value_dim=value_dim, rope_dim=rope_dim)
    slots = _Slots(kv_ref, idx_ref, value_dim=value_dim, rope_dim=rope_dim, block_k=block_k, num_keys=num_keys)

    def slot_block(j, carry):
        d_q_nope, d_q_rope = carry
        ids, kv_nope, k_rope = slots.gather(j)
        _, d_logits = _probs_and_grads(q_nope, q_rope, d_out, lse, delta, ids, kv_nope, k_rope, scale=scale,
                                       precision=precision)
        ds = d_logits.astype(kv_nope.dtype)
        d_q_nope += lax.dot_general(ds, kv_nope, _MATMUL, preferred_element_type=jnp.float32, precision=precision)
        d_q_rope += lax.dot_general(ds, k_rope, _MATMUL, preferred_element_type=jnp.float32, precision=precision)
        return d_q_nope, d_q_rope

    init = (jnp.zeros((heads, value_dim), jnp.float32), jnp.zeros((heads, rope_dim), jnp.float32))
    d_q_nope, d_q_rope = lax.fori_loop(0, idx_ref.shape[0] // block_k, slot_block, init)
    d_q_ref[:, pl.ds(0, value_dim)] = (d_q_nope * scale).astype(d_q_ref.dtype)
    d_q_ref[:, pl.ds(value_dim, rope_dim)] = (d_q_rope * scale).astype(d_q_ref.dtype)


def _d_kv_kernel(q_ref, kv_ref, idx_ref, d_out_ref, lse_ref, delta_ref, _d_kv_zeros_ref, d_kv_ref, *,
                 scale: float, value_dim: int, rope_dim: int, block_k: int, block_h: int, num_keys: int, precision):
    # q_ref [H, R+P] (every head of this token), kv_ref [S, R+P], idx_ref [K], d_out_ref [H, R],
    # lse_ref/delta_ref f32[H], d_kv_ref f32[S+1, R+P] (aliased with _d_kv_zeros_ref: it starts at zero)
    slots = _Slots(kv_ref, idx_ref, value_dim=value_dim, rope_dim=rope_dim, block_k=block_k, num_keys=num_keys)

    def dot_t(a, b):  # a [Hb, block_k], b [Hb, X] -> a^T b [block_k, X]
        return lax.dot_general(a.T, b, _MATMUL, preferred_element_type=jnp.float32, precision=precision)

    def slot_block(j, _):
        ids, kv_nope, k_rope = slots.gather(j)

        def head_block(h, acc):
            d_nope, d_rope = acc
            q_nope, q_rope, d_out, lse, delta = _load_heads(q_ref, d_out_ref, lse_ref, delta_ref,
                                                            pl.ds(h * block_h, block_h), value_dim=value_dim,
                                                            rope_dim=rope_dim)
            probs, d_logits = _probs_and_grads(q_nope, q_rope, d_out, lse, delta, ids, kv_nope, k_rope,
                                               scale=scale, precision=precision)
            ds = d_logits.astype(q_nope.dtype)
            d_nope += dot_t(ds, q_nope) * scale + dot_t(probs.astype(d_out.dtype), d_out)
            d_rope += dot_t(ds, q_rope) * scale
            return d_nope, d_rope

        init = (jnp.zeros((block_k, value_dim), jnp.float32), jnp.zeros((block_k, rope_dim), jnp.float32))
        d_nope, d_rope = lax.fori_loop(0, q_ref.shape[0] // block_h, head_block, init)
        sink = jnp.where(ids >= 0, ids, num_keys)
        atomic_add_relaxed(d_kv_ref, (sink[:, None], slots.nope_cols[None, :]), d_nope)
        atomic_add_relaxed(d_kv_ref, (sink[:, None], slots.rope_cols[None, :]), d_rope)
        return 0

    lax.fori_loop(0, idx_ref.shape[0] // block_k, slot_block, 0)


def sparse_backward_call(q, kv, indices, d_out, lse, delta, *, scale: float, value_dim: int, rope_dim: int,
                         block_k: int, block_h: int, num_warps: int, interpret: bool):
    """Padded operands (as `sparse_attention._prepare` makes them): q [B,T,Hp,L], kv [B,S,L], indices int32[B,T,Kp]
    (-1 padded to a multiple of block_k), d_out [B,T,Hp,R], lse/delta f32[B,T,Hp] (padded heads: lse = +inf) ->
    d_q [B,T,Hp,L] (dtype of q), d_kv f32[B,S,L]."""
    batch, num_q, heads, width = q.shape
    num_keys, slots = kv.shape[1], indices.shape[-1]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    common = dict(scale=scale, value_dim=value_dim, rope_dim=rope_dim, block_k=block_k, num_keys=num_keys,
                  precision=precision)
    params = None if interpret else compiler_params(num_warps, num_stages=2)
    # d_q: one program per (head block, token), head blocks fastest (measured faster than tokens fastest at 128K).
    d_q = pl.pallas_call(
        functools.partial(_d_q_kernel, **common),
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
    # d_kv: one program per token sums every head's contribution to a slot block before one (relaxed) atomic add,
    # so the atomics are per token, not per head block.
    d_kv = pl.pallas_call(
        functools.partial(_d_kv_kernel, block_h=block_h, **common),
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
    return d_q, d_kv[:, :num_keys]
