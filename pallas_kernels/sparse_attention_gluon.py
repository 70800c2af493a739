"""Sparse MLA attention forward on Hopper, in Gluon: 64 heads x 64 slots per step over two warpgroups.

Why not Pallas (or plain Triton): the output accumulator of 64 heads x 512 value columns is 128 KB of fp32, more
than one warpgroup's registers, so it must be split over two warpgroups by value column. Triton then lays out the
logits dot that feeds it with all warps along the head axis, and each warpgroup computes the whole 64 x 64 logits
block, duplicating QK^T (53% of the FLOPs). Pallas's Triton backend keeps 32 heads per program on mma.sync instead
(no wgmma); on an H100 it reached 258-272 TFLOP/s, plain Triton 282 (docs/BENCHMARKS.md). Gluon names the
layouts. Two schedules share the program shape, the numerics and the memory plan:
  - q (64 heads x 576) stays in shared memory, and the gathered latent rows of a slot block are one [64, 576]
    buffer read by both dots (as K^T for the logits, as V for the output), double-buffered: the next rows are
    gathered by cp.async (16-byte pieces of contiguous row segments, no gathered copy in HBM) while these are used;
    each warpgroup accumulates its half of the value columns (wgmma m64n(R/2));
  - "split_slots" (`_sparse_forward_kernel`): the logits [64 heads, 64 slots] are split by slot column, 32 per
    warpgroup (m64n32, no duplication); the row max combines the halves through shared memory and the
    probabilities go through a shared-memory tile that both value dots read. 360-379 TFLOP/s on an H100.
  - "seesaw" (`_seesaw_forward_kernel`, the default where it applies: `schedule_for`): each warpgroup computes
    the whole logits block of alternate slot blocks (m64n64, q read once per block, not twice), the running max
    passes from one to the other, and the two run as warp-specialised partitions that meet only at mbarriers and
    gather their parts of the next blocks themselves. 468-510 TFLOP/s on an H100.
-1 slots copy nothing (their shared-memory rows are zero-filled) and are masked to -inf; a token with no valid
slot gets zeros and log-sum-exp -inf; slot ids past the cache are clipped, as in the Pallas kernel. The numerics
are those of `sparse_attention._sparse_kernel` (fp32 logits and softmax, probabilities rounded to the input dtype
for the value dot), in base 2.

Gluon has no interpreter, so CPU tests compile both schedules for sm_90 (`tests/test_gluon_kernels.py`: they
compile, fit shared memory, do not spill, and issue each dot once at the expected shape); their numbers are
checked on the GPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)

from pallas_kernels._gluon import gluon_call
from pallas_kernels._gluon_hopper import operand_buffer, wait_for_copies, wgmma_layout
from pallas_kernels.sparse_attention import GLUON_DTYPES, GLUON_MAX_VALUE_DIM, GLUON_SMEM_BYTES

BLOCK_H = gl.constexpr(64)  # heads per program: one wgmma row block
BLOCK_N = gl.constexpr(64)  # slots per step
NUM_WARPS = 8  # two warpgroups
SMEM_BYTES = GLUON_SMEM_BYTES


@gluon.constexpr_function
def _row_layout(width, num_warps):
    """Blocked layout for [rows, width] gathers: 8 contiguous elements (16 bytes) per thread, the threads of a
    warp along one row's segment first."""
    across = min(8, width // 8)
    return gl.BlockedLayout([1, 8], [32 // across, across], [num_warps, 1], [1, 0])


@gluon.jit
def _gather_rows(kv_ptr, ids_ptr, values_dst, rope_dst, NUM_KEYS: gl.constexpr, VALUE_DIM: gl.constexpr,
                 ROPE_DIM: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copies of the BLOCK_N latent rows that ids_ptr[0:BLOCK_N] select into shared memory."""
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    value_layout: gl.constexpr = _row_layout(VALUE_DIM, num_warps)
    rope_layout: gl.constexpr = _row_layout(ROPE_DIM, num_warps)
    ids = gl.load(ids_ptr + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, value_layout)))
    rows = gl.minimum(ids, NUM_KEYS - 1).to(gl.int64) * width
    # -1 slots copy nothing (their shared-memory rows are zero-filled, and masked later): a block of them all
    # reading one row made every program of the first 2048 causal queries hammer that row's L2 lines.
    valid = ids >= 0
    columns = gl.arange(0, VALUE_DIM, layout=gl.SliceLayout(0, value_layout))
    async_copy.async_copy_global_to_shared(values_dst, kv_ptr + rows[:, None] + columns[None, :],
                                           mask=valid[:, None])
    rope_rows = gl.convert_layout(rows, gl.SliceLayout(1, rope_layout))
    rope_valid = gl.convert_layout(valid, gl.SliceLayout(1, rope_layout))
    rope_columns = VALUE_DIM + gl.arange(0, ROPE_DIM, layout=gl.SliceLayout(0, rope_layout))
    async_copy.async_copy_global_to_shared(rope_dst, kv_ptr + rope_rows[:, None] + rope_columns[None, :],
                                           mask=rope_valid[:, None])


@gluon.jit
def _load_q(q_ptr, q_values, q_rope, VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copies of the rows of q at q_ptr (as many as q_values holds: BLOCK_H here) into q_values
    and q_rope."""
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    rows: gl.constexpr = q_values.shape[0]
    value_layout: gl.constexpr = _row_layout(VALUE_DIM, num_warps)
    rope_layout: gl.constexpr = _row_layout(ROPE_DIM, num_warps)
    heads_v = gl.arange(0, rows, layout=gl.SliceLayout(1, value_layout))
    heads_r = gl.arange(0, rows, layout=gl.SliceLayout(1, rope_layout))
    async_copy.async_copy_global_to_shared(
        q_values, q_ptr + heads_v[:, None] * width
        + gl.arange(0, VALUE_DIM, layout=gl.SliceLayout(0, value_layout))[None, :])
    async_copy.async_copy_global_to_shared(
        q_rope, q_ptr + heads_r[:, None] * width + VALUE_DIM
        + gl.arange(0, ROPE_DIM, layout=gl.SliceLayout(0, rope_layout))[None, :])


@gluon.jit
def _store_normalised(out_ptr, lse_ptr, out_row, acc, row_max, row_sum, FIRST_COLUMN: gl.constexpr,
                      VALUE_DIM: gl.constexpr, STORE_LSE: gl.constexpr):
    """out[out_row + h, FIRST_COLUMN + c] = acc[h, c] / row_sum[h] (zeros where no slot was valid) and, when
    STORE_LSE, lse[out_row + h] = row_max + log(row_sum) in natural log (-inf where none was)."""
    out_layout: gl.constexpr = acc.type.layout
    has_any = row_sum > 0
    inverse = gl.convert_layout(1.0 / gl.where(has_any, row_sum, 1.0), gl.SliceLayout(1, out_layout))
    heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, out_layout))
    columns = FIRST_COLUMN + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, out_layout))
    gl.store(out_ptr + (out_row + heads).to(gl.int64)[:, None] * VALUE_DIM + columns[None, :],
             (acc * inverse[:, None]).to(out_ptr.dtype.element_ty))
    if STORE_LSE:
        lse = gl.where(has_any, (row_max + gl.log2(gl.where(has_any, row_sum, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        gl.store(lse_ptr + out_row + gl.arange(0, BLOCK_H, layout=row_max.type.layout), lse)


@gluon.jit
def _program_coordinates(NUM_Q: gl.constexpr, HEADS: gl.constexpr, SPLITS: gl.constexpr):
    """(batch, token row in [B * T], split, head block) of this program. Axis 0 = token x head block, head blocks
    fastest (the programs of one token gather the same rows and share them in L2), axis 1 = batch x split.
    (Tokens on an axis of their own would cap them at 65535.)"""
    head_blocks: gl.constexpr = HEADS // BLOCK_H
    batch = gl.program_id(1) // SPLITS
    return (batch, batch * NUM_Q + gl.program_id(0) // head_blocks, gl.program_id(1) % SPLITS,
            gl.program_id(0) % head_blocks)


@gluon.jit
def _sparse_forward_kernel(q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr, NUM_Q: gl.constexpr, HEADS: gl.constexpr,
                           NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr, SPLITS: gl.constexpr,
                           VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr, SCALE_LOG2: gl.constexpr,
                           num_warps: gl.constexpr):
    # q [B, T, H, R+P], kv [B, S, R+P], idx [B, T, K], out [B, T, n, H, R], lse f32[B, T, n, H] (n = SPLITS).
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    per_split: gl.constexpr = SLOTS // SPLITS
    num_blocks: gl.constexpr = per_split // BLOCK_N
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    batch, token, split, head_block = _program_coordinates(NUM_Q, HEADS, SPLITS)

    logits_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                            instr_shape=[16, BLOCK_N // 2, 16])
    out_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                         instr_shape=[16, VALUE_DIM // 2, 16])
    q_values = operand_buffer(dtype, [BLOCK_H, VALUE_DIM])
    q_rope = operand_buffer(dtype, [BLOCK_H, ROPE_DIM])
    kv_values = operand_buffer(dtype, [2, BLOCK_N, VALUE_DIM])
    kv_rope = operand_buffer(dtype, [2, BLOCK_N, ROPE_DIM])

    _load_q(q_ptr + (token * HEADS + head_block * BLOCK_H).to(gl.int64) * width, q_values, q_rope, VALUE_DIM,
            ROPE_DIM, num_warps)
    kv_base = kv_ptr + batch.to(gl.int64) * NUM_KEYS * width
    ids_base = idx_ptr + token.to(gl.int64) * SLOTS + split * per_split
    _gather_rows(kv_base, ids_base, kv_values.index(0), kv_rope.index(0), NUM_KEYS, VALUE_DIM, ROPE_DIM,
                 num_warps)
    async_copy.commit_group()

    row_max = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, logits_layout))
    # 5 CTA barriers per slot block (an earlier schedule had 12, and ncu saw 35% of warp cycles stalled on them):
    # the next block's gather starts after the one barrier that both lands this block and frees the other buffer;
    # the row sums stay per column until after the loop (no cross-warpgroup sum per block); the probabilities go
    # through an explicit shared-memory tile that the value dot reads, not through a layout conversion.
    sums = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=logits_layout)
    probs_smem = operand_buffer(dtype, [BLOCK_H, BLOCK_N])
    acc = gl.zeros([BLOCK_H, VALUE_DIM], gl.float32, layout=out_layout)
    for j in range(num_blocks):
        buf = j % 2
        wait_for_copies(0)  # block j has landed, and every warp is done with block j - 1 (buffer and probs)
        if j + 1 < num_blocks:  # gather the next block into the other buffer while this one is used
            _gather_rows(kv_base, ids_base + (j + 1) * BLOCK_N, kv_values.index(1 - buf), kv_rope.index(1 - buf),
                         NUM_KEYS, VALUE_DIM, ROPE_DIM, num_warps)
            async_copy.commit_group()
        values = kv_values.index(buf)
        logits = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(q_rope, kv_rope.index(buf).permute((1, 0)), logits, use_acc=False)
        logits = warpgroup_mma(q_values, values.permute((1, 0)), logits)
        ids = gl.load(ids_base + j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, logits_layout)))
        logits = gl.where((ids >= 0)[None, :], logits * SCALE_LOG2, float("-inf"))
        new_max = gl.maximum(row_max, gl.max(logits, axis=1))
        safe_max = gl.where(new_max == float("-inf"), 0.0, new_max)  # nothing valid yet: keep exp2() finite
        probs = gl.exp2(logits - safe_max[:, None])
        rescale = gl.exp2(row_max - safe_max)
        sums = sums * rescale[:, None] + probs  # summed over slots once, after the loop
        row_max = new_max
        acc = acc * gl.convert_layout(rescale, gl.SliceLayout(1, out_layout))[:, None]
        probs_smem.store(probs.to(dtype))
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of the probabilities are in shared memory
        acc = warpgroup_mma(probs_smem, values, acc)

    _store_normalised(out_ptr, lse_ptr, (token * SPLITS + split) * HEADS + head_block * BLOCK_H, acc, row_max,
                      gl.sum(sums, axis=1), 0, VALUE_DIM, True)


# ---- the seesaw schedule: each warpgroup takes whole alternate slot blocks ----------------------------------------
#
# The schedule above splits every 64 x 64 logits block over the two warpgroups (m64n32 each), so each warpgroup
# reads all of q from shared memory for half the logits, and the halves meet at CTA barriers for the row max and
# the probabilities. Here (the idea of FlashMLA's "seesaw"), warpgroup w computes all logits of slot block 2i + w
# (m64n64), with the running max handed from warpgroup 0 to warpgroup 1 through shared memory, and each warpgroup
# still accumulates its half of the value columns for both blocks (the other's probabilities read from shared
# memory). The two warpgroups run as Gluon warp-specialised partitions, meet only at mbarriers, and gather the
# next pair of blocks themselves as soon as their part of a buffer is free:
#
#   warpgroup 0, pair i                          | warpgroup 1, pair i
#   wait buffer 0; S0 = q K0^T                   | wait buffer 1; S1 = q K1^T
#   m0 = max(m, rowmax S0); P0 -> smem; signal   | wait for P0, m0; m1 = max(m0, rowmax S1); P1 -> smem; signal
#   acc0 += P0 V0[:, :R/2]                       | acc1 = acc1 * 2^(m - m0) + P0 V0[:, R/2:]
#   gather block 2i+2's V[:, :R/2] into buffer 0 | gather block 2i+2's V[:, R/2:] and rope into buffer 0
#   wait for P1, m1; acc0 = acc0 * 2^(m0 - m1)   | acc1 = acc1 * 2^(m0 - m1)
#   acc0 += P1 V1[:, :R/2]                       | acc1 += P1 V1[:, R/2:]
#   gather block 2i+3's V[:, :R/2] and rope      | gather block 2i+3's V[:, R/2:]
#
# A block's probabilities go where its rope columns were (dead once its logits are computed) when P = 64. Each
# warpgroup sums the probabilities of its own blocks; the sums meet once, after the loop.

SEESAW_WORKER_REGISTERS = gl.constexpr(240)  # warpgroup 1's; warpgroup 0 gets the other 256 of 496 per thread


@gluon.jit
def _gather_columns(kv_base, ids_ptr, dst, FIRST: gl.constexpr, COLUMNS: gl.constexpr, WIDTH: gl.constexpr,
                    NUM_KEYS: gl.constexpr, WARPS: gl.constexpr):
    """Start the cp.async copies of columns [FIRST, FIRST + COLUMNS) of the latent rows that ids_ptr[0:n] select
    into dst (n = its rows: BLOCK_N here), by WARPS warps (-1 slots copy nothing: cp.async zero-fills their rows)."""
    layout: gl.constexpr = _row_layout(COLUMNS, WARPS)
    ids = gl.load(ids_ptr + gl.arange(0, dst.shape[0], layout=gl.SliceLayout(1, layout)))
    columns = FIRST + gl.arange(0, COLUMNS, layout=gl.SliceLayout(0, layout))
    if NUM_KEYS * WIDTH < 2**31:
        # 32-bit offsets: with 64-bit ones ptxas kept each gather's column pointers live across the loop
        offsets = (gl.minimum(ids, NUM_KEYS - 1) * WIDTH)[:, None] + columns[None, :]
    else:
        offsets = (gl.minimum(ids, NUM_KEYS - 1).to(gl.int64) * WIDTH)[:, None] + columns[None, :]
    async_copy.async_copy_global_to_shared(dst, kv_base + offsets, mask=(ids >= 0)[:, None])


@gluon.jit
def _gather_share(kv_base, ids_ptr, kv_values, kv_rope, BUFFER: gl.constexpr, WARPGROUP: gl.constexpr,
                  VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr, NUM_KEYS: gl.constexpr):
    """This warpgroup's share of a block's gather into BUFFER: its half of the value columns, and the rope
    columns of the buffer whose probabilities only it reads (the other warpgroup's block's), then its threads'
    arrivals on the buffer's mbarrier (the caller's), which land when their copies have."""
    half: gl.constexpr = VALUE_DIM // 2
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    _gather_columns(kv_base, ids_ptr, kv_values.index(BUFFER).slice(WARPGROUP * half, half, dim=1),
                    WARPGROUP * half, half, width, NUM_KEYS, 4)
    if WARPGROUP != BUFFER:
        _gather_columns(kv_base, ids_ptr, kv_rope.index(BUFFER), VALUE_DIM, ROPE_DIM, width, NUM_KEYS, 4)


@gluon.jit
def _opaque_zero(step):
    """0, which the compiler cannot see to be 0: shared-memory views indexed with it get their wgmma descriptors
    computed in the loop. Hoisted out of it, the 36 + 36 64-bit descriptors of the logits dot held 144 registers
    through the loop, and ptxas spilled 1140 bytes."""
    return gl.inline_asm_elementwise("and.b32 $0, $1, 0;", "=r,r", [step], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _finite(row_max):
    """A running max with -inf (nothing valid yet) as 0, so that exp2(x - max) stays finite (0 for x = -inf)."""
    return gl.where(row_max == float("-inf"), 0.0, row_max)


@gluon.jit
def _rescale(old_max, new_max):
    """2^(old - new) for running maxima, 0 while nothing is valid (both -inf)."""
    return gl.exp2(old_max - _finite(new_max))


@gluon.jit
def _seesaw_warpgroup(q_values, q_rope, kv_values, kv_rope, probs, maxes, sums, bars, kv_base, ids_base, out_ptr,
                      lse_ptr, out_row, NUM_KEYS: gl.constexpr, VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr,
                      SCALE_LOG2: gl.constexpr, NUM_BLOCKS: gl.constexpr, WARPGROUP: gl.constexpr):
    """One warpgroup's part of the seesaw schedule (see above); bars: ready[0], ready[1], probs_ready[0],
    probs_ready[1], sums_ready."""
    half: gl.constexpr = VALUE_DIM // 2
    dtype: gl.constexpr = kv_values.dtype
    logits_layout: gl.constexpr = wgmma_layout(BLOCK_N, 4)
    out_layout: gl.constexpr = wgmma_layout(half, 4)
    probs_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=out_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, logits_layout)
    out_rows: gl.constexpr = gl.SliceLayout(1, out_layout)
    my_values = kv_values.index(WARPGROUP).slice(WARPGROUP * half, half, dim=1)  # V of my block, my columns
    other_values = kv_values.index(1 - WARPGROUP).slice(WARPGROUP * half, half, dim=1)
    for buffer in gl.static_range(2):
        _gather_share(kv_base, ids_base + buffer * BLOCK_N, kv_values, kv_rope, buffer, WARPGROUP, VALUE_DIM,
                      ROPE_DIM, NUM_KEYS)
        async_copy.mbarrier_arrive(bars.index(buffer), increment_count=False)

    row_max = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=rows)
    row_sum = gl.zeros([BLOCK_H], gl.float32, layout=rows)
    acc = gl.zeros([BLOCK_H, half], gl.float32, layout=out_layout)
    for i in range(NUM_BLOCKS // 2):
        phase = i & 1
        block = 2 * i + WARPGROUP
        more = i + 1 < NUM_BLOCKS // 2
        mbarrier.wait(bars.index(WARPGROUP), phase)
        fence_async_shared()  # the gathered rows are visible to wgmma, which reads through the async proxy
        zero = _opaque_zero(i)
        logits = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(q_rope.index(zero), kv_rope.index(WARPGROUP + zero).permute((1, 0)), logits,
                               use_acc=False)
        logits = warpgroup_mma(q_values.index(zero), kv_values.index(WARPGROUP + zero).permute((1, 0)), logits)
        ids = gl.load(ids_base + block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, logits_layout)))
        logits = gl.where((ids >= 0)[None, :], logits * SCALE_LOG2, float("-inf"))
        if WARPGROUP == 0:
            start_max = row_max
        else:
            mbarrier.wait(bars.index(2), phase)
            start_max = maxes.slice(0, BLOCK_H).load(rows)  # warpgroup 0's max after its block
        new_max = gl.maximum(start_max, gl.max(logits, axis=1))
        p = gl.exp2(logits - _finite(new_max)[:, None])
        row_sum = row_sum * _rescale(row_max, new_max) + gl.sum(p, axis=1)
        p = p.to(dtype)
        maxes.slice(WARPGROUP * BLOCK_H, BLOCK_H).store(new_max)
        probs.index(WARPGROUP).store(p)
        fence_async_shared()
        gl.thread_barrier()  # this warpgroup's 4 warps: the probabilities and the max are in shared memory
        mbarrier.arrive(bars.index(2 + WARPGROUP))
        if WARPGROUP == 0:
            acc = acc * gl.convert_layout(_rescale(row_max, new_max), out_rows)[:, None]
            p_operand = gl.convert_layout(p, probs_operand)
            acc = warpgroup_mma(p_operand, my_values, acc, is_async=True)
            mbarrier.wait(bars.index(3), phase)
            end_max = maxes.slice(BLOCK_H, BLOCK_H).load(rows)  # warpgroup 1's max after its block
            # (the probabilities' registers too: the dot reads them while in flight)
            acc, p_operand = warpgroup_mma_wait(0, deps=[acc, p_operand])
            if more:  # buffer 0's left half is free: only this warpgroup read it
                _gather_share(kv_base, ids_base + (block + 2) * BLOCK_N, kv_values, kv_rope, 0, 0, VALUE_DIM,
                              ROPE_DIM, NUM_KEYS)
                async_copy.mbarrier_arrive(bars.index(0), increment_count=False)
            scale = _rescale(new_max, end_max)
            row_sum = row_sum * scale
            acc = acc * gl.convert_layout(scale, out_rows)[:, None]
            acc = warpgroup_mma(probs.index(1), other_values, acc)
            if more:  # buffer 1's left half and its rope (warpgroup 1's probabilities) are free
                _gather_share(kv_base, ids_base + (block + 3) * BLOCK_N, kv_values, kv_rope, 1, 0, VALUE_DIM,
                              ROPE_DIM, NUM_KEYS)
                async_copy.mbarrier_arrive(bars.index(1), increment_count=False)
            row_max = end_max
        else:
            acc = acc * gl.convert_layout(_rescale(row_max, start_max), out_rows)[:, None]
            acc = warpgroup_mma(probs.index(0), other_values, acc)
            if more:  # buffer 0's right half and its rope (warpgroup 0's probabilities) are free
                _gather_share(kv_base, ids_base + (block + 1) * BLOCK_N, kv_values, kv_rope, 0, 1, VALUE_DIM,
                              ROPE_DIM, NUM_KEYS)
                async_copy.mbarrier_arrive(bars.index(0), increment_count=False)
            acc = acc * gl.convert_layout(_rescale(start_max, new_max), out_rows)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p, probs_operand), my_values, acc)
            if more:
                _gather_share(kv_base, ids_base + (block + 2) * BLOCK_N, kv_values, kv_rope, 1, 1, VALUE_DIM,
                              ROPE_DIM, NUM_KEYS)
                async_copy.mbarrier_arrive(bars.index(1), increment_count=False)
            row_max = new_max

    # Both warpgroups end at the same running max (warpgroup 1's last); the row sum is their two sums.
    sums.slice(WARPGROUP * BLOCK_H, BLOCK_H).store(row_sum)
    gl.thread_barrier()
    mbarrier.arrive(bars.index(4))
    mbarrier.wait(bars.index(4), 0)
    _store_normalised(out_ptr, lse_ptr, out_row, acc, row_max,
                      row_sum + sums.slice((1 - WARPGROUP) * BLOCK_H, BLOCK_H).load(rows), WARPGROUP * half,
                      VALUE_DIM, WARPGROUP == 0)


@gluon.jit
def _seesaw_forward_kernel(q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr, NUM_Q: gl.constexpr, HEADS: gl.constexpr,
                           NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr, SPLITS: gl.constexpr,
                           VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr, SCALE_LOG2: gl.constexpr,
                           num_warps: gl.constexpr):
    # Shapes and program grid as `_sparse_forward_kernel`'s; num_warps = 4 (warpgroup 0), warpgroup 1 is added.
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    per_split: gl.constexpr = SLOTS // SPLITS
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    batch, token, split, head_block = _program_coordinates(NUM_Q, HEADS, SPLITS)

    # q as [1, H, D]: indexed with an opaque 0 in the loop (see _opaque_zero)
    q_values = operand_buffer(dtype, [1, BLOCK_H, VALUE_DIM])
    q_rope = operand_buffer(dtype, [1, BLOCK_H, ROPE_DIM])
    kv_values = operand_buffer(dtype, [2, BLOCK_N, VALUE_DIM])
    kv_rope = operand_buffer(dtype, [2, BLOCK_N, ROPE_DIM])
    if ROPE_DIM == BLOCK_N:
        probs = kv_rope  # a block's rope columns are dead once its logits are computed
    else:
        probs = operand_buffer(dtype, [2, BLOCK_H, BLOCK_N])
    maxes = gl.allocate_shared_memory(gl.float32, [2 * BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    sums = gl.allocate_shared_memory(gl.float32, [2 * BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    bars = gl.allocate_shared_memory(gl.int64, [5, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bars.index(0), count=256)  # buffer 0 landed: all threads of both warpgroups, after their copies
    mbarrier.init(bars.index(1), count=256)  # buffer 1
    mbarrier.init(bars.index(2), count=1)  # warpgroup 0's probabilities and max are in shared memory
    mbarrier.init(bars.index(3), count=1)  # warpgroup 1's
    mbarrier.init(bars.index(4), count=2)  # both row sums are
    fence_async_shared()
    _load_q(q_ptr + (token * HEADS + head_block * BLOCK_H).to(gl.int64) * width, q_values.index(0),
            q_rope.index(0), VALUE_DIM, ROPE_DIM, num_warps)
    async_copy.commit_group()
    wait_for_copies(0)
    kv_base = kv_ptr + batch.to(gl.int64) * NUM_KEYS * width
    ids_base = idx_ptr + token.to(gl.int64) * SLOTS + split * per_split
    out_row = (token * SPLITS + split) * HEADS + head_block * BLOCK_H
    # (the argument tuples are written out twice: a tuple concatenation turns the constexprs into tensors)
    gl.warp_specialize([
        (_seesaw_warpgroup, (q_values, q_rope, kv_values, kv_rope, probs, maxes, sums, bars, kv_base, ids_base,
                             out_ptr, lse_ptr, out_row, NUM_KEYS, VALUE_DIM, ROPE_DIM, SCALE_LOG2,
                             per_split // BLOCK_N, 0)),
        (_seesaw_warpgroup, (q_values, q_rope, kv_values, kv_rope, probs, maxes, sums, bars, kv_base, ids_base,
                             out_ptr, lse_ptr, out_row, NUM_KEYS, VALUE_DIM, ROPE_DIM, SCALE_LOG2,
                             per_split // BLOCK_N, 1))], [4], [SEESAW_WORKER_REGISTERS])


SCHEDULES = {"split_slots": (_sparse_forward_kernel, NUM_WARPS), "seesaw": (_seesaw_forward_kernel, 4)}


def seesaw_smem_bytes(value_dim: int, rope_dim: int, itemsize: int = 2) -> int:
    """Shared memory of the seesaw schedule: q and two gathered blocks, probabilities where the rope columns are
    not 64 wide, the max and sum exchange, 5 mbarriers, and 1 KB for alignment (Triton's figure is ~160 B above
    the sum of these)."""
    probs = 0 if rope_dim == BLOCK_N.value else 2 * BLOCK_H.value * BLOCK_N.value * itemsize
    return 3 * BLOCK_H.value * (value_dim + rope_dim) * itemsize + probs + 2 * 2 * BLOCK_H.value * 4 + 5 * 8 + 1024


def schedule_for(value_dim: int, rope_dim: int, per_split: int) -> str:
    """The schedule that runs for padded widths R, P and slots per split: "seesaw" where it can, else
    "split_slots". The seesaw needs R >= 64 (a warpgroup's half of the value columns is a slice of a swizzled
    buffer, which Triton 3.6 cannot make narrower than 64 bytes), pairs of slot blocks and at least two pairs
    (Triton 3.6 fails to lower its loop with one iteration), and its shared memory."""
    if (value_dim >= 64 and per_split % (2 * BLOCK_N.value) == 0 and per_split >= 4 * BLOCK_N.value
            and seesaw_smem_bytes(value_dim, rope_dim) <= SMEM_BYTES):
        return "seesaw"
    return "split_slots"


def kernel_constants(q_shape, num_keys: int, slots: int, num_splits: int, value_dim: int, scale: float) -> dict:
    """The kernel's compile-time constants for padded q [B, T, H, R+P] (also used by the CPU compile test)."""
    return dict(NUM_Q=q_shape[1], HEADS=q_shape[2], NUM_KEYS=num_keys, SLOTS=slots, SPLITS=num_splits,
                VALUE_DIM=value_dim, ROPE_DIM=q_shape[3] - value_dim, SCALE_LOG2=float(scale) * math.log2(math.e))


def sparse_forward_gluon(q, kv, indices, *, scale: float, value_dim: int, num_splits: int, out_dtype,
                         schedule: str = "split_slots"):
    """q [B,T,H,R+P], kv [B,S,R+P], indices int32[B,T,K] -> (out [B,T,n,H,R], lse f32[B,T,n,H]), n = num_splits.

    Inputs already padded (`sparse_attention._gluon_call` pads): H a multiple of BLOCK_H; each split's slots a
    multiple of BLOCK_N and at least two blocks (with one, Triton 3.6 fails to lower the double-buffered loop;
    the seesaw schedule needs an even count); R and P powers of two in [16, GLUON_MAX_VALUE_DIM]; q and kv of one
    dtype in GLUON_DTYPES. schedule: "split_slots" (`_sparse_forward_kernel`) or "seesaw" (R >= 64, and its
    shared memory must fit)."""
    batch, num_q, heads, width = q.shape
    slots = indices.shape[-1]
    per_split = slots // num_splits
    if schedule not in SCHEDULES:
        raise ValueError(f"sparse_forward_gluon: schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    if (heads % BLOCK_H.value or slots % num_splits or per_split % BLOCK_N.value or per_split < 2 * BLOCK_N.value
            or value_dim > GLUON_MAX_VALUE_DIM or jnp.dtype(q.dtype) not in GLUON_DTYPES or kv.dtype != q.dtype
            or (schedule == "seesaw" and schedule_for(value_dim, width - value_dim, per_split) != "seesaw")):
        raise ValueError(f"sparse_forward_gluon: unpadded or unsupported input: q {q.shape} {q.dtype}, "
                         f"{slots} slots, {num_splits} splits, value_dim {value_dim}, schedule {schedule}")
    kernel, num_warps = SCHEDULES[schedule]
    out_shape = [jax.ShapeDtypeStruct((batch, num_q, num_splits, heads, value_dim), out_dtype),
                 jax.ShapeDtypeStruct((batch, num_q, num_splits, heads), jnp.float32)]
    return gluon_call(q, kv, indices, kernel=kernel, out_shape=out_shape,
                      grid=(num_q * (heads // BLOCK_H.value), batch * num_splits), num_warps=num_warps,
                      **kernel_constants(q.shape, kv.shape[1], slots, num_splits, value_dim, scale))
