"""The top-k's two passes on Hopper, in Gluon: candidates (`topk._candidates_kernel`) and select
(`topk._select_kernel`), with the same results as the Pallas kernels.

Why not Pallas: the pass is a stream compaction (an exclusive prefix sum over each block of keys, then a scattered
store of the keys at or above the floor), and for a scattered store Triton's layout pass picks one element per
thread while the load and the scan keep four or eight: the Pallas kernel converted the slots, ids, keys and masks
between the two layouts through shared memory for every block of 1024 keys (ptxas on its sm_90 code: 373
instructions and 15 barriers per block, about 46 instructions per key; on an H100 it read 1.0-1.2 TB/s). Here one
layout holds 8 consecutive keys per thread from the load to the stores, the sample's floor is found by a one-bit
radix descent on the sample held in registers, and the next block's load is issued before this block is
compacted.

Same results as the Pallas kernel: the floor is the same sample key (the exact rank-th largest), the candidates are
the same keys in the same ascending order, and the count follows the same rule (`topk` module docstring).

The select (`_select_kernel`, one program per row) finds the k-th largest candidate key with the candidates held
in registers (one bit per pass, as `topk._kth_largest_resident`; the first W/2 slots alone when they hold every
candidate), or, for buffers past RESIDENT_SLOTS and for the rows the candidates pass gave up on (FALLBACK), by a
radix descent that streams the keys (2-bit digits, as `topk._kth_largest`). It then writes the ids of the keys
above it and, in ascending id order, of as many keys equal to it as make k (the lower id wins a tie), then -1: the
Pallas select's output, bit for bit. Why Gluon: the Pallas kernels run on Pallas's Triton backend, which jax 0.11
deprecates; this kernel is as fast (docs/BENCHMARKS.md, session 31).

Gluon has no interpreter: CPU tests compile both kernels for sm_90 (`tests/test_topk_gluon.py`); their outputs are
checked against the Pallas kernels on the GPU.
Shapes as in `topk`: R rows, S_pad keys per row (a multiple of BLOCK), W candidate slots, K_pad output slots.
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


@gluon.jit
def _keys_block(ids_src, keys_src, n, j, FROM_ROW: gl.constexpr, WITH_IDS: gl.constexpr, BLOCK: gl.constexpr,
                num_warps: gl.constexpr):
    """Block j of the keys a row selects from, (ids, keys): its candidates (slots < n, ids ascending: ids_src,
    keys_src) or, FROM_ROW, its scores (keys_src; ids < n = the row's length are visible). Past n, keys are
    INT_MIN. WITH_IDS=False skips the candidates' id load (ids are then the slots)."""
    at = j * BLOCK + gl.arange(0, BLOCK, layout=_keys_layout(BLOCK, num_warps))
    inside = at < n
    if FROM_ROW:
        ids = at
        keys = _sortable_keys(gl.load(keys_src + at, mask=inside, other=float("-inf")), inside)
    else:
        keys = gl.load(keys_src + at, mask=inside, other=INT_MIN)
        if WITH_IDS:
            ids = gl.load(ids_src + at, mask=inside, other=0)
        else:
            ids = at
    return ids, keys


@gluon.jit
def _kth_largest_streamed(keys_src, n, rank, FROM_ROW: gl.constexpr, BLOCK: gl.constexpr,
                          num_warps: gl.constexpr):
    """(threshold, above): the rank-th largest of the n keys (INT_MIN when fewer than rank are visible) and how
    many are larger, by `topk._kth_largest`'s descent: 2 bits per pass, each pass counting the keys at or above
    the 3 candidate values of the next digit."""
    layout: gl.constexpr = _keys_layout(BLOCK, num_warps)
    num_blocks = gl.cdiv(n, BLOCK)
    prefix = gl.to_tensor(INT_MIN)
    one = gl.to_tensor(1)
    for p in range(16):
        shift = 30 - 2 * p
        step = one << shift  # prefix + d * step wraps around in int32 exactly (see topk._kth_largest)
        at_least_1 = gl.zeros([BLOCK], gl.int32, layout)
        at_least_2 = gl.zeros([BLOCK], gl.int32, layout)
        at_least_3 = gl.zeros([BLOCK], gl.int32, layout)
        for j in range(num_blocks):
            _, keys = _keys_block(keys_src, keys_src, n, j, FROM_ROW, False, BLOCK, num_warps)
            at_least_1 += (keys >= prefix + step).to(gl.int32)
            at_least_2 += (keys >= prefix + 2 * step).to(gl.int32)
            at_least_3 += (keys >= prefix + 3 * step).to(gl.int32)
        digit = ((gl.sum(at_least_1, 0) >= rank).to(gl.int32) + (gl.sum(at_least_2, 0) >= rank).to(gl.int32)
                 + (gl.sum(at_least_3, 0) >= rank).to(gl.int32))
        prefix = prefix + digit * step
    above = gl.zeros([BLOCK], gl.int32, layout)
    for j in range(num_blocks):
        _, keys = _keys_block(keys_src, keys_src, n, j, FROM_ROW, False, BLOCK, num_warps)
        above += (keys > prefix).to(gl.int32)
    return prefix, gl.sum(above, 0)


@gluon.jit
def _kth_largest_resident(keys_src, n, rank, SIZE: gl.constexpr, num_warps: gl.constexpr):
    """`_kth_largest_streamed` for at most SIZE candidates, loaded once into registers."""
    at = gl.arange(0, SIZE, layout=_keys_layout(SIZE, num_warps))
    keys = gl.load(keys_src + at, mask=at < n, other=INT_MIN)
    threshold = _kth_largest(keys, rank)
    return threshold, gl.sum((keys > threshold).to(gl.int32), 0)


@gluon.jit
def _write_selected(out_row, ids_src, keys_src, n, threshold, above, K: gl.constexpr, K_PAD: gl.constexpr,
                    FROM_ROW: gl.constexpr, BLOCK: gl.constexpr, num_warps: gl.constexpr):
    """out_row[0:K_PAD] = the ids of the keys > threshold and, in ascending id order, of the first K - above keys
    equal to it (none when threshold is INT_MIN: then every visible key is above it), then -1."""
    ties_wanted = gl.where(threshold == INT_MIN, 0, K - above)
    above_seen = gl.to_tensor(0)
    ties_seen = gl.to_tensor(0)
    for j in range(gl.cdiv(n, BLOCK)):
        ids, keys = _keys_block(ids_src, keys_src, n, j, FROM_ROW, True, BLOCK, num_warps)
        # One scan counts both kinds (ties in the high half-word: a block holds fewer than 2^16 keys). The ties
        # taken are the first ties_wanted, so a key's slot is the keys above before it plus min(ties before it,
        # ties_wanted).
        kinds = (keys > threshold).to(gl.int32) + ((keys == threshold).to(gl.int32) << 16)
        before = gl.associative_scan(kinds, 0, _add) - kinds
        above_before = above_seen + (before & 0xFFFF)
        ties_before = ties_seen + (before >> 16)
        take = (keys > threshold) | ((keys == threshold) & (ties_before < ties_wanted))
        gl.store(out_row + above_before + gl.minimum(ties_before, ties_wanted), ids, mask=take)
        counts = gl.sum(kinds, 0)
        above_seen += counts & 0xFFFF
        ties_seen += counts >> 16
    written = above_seen + gl.minimum(ties_seen, ties_wanted)
    fill: gl.constexpr = K_PAD if K_PAD < BLOCK else BLOCK
    lanes = gl.arange(0, fill, layout=_keys_layout(fill, num_warps))
    for j in gl.static_range(K_PAD // fill):
        slots = j * fill + lanes
        gl.store(out_row + slots, gl.full([fill], -1, gl.int32, lanes.type.layout), mask=slots >= written)


@gluon.jit
def _select_kernel(length_ptr, count_ptr, scores_ptr, ids_ptr, keys_ptr, out_ptr, ROW: gl.constexpr,
                   WIDTH: gl.constexpr, K: gl.constexpr, K_PAD: gl.constexpr, RESIDENT: gl.constexpr,
                   BLOCK: gl.constexpr, num_warps: gl.constexpr):
    # One program per row. length_ptr / count_ptr [R], scores_ptr [R, ROW] f32, ids_ptr / keys_ptr [R, WIDTH] (the
    # candidates pass's), out_ptr [R, K_PAD]. RESIDENT: hold the candidates in registers for the search.
    r = gl.program_id(0)
    count = gl.load(count_ptr + r)
    out_row = out_ptr + r.to(gl.int64) * K_PAD
    ids = ids_ptr + r.to(gl.int64) * WIDTH
    keys = keys_ptr + r.to(gl.int64) * WIDTH
    if count == FALLBACK:  # the candidates may miss part of the top-k: select from the whole row
        length = gl.load(length_ptr + r)
        row = scores_ptr + r.to(gl.int64) * ROW
        threshold, above = _kth_largest_streamed(row, length, K, True, BLOCK, num_warps)
        _write_selected(out_row, row, row, length, threshold, above, K, K_PAD, True, BLOCK, num_warps)
    else:
        if RESIDENT:
            if count <= WIDTH // 2:  # the first half holds every candidate: half the compares
                threshold, above = _kth_largest_resident(keys, count, K, WIDTH // 2, num_warps)
            else:
                threshold, above = _kth_largest_resident(keys, count, K, WIDTH, num_warps)
        else:
            threshold, above = _kth_largest_streamed(keys, count, K, False, BLOCK, num_warps)
        _write_selected(out_row, ids, keys, count, threshold, above, K, K_PAD, False, BLOCK, num_warps)


def select_gluon(lengths, count, rows, ids, keys, *, k: int, k_pad: int, resident: bool, block: int):
    """`topk._select_kernel`'s inputs -> out int32[R, k_pad] as it gives them (ids ascending, then -1): lengths and
    count int32[R], rows f32[R, S_pad] (S_pad a multiple of block), ids / keys int32[R, W]."""
    return gluon_call(lengths, count, rows, ids, keys, kernel=_select_kernel,
                      out_shape=jax.ShapeDtypeStruct((rows.shape[0], k_pad), jnp.int32), grid=(rows.shape[0],),
                      num_warps=NUM_WARPS, **select_constants(rows.shape[1], ids.shape[1], k, k_pad, resident, block))


def select_constants(row: int, width: int, k: int, k_pad: int, resident: bool, block: int) -> dict:
    """The select kernel's compile-time constants (also used by the CPU compile test)."""
    return dict(ROW=row, WIDTH=width, K=k, K_PAD=k_pad, RESIDENT=resident, BLOCK=block)
