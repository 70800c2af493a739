"""Lightning-indexer scores on the GPU, fused: the per-head logits never reach HBM (SPEC §1).

    I[b,t,s] = sum_g w[b,t,g] * ReLU(q[b,t,g,:] . k[b,s,:])     for s <= pos[b,t], else -inf

One program scores a [block_q, block_k] tile: the block_q queries' G heads form one [block_q*G, I] operand, so a
single tensor-core dot against the key tile gives every head's logits at once ([block_q*G, block_k], fp32
accumulation); ReLU, the head weights and the sum over heads happen in registers. Tiles wholly above the causal
diagonal are written as -inf without any arithmetic. Shapes as in `indexer_reference`.

`indexer_topk_pallas` chunks the queries so that one chunk's scores ([B, chunk, S] fp32) stay under a memory
budget, scores each chunk with this kernel and selects with `topk.topk_pallas`, which stops each row at its
causal length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._blocking import map_query_blocks
from pallas_kernels._pallas import compiler_params, dot_size, next_pow2, pad_axis, round_up
from pallas_kernels.topk import topk_pallas


def _scores_kernel(q_ref, w_ref, k_ref, pos_ref, out_ref, *, block_q: int, block_k: int, heads: int, precision,
                   keys_major: bool):
    # q_ref [block_q*G, I], w_ref [block_q*G], k_ref [block_k, I], pos_ref [block_q], out_ref [block_q, block_k]
    first_key = pl.program_id(2) * block_k
    positions = pos_ref[...]
    last_visible = jnp.max(positions)

    @pl.when(first_key > last_visible)
    def _():
        out_ref[...] = jnp.full((block_q, block_k), -jnp.inf, jnp.float32)

    @pl.when(first_key <= last_visible)
    def _():
        if keys_major:
            # logits^T [block_k, block_q*G]: the head sum runs along the accumulator's columns, which a warp holds
            # (shuffles), instead of along its rows, which span warps (a trip through shared memory).
            logits = lax.dot_general(k_ref[...], q_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32, precision=precision)
            weighted = jnp.maximum(logits, 0.0) * w_ref[...].astype(jnp.float32)[None, :]
            scores = jnp.sum(weighted.reshape(block_k, block_q, heads), axis=2).T
        else:
            logits = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32, precision=precision)  # [block_q*G, block_k]
            weighted = jnp.maximum(logits, 0.0) * w_ref[...].astype(jnp.float32)[:, None]
            scores = jnp.sum(weighted.reshape(block_q, heads, block_k), axis=1)
        key_ids = first_key + lax.iota(jnp.int32, block_k)
        out_ref[...] = jnp.where(key_ids[None, :] <= positions[:, None], scores, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("interpret", "block_k", "rows_per_tile", "num_warps", "num_stages",
                                             "keys_major"))
def indexer_scores_pallas(q, w, k, q_positions, *, interpret: bool = False, block_k: int = 128,
                          rows_per_tile: int = 128, num_warps: int = 4, num_stages: int = 4,
                          keys_major: bool = True):
    """q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> scores f32[B,T,S] (-inf where s > pos).

    A tile holds rows_per_tile // G queries (at least one) times all G heads. The defaults won a sweep on an H100
    at DeepSeek-V3.2 shapes (docs/BENCHMARKS.md, `scripts/bench_kernels.py --sweep`)."""
    batch, num_q, heads, width = q.shape
    num_keys = k.shape[1]
    heads_p, width_p = dot_size(heads), dot_size(width)  # zero heads (w = 0) and zero dims change nothing
    block_q = max(1, rows_per_tile // heads_p)
    block_k = min(block_k, dot_size(num_keys))
    num_q_p, num_keys_p = round_up(num_q, block_q), round_up(num_keys, block_k)
    q = pad_axis(pad_axis(pad_axis(q, 3, width_p), 2, heads_p), 1, num_q_p)
    w = pad_axis(pad_axis(w, 2, heads_p), 1, num_q_p)
    k = pad_axis(pad_axis(k.astype(q.dtype), 2, width_p), 1, num_keys_p)
    positions = pad_axis(q_positions.astype(jnp.int32), 1, num_q_p, -1)  # padded queries see nothing
    q_rows = q.reshape(batch, num_q_p * heads_p, width_p)  # [B, T*G, I]: one tile = block_q queries x G heads
    w_rows = w.reshape(batch, num_q_p * heads_p)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_scores_kernel, block_q=block_q, block_k=block_k, heads=heads_p, precision=precision,
                               keys_major=keys_major)
    rows = block_q * heads_p
    scores = pl.pallas_call(
        kernel,
        grid=(batch, num_q_p // block_q, num_keys_p // block_k),
        in_specs=[pl.BlockSpec((None, rows, width_p), lambda b, i, j: (b, i, 0)),
                  pl.BlockSpec((None, rows), lambda b, i, j: (b, i)),
                  pl.BlockSpec((None, block_k, width_p), lambda b, i, j: (b, j, 0)),
                  pl.BlockSpec((None, block_q), lambda b, i, j: (b, i))],
        out_specs=pl.BlockSpec((None, block_q, block_k), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((batch, num_q_p, num_keys_p), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(num_warps, num_stages=num_stages),
        name="indexer_scores",
    )(q_rows, w_rows, k, positions)
    return scores[:, :num_q, :num_keys]


def indexer_topk_pallas(q, w, k, q_positions, *, topk: int, interpret: bool = False,
                        chunk_bytes: int = 1 << 30):
    """q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> int32[B,T,topk] (the top-k convention).

    Queries go in chunks whose fp32 scores take at most chunk_bytes ([B, chunk, S])."""
    batch, num_q = q.shape[:2]
    num_keys = k.shape[1]
    chunk = max(1, min(num_q, chunk_bytes // (4 * batch * num_keys)))
    chunk = next_pow2(chunk) // 2 if next_pow2(chunk) > chunk else chunk  # a power of two, for even tiles

    def one_chunk(q_c, w_c, pos_c):
        scores = indexer_scores_pallas(q_c, w_c, k, pos_c, interpret=interpret)
        return topk_pallas(scores, topk, pos_c + 1, interpret=interpret)  # each row stops at its causal length

    if chunk >= num_q:
        return one_chunk(q, w, q_positions)
    return map_query_blocks(one_chunk, chunk, (q, w, q_positions), fills=(0, 0, -1))
