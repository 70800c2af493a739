"""The Pallas kernels equal their references: in interpret mode on every platform (the GPU logic, checked on CPU),
and compiled on a CUDA GPU (tests marked gpu, skipped elsewhere).

Shapes are ragged on purpose: lengths not a multiple of any block, k larger than the visible prefix, -1 slots, a
query with no valid slot, head counts and widths below the tensor-core minimum, batch > 1."""

import dataclasses

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err
from indexcache_jax import forward, layer_indices
from pallas_kernels import dispatch
from pallas_kernels._triton_ops import reaches_fast_forms
from pallas_kernels.indexer import (head_sum_ablation, indexer_scores_pallas, indexer_scores_trainable,
                                    indexer_topk_pallas)
from pallas_kernels.indexer_reference import indexer_scores_reference, indexer_topk_reference, quantize_fp8
from pallas_kernels.sparse_attention import Tiles, combine_splits, sparse_mla_decode_pallas, sparse_mla_pallas
from pallas_kernels.sparse_attention_reference import sparse_mla_decode_reference, sparse_mla_reference
from pallas_kernels.topk import FALLBACK, candidate_counts, sortable_keys, topk_pallas
from pallas_kernels.topk_reference import topk_reference

ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["interpret"] + (["pallas"] if ON_GPU else [])


def _flags(impl):
    return {"interpret": impl == "interpret"}


# ---- top-k -------------------------------------------------------------------------------------------------------

def test_sortable_keys_order_like_floats_and_tie_signed_zeros():
    values = np.array([-np.inf, -3e38, -2.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 2.5, 3e38], np.float32)
    keys = np.asarray(sortable_keys(jnp.asarray(values), jnp.ones(values.shape, bool)))
    assert keys[0] == -(2 ** 31)  # -inf is "invisible"
    assert (np.diff(keys[1:]) >= 0).all() and keys[5] == keys[6]
    assert (np.diff(np.delete(keys, 6)[1:]) > 0).all()
    hidden = np.asarray(sortable_keys(jnp.asarray(values), jnp.zeros(values.shape, bool)))
    assert (hidden == -(2 ** 31)).all()


def test_reference_treats_signed_zeros_as_a_tie():
    scores = jnp.array([[0.0, -0.0, -0.0, 0.0, -1.0]])
    np.testing.assert_array_equal(topk_reference(scores, 2), [[0, 1]])


@settings(deadline=None)  # examples: the conftest's hypothesis profile (more with --runslow)
@given(st.integers(1, 4), st.integers(1, 700), st.data())
def test_topk_kernel_equals_reference(rows, keys, data):
    k = data.draw(st.integers(1, keys))
    block = data.draw(st.sampled_from([16, 64, 512]))
    # Small candidate buffers and samples send rows down every path: all visible keys, sampled floor, fallback.
    capacity = data.draw(st.sampled_from([0, 32, 128]))
    sample = data.draw(st.sampled_from([16, 64, 2048]))
    resident = data.draw(st.sampled_from([None, False]))  # candidates held in registers (None here) or streamed
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31 - 1)))
    # Few distinct values (many ties at the cut), both signs, signed zeros, invisible keys, ragged lengths.
    scores = (rng.integers(-4, 5, (rows, keys)) * rng.choice([1.0, 0.25, -0.0], (rows, keys))).astype(np.float32)
    scores[rng.random((rows, keys)) < 0.2] = -np.inf
    lengths = rng.integers(0, keys + 1, rows)
    visible = np.where(np.arange(keys)[None] < lengths[:, None], scores, -np.inf)
    got = topk_pallas(jnp.asarray(scores), k, jnp.asarray(lengths), interpret=True, block=block, capacity=capacity,
                      sample=sample, resident=resident)
    np.testing.assert_array_equal(got, topk_reference(jnp.asarray(visible), k))


def test_resident_select_on_each_buffer_half_and_on_fallback_rows():
    # W = 128 candidate slots: rows whose candidates fit the first 64 search those alone, the others all 128, and
    # fallback rows the whole row; every kind must occur here and every row must equal the reference.
    rng = np.random.default_rng(3)
    rows, keys, k = 24, 700, 24
    scores = rng.normal(size=(rows, keys)).astype(np.float32)
    scores[::2] = np.round(scores[::2] * 2) / 2  # ties at the floor inflate the candidate counts
    lengths = jnp.asarray(rng.integers(1, keys + 1, rows))
    options = dict(interpret=True, capacity=128, block=64, sample=64)
    counts = np.asarray(candidate_counts(jnp.asarray(scores), k, lengths, **options))
    assert (counts == FALLBACK).any() and ((counts >= 0) & (counts <= 64)).any() and (counts > 64).any()
    visible = np.where(np.arange(keys)[None] < np.asarray(lengths)[:, None], scores, -np.inf)
    want = topk_reference(jnp.asarray(visible), k)
    np.testing.assert_array_equal(topk_pallas(jnp.asarray(scores), k, lengths, resident=True, **options), want)
    np.testing.assert_array_equal(topk_pallas(jnp.asarray(scores), k, lengths, resident=False, **options), want)


def _candidate_counts(scores, k, *, capacity, sample, block):
    rows = jnp.asarray(scores, jnp.float32)
    options = dict(interpret=True, capacity=capacity, sample=sample, block=block)
    got = topk_pallas(rows, k, **options)
    np.testing.assert_array_equal(got, topk_reference(rows, k))  # whichever path a row took, the answer is exact
    return np.asarray(candidate_counts(rows, k, **options))


def test_topk_paths_short_rows_sampled_floor_and_fallbacks():
    rng = np.random.default_rng(11)
    k, capacity, sample, block = 16, 64, 64, 16
    short = rng.standard_normal((1, 2 * k)).astype(np.float32)  # at most 2k keys: every visible key is a candidate
    short[0, 7] = -np.inf
    assert _candidate_counts(short, k, capacity=capacity, sample=sample, block=block)[0] == 2 * k - 1
    # Rows that fit the buffer but are longer than 2k: the sample cuts them to about k + 3.5 spreads (here ~30).
    middle = rng.standard_normal((4, 60)).astype(np.float32)
    counts = _candidate_counts(middle, k, capacity=capacity, sample=sample, block=block)
    assert ((counts >= k) & (counts < 45)).all(), counts
    # Where half the buffer is far above that (capacity 256, rows of 200), the margin, not the cap, sets the floor:
    # ~70 candidates expected, against ~128 at half the buffer.
    roomy = rng.standard_normal((4, 200)).astype(np.float32)
    counts = _candidate_counts(roomy, k, capacity=256, sample=sample, block=block)
    assert ((counts >= k) & (counts < 100)).all(), counts
    # Long rows: the sample sets a floor aimed at half the buffer. Continuous scores: 16 sampled keys above it
    # (mean 128 candidates, sd ~32): between k and the capacity (255 usable slots).
    smooth = rng.standard_normal((3, 4096)).astype(np.float32)
    counts = _candidate_counts(smooth, k, capacity=256, sample=512, block=64)
    assert ((counts >= k) & (counts < 256)).all(), counts
    # The sample sees only every 16th key; make exactly those large, so its floor leaves fewer than k candidates.
    periodic = rng.standard_normal((1, 1024)).astype(np.float32)
    periodic[0, ::16] += 100.0
    assert _candidate_counts(periodic, k, capacity=capacity, sample=sample, block=block)[0] == FALLBACK
    # One value everywhere: every key ties with the floor and the buffer overflows.
    flat = np.full((1, 1024), 0.5, np.float32)
    assert _candidate_counts(flat, k, capacity=capacity, sample=sample, block=block)[0] == FALLBACK


def test_topk_kernel_on_continuous_scores_with_extremes():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((3, 1000)).astype(np.float32) * np.float32(1e30)
    scores[0, 10] = np.float32(3.4e38)
    scores[1] = np.float32(1e-38) * rng.standard_normal(1000)  # subnormal neighbourhood
    got = topk_pallas(jnp.asarray(scores), 100, interpret=True)
    np.testing.assert_array_equal(got, topk_reference(jnp.asarray(scores), 100))


def test_topk_kernel_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="needs 0 < k <= 5"):
        topk_pallas(jnp.zeros((1, 5)), 6, interpret=True)


# ---- indexer -----------------------------------------------------------------------------------------------------

def _indexer_inputs(seed, b, t, s, g, i, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, g, i), dtype)
    w = jax.random.normal(ks[1], (b, t, g), jnp.float32)
    k = jax.random.normal(ks[2], (b, s, i), dtype)
    # Decode-like rows (a query far into the cache) and prefill-like ones; padded queries sit at -1.
    pos = jnp.sort(jax.random.randint(ks[3], (b, t), -1, s), axis=1)
    return q, w, k, pos


def _selection_is_best(ids, scores, k, slack):
    """Ascending ids then -1, all visible, min(k, visible) of them, no unselected key better beyond `slack`."""
    ids, scores = np.asarray(ids), np.asarray(scores, np.float64)
    for row_ids, row in zip(ids.reshape(-1, k), scores.reshape(-1, scores.shape[-1]), strict=True):
        visible = np.isfinite(row)
        n = min(k, int(visible.sum()))
        chosen = row_ids[:n]
        assert (row_ids[n:] == -1).all() and (np.diff(chosen) > 0).all() and visible[chosen].all()
        rest = np.setdiff1d(np.flatnonzero(visible), chosen)
        if len(rest) and n:
            assert row[rest].max() <= row[chosen].min() + slack * (1 + abs(row[chosen].min()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-5)])
@pytest.mark.parametrize("shape", [(2, 13, 29, 4, 16), (1, 40, 70, 8, 32), (2, 5, 5, 3, 12)])
def test_indexer_scores_equal_reference(impl, dtype, tol, shape):
    q, w, k, pos = _indexer_inputs(0, *shape, dtype)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(indexer_scores_reference(q, w, k, pos))
    # all heads in one dot; 4 head groups accumulated in a loop; one program walking every key tile of its queries
    # (16-key tiles: several visible and hidden ones per row), with one head group or 4; hidden tiles left unwritten
    for heads_per_step, walk_keys, block_k, fill_hidden in ((0, False, 128, True), (4, False, 128, True),
                                                            (0, True, 16, True), (4, True, 16, True),
                                                            (0, True, 16, False), (0, False, 16, False)):
        got = np.asarray(indexer_scores_pallas(q, w, k, pos, heads_per_step=heads_per_step, walk_keys=walk_keys,
                                               block_k=block_k, fill_hidden=fill_hidden, **_flags(impl)))
        finite = np.isfinite(want)
        if fill_hidden:
            assert (np.isfinite(got) == finite).all()
        # bf16 inputs: both sides multiply exactly and accumulate in fp32; only the summation order differs.
        assert rel_err(got[finite], want[finite]) < (2e-3 if impl == "pallas" and dtype == jnp.float32 else tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_sum_ablation_drops_only_the_relu_and_head_weights(impl):
    """The benchmark's profiling ablation computes sum_h q_h . k (same masking), which the public scores never do."""
    q, w, k, pos = _indexer_inputs(4, 1, 9, 20, 4, 16, jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(jnp.einsum("btgi,bsi->bts", q, k))
    got = np.asarray(head_sum_ablation(q, w, k, pos, walk_keys=True, block_k=16, **_flags(impl)))
    visible = np.arange(20)[None, None, :] <= np.asarray(pos)[:, :, None]
    assert (np.isfinite(got) == visible).all()
    assert rel_err(got[visible], want[visible]) < (2e-3 if impl == "pallas" else 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol,shape", [(jnp.float32, 1e-5, (2, 13, 29, 4, 16)),
                                             (jnp.float32, 1e-5, (2, 5, 5, 3, 12)),
                                             (jnp.bfloat16, 2e-2, (1, 40, 150, 8, 32))])
def test_indexer_scores_backward_kernels_equal_reference_gradients(impl, dtype, tol, shape):
    """d_q, d_w, d_k of the trainable scores kernel against autodiff of the float32 reference, for a random
    cotangent on every entry (the -inf ones included: they must take no gradient). Rows are decode-like, prefill-
    like and padded (-1), so key tiles no query sees and queries that see nothing both occur."""
    q, w, k, pos = _indexer_inputs(7, *shape, dtype)
    d_scores = jax.random.normal(jax.random.key(8), shape[:2] + (shape[2],), jnp.float32)
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda q_, w_, k_: indexer_scores_reference(q_, w_, k_, pos), q.astype(jnp.float32), w,
                         k.astype(jnp.float32))
        want = vjp(d_scores)
        scores, vjp = jax.vjp(lambda q_, w_, k_: indexer_scores_trainable(q_, w_, k_, pos, impl == "interpret",
                                                                             "pallas"),
                              q, w, k)
        got = vjp(d_scores)
    visible = np.isfinite(np.asarray(indexer_scores_reference(q, w, k, pos))).sum()
    assert np.isfinite(np.asarray(scores)).sum() == visible
    for name, g, ref, dt in zip(("d_q", "d_w", "d_k"), got, want, (dtype, jnp.float32, dtype), strict=True):
        assert g.dtype == dt, name
        bound = max(tol, 2e-3) if impl == "pallas" else tol
        assert rel_err(g, ref) < bound, name


@pytest.mark.parametrize("impl", IMPLS)
def test_indexer_topk_chunked_selects_the_best_keys(impl):
    q, w, k, pos = _indexer_inputs(1, 2, 37, 53, 4, 16, jnp.float32)
    scores = indexer_scores_reference(q, w, k, pos)
    for topk in (1, 8, 53):
        # chunk_bytes forces several query chunks (with a padded last one)
        got = indexer_topk_pallas(q, w, k, pos, topk=topk, chunk_bytes=4 * 2 * 53 * 8, **_flags(impl))
        _selection_is_best(got, scores, topk, slack=1e-5)
        if impl == "interpret":  # same fp32 arithmetic up to summation order: equal but for near-ties
            same = np.asarray(got) == np.asarray(indexer_topk_reference(q, w, k, pos, topk=topk))
            assert same.mean() > 0.99



@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 13, 29, 4, 16), (1, 40, 70, 8, 32)])
@pytest.mark.parametrize("head_sum", ["bf16", "fp32"])
def test_fp8_indexer_scores_equal_the_fp8_reference_and_stay_near_exact(impl, shape, head_sum):
    q, w, k, pos = _indexer_inputs(2, *shape, jnp.float32)
    q8, w8, k8, k_scale = quantize_fp8(q, w, k)
    assert q8.dtype == k8.dtype == jnp.float8_e4m3fn and k_scale.shape == k.shape[:2]
    want = np.asarray(indexer_scores_reference(q8, w8, k8, pos, k_scale, fp8_head_sum=head_sum))
    finite = np.isfinite(want)
    for walk_keys, block_k in ((False, 128), (True, 16)):
        got = np.asarray(indexer_scores_pallas(q8, w8, k8, pos, k_scale, walk_keys=walk_keys, block_k=block_k,
                                               fp8_head_sum=head_sum, **_flags(impl)))
        assert (np.isfinite(got) == finite).all()
        # Products of e4m3 values are exact in fp32, so interpret mode differs only in summation order (which can
        # still move a logit across a bf16 rounding boundary, rarely). The GPU's fp8 tensor cores sum each
        # 128-product chain in an accumulator narrower than fp32 (_triton_ops): 4.4e-5 measured on an H100 at this
        # test's shapes with the fp32 head sum; with the bf16 one such a shift can cross a boundary, moving that
        # term by one bf16 step (2^-8).
        bound = {"pallas": {"fp32": 3e-4, "bf16": 2e-3}, "interpret": {"fp32": 1e-5, "bf16": 1e-4}}[impl][head_sum]
        assert rel_err(got[finite], want[finite]) < bound
    # Against unquantised fp32 scores: e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4 per input);
    # independent roundings average out to ~3.5% of the scores' norm on random data.
    exact = np.asarray(indexer_scores_reference(q, w, k, pos))
    assert rel_err(want[finite], exact[finite]) < 0.06
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        indexer_scores_pallas(q, w8, k, pos, k_scale, **_flags(impl))
    with pytest.raises(ValueError, match="rows_per_tile must be at most 256"):  # a tile that miscompiled on a GPU
        indexer_scores_pallas(q8, w8, k8, pos, k_scale, rows_per_tile=512, **_flags(impl))


def test_fast_triton_lowerings_are_reached_on_this_jax():
    # The fp8 tensor-core dot and the relaxed atomic add hook into private Pallas Triton modules (_triton_ops); a
    # jax release that moves them would fall back, silently, to the slow public forms. This fails instead.
    assert reaches_fast_forms() == {"fp8_dot_nt": True, "atomic_add_relaxed": True}


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_indexer_topk_selects_the_best_fp8_keys(impl):
    q, w, k, pos = _indexer_inputs(3, 2, 37, 53, 4, 16, jnp.float32)
    q8, w8, k8, k_scale = quantize_fp8(q, w, k)
    scores = indexer_scores_reference(q8, w8, k8, pos, k_scale)
    got = dispatch.indexer_topk(q, w, k, pos, topk=8, impl=impl, fp8=True)
    _selection_is_best(got, scores, 8, slack=1e-5)
    same = np.asarray(got) == np.asarray(dispatch.indexer_topk(q, w, k, pos, topk=8, impl="reference", fp8=True))
    assert same.mean() > 0.99  # equal but for near-ties (summation order)
    # Keys quantised beforehand (an fp8 key cache, one scale per token) select exactly what quantising at the call
    # does: the quantisation is per key row. Decode-shaped queries take the reference's decode path.
    for impl_ in (impl, "reference"):
        at_call = dispatch.indexer_topk(q, w, k, pos, topk=8, impl=impl_, fp8=True)
        np.testing.assert_array_equal(dispatch.indexer_topk(q, w, k8, pos, topk=8, impl=impl_, k_scale=k_scale),
                                      at_call)
        last = (q[:, -1:], w[:, -1:])
        np.testing.assert_array_equal(
            dispatch.indexer_topk(*last, k8, pos[:, -1:], topk=8, impl=impl_, k_scale=k_scale),
            dispatch.indexer_topk(*last, k, pos[:, -1:], topk=8, impl=impl_, fp8=True))
        with pytest.raises(ValueError, match="k_scale means fp8 keys"):
            dispatch.indexer_topk(q, w, k, pos, topk=8, impl=impl_, k_scale=k_scale)


# ---- sparse MLA --------------------------------------------------------------------------------------------------

def _sparse_inputs(seed, b, t, s, h, r, p, k, dtype):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, r + p)), dtype)
    kv = jnp.asarray(rng.standard_normal((b, s, r + p)), dtype)
    idx = np.full((b, t, k), -1, np.int32)
    for bi in range(b):
        for ti in range(1, t):  # query 0 of every row has no valid slot
            n = rng.integers(1, min(k, s) + 1)
            idx[bi, ti, :n] = np.sort(rng.choice(s, n, replace=False))
    return q, kv, jnp.asarray(idx)


SPARSE_SHAPES = [(2, 5, 30, 3, 8, 4, 7), (1, 4, 40, 20, 16, 16, 40), (2, 3, 9, 4, 12, 6, 3)]
# value width 160 -> padded 256: the kernels gather and accumulate it in several 64-column pieces
SPARSE_SHAPE_WIDE = (1, 3, 50, 4, 160, 24, 20)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("shape", SPARSE_SHAPES + [SPARSE_SHAPE_WIDE])
def test_sparse_prefill_and_decode_equal_reference(impl, dtype, tol, shape):
    q, kv, idx = _sparse_inputs(2, *shape, dtype)
    value_dim = shape[4]
    with jax.default_matmul_precision("highest"):
        want = sparse_mla_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=0.3,
                                    value_dim=value_dim)
        want_decode = sparse_mla_decode_reference(q[:, 1].astype(jnp.float32), kv.astype(jnp.float32), idx[:, 1],
                                                  scale=0.3, value_dim=value_dim)
    got = sparse_mla_pallas(q, kv, idx, scale=0.3, value_dim=value_dim, **_flags(impl))
    assert got.dtype == dtype and np.isfinite(np.asarray(got, np.float32)).all()
    assert np.all(np.asarray(got[:, 0], np.float32) == 0)  # no valid slot: zeros, like the reference
    tol = max(tol, 2e-3) if impl == "pallas" else tol
    assert rel_err(got, want) < tol
    for splits in (1, 3):
        got_decode = sparse_mla_decode_pallas(q[:, 1], kv, idx[:, 1], scale=0.3, value_dim=value_dim,
                                              num_splits=splits, block_k=16, **_flags(impl))
        assert rel_err(got_decode, want_decode) < tol


def test_combine_splits_handles_empty_splits():
    out = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 5)), jnp.float32)  # [B, n, H, R]
    lse = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4)), jnp.float32)
    lse = lse.at[:, 1].set(-jnp.inf)
    weights = np.exp(np.asarray(lse)) / np.exp(np.asarray(lse)).sum(1, keepdims=True)
    want = (weights[..., None] * np.asarray(out)).sum(1)
    merged, whole_lse = combine_splits(out, lse)
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole_lse, np.log(np.exp(np.asarray(lse)).sum(1)), rtol=1e-5)
    merged, whole_lse = combine_splits(out, jnp.full_like(lse, -jnp.inf))
    assert np.all(np.asarray(merged) == 0) and np.all(np.asarray(whole_lse) == -np.inf)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol,shape", [(jnp.float32, 1e-5, s) for s in SPARSE_SHAPES + [SPARSE_SHAPE_WIDE]]
                         + [(jnp.bfloat16, 3e-2, SPARSE_SHAPES[1])])
def test_sparse_backward_kernel_equals_reference_gradients(impl, dtype, tol, shape):
    """The Pallas backward (d_q per query, d_kv by atomic scatter) against autodiff of the float32 reference, for
    a random cotangent. Keys selected by several queries (the scatter must accumulate), -1 slots, a query with no
    valid slot, padded heads and widths."""
    q, kv, idx = _sparse_inputs(5, *shape, dtype)
    value_dim = shape[4]
    d_out = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape[:3] + (value_dim,)), dtype)
    ids = np.asarray(idx)
    assert max(np.bincount(ids[b][ids[b] >= 0]).max() for b in range(shape[0])) > 1
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda q_, kv_: sparse_mla_reference(q_, kv_, idx, scale=0.3, value_dim=value_dim),
                         q.astype(jnp.float32), kv.astype(jnp.float32))
        want_q, want_kv = vjp(d_out.astype(jnp.float32))
        _, vjp = jax.vjp(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=0.3, value_dim=value_dim,
                                                           **_flags(impl)), q, kv)
        got_q, got_kv = vjp(d_out)
    assert got_q.dtype == got_kv.dtype == dtype
    assert np.all(np.asarray(got_q[:, 0], np.float32) == 0)  # the query with no valid slot
    tol = max(tol, 2e-3) if impl == "pallas" else tol
    assert rel_err(got_q, want_q) < tol and rel_err(got_kv, want_kv) < tol


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_kernels_with_the_last_valid_slot_anywhere(impl):
    """Rows whose last valid slot sits at a 16-slot block's first or last position, in a middle block, after -1
    slots, or nowhere: forward, both backward kernels and decode (one and several splits) against the reference.
    (The guard for an early exit after the last valid block, which passed here in interpret mode and on an H100
    but failed another GPU test, and was not kept: docs/BENCHMARKS.md, session 15.)"""
    q, kv, _ = _sparse_inputs(9, 1, 7, 80, 4, 16, 16, 64, jnp.float32)
    rng = np.random.default_rng(10)
    idx = np.full((1, 7, 64), -1, np.int32)
    for t, count in enumerate((0, 1, 16, 17, 33, 64)):
        idx[0, t, :count] = np.sort(rng.choice(80, count, replace=False))
    idx[0, 6, [3, 48]] = [5, 70]  # -1 before and after, last valid slot opens the fourth block
    idx = jnp.asarray(idx)
    d_out = jnp.asarray(rng.standard_normal(q.shape[:3] + (16,)), jnp.float32)
    tiles = Tiles(block_k=16, backward_block_k=16)
    with jax.default_matmul_precision("highest"):
        want, vjp = jax.vjp(lambda q_, kv_: sparse_mla_reference(q_, kv_, idx, scale=0.3, value_dim=16), q, kv)
        want_q, want_kv = vjp(d_out)
        got, vjp = jax.vjp(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=0.3, value_dim=16, tiles=tiles,
                                                             **_flags(impl)), q, kv)
        got_q, got_kv = vjp(d_out)
    tol = 2e-3 if impl == "pallas" else 1e-5
    for t in range(1, 7):
        assert rel_err(got[:, t], want[:, t]) < tol, t
    # (d_q of the one-slot row is zero in exact arithmetic, so the gradients are compared whole)
    assert np.all(np.asarray(got[:, 0]) == 0) and rel_err(got_q, want_q) < tol and rel_err(got_kv, want_kv) < tol
    for splits in (1, 3):
        for t in (4, 6):
            got_decode = sparse_mla_decode_pallas(q[:, t], kv, idx[:, t], scale=0.3, value_dim=16, block_k=16,
                                                  num_splits=splits, **_flags(impl))
            assert rel_err(got_decode, want[:, t]) < tol, (splits, t)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_attention_counts_a_repeated_slot_once_per_occurrence(impl):
    """Slot ids repeated within one token (valid input, though our top-k never repeats one): the forward weighs
    the row once per occurrence and the d_kv scatter adds once per occurrence, in one atomic call, as autodiff of
    the reference does. In interpret mode this needs the scatter-add discharge of `atomic_add_relaxed`."""
    q, kv, _ = _sparse_inputs(7, 1, 3, 10, 4, 16, 16, 8, jnp.float32)
    idx = jnp.asarray([[[4, 4, 4, 1, -1, 4, 9, 1], [2, 2, -1, -1, 7, 7, 7, 7], [0, 5, 5, 5, 5, 5, 5, 3]]], jnp.int32)
    d_out = jnp.asarray(np.random.default_rng(8).standard_normal(q.shape[:3] + (16,)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        want, vjp = jax.vjp(lambda q_, kv_: sparse_mla_reference(q_, kv_, idx, scale=0.3, value_dim=16), q, kv)
        want_q, want_kv = vjp(d_out)
        got, vjp = jax.vjp(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=0.3, value_dim=16, **_flags(impl)),
                           q, kv)
        got_q, got_kv = vjp(d_out)
    tol = 2e-3 if impl == "pallas" else 1e-5
    assert rel_err(got, want) < tol and rel_err(got_q, want_q) < tol and rel_err(got_kv, want_kv) < tol
    assert rel_err(got_kv[:, 4], want_kv[:, 4]) < tol  # row 4, taken 4 times by token 0


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_gradients_pass_a_finite_difference_check(impl):
    q, kv, idx = _sparse_inputs(3, 1, 4, 12, 3, 8, 4, 5, jnp.float32)

    def loss(q_, kv_):
        return jnp.sum(jnp.sin(sparse_mla_pallas(q_, kv_, idx, scale=0.5, value_dim=8, **_flags(impl))))

    with jax.default_matmul_precision("highest"):
        jax.test_util.check_grads(loss, (q, kv), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


# ---- dispatch and the model --------------------------------------------------------------------------------------

def test_default_impl_is_chosen_by_platform():
    assert dispatch.resolve_impl(None) == ("pallas" if ON_GPU else "reference")


@pytest.mark.parametrize("impl", IMPLS)
def test_model_forward_with_pallas_kernels_equals_reference(small_config, small_params, impl):
    tokens = jax.random.randint(jax.random.key(4), (2, 11 if impl == "interpret" else 64), 0, small_config.vocab_size)
    with jax.default_matmul_precision("highest"):
        want = forward(small_params, tokens, "FSFS", config=small_config, impl="reference")
        got = forward(small_params, tokens, "FSFS", config=small_config, impl=impl)
    assert rel_err(got, want) < (1e-5 if impl == "interpret" else 2e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_model_with_fp8_indexer_equals_reference_and_stays_near_bf16_selection(small_config, small_params, impl):
    fp8_config = dataclasses.replace(small_config, indexer_fp8=True)
    tokens = jax.random.randint(jax.random.key(5), (2, 11 if impl == "interpret" else 64), 0, small_config.vocab_size)
    with jax.default_matmul_precision("highest"):
        want = forward(small_params, tokens, "FSFS", config=fp8_config, impl="reference")
        got = forward(small_params, tokens, "FSFS", config=fp8_config, impl=impl)
        chosen_fp8 = np.asarray(layer_indices(small_params, tokens, "FSFS", config=fp8_config, impl="reference"))
        chosen = np.asarray(layer_indices(small_params, tokens, "FSFS", config=small_config, impl="reference"))
    assert rel_err(got, want) < (1e-5 if impl == "interpret" else 2e-3)
    # fp8 scores change some selections (near-ties among a top-4), but keep most: per query, the share of the
    # unquantised selection that fp8 keeps was 0.99 at 11 tokens and 0.84 at 64 (a random top-4 keeps ~0.15).
    # The logits are not the measure: one changed key moves them far in a 4-layer model (51% at 64 tokens).
    kept = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum())
            for a, b in zip(chosen_fp8.reshape(-1, chosen.shape[-1]), chosen.reshape(-1, chosen.shape[-1]),
                            strict=True)]
    assert 0.75 < np.mean(kept) < 1.0
