"""The sparse stages' distillation target (`sparse_distribution`) on Hopper, in Gluon: the head-averaged attention
distribution over each query's slots, given the forward's log-sum-exp.

    partial[b,t,c,j] = sum over the heads h of head block c of exp(scale * q[b,t,h] . kv[b, idx[b,t,j]] - lse[b,t,h])

One program per (token, head block): q [BLOCK_H, R+P] in registers as the A operand of the logits dot, the gathered
latent rows of each block of 64 slots in a double-buffered [64, R+P] shared-memory buffer (cp.async, as
`sparse_attention_gluon` gathers them: -1 slots copy nothing, their rows are zero-filled and masked), the logits
[BLOCK_H, 64] on wgmma (each warpgroup 64 heads: m64n64), then exp2 and the sum over the heads on the CUDA cores,
64 partial sums stored per block. Two program shapes (GLUON_SHAPES):
  - "all_heads" (128 heads, two warpgroups): one program per token of 128 heads gathers each row once;
  - "half_heads" (64 heads, one warpgroup): for models of at most 64 heads, which all_heads would pad to 128.

Why q in registers: a first version kept q in shared memory (128 heads x 32 slots per step, both wgmma operands in
shared memory). Each m64n32k16 then reads 3 KB of shared memory for 16 cycles of tensor work, more than the 128
bytes per cycle that shared memory gives, and ncu found it latency-bound at one program per SM. With q in
registers (R+P)/4 registers per thread (144 at 512 + 64; 204 in all at 8 warps, no spills), the dot reads only the
gathered rows from shared memory, and the buffers take the space q took. On an H100 at K = 2048, 128 heads:
3.19-3.20 ms at T = 4096 and 24.5-26.0 ms at T = 32768, against 4.29-4.34 / 32.3-32.6 ms for the first version; a
third buffer, or the next block's dots run under this block's sums, did not help (docs/BENCHMARKS.md, session 29).
The limit is the register-resident q: R+P at most GLUON_MAX_WIDTH (576) columns.

Gluon has no interpreter: CPU tests compile the kernel for sm_90 (it fits, does not spill, issues its dots at the
expected shapes with q from registers); the numbers are checked on the GPU against the float32 reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from pallas_kernels._gluon import gluon_call
from pallas_kernels._gluon_hopper import operand_buffer, wait_for_copies, wgmma_layout
from pallas_kernels.sparse_attention_gluon import _gather_columns
from pallas_kernels.sparse_distribution import GLUON_SHAPES as SHAPES  # (heads, slots) per program and step


def num_warps_for(shape: str) -> int:
    """One warpgroup per 64 heads."""
    return SHAPES[shape][0] // 16


@gluon.jit
def _gather(kv_base, ids_ptr, values_dst, rope_dst, NUM_KEYS: gl.constexpr, VALUE_DIM: gl.constexpr,
            ROPE_DIM: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copies of the latent rows (value and rope columns) that a block's slot ids select."""
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    _gather_columns(kv_base, ids_ptr, values_dst, 0, VALUE_DIM, width, NUM_KEYS, num_warps)
    _gather_columns(kv_base, ids_ptr, rope_dst, VALUE_DIM, ROPE_DIM, width, NUM_KEYS, num_warps)


@gluon.jit
def _load_operand(q_ptr, FIRST: gl.constexpr, COLUMNS: gl.constexpr, WIDTH: gl.constexpr, ROWS: gl.constexpr,
                  layout: gl.constexpr):
    """Columns [FIRST, FIRST + COLUMNS) of ROWS rows of q at q_ptr, loaded straight into `layout` (a wgmma A
    operand): once per program, so the loads' poor coalescing costs little beside the gathers."""
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    columns = FIRST + gl.arange(0, COLUMNS, layout=gl.SliceLayout(0, layout))
    return gl.load(q_ptr + rows[:, None] * WIDTH + columns[None, :])


@gluon.jit
def _distribution_kernel(q_ptr, kv_ptr, idx_ptr, lse_ptr, out_ptr, NUM_Q: gl.constexpr, HEADS: gl.constexpr,
                         NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr, VALUE_DIM: gl.constexpr,
                         ROPE_DIM: gl.constexpr, SCALE_LOG2: gl.constexpr, BLOCK_N: gl.constexpr,
                         num_warps: gl.constexpr):
    # q [B, T, H, R+P], kv [B, S, R+P], idx [B, T, K], lse f32[B, T, H] (natural log; padded heads +inf),
    # out f32[B, T, H / BLOCK_H, K]. Grid: axis 0 = token x head block (head blocks fastest: the programs of one
    # token gather the same rows and share them in L2), axis 1 = batch.
    BLOCK_H: gl.constexpr = 16 * num_warps  # each warpgroup 64 heads
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    head_blocks: gl.constexpr = HEADS // BLOCK_H
    num_blocks: gl.constexpr = SLOTS // BLOCK_N
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    batch = gl.program_id(1)
    token = batch * NUM_Q + gl.program_id(0) // head_blocks
    head_block = gl.program_id(0) % head_blocks

    logits_layout: gl.constexpr = wgmma_layout(BLOCK_N, num_warps)
    q_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=logits_layout, k_width=2)
    kv_values = operand_buffer(dtype, [2, BLOCK_N, VALUE_DIM])
    kv_rope = operand_buffer(dtype, [2, BLOCK_N, ROPE_DIM])
    kv_base = kv_ptr + batch.to(gl.int64) * NUM_KEYS * width
    ids_base = idx_ptr + token.to(gl.int64) * SLOTS
    _gather(kv_base, ids_base, kv_values.index(0), kv_rope.index(0), NUM_KEYS, VALUE_DIM, ROPE_DIM, num_warps)
    async_copy.commit_group()
    q_base = q_ptr + (token * HEADS + head_block * BLOCK_H).to(gl.int64) * width
    q_values = _load_operand(q_base, 0, VALUE_DIM, width, BLOCK_H, q_operand)
    q_rope = _load_operand(q_base, VALUE_DIM, ROPE_DIM, width, BLOCK_H, q_operand)

    heads = head_block * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, logits_layout))
    lse_log2 = gl.load(lse_ptr + token * HEADS + heads) * 1.4426950408889634
    slot_columns = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, logits_layout))
    out_base = out_ptr + (token * head_blocks + head_block).to(gl.int64) * SLOTS
    next_ids = gl.load(ids_base + slot_columns)
    for j in range(num_blocks):
        buf = j % 2
        wait_for_copies(0)  # block j has landed, and every warp is done with block j - 1's buffer
        if j + 1 < num_blocks:  # gather the next block into the other buffer while this one is used
            _gather(kv_base, ids_base + (j + 1) * BLOCK_N, kv_values.index(1 - buf), kv_rope.index(1 - buf),
                    NUM_KEYS, VALUE_DIM, ROPE_DIM, num_warps)
            async_copy.commit_group()
        logits = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(q_rope, kv_rope.index(buf).permute((1, 0)), logits, use_acc=False, is_async=True)
        logits = warpgroup_mma(q_values, kv_values.index(buf).permute((1, 0)), logits, is_async=True)
        # the next block's ids load under the dots (a load waited for right away stalled every block); the last
        # step reloads its own block, unused, rather than read past the row
        ids = next_ids
        next_ids = gl.load(ids_base + gl.minimum(j + 1, num_blocks - 1) * BLOCK_N + slot_columns)
        logits = warpgroup_mma_wait(0, deps=[logits])
        # -1 slots weigh 0; so do padded heads (lse = +inf); a token with no valid slot (lse = -inf) has only -1s
        probs = gl.where((ids >= 0)[None, :], gl.exp2(logits * SCALE_LOG2 - lse_log2[:, None]), 0.0)
        gl.store(out_base + j * BLOCK_N + slot_columns, gl.sum(probs, axis=0))


def kernel_constants(q_shape, num_keys: int, slots: int, value_dim: int, scale: float, shape: str) -> dict:
    """The kernel's compile-time constants for padded q [B, T, H, R+P] (also used by the CPU compile test)."""
    return dict(NUM_Q=q_shape[1], HEADS=q_shape[2], NUM_KEYS=num_keys, SLOTS=slots, VALUE_DIM=value_dim,
                ROPE_DIM=q_shape[3] - value_dim, SCALE_LOG2=float(scale) * math.log2(math.e),
                BLOCK_N=SHAPES[shape][1])


def distribution_gluon(q, kv, indices, lse, *, scale: float, value_dim: int, shape: str = "all_heads"):
    """q [B,T,H,R+P], kv [B,S,R+P], indices int32[B,T,K], lse f32[B,T,H] -> f32[B,T,H/BLOCK_H,K], each head
    block's sum of its heads' probabilities per slot.

    Inputs already padded (`sparse_distribution._gluon_unmapped` pads): H a multiple of the shape's heads (lse
    +inf for padded heads), K a multiple of its slots and at least two blocks (Triton 3.6 fails to lower the
    double-buffered loop with one), R and P powers of two >= 16 with R + P <= GLUON_MAX_WIDTH; q and kv bf16 or
    fp16."""
    batch, num_q, heads, _ = q.shape
    if shape not in SHAPES:
        raise ValueError(f"distribution_gluon: shape must be one of {sorted(SHAPES)}, got {shape!r}")
    block_h, block_n = SHAPES[shape]
    slots = indices.shape[-1]
    if heads % block_h or slots % block_n or slots < 2 * block_n or lse.shape != q.shape[:3]:
        raise ValueError(f"distribution_gluon: unpadded input: q {q.shape}, {slots} slots, lse {lse.shape}, "
                         f"shape {shape}")
    out_shape = jax.ShapeDtypeStruct((batch, num_q, heads // block_h, slots), jnp.float32)
    return gluon_call(q, kv, indices, lse, kernel=_distribution_kernel, out_shape=out_shape,
                      grid=(num_q * (heads // block_h), batch), num_warps=num_warps_for(shape),
                      **kernel_constants(q.shape, kv.shape[1], slots, value_dim, scale, shape))
