"""Backward of the fused indexer scores on Hopper, in Gluon: the dense warm-up's gradient through the indexer.

The math is `indexer_backward`'s (I = sum_g w ReLU(q_g . k) over visible keys, cotangent dI):

    d_w[t,g] = sum_s dI[t,s] ReLU(q[t,g] . k[s])     d_q[t,g] = sum_s G[t,g,s] k[s]
    d_k[s] = sum_{t,g} G[t,g,s] q[t,g]               G[t,g,s] = dI[t,s] w[t,g] 1[q[t,g] . k[s] > 0]

with G rounded to the input dtype for the two dots, as the Pallas kernels round it. So is the split into two
kernels that need no atomics, over the same padded operands (query-major rows: a query's G heads are G consecutive
rows of q_rows [B, T*G, I]):
  - query side: one program per ROWS = 128 rows (128 / G queries), two warpgroups of 64 rows; it walks the key
    tiles its queries can see, BLOCK_K = 64 keys per step, in three shared-memory buffers filled by cp.async. Per
    step: logits [rows, keys] = q_rows k^T (wgmma, q in registers as the A operand, loaded once), then G on the CUDA
    cores, then d_q += G k (wgmma, G from registers); d_w is summed per step;
  - key side: one program per KEYS = 128 keys (two warpgroups of 64), k in registers as the A operand; it walks the
    query rows that can see its keys, STEP_ROWS = 64 rows per step, three buffers: logits^T [keys, rows] =
    k q_rows^T, G^T, then d_k += G^T q_rows. A key tile's walk is cut into runs (`key_splits`), one program each,
    whose fp32 parts of d_k are summed after: the key tiles alone are too few programs (S / 128 per sequence).
Why both dots take their A operand from registers: a wgmma with both operands in shared memory reads more bytes
per cycle than shared memory gives at these shapes (session 29's distillation kernel, docs/BENCHMARKS.md); here
the only shared-memory operand is the streamed tile, read by both dots of a step.

Why Gluon: the Pallas kernels (`indexer_backward`) ran at 81-178 TFLOP/s on an H100 (T = 4096-32768, 64 heads x
128), and their key-side kernel has only S / 64 programs; Gluon names where each dot's operands live and how the
tiles are pipelined, which Pallas's Triton backend chooses itself. These run at 379-514 TFLOP/s (docs/BENCHMARKS.md,
session 30).

Gluon has no interpreter: CPU tests compile both kernels for sm_90 (no spills, the dots at the expected shapes with
the A operand from registers); their numbers are checked on the GPU against the Pallas kernels and the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (warpgroup_mma, warpgroup_mma_init,
                                                               warpgroup_mma_wait)

from pallas_kernels._gluon import gluon_call
from pallas_kernels._gluon_hopper import operand_buffer, wait_for_copies, wgmma_layout
from pallas_kernels._pallas import PROGRAMS_TO_FILL_GPU
from pallas_kernels.sparse_attention import GLUON_DTYPES
from pallas_kernels.sparse_attention_gluon import _row_layout
from pallas_kernels.sparse_distribution_gluon import _load_operand

ROWS = gl.constexpr(128)  # query rows per query-side program: one per thread row of two warpgroups' m64 dots
BLOCK_K = gl.constexpr(64)  # keys per query-side step
KEYS = gl.constexpr(128)  # keys per key-side program
STEP_ROWS = gl.constexpr(64)  # query rows per key-side step
NUM_WARPS = 8  # two warpgroups
PROGRAMS_IN_FLIGHT = 2 * PROGRAMS_TO_FILL_GPU  # key-side programs to aim for: four per SM of an H100, for balance
MAX_KEY_SPLITS = 16


@gluon.jit
def _copy_rows(src, dst, ROW_STRIDE: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copies of dst's rows (dst.shape[1] contiguous elements each, ROW_STRIDE apart at src)."""
    layout: gl.constexpr = _row_layout(dst.shape[1], num_warps)
    rows = gl.arange(0, dst.shape[0], layout=gl.SliceLayout(1, layout))
    columns = gl.arange(0, dst.shape[1], layout=gl.SliceLayout(0, layout))
    async_copy.async_copy_global_to_shared(dst, src + rows[:, None] * ROW_STRIDE + columns[None, :])


@gluon.jit
def _query_side_kernel(q_ptr, w_ptr, k_ptr, pos_ptr, d_ptr, d_q_ptr, d_w_ptr, NUM_Q: gl.constexpr,
                       NUM_KEYS: gl.constexpr, HEADS: gl.constexpr, WIDTH: gl.constexpr, num_warps: gl.constexpr):
    # q_rows [B, T*G, I], w_rows f32[B, T*G], k [B, S, I], pos i32[B, T] (-1: padded, sees nothing),
    # d f32[B, T, S] -> d_q_rows like q_rows, d_w_rows like w_rows. T = NUM_Q, S = NUM_KEYS, G = HEADS, I = WIDTH.
    # Grid: (T*G / ROWS, B), the latest queries (the most keys, in causal prefill) first.
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    tiles: gl.constexpr = NUM_Q * HEADS // ROWS
    batch = gl.program_id(1)
    first_row = (tiles - 1 - gl.program_id(0)) * ROWS
    logits_layout: gl.constexpr = wgmma_layout(BLOCK_K, num_warps)
    d_q_layout: gl.constexpr = wgmma_layout(WIDTH, num_warps)
    row_layout: gl.constexpr = gl.SliceLayout(1, logits_layout)
    rows = first_row + gl.arange(0, ROWS, layout=row_layout)  # within the batch row
    query = rows // HEADS
    positions = gl.load(pos_ptr + batch * NUM_Q + query)
    weights = gl.load(w_ptr + batch * NUM_Q * HEADS + rows)
    last = gl.max(positions, axis=0)
    num_tiles = gl.where(last >= 0, gl.minimum(last // BLOCK_K + 1, NUM_KEYS // BLOCK_K), 0)

    keys = operand_buffer(dtype, [3, BLOCK_K, WIDTH])
    k_base = k_ptr + batch.to(gl.int64) * NUM_KEYS * WIDTH
    _copy_rows(k_base, keys.index(0), WIDTH, num_warps)
    async_copy.commit_group()
    # loaded once, straight into the A-operand layout: the loads' poor coalescing costs little beside the tiles
    q_operand = _load_operand(q_ptr + (batch * NUM_Q * HEADS + first_row).to(gl.int64) * WIDTH, 0, WIDTH, WIDTH,
                              ROWS, gl.DotOperandLayout(operand_index=0, parent=logits_layout, k_width=2))
    grad_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_q_layout, k_width=2)
    d_rows = d_ptr + (batch * NUM_Q + query).to(gl.int64)[:, None] * NUM_KEYS  # [ROWS, 1]: each row's query's dI
    key_columns = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, logits_layout))
    d_q = warpgroup_mma_init(gl.zeros([ROWS, WIDTH], gl.float32, layout=d_q_layout))  # carried in flight
    d_w = gl.zeros([ROWS], gl.float32, layout=row_layout)
    # Three buffers: step j - 1's gradient dot, still in flight, reads its tile while step j's logits dot is
    # issued (both are waited for together, the tensor cores never idle between them); the copy at step j fills
    # step j - 2's buffer, whose dots every warp waited for in step j - 1, before this step's barrier.
    for j in range(num_tiles):
        buf = j % 3
        wait_for_copies(0)  # tile j has landed; no warp still reads tile j - 2's buffer
        if j + 1 < num_tiles:
            _copy_rows(k_base + (j + 1) * BLOCK_K * WIDTH, keys.index((j + 1) % 3), WIDTH, num_warps)
            async_copy.commit_group()
        logits = gl.zeros([ROWS, BLOCK_K], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(q_operand, keys.index(buf).permute((1, 0)), logits, use_acc=False, is_async=True)
        key_ids = j * BLOCK_K + key_columns
        # invisible keys (s > pos) take no gradient, whatever their cotangent
        d = gl.where(key_ids[None, :] <= positions[:, None], gl.load(d_rows + key_ids[None, :]), 0.0)
        logits, d_q = warpgroup_mma_wait(0, deps=[logits, d_q])  # step j's logits, step j - 1's d_q
        d_w += gl.sum(d * gl.maximum(logits, 0.0), axis=1)
        grad = gl.where(logits > 0, d * weights[:, None], 0.0).to(dtype)
        d_q = warpgroup_mma(gl.convert_layout(grad, grad_operand), keys.index(buf), d_q, is_async=True)
    d_q = warpgroup_mma_wait(0, deps=[d_q])

    out_rows = batch * NUM_Q * HEADS + first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, d_q_layout))
    columns = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, d_q_layout))
    gl.store(d_q_ptr + out_rows.to(gl.int64)[:, None] * WIDTH + columns[None, :], d_q.to(d_q_ptr.dtype.element_ty))
    gl.store(d_w_ptr + batch * NUM_Q * HEADS + rows, d_w)


@gluon.jit
def _key_side_kernel(q_ptr, w_ptr, k_ptr, pos_ptr, d_ptr, steps_ptr, d_k_ptr, NUM_Q: gl.constexpr,
                     NUM_KEYS: gl.constexpr, HEADS: gl.constexpr, WIDTH: gl.constexpr, SPLITS: gl.constexpr,
                     num_warps: gl.constexpr):
    # Inputs as `_query_side_kernel`'s, and steps i32[B, S / KEYS, SPLITS, 2]: each split's first row step (of
    # STEP_ROWS query rows) and number of steps -> d_k f32[B, SPLITS, S, I], each split's part of the sum.
    # Grid: (S / KEYS * SPLITS, B), the first keys (seen by the most queries, in causal prefill) first.
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    batch = gl.program_id(1)
    tile = gl.program_id(0) // SPLITS
    split = gl.program_id(0) % SPLITS
    logits_layout: gl.constexpr = wgmma_layout(STEP_ROWS, num_warps)
    d_k_layout: gl.constexpr = wgmma_layout(WIDTH, num_warps)
    key_layout: gl.constexpr = gl.SliceLayout(1, logits_layout)
    row_layout: gl.constexpr = gl.SliceLayout(0, logits_layout)
    key_ids = tile * KEYS + gl.arange(0, KEYS, layout=key_layout)
    steps = steps_ptr + ((batch * (NUM_KEYS // KEYS) + tile) * SPLITS + split) * 2
    first_step = gl.load(steps)
    num_steps = gl.load(steps + 1)

    q_tiles = operand_buffer(dtype, [3, STEP_ROWS, WIDTH])
    q_base = q_ptr + batch.to(gl.int64) * NUM_Q * HEADS * WIDTH
    if num_steps > 0:  # (an empty run's first step may lie past the last row)
        _copy_rows(q_base + (first_step * STEP_ROWS).to(gl.int64) * WIDTH, q_tiles.index(0), WIDTH, num_warps)
    async_copy.commit_group()
    k_operand = _load_operand(k_ptr + (batch * NUM_KEYS + tile * KEYS).to(gl.int64) * WIDTH, 0, WIDTH, WIDTH, KEYS,
                              gl.DotOperandLayout(operand_index=0, parent=logits_layout, k_width=2))
    grad_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_k_layout, k_width=2)
    d_base = d_ptr + (batch * NUM_Q).to(gl.int64) * NUM_KEYS
    step_rows = gl.arange(0, STEP_ROWS, layout=row_layout)
    d_k = warpgroup_mma_init(gl.zeros([KEYS, WIDTH], gl.float32, layout=d_k_layout))
    for i in range(num_steps):
        buf = i % 3  # three buffers, as in `_query_side_kernel`
        row0 = (first_step + i) * STEP_ROWS
        wait_for_copies(0)  # step i's rows have landed; no warp still reads step i - 2's buffer
        if i + 1 < num_steps:
            _copy_rows(q_base + (row0 + STEP_ROWS).to(gl.int64) * WIDTH, q_tiles.index((i + 1) % 3), WIDTH,
                       num_warps)
            async_copy.commit_group()
        logits = gl.zeros([KEYS, STEP_ROWS], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(k_operand, q_tiles.index(buf).permute((1, 0)), logits, use_acc=False, is_async=True)
        weights = gl.load(w_ptr + batch * NUM_Q * HEADS + row0 + step_rows)
        if HEADS >= STEP_ROWS:  # the step's rows are heads of one query
            query = row0 // HEADS
            d = gl.load(d_base + query.to(gl.int64) * NUM_KEYS + key_ids)
            d = gl.where(key_ids <= gl.load(pos_ptr + batch * NUM_Q + query), d, 0.0)
            scale = d[:, None] * weights[None, :]
        else:  # of STEP_ROWS / HEADS queries
            query = (row0 + step_rows) // HEADS
            d = gl.load(d_base + query.to(gl.int64)[None, :] * NUM_KEYS + key_ids[:, None])
            visible = key_ids[:, None] <= gl.load(pos_ptr + batch * NUM_Q + query)[None, :]
            scale = gl.where(visible, d, 0.0) * weights[None, :]
        logits, d_k = warpgroup_mma_wait(0, deps=[logits, d_k])  # step i's logits, step i - 1's d_k
        grad = gl.where(logits > 0, scale, 0.0).to(dtype)
        d_k = warpgroup_mma(gl.convert_layout(grad, grad_operand), q_tiles.index(buf), d_k, is_async=True)
    d_k = warpgroup_mma_wait(0, deps=[d_k])

    out_keys = tile * KEYS + gl.arange(0, KEYS, layout=gl.SliceLayout(1, d_k_layout))
    columns = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, d_k_layout))
    gl.store(d_k_ptr + ((batch * SPLITS + split) * NUM_KEYS + out_keys).to(gl.int64)[:, None] * WIDTH
             + columns[None, :], d_k)


def key_side_steps(positions, num_keys: int, heads: int, splits: int = 1):
    """positions int32[B, T] (-1: sees nothing) -> int32[B, num_keys / KEYS, splits, 2]: per key tile, the steps of
    STEP_ROWS query rows from the one that holds the first query seeing one of its keys to the one that holds the
    last (none where no query does), cut into `splits` runs of equal length: (first step, number of steps) each.
    Queries in between that see none of the keys cost their steps and add nothing (their keys are masked); with
    positions that rise along T, as in prefill, there are none."""
    num_q = positions.shape[1]
    starts = jnp.arange(num_keys // KEYS.value, dtype=jnp.int32) * KEYS.value
    # first t with pos[t] >= start: the running max rises; last such t: the running max from the end falls
    first = jax.vmap(lambda m: jnp.searchsorted(m, starts, side="left"))(lax.cummax(positions, axis=1))
    from_end = jax.vmap(lambda m: jnp.searchsorted(m, starts, side="left"))(lax.cummax(positions[:, ::-1], axis=1))
    last = num_q - 1 - from_end
    first_step = first * heads // STEP_ROWS.value
    total = jnp.maximum(-(-(last + 1) * heads // STEP_ROWS.value) - first_step, 0)
    run = -(-total // splits)
    offsets = jnp.arange(splits) * run[..., None]  # [B, tiles, splits]
    counts = jnp.clip(total[..., None] - offsets, 0, run[..., None])
    return jnp.stack([first_step[..., None] + offsets, counts], axis=-1).astype(jnp.int32)


def key_splits(batch: int, num_keys: int) -> int:
    """How many runs each key tile's walk is cut into: enough programs for PROGRAMS_IN_FLIGHT (the key tiles alone
    are few: S / 128 per sequence, and the first walks all T queries), at most MAX_KEY_SPLITS (each adds an fp32
    copy of d_k)."""
    return max(1, min(MAX_KEY_SPLITS, -(-PROGRAMS_IN_FLIGHT // (batch * num_keys // KEYS.value))))


def kernel_constants(num_q: int, num_keys: int, heads: int, width: int) -> dict:
    return dict(NUM_Q=num_q, NUM_KEYS=num_keys, HEADS=heads, WIDTH=width)


def unsupported_reason(dtype, heads: int, width: int) -> str | None:
    """Why these padded inputs cannot run the Gluon kernels, or None. heads, width: padded (powers of two >= 16)."""
    if jnp.dtype(dtype) not in GLUON_DTYPES:
        return f"it takes bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if heads > ROWS.value:
        return f"{heads} heads (padded) exceed the query-side program's {ROWS.value} rows"
    if width > 128:
        return f"index head dim {width} (padded) exceeds 128: q and d_q of 128 rows would not fit in registers"
    return None


def indexer_scores_backward_gluon(q_rows, w_rows, k, positions, d_scores, *, heads: int):
    """q_rows [B, T*G, I] (query-major), w_rows f32[B, T*G], k [B, S, I], positions int32[B, T] (-1: padded query),
    d_scores f32[B, T, S] -> (d_q_rows like q_rows, d_w_rows f32, d_k like k). Padded: G and I powers of two
    (`unsupported_reason` says which), T*G a multiple of ROWS, S a multiple of KEYS."""
    batch, rows, width = q_rows.shape
    num_q, num_keys = d_scores.shape[1:]
    reason = unsupported_reason(q_rows.dtype, heads, width)
    if (reason or rows != num_q * heads or rows % ROWS.value or num_keys % KEYS.value or k.dtype != q_rows.dtype
            or k.shape != (batch, num_keys, width) or positions.shape != (batch, num_q)):
        raise ValueError(f"indexer_scores_backward_gluon: unpadded or unsupported input ({reason or 'shapes'}): "
                         f"q_rows {q_rows.shape} {q_rows.dtype}, k {k.shape} {k.dtype}, positions "
                         f"{positions.shape}, d_scores {d_scores.shape}, heads {heads}")
    constants = kernel_constants(num_q, num_keys, heads, width)
    positions = positions.astype(jnp.int32)
    d_q, d_w = gluon_call(q_rows, w_rows, k, positions, d_scores, kernel=_query_side_kernel,
                          out_shape=[jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
                                     jax.ShapeDtypeStruct(w_rows.shape, jnp.float32)],
                          grid=(rows // ROWS.value, batch), num_warps=NUM_WARPS, **constants)
    splits = key_splits(batch, num_keys)
    d_k = gluon_call(q_rows, w_rows, k, positions, d_scores, key_side_steps(positions, num_keys, heads, splits),
                     kernel=_key_side_kernel, out_shape=jax.ShapeDtypeStruct((batch, splits) + k.shape[1:],
                                                                             jnp.float32),
                     grid=(num_keys // KEYS.value * splits, batch), num_warps=NUM_WARPS, SPLITS=splits, **constants)
    return d_q, d_w, jnp.sum(d_k, axis=1).astype(k.dtype)
