"""The dense MLA attention's backward on Hopper, in Gluon: the same two kernels as `dense_attention._backward`
(flash-attention's backward, probabilities recomputed from the saved lse), each one explicit schedule of wgmma.

For one head (shapes as in `dense_attention_reference`; lse2 = lse * log2(e), +inf for a query that sees
nothing; delta[t] = sum_v dO[t, v] out[t, v] - d_lse[t]):

    S[t, s]  = q_nope[t] . k_nope[s] + q_rope[t] . k_rope[s]     P[t, s] = exp2(S[t, s] * scale * log2(e) - lse2[t])
    dP[t, s] = dO[t] . v[s]                                       dS[t, s] = scale * P[t, s] * (dP[t, s] - delta[t])
    d_q = dS . k (nope and rope columns)     d_v = P^T . dO     d_k_nope = dS^T . q_nope     d_k_rope += dS^T . q_rope

**d_q** (`_query_grads_kernel`): one program per (head, 128 queries) on two warpgroups, as the Gluon forward
(`dense_attention_gluon`): q and dO stay in shared memory, the key block's k_nope, k_rope and values stream through
a cp.async ring, S and dP are wgmma chains into fp32 accumulators (each warpgroup 64 queries), and dS stays in
registers as the A operand of the two d_q dots (m64n(N), m64n(P)). 64 keys per step: S, dP and the two d_q
accumulators then take ~160 fp32 registers a thread. The dots are asynchronous, three waits a step
(`_query_block_step`).

**d_k, d_v** (`_key_grads_kernel`): one program per (block of 128 keys, group of heads) on two warpgroups, the keys
on the wgmma rows (64 per warpgroup) so that P^T and dS^T come out of the S^T and dP^T dots in the accumulator
layout, which is the register layout of a wgmma A operand: d_v = P^T . dO and d_k = dS^T . q read them without a
trip through shared memory. The key block's k_nope, k_rope and values sit in shared memory; the query blocks' q,
dO, lse2 and delta stream through a cp.async ring. The rope key is shared by the heads: its gradient sums over
heads, in registers over the group's heads, then one fp32 partial per group, which the wrapper sums (no atomics:
the sum's order is fixed). Query blocks that see none of the block's keys are skipped; those whose every real
query sees all of them skip the mask. A key block that no query sees (most of a long context's in its first query
chunks) loads nothing and stores its zeros in 16-byte vectors. Accumulators: d_v, d_k_nope and d_k_rope,
64 x (V + N + P) per warpgroup, ~160 fp32 registers a thread at 128 + 128 + 64, which bounds the query block to
BLOCK_Q queries per step. dP^T runs under the exp2s of P^T and d_v under dS^T's arithmetic (`_key_block_step`),
with a three-block ring.

On an H100 at DeepSeek-V3.2's shapes (128 heads, 128 + 64 -> 128, bf16, last chunk of 1024 queries), the two
kernels took 20.1-20.4 ms at 32K keys and 83.6-84.2 ms at 128K (468-485 TFLOP/s) with synchronous dots, the Pallas
backward 31.8-31.9 and 126.9-127.2 (305-311): 1.51-1.57x; a `dense` stage training step at 32K went 2720.7 ->
2280.9 ms (docs/BENCHMARKS.md, session 44). Measured beside it: 64 queries per step in the key kernel (216 bytes of
spills) 0.4-1.4% faster; a second, unmasked body for the query blocks seen whole (64 bytes of spills at 32 queries)
15% slower. Both kernels' asynchronous schedules with the key kernel's three-block ring: 20.56 -> 20.30 ms at 32K,
84.0 -> 83.4 and 84.9 -> 83.5 at 128K (session 48, one lease); the same schedules with two blocks were 2-4% slower
than synchronous dots, three blocks with synchronous dots no faster.

Gluon has no interpreter: the CPU tests compile both kernels for sm_90 (wgmma shapes, no spills in the loops, shared
memory, the key kernel's exp2s under dP^T in the SASS) and run the wrapper around stand-in launches; the Pallas
kernels, which compute the same arithmetic, run in interpret mode against the reference; these kernels' gradients
are checked against the reference and the Pallas backward on the GPU (`tests/test_dense_attention.py`).
Shapes: B batch, T queries (T_p padded), S keys (S_p), H heads, N nope width, P rope width, V value width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from pallas_kernels._gluon import gluon_call, vmap_by_folding_into_batch
from pallas_kernels._gluon_hopper import operand_buffer, store_rows, wait_for_copies, wgmma_layout
from pallas_kernels._pallas import pad_axis, round_up
from pallas_kernels.dense_attention_gluon import (BLOCK_Q, MAX_WIDTH, _advance_key_ring, _copy_rows, _rows_layout,
                                                  _start_key_ring, _visible_keys, _walk_bounds, padded_widths)
from pallas_kernels.sparse_attention import GLUON_SMEM_BYTES

NUM_WARPS = 8  # two warpgroups
# d_q: keys per step and ring depth (S, dP and the d_q accumulators in registers bound the key block to 64); 2 where
# 3 blocks in flight do not fit shared memory (widths 128 + 128 -> 128)
Q_BLOCK_K = 64
Q_STAGES = 3
# d_k, d_v: keys per program (two warpgroups of 64), queries per step and ring depth
K_BLOCK_K = gl.constexpr(128)
K_BLOCK_Q = 32  # 64 spills (216 bytes); every query block takes the masked body (a second body spilled)
# Three blocks: with the dots overlapped, a step is too short for the block copied during it to land by the next
# (two blocks measured 2-4% slower than synchronous dots on an H100, three 0.7-1.7% faster; session 48)
K_STAGES = 3
# d_v, d_k_nope, d_k_rope: (N + P + V) / 2 fp32 registers a thread; at 128 + 64 -> 128 (160) the kernel compiles to
# 255 registers with 112 bytes spilled outside its loops (address offsets of the last store), none inside them; at
# 128 + 128 -> 128 (192) it spills
MAX_ACCUMULATED = 320
TARGET_PROGRAMS = 4 * 132  # the key kernel splits the heads into groups until its grid has ~4 waves of an H100
# ... but into at most this many where some key blocks go unseen (`head_group`)
MAX_KEY_GROUPS = 16
_LOG2_E = 1.4426950408889634


# ---- d_q -----------------------------------------------------------------------------------------------------------


@gluon.jit
def _query_block_step(q_nope, q_rope, d_out, kn, kr, v, d_nope, d_rope, block, positions, lse2, delta,
                      MASKED: gl.constexpr, NUM_KEYS: gl.constexpr, SCALE: gl.constexpr, BLOCK_K: gl.constexpr,
                      s_layout: gl.constexpr, nope_operand: gl.constexpr, rope_operand: gl.constexpr):
    """One key block of d_q: S and dP, dS in registers, d_q += dS . k. Three waits: the logits' two chains (nope,
    rope) run back to back, dP's dot is issued after them and ptxas interleaves its instructions with the exp2s (which
    do not need it), and the two d_q dots share one wait (five waits with synchronous dots). Timed on an H100 only
    together with the key kernel's schedule; S and dP issued together with a wait for S alone (ptxas then waited for
    dP after 9 of the 32 exp2s) timed within 0.5% of this (session 48)."""
    scale_log2: gl.constexpr = SCALE * 1.4426950408889634
    logits = warpgroup_mma(q_nope, kn.permute((1, 0)), gl.zeros([BLOCK_Q, BLOCK_K], gl.float32, layout=s_layout),
                           use_acc=False, is_async=True)
    logits = warpgroup_mma(q_rope, kr.permute((1, 0)), logits, is_async=True)
    logits = warpgroup_mma_wait(0, deps=[logits])
    d_probs = warpgroup_mma(d_out, v.permute((1, 0)), gl.zeros([BLOCK_Q, BLOCK_K], gl.float32, layout=s_layout),
                            use_acc=False, is_async=True)
    probs = gl.exp2(logits * scale_log2 - lse2[:, None])
    if MASKED:
        probs = gl.where(_visible_keys(block, positions, NUM_KEYS, BLOCK_K, s_layout), probs, 0.0)
    # probs passes through the wait only as the timed kernel had it (without it the PTX differs; not timed)
    d_probs, probs = warpgroup_mma_wait(0, deps=[d_probs, probs])
    d_logits = (probs * (d_probs - delta[:, None]) * SCALE).to(kn.dtype)
    ds_nope = gl.convert_layout(d_logits, nope_operand)
    ds_rope = gl.convert_layout(d_logits, rope_operand)
    d_nope = warpgroup_mma(ds_nope, kn, d_nope, is_async=True)
    d_rope = warpgroup_mma(ds_rope, kr, d_rope, is_async=True)
    d_nope, d_rope, ds_nope, ds_rope = warpgroup_mma_wait(0, deps=[d_nope, d_rope, ds_nope, ds_rope])
    return d_nope, d_rope


@gluon.jit
def _query_step(q_nope, q_rope, d_out, kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base, d_nope, d_rope, block,
                walk, positions, lse2, delta, MASKED: gl.constexpr, NUM_KEYS: gl.constexpr, HEADS: gl.constexpr,
                NOPE: gl.constexpr, ROPE: gl.constexpr, VALUE: gl.constexpr, SCALE: gl.constexpr,
                STAGES: gl.constexpr, BLOCK_K: gl.constexpr, s_layout: gl.constexpr, nope_operand: gl.constexpr,
                rope_operand: gl.constexpr, num_warps: gl.constexpr):
    """Key block `block`: wait for it, start the copy of block + STAGES - 1, and take its share of d_q."""
    slot = _advance_key_ring(kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base, block, walk, HEADS, NOPE, ROPE,
                             VALUE, STAGES, BLOCK_K, num_warps)
    return _query_block_step(q_nope, q_rope, d_out, kn_ring.index(slot), kr_ring.index(slot), v_ring.index(slot),
                             d_nope, d_rope, block, positions, lse2, delta, MASKED, NUM_KEYS, SCALE, BLOCK_K,
                             s_layout, nope_operand, rope_operand)


@gluon.jit
def _query_grads_kernel(qn_ptr, qr_ptr, kn_ptr, kr_ptr, v_ptr, pos_ptr, do_ptr, lse_ptr, delta_ptr, dqn_ptr,
                        dqr_ptr, NUM_Q: gl.constexpr, NUM_KEYS: gl.constexpr, KEYS_P: gl.constexpr,
                        HEADS: gl.constexpr, NOPE: gl.constexpr, ROPE: gl.constexpr, VALUE: gl.constexpr,
                        SCALE: gl.constexpr, STAGES: gl.constexpr, BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
    # qn [B, T_p, H, N], qr [B, T_p, H, P], kn [B, S_p, H, N], kr [B, S_p, P], v [B, S_p, H, V], pos i32[B, T_p]
    # (-1: padding), do [B, T_p, H, V], lse f32[B, H, T_p] (base 2, +inf where a query sees nothing), delta
    # f32[B, H, T_p] -> dqn [B, T_p, H, N], dqr [B, T_p, H, P]. Grid (T_p / BLOCK_Q, H, B), latest queries first.
    dtype: gl.constexpr = qn_ptr.dtype.element_ty
    query_block = NUM_Q // BLOCK_Q - 1 - gl.program_id(0)
    head = gl.program_id(1)
    batch = gl.program_id(2)
    first_query = batch * NUM_Q + query_block * BLOCK_Q  # row in [B * T_p]

    s_layout: gl.constexpr = wgmma_layout(BLOCK_K, num_warps)
    nope_layout: gl.constexpr = wgmma_layout(NOPE, num_warps)
    rope_layout: gl.constexpr = wgmma_layout(ROPE, num_warps)
    nope_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=nope_layout, k_width=2)
    rope_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=rope_layout, k_width=2)

    q_nope = operand_buffer(dtype, [BLOCK_Q, NOPE])
    q_rope = operand_buffer(dtype, [BLOCK_Q, ROPE])
    d_out = operand_buffer(dtype, [BLOCK_Q, VALUE])
    kn_ring = operand_buffer(dtype, [STAGES, BLOCK_K, NOPE])
    kr_ring = operand_buffer(dtype, [STAGES, BLOCK_K, ROPE])
    v_ring = operand_buffer(dtype, [STAGES, BLOCK_K, VALUE])

    q_row = first_query.to(gl.int64) * HEADS + head
    _copy_rows(qn_ptr + q_row * NOPE, HEADS * NOPE, q_nope, BLOCK_Q, NOPE, num_warps)
    _copy_rows(qr_ptr + q_row * ROPE, HEADS * ROPE, q_rope, BLOCK_Q, ROPE, num_warps)
    _copy_rows(do_ptr + q_row * VALUE, HEADS * VALUE, d_out, BLOCK_Q, VALUE, num_warps)
    async_copy.commit_group()

    all_positions, walk, whole = _walk_bounds(pos_ptr, first_query, NUM_KEYS, BLOCK_K, num_warps)
    kn_base, kr_base, v_base = _start_key_ring(kn_ptr, kr_ptr, v_ptr, batch, head, walk, kn_ring, kr_ring, v_ring,
                                               KEYS_P, HEADS, NOPE, ROPE, VALUE, STAGES, BLOCK_K, num_warps)

    rows = gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(1, s_layout))
    row_of_head = (batch * HEADS + head) * NUM_Q + query_block * BLOCK_Q + rows
    lse2 = gl.load(lse_ptr + row_of_head)
    delta = gl.load(delta_ptr + row_of_head)
    positions = gl.convert_layout(all_positions, gl.SliceLayout(1, s_layout))
    d_nope = gl.zeros([BLOCK_Q, NOPE], gl.float32, layout=nope_layout)
    d_rope = gl.zeros([BLOCK_Q, ROPE], gl.float32, layout=rope_layout)
    for block in range(0, whole):
        d_nope, d_rope = _query_step(q_nope, q_rope, d_out, kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base,
                                     d_nope, d_rope, block, walk, positions, lse2, delta, False, NUM_KEYS, HEADS,
                                     NOPE, ROPE, VALUE, SCALE, STAGES, BLOCK_K, s_layout, nope_operand,
                                     rope_operand, num_warps)
    for block in range(whole, walk):
        d_nope, d_rope = _query_step(q_nope, q_rope, d_out, kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base,
                                     d_nope, d_rope, block, walk, positions, lse2, delta, True, NUM_KEYS, HEADS,
                                     NOPE, ROPE, VALUE, SCALE, STAGES, BLOCK_K, s_layout, nope_operand,
                                     rope_operand, num_warps)
    async_copy.wait_group(0)
    # a padded query (lse2 +inf) took p = 0 in every block, so its rows are zeros already
    store_rows(dqn_ptr + head * NOPE, first_query, HEADS * NOPE, d_nope)
    store_rows(dqr_ptr + head * ROPE, first_query, HEADS * ROPE, d_rope)


# ---- d_k, d_v ------------------------------------------------------------------------------------------------------


@gluon.jit
def _copy_query_block(qn_base, qr_base, do_base, block, qn_dst, qr_dst, do_dst, HEADS: gl.constexpr,
                      NOPE: gl.constexpr, ROPE: gl.constexpr, VALUE: gl.constexpr, BLOCK_Q: gl.constexpr,
                      num_warps: gl.constexpr):
    """Start the copies of query block `block` of one head (q_nope, q_rope, dO rows, H x width apart) and commit
    them as one group."""
    first = block.to(gl.int64) * BLOCK_Q * HEADS
    _copy_rows(qn_base + first * NOPE, HEADS * NOPE, qn_dst, BLOCK_Q, NOPE, num_warps)
    _copy_rows(qr_base + first * ROPE, HEADS * ROPE, qr_dst, BLOCK_Q, ROPE, num_warps)
    _copy_rows(do_base + first * VALUE, HEADS * VALUE, do_dst, BLOCK_Q, VALUE, num_warps)
    async_copy.commit_group()


@gluon.jit
def _key_block_step(k_nope, k_rope, values, qn, qr, d_out, d_values, d_nope, d_rope, lse2, delta, positions,
                    first_key, MASKED: gl.constexpr, NUM_KEYS: gl.constexpr, SCALE: gl.constexpr,
                    st_layout: gl.constexpr, value_operand: gl.constexpr, nope_operand: gl.constexpr,
                    rope_operand: gl.constexpr):
    """One query block's share of d_v, d_k_nope and d_k_rope, keys on the rows: S^T, dP^T, then P^T and dS^T as
    register A operands. S^T and dP^T are issued together and the wait is for S^T alone, so the exp2s (16 a thread)
    run while dP^T is on the tensor cores; d_v is issued as soon as P^T is rounded and runs under dS^T's arithmetic;
    d_k_nope and d_k_rope share the step's last wait (three waits a step, six with synchronous dots). The register
    operands are kept to that wait (`deps`): the dots read them until then."""
    scale_log2: gl.constexpr = SCALE * 1.4426950408889634
    block_q: gl.constexpr = qn.shape[0]
    logits = warpgroup_mma(k_nope, qn.permute((1, 0)),
                           gl.zeros([K_BLOCK_K, block_q], gl.float32, layout=st_layout), use_acc=False,
                           is_async=True)
    logits = warpgroup_mma(k_rope, qr.permute((1, 0)), logits, is_async=True)
    d_probs = warpgroup_mma(values, d_out.permute((1, 0)),
                            gl.zeros([K_BLOCK_K, block_q], gl.float32, layout=st_layout), use_acc=False,
                            is_async=True)
    logits = warpgroup_mma_wait(1, deps=[logits])
    probs = gl.exp2(logits * scale_log2 - lse2[None, :])
    if MASKED:
        ids = first_key + gl.arange(0, K_BLOCK_K, layout=gl.SliceLayout(1, st_layout))
        visible = (ids[:, None] <= positions[None, :]) & (ids < NUM_KEYS)[:, None]
        probs = gl.where(visible, probs, 0.0)
    p_operand = gl.convert_layout(probs.to(qn.dtype), value_operand)
    d_values = warpgroup_mma(p_operand, d_out, d_values, is_async=True)
    d_probs = warpgroup_mma_wait(1, deps=[d_probs])
    d_logits = (probs * (d_probs - delta[None, :]) * SCALE).to(qn.dtype)
    ds_nope = gl.convert_layout(d_logits, nope_operand)
    ds_rope = gl.convert_layout(d_logits, rope_operand)
    d_nope = warpgroup_mma(ds_nope, qn, d_nope, is_async=True)
    d_rope = warpgroup_mma(ds_rope, qr, d_rope, is_async=True)
    d_values, d_nope, d_rope, p_operand, ds_nope, ds_rope = warpgroup_mma_wait(
        0, deps=[d_values, d_nope, d_rope, p_operand, ds_nope, ds_rope])
    return d_values, d_nope, d_rope


@gluon.jit
def _key_grads_kernel(qn_ptr, qr_ptr, kn_ptr, kr_ptr, v_ptr, pos_ptr, do_ptr, lse_ptr, delta_ptr, start_ptr,
                      dkn_ptr, dv_ptr, dkr_ptr, NUM_Q: gl.constexpr, NUM_KEYS: gl.constexpr, KEYS_P: gl.constexpr,
                      HEADS: gl.constexpr, GROUP: gl.constexpr, NOPE: gl.constexpr, ROPE: gl.constexpr,
                      VALUE: gl.constexpr, SCALE: gl.constexpr, STAGES: gl.constexpr, BLOCK_Q: gl.constexpr,
                      num_warps: gl.constexpr):
    # Inputs as `_query_grads_kernel`'s (T_p a multiple of BLOCK_Q, S_p of K_BLOCK_K), start i32[B, S_p /
    # K_BLOCK_K]: the first query block that sees some key of the block (NUM_Q / BLOCK_Q when none does) ->
    # dkn [B, S_p, H, N], dv [B, S_p, H, V] (input dtype), dkr f32[B, G, S_p, P]: group g's heads' sum, G =
    # ceil(H / GROUP). Grid (S_p / K_BLOCK_K, G, B), the earliest keys (seen by the most queries) first.
    dtype: gl.constexpr = qn_ptr.dtype.element_ty
    key_block = gl.program_id(0)
    group = gl.program_id(1)
    batch = gl.program_id(2)
    first_key = key_block * K_BLOCK_K
    num_blocks: gl.constexpr = NUM_Q // BLOCK_Q

    st_layout: gl.constexpr = wgmma_layout(BLOCK_Q, num_warps)
    value_layout: gl.constexpr = wgmma_layout(VALUE, num_warps)
    nope_layout: gl.constexpr = wgmma_layout(NOPE, num_warps)
    rope_layout: gl.constexpr = wgmma_layout(ROPE, num_warps)
    value_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=value_layout, k_width=2)
    nope_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=nope_layout, k_width=2)
    rope_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=rope_layout, k_width=2)
    query_columns: gl.constexpr = gl.SliceLayout(0, st_layout)

    k_nope = operand_buffer(dtype, [K_BLOCK_K, NOPE])
    k_rope = operand_buffer(dtype, [K_BLOCK_K, ROPE])
    values = operand_buffer(dtype, [K_BLOCK_K, VALUE])
    qn_ring = operand_buffer(dtype, [STAGES, BLOCK_Q, NOPE])
    qr_ring = operand_buffer(dtype, [STAGES, BLOCK_Q, ROPE])
    do_ring = operand_buffer(dtype, [STAGES, BLOCK_Q, VALUE])

    start = gl.load(start_ptr + batch * (KEYS_P // K_BLOCK_K) + key_block)
    walk = num_blocks - start
    key_row = batch.to(gl.int64) * KEYS_P + first_key  # row in [B * S_p]
    first_head = group * GROUP
    last_head = gl.minimum(first_head + GROUP, HEADS)
    groups = (HEADS + GROUP - 1) // GROUP
    rope_row = (batch * groups + group).to(gl.int64) * KEYS_P + first_key
    if walk > 0:
        _copy_rows(kr_ptr + key_row * ROPE, ROPE, k_rope, K_BLOCK_K, ROPE, num_warps)  # shared by the heads
        d_rope = gl.zeros([K_BLOCK_K, ROPE], gl.float32, layout=rope_layout)
        for head in range(first_head, last_head):
            q_row = batch.to(gl.int64) * NUM_Q * HEADS + head  # (batch, query 0, head) in [B * T_p * H]
            qn_base, qr_base, do_base = qn_ptr + q_row * NOPE, qr_ptr + q_row * ROPE, do_ptr + q_row * VALUE
            # this head's keys, then the first query blocks; every warp is done with the previous head's
            gl.thread_barrier()
            _copy_rows(kn_ptr + (key_row * HEADS + head) * NOPE, HEADS * NOPE, k_nope, K_BLOCK_K, NOPE, num_warps)
            _copy_rows(v_ptr + (key_row * HEADS + head) * VALUE, HEADS * VALUE, values, K_BLOCK_K, VALUE, num_warps)
            async_copy.commit_group()
            for stage in gl.static_range(STAGES - 1):
                _copy_query_block(qn_base, qr_base, do_base,  # past the walk: its last block again
                                  start + gl.minimum(stage, walk - 1), qn_ring.index(stage), qr_ring.index(stage),
                                  do_ring.index(stage), HEADS, NOPE, ROPE, VALUE, BLOCK_Q, num_warps)
            row_of_head = (batch * HEADS + head) * NUM_Q
            d_values = gl.zeros([K_BLOCK_K, VALUE], gl.float32, layout=value_layout)
            d_nope = gl.zeros([K_BLOCK_K, NOPE], gl.float32, layout=nope_layout)
            for step in range(0, walk):
                block = start + step
                queries = block * BLOCK_Q + gl.arange(0, BLOCK_Q, layout=query_columns)
                positions = gl.load(pos_ptr + batch * NUM_Q + queries)
                lse2 = gl.load(lse_ptr + row_of_head + queries)
                delta = gl.load(delta_ptr + row_of_head + queries)
                slot = step % STAGES
                wait_for_copies(STAGES - 2)  # this block (and the head's keys); every warp is past the last dots
                ahead = step + STAGES - 1
                _copy_query_block(qn_base, qr_base, do_base, start + gl.minimum(ahead, walk - 1),
                                  qn_ring.index(ahead % STAGES), qr_ring.index(ahead % STAGES),
                                  do_ring.index(ahead % STAGES), HEADS, NOPE, ROPE, VALUE, BLOCK_Q, num_warps)
                if gl.max(positions, axis=0) >= first_key:  # some query sees some key of the block
                    d_values, d_nope, d_rope = _key_block_step(
                        k_nope, k_rope, values, qn_ring.index(slot), qr_ring.index(slot), do_ring.index(slot),
                        d_values, d_nope, d_rope, lse2, delta, positions, first_key, True, NUM_KEYS, SCALE,
                        st_layout, value_operand, nope_operand, rope_operand)
            async_copy.wait_group(0)
            store_rows(dkn_ptr + head * NOPE, key_row, HEADS * NOPE, d_nope)
            store_rows(dv_ptr + head * VALUE, key_row, HEADS * VALUE, d_values)
        store_rows(dkr_ptr, rope_row, ROPE, d_rope)
    else:
        # A key block no query sees (most of them in a long context's first query chunks) loads nothing and stores
        # its zeros in whole 16-byte vectors along the rows: from the accumulators' wgmma layout each thread would
        # store 4 bytes at a time, half of every 32-byte sector a warp touches.
        zero_nope = gl.zeros([K_BLOCK_K, NOPE], dtype, layout=_rows_layout(NOPE, num_warps))
        zero_values = gl.zeros([K_BLOCK_K, VALUE], dtype, layout=_rows_layout(VALUE, num_warps))
        for head in range(first_head, last_head):
            store_rows(dkn_ptr + head * NOPE, key_row, HEADS * NOPE, zero_nope)
            store_rows(dv_ptr + head * VALUE, key_row, HEADS * VALUE, zero_values)
        store_rows(dkr_ptr, rope_row, ROPE, gl.zeros([K_BLOCK_K, ROPE], gl.float32,
                                                     layout=_rows_layout(ROPE, num_warps)))


# ---- the wrapper ---------------------------------------------------------------------------------------------------


def smem_bytes(nope_p: int, rope_p: int, value_p: int, itemsize: int = 2, query_stages: int = Q_STAGES) -> dict:
    """Shared memory of one program of each kernel (tiles and rings; Triton adds its layout-conversion scratch)."""
    widths = nope_p + rope_p + value_p
    return dict(query=itemsize * (BLOCK_Q.value * widths + query_stages * Q_BLOCK_K * widths),
                key=itemsize * (K_BLOCK_K.value * widths + K_STAGES * K_BLOCK_Q * widths))


def query_stages(nope_p: int, rope_p: int, value_p: int) -> int:
    """The d_q kernel's ring depth: Q_STAGES where it fits shared memory, else 2."""
    fits = smem_bytes(nope_p, rope_p, value_p)["query"] <= GLUON_SMEM_BYTES
    return Q_STAGES if fits else 2


def unsupported_reason(dtype, nope: int, rope: int, value: int):
    """None when these kernels take these inputs, else why not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"it takes bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    widths = padded_widths(nope, rope, value)
    if max(widths) > MAX_WIDTH:
        return (f"it takes widths up to {MAX_WIDTH} (padded to powers of two), got nope {nope}, rope {rope}, "
                f"value {value}")
    if sum(widths) > MAX_ACCUMULATED:
        return (f"its key kernel holds d_v, d_k_nope and d_k_rope in registers, widths up to {MAX_ACCUMULATED} in "
                f"all (padded), got {widths}")
    if max(smem_bytes(*widths, query_stages=2).values()) > GLUON_SMEM_BYTES:
        return f"its tiles for widths {widths} need more than {GLUON_SMEM_BYTES} bytes of shared memory"
    return None


def head_group(heads: int, seen_blocks: int, all_blocks: int) -> int:
    """Heads per program of the key kernel: all of them (one partial d_k_rope per key block) where the key blocks
    with work (seen_blocks of all_blocks, over the batch: those some query sees) alone fill ~TARGET_PROGRAMS
    programs, else fewer, so that short contexts and a long context's first query chunks still fill the GPU. Where
    some blocks go unseen, at most MAX_KEY_GROUPS groups: every group's partial covers all the keys, and the unseen
    blocks' parts are zeros written and summed for nothing."""
    groups = min(heads, max(1, -(-TARGET_PROGRAMS // seen_blocks)))
    if seen_blocks < all_blocks:
        groups = min(groups, MAX_KEY_GROUPS)
    return -(-heads // groups)


def kernel_constants(num_q: int, num_keys: int, heads: int, nope: int, rope: int, value: int, *, batch: int,
                     scale: float) -> dict:
    """Each kernel's compile-time constants and grid: {"query": (constants, grid), "key": (constants, grid)} (also
    used by the CPU compile test)."""
    nope_p, rope_p, value_p = padded_widths(nope, rope, value)
    num_q_p = round_up(num_q, max(BLOCK_Q.value, K_BLOCK_Q))
    keys_p = round_up(num_keys, max(Q_BLOCK_K, K_BLOCK_K.value))
    shared = dict(NUM_Q=num_q_p, NUM_KEYS=num_keys, KEYS_P=keys_p, HEADS=heads, NOPE=nope_p, ROPE=rope_p,
                  VALUE=value_p, SCALE=scale)
    key_blocks = keys_p // K_BLOCK_K.value
    # Causal queries at consecutive positions (a query chunk's) see at least as many keys as there are queries:
    # the first chunk of a long context has work in only that many key blocks, the rest store zeros and stop.
    seen_blocks = min(key_blocks, -(-num_q // K_BLOCK_K.value))
    group = head_group(heads, seen_blocks * batch, key_blocks * batch)
    return {"query": (dict(shared, STAGES=query_stages(nope_p, rope_p, value_p), BLOCK_K=Q_BLOCK_K),
                      (num_q_p // BLOCK_Q.value, heads, batch)),
            "key": (dict(shared, STAGES=K_STAGES, BLOCK_Q=K_BLOCK_Q, GROUP=group),
                    (key_blocks, -(-heads // group), batch))}


def first_query_blocks(positions, block_q: int, block_k: int, num_key_blocks: int):
    """i32[B, num_key_blocks]: per key block, the first query block with a query that sees one of its keys
    (query blocks hold block_q queries; T_p / block_q where none does). positions i32[B, T_p], -1 for padding."""
    batch, num_q = positions.shape
    last_seen = jnp.max(positions.reshape(batch, num_q // block_q, block_q), axis=2)  # [B, QB]
    first_keys = jnp.arange(num_key_blocks, dtype=jnp.int32) * block_k
    sees = last_seen[:, None, :] >= first_keys[None, :, None]  # [B, KB, QB]
    return jnp.where(jnp.any(sees, axis=2), jnp.argmax(sees, axis=2), num_q // block_q).astype(jnp.int32)


def dense_backward_gluon(q_nope, q_rope, k_nope, k_rope, values, q_positions, d_out, lse2, delta, *, scale: float):
    """(d_q_nope, d_q_rope, d_k_nope, d_k_rope, d_values), as `dense_attention._backward`'s kernels, from the
    inputs (of one dtype, `unsupported_reason` None), d_out [B,T,H,V], lse2 f32[B,H,T] (base 2, +inf where a
    query sees nothing) and delta f32[B,H,T]. Maps under vmap by folding into the batch."""
    (_, num_q, heads, nope), num_keys = q_nope.shape, k_nope.shape[1]
    rope, value = q_rope.shape[-1], values.shape[-1]

    def unmapped(q_nope, q_rope, k_nope, k_rope, values, q_positions, d_out, lse2, delta):
        batch = q_nope.shape[0]
        plan = kernel_constants(num_q, num_keys, heads, nope, rope, value, batch=batch, scale=scale)
        (query_constants, query_grid), (key_constants, key_grid) = plan["query"], plan["key"]
        num_q_p, keys_p = query_constants["NUM_Q"], query_constants["KEYS_P"]
        nope_p, rope_p, value_p = query_constants["NOPE"], query_constants["ROPE"], query_constants["VALUE"]
        dtype = values.dtype
        qn = pad_axis(pad_axis(q_nope, 3, nope_p), 1, num_q_p)
        qr = pad_axis(pad_axis(q_rope, 3, rope_p), 1, num_q_p)
        kn = pad_axis(pad_axis(k_nope, 3, nope_p), 1, keys_p)
        kr = pad_axis(pad_axis(k_rope, 2, rope_p), 1, keys_p)
        v = pad_axis(pad_axis(values, 3, value_p), 1, keys_p)
        d_o = pad_axis(pad_axis(d_out.astype(dtype), 3, value_p), 1, num_q_p)
        positions = pad_axis(q_positions.astype(jnp.int32), 1, num_q_p, -1)
        lse_p = pad_axis(lse2.astype(jnp.float32), 2, num_q_p, jnp.inf)
        delta_p = pad_axis(delta.astype(jnp.float32), 2, num_q_p)
        dqn, dqr = gluon_call(qn, qr, kn, kr, v, positions, d_o, lse_p, delta_p, kernel=_query_grads_kernel,
                              out_shape=[jax.ShapeDtypeStruct(qn.shape, dtype),
                                         jax.ShapeDtypeStruct(qr.shape, dtype)],
                              grid=query_grid, num_warps=NUM_WARPS, **query_constants)
        start = first_query_blocks(positions, key_constants["BLOCK_Q"], K_BLOCK_K.value, key_grid[0])
        groups = key_grid[1]
        dkn, dv, dkr = gluon_call(qn, qr, kn, kr, v, positions, d_o, lse_p, delta_p, start,
                                  kernel=_key_grads_kernel,
                                  out_shape=[jax.ShapeDtypeStruct(kn.shape, dtype),
                                             jax.ShapeDtypeStruct(v.shape, dtype),
                                             jax.ShapeDtypeStruct((batch, groups, keys_p, rope_p), jnp.float32)],
                                  grid=key_grid, num_warps=NUM_WARPS, **key_constants)
        return (dqn[:, :num_q, :, :nope], dqr[:, :num_q, :, :rope], dkn[:, :num_keys, :, :nope],
                jnp.sum(dkr, axis=1)[:, :num_keys, :rope].astype(k_rope.dtype), dv[:, :num_keys, :, :value])

    return vmap_by_folding_into_batch(unmapped)(q_nope, q_rope, k_nope, k_rope, values, q_positions, d_out, lse2,
                                                delta)
