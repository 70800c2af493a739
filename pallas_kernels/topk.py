"""Top-k selection over long score rows on the GPU: an exact radix select behind a sampled pre-filter, not a sort.

Why not `lax.top_k`: on the GPU it sorts every row (rows of 128K with k = 2048 run at ~2% of HBM bandwidth, SPEC §4).
Selection needs far less: find the k-th largest score, then keep what is above it. Scores become order-preserving
int32 keys (float bits with the magnitude bits flipped for negatives; -inf, NaN and keys past the row's length
become INT_MIN, "invisible").

Exact radix select (`_kth_largest`): the k-th largest key is found digit by digit, 2 bits per pass, most significant
first; each pass streams the keys once and counts, for the 4 candidate values of the next digit, how many keys are
at least that large. Sixteen passes pin the key exactly. (Each key costs passes x candidates compares: 16 x 4 = 64
with 2-bit digits against 8 x 16 = 128 with 4-bit ones; on an H100 the select kernel, which is compute-bound, went
1.11 -> 0.78 ms for 8192 rows of 32K; 1-bit digits, 32 passes x 2, were slower than either.) A last pass writes
the selected ids by stream compaction (a running offset plus an exclusive cumsum per block), in ascending id
order, taking keys equal to the threshold in ascending id order until k are chosen: the lower id wins a tie, as in
the reference.

Nine passes over a row of 128K (4-bit digits then) is what made the first version only ~1.8x faster than
`lax.top_k`, so the row is now read about once (two kernels, one program per row each):
  1. candidates: read an evenly spread sample of the row (`sample` keys), take as floor the sample key whose
     expected count in the row is k plus a safety margin of 3.5 sampling spreads, at most half the capacity W (W = 4k
     rounded to a power of two; `_sample_rank`), and stream-compact every key >= floor (ids and keys, ascending
     ids) into a [W] buffer, counting but not writing past it. Rows of at most 2k keys skip the sample and keep
     every visible key. (Rows of 8K with k = 2048 keep ~2.5K candidates, not all 8K as when every row that fit
     the buffer skipped the sample.)
  2. select: if the candidates are sure to hold the row's top-k (at least k of them, or every visible key, and no
     overflow), run the exact radix select on the candidates only; otherwise (an unlucky sample, or heavy ties)
     run it on the whole row. Either way the answer is exact and identical, ties included, because every key >=
     the k-th largest is a candidate and the candidates keep ascending id order. For buffers of at most
     RESIDENT_SLOTS the candidates are loaded once into registers (the first W/2 slots alone when they hold all
     of them) and searched one bit per pass (`_kth_largest_resident`: 32 passes of one compare and one sum per
     key, no memory traffic); the streamed 2-bit form re-read them from L2 in every pass and waited on those
     loads (on an H100, 2048 causal rows of 128K: select 0.23 -> 0.15 ms).
The sample is deterministic (a fixed stride), so a given input always takes the same path.
On Hopper both kernels also exist in Gluon (`topk_gluon`), with the same outputs; "auto" takes them
(`resolve_candidates_kernel`, `resolve_select_kernel`).

Every pass stops at the row's length, so a causal row t costs t + 1 keys, not S.
Shapes: R rows (any leading dims flattened), S keys, K selected slots, W candidate slots.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._pallas import compiler_params, load, next_pow2, pad_axis, round_up, store
from pallas_kernels.topk_reference import INVALID

INT_MIN = -(2 ** 31)
LOWEST_VISIBLE = INT_MIN + 1
DIGIT_BITS = 2
NUM_PASSES = 32 // DIGIT_BITS
RADIX = 1 << DIGIT_BITS
FALLBACK = -1  # candidate count that sends a row to the whole-row select
SAMPLE_MARGIN = 3.5  # spreads of the sampled count kept above k (`_sample_rank`)


def sortable_keys(scores, visible):
    """f32 -> int32 with the same order (-0.0 and +0.0 equal); invisible, -inf and NaN -> INT_MIN."""
    scores = jnp.where(scores == 0, 0.0, scores)  # -0.0 has other bits than +0.0 but must tie with it
    bits = lax.bitcast_convert_type(scores, jnp.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: larger magnitude -> smaller key
    return jnp.where(visible & (scores > -jnp.inf), keys, INT_MIN)  # NaN > -inf is False


def _row_blocks(scores_ref, length, block: int):
    """The row's keys block by block: (keys_of_block(j) -> (ids, keys), number of blocks up to the length)."""
    lanes = lax.iota(jnp.int32, block)

    def keys_of_block(j):
        ids = j * block + lanes
        return ids, sortable_keys(load(scores_ref.at[pl.ds(j * block, block)]), ids < length)
    return keys_of_block, (length + block - 1) // block


def _kth_largest(num_blocks, keys_of_block, rank, block: int):
    """Radix descent over the keys of `num_blocks` blocks -> (threshold, above): the rank-th largest key and how
    many keys are strictly larger. With fewer than `rank` visible keys the threshold is INT_MIN."""
    digits = lax.iota(jnp.int32, RADIX)[:, None] + 1  # candidate digits 1..RADIX (RADIX = the next prefix's start)
    prefix = jnp.int32(INT_MIN)
    counts = digit = None
    for p in range(NUM_PASSES):
        shift = 32 - DIGIT_BITS * (p + 1)
        thresholds = prefix + (digits << shift)  # int32 wrap-around is exact: every used value is in range

        def count_block(j, acc, thresholds=thresholds):
            _, keys = keys_of_block(j)
            return acc + (keys[None, :] >= thresholds).astype(jnp.int32)

        counts = lax.fori_loop(0, num_blocks, count_block, jnp.zeros((RADIX, block), jnp.int32)).sum(axis=1)
        # counts fall as the digit grows; the digit is how many of 1..RADIX-1 still keep `rank` keys (RADIX is not
        # a digit).
        digit = jnp.sum(((counts >= rank) & (lax.iota(jnp.int32, RADIX) < RADIX - 1)).astype(jnp.int32))
        prefix = prefix + (digit << shift)
    # From the last pass: keys > threshold are keys >= threshold + 1, the count for candidate digit + 1.
    above = jnp.sum(jnp.where(lax.iota(jnp.int32, RADIX) == digit, counts, 0))
    return prefix, above


def _compact(num_blocks, keys_of_block, threshold, ties_wanted, write):
    """Stream compaction in block order: keys > threshold, then (ties_wanted not None) keys == threshold in order
    until ties_wanted. write(slots, ids, keys, take) stores one block. Returns how many were taken."""
    def body(j, carry):
        written, ties_seen = carry
        ids, keys = keys_of_block(j)
        take = keys > threshold
        if ties_wanted is not None:  # a second scan per block, so only when ties are rationed
            tie = (keys == threshold).astype(jnp.int32)
            tie_rank = ties_seen + jnp.cumsum(tie) - tie
            take = take | ((tie == 1) & (tie_rank < ties_wanted))
            ties_seen = ties_seen + jnp.sum(tie)
        take_i = take.astype(jnp.int32)
        write(written + jnp.cumsum(take_i) - take_i, ids, keys, take)
        return written + jnp.sum(take_i), ties_seen

    return lax.fori_loop(0, num_blocks, body, (jnp.int32(0), jnp.int32(0)))[0]


def _masked_slots(slots, take, spare_slot):
    # Lanes not taken point at a spare slot (never a real one): the interpreter lowers a masked store to a
    # scatter, where a masked lane sharing a taken lane's slot could win on a GPU.
    return jnp.where(take, slots, spare_slot)


def _select_into(out_ref, num_blocks, keys_of_block, k: int, block: int, out_block: int, resident_keys=None):
    """Exact top-k of the given keys -> out_ref (ids ascending, then -1). resident_keys: the same keys, all of
    them, as one array: the radix passes then run on it in registers (`_kth_largest_resident`), and the keys are
    read block by block only once, to write the ids."""
    if resident_keys is None:
        threshold, above = _kth_largest(num_blocks, keys_of_block, k, block)
    else:
        threshold, above = _kth_largest_resident(resident_keys, k)
    # Fewer than k visible keys: threshold stays INT_MIN and only the visible ones (all > INT_MIN) are taken.
    ties_wanted = jnp.where(threshold == INT_MIN, 0, k - above)
    spare_slot = out_ref.shape[0] - 1

    def write(slots, ids, keys, take):
        store(out_ref.at[_masked_slots(slots, take, spare_slot)], ids, mask=take)

    _fill_invalid(out_ref, _compact(num_blocks, keys_of_block, threshold, ties_wanted, write), out_block)


def _sample_rank(length, k: int, capacity: int, sample: int):
    """The rank, within an evenly spread sample of `sample` keys, of the key to use as the candidates' floor.

    The sample key of rank r has about r * length / sample keys at or above it in the row, with a relative spread
    of about 1 / sqrt(r). The smallest r whose count stays above k by SAMPLE_MARGIN spreads solves
    r - z sqrt(r) = k * sample / length; fewer candidates make the select cheaper, and a count below k sends the
    row to the whole-row select (correct, slower). The rank is capped where the count would reach half the
    buffer, so that it rarely overflows."""
    length = jnp.maximum(length, 1)
    needed = (k * sample) / length.astype(jnp.float32)
    z = SAMPLE_MARGIN
    with_margin = jnp.ceil(((z + jnp.sqrt(z * z + 4.0 * needed)) / 2.0) ** 2).astype(jnp.int32)
    half_buffer = (capacity // 2 * sample + length - 1) // length
    return jnp.clip(jnp.minimum(with_margin, half_buffer), 1, sample)


def _candidates_kernel(length_ref, scores_ref, ids_ref, keys_ref, count_ref, *, k: int, block: int, sample: int):
    # length_ref [1], scores_ref [S_pad], ids_ref / keys_ref [W] (slot W-1 is the spare), count_ref [1]
    length = length_ref[0]
    capacity = ids_ref.shape[0] - 1
    lanes = lax.iota(jnp.int32, block)

    def sample_block(j):
        # Sample i sits at floor(i * length / sample), computed without overflowing int32: spread evenly over the
        # whole row, whatever its length (shorter rows than the sample repeat keys, which keeps the proportions).
        i = j * block + lanes
        at = i * (length // sample) + (i * (length % sample)) // sample
        return at, sortable_keys(load(scores_ref.at[at]), at < length)

    def sampled_floor():
        rank = _sample_rank(length, k, capacity, sample)
        return jnp.maximum(_kth_largest(sample // block, sample_block, rank, block)[0], LOWEST_VISIBLE)

    # Rows of at most 2k keys (or that fit a smaller buffer) keep every visible key: a sample would cut few.
    # (That branch computes its constant from an operand: the Triton lowering cannot yield a literal.)
    floor = lax.cond(length > min(capacity, 2 * k), lambda _: sampled_floor(),
                     lambda n: n * 0 + LOWEST_VISIBLE, length)

    def write(slots, ids, keys, take):
        keep = take & (slots < capacity)
        slots = _masked_slots(slots, keep, capacity)
        store(ids_ref.at[slots], ids, mask=keep)
        store(keys_ref.at[slots], keys, mask=keep)

    keys_of_block, num_blocks = _row_blocks(scores_ref, length, block)
    # keys >= floor are keys > floor - 1 (floor > INT_MIN, so no wrap-around); no ties to ration.
    found = _compact(num_blocks, keys_of_block, floor - 1, None, write)
    # The candidates hold the top-k when they did not overflow and either number at least k (then the k-th largest
    # key is >= floor) or are every visible key.
    holds_top_k = (found <= capacity) & ((found >= k) | (floor == LOWEST_VISIBLE))
    count_ref[0] = jnp.where(holds_top_k, found, FALLBACK)


def _kth_largest_resident(keys, rank):
    """`_kth_largest` for keys held in registers: one bit per pass, most significant first (32 passes of one
    compare and one sum per key; nothing is re-read)."""
    def one_bit(p, prefix):
        candidate = prefix + lax.shift_left(jnp.int32(1), 31 - p)  # int32 wrap-around is exact, as above
        return jnp.where(jnp.sum((keys >= candidate).astype(jnp.int32)) >= rank, candidate, prefix)

    threshold = lax.fori_loop(0, 32, one_bit, jnp.int32(INT_MIN))
    return threshold, jnp.sum((keys > threshold).astype(jnp.int32))


def _fill_invalid(out_ref, written, out_block: int):
    """-1 into the slots past the first `written` (disjoint from the writes before it)."""
    for j in range(out_ref.shape[0] // out_block):
        slots = j * out_block + lax.iota(jnp.int32, out_block)
        store(out_ref.at[pl.ds(j * out_block, out_block)], jnp.full((out_block,), INVALID, jnp.int32),
              mask=slots >= written)


def _select_kernel(length_ref, count_ref, scores_ref, ids_ref, keys_ref, out_ref, *, k: int, block: int,
                   out_block: int, resident: bool):
    # length_ref / count_ref [1], scores_ref [S_pad], ids_ref / keys_ref [W], out_ref [K_pad]
    count = count_ref[0]
    lanes = lax.iota(jnp.int32, block)

    def candidate_block(j):
        slots = j * block + lanes
        keys = load(keys_ref.at[pl.ds(j * block, block)])
        return load(ids_ref.at[pl.ds(j * block, block)]), jnp.where(slots < count, keys, INT_MIN)

    def select_resident(width):
        # Re-reading the candidates from L2 in each radix pass (the streamed form) left the kernel waiting on loads.
        slots = lax.iota(jnp.int32, width)
        keys = jnp.where(slots < count, load(keys_ref.at[pl.ds(0, width)]), INT_MIN)
        _select_into(out_ref, (count + block - 1) // block, candidate_block, k, block, out_block, keys)

    if resident:  # the first half of the buffer alone where it holds every candidate: half the compares
        half = keys_ref.shape[0] // 2
        pl.when((count != FALLBACK) & (count <= half))(lambda: select_resident(half))
        pl.when(count > half)(lambda: select_resident(keys_ref.shape[0]))
    else:
        @pl.when(count != FALLBACK)
        def _():
            _select_into(out_ref, (count + block - 1) // block, candidate_block, k, block, out_block)

    @pl.when(count == FALLBACK)
    def _():
        keys_of_block, num_blocks = _row_blocks(scores_ref, length_ref[0], block)
        _select_into(out_ref, num_blocks, keys_of_block, k, block, out_block)


def _row_spec(width):
    return pl.BlockSpec((None, width), lambda r: (r, 0))


def _one_spec():
    return pl.BlockSpec((1,), lambda r: (r,))


# Keys per step of the select kernel. Its radix counts keep a [RADIX, block] int32 accumulator in registers: with
# 4-bit digits and 1024 keys the kernel took 255 registers and spilled (ncu on an H100, 8192 rows of 32K: 4.3M
# local loads, 12.5% occupancy, select 1.88 ms); 256 keys: 96 registers, 1.11 ms; with 2-bit digits 512 keys won
# (0.71 ms; 128 / 256: 0.73 / 0.78).
SELECT_BLOCK = 512
# Candidate slots (W) up to which the select holds them in registers (`_kth_largest_resident`): 8192 int32 keys
# are 64 registers per thread at 4 warps (ptxas: 128 registers in all, no spills; 8 warps ran slower on an H100).
RESIDENT_SLOTS = 8192


def _default_tiles(num_keys: int) -> tuple[int, int]:
    """(block, num_warps) from an H100 sweep (docs/BENCHMARKS.md): long rows amortise each step's scans and
    reductions over more keys; short rows are few steps and prefer small blocks."""
    return (1024, 4) if num_keys >= 32768 else (512, 4)


def _call_params(interpret, num_warps, num_stages):
    return dict(interpret=interpret,
                compiler_params=None if interpret else compiler_params(num_warps, num_stages=num_stages))


GLUON_WARPS = 4  # the Gluon kernels' warps (here so that checking their tiles needs no triton)


def _resolve(which: str, choice: str, interpret: bool, tiles_reason) -> str:
    """`sparse_attention.resolve_kernel_choice` for a top-k pass: the Gluon kernel runs where tiles_reason() (why
    it cannot take these tiles, None when it can) and `_gluon.unavailable_reason()` are both None."""
    from pallas_kernels.sparse_attention import resolve_kernel_choice

    def reason():
        from pallas_kernels import _gluon
        return tiles_reason() or _gluon.unavailable_reason()

    return resolve_kernel_choice(which, choice, interpret, reason)


def resolve_candidates_kernel(candidates_kernel: str, interpret: bool, block: int, sample: int,
                              num_warps: int) -> str:
    """The candidates kernel that runs: "gluon" (`topk_gluon`, Hopper) or "pallas" (`_candidates_kernel`).
    "auto" takes the Gluon kernel where it runs (a Hopper GPU with triton and jax-triton; 4 warps and blocks and
    samples of at least 128 keys, one per thread) and Pallas elsewhere; "gluon" insists (an error says why it
    cannot run); "pallas" always is. Interpret mode is Pallas. Both give the same candidates."""
    def tiles_reason():
        if num_warps != GLUON_WARPS or min(block, sample) < 32 * GLUON_WARPS:
            return (f"it runs {GLUON_WARPS} warps over blocks and samples of at least {32 * GLUON_WARPS} keys, got "
                    f"{num_warps} warps, block {block}, sample {sample}")
        return None

    return _resolve("candidates_kernel", candidates_kernel, interpret, tiles_reason)


def resolve_select_kernel(select_kernel: str, interpret: bool, select_block: int, width: int,
                          num_warps: int) -> str:
    """The select kernel that runs: "gluon" (`topk_gluon._select_kernel`, Hopper) or "pallas" (`_select_kernel`),
    chosen as `resolve_candidates_kernel` chooses; the Gluon kernel runs 4 warps over select blocks of 128 to
    32768 keys (its compaction counts two kinds of key in the half-words of one int32 scan) and buffers of at
    least 256 candidate slots (W). Both give the same ids."""
    def tiles_reason():
        if (num_warps != GLUON_WARPS or not 32 * GLUON_WARPS <= select_block <= 1 << 15
                or width < 64 * GLUON_WARPS):
            return (f"it runs {GLUON_WARPS} warps over select blocks of {32 * GLUON_WARPS} to {1 << 15} keys and "
                    f"at least {64 * GLUON_WARPS} candidate slots, got {num_warps} warps, select block "
                    f"{select_block}, {width} slots")
        return None

    return _resolve("select_kernel", select_kernel, interpret, tiles_reason)


def _candidates(scores, k, lengths, *, interpret, block, select_block, num_warps, num_stages, capacity, sample,
                candidates_kernel="auto"):
    """Kernel 1 with its inputs prepared: scores f32[..., S] -> (lead shape, rows f32[R, S_pad], lengths int32[R],
    select_block, ids int32[R, W], keys int32[R, W], count int32[R]); count = FALLBACK where the candidates might
    miss part of the top-k. Options as in `topk_pallas`."""
    *lead, num_keys = scores.shape
    if not 0 < k <= num_keys:
        raise ValueError(f"top-k over {num_keys} keys needs 0 < k <= {num_keys}, got k={k}")
    default_block, default_warps = _default_tiles(num_keys)
    block = min(block or default_block, next_pow2(num_keys))
    width = max(next_pow2(capacity or 4 * k), block)  # W
    select_block = min(select_block or SELECT_BLOCK, width, next_pow2(num_keys))  # (divides W: powers of two)
    rows = scores.reshape(-1, num_keys).astype(jnp.float32)
    rows = pad_axis(rows, 1, round_up(num_keys, max(block, select_block)), -jnp.inf)
    if lengths is None:
        lengths = jnp.full(rows.shape[:1], num_keys, jnp.int32)
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32).reshape(-1), 0, num_keys)
    num_rows = rows.shape[0]
    num_warps = num_warps or default_warps
    sample = round_up(sample, block)
    if resolve_candidates_kernel(candidates_kernel, interpret, block, sample, num_warps) == "gluon":
        from pallas_kernels._gluon import vmap_by_folding_into_batch
        from pallas_kernels.topk_gluon import candidates_gluon
        gluon_pass = functools.partial(candidates_gluon, k=k, width=width, block=block, sample=sample,
                                       margin=SAMPLE_MARGIN)
        ids, keys, count = vmap_by_folding_into_batch(gluon_pass)(rows, lengths)
        return lead, rows, lengths, select_block, ids, keys, count
    ids, keys, count = pl.pallas_call(
        functools.partial(_candidates_kernel, k=k, block=block, sample=sample),
        grid=(num_rows,),
        in_specs=[_one_spec(), _row_spec(rows.shape[1])],
        out_specs=[_row_spec(width), _row_spec(width), _one_spec()],
        out_shape=[jax.ShapeDtypeStruct((num_rows, width), jnp.int32)] * 2
        + [jax.ShapeDtypeStruct((num_rows,), jnp.int32)],
        name="topk_candidates", **_call_params(interpret, num_warps, num_stages),
    )(lengths, rows)
    return lead, rows, lengths, select_block, ids, keys, count


_OPTIONS = ("k", "interpret", "block", "select_block", "num_warps", "num_stages", "capacity", "sample",
            "candidates_kernel")  # (+ "resident" and "select_kernel" for `topk_pallas`)


@functools.partial(jax.jit, static_argnames=_OPTIONS)
def candidate_counts(scores, k: int, lengths: Optional[jax.Array] = None, *, interpret: bool = False,
                     block: int = 0, select_block: int = 0, num_warps: int = 0, num_stages: int = 3,
                     capacity: int = 0, sample: int = 1024, candidates_kernel: str = "auto"):
    """Kernel 1 alone (for tests and benchmarks): int32[...] candidates per row, FALLBACK (-1) for rows that
    `topk_pallas` sends to the whole-row select. Arguments as in `topk_pallas`."""
    lead, *_, count = _candidates(scores, k, lengths, interpret=interpret, block=block, select_block=select_block,
                                  num_warps=num_warps, num_stages=num_stages, capacity=capacity, sample=sample,
                                  candidates_kernel=candidates_kernel)
    return count.reshape(lead)


@functools.partial(jax.jit, static_argnames=_OPTIONS + ("resident", "select_kernel"))
def topk_pallas(scores, k: int, lengths: Optional[jax.Array] = None, *, interpret: bool = False,
                block: int = 0, select_block: int = 0, num_warps: int = 0, num_stages: int = 3, capacity: int = 0,
                sample: int = 1024, resident: Optional[bool] = None, candidates_kernel: str = "auto",
                select_kernel: str = "auto"):
    """scores f32[..., S] (-inf = invisible), lengths int[...] (keys >= length are invisible; default S)
    -> int32[..., k] in the top-k convention of `topk_reference` (ascending ids, then -1).

    capacity: candidate slots per row (0 = 4k; rounded up to a power of two and to a block); sample: keys in the
    strided sample that sets the candidates' floor (rounded up to a block). block / num_warps: keys per step of the
    candidates kernel and warps per row (0 = by row length, `_default_tiles`); select_block: keys per step of the
    select kernel (0 = SELECT_BLOCK; at most the capacity) where it streams the candidates; resident: hold all W
    candidates in registers through the select instead (None = when W <= RESIDENT_SLOTS); candidates_kernel,
    select_kernel: "auto" | "gluon" | "pallas" for each pass (`resolve_candidates_kernel`,
    `resolve_select_kernel`)."""
    num_warps = num_warps or _default_tiles(scores.shape[-1])[1]
    lead, rows, lengths, select_block, ids, keys, count = _candidates(
        scores, k, lengths, interpret=interpret, block=block, select_block=select_block, num_warps=num_warps,
        num_stages=num_stages, capacity=capacity, sample=sample, candidates_kernel=candidates_kernel)
    k_pad = next_pow2(k + 1)  # one spare slot past k (see _masked_slots)
    resident = ids.shape[1] <= RESIDENT_SLOTS if resident is None else resident
    if resolve_select_kernel(select_kernel, interpret, select_block, ids.shape[1], num_warps) == "gluon":
        from pallas_kernels._gluon import vmap_by_folding_into_batch
        from pallas_kernels.topk_gluon import select_gluon
        out = vmap_by_folding_into_batch(functools.partial(
            select_gluon, k=k, k_pad=k_pad, resident=resident, block=select_block))(lengths, count, rows, ids, keys)
        return out[:, :k].reshape(*lead, k)
    out = pl.pallas_call(
        functools.partial(_select_kernel, k=k, block=select_block, out_block=min(k_pad, 1024), resident=resident),
        grid=(rows.shape[0],),
        in_specs=[_one_spec(), _one_spec(), _row_spec(rows.shape[1]), _row_spec(ids.shape[1]),
                  _row_spec(ids.shape[1])],
        out_specs=_row_spec(k_pad),
        out_shape=jax.ShapeDtypeStruct((rows.shape[0], k_pad), jnp.int32),
        name="topk_select", **_call_params(interpret, num_warps, num_stages),
    )(lengths, count, rows, ids, keys)
    return out[:, :k].reshape(*lead, k)
