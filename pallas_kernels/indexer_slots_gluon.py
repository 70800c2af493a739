"""The indexer's scores over each query's selected slots (`indexer_slots`) on Hopper, in Gluon: forward and backward.

The math is `indexer_slots`' (s[t,j] = sum_g w[t,g] ReLU(q[t,g] . k[idx_j]); ds its cotangent; G = ds w m with
m = 1[q . k > 0], rounded to the input dtype for the two gradient dots, as the Pallas kernels round it):

    d_w[t,g] = sum_j ds[t,j] ReLU(q[t,g] . k[idx_j])     d_q[t,g] = sum_j G[t,j,g] k[idx_j]
    d_k[idx_j] += sum_g G[t,j,g] q[t,g]

One program per token, one warpgroup, its slots BLOCK_K = 64 at a time; the block's key rows are gathered by
cp.async into a ring of shared-memory buffers, -1 slots copying nothing (zero-filled rows, masked). Slots sit on
the wgmma's rows: logits^T [64 slots, 64 heads] = rows . q^T (A = the gathered rows, B = q^T, both in shared
memory), so the head sum of the forward, and the backward's d_w, reduce within a thread's quad, and G^T is, in
registers, the A operand of the backward's row dot d_rows [64 slots, I] = G^T . q. The backward's d_q [64 heads, I]
+= G . rows takes G from a shared-memory copy of G^T read transposed. d_rows is added into an fp32 d_k with
relaxed 16-byte vector atomics (`sparse_attention_backward_gluon._scatter_add`: the tile converted to 4 adjacent
columns per thread first): many tokens select the same key. Blocks of -1 slots only, after the token's last valid
slot, are not walked (the causal tails of the first K tokens' lists).

Why: the Pallas kernels (`indexer_slots`) run on Pallas's Triton backend, deprecated in jax 0.11, and their
backward adds d_k with 8-byte atomics at most. The backward is bound by writing d_k (512 bytes per slot at
I = 128): on an H100 at T = 32768 it takes 13.5 ms, 11.9 with plain stores instead of the atomics (wrong results),
5.3 with no d_k writes, 18.2 with 8-byte atomics (docs/BENCHMARKS.md, session 33).

Limits (`unsupported_reason`): 2-byte inputs, at most 64 heads (padded to 64: the d_q dot's rows) and an index
head dim of at most 128 (padded to a power of two >= 16). Gluon has no interpreter: the CPU tests compile both
kernels for sm_90 (no spills, the dots at the expected shapes, 16-byte atomics); the numbers are checked on the GPU
against the float32 reference and the Pallas kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from pallas_kernels._gluon import gluon_call
from pallas_kernels._gluon_hopper import operand_buffer, wait_for_copies, wgmma_layout
from pallas_kernels.indexer_backward_gluon import _copy_rows
from pallas_kernels.sparse_attention import GLUON_DTYPES
from pallas_kernels.sparse_attention_backward_gluon import _scatter_add
from pallas_kernels.sparse_attention_gluon import _gather_columns, _opaque_zero

HEADS = gl.constexpr(64)  # heads per program, padded: the backward's d_q dot has them on the wgmma's rows
BLOCK_K = gl.constexpr(64)  # slots per step
MAX_WIDTH = 128  # index head dim: d_q and d_rows, [64, I] fp32 each, share a thread's registers
NUM_WARPS = 4  # one warpgroup
# Gather buffers. Forward: two (one block in flight while the other's dot runs), so that four programs share an SM
# (48 KB each at I = 128); on an H100 at T = 32768 that took 2.51 ms against 2.68 / 2.97 / 3.00 with 3 / 4 / 6
# buffers. Backward: four (106 KB, two programs per SM either way): 13.28 ms against 13.64 / 13.49 with 2 / 3.
FORWARD_STAGES = 2
BACKWARD_STAGES = 4


@gluon.constexpr_function
def _next_pow2(n):
    return 1 << (n - 1).bit_length()


@gluon.jit
def _live_blocks(ids_base, SLOTS: gl.constexpr, num_warps: gl.constexpr):
    """Slot blocks up to and including the last one that holds a valid (>= 0) slot id: the rest are not walked."""
    layout: gl.constexpr = gl.BlockedLayout([4], [32], [num_warps], [0])
    slots = gl.arange(0, _next_pow2(SLOTS), layout=layout)
    ids = gl.load(ids_base + slots, mask=slots < SLOTS, other=-1)
    last = gl.max(gl.where(ids >= 0, slots + 1, 0), axis=0)  # 1 + the last valid slot, 0 if none
    return (last + BLOCK_K - 1) // BLOCK_K


@gluon.jit
def _gather_keys(k_base, ids_ptr, dst, NUM_KEYS: gl.constexpr, WIDTH: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copies of the key rows that ids_ptr[0:BLOCK_K] select into dst [BLOCK_K, WIDTH]."""
    _gather_columns(k_base, ids_ptr, dst, 0, WIDTH, WIDTH, NUM_KEYS, num_warps)


@gluon.jit
def _program(NUM_Q: gl.constexpr, NUM_KEYS: gl.constexpr, WIDTH: gl.constexpr):
    """(token row in [B * T], offset of its batch's keys [S, I]) of this program; grid (T, B)."""
    batch = gl.program_id(1)
    return batch * NUM_Q + gl.program_id(0), batch.to(gl.int64) * NUM_KEYS * WIDTH


@gluon.jit
def _forward_kernel(q_ptr, w_ptr, k_ptr, idx_ptr, out_ptr, NUM_Q: gl.constexpr, NUM_KEYS: gl.constexpr,
                    SLOTS: gl.constexpr, WIDTH: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    # q [B, T, HEADS, I], w f32[B, T, HEADS], k [B, S, I], idx i32[B, T, K] -> out f32[B, T, K] (0 at -1 slots).
    # T = NUM_Q, S = NUM_KEYS, K = SLOTS (a multiple of BLOCK_K), I = WIDTH. Grid (T, B).
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    token, k_offset = _program(NUM_Q, NUM_KEYS, WIDTH)
    k_base = k_ptr + k_offset
    ids_base = idx_ptr + token.to(gl.int64) * SLOTS
    out_base = out_ptr + token.to(gl.int64) * SLOTS
    logits_layout: gl.constexpr = wgmma_layout(HEADS, num_warps)
    slot_rows: gl.constexpr = gl.SliceLayout(1, logits_layout)
    q_smem = operand_buffer(dtype, [HEADS, WIDTH])
    keys = operand_buffer(dtype, [STAGES, BLOCK_K, WIDTH])
    _copy_rows(q_ptr + token.to(gl.int64) * HEADS * WIDTH, q_smem, WIDTH, num_warps)
    live = _live_blocks(ids_base, SLOTS, num_warps)
    for s in gl.static_range(STAGES - 1):  # (a group per block, empty past the live ones: the waits count groups)
        if s < live:
            _gather_keys(k_base, ids_base + s * BLOCK_K, keys.index(s), NUM_KEYS, WIDTH, num_warps)
        async_copy.commit_group()
    weights = gl.load(w_ptr + token * HEADS + gl.arange(0, HEADS, layout=gl.SliceLayout(0, logits_layout)))
    slot_ids = gl.arange(0, BLOCK_K, layout=slot_rows)
    for j in range(live):
        wait_for_copies(STAGES - 2)  # block j (and q) landed, and every warp is done with block j - 1's buffer
        ahead = j + STAGES - 1
        if ahead < live:
            _gather_keys(k_base, ids_base + ahead * BLOCK_K, keys.index(ahead % STAGES), NUM_KEYS, WIDTH,
                         num_warps)
        async_copy.commit_group()
        logits = gl.zeros([BLOCK_K, HEADS], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(keys.index(j % STAGES), q_smem.permute((1, 0)), logits, use_acc=False,
                               is_async=True)
        ids = gl.load(ids_base + j * BLOCK_K + slot_ids)
        logits = warpgroup_mma_wait(0, deps=[logits])
        scores = gl.sum(gl.maximum(logits, 0.0) * weights[None, :], axis=1)
        gl.store(out_base + j * BLOCK_K + slot_ids, gl.where(ids >= 0, scores, 0.0))
    async_copy.wait_group(0)
    for j in range(live, SLOTS // BLOCK_K):  # blocks of -1 slots only: score 0
        gl.store(out_base + j * BLOCK_K + slot_ids, gl.zeros([BLOCK_K], gl.float32, layout=slot_rows))


@gluon.jit
def _backward_kernel(q_ptr, w_ptr, k_ptr, idx_ptr, d_ptr, d_k_in_ptr, d_q_ptr, d_w_ptr, d_k_ptr,
                     NUM_Q: gl.constexpr, NUM_KEYS: gl.constexpr, SLOTS: gl.constexpr, WIDTH: gl.constexpr,
                     STAGES: gl.constexpr, num_warps: gl.constexpr):
    # Inputs as `_forward_kernel`'s, and d f32[B, T, K] (the scores' cotangent) -> d_q like q, d_w f32 like w,
    # d_k f32[B, S, I] added to (aliased with d_k_in: zeros). Grid (T, B).
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    token, k_offset = _program(NUM_Q, NUM_KEYS, WIDTH)
    k_base = k_ptr + k_offset
    d_k_base = d_k_ptr + k_offset
    ids_base = idx_ptr + token.to(gl.int64) * SLOTS
    logits_layout: gl.constexpr = wgmma_layout(HEADS, num_warps)
    rows_layout: gl.constexpr = wgmma_layout(WIDTH, num_warps)
    PIECE: gl.constexpr = min(WIDTH, 64)  # d_rows columns per dot and atomic add
    piece_layout: gl.constexpr = wgmma_layout(PIECE, num_warps)
    grad_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=piece_layout, k_width=2)
    slot_rows: gl.constexpr = gl.SliceLayout(1, logits_layout)
    head_columns: gl.constexpr = gl.SliceLayout(0, logits_layout)
    # [1, rows, columns], indexed in the loop with an opaque 0 (`_opaque_zero`): hoisted, the wgmma descriptors of
    # q and G^T held registers through the loop, and ptxas spilled
    q_all = operand_buffer(dtype, [1, HEADS, WIDTH])
    keys = operand_buffer(dtype, [STAGES, BLOCK_K, WIDTH])
    grad_all = operand_buffer(dtype, [1, BLOCK_K, HEADS])
    _copy_rows(q_ptr + token.to(gl.int64) * HEADS * WIDTH, q_all.index(0), WIDTH, num_warps)
    live = _live_blocks(ids_base, SLOTS, num_warps)
    for s in gl.static_range(STAGES - 1):
        if s < live:
            _gather_keys(k_base, ids_base + s * BLOCK_K, keys.index(s), NUM_KEYS, WIDTH, num_warps)
        async_copy.commit_group()
    weights = gl.load(w_ptr + token * HEADS + gl.arange(0, HEADS, layout=head_columns))
    slot_ids = gl.arange(0, BLOCK_K, layout=slot_rows)
    d_q = gl.zeros([HEADS, WIDTH], gl.float32, layout=rows_layout)
    d_w = gl.zeros([BLOCK_K, HEADS], gl.float32, layout=logits_layout)  # summed over the slots after the loop
    for j in range(live):
        buf = j % STAGES
        wait_for_copies(STAGES - 2)  # block j (and q) landed; every warp is done with block j - 1 (buffer, grad_smem)
        ahead = j + STAGES - 1
        if ahead < live:
            _gather_keys(k_base, ids_base + ahead * BLOCK_K, keys.index(ahead % STAGES), NUM_KEYS, WIDTH,
                         num_warps)
        async_copy.commit_group()
        zero = _opaque_zero(j)
        q_smem, grad_smem = q_all.index(zero), grad_all.index(zero)
        logits = gl.zeros([BLOCK_K, HEADS], gl.float32, layout=logits_layout)
        logits = warpgroup_mma(keys.index(buf), q_smem.permute((1, 0)), logits, use_acc=False, is_async=True)
        ids = gl.load(ids_base + j * BLOCK_K + slot_ids)
        valid = ids >= 0
        d = gl.where(valid, gl.load(d_ptr + token.to(gl.int64) * SLOTS + j * BLOCK_K + slot_ids), 0.0)
        logits = warpgroup_mma_wait(0, deps=[logits])
        d_w += d[:, None] * gl.maximum(logits, 0.0)
        grad = gl.where(logits > 0, d[:, None] * weights[None, :], 0.0).to(dtype)  # G^T [slots, heads]
        grad_smem.store(grad)
        fence_async_shared()
        gl.thread_barrier()  # every warp's part of G^T is in shared memory
        d_q = warpgroup_mma(grad_smem.permute((1, 0)), keys.index(buf), d_q, is_async=True)
        grad = gl.convert_layout(grad, grad_operand)
        rows = gl.minimum(ids, NUM_KEYS - 1)
        if NUM_KEYS * WIDTH >= 2**31:
            rows = rows.to(gl.int64)
        for c in gl.static_range(WIDTH // PIECE):  # in pieces: [64, WIDTH] fp32 at once would spill
            d_rows = gl.zeros([BLOCK_K, PIECE], gl.float32, layout=piece_layout)
            d_rows = warpgroup_mma(grad, q_smem.slice(c * PIECE, PIECE, dim=1), d_rows, use_acc=False,
                                   is_async=True)
            d_rows, d_q = warpgroup_mma_wait(0, deps=[d_rows, d_q])
            _scatter_add(d_k_base, rows, valid, d_rows, c * PIECE, WIDTH)
    async_copy.wait_group(0)

    heads = gl.arange(0, HEADS, layout=gl.SliceLayout(1, rows_layout))
    columns = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, rows_layout))
    gl.store(d_q_ptr + (token * HEADS + heads).to(gl.int64)[:, None] * WIDTH + columns[None, :],
             d_q.to(d_q_ptr.dtype.element_ty))
    gl.store(d_w_ptr + token * HEADS + gl.arange(0, HEADS, layout=head_columns), gl.sum(d_w, axis=0))


def unsupported_reason(dtype, heads: int, width: int) -> str | None:
    """Why inputs with these (unpadded) heads and padded width cannot run the Gluon kernels, or None."""
    if jnp.dtype(dtype) not in GLUON_DTYPES:
        return f"it takes bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if heads > HEADS.value:
        return f"{heads} indexer heads exceed its {HEADS.value} (one wgmma row block)"
    if width > MAX_WIDTH:
        return f"index head dim {width} (padded) exceeds {MAX_WIDTH}: d_q and d_rows would not fit in registers"
    return None


def kernel_constants(num_q: int, num_keys: int, slots: int, width: int, stages: int) -> dict:
    return dict(NUM_Q=num_q, NUM_KEYS=num_keys, SLOTS=slots, WIDTH=width, STAGES=stages)


def _check(q, w, k, indices, name: str):
    batch, num_q, heads, width = q.shape
    reason = unsupported_reason(q.dtype, heads, width)
    if (reason or heads != HEADS.value or indices.shape != (batch, num_q, indices.shape[2])
            or indices.shape[2] % BLOCK_K.value or w.shape != q.shape[:3] or w.dtype != jnp.float32
            or k.dtype != q.dtype or k.shape != (batch, k.shape[1], width)):
        raise ValueError(f"{name}: unpadded or unsupported input ({reason or 'shapes'}): q {q.shape} {q.dtype}, "
                         f"w {w.shape} {w.dtype}, k {k.shape} {k.dtype}, indices {indices.shape}")


def slot_scores_gluon(q, w, k, indices):
    """q [B,T,64,I], w f32[B,T,64], k [B,S,I] (dtype of q), indices int32[B,T,K] -> f32[B,T,K] (0 at -1 slots).
    Padded (`indexer_slots` pads): 64 heads (zero q and w past the model's), I a power of two in [16, 128], K a
    multiple of BLOCK_K (-1 past the slots)."""
    _check(q, w, k, indices, "slot_scores_gluon")
    batch, num_q, _, width = q.shape
    return gluon_call(q, w, k, indices, kernel=_forward_kernel,
                      out_shape=jax.ShapeDtypeStruct(indices.shape, jnp.float32), grid=(num_q, batch),
                      num_warps=NUM_WARPS,
                      **kernel_constants(num_q, k.shape[1], indices.shape[2], width, FORWARD_STAGES))


def slot_scores_backward_gluon(q, w, k, indices, d_scores):
    """Inputs as `slot_scores_gluon`'s and d_scores f32[B,T,K] -> (d_q like q, d_w f32 like w, d_k f32[B,S,I])."""
    _check(q, w, k, indices, "slot_scores_backward_gluon")
    batch, num_q, _, width = q.shape
    d_k = jnp.zeros(k.shape, jnp.float32)
    return gluon_call(q, w, k, indices, d_scores.astype(jnp.float32), d_k, kernel=_backward_kernel,
                      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(w.shape, jnp.float32),
                                 jax.ShapeDtypeStruct(k.shape, jnp.float32)],
                      grid=(num_q, batch), num_warps=NUM_WARPS, input_output_aliases={5: 2},
                      **kernel_constants(num_q, k.shape[1], indices.shape[2], width, BACKWARD_STAGES))
