"""The sparse MLA backward on Hopper, in Gluon: d_kv with slots on the wgmma rows (the scatter's operand stays in
registers), which also stores dS; then d_q as a gathered matmul of dS with the latent rows.

For one token, a block of 64 heads and a block of 64 of its slots (shapes as in `sparse_attention_reference`;
lse and delta as in `sparse_attention_backward`):

    S^T[j,h]   = kv[idx_j] . q[h]                  P^T[j,h] = exp(scale * S^T[j,h] - lse[h])
    dP^T[j,h]  = kv[idx_j, :R] . dO[h]             dS^T[j,h] = scale * P^T[j,h] * (dP^T[j,h] - delta[h])
    d_kv[idx_j] += sum_h dS^T[j,h] q[h]  +  [sum_h P^T[j,h] dO[h], 0]
    d_q[h]      = sum_j dS[h,j] kv[idx_j]

**d_kv** (`_d_kv_kernel`). Why Gluon, and why transposed: the Pallas d_kv kernel
(`sparse_attention_backward._d_kv_kernel`) computes [heads, slots] tiles on mma.sync and transposes them for the
scatter's dot; at 16 heads x 32 slots per step it ran at 101-112 TFLOP/s on an H100 and took 70% of the
backward's time. Here the logits dot is computed transposed, slots on the wgmma's M axis (m64n64: A = the gathered
rows, B = q^T), so S^T, dP^T and then dS^T and P^T sit in registers in the accumulator layout, which is also the
register layout of a wgmma's A operand: the scatter's dot d_kv[64 slots, C] = dS^T [64, 64 heads] . q[64 heads, C]
reads them without a trip through shared memory.

One program = one warpgroup = (token, 64 heads). Shared memory holds q (64 x (R+P)), dO (64 x R), one block of
gathered rows (64 x (R+P)) and Triton's 16 KB scratch for the layout conversions: 224 KB at DeepSeek-V3.2's
widths, so one program per SM and one gather buffer. The next block's gather is issued once both dots that read
the rows (S^T, dP^T) have finished, while the first scatter dot runs, and lands while the rest of the scatter runs.
d_kv goes out in pieces (PIECE value columns, then the rope columns; an fp32 accumulator each), each added into the
fp32 d_kv with relaxed 16-byte atomic adds (`_scatter_add`) while the next piece's dots run. The atomics are per
64-head block, twice per token at 128 heads; the Pallas kernel sums all heads first, but 128 heads of q and dO do
not fit in shared memory. Those adds are half the backward's time over a whole causal layer (T = 32768 on an H100:
162-168 ms, 145 with plain stores, 83 with none; storing P for a second kernel that adds each row once over all
heads was slower, 174 ms: docs/BENCHMARKS.md, session 33). While the first scatter dot runs, the block's dS
(already rounded to the input dtype for the scatter) is stored too, [heads, slots] per token, in 16-byte pieces
(`_store_d_logits`).

**d_q** (`_d_q_kernel`). The Pallas d_q kernel recomputed S and dP to rebuild dS, 1664 units of work per slot and
head against the 576 of the product dS . rows itself (4.6 ms of an 8.9 ms backward on an H100 at DeepSeek-V3.2
shapes). With dS stored, d_q is a matmul whose B operand is gathered: one program = a token's 128 heads (two
warpgroups; 64 where the heads are not a multiple of 128) x one column part (`gluon_d_q_parts`: 256 value + 32
rope columns at 512 + 64), A = the dS tile and B = the rows' columns, both from a 4-deep ring of cp.async copies.

Memory: dS takes 2 bytes per token, head and slot (512 KB per token at 128 heads x 2048 slots), so both kernels run
over chunks of tokens that keep the chunk's dS within a budget (Tiles.backward_d_s_bytes, 1 GiB by default; 512
tokens per chunk cost 2% over one launch on an H100). The chunk's first token is a runtime argument: one compiled
kernel of each for all chunks, in a `fori_loop`.

On an H100 (1024 tokens x 2048 slots, 128 heads, 512 + 64): d_kv with the dS store 3.9-4.2 ms (277-297 TFLOP/s),
d_q 0.88-0.90 ms (345-353 TFLOP/s), the backward 5.1-5.3 ms against 15.4-16.7 ms for the Pallas kernels
(docs/BENCHMARKS.md, session 26).

Gluon has no interpreter: the CPU tests compile both kernels for sm_90 and check their dot shapes, shared memory,
spills, vector stores and atomics, and run the wrapper (padding, chunks, vmap) around stand-in launches
(`tests/test_gluon_backward.py`); the gradients are checked against the reference's on the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from pallas_kernels._gluon import gluon_call
from pallas_kernels._gluon_hopper import operand_buffer, store_rows, wait_for_copies, wgmma_layout
from pallas_kernels.sparse_attention import GLUON_D_KV_PIECE, gluon_backward_width_reason, gluon_d_q_parts
from pallas_kernels.sparse_attention_gluon import (BLOCK_H, BLOCK_N, _gather_columns, _gather_rows, _load_q,
                                                   _opaque_zero, _row_layout)

PIECE = gl.constexpr(GLUON_D_KV_PIECE)  # d_kv value columns per scatter dot and atomic add
NUM_WARPS = 4  # one warpgroup


@gluon.jit
def _load_rows(src, dst, ROWS: gl.constexpr, WIDTH: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copy of ROWS contiguous rows of WIDTH elements at src into dst [ROWS, WIDTH]."""
    layout: gl.constexpr = _row_layout(WIDTH, num_warps)
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    columns = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    async_copy.async_copy_global_to_shared(dst, src + rows[:, None] * WIDTH + columns[None, :])


@gluon.jit
def _scatter_add(d_kv_ptr, rows, valid, acc, FIRST: gl.constexpr, WIDTH: gl.constexpr):
    """d_kv[rows[j], FIRST + c] += acc[j, c] for the valid slots j, with relaxed atomics (only atomicity is
    needed). The accumulator layout gives a thread 2 adjacent columns, so Triton would emit 8-byte atomics;
    converted (through shared memory) to 4 adjacent columns per thread and 8 threads per row, the adds are
    16-byte vector atomics, half as many: on an H100 the d_kv kernel took 3.8 ms instead of 5.3 (1024 tokens at
    DeepSeek-V3.2 shapes), faster even than 8-byte plain stores (4.4 ms). (`indexer_slots_gluon` adds its d_k
    the same way.)"""
    across: gl.constexpr = min(8, acc.shape[1] // 4)  # threads along a row: 8 (128 bytes), fewer for narrow tiles
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // across, across], [gl.num_warps(), 1], [1, 0])
    tile = gl.convert_layout(acc, layout)
    rows = gl.convert_layout(rows, gl.SliceLayout(1, layout))
    valid = gl.convert_layout(valid, gl.SliceLayout(1, layout))
    columns = FIRST + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    gl.atomic_add(d_kv_ptr + rows[:, None] * WIDTH + columns[None, :], tile, mask=valid[:, None], sem="relaxed")


@gluon.jit
def _chunk_token(first_ptr, local, NUM_Q: gl.constexpr):
    """(token in [0, T), whether it exists) of the chunk's local-th token; the chunk starts at first_ptr[0]."""
    token = gl.load(first_ptr) + local
    return token, token < NUM_Q


@gluon.jit
def _store_d_logits(d_s_ptr, d_logits, SLOTS: gl.constexpr, num_warps: gl.constexpr):
    """d_s[h, j] = d_logits[j, h] for a [BLOCK_N slots, BLOCK_H heads] tile; d_s_ptr at (head 0, slot 0) of a
    [heads, SLOTS] matrix. Converted first to 8 consecutive slots per thread: 16-byte stores, 8 threads per
    128-byte row segment (the accumulator layout would give 2-byte stores strided by a row)."""
    layout: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, num_warps], [0, 1])
    tile = gl.convert_layout(d_logits, layout)
    slots = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, layout))
    gl.store(d_s_ptr + heads[None, :] * SLOTS + slots[:, None], tile)


@gluon.jit
def _d_kv_kernel(q_ptr, kv_ptr, idx_ptr, d_out_ptr, lse_ptr, delta_ptr, first_ptr, d_kv_in_ptr, d_kv_ptr, d_s_ptr,
                 NUM_Q: gl.constexpr, CHUNK: gl.constexpr, HEADS: gl.constexpr, NUM_KEYS: gl.constexpr,
                 SLOTS: gl.constexpr, VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr, SCALE: gl.constexpr,
                 num_warps: gl.constexpr):
    # q [B, T, H, R+P], kv [B, S, R+P], idx i32[B, T, K], d_out [B, T, H, R], lse/delta f32[B, T, H] (lse in
    # natural log; +inf for padded heads and heads with no valid slot), first i32[1]: the chunk's first token;
    # d_kv f32[B, S, R+P], added to (aliased with d_kv_in); d_s [B, CHUNK, H, K] (dtype of q): dS of the chunk's
    # tokens, scaled, for the d_q kernel. Grid (CHUNK * H / 64, B), head blocks fastest.
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    num_blocks: gl.constexpr = SLOTS // BLOCK_N
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    head_blocks: gl.constexpr = HEADS // BLOCK_H
    batch = gl.program_id(1)
    local = gl.program_id(0) // head_blocks
    t, exists = _chunk_token(first_ptr, local, NUM_Q)
    if not exists:  # the last chunk's tail
        return
    token = batch * NUM_Q + t  # row in [B * T]
    head_block = gl.program_id(0) % head_blocks
    first_head = token * HEADS + head_block * BLOCK_H  # row in [B * T * H]
    d_s_base = d_s_ptr + ((batch * CHUNK + local) * HEADS + head_block * BLOCK_H).to(gl.int64) * SLOTS

    logits_layout: gl.constexpr = wgmma_layout(BLOCK_H, num_warps)
    piece_layout: gl.constexpr = wgmma_layout(PIECE, num_warps)
    rope_layout: gl.constexpr = wgmma_layout(ROPE_DIM, num_warps)
    piece_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=piece_layout, k_width=2)
    rope_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=rope_layout, k_width=2)
    slot_rows: gl.constexpr = gl.SliceLayout(1, logits_layout)
    head_columns: gl.constexpr = gl.SliceLayout(0, logits_layout)

    # [1, rows, columns], indexed in the loop with an opaque 0 (`_opaque_zero`: hoisted, the wgmma descriptors
    # would hold registers through the loop)
    q_values_all = operand_buffer(dtype, [1, BLOCK_H, VALUE_DIM])
    q_rope_all = operand_buffer(dtype, [1, BLOCK_H, ROPE_DIM])
    d_out_all = operand_buffer(dtype, [1, BLOCK_H, VALUE_DIM])
    kv_values_all = operand_buffer(dtype, [1, BLOCK_N, VALUE_DIM])
    kv_rope_all = operand_buffer(dtype, [1, BLOCK_N, ROPE_DIM])
    q_values, q_rope, d_out = q_values_all.index(0), q_rope_all.index(0), d_out_all.index(0)
    kv_values, kv_rope = kv_values_all.index(0), kv_rope_all.index(0)

    _load_q(q_ptr + first_head.to(gl.int64) * width, q_values, q_rope, VALUE_DIM, ROPE_DIM, num_warps)
    _load_rows(d_out_ptr + first_head.to(gl.int64) * VALUE_DIM, d_out, BLOCK_H, VALUE_DIM, num_warps)
    kv_base = kv_ptr + batch.to(gl.int64) * NUM_KEYS * width
    d_kv_base = d_kv_ptr + batch.to(gl.int64) * NUM_KEYS * width
    ids_base = idx_ptr + token.to(gl.int64) * SLOTS
    _gather_rows(kv_base, ids_base, kv_values, kv_rope, NUM_KEYS, VALUE_DIM, ROPE_DIM, num_warps)
    async_copy.commit_group()

    heads = first_head + gl.arange(0, BLOCK_H, layout=head_columns)
    lse = gl.load(lse_ptr + heads)
    lse_log2 = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # no valid slot: p = 0
    delta = gl.load(delta_ptr + heads)
    scale_log2: gl.constexpr = SCALE * 1.4426950408889634
    for j in range(num_blocks):
        wait_for_copies(0)  # block j (and, the first time, q and dO) landed for every thread
        zero = _opaque_zero(j)
        q_values, q_rope, d_out = q_values_all.index(zero), q_rope_all.index(zero), d_out_all.index(zero)
        kv_values, kv_rope = kv_values_all.index(zero), kv_rope_all.index(zero)
        logits = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(kv_rope, q_rope.permute((1, 0)), logits, use_acc=False, is_async=True)
        logits = warpgroup_mma(kv_values, q_values.permute((1, 0)), logits, is_async=True)
        d_probs = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, layout=logits_layout)
        d_probs = warpgroup_mma(kv_values, d_out.permute((1, 0)), d_probs, use_acc=False, is_async=True)
        ids = gl.load(ids_base + j * BLOCK_N + gl.arange(0, BLOCK_N, layout=slot_rows))
        valid = ids >= 0
        rows = gl.minimum(ids, NUM_KEYS - 1).to(gl.int64)
        logits, d_probs = warpgroup_mma_wait(0, deps=[logits, d_probs])
        probs = gl.exp2(logits * scale_log2 - lse_log2[None, :])
        probs = gl.where(valid[:, None], probs, 0.0)
        d_logits = probs * (d_probs - delta[None, :]) * SCALE
        d_logits = d_logits.to(dtype)
        probs = probs.to(dtype)
        d_logits_op = gl.convert_layout(d_logits, piece_operand)
        probs_op = gl.convert_layout(probs, piece_operand)
        # Each scatter dot runs while the previous one's result is added into d_kv, the first while the next
        # block's gather is issued: value piece 0, the rope columns, then value pieces 1, 2, ...
        acc = gl.zeros([BLOCK_N, PIECE], gl.float32, layout=piece_layout)
        acc = warpgroup_mma(d_logits_op, q_values.slice(0, PIECE, dim=1), acc, use_acc=False, is_async=True)
        acc = warpgroup_mma(probs_op, d_out.slice(0, PIECE, dim=1), acc, is_async=True)
        _store_d_logits(d_s_base + j * BLOCK_N, d_logits, SLOTS, num_warps)
        gl.thread_barrier()  # every warp's logits dots are done with the rows: gather the next block over them
        if j + 1 < num_blocks:
            _gather_rows(kv_base, ids_base + (j + 1) * BLOCK_N, kv_values, kv_rope, NUM_KEYS, VALUE_DIM, ROPE_DIM,
                         num_warps)
            async_copy.commit_group()
        acc = warpgroup_mma_wait(0, deps=[acc])
        rope_acc = gl.zeros([BLOCK_N, ROPE_DIM], gl.float32, layout=rope_layout)
        rope_acc = warpgroup_mma(gl.convert_layout(d_logits, rope_operand), q_rope, rope_acc, use_acc=False,
                                 is_async=True)
        _scatter_add(d_kv_base, rows, valid, acc, 0, width)
        rope_acc = warpgroup_mma_wait(0, deps=[rope_acc])
        if VALUE_DIM == PIECE:
            _scatter_add(d_kv_base, rows, valid, rope_acc, VALUE_DIM, width)
        else:
            acc = gl.zeros([BLOCK_N, PIECE], gl.float32, layout=piece_layout)
            acc = warpgroup_mma(d_logits_op, q_values.slice(PIECE, PIECE, dim=1), acc, use_acc=False,
                                is_async=True)
            acc = warpgroup_mma(probs_op, d_out.slice(PIECE, PIECE, dim=1), acc, is_async=True)
            _scatter_add(d_kv_base, rows, valid, rope_acc, VALUE_DIM, width)
            acc = warpgroup_mma_wait(0, deps=[acc])
            for c in gl.static_range(2, VALUE_DIM // PIECE):
                nxt = gl.zeros([BLOCK_N, PIECE], gl.float32, layout=piece_layout)
                nxt = warpgroup_mma(d_logits_op, q_values.slice(c * PIECE, PIECE, dim=1), nxt, use_acc=False,
                                    is_async=True)
                nxt = warpgroup_mma(probs_op, d_out.slice(c * PIECE, PIECE, dim=1), nxt, is_async=True)
                _scatter_add(d_kv_base, rows, valid, acc, (c - 1) * PIECE, width)
                acc = warpgroup_mma_wait(0, deps=[nxt])
            _scatter_add(d_kv_base, rows, valid, acc, VALUE_DIM - PIECE, width)
    async_copy.wait_group(0)


@gluon.jit
def _load_block(kv_base, ids_ptr, d_s_ptr, values_dst, rope_dst, d_s_dst, part, VALUE_DIM: gl.constexpr,
                ROPE_DIM: gl.constexpr, PARTS: gl.constexpr, NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr,
                BLOCK_M: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copies of a slot block's operands for column part `part`: its share of the value and
    of the rope columns of the block's BLOCK_N latent rows, and the block's [BLOCK_M, BLOCK_N] tile of dS
    (d_s_ptr at its first element, rows SLOTS apart)."""
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    values: gl.constexpr = VALUE_DIM // PARTS
    rope: gl.constexpr = ROPE_DIM // PARTS
    _gather_columns(kv_base + part * values, ids_ptr, values_dst, 0, values, width, NUM_KEYS, num_warps)
    _gather_columns(kv_base + part * rope, ids_ptr, rope_dst, VALUE_DIM, rope, width, NUM_KEYS, num_warps)
    tile_layout: gl.constexpr = _row_layout(BLOCK_N, num_warps)
    heads = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, tile_layout))
    slots = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, tile_layout))
    async_copy.async_copy_global_to_shared(d_s_dst, d_s_ptr + heads[:, None] * SLOTS + slots[None, :])


@gluon.jit
def _d_q_kernel(kv_ptr, idx_ptr, d_s_ptr, first_ptr, d_q_in_ptr, d_q_ptr, NUM_Q: gl.constexpr,
                CHUNK: gl.constexpr, HEADS: gl.constexpr, NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr,
                VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr, PARTS: gl.constexpr, STAGES: gl.constexpr,
                num_warps: gl.constexpr):
    # kv [B, S, R+P], idx i32[B, T, K], d_s [B, CHUNK, H, K] (the d_kv kernel's), first i32[1]; d_q [B, T, H,
    # R+P] (dtype of kv; aliased with d_q_in: the chunk's rows are written, the others kept). One program = a
    # token's BLOCK_M heads (64 per warpgroup) x one of PARTS column parts (R / PARTS value columns and P / PARTS
    # rope columns): d_q = dS . rows, a gathered matmul with no softmax, its operands in a STAGES-deep ring of
    # cp.async copies, loaded STAGES - 2 blocks ahead so that one dot stays in flight. Grid (CHUNK * H / BLOCK_M
    # * PARTS, B), parts fastest (they read the same dS tiles), then head blocks.
    BLOCK_M: gl.constexpr = 16 * num_warps
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    values: gl.constexpr = VALUE_DIM // PARTS
    rope: gl.constexpr = ROPE_DIM // PARTS
    head_blocks: gl.constexpr = HEADS // BLOCK_M
    num_blocks: gl.constexpr = SLOTS // BLOCK_N
    dtype: gl.constexpr = kv_ptr.dtype.element_ty
    batch = gl.program_id(1)
    part = gl.program_id(0) % PARTS
    head_block = (gl.program_id(0) // PARTS) % head_blocks
    local = gl.program_id(0) // (PARTS * head_blocks)
    t, exists = _chunk_token(first_ptr, local, NUM_Q)
    if not exists:  # the last chunk's tail
        return
    kv_base = kv_ptr + batch.to(gl.int64) * NUM_KEYS * width
    ids_base = idx_ptr + (batch * NUM_Q + t).to(gl.int64) * SLOTS
    d_s_base = d_s_ptr + ((batch * CHUNK + local) * HEADS + head_block * BLOCK_M).to(gl.int64) * SLOTS

    values_layout: gl.constexpr = wgmma_layout(values, num_warps)
    rope_layout: gl.constexpr = wgmma_layout(rope, num_warps)
    values_smem = operand_buffer(dtype, [STAGES, BLOCK_N, values])
    rope_smem = operand_buffer(dtype, [STAGES, BLOCK_N, rope])
    d_s_smem = operand_buffer(dtype, [STAGES, BLOCK_M, BLOCK_N])
    for s in gl.static_range(STAGES - 2):
        _load_block(kv_base, ids_base + s * BLOCK_N, d_s_base + s * BLOCK_N, values_smem.index(s),
                    rope_smem.index(s), d_s_smem.index(s), part, VALUE_DIM, ROPE_DIM, PARTS, NUM_KEYS, SLOTS,
                    BLOCK_M, num_warps)
        async_copy.commit_group()
    acc = gl.zeros([BLOCK_M, values], gl.float32, layout=values_layout)
    rope_acc = gl.zeros([BLOCK_M, rope], gl.float32, layout=rope_layout)
    for j in range(num_blocks):
        wait_for_copies(STAGES - 3)  # block j's copies landed, and every warp has waited for block j - 2's dots
        ahead = j + STAGES - 2
        if ahead < num_blocks:  # into the buffers block j - 2 used
            buf = ahead % STAGES
            _load_block(kv_base, ids_base + ahead * BLOCK_N, d_s_base + ahead * BLOCK_N, values_smem.index(buf),
                        rope_smem.index(buf), d_s_smem.index(buf), part, VALUE_DIM, ROPE_DIM, PARTS, NUM_KEYS,
                        SLOTS, BLOCK_M, num_warps)
        async_copy.commit_group()  # (empty past the end: the wait above counts groups)
        buf = j % STAGES
        acc = warpgroup_mma(d_s_smem.index(buf), values_smem.index(buf), acc, is_async=True)
        rope_acc = warpgroup_mma(d_s_smem.index(buf), rope_smem.index(buf), rope_acc, is_async=True)
        acc, rope_acc = warpgroup_mma_wait(2, deps=[acc, rope_acc])  # block j - 1's dots are done
    acc, rope_acc = warpgroup_mma_wait(0, deps=[acc, rope_acc])
    async_copy.wait_group(0)
    first_row = (batch * NUM_Q + t) * HEADS + head_block * BLOCK_M
    store_rows(d_q_ptr + part * values, first_row, width, acc)
    store_rows(d_q_ptr + VALUE_DIM + part * rope, first_row, width, rope_acc)


D_Q_STAGES = 4  # a ring of 4 blocks, loaded 2 ahead


def d_q_warps(heads: int) -> int:
    """8 warps (two warpgroups, 128 heads per program) where the padded heads allow, else 4."""
    return 8 if heads % 128 == 0 else 4


def kernel_constants(q_shape, num_keys: int, slots: int, value_dim: int, scale: float, chunk: int = 0) -> dict:
    """The d_kv kernel's compile-time constants for padded q [B, T, H, R+P] (also used by the CPU compile test);
    chunk: tokens per launch (0: all T)."""
    return dict(NUM_Q=q_shape[1], CHUNK=chunk or q_shape[1], HEADS=q_shape[2], NUM_KEYS=num_keys, SLOTS=slots,
                VALUE_DIM=value_dim, ROPE_DIM=q_shape[3] - value_dim, SCALE=float(scale))


def d_q_kernel_constants(q_shape, num_keys: int, slots: int, value_dim: int, chunk: int = 0) -> dict:
    """The d_q kernel's compile-time constants (num_warps: `d_q_warps`)."""
    rope_dim = q_shape[3] - value_dim
    return dict(NUM_Q=q_shape[1], CHUNK=chunk or q_shape[1], HEADS=q_shape[2], NUM_KEYS=num_keys, SLOTS=slots,
                VALUE_DIM=value_dim, ROPE_DIM=rope_dim, PARTS=gluon_d_q_parts(value_dim, rope_dim), STAGES=D_Q_STAGES)


def chunk_tokens(batch: int, num_q: int, heads: int, slots: int, budget_bytes: int) -> int:
    """Tokens per launch so that the chunk's dS (2 bytes per head and slot) stays within budget_bytes."""
    return max(1, min(num_q, budget_bytes // (2 * batch * heads * slots)))


def sparse_backward_gluon(q, kv, indices, d_out, lse, delta, *, scale: float, value_dim: int, d_s_bytes: int):
    """Padded operands: q [B,T,H,R+P] and kv [B,S,R+P] of one 2-byte dtype with H a multiple of 64, indices
    int32[B,T,K] with K a multiple of 64 and at least 128 (with one block, Triton 3.6 fails to lower the loop),
    d_out [B,T,H,R] (dtype of q), lse and delta f32[B,T,H] (padded heads: lse = +inf) -> (d_q [B,T,H,R+P] (dtype
    of q), d_kv f32[B,S,R+P]).

    The d_kv kernel also stores dS (scaled, in the input dtype) for the d_q kernel, which then needs no second
    pass over the logits; both run over chunks of tokens so that one chunk's dS stays within d_s_bytes."""
    batch, num_q, heads, width = q.shape
    num_keys, slots = kv.shape[1], indices.shape[-1]
    if (heads % BLOCK_H.value or slots % BLOCK_N.value or slots < 2 * BLOCK_N.value
            or gluon_backward_width_reason(value_dim, width - value_dim)):
        raise ValueError(f"sparse_backward_gluon: unpadded or unsupported input: q {q.shape}, {slots} slots, "
                         f"value_dim {value_dim}")
    chunk = chunk_tokens(batch, num_q, heads, slots, d_s_bytes)
    num_chunks = -(-num_q // chunk)
    warps = d_q_warps(heads)
    d_q_constants = d_q_kernel_constants(q.shape, num_keys, slots, value_dim, chunk)
    d_q_programs = chunk * heads // (16 * warps) * d_q_constants["PARTS"]

    def one_chunk(c, carry):
        d_q, d_kv = carry
        first = jnp.full((1,), c * chunk, jnp.int32)
        d_kv, d_s = gluon_call(q, kv, indices, d_out, lse, delta, first, d_kv, kernel=_d_kv_kernel,
                               out_shape=[jax.ShapeDtypeStruct(d_kv.shape, jnp.float32),
                                          jax.ShapeDtypeStruct((batch, chunk, heads, slots), q.dtype)],
                               grid=(chunk * (heads // BLOCK_H.value), batch), num_warps=NUM_WARPS,
                               input_output_aliases={7: 0},
                               **kernel_constants(q.shape, num_keys, slots, value_dim, scale, chunk))
        d_q = gluon_call(kv, indices, d_s, first, d_q, kernel=_d_q_kernel,
                         out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(d_q_programs, batch),
                         num_warps=warps, input_output_aliases={4: 0}, **d_q_constants)
        return d_q, d_kv

    carry = (jnp.zeros(q.shape, q.dtype), jnp.zeros((batch, num_keys, width), jnp.float32))
    if num_chunks == 1:
        return one_chunk(0, carry)
    return jax.lax.fori_loop(0, num_chunks, one_chunk, carry)
