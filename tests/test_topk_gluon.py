"""The Gluon candidates pass of the top-k (`pallas_kernels.topk_gluon`) and its dispatch.

Gluon has no interpreter: on CPU (and in CI) the kernel is compiled for sm_90 by Triton's own compiler, which needs
no GPU; it must compile at the production shape and at a small one, not spill, and keep its block loop to the
barriers of one scan and one sum. On a GPU its output must equal the Pallas kernel's (which the CPU tests check
against the reference in interpret mode): the same floor, the same candidates in the same order, the same counts.
"""

import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _gluon
from pallas_kernels.topk import (FALLBACK, SAMPLE_MARGIN, _candidates, candidate_counts, resolve_candidates_kernel,
                                 topk_pallas)
from pallas_kernels.topk_reference import topk_reference

# (row length S_pad, k, W, block, sample)
COMPILE_CASES = [(131072, 2048, 8192, 1024, 1024), (4096, 64, 256, 512, 512)]


def _compile(row, k, width, block, sample):
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import topk_gluon
    constants = topk_gluon.kernel_constants(row, k, width, block, sample, SAMPLE_MARGIN)
    compiled, _ = _gluon.compile_gluon(topk_gluon._candidates_kernel, ["*i32", "*fp32", "*i32", "*i32", "*i32"],
                                       num_warps=topk_gluon.NUM_WARPS, capability=90, constexprs=constants)
    return compiled


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_gluon_candidates_compile_for_hopper_without_spilling(case, tmp_path):
    from triton.backends.nvidia.compiler import get_ptxas
    ptx = _compile(*case).asm["ptx"]
    (tmp_path / "k.ptx").write_text(ptx)
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log
    assert int(re.search(r"Used (\d+) registers", log)[1]) <= 128, log


def test_gluon_candidates_keep_one_layout_through_the_block_loop():
    """CTA barriers in the whole kernel: the sample's reduction (in its 32-pass loop) and, per block, the scan and
    the sum (two each); the Pallas kernel's block loop alone had 15, most of them layout conversions for the
    scattered stores (docs/BENCHMARKS.md, session 20)."""
    count = len(re.findall(r"\bbar\.sync\b", _compile(*COMPILE_CASES[0]).asm["ptx"]))
    assert count <= 8, count


def test_candidates_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="candidates_kernel must be one of"):
        resolve_candidates_kernel("triton", False, 1024, 1024, 4)
    with pytest.raises(ValueError, match="candidates_kernel='gluon' cannot run: the Pallas interpreter"):
        resolve_candidates_kernel("gluon", True, 1024, 1024, 4)
    with pytest.raises(ValueError, match="candidates_kernel='gluon' cannot run: it runs 4 warps .* got 8 warps"):
        resolve_candidates_kernel("gluon", False, 1024, 1024, 8)
    with pytest.raises(ValueError, match="cannot run: .* block 64, sample 1024"):
        resolve_candidates_kernel("gluon", False, 64, 1024, 4)
    assert resolve_candidates_kernel("auto", True, 1024, 1024, 4) == "pallas"
    assert resolve_candidates_kernel("pallas", False, 1024, 1024, 4) == "pallas"
    if not _gluon.available():
        assert resolve_candidates_kernel("auto", False, 1024, 1024, 4) == "pallas"
        with pytest.raises(ValueError, match="candidates_kernel='gluon' cannot run"):
            topk_pallas(jnp.ones((2, 300)), 4, candidates_kernel="gluon")


def _rows(seed, rows, keys):
    """Random normal rows with ties (rounded) in every other row, some -inf, -0.0 and NaN, ragged lengths (some
    full, some short enough to keep every key)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, keys)).astype(np.float32)
    x[::2] = np.round(x[::2] * 8) / 8
    x[rng.random(x.shape) < 0.05] = -np.inf
    x[rng.random(x.shape) < 0.01] = -0.0
    x[rng.random(x.shape) < 0.001] = np.nan
    lengths = rng.integers(0, keys + 1, rows)
    lengths[:2] = keys
    lengths[2:4] = rng.integers(1, 300, 2)
    return jnp.asarray(x), jnp.asarray(lengths)


def _require_gluon():
    reason = _gluon.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the Gluon kernels cannot run here: {reason}")


@pytest.mark.parametrize("keys,k,capacity", [(70000, 2048, 0), (9000, 64, 0), (5000, 100, 512)])
@pytest.mark.gpu
def test_gluon_candidates_equal_the_pallas_kernels(keys, k, capacity):
    _require_gluon()
    scores, lengths = _rows(keys, 24, keys)
    options = dict(interpret=False, block=0, select_block=0, num_warps=4, num_stages=3, capacity=capacity,
                   sample=1024)
    got = _candidates(scores, k, lengths, candidates_kernel="gluon", **options)[-3:]
    want = _candidates(scores, k, lengths, candidates_kernel="pallas", **options)[-3:]
    (ids, keys_, count), (ids_p, keys_p, count_p) = map(lambda t: [np.asarray(a) for a in t], (got, want))
    np.testing.assert_array_equal(count, count_p)
    assert (count > 0).any() and (count < lengths).any()  # some rows were filtered by a sampled floor
    for r in np.flatnonzero(count > 0):
        np.testing.assert_array_equal(ids[r, :count[r]], ids_p[r, :count[r]])
        np.testing.assert_array_equal(keys_[r, :count[r]], keys_p[r, :count[r]])


@pytest.mark.gpu
def test_top_k_with_the_gluon_candidates_equals_the_reference():
    _require_gluon()
    scores, lengths = _rows(7, 16, 40000)
    visible = jnp.where(jnp.arange(40000)[None] < lengths[:, None], scores, -jnp.inf)
    visible = jnp.where(jnp.isnan(visible), -jnp.inf, visible)  # the kernels never select NaN (sortable_keys)
    for k in (5, 2048):
        got = topk_pallas(scores, k, lengths, candidates_kernel="gluon")
        np.testing.assert_array_equal(got, topk_reference(visible, k))
    counts = candidate_counts(scores, 2048, lengths, candidates_kernel="gluon")
    assert (np.asarray(counts) != FALLBACK).all()
    # under vmap (jax-triton's call has no batching rule: the rows of the mapped axis fold into the kernel's)
    mapped = jax.vmap(lambda x, n: topk_pallas(x, 64, n, candidates_kernel="gluon"))(
        scores.reshape(2, 8, -1), lengths.reshape(2, 8))
    np.testing.assert_array_equal(mapped.reshape(16, 64), topk_reference(visible, 64))
