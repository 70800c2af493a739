"""Top-k selection over long score rows on the GPU: an exact radix select, not a sort.

Why not `lax.top_k`: on the GPU it sorts every row (rows of 128K with k = 2048 run at ~2% of HBM bandwidth, SPEC §4).
Selection needs far less: find the k-th largest score, then keep what is above it. Scores become order-preserving
int32 keys (float bits with the magnitude bits flipped for negatives; -inf, NaN and keys past the row's length
become INT_MIN, "invisible"), and the k-th largest key is found digit by digit, 4 bits per pass, most significant
first: each pass streams the row once and counts, for the 16 candidate values of the next digit, how many keys are
at least that large. Eight counting passes pin the key exactly; a ninth pass writes the selected ids by stream
compaction (a running offset plus an exclusive cumsum per block), in ascending id order, taking keys equal to the
threshold in ascending id order until k are chosen: the lower id wins a tie, as in the reference.

One program per row; every pass stops at the row's length, so a causal row t costs t + 1 keys, not S.
Shapes: R rows (any leading dims flattened), S keys, K selected slots.
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
DIGIT_BITS = 4
NUM_PASSES = 32 // DIGIT_BITS
RADIX = 1 << DIGIT_BITS


def sortable_keys(scores, visible):
    """f32 -> int32 with the same order (-0.0 and +0.0 equal); invisible, -inf and NaN -> INT_MIN."""
    scores = jnp.where(scores == 0, 0.0, scores)  # -0.0 has other bits than +0.0 but must tie with it
    bits = lax.bitcast_convert_type(scores, jnp.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: larger magnitude -> smaller key
    return jnp.where(visible & (scores > -jnp.inf), keys, INT_MIN)  # NaN > -inf is False


def _topk_kernel(length_ref, scores_ref, out_ref, *, k: int, block: int, out_block: int):
    length = length_ref[0]
    spare_slot = out_ref.shape[0] - 1
    num_blocks = (length + block - 1) // block
    lanes = lax.iota(jnp.int32, block)

    def keys_of_block(j):
        ids = j * block + lanes
        return ids, sortable_keys(load(scores_ref.at[pl.ds(j * block, block)]), ids < length)

    digits = lax.iota(jnp.int32, RADIX)[:, None] + 1  # candidate digits 1..16 (16 = the next prefix's start)

    # Radix descent: prefix = the largest value whose count of keys >= it is at least k (the k-th largest key).
    prefix = jnp.int32(INT_MIN)
    counts = None
    for p in range(NUM_PASSES):
        shift = 32 - DIGIT_BITS * (p + 1)
        thresholds = prefix + (digits << shift)  # int32 wrap-around is exact: every used value is in range

        def count_block(j, acc, thresholds=thresholds):
            _, keys = keys_of_block(j)
            return acc + (keys[None, :] >= thresholds).astype(jnp.int32)

        counts = lax.fori_loop(0, num_blocks, count_block, jnp.zeros((RADIX, block), jnp.int32)).sum(axis=1)
        # counts fall as the digit grows; the digit is how many of 1..15 still keep k keys (16 is not a digit).
        digit = jnp.sum(((counts >= k) & (lax.iota(jnp.int32, RADIX) < RADIX - 1)).astype(jnp.int32))
        prefix = prefix + (digit << shift)
    threshold = prefix
    # From the last pass: keys > threshold are keys >= threshold + 1, the count for candidate digit + 1.
    above = jnp.sum(jnp.where(lax.iota(jnp.int32, RADIX) == digit, counts, 0))
    # Fewer than k visible keys: threshold stays INT_MIN and only the visible ones (all > INT_MIN) are taken.
    ties_wanted = jnp.where(threshold == INT_MIN, 0, k - above)

    def compact_block(j, carry):
        written, ties_seen = carry
        ids, keys = keys_of_block(j)
        tie = (keys == threshold).astype(jnp.int32)
        tie_rank = ties_seen + jnp.cumsum(tie) - tie
        take = (keys > threshold) | ((tie == 1) & (tie_rank < ties_wanted))
        take_i = take.astype(jnp.int32)
        # Lanes not taken point at the spare last slot (never a real one): the interpreter lowers a masked store to
        # a scatter, where a masked lane sharing a taken lane's slot could win on a GPU.
        slots = jnp.where(take, written + jnp.cumsum(take_i) - take_i, spare_slot)
        store(out_ref.at[slots], ids, mask=take)
        return written + jnp.sum(take_i), ties_seen + jnp.sum(tie)

    written, _ = lax.fori_loop(0, num_blocks, compact_block, (jnp.int32(0), jnp.int32(0)))
    for j in range(out_ref.shape[0] // out_block):  # slots nothing filled: -1 (disjoint from the writes above)
        slots = j * out_block + lax.iota(jnp.int32, out_block)
        store(out_ref.at[pl.ds(j * out_block, out_block)], jnp.full((out_block,), INVALID, jnp.int32),
              mask=slots >= written)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "block", "num_warps"))
def topk_pallas(scores, k: int, lengths: Optional[jax.Array] = None, *, interpret: bool = False,
                block: int = 512, num_warps: int = 4):
    """scores f32[..., S] (-inf = invisible), lengths int[...] (keys >= length are invisible; default S)
    -> int32[..., k] in the top-k convention of `topk_reference` (ascending ids, then -1)."""
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"top-k over {scores.shape[-1]} keys needs 0 < k <= {scores.shape[-1]}, got k={k}")
    *lead, num_keys = scores.shape
    rows = scores.reshape(-1, num_keys).astype(jnp.float32)
    if lengths is None:
        lengths = jnp.full(rows.shape[:1], num_keys, jnp.int32)
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32).reshape(-1), 0, num_keys)
    block = min(block, next_pow2(num_keys))
    rows = pad_axis(rows, 1, round_up(num_keys, block), -jnp.inf)
    k_pad = next_pow2(k + 1)  # one spare slot past k (see _topk_kernel)
    out_block = min(k_pad, 1024)
    kernel = functools.partial(_topk_kernel, k=k, block=block, out_block=out_block)
    out = pl.pallas_call(
        kernel,
        grid=(rows.shape[0],),
        in_specs=[pl.BlockSpec((1,), lambda r: (r,)), pl.BlockSpec((None, rows.shape[1]), lambda r: (r, 0))],
        out_specs=pl.BlockSpec((None, k_pad), lambda r: (r, 0)),
        out_shape=jax.ShapeDtypeStruct((rows.shape[0], k_pad), jnp.int32),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(num_warps, num_stages=2),
        name="radix_topk",
    )(lengths, rows)
    return out[:, :k].reshape(*lead, k)
