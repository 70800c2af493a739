"""Sparse MLA attention forward on Hopper, in Gluon: 64 heads x 64 slots per step over two warpgroups.

Why not Pallas (or plain Triton): the output accumulator of 64 heads x 512 value columns is 128 KB of fp32, more
than one warpgroup's registers, so it must be split over two warpgroups by value column. Triton then lays out the
logits dot that feeds it with all warps along the head axis, and each warpgroup computes the whole 64 x 64 logits
block, duplicating QK^T (53% of the FLOPs). Pallas's Triton backend keeps 32 heads per program on mma.sync instead
(no wgmma); on an H100 it reached 259-267 TFLOP/s, plain Triton 282, this kernel 372-374 (docs/BENCHMARKS.md).
Gluon names the layouts, so here:
  - the logits [64 heads, 64 slots] are split by slot column, 32 per warpgroup (wgmma m64n32, no duplication);
    the row max and sum combine the halves through shared memory;
  - the probabilities are exchanged through shared memory so that each warpgroup reads all 64 slots of its 64
    heads, and it accumulates
    its half of the value columns (wgmma m64n256, A from registers);
  - q (64 heads x 576) stays in shared memory, and the gathered latent rows are one [64, 576] buffer read by both
    dots (as K^T for the logits, as V for the output), double-buffered: the next block's rows are gathered by
    cp.async (16-byte pieces of contiguous row segments, no gathered copy in HBM) while this one is used.
-1 slots copy nothing (their shared-memory rows are zero-filled) and are masked to -inf; a token with no valid
slot gets zeros and log-sum-exp -inf; slot ids past the cache are clipped, as in the Pallas kernel. The numerics
are those of `sparse_attention._sparse_kernel` (fp32 logits and softmax, probabilities rounded to the input dtype
for the value dot), in base 2.

Gluon has no interpreter, so CPU tests compile this kernel for sm_90 (`tests/test_gluon_kernels.py`: it compiles,
fits shared memory, does not spill, and issues each dot once); its numbers are checked on the GPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from pallas_kernels._gluon import gluon_call
from pallas_kernels.sparse_attention import GLUON_DTYPES, GLUON_MAX_VALUE_DIM

BLOCK_H = gl.constexpr(64)  # heads per program: one wgmma row block
BLOCK_N = gl.constexpr(64)  # slots per step
NUM_WARPS = 8  # two warpgroups


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
def _sparse_forward_kernel(q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr, NUM_Q: gl.constexpr, HEADS: gl.constexpr,
                           NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr, SPLITS: gl.constexpr,
                           VALUE_DIM: gl.constexpr, ROPE_DIM: gl.constexpr, SCALE_LOG2: gl.constexpr,
                           num_warps: gl.constexpr):
    # q [B, T, H, R+P], kv [B, S, R+P], idx [B, T, K], out [B, T, n, H, R], lse f32[B, T, n, H] (n = SPLITS).
    # Programs: axis 0 = token x head block, head blocks fastest (the programs of one token gather the same rows
    # and share them in L2), axis 1 = batch x split. (Tokens on an axis of their own would cap them at 65535.)
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    per_split: gl.constexpr = SLOTS // SPLITS
    num_blocks: gl.constexpr = per_split // BLOCK_N
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    head_blocks: gl.constexpr = HEADS // BLOCK_H
    head_block = gl.program_id(0) % head_blocks
    batch = gl.program_id(1) // SPLITS
    token = batch * NUM_Q + gl.program_id(0) // head_blocks
    split = gl.program_id(1) % SPLITS

    logits_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                            instr_shape=[16, BLOCK_N // 2, 16])
    out_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                         instr_shape=[16, VALUE_DIM // 2, 16])
    value_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, VALUE_DIM], dtype)
    rope_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, ROPE_DIM], dtype)
    q_values = gl.allocate_shared_memory(dtype, [BLOCK_H, VALUE_DIM], value_smem)
    q_rope = gl.allocate_shared_memory(dtype, [BLOCK_H, ROPE_DIM], rope_smem)
    kv_values = gl.allocate_shared_memory(dtype, [2, BLOCK_N, VALUE_DIM], value_smem)
    kv_rope = gl.allocate_shared_memory(dtype, [2, BLOCK_N, ROPE_DIM], rope_smem)

    value_layout: gl.constexpr = _row_layout(VALUE_DIM, num_warps)
    rope_layout: gl.constexpr = _row_layout(ROPE_DIM, num_warps)
    q_row = (token * HEADS + head_block * BLOCK_H).to(gl.int64) * width
    heads_v = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, value_layout))
    heads_r = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, rope_layout))
    async_copy.async_copy_global_to_shared(
        q_values, q_ptr + q_row + heads_v[:, None] * width
        + gl.arange(0, VALUE_DIM, layout=gl.SliceLayout(0, value_layout))[None, :])
    async_copy.async_copy_global_to_shared(
        q_rope, q_ptr + q_row + heads_r[:, None] * width + VALUE_DIM
        + gl.arange(0, ROPE_DIM, layout=gl.SliceLayout(0, rope_layout))[None, :])
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
    probs_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dtype))
    acc = gl.zeros([BLOCK_H, VALUE_DIM], gl.float32, layout=out_layout)
    for j in range(num_blocks):
        buf = j % 2
        async_copy.wait_group(0)
        gl.thread_barrier()  # block j has landed, and every warp is done with block j - 1 (buffer and probs)
        fence_async_shared()  # the landed rows are visible to wgmma, which reads through the async proxy
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

    row_sum = gl.sum(sums, axis=1)
    has_any = row_sum > 0
    inverse = gl.convert_layout(1.0 / gl.where(has_any, row_sum, 1.0), gl.SliceLayout(1, out_layout))
    out_row = (token * SPLITS + split) * HEADS + head_block * BLOCK_H
    heads_o = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, out_layout))
    columns_o = gl.arange(0, VALUE_DIM, layout=gl.SliceLayout(0, out_layout))
    gl.store(out_ptr + (out_row + heads_o).to(gl.int64)[:, None] * VALUE_DIM + columns_o[None, :],
             (acc * inverse[:, None]).to(out_ptr.dtype.element_ty))
    lse = gl.where(has_any, (row_max + gl.log2(gl.where(has_any, row_sum, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    gl.store(lse_ptr + out_row + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, logits_layout)), lse)


def kernel_constants(q_shape, num_keys: int, slots: int, num_splits: int, value_dim: int, scale: float) -> dict:
    """The kernel's compile-time constants for padded q [B, T, H, R+P] (also used by the CPU compile test)."""
    return dict(NUM_Q=q_shape[1], HEADS=q_shape[2], NUM_KEYS=num_keys, SLOTS=slots, SPLITS=num_splits,
                VALUE_DIM=value_dim, ROPE_DIM=q_shape[3] - value_dim, SCALE_LOG2=float(scale) * math.log2(math.e))


def sparse_forward_gluon(q, kv, indices, *, scale: float, value_dim: int, num_splits: int, out_dtype):
    """q [B,T,H,R+P], kv [B,S,R+P], indices int32[B,T,K] -> (out [B,T,n,H,R], lse f32[B,T,n,H]), n = num_splits.

    Inputs already padded (`sparse_attention._gluon_call` pads): H a multiple of BLOCK_H; each split's slots a
    multiple of BLOCK_N and at least two blocks (with one, Triton 3.6 fails to lower the double-buffered loop);
    R and P powers of two in [16, GLUON_MAX_VALUE_DIM]; q and kv of one dtype in GLUON_DTYPES."""
    batch, num_q, heads, width = q.shape
    slots = indices.shape[-1]
    per_split = slots // num_splits
    if (heads % BLOCK_H.value or slots % num_splits or per_split % BLOCK_N.value or per_split < 2 * BLOCK_N.value
            or value_dim > GLUON_MAX_VALUE_DIM or jnp.dtype(q.dtype) not in GLUON_DTYPES or kv.dtype != q.dtype):
        raise ValueError(f"sparse_forward_gluon: unpadded or unsupported input: q {q.shape} {q.dtype}, "
                         f"{slots} slots, {num_splits} splits, value_dim {value_dim}")
    out_shape = [jax.ShapeDtypeStruct((batch, num_q, num_splits, heads, value_dim), out_dtype),
                 jax.ShapeDtypeStruct((batch, num_q, num_splits, heads), jnp.float32)]
    return gluon_call(q, kv, indices, kernel=_sparse_forward_kernel, out_shape=out_shape,
                      grid=(num_q * (heads // BLOCK_H.value), batch * num_splits), num_warps=NUM_WARPS,
                      **kernel_constants(q.shape, kv.shape[1], slots, num_splits, value_dim, scale))
