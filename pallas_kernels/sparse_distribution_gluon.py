"""The sparse stages' distillation target (`sparse_distribution`) on Hopper, in Gluon: the head-averaged attention
distribution over each query's slots, given the forward's log-sum-exp.

    partial[b,t,c,j] = sum over the heads h of head block c of exp(scale * q[b,t,h] . kv[b, idx[b,t,j]] - lse[b,t,h])

One program per (token, head block): q [BLOCK_H, R+P] in shared memory, the gathered latent rows of each slot block
in a double-buffered [BLOCK_N, R+P] buffer (cp.async, as `sparse_attention_gluon` gathers them: -1 slots copy
nothing, their rows are zero-filled and masked), the logits [BLOCK_H, BLOCK_N] on wgmma, then exp2 and the sum over
the heads on the CUDA cores, BLOCK_N partial sums stored per block. Two shapes, one program plan:
  - "all_heads" (the default; 128 heads x 32 slots): each warpgroup takes 64 of the heads (m64n32); one program
    per token of 128 heads gathers each row once, at twice the steps;
  - "split_slots" (64 heads x 64 slots): each warpgroup takes 32 of the slot columns (m64n32, as the forward's
    split_slots schedule); two programs per token of 128 heads each gather every row.
On an H100 at K = 2048, 128 heads: all_heads 4.26 / 32.6 ms at T = 4096 / 32768, split_slots 4.45 / 34.5
(docs/BENCHMARKS.md, session 28). Shared memory: q and the two buffers, 221 KB at the DeepSeek-V3.2 widths in
either shape, so one program per SM: ncu finds it latency-bound (CTA barriers, loads), not bandwidth-bound.
The gather and the q load are the forward's (`_gather_columns`, `_load_q`).

Gluon has no interpreter: CPU tests compile the kernel for sm_90 (it fits, does not spill, issues its dots at the
expected shapes); the numbers are checked on the GPU against the float32 reference.
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
from pallas_kernels.sparse_attention_gluon import _gather_columns, _load_q
from pallas_kernels.sparse_distribution import GLUON_SHAPES as SHAPES  # (heads, slots) per program and step

NUM_WARPS = 8  # two warpgroups


@gluon.jit
def _gather(kv_base, ids_ptr, values_dst, rope_dst, NUM_KEYS: gl.constexpr, VALUE_DIM: gl.constexpr,
            ROPE_DIM: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copies of the latent rows (value and rope columns) that a block's slot ids select."""
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    _gather_columns(kv_base, ids_ptr, values_dst, 0, VALUE_DIM, width, NUM_KEYS, num_warps)
    _gather_columns(kv_base, ids_ptr, rope_dst, VALUE_DIM, ROPE_DIM, width, NUM_KEYS, num_warps)


@gluon.jit
def _distribution_kernel(q_ptr, kv_ptr, idx_ptr, lse_ptr, out_ptr, NUM_Q: gl.constexpr, HEADS: gl.constexpr,
                         NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr, VALUE_DIM: gl.constexpr,
                         ROPE_DIM: gl.constexpr, SCALE_LOG2: gl.constexpr, BLOCK_H: gl.constexpr,
                         BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    # q [B, T, H, R+P], kv [B, S, R+P], idx [B, T, K], lse f32[B, T, H] (natural log; padded heads +inf),
    # out f32[B, T, H / BLOCK_H, K]. Grid: axis 0 = token x head block (head blocks fastest: the programs of one
    # token gather the same rows and share them in L2), axis 1 = batch.
    width: gl.constexpr = VALUE_DIM + ROPE_DIM
    head_blocks: gl.constexpr = HEADS // BLOCK_H
    num_blocks: gl.constexpr = SLOTS // BLOCK_N
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    batch = gl.program_id(1)
    token = batch * NUM_Q + gl.program_id(0) // head_blocks
    head_block = gl.program_id(0) % head_blocks

    # 64 heads: the warpgroups split the slot columns; 128 heads: they split the heads (64 rows each)
    warps: gl.constexpr = [4, 2] if BLOCK_H == 64 else [8, 1]
    columns_per_warpgroup: gl.constexpr = BLOCK_N // 2 if BLOCK_H == 64 else BLOCK_N
    logits_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps,
                                                            instr_shape=[16, columns_per_warpgroup, 16])
    q_values = gl.allocate_shared_memory(dtype, [BLOCK_H, VALUE_DIM],
                                         gl.NVMMASharedLayout.get_default_for([BLOCK_H, VALUE_DIM], dtype))
    q_rope = gl.allocate_shared_memory(dtype, [BLOCK_H, ROPE_DIM],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_H, ROPE_DIM], dtype))
    kv_values = gl.allocate_shared_memory(dtype, [2, BLOCK_N, VALUE_DIM],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_N, VALUE_DIM], dtype))
    kv_rope = gl.allocate_shared_memory(dtype, [2, BLOCK_N, ROPE_DIM],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, ROPE_DIM], dtype))

    _load_q(q_ptr + (token * HEADS + head_block * BLOCK_H).to(gl.int64) * width, q_values, q_rope, VALUE_DIM,
            ROPE_DIM, num_warps)
    kv_base = kv_ptr + batch.to(gl.int64) * NUM_KEYS * width
    ids_base = idx_ptr + token.to(gl.int64) * SLOTS
    _gather(kv_base, ids_base, kv_values.index(0), kv_rope.index(0), NUM_KEYS, VALUE_DIM, ROPE_DIM, num_warps)
    async_copy.commit_group()

    heads = head_block * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, logits_layout))
    lse_log2 = gl.load(lse_ptr + token * HEADS + heads) * 1.4426950408889634
    slot_columns = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, logits_layout))
    out_base = out_ptr + (token * head_blocks + head_block).to(gl.int64) * SLOTS
    for j in range(num_blocks):
        buf = j % 2
        async_copy.wait_group(0)
        gl.thread_barrier()  # block j has landed, and every warp is done with block j - 1's buffer
        fence_async_shared()  # the landed rows are visible to wgmma, which reads through the async proxy
        if j + 1 < num_blocks:  # gather the next block into the other buffer while this one is used
            _gather(kv_base, ids_base + (j + 1) * BLOCK_N, kv_values.index(1 - buf), kv_rope.index(1 - buf),
                    NUM_KEYS, VALUE_DIM, ROPE_DIM, num_warps)
            async_copy.commit_group()
        logits = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(q_rope, kv_rope.index(buf).permute((1, 0)), logits, use_acc=False)
        logits = warpgroup_mma(q_values, kv_values.index(buf).permute((1, 0)), logits)
        ids = gl.load(ids_base + j * BLOCK_N + slot_columns)
        # -1 slots weigh 0; so do padded heads (lse = +inf); a token with no valid slot (lse = -inf) has only -1s
        probs = gl.where((ids >= 0)[None, :], gl.exp2(logits * SCALE_LOG2 - lse_log2[:, None]), 0.0)
        gl.store(out_base + j * BLOCK_N + slot_columns, gl.sum(probs, axis=0))


def kernel_constants(q_shape, num_keys: int, slots: int, value_dim: int, scale: float, shape: str) -> dict:
    """The kernel's compile-time constants for padded q [B, T, H, R+P] (also used by the CPU compile test)."""
    block_h, block_n = SHAPES[shape]
    return dict(NUM_Q=q_shape[1], HEADS=q_shape[2], NUM_KEYS=num_keys, SLOTS=slots, VALUE_DIM=value_dim,
                ROPE_DIM=q_shape[3] - value_dim, SCALE_LOG2=float(scale) * math.log2(math.e), BLOCK_H=block_h,
                BLOCK_N=block_n)


def distribution_gluon(q, kv, indices, lse, *, scale: float, value_dim: int, shape: str = "all_heads"):
    """q [B,T,H,R+P], kv [B,S,R+P], indices int32[B,T,K], lse f32[B,T,H] -> f32[B,T,H/BLOCK_H,K], each head
    block's sum of its heads' probabilities per slot.

    Inputs already padded (`sparse_distribution._gluon_unmapped` pads): H a multiple of the shape's heads (lse
    +inf for padded heads), K a multiple of its slots and at least two blocks (Triton 3.6 fails to lower the
    double-buffered loop with one), R and P powers of two >= 16; q and kv bf16 or fp16."""
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
                      grid=(num_q * (heads // block_h), batch), num_warps=NUM_WARPS,
                      **kernel_constants(q.shape, kv.shape[1], slots, value_dim, scale, shape))
