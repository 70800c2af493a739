"""Causal dense MLA attention forward on Hopper, in Gluon: one program = one head x 128 queries, two warpgroups.

The same contract and numerics as `dense_attention._forward_kernel` (the Pallas kernel, its CPU-testable twin):
fp32 logits q_nope . k_nope + q_rope . k_rope, an online softmax in base 2 with the scale folded into log2(e),
probabilities rounded to the input dtype for the value dot, fp32 accumulation; out = acc / rowsum and the
log-sum-exp per (query, head) in natural log. Key blocks that every real query of the block sees whole take a loop
with no mask; only the blocks straddling the diagonal compare ids. A query that sees nothing (position -1, padding)
gets zeros and lse -inf.

Why a Gluon kernel: Pallas's Triton backend (deprecated in jax 0.11) ran this forward at 332-350 TFLOP/s on an
H100 at DeepSeek-V3.2's shapes (docs/BENCHMARKS.md, sessions 41-42). Here the schedule is explicit:
  - q (BLOCK_Q x (N + P)) stays in shared memory; the keys and values of BLOCK_K keys stream through a STAGES-deep
    cp.async ring (rows of one head: stride H x N in k_nope, H x V in values; the rope key is shared by the heads);
  - logits [BLOCK_Q, BLOCK_K] = two wgmma chains (nope, then rope) into one fp32 accumulator, each warpgroup 64 of
    the queries (m64nBLOCK_K), so neither duplicates the other's work;
  - the probabilities stay in registers as the A operand of the value dot (no shared-memory round trip, no CTA
    barrier for them): acc [BLOCK_Q, V] += P . V (m64nV);
  - that dot runs one key block late, asynchronously, under the next block's exp2s (FA3's intra-warpgroup
    overlap, in the one order ptxas keeps: `_step`), so the keys and values of a block arrive a step apart.
Gluon has no interpreter: the CPU tests compile this kernel for sm_90 (wgmma shapes, no spills, shared memory) and
check the Pallas kernel, which computes the same arithmetic, in interpret mode; this kernel's outputs are checked
against the reference and the Pallas kernel on the GPU (`tests/test_dense_attention.py`).
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
from pallas_kernels._gluon_hopper import operand_buffer, wait_for_copies, wgmma_layout
from pallas_kernels._pallas import dot_size, pad_axis, round_up
from pallas_kernels.sparse_attention import GLUON_SMEM_BYTES

BLOCK_Q = gl.constexpr(128)  # queries per program: two warpgroups of m64
NUM_WARPS = 8
# Keys per step and key blocks in flight: on an H100 at DeepSeek-V3.2's widths (128 + 64 -> 128), last chunk of 1024
# queries, 128x2 ran at 507-514 TFLOP/s, 64x3 at 480-493, 64x4 469-495, 64x2 476-488, 32x4 409-415 (docs/BENCHMARKS.md,
# session 43). 64 keys per step, which wider inputs would need, gave wrong outputs on an H100 at 128 + 128 -> 128 in
# session 43's GPU test (cause not found; session 44 could not reproduce it on 256 queries x 1024 keys, 4 heads, at
# 64x3, 64x2 or 32x4): widths that do not fit at 128 keys per step take Pallas until it is found.
BLOCK_K = 128
STAGES = 2
MAX_WIDTH = 128  # N, P and V padded
_LOG2_E = 1.4426950408889634


@gluon.constexpr_function
def _rows_layout(width, num_warps):
    """Blocked layout for [rows, width] copies: 8 contiguous 2-byte elements (16 bytes) per thread, the threads of
    a warp along one row's segment first."""
    across = min(32, width // 8)
    return gl.BlockedLayout([1, 8], [32 // across, across], [num_warps, 1], [1, 0])


@gluon.jit
def _copy_rows(src, row_stride, dst, ROWS: gl.constexpr, WIDTH: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copy of ROWS rows of WIDTH elements, row r at src + r * row_stride, into dst."""
    layout: gl.constexpr = _rows_layout(WIDTH, num_warps)
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    columns = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    async_copy.async_copy_global_to_shared(dst, src + rows[:, None] * row_stride + columns[None, :])


@gluon.jit
def _copy_keys(kn_base, kr_base, block, kn_dst, kr_dst, HEADS: gl.constexpr, NOPE: gl.constexpr,
               ROPE: gl.constexpr, BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
    """Start the copies of key block `block`'s nope keys (this head's) and rope keys (shared); not committed.
    Offsets within a block fit int32; the block's start is taken in int64 (B x S x H x N passes 2^31 at 128K keys
    of 128 heads)."""
    first = block.to(gl.int64) * BLOCK_K
    _copy_rows(kn_base + first * (HEADS * NOPE), HEADS * NOPE, kn_dst, BLOCK_K, NOPE, num_warps)
    _copy_rows(kr_base + first * ROPE, ROPE, kr_dst, BLOCK_K, ROPE, num_warps)


@gluon.jit
def _copy_values(v_base, block, v_dst, HEADS: gl.constexpr, VALUE: gl.constexpr, BLOCK_K: gl.constexpr,
                 num_warps: gl.constexpr):
    """Start the copy of key block `block`'s values (this head's); not committed."""
    _copy_rows(v_base + block.to(gl.int64) * BLOCK_K * (HEADS * VALUE), HEADS * VALUE, v_dst, BLOCK_K, VALUE,
               num_warps)


@gluon.jit
def _copy_key_block(kn_base, kr_base, v_base, block, kn_dst, kr_dst, v_dst, HEADS: gl.constexpr,
                    NOPE: gl.constexpr, ROPE: gl.constexpr, VALUE: gl.constexpr, BLOCK_K: gl.constexpr,
                    num_warps: gl.constexpr):
    """Start the copies of key block `block` (keys and values) and commit them as one group."""
    _copy_keys(kn_base, kr_base, block, kn_dst, kr_dst, HEADS, NOPE, ROPE, BLOCK_K, num_warps)
    _copy_values(v_base, block, v_dst, HEADS, VALUE, BLOCK_K, num_warps)
    async_copy.commit_group()


@gluon.jit
def _visible_keys(block, positions, NUM_KEYS: gl.constexpr, BLOCK_K: gl.constexpr, layout: gl.constexpr):
    """bool[queries, BLOCK_K]: which keys of block `block` each query (at `positions`) sees, in `layout`."""
    ids = block * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    return (ids[None, :] <= positions[:, None]) & (ids < NUM_KEYS)[None, :]


@gluon.jit
def _walk_bounds(pos_ptr, first_query, NUM_KEYS: gl.constexpr, BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
    """(the block's query positions, key blocks to walk, leading key blocks every real query sees whole), as the
    Pallas kernels' _blocks_to_walk and _blocks_seen_whole."""
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    all_positions = gl.load(pos_ptr + first_query + gl.arange(0, BLOCK_Q, layout=flat))
    last = gl.minimum(gl.max(all_positions, axis=0), NUM_KEYS - 1)
    walk = gl.maximum(last + BLOCK_K, 0) // BLOCK_K  # 0 when every query is padding
    first_real = gl.min(gl.where(all_positions >= 0, all_positions, NUM_KEYS), axis=0)
    whole = gl.minimum(gl.minimum((first_real + 1) // BLOCK_K, NUM_KEYS // BLOCK_K), walk)
    return all_positions, walk, whole


@gluon.jit
def _start_key_ring(kn_ptr, kr_ptr, v_ptr, batch, head, walk, kn_ring, kr_ring, v_ring, KEYS_P: gl.constexpr,
                    HEADS: gl.constexpr, NOPE: gl.constexpr, ROPE: gl.constexpr, VALUE: gl.constexpr,
                    STAGES: gl.constexpr, BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
    """Start the copies of the first STAGES - 1 key blocks of this head (block walk - 1 again past the walk: a
    load of nothing new) -> this head's bases (k_nope, k_rope, values) for `_copy_key_block`."""
    kn_base = kn_ptr + (batch.to(gl.int64) * KEYS_P * HEADS + head) * NOPE
    kr_base = kr_ptr + batch.to(gl.int64) * KEYS_P * ROPE
    v_base = v_ptr + (batch.to(gl.int64) * KEYS_P * HEADS + head) * VALUE
    for stage in gl.static_range(STAGES - 1):
        _copy_key_block(kn_base, kr_base, v_base, gl.maximum(gl.minimum(walk - 1, stage), 0), kn_ring.index(stage),
                        kr_ring.index(stage), v_ring.index(stage), HEADS, NOPE, ROPE, VALUE, BLOCK_K, num_warps)
    return kn_base, kr_base, v_base


@gluon.jit
def _advance_key_ring(kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base, block, walk, HEADS: gl.constexpr,
                      NOPE: gl.constexpr, ROPE: gl.constexpr, VALUE: gl.constexpr, STAGES: gl.constexpr,
                      BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
    """Wait for key block `block`, start the copy of block + STAGES - 1 (clamped to the walk's last block) into the
    slot the block before it used -> the ring slot holding `block`. The d_q kernel's step
    (`dense_attention_backward_gluon`; the forward keeps its keys and values a step apart: `_step`)."""
    slot = block % STAGES
    wait_for_copies(STAGES - 2)  # this block (and q) landed; every warp is done with the one before (synchronous dots)
    ahead = block + STAGES - 1
    _copy_key_block(kn_base, kr_base, v_base, gl.minimum(ahead, walk - 1), kn_ring.index(ahead % STAGES),
                    kr_ring.index(ahead % STAGES), v_ring.index(ahead % STAGES), HEADS, NOPE, ROPE, VALUE,
                    BLOCK_K, num_warps)
    return slot


@gluon.jit
def _block_logits(q_nope, q_rope, kn, kr, carry_max, block, positions, MASKED: gl.constexpr,
                  NUM_KEYS: gl.constexpr, SCALE_LOG2: gl.constexpr, BLOCK_K: gl.constexpr,
                  logits_layout: gl.constexpr):
    """Key block `block`'s logits in base 2, masked where MASKED, and the running max -> (logits, new max, the max
    to subtract (0 while nothing is visible: exp2 stays finite), the factor taking what was summed so far to it)."""
    logits = warpgroup_mma(q_nope, kn.permute((1, 0)),
                           gl.zeros([BLOCK_Q, BLOCK_K], gl.float32, layout=logits_layout), use_acc=False)
    logits = warpgroup_mma(q_rope, kr.permute((1, 0)), logits) * SCALE_LOG2
    if MASKED:
        logits = gl.where(_visible_keys(block, positions, NUM_KEYS, BLOCK_K, logits_layout), logits, float("-inf"))
    new_max = gl.maximum(carry_max, gl.max(logits, axis=1))
    safe_max = gl.where(new_max == float("-inf"), 0.0, new_max)
    return logits, new_max, safe_max, gl.exp2(carry_max - safe_max)


@gluon.jit
def _probabilities(logits, safe_max, rescale, carry_sum):
    """-> (exp2(logits - max), the running sum taken to the new max plus their row sums)."""
    probs = gl.exp2(logits - safe_max[:, None])
    return probs, carry_sum * rescale + gl.sum(probs, axis=1)


@gluon.jit
def _step(q_nope, q_rope, kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base, carry_max, carry_sum, acc,
          probs_before, block, walk, positions, MASKED: gl.constexpr, NUM_KEYS: gl.constexpr, HEADS: gl.constexpr,
          NOPE: gl.constexpr, ROPE: gl.constexpr, VALUE: gl.constexpr, SCALE_LOG2: gl.constexpr,
          STAGES: gl.constexpr, BLOCK_K: gl.constexpr, logits_layout: gl.constexpr, p_operand: gl.constexpr,
          num_warps: gl.constexpr):
    """Key block `block` >= 1 of the online softmax, and the value dot of the block before (its probabilities
    `probs_before`, in registers) on the tensor cores while this block's exp2s run.

    The rings have two slots: keys of block + 1 go where block - 1's keys were, values of this block where
    block - 2's were; the dots that read those finished in the step before, and the barrier at this step's start
    makes that true of every warp. The value dot is issued after this block's row max, not beside its logits dot:
    with both in flight, ptxas waited for both before the exp2s (on an H100 2-6% slower than synchronous dots,
    docs/BENCHMARKS.md, session 47)."""
    gl.static_assert(STAGES == 2, "the forward's rings have two slots")
    wait_for_copies(0)  # this block's keys and the block before's values (committed together)
    _copy_keys(kn_base, kr_base, gl.minimum(block + 1, walk - 1), kn_ring.index((block + 1) % 2),
               kr_ring.index((block + 1) % 2), HEADS, NOPE, ROPE, BLOCK_K, num_warps)
    _copy_values(v_base, block, v_ring.index(block % 2), HEADS, VALUE, BLOCK_K, num_warps)
    async_copy.commit_group()
    slot = block % 2
    logits, carry_max, safe_max, rescale = _block_logits(
        q_nope, q_rope, kn_ring.index(slot), kr_ring.index(slot), carry_max, block, positions, MASKED, NUM_KEYS,
        SCALE_LOG2, BLOCK_K, logits_layout)
    acc = warpgroup_mma(probs_before, v_ring.index(1 - slot), acc, is_async=True)
    probs, carry_sum = _probabilities(logits, safe_max, rescale, carry_sum)
    acc, probs_before = warpgroup_mma_wait(0, deps=[acc, probs_before])
    # Rounded only after the wait: the loop carries the rounded probabilities in the registers the dot was reading.
    probs = gl.convert_layout(probs.to(v_ring.dtype), p_operand)
    acc = acc * gl.convert_layout(rescale, gl.SliceLayout(1, acc.type.layout))[:, None]
    return carry_max, carry_sum, acc, probs


@gluon.jit
def _walk(q_nope, q_rope, kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base, carry_max, carry_sum, acc, probs,
          start, stop, walk, positions, MASKED: gl.constexpr, NUM_KEYS: gl.constexpr, HEADS: gl.constexpr,
          NOPE: gl.constexpr, ROPE: gl.constexpr, VALUE: gl.constexpr, SCALE_LOG2: gl.constexpr,
          STAGES: gl.constexpr, BLOCK_K: gl.constexpr, logits_layout: gl.constexpr, p_operand: gl.constexpr,
          num_warps: gl.constexpr):
    """`_step` over key blocks [start, stop)."""
    for block in range(start, stop):
        carry_max, carry_sum, acc, probs = _step(
            q_nope, q_rope, kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base, carry_max, carry_sum, acc, probs,
            block, walk, positions, MASKED, NUM_KEYS, HEADS, NOPE, ROPE, VALUE, SCALE_LOG2, STAGES, BLOCK_K,
            logits_layout, p_operand, num_warps)
    return carry_max, carry_sum, acc, probs


@gluon.jit
def _forward_kernel(qn_ptr, qr_ptr, kn_ptr, kr_ptr, v_ptr, pos_ptr, out_ptr, lse_ptr, NUM_Q: gl.constexpr,
                    NUM_KEYS: gl.constexpr, KEYS_P: gl.constexpr, HEADS: gl.constexpr, NOPE: gl.constexpr,
                    ROPE: gl.constexpr, VALUE: gl.constexpr, SCALE_LOG2: gl.constexpr, STAGES: gl.constexpr,
                    BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
    # qn_ptr [B, T_p, H, N], qr_ptr [B, T_p, H, P], kn_ptr [B, S_p, H, N], kr_ptr [B, S_p, P], v_ptr [B, S_p, H, V]
    # (N, P, V padded), pos_ptr i32[B, T_p] (-1: padding), out_ptr [B, T_p, H, V], lse_ptr f32[B, H, T_p] (natural
    # log). NUM_KEYS: the real keys (ids past it are masked); KEYS_P: S_p, a multiple of BLOCK_K. Grid (T_p /
    # BLOCK_Q, H, B), the latest query block first: causal rows cost their position.
    dtype: gl.constexpr = qn_ptr.dtype.element_ty
    query_block = NUM_Q // BLOCK_Q - 1 - gl.program_id(0)
    head = gl.program_id(1)
    batch = gl.program_id(2)
    first_query = batch * NUM_Q + query_block * BLOCK_Q  # row in [B * T_p]

    logits_layout: gl.constexpr = wgmma_layout(BLOCK_K, num_warps)
    out_layout: gl.constexpr = wgmma_layout(VALUE, num_warps)
    p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=out_layout, k_width=2)

    q_nope = operand_buffer(dtype, [BLOCK_Q, NOPE])
    q_rope = operand_buffer(dtype, [BLOCK_Q, ROPE])
    kn_ring = operand_buffer(dtype, [STAGES, BLOCK_K, NOPE])
    kr_ring = operand_buffer(dtype, [STAGES, BLOCK_K, ROPE])
    v_ring = operand_buffer(dtype, [STAGES, BLOCK_K, VALUE])

    q_row = first_query.to(gl.int64) * HEADS + head
    _copy_rows(qn_ptr + q_row * NOPE, HEADS * NOPE, q_nope, BLOCK_Q, NOPE, num_warps)
    _copy_rows(qr_ptr + q_row * ROPE, HEADS * ROPE, q_rope, BLOCK_Q, ROPE, num_warps)
    async_copy.commit_group()
    all_positions, walk, whole = _walk_bounds(pos_ptr, first_query, NUM_KEYS, BLOCK_K, num_warps)
    kn_base = kn_ptr + (batch.to(gl.int64) * KEYS_P * HEADS + head) * NOPE
    kr_base = kr_ptr + batch.to(gl.int64) * KEYS_P * ROPE
    v_base = v_ptr + (batch.to(gl.int64) * KEYS_P * HEADS + head) * VALUE
    _copy_keys(kn_base, kr_base, gl.to_tensor(0), kn_ring.index(0), kr_ring.index(0), HEADS, NOPE, ROPE, BLOCK_K,
               num_warps)
    async_copy.commit_group()
    positions = gl.convert_layout(all_positions, gl.SliceLayout(1, logits_layout))

    # Block 0 first, masked (a mask changes nothing on a block seen whole; with every query padding, walk = 0, it
    # sees nothing): its probabilities wait for the next step's value dot, as each step's do.
    wait_for_copies(0)
    _copy_keys(kn_base, kr_base, gl.maximum(gl.minimum(walk - 1, 1), 0), kn_ring.index(1), kr_ring.index(1), HEADS,
               NOPE, ROPE, BLOCK_K, num_warps)
    _copy_values(v_base, gl.to_tensor(0), v_ring.index(0), HEADS, VALUE, BLOCK_K, num_warps)
    async_copy.commit_group()
    logits, carry_max, safe_max, rescale = _block_logits(
        q_nope, q_rope, kn_ring.index(0), kr_ring.index(0),
        gl.full([BLOCK_Q], float("-inf"), gl.float32, layout=gl.SliceLayout(1, logits_layout)), 0, positions, True,
        NUM_KEYS, SCALE_LOG2, BLOCK_K, logits_layout)
    probs, carry_sum = _probabilities(logits, safe_max, rescale,
                                      gl.zeros([BLOCK_Q], gl.float32, layout=gl.SliceLayout(1, logits_layout)))
    probs = gl.convert_layout(probs.to(dtype), p_operand)
    acc = gl.zeros([BLOCK_Q, VALUE], gl.float32, layout=out_layout)
    carry_max, carry_sum, acc, probs = _walk(
        q_nope, q_rope, kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base, carry_max, carry_sum, acc, probs, 1,
        whole, walk, positions, False, NUM_KEYS, HEADS, NOPE, ROPE, VALUE, SCALE_LOG2, STAGES, BLOCK_K,
        logits_layout, p_operand, num_warps)
    carry_max, carry_sum, acc, probs = _walk(
        q_nope, q_rope, kn_ring, kr_ring, v_ring, kn_base, kr_base, v_base, carry_max, carry_sum, acc, probs,
        gl.maximum(whole, 1), walk, walk, positions, True, NUM_KEYS, HEADS, NOPE, ROPE, VALUE, SCALE_LOG2, STAGES,
        BLOCK_K, logits_layout, p_operand, num_warps)
    wait_for_copies(0)  # the last block's values
    acc = warpgroup_mma(probs, v_ring.index((gl.maximum(walk, 1) - 1) % 2), acc)

    has_any = (carry_sum > 0) & (positions >= 0)  # a padded query's row took the unmasked blocks: drop it
    total = gl.where(has_any, carry_sum, 1.0)
    lse = gl.where(has_any, (carry_max + gl.log2(total)) * 0.6931471805599453, float("-inf"))
    rows = gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(1, logits_layout))
    gl.store(lse_ptr + (batch * HEADS + head) * NUM_Q + query_block * BLOCK_Q + rows, lse)
    scale = gl.convert_layout(gl.where(has_any, 1.0 / total, 0.0), gl.SliceLayout(1, out_layout))
    out_rows = gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(1, out_layout))
    columns = gl.arange(0, VALUE, layout=gl.SliceLayout(0, out_layout))
    out_offsets = ((first_query + out_rows).to(gl.int64) * HEADS + head) * VALUE
    gl.store(out_ptr + out_offsets[:, None] + columns[None, :], (acc * scale[:, None]).to(out_ptr.dtype.element_ty))


def padded_widths(nope: int, rope: int, value: int) -> tuple[int, int, int]:
    """(N_p, P_p, V_p): powers of two of at least 16 (zero columns change no dot)."""
    return dot_size(nope), dot_size(rope), dot_size(value)


def smem_bytes(nope_p: int, rope_p: int, value_p: int, itemsize: int = 2) -> int:
    """Shared memory of one program: the query tile and the key ring."""
    return itemsize * (BLOCK_Q.value * (nope_p + rope_p) + STAGES * BLOCK_K * (nope_p + rope_p + value_p))


def unsupported_reason(dtype, nope: int, rope: int, value: int):
    """None when this kernel takes these inputs, else why not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"it takes bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    widths = padded_widths(nope, rope, value)
    if max(widths) > MAX_WIDTH:
        return (f"it takes widths up to {MAX_WIDTH} (padded to powers of two), got nope {nope}, rope {rope}, "
                f"value {value}")
    if smem_bytes(*widths) > GLUON_SMEM_BYTES:
        return f"its tiles for widths {widths} need more than {GLUON_SMEM_BYTES} bytes of shared memory"
    return None


def kernel_constants(num_q: int, num_keys: int, heads: int, nope: int, rope: int, value: int, *, batch: int,
                     scale: float) -> tuple[dict, tuple[int, int, int]]:
    """The kernel's compile-time constants (sizes padded) and its grid (also used by the CPU compile test)."""
    nope_p, rope_p, value_p = padded_widths(nope, rope, value)
    num_q_p, keys_p = round_up(num_q, BLOCK_Q.value), round_up(num_keys, BLOCK_K)
    constants = dict(NUM_Q=num_q_p, NUM_KEYS=num_keys, KEYS_P=keys_p, HEADS=heads, NOPE=nope_p, ROPE=rope_p,
                     VALUE=value_p, SCALE_LOG2=scale * _LOG2_E, STAGES=STAGES, BLOCK_K=BLOCK_K)
    return constants, (num_q_p // BLOCK_Q.value, heads, batch)


def dense_forward_gluon(q_nope, q_rope, k_nope, k_rope, values, q_positions, *, scale: float):
    """(out [B,T,H,V] in the dtype of values, lse f32[B,T,H]), as `dense_attention._forward` (inputs checked by
    the caller; `unsupported_reason` None). Maps under vmap by folding into the batch."""
    (_, num_q, heads, nope), num_keys = q_nope.shape, k_nope.shape[1]
    rope, value = q_rope.shape[-1], values.shape[-1]

    def unmapped(q_nope, q_rope, k_nope, k_rope, values, q_positions):
        batch = q_nope.shape[0]
        constants, grid = kernel_constants(num_q, num_keys, heads, nope, rope, value, batch=batch, scale=scale)
        num_q_p, keys_p = constants["NUM_Q"], constants["KEYS_P"]
        nope_p, rope_p, value_p = constants["NOPE"], constants["ROPE"], constants["VALUE"]
        dtype = values.dtype
        qn = pad_axis(pad_axis(q_nope.astype(dtype), 3, nope_p), 1, num_q_p)
        qr = pad_axis(pad_axis(q_rope.astype(dtype), 3, rope_p), 1, num_q_p)
        kn = pad_axis(pad_axis(k_nope.astype(dtype), 3, nope_p), 1, keys_p)
        kr = pad_axis(pad_axis(k_rope.astype(dtype), 2, rope_p), 1, keys_p)
        v = pad_axis(pad_axis(values, 3, value_p), 1, keys_p)
        positions = pad_axis(q_positions.astype(jnp.int32), 1, num_q_p, -1)
        out, lse = gluon_call(qn, qr, kn, kr, v, positions, kernel=_forward_kernel,
                              out_shape=[jax.ShapeDtypeStruct((batch, num_q_p, heads, value_p), dtype),
                                         jax.ShapeDtypeStruct((batch, heads, num_q_p), jnp.float32)],
                              grid=grid, num_warps=NUM_WARPS, **constants)
        return out[:, :num_q, :, :value], jnp.moveaxis(lse[:, :, :num_q], 1, 2)

    return vmap_by_folding_into_batch(unmapped)(q_nope, q_rope, k_nope, k_rope, values, q_positions)
