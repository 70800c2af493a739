"""The top-k's candidates pass (`topk._candidates_kernel`) on Hopper, in Gluon: the same sample, floor and output.

Why not Pallas: the pass is a stream compaction (an exclusive prefix sum over each block of keys, then a scattered
store of the keys at or above the floor), and for a scattered store Triton's layout pass picks one element per
thread while the load and the scan keep four or eight: the Pallas kernel converted the slots, ids, keys and masks
between the two layouts through shared memory for every block of 1024 keys (ptxas on its sm_90 code: 373
instructions and 15 barriers per block, about 46 instructions per key; on an H100 it read 1.0-1.2 TB/s). Here one
layout holds 8 consecutive keys per thread from the load to the stores, the sample's floor is found by a one-bit
radix descent on the sample held in registers, and the next block's load is issued before this block is
compacted.

Same results as the Pallas kernel: the floor is the same sample key (the exact rank-th largest), the candidates are
the same keys in the same ascending order, and the count follows the same rule (`topk` module docstring). Gluon has
no interpreter: CPU tests compile it for sm_90 (`tests/test_topk_gluon.py`); its output is checked against the
Pallas kernel on the GPU.
Shapes as in `topk`: R rows, S_pad keys per row (a multiple of BLOCK), W candidate slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from pallas_kernels import topk
from pallas_kernels._gluon import gluon_call

NUM_WARPS = topk.GLUON_WARPS
INT_MIN = gl.constexpr(topk.INT_MIN)
LOWEST_VISIBLE = gl.constexpr(topk.LOWEST_VISIBLE)
FALLBACK = gl.constexpr(topk.FALLBACK)


@gluon.constexpr_function
def _keys_layout(size, num_warps):
    """[size] over num_warps warps, consecutive keys in each thread (16-byte loads, a thread-local scan first)."""
    return gl.BlockedLayout([max(1, size // (32 * num_warps))], [32], [num_warps], [0])


@gluon.jit
def _flip(bits):
    """Float bits <-> order-preserving int32 key (its own inverse: the sign bit is kept)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@gluon.jit
def _keys_of_visible(scores):
    """The key of each score that is neither -inf nor NaN (-0.0 as +0.0, so that they tie)."""
    return _flip(gl.where(scores == 0.0, 0.0, scores).to(gl.int32, bitcast=True))


@gluon.jit
def _sortable_keys(scores, visible):
    """`topk.sortable_keys` (f32 -> order-preserving int32; invisible, -inf and NaN -> INT_MIN)."""
    return gl.where(visible & (scores > float("-inf")), _keys_of_visible(scores), INT_MIN)


@gluon.jit
def _score_floor(floor):
    """The float f with score >= f exactly when key(score) >= floor, for a visible score and a floor that is a
    visible score's key or LOWEST_VISIBLE (then the largest finite negative float: -inf and NaN fail it)."""
    return gl.where(floor == LOWEST_VISIBLE, -3.4028234663852886e38, _flip(floor).to(gl.float32, bitcast=True))


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _kth_largest(keys, rank):
    """The rank-th largest of keys held in registers (INT_MIN when fewer than rank are visible): one bit per pass,
    most significant first, as `topk._kth_largest_resident`."""
    prefix = gl.to_tensor(INT_MIN)
    one = gl.to_tensor(1)
    for p in range(32):
        candidate = prefix + (one << (31 - p))  # int32 wrap-around is exact (see topk._kth_largest)
        count = gl.sum((keys >= candidate).to(gl.int32), 0)
        prefix = gl.where(count >= rank, candidate, prefix)
    return prefix


@gluon.jit
def _sample_rank(length, K: gl.constexpr, CAPACITY: gl.constexpr, SAMPLE: gl.constexpr,
                 MARGIN: gl.constexpr):
    """`topk._sample_rank`, the same arithmetic in the same order."""
    length = gl.maximum(length, 1)
    needed = (K * SAMPLE) / length.to(gl.float32)
    root = (MARGIN + gl.sqrt_rn(MARGIN * MARGIN + 4.0 * needed)) / 2.0
    with_margin = gl.ceil(root * root).to(gl.int32)
    half_buffer = (CAPACITY // 2 * SAMPLE + length - 1) // length
    return gl.minimum(gl.maximum(gl.minimum(with_margin, half_buffer), 1), SAMPLE)


@gluon.jit
def _candidates_kernel(length_ptr, scores_ptr, ids_ptr, keys_ptr, count_ptr, ROW: gl.constexpr,
                       WIDTH: gl.constexpr, K: gl.constexpr, KEEP_ALL: gl.constexpr, BLOCK: gl.constexpr,
                       SAMPLE: gl.constexpr, MARGIN: gl.constexpr, num_warps: gl.constexpr):
    # One program per row. length_ptr [R], scores_ptr [R, ROW], ids_ptr / keys_ptr [R, WIDTH] (slot WIDTH - 1 is
    # the spare, never written), count_ptr [R]. Rows of at most KEEP_ALL keys keep every visible key.
    r = gl.program_id(0)
    length = gl.load(length_ptr + r)
    row = scores_ptr + r.to(gl.int64) * ROW
    capacity: gl.constexpr = WIDTH - 1
    if length > KEEP_ALL:
        i = gl.arange(0, SAMPLE, layout=_keys_layout(SAMPLE, num_warps))
        at = i * (length // SAMPLE) + (i * (length % SAMPLE)) // SAMPLE  # no int32 overflow: see topk
        sample = _sortable_keys(gl.load(row + at), at < length)
        floor = gl.maximum(_kth_largest(sample, _sample_rank(length, K, capacity, SAMPLE, MARGIN)),
                           LOWEST_VISIBLE)
    else:
        floor = gl.to_tensor(LOWEST_VISIBLE)

    lanes = gl.arange(0, BLOCK, layout=_keys_layout(BLOCK, num_warps))
    out_ids = ids_ptr + r.to(gl.int64) * WIDTH
    out_keys = keys_ptr + r.to(gl.int64) * WIDTH
    num_blocks = gl.cdiv(length, BLOCK)
    last = gl.maximum(num_blocks - 1, 0)
    # Compared as floats: the keys are computed for the stores alone, without the visibility tests.
    score_floor = _score_floor(floor)
    written = gl.to_tensor(0)
    scores = gl.load(row + lanes)
    for j in range(num_blocks):
        ahead = gl.load(row + gl.minimum(j + 1, last) * BLOCK + lanes)  # in flight while this block is compacted
        ids = j * BLOCK + lanes
        take = ((scores >= score_floor) & (ids < length)).to(gl.int32)
        slots = written + gl.associative_scan(take, 0, _add) - take
        keep = (take == 1) & (slots < capacity)
        gl.store(out_ids + slots, ids, mask=keep)
        gl.store(out_keys + slots, _keys_of_visible(scores), mask=keep)
        written += gl.sum(take, 0)
        scores = ahead
    holds_top_k = (written <= capacity) & ((written >= K) | (floor == LOWEST_VISIBLE))
    gl.store(count_ptr + r, gl.where(holds_top_k, written, FALLBACK))


def candidates_gluon(rows, lengths, *, k: int, width: int, block: int, sample: int, margin: float):
    """rows f32[R, S_pad] (S_pad a multiple of block), lengths int32[R] -> (ids int32[R, W], keys int32[R, W],
    count int32[R]) as `topk._candidates_kernel` gives them (W = width)."""
    num_rows, row = rows.shape
    out_shape = [jax.ShapeDtypeStruct((num_rows, width), jnp.int32)] * 2 + [
        jax.ShapeDtypeStruct((num_rows,), jnp.int32)]
    return gluon_call(lengths, rows, kernel=_candidates_kernel, out_shape=out_shape, grid=(num_rows,),
                      num_warps=NUM_WARPS, **kernel_constants(row, k, width, block, sample, margin))


def kernel_constants(row: int, k: int, width: int, block: int, sample: int, margin: float) -> dict:
    """The kernel's compile-time constants (also used by the CPU compile test)."""
    return dict(ROW=row, WIDTH=width, K=k, KEEP_ALL=min(width - 1, 2 * k), BLOCK=block, SAMPLE=sample,
                MARGIN=float(margin))
