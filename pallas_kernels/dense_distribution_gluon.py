"""The dense warm-up's distillation target on Hopper, in Gluon: the head-averaged attention distribution over all
visible keys, given the attention's log-sum-exp (`dense_attention._distribution_kernel` is the Pallas twin).

    dist[b,t,s] = (1/H) sum_h exp2(scale log2(e) (q_nope[b,t,h] . k_nope[b,s,h] + q_rope[b,t,h] . k_rope[b,s])
                                   - lse2[b,h,t])            for s <= position[b,t], else 0

One program per (128 queries, 256 keys), two warpgroups of 64 queries, looping over the heads. Why this tile: a
tile's output needs every head, so each head's q and k blocks are read again for every tile, and that traffic from
L2 is what bounds the kernel. The Pallas kernel's 128 x 128 tile reads 80 KB per head for 6.3 MFLOP (77 FLOP per
byte) and runs at ~318 TFLOP/s on an H100, ~4 TB/s out of L2 (docs/BENCHMARKS.md, session 42: loading q once per
tile, an ablation, ran in 58% of the time). 256 keys read 112 KB per head for twice the work (110 FLOP per byte);
its fp32 sum is two [128, 128] halves in registers (64 + 64 per thread) next to one half's logits (64).
Shared memory then holds two heads' q (a ring over heads), the two 128-key halves of one head's k_nope (one slot
per half) and the tile's k_rope (shared by the heads): 192 KB at 128 + 64 columns. The copies are cp.async, each
issued as soon as a slot frees, so that a head's q is in flight for a whole head and each k half for a half-step:
    step (h, 0): q(h), k(h, 0) landed; copy k(h, 1), q(h + 1); logits and exp2 of keys 0..127 of head h
    step (h, 1): k(h, 1) landed;       copy k(h + 1, 0);       logits and exp2 of keys 128..255
The logits are two wgmma chains (nope, rope) into one fp32 accumulator (m64n128 per warpgroup); exp2 with the scale
folded into log2(e) against the lse in base 2 (the wrapper hands it so, +inf for queries that see nothing). The
causal mask is applied once, when the tile is stored: keys a query does not see can give inf in the sum, and a
select (not a multiply) makes them 0. Tiles past the last query's position store zeros without any copy or dot.
The output is written at its final shape [B, T, S] (stores masked to real rows and keys), not sliced after.

Gluon has no interpreter: the CPU tests compile this kernel for sm_90 (wgmma shapes and counts, registers, no
spills, shared memory) and run the wrapper around a stand-in launch; the Pallas kernel, which computes the same
arithmetic, runs in interpret mode; this kernel's outputs are checked on the GPU against the float32 reference and
the Pallas kernel (`tests/test_dense_attention.py`).
Shapes: B batch, T queries (T_p padded), S keys (S_p), H heads, N nope width, P rope width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma

from pallas_kernels._gluon import gluon_call, vmap_by_folding_into_batch
from pallas_kernels._gluon_hopper import operand_buffer, wait_for_copies, wgmma_layout
from pallas_kernels._pallas import dot_size, pad_axis, round_up
from pallas_kernels.dense_attention_gluon import _copy_rows
from pallas_kernels.sparse_attention import GLUON_SMEM_BYTES

BLOCK_Q = gl.constexpr(128)  # queries per program: two warpgroups of m64
HALF_K = gl.constexpr(128)  # keys per logits chain and per half of the sum
BLOCK_K = 2 * HALF_K.value  # keys per program
NUM_WARPS = 8
MAX_WIDTH = 128  # N and P padded
_LOG2_E = 1.4426950408889634


@gluon.jit
def _copy_queries(qn_ptr, qr_ptr, q_row, head, qn_dst, qr_dst, HEADS: gl.constexpr, NOPE: gl.constexpr,
                  ROPE: gl.constexpr, num_warps: gl.constexpr):
    """Start the copies of one head's q for the block's queries (q_row: the first one's row in [B * T_p], int64)
    and commit them as one group."""
    row = q_row * HEADS + head
    _copy_rows(qn_ptr + row * NOPE, HEADS * NOPE, qn_dst, BLOCK_Q, NOPE, num_warps)
    _copy_rows(qr_ptr + row * ROPE, HEADS * ROPE, qr_dst, BLOCK_Q, ROPE, num_warps)
    async_copy.commit_group()


@gluon.jit
def _copy_keys(kn_ptr, key_row, head, HALF: gl.constexpr, kn_dst, HEADS: gl.constexpr, NOPE: gl.constexpr,
               num_warps: gl.constexpr):
    """Start the copy of one head's k_nope for half HALF of the tile's keys (key_row: the tile's first key's row in
    [B * S_p], int64) and commit it as one group."""
    row = (key_row + HALF * HALF_K) * HEADS + head
    _copy_rows(kn_ptr + row * NOPE, HEADS * NOPE, kn_dst, HALF_K, NOPE, num_warps)
    async_copy.commit_group()


@gluon.jit
def _add_head(q_nope, q_rope, k_nope, k_rope, lse_rows, total, logits, SCALE_LOG2: gl.constexpr):
    """(total + exp2(logits * scale log2(e) - lse2), logits) for one head and one half of the keys. `logits`, the
    previous step's, only lends its registers (use_acc=False: the dot overwrites them)."""
    logits = warpgroup_mma(q_nope, k_nope.permute((1, 0)), logits, use_acc=False)
    logits = warpgroup_mma(q_rope, k_rope.permute((1, 0)), logits)
    return total + gl.exp2(logits * SCALE_LOG2 - lse_rows[:, None]), logits


@gluon.jit
def _store_half(out_ptr, total, positions, queries, batch, first_key, HALF: gl.constexpr, OUT_Q: gl.constexpr,
                NUM_KEYS: gl.constexpr, HEADS: gl.constexpr):
    """Store half HALF of the tile (queries: their indices in the row, in total's row layout): total / H where the
    query sees the key, else 0 (the unseen entries of total may be inf, which the select drops)."""
    keys = first_key + HALF * HALF_K + gl.arange(0, HALF_K, layout=gl.SliceLayout(0, total.type.layout))
    visible = keys[None, :] <= positions[:, None]
    offsets = (batch * OUT_Q + queries).to(gl.int64)[:, None] * NUM_KEYS + keys[None, :]
    real = (queries < OUT_Q)[:, None] & (keys < NUM_KEYS)[None, :]
    gl.store(out_ptr + offsets, gl.where(visible, total * (1.0 / HEADS), 0.0), mask=real)


@gluon.jit
def _distribution_kernel(qn_ptr, qr_ptr, kn_ptr, kr_ptr, pos_ptr, lse_ptr, out_ptr, NUM_Q: gl.constexpr,
                         OUT_Q: gl.constexpr, NUM_KEYS: gl.constexpr, KEYS_P: gl.constexpr, HEADS: gl.constexpr,
                         NOPE: gl.constexpr, ROPE: gl.constexpr, SCALE_LOG2: gl.constexpr, num_warps: gl.constexpr):
    # qn_ptr [B, T_p, H, N], qr_ptr [B, T_p, H, P], kn_ptr [B, S_p, H, N], kr_ptr [B, S_p, P] (N, P padded),
    # pos_ptr i32[B, T_p] (-1: padding), lse_ptr f32[B, H, T_p] (base 2; +inf where nothing is seen),
    # out_ptr f32[B, T, S]. NUM_Q: T_p; OUT_Q: T; NUM_KEYS: S; KEYS_P: S_p, a multiple of BLOCK_K.
    # Grid (T_p / BLOCK_Q, S_p / BLOCK_K, B), the query blocks fastest: the programs in flight share key blocks.
    dtype: gl.constexpr = qn_ptr.dtype.element_ty
    query_block = gl.program_id(0)
    first_key = gl.program_id(1) * (2 * HALF_K)
    batch = gl.program_id(2)
    first_query = batch * NUM_Q + query_block * BLOCK_Q  # row in [B * T_p]

    layout: gl.constexpr = wgmma_layout(HALF_K, num_warps)
    q_nope = operand_buffer(dtype, [2, BLOCK_Q, NOPE])
    q_rope = operand_buffer(dtype, [2, BLOCK_Q, ROPE])
    k_nope = operand_buffer(dtype, [2, HALF_K, NOPE])
    k_rope = operand_buffer(dtype, [2, HALF_K, ROPE])

    flat: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    all_positions = gl.load(pos_ptr + first_query + gl.arange(0, BLOCK_Q, layout=flat))
    rows = gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(1, layout))
    positions = gl.convert_layout(all_positions, gl.SliceLayout(1, layout))
    total_0 = gl.zeros([BLOCK_Q, HALF_K], gl.float32, layout=layout)
    total_1 = gl.zeros([BLOCK_Q, HALF_K], gl.float32, layout=layout)
    if first_key <= gl.max(all_positions, axis=0):  # else no query sees a key of the tile: zeros
        q_row = first_query.to(gl.int64)
        key_row = batch.to(gl.int64) * KEYS_P + first_key
        kr_base = kr_ptr + key_row * ROPE
        _copy_rows(kr_base, ROPE, k_rope.index(0), HALF_K, ROPE, num_warps)
        _copy_rows(kr_base + HALF_K * ROPE, ROPE, k_rope.index(1), HALF_K, ROPE, num_warps)
        _copy_queries(qn_ptr, qr_ptr, q_row, 0, q_nope.index(0), q_rope.index(0), HEADS, NOPE, ROPE, num_warps)
        _copy_keys(kn_ptr, key_row, 0, 0, k_nope.index(0), HEADS, NOPE, num_warps)
        # The two halves' logits share registers: a second set (ptxas otherwise starts the next half's dots under
        # this half's exp2) would not fit beside the two halves' sums.
        logits = gl.zeros([BLOCK_Q, HALF_K], gl.float32, layout=layout)
        lse_rows = lse_ptr + batch * HEADS * NUM_Q + query_block * BLOCK_Q + rows
        for head in range(HEADS):
            following = gl.minimum(head + 1, HEADS - 1)  # past the last head: a copy of nothing new
            slot = head % 2
            lse = gl.load(lse_rows + head * NUM_Q)
            wait_for_copies(0)  # q(head), k(head, 0); every warp is done with k slot 1 and q slot 1 - slot
            _copy_keys(kn_ptr, key_row, head, 1, k_nope.index(1), HEADS, NOPE, num_warps)
            _copy_queries(qn_ptr, qr_ptr, q_row, following, q_nope.index(1 - slot), q_rope.index(1 - slot), HEADS,
                          NOPE, ROPE, num_warps)
            total_0, logits = _add_head(q_nope.index(slot), q_rope.index(slot), k_nope.index(0), k_rope.index(0),
                                        lse, total_0, logits, SCALE_LOG2)
            wait_for_copies(1)  # k(head, 1) (q(head + 1) may be in flight); every warp is done with k slot 0
            _copy_keys(kn_ptr, key_row, following, 0, k_nope.index(0), HEADS, NOPE, num_warps)
            total_1, logits = _add_head(q_nope.index(slot), q_rope.index(slot), k_nope.index(1), k_rope.index(1),
                                        lse, total_1, logits, SCALE_LOG2)
        async_copy.wait_group(0)

    queries = query_block * BLOCK_Q + rows
    _store_half(out_ptr, total_0, positions, queries, batch, first_key, 0, OUT_Q, NUM_KEYS, HEADS)
    _store_half(out_ptr, total_1, positions, queries, batch, first_key, 1, OUT_Q, NUM_KEYS, HEADS)


def padded_widths(nope: int, rope: int) -> tuple[int, int]:
    """(N_p, P_p): powers of two of at least 16 (zero columns change no dot)."""
    return dot_size(nope), dot_size(rope)


def smem_bytes(nope_p: int, rope_p: int, itemsize: int = 2) -> int:
    """Shared memory of one program: two heads' q, one head's k_nope and the tile's k_rope."""
    return itemsize * (2 * BLOCK_Q.value * (nope_p + rope_p) + BLOCK_K * (nope_p + rope_p))


def unsupported_reason(dtype, nope: int, rope: int):
    """None when this kernel takes these inputs, else why not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"it takes bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    widths = padded_widths(nope, rope)
    if max(widths) > MAX_WIDTH:
        return f"it takes widths up to {MAX_WIDTH} (padded to powers of two), got nope {nope}, rope {rope}"
    if smem_bytes(*widths) > GLUON_SMEM_BYTES:
        return f"its tiles for widths {widths} need more than {GLUON_SMEM_BYTES} bytes of shared memory"
    return None


def kernel_constants(num_q: int, num_keys: int, heads: int, nope: int, rope: int, *, batch: int,
                     scale: float) -> tuple[dict, tuple[int, int, int]]:
    """The kernel's compile-time constants (sizes padded) and its grid (also used by the CPU compile test)."""
    nope_p, rope_p = padded_widths(nope, rope)
    num_q_p, keys_p = round_up(num_q, BLOCK_Q.value), round_up(num_keys, BLOCK_K)
    constants = dict(NUM_Q=num_q_p, OUT_Q=num_q, NUM_KEYS=num_keys, KEYS_P=keys_p, HEADS=heads, NOPE=nope_p,
                     ROPE=rope_p, SCALE_LOG2=scale * _LOG2_E)
    return constants, (num_q_p // BLOCK_Q.value, keys_p // BLOCK_K, batch)


def dense_distribution_gluon(q_nope, q_rope, k_nope, k_rope, q_positions, lse2, *, scale: float):
    """The head-averaged distribution f32[B,T,S], as `dense_attention_distribution_pallas` (inputs checked by the
    caller; `unsupported_reason` None); lse2 f32[B,H,T]: the lse in base 2, +inf where nothing is seen
    (`dense_attention._lse_for_kernels` without padding). Maps under vmap by folding into the batch."""
    (_, num_q, heads, nope), num_keys, rope = q_nope.shape, k_nope.shape[1], q_rope.shape[-1]

    def unmapped(q_nope, q_rope, k_nope, k_rope, q_positions, lse2):
        batch = q_nope.shape[0]
        constants, grid = kernel_constants(num_q, num_keys, heads, nope, rope, batch=batch, scale=scale)
        num_q_p, keys_p, nope_p, rope_p = (constants[k] for k in ("NUM_Q", "KEYS_P", "NOPE", "ROPE"))
        dtype = k_nope.dtype
        qn = pad_axis(pad_axis(q_nope.astype(dtype), 3, nope_p), 1, num_q_p)
        qr = pad_axis(pad_axis(q_rope.astype(dtype), 3, rope_p), 1, num_q_p)
        kn = pad_axis(pad_axis(k_nope, 3, nope_p), 1, keys_p)
        kr = pad_axis(pad_axis(k_rope.astype(dtype), 2, rope_p), 1, keys_p)
        positions = pad_axis(q_positions.astype(jnp.int32), 1, num_q_p, -1)
        lse = pad_axis(lse2.astype(jnp.float32), 2, num_q_p, jnp.inf)
        return gluon_call(qn, qr, kn, kr, positions, lse, kernel=_distribution_kernel,
                          out_shape=jax.ShapeDtypeStruct((batch, num_q, num_keys), jnp.float32), grid=grid,
                          num_warps=NUM_WARPS, **constants)

    return vmap_by_folding_into_batch(unmapped)(q_nope, q_rope, k_nope, k_rope, q_positions, lse2)
