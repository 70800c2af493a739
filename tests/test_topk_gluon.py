"""The Gluon passes of the top-k (`pallas_kernels.topk_gluon`: candidates and select) and their dispatch.

Gluon has no interpreter: on CPU (and in CI) the kernels are compiled for sm_90 by Triton's own compiler, which
needs no GPU; they must compile at the production shape and at small ones and not spill, and the candidates pass
must keep its block loop to the barriers of one scan and one sum. On a GPU their outputs must equal the Pallas
kernels' (which the CPU tests check against the reference in interpret mode): the same floor, the same candidates
in the same order, the same counts, the same selected ids, on every path of the select (candidates in registers,
half or all of the buffer; candidates streamed; the whole row, for rows the candidates pass gave up on).
"""

import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _gluon
from pallas_kernels.topk import (FALLBACK, RESIDENT_SLOTS, SAMPLE_MARGIN, _candidates, candidate_counts,
                                 resolve_candidates_kernel, resolve_select_kernel, topk_pallas)
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


# (row length S_pad, W, k, K_pad, resident, select block): DeepSeek-V3.2's rows of 128K, a small row, a buffer too
# large to hold in registers (k = 4096)
SELECT_COMPILE_CASES = [(131072, 8192, 2048, 4096, True, 512), (4096, 256, 64, 128, True, 256),
                        (131072, 16384, 4096, 8192, False, 512)]


@pytest.mark.parametrize("case", SELECT_COMPILE_CASES)
def test_gluon_select_compiles_for_hopper_without_spilling(case, tmp_path):
    pytest.importorskip("triton.experimental.gluon")
    from triton.backends.nvidia.compiler import get_ptxas

    from pallas_kernels import topk_gluon
    compiled, _ = _gluon.compile_gluon(topk_gluon._select_kernel, ["*i32", "*i32", "*fp32", "*i32", "*i32", "*i32"],
                                       num_warps=topk_gluon.NUM_WARPS, capability=90,
                                       constexprs=topk_gluon.select_constants(*case))
    (tmp_path / "k.ptx").write_text(compiled.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log
    assert int(re.search(r"Used (\d+) registers", log)[1]) <= 128, log


def test_select_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="select_kernel must be one of"):
        resolve_select_kernel("triton", False, 512, 8192, 4)
    with pytest.raises(ValueError, match="select_kernel='gluon' cannot run: the Pallas interpreter"):
        resolve_select_kernel("gluon", True, 512, 8192, 4)
    with pytest.raises(ValueError, match="select_kernel='gluon' cannot run: it runs 4 warps .* got 8 warps"):
        resolve_select_kernel("gluon", False, 512, 8192, 8)
    with pytest.raises(ValueError, match="cannot run: .* select block 64, 8192 slots"):
        resolve_select_kernel("gluon", False, 64, 8192, 4)
    with pytest.raises(ValueError, match="cannot run: .* select block 512, 128 slots"):
        resolve_select_kernel("gluon", False, 512, 128, 4)
    with pytest.raises(ValueError, match="cannot run: .* select block 65536, 131072 slots"):
        resolve_select_kernel("gluon", False, 1 << 16, 1 << 17, 4)
    assert resolve_select_kernel("auto", False, 1 << 16, 1 << 17, 4) == "pallas"
    assert resolve_select_kernel("auto", True, 512, 8192, 4) == "pallas"
    assert resolve_select_kernel("auto", False, 512, 128, 4) == "pallas"
    assert resolve_select_kernel("pallas", False, 512, 8192, 4) == "pallas"
    if not _gluon.available():
        assert resolve_select_kernel("auto", False, 512, 8192, 4) == "pallas"
        with pytest.raises(ValueError, match="select_kernel='gluon' cannot run"):
            topk_pallas(jnp.ones((2, 3000)), 100, select_kernel="gluon")


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


def _tied_rows(seed, rows, keys):
    """Rows whose top values tie in blocks: 5000 keys of 2.0 in the even rows (more than half of a k = 2048 buffer,
    and more than k: the select rations them), and a constant row (its candidates overflow: the whole-row select
    runs), the rest random below 2."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (rows, keys)).astype(np.float32)
    for r in range(0, rows, 2):
        x[r, rng.choice(keys, 5000, replace=False)] = 2.0
    x[1] = 1.0
    return jnp.asarray(x)


@pytest.mark.gpu
def test_gluon_select_equals_the_pallas_kernels_and_the_reference_on_every_path():
    _require_gluon()
    scores, lengths = _rows(11, 24, 70000)
    visible = jnp.where(jnp.arange(70000)[None] < lengths[:, None], scores, -jnp.inf)
    visible = jnp.where(jnp.isnan(visible), -jnp.inf, visible)
    tied = _tied_rows(3, 6, 40000)
    cases = [(scores, lengths, visible, 2048, {}),  # candidates in registers (half the buffer; short rows: all)
             (scores, lengths, visible, 4096, {}),  # W = 16384: the candidates are streamed
             (scores, lengths, visible, 100, dict(capacity=512)),  # a small buffer: some rows overflow
             (tied, None, tied, 2048, {})]  # more than half the buffer; a constant row: the whole-row select
    paths = set()
    for rows, lens, want_rows, k, options in cases:
        *_, ids, _, counts = _candidates(rows, k, lens, interpret=False, block=0, select_block=0, num_warps=4,
                                         num_stages=3, capacity=options.get("capacity", 0), sample=1024)
        width = ids.shape[1]
        paths |= {"whole row" if c == FALLBACK else "streamed" if width > RESIDENT_SLOTS else
                  "resident, all" if c > width // 2 else "resident, half" for c in np.asarray(counts)}
        got = np.asarray(topk_pallas(rows, k, lens, select_kernel="gluon", **options))
        np.testing.assert_array_equal(got, np.asarray(topk_pallas(rows, k, lens, select_kernel="pallas", **options)))
        np.testing.assert_array_equal(got, np.asarray(topk_reference(want_rows, k)))
    assert paths == {"whole row", "streamed", "resident, all", "resident, half"}, paths
    mapped = jax.vmap(lambda x, n: topk_pallas(x, 2048, n, select_kernel="gluon"))(
        scores.reshape(2, 12, -1), lengths.reshape(2, 12))
    np.testing.assert_array_equal(mapped.reshape(24, 2048), topk_reference(visible, 2048))
