"""d_kv of sparse MLA attention on Hopper, in Gluon: slots on the wgmma rows, so the scatter's operand stays in
registers.

For one token, a block of 64 heads and a block of 64 of its slots (shapes as in `sparse_attention_reference`;
lse and delta as in `sparse_attention_backward`):

    S^T[j,h]   = kv[idx_j] . q[h]                  P^T[j,h] = exp(scale * S^T[j,h] - lse[h])
    dP^T[j,h]  = kv[idx_j, :R] . dO[h]             dS^T[j,h] = scale * P^T[j,h] * (dP^T[j,h] - delta[h])
    d_kv[idx_j] += sum_h dS^T[j,h] q[h]  +  [sum_h P^T[j,h] dO[h], 0]

Why Gluon, and why transposed: the Pallas d_kv kernel (`sparse_attention_backward._d_kv_kernel`) computes [heads,
slots] tiles on mma.sync and transposes them for the scatter's dot; at 16 heads x 32 slots per step it ran at
101-112 TFLOP/s on an H100 and took 70% of the backward's time. Here the logits dot is computed transposed, slots
on the wgmma's M axis (m64n64: A = the gathered rows, B = q^T), so S^T, dP^T and then dS^T and P^T sit in registers in
the accumulator layout, which is also the register layout of a wgmma's A operand: the scatter's dot
d_kv[64 slots, C] = dS^T [64, 64 heads] . q[64 heads, C] reads them without a trip through shared memory.

One program = one warpgroup = (token, 64 heads). Shared memory holds q (64 x (R+P)), dO (64 x R), one block of
gathered rows (64 x (R+P)) and Triton's 16 KB scratch for the scatter's layout conversion: 224 KB at
DeepSeek-V3.2's widths, so one program per SM and one gather buffer. The next block's gather is issued once both
dots that read the rows (S^T, dP^T) have finished, while the first scatter dot runs, and lands while the rest of
the scatter runs. d_kv goes out in pieces (PIECE value columns, then the rope columns; an fp32 accumulator each),
each added into the fp32 d_kv with relaxed 16-byte atomic adds (`_scatter_add`) while the next piece's dots run.
On an H100 (1024 tokens x 2048 slots, 128 heads, 512 + 64): 3.85-3.94 ms, 297-303 TFLOP/s, against 10.5-11.5 ms
for the Pallas kernel (docs/BENCHMARKS.md, session 25). The atomics are per 64-head block, twice per token at
128 heads; the Pallas kernel sums all heads first, but 128 heads of q and dO do not fit in shared memory.

Gluon has no interpreter: the CPU tests compile this kernel for sm_90 and check its dot shapes, shared memory,
spills and vector atomics, and run its wrapper around a stand-in launch (`tests/test_gluon_backward.py`); its
gradients are checked against the reference's on the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from pallas_kernels._gluon import gluon_call
from pallas_kernels.sparse_attention import GLUON_D_KV_PIECE, gluon_d_kv_width_reason
from pallas_kernels.sparse_attention_gluon import BLOCK_H, BLOCK_N, _gather_rows, _load_q, _opaque_zero, _row_layout

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
    DeepSeek-V3.2 shapes), faster even than 8-byte plain stores (4.4 ms)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [gl.num_warps(), 1], [1, 0])
    tile = gl.convert_layout(acc, layout)
    rows = gl.convert_layout(rows, gl.SliceLayout(1, layout))
    valid = gl.convert_layout(valid, gl.SliceLayout(1, layout))
    columns = FIRST + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    gl.atomic_add(d_kv_ptr + rows[:, None] * WIDTH + columns[None, :], tile, mask=valid[:, None], sem="relaxed")


@gluon.jit
def _d_kv_kernel(q_ptr, kv_ptr, idx_ptr, d_out_ptr, lse_ptr, delta_ptr, d_kv_zeros_ptr, d_kv_ptr,
                 NUM_Q: gl.constexpr, HEADS: gl.constexpr, NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr,
                 VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr, SCALE: gl.constexpr, num_warps: gl.constexpr):
    # q [B, T, H, R+P], kv [B, S, R+P], idx i32[B, T, K], d_out [B, T, H, R], lse/delta f32[B, T, H] (lse in
    # natural log; +inf for padded heads and heads with no valid slot), d_kv f32[B, S, R+P], zero on entry
    # (aliased with d_kv_zeros). Grid (T * H / 64, B), head blocks fastest.
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    num_blocks: gl.constexpr = SLOTS // BLOCK_N
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    head_blocks: gl.constexpr = HEADS // BLOCK_H
    batch = gl.program_id(1)
    token = batch * NUM_Q + gl.program_id(0) // head_blocks  # row in [B * T]
    first_head = token * HEADS + (gl.program_id(0) % head_blocks) * BLOCK_H  # row in [B * T * H]

    logits_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, BLOCK_H, 16])
    piece_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, PIECE, 16])
    rope_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                          instr_shape=[16, ROPE_DIM, 16])
    piece_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=piece_layout, k_width=2)
    rope_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=rope_layout, k_width=2)
    slot_rows: gl.constexpr = gl.SliceLayout(1, logits_layout)
    head_columns: gl.constexpr = gl.SliceLayout(0, logits_layout)

    value_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, VALUE_DIM], dtype)
    rope_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, ROPE_DIM], dtype)
    # [1, rows, columns], indexed in the loop with an opaque 0 (`_opaque_zero`: hoisted, the wgmma descriptors
    # would hold registers through the loop)
    q_values_all = gl.allocate_shared_memory(dtype, [1, BLOCK_H, VALUE_DIM], value_smem)
    q_rope_all = gl.allocate_shared_memory(dtype, [1, BLOCK_H, ROPE_DIM], rope_smem)
    d_out_all = gl.allocate_shared_memory(dtype, [1, BLOCK_H, VALUE_DIM], value_smem)
    kv_values_all = gl.allocate_shared_memory(dtype, [1, BLOCK_N, VALUE_DIM], value_smem)
    kv_rope_all = gl.allocate_shared_memory(dtype, [1, BLOCK_N, ROPE_DIM], rope_smem)
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
        async_copy.wait_group(0)
        gl.thread_barrier()  # block j (and, the first time, q and dO) landed for every thread
        fence_async_shared()  # ... and is visible to wgmma, which reads through the async proxy
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


def kernel_constants(q_shape, num_keys: int, slots: int, value_dim: int, scale: float) -> dict:
    """The kernel's compile-time constants for padded q [B, T, H, R+P] (also used by the CPU compile test)."""
    return dict(NUM_Q=q_shape[1], HEADS=q_shape[2], NUM_KEYS=num_keys, SLOTS=slots, VALUE_DIM=value_dim,
                ROPE_DIM=q_shape[3] - value_dim, SCALE=float(scale))


def sparse_d_kv_gluon(q, kv, indices, d_out, lse, delta, *, scale: float, value_dim: int):
    """Padded operands: q [B,T,H,R+P] and kv [B,S,R+P] of one 2-byte dtype with H a multiple of 64, indices
    int32[B,T,K] with K a multiple of 64 and at least 128 (with one block, Triton 3.6 fails to lower the loop),
    d_out [B,T,H,R] (dtype of q), lse and delta f32[B,T,H] (padded heads: lse = +inf) -> d_kv f32[B,S,R+P]."""
    batch, num_q, heads, width = q.shape
    num_keys, slots = kv.shape[1], indices.shape[-1]
    if (heads % BLOCK_H.value or slots % BLOCK_N.value or slots < 2 * BLOCK_N.value
            or gluon_d_kv_width_reason(value_dim, width - value_dim)):
        raise ValueError(f"sparse_d_kv_gluon: unpadded or unsupported input: q {q.shape}, {slots} slots, "
                         f"value_dim {value_dim}")
    zeros = jnp.zeros((batch, num_keys, width), jnp.float32)
    return gluon_call(q, kv, indices, d_out, lse, delta, zeros, kernel=_d_kv_kernel,
                      out_shape=jax.ShapeDtypeStruct((batch, num_keys, width), jnp.float32),
                      grid=(num_q * (heads // BLOCK_H.value), batch), num_warps=NUM_WARPS,
                      input_output_aliases={6: 0},
                      **kernel_constants(q.shape, num_keys, slots, value_dim, scale))
