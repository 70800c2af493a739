"""Lightning-indexer scores on Hopper, in Gluon: one program walks the keys its queries see (or a split of them).

    I[b,t,s] = k_scale[b,s] * sum_g bf16(w[b,t,g]) * bf16(ReLU(q8[b,t,g,:] . k8[b,s,:]))   (head_sum="tensor", fp8)
    I[b,t,s] = k_scale[b,s] * sum_g w[b,t,g] * ReLU(q[b,t,g,:] . k[b,s,:])                 (head_sum="fp32")

for s <= pos[b,t], else -inf; k_scale = 1 for bf16/fp16 inputs (`indexer_reference.indexer_scores_reference`:
the fp8 indexer with fp8_head_sum "bf16" or "fp32", or 2-byte inputs).

Both head sums share the walk:
  - one program = one warpgroup = BLOCK_Q queries (BLOCK_Q * G_p = ROWS rows of q, in shared memory), walking their
    visible key blocks of 64 through a STAGES-deep cp.async ring;
  - logits [64 keys, ROWS] = k . q^T: one m64 n(ROWS) wgmma chain (k32 fp8, k16 bf16/fp16), fp32 accumulation;
  - where the query blocks alone cannot fill the GPU (decode, short chunks), each row is walked in key splits, one
    program each (`key_splits`), and decode takes one query per program, not a padded pair: on an H100 1.3-1.8x
    the Pallas kernel's per-tile programs, decode reading the keys at 2.5-2.8 TB/s (BENCHMARKS session 32).

head_sum="tensor" (fp8, the fp8 indexer's default): the Pallas kernel (`indexer._scores_rows_kernel`) sums
ReLU(logit) * w over the 64 heads on the CUDA cores, one FMNMX and one FFMA per (key, head): 128 of the ~245
instructions a warp issues per block of 64 keys x 2 queries, against ~256 cycles of fp8 tensor-core work. Issue-
and latency-bound at once, it stayed at 850-930 TFLOP/s (docs/BENCHMARKS.md, session 19). The weighted sum over
heads is a matrix product, so it goes to the tensor cores instead:
  - one `cvt.rn.relu.bf16x2.f32` per two logits gives p = bf16(ReLU(logits)), which stays in registers as the A
    operand of a second wgmma, p [64, ROWS] . W [ROWS, 8], where W is block-diagonal (column j holds query j's
    bf16 head weights, zeros elsewhere): column j of the [64, 8] result is query j's head sum, in fp32;
  - ReLU + rounding is a quarter of an instruction per (key, head) instead of two, and the loop is ~150
    instructions per warp per block; 124 registers, so four programs share an SM and overlap each other's waits.

head_sum="fp32" (bf16/fp16 inputs, and fp8 with fp8_head_sum="fp32"): ReLU(logits) * w summed over each query's
heads on the CUDA cores (`_fp32_head_sum`), the Pallas kernel's arithmetic. For bf16 the logits dot takes twice
the fp8 one's tensor-core time, which covers the epilogue's ~300 instructions per warp per block; both kernels
then run at the H100's power cap (bf16 549-555 TFLOP/s against Pallas's 537-550; fp8 886-893 against 830-842,
docs/BENCHMARKS.md, session 32). It exists so that Hopper's indexer does not depend on Pallas's Triton
backend, which jax 0.11 deprecates.

Numerics ("tensor"): products of e4m3 values are exact in fp32, but Hopper's fp8 tensor cores accumulate a k32
chain in a narrower accumulator (as `_triton_ops.fp8_dot_nt`, ~1e-4 relative); then the logits and the weights are
rounded to bf16 (2^-9 relative each) and summed exactly in fp32. On random DeepSeek-V3.2-shaped inputs this
selected the same top-2048 keys as the fp32 head sum as often (recall against unquantised scores 0.9725 both,
BENCHMARKS session 22): fp8's own rounding (2^-4 per input) dominates.

Gluon has no interpreter: the CPU tests compile this kernel for sm_90 (no spills, the wgmma shapes, registers and
shared memory for the programs per SM it was measured with) and check `indexer.py`'s Pallas kernel, which computes
the same arithmetic, in interpret mode; this kernel's scores are checked against the reference on the GPU
(`tests/test_indexer_gluon.py`). Shapes: B batch, T queries, S keys, G indexer heads (G_p padded), I head width
(I_p padded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from pallas_kernels._gluon import gluon_call
from pallas_kernels._gluon_hopper import operand_buffer, wait_for_copies, wgmma_layout
from pallas_kernels._pallas import PROGRAMS_TO_FILL_GPU, dot_size, next_pow2, pad_axis, round_up
from pallas_kernels.indexer import GLUON_SCORES_DTYPES
from pallas_kernels.sparse_attention import GLUON_SMEM_BYTES

BLOCK_K = gl.constexpr(64)  # keys per step: the logits dot's M
SUM_N = gl.constexpr(8)  # columns of the head-sum dot (wgmma's smallest N); column j < BLOCK_Q is query j
NUM_WARPS = 4  # one warpgroup
STAGES = 4  # key blocks in flight, at most; fp8 3 measured 1042-1070 TFLOP/s against 4's 1088-1116 (H100, 4096
# queries); bf16 with the fp32 head sum 2 / 3 / 4: 528-531 / 543-544 / 549-555
MAX_HEADS = 256  # ROWS is the logits dot's N: at most 256
MAX_WIDTH = 256  # keeps the query tile and the ring within shared memory
MIN_SPLIT_BLOCKS = 4  # key blocks a split walks at least: its query tile is loaded once per split


@gluon.jit
def _copy_rows(src, dst, ROWS: gl.constexpr, WIDTH: gl.constexpr, num_warps: gl.constexpr):
    """Start the cp.async copy of ROWS contiguous rows of WIDTH elements at src into dst [ROWS, WIDTH], 16 bytes
    per thread."""
    VECTOR: gl.constexpr = 128 // src.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
    across: gl.constexpr = WIDTH // VECTOR if WIDTH // VECTOR < 32 else 32
    layout: gl.constexpr = gl.BlockedLayout([1, VECTOR], [32 // across, across], [num_warps, 1], [1, 0])
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
    """The tensor-core head sum's B operand, [N, ROWS] bf16 in shared memory (K-major): row j holds query j's
    weights in columns [j * HEADS, (j + 1) * HEADS), zeros elsewhere."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
    column = gl.arange(0, N, layout=gl.SliceLayout(1, layout))[:, None]
    row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, layout))[None, :]
    mine = (row // HEADS) == column
    weights = gl.load(w_ptr + first_query * HEADS + row + 0 * column, mask=mine, other=0.0)
    tile = operand_buffer(gl.bfloat16, [N, ROWS])
    tile.store(weights.to(gl.bfloat16))
    return tile


@gluon.jit
def _fp32_head_sum(logits, weights, BLOCK_Q: gl.constexpr, HEADS: gl.constexpr):
    """[BLOCK_K, BLOCK_Q] = sum over each query's HEADS columns of ReLU(logits) * weights, in fp32 on the CUDA
    cores: one FMNMX and one FFMA per logit, then shuffles across the four lanes that share a row."""
    weighted = gl.maximum(logits, 0.0) * weights[None, :]
    return gl.sum(gl.reshape(weighted, [logits.shape[0], BLOCK_Q, HEADS]), axis=2)


@gluon.jit
def _scores_kernel(q_ptr, w_ptr, k_ptr, k_scale_ptr, pos_ptr, out_ptr, NUM_Q: gl.constexpr,
                   NUM_KEYS: gl.constexpr, HEADS: gl.constexpr, DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                   STAGES: gl.constexpr, TENSOR_HEAD_SUM: gl.constexpr, FILL_HIDDEN: gl.constexpr,
                   SPLIT_BLOCKS: gl.constexpr, num_warps: gl.constexpr):
    # q_ptr [B, NUM_Q, HEADS, DIM], k_ptr [B, NUM_KEYS, DIM] (fp8 e4m3, bf16 or fp16), w_ptr [B, NUM_Q, HEADS] f32
    # (fp8: w * q_scale), k_scale_ptr [B, NUM_KEYS] f32 (fp8 only), pos_ptr [B, NUM_Q] i32 (-1: a padded query),
    # out_ptr [B, NUM_Q, NUM_KEYS] f32. Grid (NUM_Q / BLOCK_Q, key splits, B), the latest query block first: a
    # causal row's cost grows with its position, and the longest programs should not start last. Split j walks the
    # key blocks [j * SPLIT_BLOCKS, (j + 1) * SPLIT_BLOCKS): one split (the whole row) in prefill; more where there
    # are too few query blocks to fill the GPU (decode).
    ROWS: gl.constexpr = BLOCK_Q * HEADS
    BLOCK: gl.constexpr = BLOCK_K
    N: gl.constexpr = SUM_N
    dtype: gl.constexpr = k_ptr.dtype.element_ty
    FP8: gl.constexpr = dtype.primitive_bitwidth == 8
    query_block = NUM_Q // BLOCK_Q - 1 - gl.program_id(0)
    batch = gl.program_id(2)
    first_block = gl.program_id(1) * SPLIT_BLOCKS
    first_query = batch * NUM_Q + query_block * BLOCK_Q  # row in [B * NUM_Q]
    logits_layout: gl.constexpr = wgmma_layout(ROWS, num_warps, 32 if FP8 else 16)
    if TENSOR_HEAD_SUM:
        sums_layout: gl.constexpr = wgmma_layout(N, num_warps)
    else:  # the layout _fp32_head_sum's reduction gives (this probe is traced for its type only)
        sums_layout: gl.constexpr = _fp32_head_sum(gl.zeros([BLOCK, ROWS], gl.float32, logits_layout),
                                                   gl.zeros([ROWS], gl.float32, gl.SliceLayout(0, logits_layout)),
                                                   BLOCK_Q, HEADS).type.layout
    p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=sums_layout, k_width=2)

    q_tile = operand_buffer(dtype, [ROWS, DIM])
    key_ring = operand_buffer(dtype, [STAGES, BLOCK, DIM])
    _copy_rows(q_ptr + first_query.to(gl.int64) * HEADS * DIM, q_tile, ROWS, DIM, num_warps)
    async_copy.commit_group()
    total_blocks: gl.constexpr = NUM_KEYS // BLOCK
    positions = gl.load(pos_ptr + first_query + gl.arange(0, BLOCK_Q, layout=gl.BlockedLayout([1], [32],
                                                                                              [num_warps], [0])))
    visible_blocks = gl.minimum((gl.max(positions, axis=0) + BLOCK) // BLOCK, total_blocks)  # 0: padded queries
    end_block = gl.minimum(first_block + SPLIT_BLOCKS, total_blocks)
    walked_end = gl.minimum(visible_blocks, end_block)
    keys_base = k_ptr + batch.to(gl.int64) * NUM_KEYS * DIM
    for stage in gl.static_range(STAGES - 1):
        _copy_rows(keys_base + gl.minimum(first_block + stage, total_blocks - 1) * BLOCK * DIM, key_ring.index(stage),
                   BLOCK, DIM, num_warps)
        async_copy.commit_group()

    if TENSOR_HEAD_SUM:
        weights = _weight_tile(w_ptr, first_query, HEADS, ROWS, N, num_warps)
    else:
        weights = gl.load(w_ptr + first_query * HEADS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, logits_layout)))
    columns = gl.arange(0, N if TENSOR_HEAD_SUM else BLOCK_Q, layout=gl.SliceLayout(0, sums_layout))
    key_offsets = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, sums_layout))
    column_positions = gl.load(pos_ptr + first_query + columns, mask=columns < BLOCK_Q, other=-1)
    stored = (columns < BLOCK_Q)[None, :] & (key_offsets >= 0)[:, None]
    out_base = out_ptr + first_query.to(gl.int64) * NUM_KEYS + columns[None, :] * NUM_KEYS
    # the query tile (the first copy group) and the weights are read by wgmma through the async proxy
    wait_for_copies(STAGES - 1)
    for block in range(first_block, walked_end):
        step = block - first_block
        wait_for_copies(STAGES - 2)  # this block's keys landed; every thread is done with the block before last
        logits = warpgroup_mma(key_ring.index(step % STAGES), q_tile.permute((1, 0)),
                               gl.zeros([BLOCK, ROWS], gl.float32, layout=logits_layout), use_acc=False,
                               is_async=True, max_num_imprecise_acc=DIM if FP8 else 0)
        # the ring slot of the block before last is free: fetch the block STAGES - 1 ahead into it
        ahead = step + STAGES - 1
        _copy_rows(keys_base + gl.minimum(first_block + ahead, total_blocks - 1) * BLOCK * DIM,
                   key_ring.index(ahead % STAGES), BLOCK, DIM, num_warps)
        async_copy.commit_group()
        key_ids = block * BLOCK + key_offsets
        logits = warpgroup_mma_wait(0, deps=[logits])
        if TENSOR_HEAD_SUM:
            p = gl.convert_layout(_relu_to_bf16(logits), p_operand)  # the same registers: no data moves
            scores = warpgroup_mma(p, weights.permute((1, 0)), gl.zeros([BLOCK, N], gl.float32, layout=sums_layout),
                                   use_acc=False)
        else:
            scores = _fp32_head_sum(logits, weights, BLOCK_Q, HEADS)
        if FP8:
            scores = scores * gl.load(k_scale_ptr + batch * NUM_KEYS + key_ids)[:, None]
        visible = key_ids[:, None] <= column_positions[None, :]
        gl.store(out_base + key_ids[:, None], gl.where(visible, scores, float("-inf")), mask=stored)
    async_copy.wait_group(0)
    if FILL_HIDDEN:
        for block in range(gl.maximum(walked_end, first_block), end_block):
            gl.store(out_base + (block * BLOCK + key_offsets)[:, None],
                     gl.full([BLOCK, columns.shape[0]], float("-inf"), gl.float32, sums_layout), mask=stored)


HEAD_SUMS = ("tensor", "fp32")


def padded_sizes(heads: int, width: int, itemsize: int, head_sum: str, num_q: int) -> tuple[int, int, int]:
    """(G_p, I_p, BLOCK_Q) for G heads of width I of `itemsize`-byte inputs and num_q queries: G_p a power of two
    >= 16, I_p one at least a wgmma's k (32 fp8, 16 bf16); BLOCK_Q queries per program so that the logits dot's N
    (ROWS) is 128 where G_p allows, with "tensor" at most two (as measured; the head-sum dot's 8 columns would hold
    8), and no more than num_q needs (decode: one)."""
    heads_p, width_p = dot_size(heads), max(32 // itemsize, dot_size(width))
    most = 2 if head_sum == "tensor" else 8
    return heads_p, width_p, max(1, min(most, 128 // heads_p, next_pow2(num_q)))


def key_splits(programs: int, key_blocks: int) -> tuple[int, int]:
    """(splits, blocks per split): each of `programs` (query blocks x batch) walks its row in as many splits as
    bring the grid to 2 x PROGRAMS_TO_FILL_GPU programs, each at least MIN_SPLIT_BLOCKS key blocks long; one split
    where the query blocks alone fill the GPU (prefill)."""
    wanted = max(1, min(-(-2 * PROGRAMS_TO_FILL_GPU // programs), key_blocks // MIN_SPLIT_BLOCKS))
    split_blocks = -(-key_blocks // wanted)
    return -(-key_blocks // split_blocks), split_blocks


def unsupported_reason(heads: int, width: int):
    """None when this kernel takes G heads of width I, else why not (its dtypes: GLUON_SCORES_DTYPES)."""
    heads_p, width_p = dot_size(heads), dot_size(width)
    if heads_p > MAX_HEADS or width_p > MAX_WIDTH:
        return (f"it takes at most {MAX_HEADS} heads of width at most {MAX_WIDTH} (padded to powers of two), got "
                f"{heads} heads of width {width}")
    return None


def ring_stages(rows: int, width_p: int, itemsize: int, head_sum: str) -> int:
    """Key blocks in flight: STAGES where shared memory holds them beside the query tile (and the head-sum
    weights), fewer for the widest 2-byte tiles (3 at 256 heads of 256 bf16)."""
    fixed = rows * width_p * itemsize + (SUM_N.value * rows * 2 if head_sum == "tensor" else 0)
    return min(STAGES, (GLUON_SMEM_BYTES - fixed) // (BLOCK_K.value * width_p * itemsize))


def kernel_constants(num_q: int, num_keys: int, heads: int, width: int, *, batch: int, itemsize: int,
                     head_sum: str, fill_hidden: bool) -> tuple[dict, tuple[int, int, int]]:
    """The kernel's compile-time constants (sizes padded here) and its grid, for num_q queries and num_keys keys
    per batch row (also used by the CPU compile test)."""
    heads_p, width_p, block_q = padded_sizes(heads, width, itemsize, head_sum, num_q)
    num_q_p, num_keys_p = round_up(num_q, block_q), round_up(num_keys, BLOCK_K.value)
    splits, split_blocks = key_splits(batch * num_q_p // block_q, num_keys_p // BLOCK_K.value)
    constants = dict(NUM_Q=num_q_p, NUM_KEYS=num_keys_p, HEADS=heads_p, DIM=width_p, BLOCK_Q=block_q,
                     STAGES=ring_stages(block_q * heads_p, width_p, itemsize, head_sum),
                     TENSOR_HEAD_SUM=head_sum == "tensor", FILL_HIDDEN=fill_hidden, SPLIT_BLOCKS=split_blocks)
    return constants, (num_q_p // block_q, splits, batch)


def scores_gluon(q, w, k, q_positions, k_scale=None, *, head_sum: str, fill_hidden: bool = True):
    """q [B,T,G,I], w [B,T,G] (fp8: w * q_scale), k [B,S,I], q_positions int[B,T], k_scale f32[B,S] (fp8 only) ->
    scores f32[B,T,S] (-inf where s > pos). q and k float8_e4m3fn with k_scale, or bf16/fp16 without; head_sum
    "tensor" (fp8 only) or "fp32" (module docstring). fill_hidden=False leaves the key blocks wholly past a
    program's last position unwritten, as `indexer.indexer_scores_pallas`."""
    if head_sum not in HEAD_SUMS:
        raise ValueError(f"head_sum must be one of {list(HEAD_SUMS)}, got {head_sum!r}")
    fp8 = k_scale is not None
    if q.dtype not in GLUON_SCORES_DTYPES:
        raise ValueError(f"q must be float8_e4m3fn, bfloat16 or float16, got {q.dtype}")
    if (q.dtype == jnp.float8_e4m3fn) != fp8 or (head_sum == "tensor" and not fp8):
        raise ValueError(f"fp8 inputs take k_scale and either head sum, 2-byte inputs neither: got q {q.dtype}, "
                         f"k_scale {'given' if fp8 else 'None'}, head_sum={head_sum!r}")
    batch, num_q, heads, width = q.shape
    num_keys = k.shape[1]
    constants, grid = kernel_constants(num_q, num_keys, heads, width, batch=batch, itemsize=q.dtype.itemsize,
                                       head_sum=head_sum, fill_hidden=fill_hidden)
    heads_p, width_p, num_q_p, num_keys_p = (constants[c] for c in ("HEADS", "DIM", "NUM_Q", "NUM_KEYS"))
    # zero heads (w = 0) and zero dims change nothing; padded queries sit at position -1 and see no key
    q = pad_axis(pad_axis(pad_axis(q, 3, width_p), 2, heads_p), 1, num_q_p)
    w = pad_axis(pad_axis(w.astype(jnp.float32), 2, heads_p), 1, num_q_p)
    positions = pad_axis(q_positions.astype(jnp.int32), 1, num_q_p, -1)
    k = pad_axis(pad_axis(k.astype(q.dtype), 2, width_p), 1, num_keys_p)
    # 2-byte inputs: a stand-in the kernel never reads
    k_scale = pad_axis(k_scale.astype(jnp.float32), 1, num_keys_p) if fp8 else jnp.zeros((batch,), jnp.float32)
    out = gluon_call(q, w, k, k_scale, positions, kernel=_scores_kernel,
                     out_shape=jax.ShapeDtypeStruct((batch, num_q_p, num_keys_p), jnp.float32),
                     grid=grid, num_warps=NUM_WARPS, **constants)
    return out[:, :num_q, :num_keys]
