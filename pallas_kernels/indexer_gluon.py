"""fp8 lightning-indexer scores on Hopper, in Gluon, with the head sum on the tensor cores.

    I[b,t,s] = k_scale[b,s] * sum_g bf16(w[b,t,g]) * bf16(ReLU(q8[b,t,g,:] . k8[b,s,:]))   for s <= pos[b,t], else -inf

(the fp8 indexer's arithmetic, `indexer_reference.indexer_scores_reference` with head_sum="bf16").

Why: the Pallas kernel (`indexer._scores_rows_kernel`) sums ReLU(logit) * w over the 64 heads on the CUDA cores,
one FMNMX and one FFMA per (key, head): 128 of the ~245 instructions a warp issues per block of 64 keys x 2
queries, against ~256 cycles of fp8 tensor-core work. Issue-bound and latency-bound at once, it stayed at
850-930 TFLOP/s (docs/BENCHMARKS.md, session 19), and an fp32 head sum written here in Gluon was no faster. The
weighted sum over heads is a matrix product, so it goes to the tensor cores instead:

  - one program = one warpgroup = BLOCK_Q queries (BLOCK_Q * G_p = ROWS rows of q, in shared memory), walking their
    visible key blocks of 64 through a STAGES-deep cp.async ring;
  - logits [64 keys, ROWS] = k8 . q8^T: one m64 n(ROWS) k32 fp8 wgmma chain, fp32 accumulation;
  - one `cvt.rn.relu.bf16x2.f32` per two logits gives p = bf16(ReLU(logits)), which stays in registers as the A
    operand of a second wgmma, p [64, ROWS] . W [ROWS, 8], where W is block-diagonal (column j holds query j's
    bf16 head weights, zeros elsewhere): column j of the [64, 8] result is query j's head sum, in fp32;
  - ReLU + rounding is a quarter of an instruction per (key, head) instead of two, and the loop is ~150
    instructions per warp per block; 124 registers, so four programs share an SM and overlap each other's waits.

Numerics: products of e4m3 values are exact in fp32, but Hopper's fp8 tensor cores accumulate a k32 chain in a
narrower accumulator (as `_triton_ops.fp8_dot_nt`, ~1e-4 relative); then the logits and the weights are rounded to
bf16 (2^-9 relative each) and summed exactly in fp32. On random DeepSeek-V3.2-shaped inputs this selected the same
top-2048 keys as the fp32 head sum as often (recall against unquantised scores 0.9725 both, BENCHMARKS
session 22): fp8's own rounding (2^-4 per input) dominates.

Gluon has no interpreter: the CPU tests compile this kernel for sm_90 (no spills, the wgmma shapes, registers for
four programs per SM) and check `indexer.py`'s Pallas kernel, which computes the same arithmetic, in interpret
mode; this kernel's scores are checked against the reference on the GPU (`tests/test_indexer_gluon.py`).
Shapes: B batch, T queries, S keys, G indexer heads (G_p padded), I head width (I_p padded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from pallas_kernels._gluon import gluon_call
from pallas_kernels._pallas import dot_size, pad_axis, round_up

BLOCK_K = gl.constexpr(64)  # keys per step: the logits dot's M
SUM_N = gl.constexpr(8)  # columns of the head-sum dot (wgmma's smallest N); column j < BLOCK_Q is query j
NUM_WARPS = 4  # one warpgroup
STAGES = 4  # key blocks in flight; 3 measured 1042-1070 TFLOP/s against 4's 1088-1116 (H100, 4096 queries)
MAX_HEADS = 256  # ROWS is the logits dot's N: at most 256
MAX_WIDTH = 256  # keeps the query tile and the ring within shared memory


@gluon.jit
def _copy_rows(src, dst, ROWS: gl.constexpr, WIDTH: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copy of ROWS contiguous rows of WIDTH bytes at src into dst [ROWS, WIDTH], 16 bytes per
    thread."""
    across: gl.constexpr = WIDTH // 16 if WIDTH // 16 < 32 else 32
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 // across, across], [num_warps, 1], [1, 0])
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    columns = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    async_copy.async_copy_global_to_shared(dst, src + rows[:, None] * WIDTH + columns[None, :])


@gluon.jit
def _relu_to_bf16(x):
    """bf16(ReLU(x)): one instruction per two values (Triton's max-then-convert would take three)."""
    return gl.inline_asm_elementwise("cvt.rn.relu.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.bfloat16,
                                     is_pure=True, pack=2)


@gluon.jit
def _weight_tile(w_ptr, first_query, HEADS: gl.constexpr, ROWS: gl.constexpr, N: gl.constexpr,
                 num_warps: gl.constexpr):
    """The head-sum dot's B operand, [N, ROWS] bf16 in shared memory (K-major): row j holds query j's weights in
    columns [j * HEADS, (j + 1) * HEADS), zeros elsewhere."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
    column = gl.arange(0, N, layout=gl.SliceLayout(1, layout))[:, None]
    row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, layout))[None, :]
    mine = (row // HEADS) == column
    weights = gl.load(w_ptr + first_query * HEADS + row + 0 * column, mask=mine, other=0.0)
    tile = gl.allocate_shared_memory(gl.bfloat16, [N, ROWS], gl.NVMMASharedLayout.get_default_for([N, ROWS],
                                                                                                  gl.bfloat16))
    tile.store(weights.to(gl.bfloat16))
    return tile


@gluon.jit
def _fp8_scores_kernel(q_ptr, w_ptr, k_ptr, k_scale_ptr, pos_ptr, out_ptr, NUM_Q: gl.constexpr,
                       NUM_KEYS: gl.constexpr, HEADS: gl.constexpr, DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                       STAGES: gl.constexpr, FILL_HIDDEN: gl.constexpr, num_warps: gl.constexpr):
    # q_ptr [B, NUM_Q, HEADS, DIM] fp8, w_ptr [B, NUM_Q, HEADS] f32 (w * q_scale), k_ptr [B, NUM_KEYS, DIM] fp8,
    # k_scale_ptr [B, NUM_KEYS] f32, pos_ptr [B, NUM_Q] i32 (-1: a padded query), out_ptr [B, NUM_Q, NUM_KEYS] f32.
    # Grid (NUM_Q / BLOCK_Q, B), the latest query block first: a causal row's cost grows with its position, and
    # the longest programs should not start last.
    ROWS: gl.constexpr = BLOCK_Q * HEADS
    BLOCK: gl.constexpr = BLOCK_K
    N: gl.constexpr = SUM_N
    query_block = NUM_Q // BLOCK_Q - 1 - gl.program_id(0)
    batch = gl.program_id(1)
    first_query = batch * NUM_Q + query_block * BLOCK_Q  # row in [B * NUM_Q]
    logits_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, ROWS, 32])
    sums_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                          instr_shape=[16, N, 16])
    p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=sums_layout, k_width=2)
    dtype: gl.constexpr = k_ptr.dtype.element_ty

    q_tile = gl.allocate_shared_memory(dtype, [ROWS, DIM], gl.NVMMASharedLayout.get_default_for([ROWS, DIM], dtype))
    key_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, DIM],
                                         gl.NVMMASharedLayout.get_default_for([BLOCK, DIM], dtype))
    _copy_rows(q_ptr + first_query.to(gl.int64) * HEADS * DIM, q_tile, ROWS, DIM, num_warps)
    async_copy.commit_group()
    total_blocks: gl.constexpr = NUM_KEYS // BLOCK
    positions = gl.load(pos_ptr + first_query + gl.arange(0, BLOCK_Q, layout=gl.BlockedLayout([1], [32],
                                                                                              [num_warps], [0])))
    visible_blocks = gl.minimum((gl.max(positions, axis=0) + BLOCK) // BLOCK, total_blocks)  # 0: padded queries
    keys_base = k_ptr + batch.to(gl.int64) * NUM_KEYS * DIM
    for stage in gl.static_range(STAGES - 1):
        _copy_rows(keys_base + gl.minimum(stage, total_blocks - 1) * BLOCK * DIM, key_ring.index(stage), BLOCK, DIM,
                   num_warps)
        async_copy.commit_group()

    weights = _weight_tile(w_ptr, first_query, HEADS, ROWS, N, num_warps)
    columns = gl.arange(0, N, layout=gl.SliceLayout(0, sums_layout))
    key_offsets = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, sums_layout))
    column_positions = gl.load(pos_ptr + first_query + columns, mask=columns < BLOCK_Q, other=-1)
    stored = (columns < BLOCK_Q)[None, :] & (key_offsets >= 0)[:, None]
    out_base = out_ptr + first_query.to(gl.int64) * NUM_KEYS + columns[None, :] * NUM_KEYS
    # the query tile (the first copy group) and the weights are read by wgmma through the async proxy
    async_copy.wait_group(STAGES - 1)
    gl.thread_barrier()
    fence_async_shared()
    for block in range(visible_blocks):
        async_copy.wait_group(STAGES - 2)  # this block's keys have landed (for this thread's copies) ...
        gl.thread_barrier()  # ... and every thread's; every thread is also done with the block before last
        fence_async_shared()
        logits = warpgroup_mma(key_ring.index(block % STAGES), q_tile.permute((1, 0)),
                               gl.zeros([BLOCK, ROWS], gl.float32, layout=logits_layout), use_acc=False,
                               is_async=True, max_num_imprecise_acc=DIM)
        # the ring slot of the block before last is free: fetch the block STAGES - 1 ahead into it
        ahead = block + STAGES - 1
        _copy_rows(keys_base + gl.minimum(ahead, total_blocks - 1) * BLOCK * DIM, key_ring.index(ahead % STAGES),
                   BLOCK, DIM, num_warps)
        async_copy.commit_group()
        key_ids = block * BLOCK + key_offsets
        key_scales = gl.load(k_scale_ptr + batch * NUM_KEYS + key_ids)
        logits = warpgroup_mma_wait(0, deps=[logits])
        p = gl.convert_layout(_relu_to_bf16(logits), p_operand)  # the same registers: no data moves
        sums = warpgroup_mma(p, weights.permute((1, 0)), gl.zeros([BLOCK, N], gl.float32, layout=sums_layout),
                             use_acc=False)
        scores = sums * key_scales[:, None]
        visible = key_ids[:, None] <= column_positions[None, :]
        gl.store(out_base + key_ids[:, None], gl.where(visible, scores, float("-inf")), mask=stored)
    async_copy.wait_group(0)
    if FILL_HIDDEN:
        for block in range(visible_blocks, total_blocks):
            gl.store(out_base + (block * BLOCK + key_offsets)[:, None],
                     gl.full([BLOCK, N], float("-inf"), gl.float32, sums_layout), mask=stored)


def padded_sizes(heads: int, width: int) -> tuple[int, int, int]:
    """(G_p, I_p, BLOCK_Q) for G heads of width I: G_p a power of two >= 16, I_p one >= 32 (an fp8 wgmma's k),
    two queries per program while that keeps the logits dot's N at most 128."""
    heads_p, width_p = dot_size(heads), max(32, dot_size(width))
    return heads_p, width_p, 2 if heads_p <= 64 else 1


def unsupported_reason(heads: int, width: int):
    """None when this kernel takes G heads of width I, else why not."""
    heads_p, width_p, _ = padded_sizes(heads, width)
    if heads_p > MAX_HEADS or width_p > MAX_WIDTH:
        return (f"it takes at most {MAX_HEADS} heads of width at most {MAX_WIDTH} (padded to powers of two), got "
                f"{heads} heads of width {width}")
    return None


def kernel_constants(num_q_p: int, num_keys_p: int, heads: int, width: int, fill_hidden: bool) -> dict:
    """The kernel's compile-time constants for padded sizes (also used by the CPU compile test)."""
    heads_p, width_p, block_q = padded_sizes(heads, width)
    return dict(NUM_Q=num_q_p, NUM_KEYS=num_keys_p, HEADS=heads_p, DIM=width_p, BLOCK_Q=block_q, STAGES=STAGES,
                FILL_HIDDEN=fill_hidden)


def fp8_scores_gluon(q, w, k, q_positions, k_scale, *, fill_hidden: bool = True):
    """q [B,T,G,I] and k [B,S,I] float8_e4m3fn, w [B,T,G] (w * q_scale), q_positions int[B,T], k_scale f32[B,S] ->
    scores f32[B,T,S] (-inf where s > pos), with the bf16 head sum (module docstring). fill_hidden=False leaves
    the key blocks wholly past a query pair's last position unwritten, as `indexer.indexer_scores_pallas`."""
    batch, num_q, heads, width = q.shape
    num_keys = k.shape[1]
    heads_p, width_p, block_q = padded_sizes(heads, width)
    num_q_p, num_keys_p = round_up(num_q, block_q), round_up(num_keys, BLOCK_K.value)
    # zero heads (w = 0) and zero dims change nothing; padded queries sit at position -1 and see no key
    q = pad_axis(pad_axis(pad_axis(q, 3, width_p), 2, heads_p), 1, num_q_p)
    w = pad_axis(pad_axis(w.astype(jnp.float32), 2, heads_p), 1, num_q_p)
    positions = pad_axis(q_positions.astype(jnp.int32), 1, num_q_p, -1)
    k = pad_axis(pad_axis(k, 2, width_p), 1, num_keys_p)
    k_scale = pad_axis(k_scale.astype(jnp.float32), 1, num_keys_p)
    out = gluon_call(q, w, k, k_scale, positions, kernel=_fp8_scores_kernel,
                     out_shape=jax.ShapeDtypeStruct((batch, num_q_p, num_keys_p), jnp.float32),
                     grid=(num_q_p // block_q, batch), num_warps=NUM_WARPS,
                     **kernel_constants(num_q_p, num_keys_p, heads, width, fill_hidden))
    return out[:, :num_q, :num_keys]
