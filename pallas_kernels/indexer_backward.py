"""Backward of the fused indexer scores on the GPU: the per-head logits are rebuilt tile by tile, never stored.

With I[t,s] = sum_g w[t,g] ReLU(q[t,g] . k[s]) (visible s only) and its cotangent dI[t,s], the mask
m[t,g,s] = 1[q[t,g] . k[s] > 0] and G[t,g,s] = dI[t,s] w[t,g] m[t,g,s]:

    d_w[t,g] = sum_s dI[t,s] ReLU(q[t,g] . k[s])     d_q[t,g] = sum_s G[t,g,s] k[s]
    d_k[s]   = sum_{t,g} G[t,g,s] q[t,g]

Two kernels, so that neither needs atomics: one program per query tile walks the key tiles it can see and keeps
d_q and d_w in registers; one program per key tile walks the query tiles that can see it and keeps d_k. Both use
the forward's layout: a tile's block_q queries x G heads form one [block_q*G, I] operand (query-major rows), so one
tensor-core dot gives every head's logits. Entries the forward set to -inf (s > pos) take no gradient, whatever
their cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._pallas import compiler_params

_CONTRACT_LAST = (((1,), (1,)), ((), ()))
_MATMUL = (((1,), (0,)), ((), ()))


def _tile_terms(keys, q_rows, w_rows, d_scores, positions, first_key, *, block_q, heads, precision):
    """One [block_k keys] x [block_q queries x G heads] tile: (G^T [block_k, rows] in the input dtype, the
    visible-masked cotangent per row dI_rows f32[block_k, rows], the logits f32[block_k, rows])."""
    block_k = keys.shape[0]
    logits = lax.dot_general(keys, q_rows, _CONTRACT_LAST, preferred_element_type=jnp.float32,
                             precision=precision)  # [block_k, rows]
    key_ids = first_key + lax.iota(jnp.int32, block_k)
    visible = key_ids[:, None] <= positions[None, :]  # [block_k, block_q]
    d_visible = jnp.where(visible, d_scores.T, 0.0)
    d_rows = jnp.broadcast_to(d_visible[:, :, None], (block_k, block_q, heads)).reshape(block_k, block_q * heads)
    grad = jnp.where(logits > 0, d_rows * w_rows[None, :], 0.0)
    return grad.astype(keys.dtype), d_rows, logits


def _query_side_kernel(q_ref, w_ref, k_ref, pos_ref, d_ref, d_q_ref, d_w_ref, *, block_q, block_k, heads,
                       num_keys, precision):
    # q_ref [rows, I], w_ref f32[rows], k_ref [S, I] (this row's keys), pos_ref [block_q], d_ref f32[block_q, S],
    # d_q_ref [rows, I], d_w_ref f32[rows]
    q_rows = q_ref[...]
    w_rows = w_ref[...]
    positions = pos_ref[...]
    visible_tiles = jnp.minimum(jnp.max(positions) // block_k + 1, num_keys // block_k)  # 0 if every pos < 0

    def key_tile(j, carry):
        d_q, d_w = carry
        keys = k_ref[pl.ds(j * block_k, block_k), :]
        grad_t, d_rows, logits = _tile_terms(keys, q_rows, w_rows, d_ref[:, pl.ds(j * block_k, block_k)],
                                             positions, j * block_k, block_q=block_q, heads=heads,
                                             precision=precision)
        d_w += jnp.sum(d_rows * jnp.maximum(logits, 0.0), axis=0)
        d_q += lax.dot_general(grad_t.T, keys, _MATMUL, preferred_element_type=jnp.float32, precision=precision)
        return d_q, d_w

    rows = q_rows.shape[0]
    d_q, d_w = lax.fori_loop(0, visible_tiles, key_tile, (jnp.zeros((rows, q_rows.shape[1]), jnp.float32),
                                                          jnp.zeros((rows,), jnp.float32)))
    d_q_ref[...] = d_q.astype(d_q_ref.dtype)
    d_w_ref[...] = d_w


def _key_side_kernel(q_ref, w_ref, k_ref, pos_ref, d_ref, d_k_ref, *, block_q, block_k, heads, precision):
    # q_ref [T/block_q, rows, I] and w_ref f32[T/block_q, rows] (this row's queries), k_ref [block_k, I],
    # pos_ref [T/block_q, block_q], d_ref f32[T, block_k], d_k_ref [block_k, I]
    keys = k_ref[...]
    first_key = pl.program_id(0) * block_k

    def query_tile(i, d_k):
        positions = pos_ref[i]

        def add_tile(d_k):
            q_rows = q_ref[i]  # one load for the logits and the d_k product
            grad_t, _, _ = _tile_terms(keys, q_rows, w_ref[i], d_ref[pl.ds(i * block_q, block_q), :],
                                       positions, first_key, block_q=block_q, heads=heads, precision=precision)
            return d_k + lax.dot_general(grad_t, q_rows, _MATMUL, preferred_element_type=jnp.float32,
                                         precision=precision)

        # Query tiles that see none of these keys (all of them above the diagonal, in causal prefill) add nothing.
        return lax.cond(jnp.max(positions) >= first_key, add_tile, lambda d: d, d_k)

    d_k = lax.fori_loop(0, q_ref.shape[0], query_tile, jnp.zeros(keys.shape, jnp.float32))
    d_k_ref[...] = d_k.astype(d_k_ref.dtype)


def indexer_scores_backward_call(q_rows, w_rows, k, positions, d_scores, *, block_q: int, block_k: int,
                                 heads: int, num_warps: int, interpret: bool):
    """Padded operands in the forward's layout: q_rows [B, T/block_q, block_q*G, I], w_rows f32[B, T/block_q,
    block_q*G], k [B,S,I], positions int32[B, T/block_q, block_q] (-1 for padded queries), d_scores f32[B,T,S]
    (T, S multiples of block_q, block_k) -> (d_q_rows like q_rows, d_w_rows f32 like w_rows, d_k like k)."""
    batch, q_tiles, rows, width = q_rows.shape
    num_keys = k.shape[1]
    precision = lax.Precision.HIGHEST if q_rows.dtype == jnp.float32 else None
    params = None if interpret else compiler_params(num_warps, num_stages=2)
    d_q, d_w = pl.pallas_call(
        functools.partial(_query_side_kernel, block_q=block_q, block_k=block_k, heads=heads, num_keys=num_keys,
                          precision=precision),
        grid=(q_tiles, batch),
        in_specs=[pl.BlockSpec((None, None, rows, width), lambda i, b: (b, i, 0, 0)),
                  pl.BlockSpec((None, None, rows), lambda i, b: (b, i, 0)),
                  pl.BlockSpec((None, num_keys, width), lambda i, b: (b, 0, 0)),
                  pl.BlockSpec((None, None, block_q), lambda i, b: (b, i, 0)),
                  pl.BlockSpec((None, block_q, num_keys), lambda i, b: (b, i, 0))],
        out_specs=[pl.BlockSpec((None, None, rows, width), lambda i, b: (b, i, 0, 0)),
                   pl.BlockSpec((None, None, rows), lambda i, b: (b, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
                   jax.ShapeDtypeStruct(w_rows.shape, jnp.float32)],
        interpret=interpret, compiler_params=params, name="indexer_scores_backward_queries",
    )(q_rows, w_rows, k, positions, d_scores)
    d_k = pl.pallas_call(
        functools.partial(_key_side_kernel, block_q=block_q, block_k=block_k, heads=heads, precision=precision),
        grid=(num_keys // block_k, batch),
        in_specs=[pl.BlockSpec((None, q_tiles, rows, width), lambda j, b: (b, 0, 0, 0)),
                  pl.BlockSpec((None, q_tiles, rows), lambda j, b: (b, 0, 0)),
                  pl.BlockSpec((None, block_k, width), lambda j, b: (b, j, 0)),
                  pl.BlockSpec((None, q_tiles, block_q), lambda j, b: (b, 0, 0)),
                  pl.BlockSpec((None, q_tiles * block_q, block_k), lambda j, b: (b, 0, j))],
        out_specs=pl.BlockSpec((None, block_k, width), lambda j, b: (b, j, 0)),
        out_shape=jax.ShapeDtypeStruct(k.shape, k.dtype),
        interpret=interpret, compiler_params=params, name="indexer_scores_backward_keys",
    )(q_rows, w_rows, k, positions, d_scores)
    return d_q, d_w, d_k
