"""The fp8 indexer scores in Gluon (`pallas_kernels.indexer_gluon`), the bf16 head sum they compute, and the dispatch.

Gluon has no interpreter: on CPU (and in CI) the kernel is compiled for sm_90 by Triton's compiler, which needs no
GPU; it must compile at the production shape and at padded small ones, not spill, keep to the registers and shared
memory that let four programs share an SM, and issue the two dots that make its design (the fp8 logits as
m64n128k32, the head sum as m64n8k16 bf16 from registers after one `cvt.rn.relu.bf16x2.f32` per two logits). Its
wrapper (padding, slicing, vmap) runs on CPU around a stand-in launch. The arithmetic it implements, the bf16 head
sum, is checked on CPU through the Pallas kernel in interpret mode (tests/test_pallas_kernels.py) and here against
the reference; the kernel's own scores are checked on a Hopper GPU (tests marked gpu).
"""

import collections
import functools
import re
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import rel_err
from test_pallas_kernels import _indexer_inputs
from pallas_kernels import _gluon, dispatch, indexer
from pallas_kernels.indexer import indexer_scores_pallas, indexer_topk_pallas, resolve_scores_kernel
from pallas_kernels.indexer_reference import (indexer_scores_reference, indexer_topk_reference, quantize_fp8,
                                              round_to_bf16)

SMEM_PER_SM = 233472  # an H100 SM's shared memory, bytes (each resident program also reserves 1 KB)

# (queries, keys, heads, width) as the wrapper passes them: DeepSeek-V3.2, then padded small and wide shapes
COMPILE_CASES = [(131072, 131072, 64, 128), (40, 128, 4, 16), (64, 256, 128, 64), (8, 64, 200, 200)]


def _compile(num_q, num_keys, heads, width):
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import indexer_gluon
    constants = indexer_gluon.kernel_constants(num_q, num_keys, heads, width, True)
    compiled, _ = _gluon.compile_gluon(indexer_gluon._fp8_scores_kernel,
                                       ["*fp8e4nv", "*fp32", "*fp8e4nv", "*fp32", "*i32", "*fp32"],
                                       num_warps=indexer_gluon.NUM_WARPS, capability=90, constexprs=constants)
    return compiled, constants


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_gluon_scores_compile_for_hopper_with_the_head_sum_on_the_tensor_cores(case, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "")  # as jax-triton's import leaves it: compiling must not need it
    from triton.backends.nvidia.compiler import get_ptxas
    compiled, constants = _compile(*case)
    ptx = compiled.asm["ptx"]
    (tmp_path / "k.ptx").write_text(ptx)
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log
    rows, width = constants["BLOCK_Q"] * constants["HEADS"], constants["DIM"]
    dots = collections.Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.f32\.\w+)", ptx))
    assert dots == {f"m64n{rows}k32.f32.e4m3": width // 32, "m64n8k16.f32.bf16": rows // 16}, dots
    assert "cvt.rn.relu.bf16x2.f32" in ptx
    if case == COMPILE_CASES[0]:  # four programs per SM: registers and shared memory
        registers = int(re.search(r"Used (\d+) registers", log)[1])
        assert 4 * 128 * registers <= 65536, log
        assert 4 * (compiled.metadata.shared + 1024) <= SMEM_PER_SM, compiled.metadata.shared


def test_round_to_bf16_rounds_as_the_hardware_conversion():
    rng = np.random.default_rng(0)
    ties = [1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8)]  # halfway: to the even neighbour
    x = np.concatenate([rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000),
                        [0.0, -0.0, 3.0e38] + ties]).astype(np.float32)
    want = x.astype(ml_dtypes.bfloat16).astype(np.float32)  # round to nearest, ties to even
    np.testing.assert_array_equal(np.asarray(round_to_bf16(jnp.asarray(x))), want)


def test_fp8_head_sums_differ_by_bf16_rounding_only():
    ks = jax.random.split(jax.random.key(0), 3)
    q8, w8, k8, k_scale = quantize_fp8(jax.random.normal(ks[0], (2, 9, 8, 32)), jax.random.normal(ks[1], (2, 9, 8)),
                                       jax.random.normal(ks[2], (2, 40, 32)))
    pos = jnp.array([np.arange(9) * 4, np.arange(9) + 30], jnp.int32)
    bf16, fp32 = (np.asarray(indexer_scores_reference(q8, w8, k8, pos, k_scale, fp8_head_sum=h)) for h in ("bf16",
                                                                                                           "fp32"))
    visible = np.isfinite(fp32)
    assert (np.isfinite(bf16) == visible).all()
    # each term rounded twice by at most 2^-9: the sum moves by well under 1%, and it does move
    assert 1e-5 < rel_err(bf16[visible], fp32[visible]) < 1e-2
    # the unquantised scores ignore the option
    q, w, k = (x.astype(jnp.float32) for x in (q8, w8, k8))
    np.testing.assert_array_equal(indexer_scores_reference(q, w, k, pos, fp8_head_sum="bf16"),
                                  indexer_scores_reference(q, w, k, pos, fp8_head_sum="fp32"))
    with pytest.raises(ValueError, match="fp8_head_sum must be one of .* got 'fp16'"):
        indexer_scores_reference(q8, w8, k8, pos, k_scale, fp8_head_sum="fp16")
    with pytest.raises(ValueError, match="fp8_head_sum must be one of"):
        dispatch.indexer_topk(q, w, k, pos, topk=4, fp8=True, fp8_head_sum="f32")


def test_scores_kernel_choice_is_validated():
    common = dict(fp8=True, fp8_head_sum="bf16", interpret=False, heads=64, width=128, walks_by_default=True,
                  walk_keys=None, pallas_tiling=False)
    with pytest.raises(ValueError, match="scores_kernel must be one of .* got 'cuda'"):
        resolve_scores_kernel("cuda", **common)
    assert resolve_scores_kernel("pallas", **common) == "pallas"
    for change, reason in [(dict(interpret=True), "interpreter"), (dict(fp8=False), "fp8 inputs only"),
                           (dict(fp8_head_sum="fp32"), "fp8_head_sum='fp32'")]:
        with pytest.raises(ValueError, match=f"scores_kernel='gluon' cannot run: .*{reason}"):
            resolve_scores_kernel("gluon", **{**common, **change})
        assert resolve_scores_kernel("auto", **{**common, **change}) == "pallas"
    if _gluon.available():
        assert resolve_scores_kernel("auto", **common) == "gluon"
        with pytest.raises(ValueError, match="at most 256 heads"):
            resolve_scores_kernel("gluon", **{**common, "heads": 300})
    else:
        assert resolve_scores_kernel("auto", **common) == "pallas"
    # the Pallas kernel's own tiling options, few query tiles (decode) or walk_keys=False keep it under "auto"
    for change in (dict(pallas_tiling=True), dict(walks_by_default=False), dict(walk_keys=False)):
        assert resolve_scores_kernel("auto", **{**common, **change}) == "pallas"


@pytest.mark.parametrize("heads, queries, itemsize, walks", [
    (128, 300, 1, True), (64, 300, 1, False), (64, 600, 1, True), (32, 600, 1, False), (32, 1100, 1, True),
    (64, 1000, 2, False), (64, 1100, 2, True), (64, 100000, 4, False)])
def test_the_kernel_choice_counts_the_query_tiles_the_pallas_kernel_walks(heads, queries, itemsize, walks,
                                                                          monkeypatch):
    # The Pallas kernel walks from PROGRAMS_TO_FILL_GPU (264) query tiles of 128 // heads fp8 queries (256 // heads
    # bf16); fp32 inputs never walk by default. Counting query pairs whatever the heads misjudged 32 and 128 heads.
    assert indexer.walks_keys_by_default((1, queries, heads, 128), 4096, itemsize) is walks
    seen = []
    real = indexer.resolve_scores_kernel
    monkeypatch.setattr(indexer, "resolve_scores_kernel",
                        lambda *a, **kw: seen.append(kw["walks_by_default"]) or real(*a, **kw))
    dtype = {1: jnp.float8_e4m3fn, 2: jnp.bfloat16, 4: jnp.float32}[itemsize]
    shaped = jax.ShapeDtypeStruct  # traced only: no kernel runs
    jax.eval_shape(functools.partial(indexer.indexer_scores_pallas, interpret=True),
                   shaped((1, queries, heads, 128), dtype), shaped((1, queries, heads), jnp.float32),
                   shaped((1, 64, 128), dtype), shaped((1, queries), jnp.int32),
                   shaped((1, 64), jnp.float32) if itemsize == 1 else None)
    assert seen == [walks]


def _inputs(seed, b, t, s, g, i):
    """fp8-quantised indexer inputs (q8, w * q_scale, k8, k_scale) and positions, some -1 (padded queries)."""
    q, w, k, pos = _indexer_inputs(seed, b, t, s, g, i, jnp.bfloat16)
    return (*quantize_fp8(q, w, k), pos)


# ---- the wrapper, on CPU: padding, slicing and vmap around a stand-in for jax-triton's launch ------------------

def _stand_in_launch(q, w, k, k_scale, positions, *, kernel, out_shape, grid, num_warps, **constants):
    """`gluon_call` for `fp8_scores_gluon`: the reference on the padded inputs, checked against the constants, handed
    through a callback that, like jax-triton's call, has no batching rule."""
    del kernel, num_warps
    assert q.shape[1:] == (constants["NUM_Q"], constants["HEADS"], constants["DIM"])
    assert k.shape[1] == constants["NUM_KEYS"] and constants["NUM_KEYS"] % 64 == 0
    assert grid == (constants["NUM_Q"] // constants["BLOCK_Q"], q.shape[0])
    scores = indexer_scores_reference(q, w, k, positions, k_scale)
    return jax.pure_callback(lambda x: x, out_shape, scores)


def test_gluon_wrapper_pads_slices_and_maps_under_vmap(monkeypatch):
    indexer_gluon = pytest.importorskip("pallas_kernels.indexer_gluon")  # needs triton, not a GPU
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(indexer_gluon, "gluon_call", _stand_in_launch)
    q8, w8, k8, k_scale, pos = _inputs(1, 2, 7, 100, 5, 20)  # 5 heads of 20 -> 16 of 32; 7 queries -> 8
    want = indexer_scores_reference(q8, w8, k8, pos, k_scale)
    got = indexer_scores_pallas(q8, w8, k8, pos, k_scale, scores_kernel="gluon")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    mapped = jax.vmap(lambda a, b_, c: indexer_scores_pallas(a, b_, k8, c, k_scale, scores_kernel="gluon"),
                      in_axes=1)(q8[:, :, None], w8[:, :, None], pos[:, :, None])
    np.testing.assert_allclose(jnp.moveaxis(mapped, 0, 1)[:, :, 0], want, rtol=1e-6, atol=1e-6)


# ---- the kernel, on a Hopper GPU ---------------------------------------------------------------------------------

def _require_gluon():
    if not _gluon.available():
        pytest.skip(f"Gluon kernels cannot run here: {_gluon.unavailable_reason()}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 37, 300, 64, 128), (1, 130, 1000, 4, 16), (2, 9, 200, 128, 64),
                                   (1, 64, 4096, 64, 128)])
def test_gluon_scores_equal_the_bf16_head_sum_reference(shape):
    _require_gluon()
    q8, w8, k8, k_scale, pos = _inputs(2, *shape)
    want = np.asarray(indexer_scores_reference(q8, w8, k8, pos, k_scale))
    visible = np.isfinite(want)
    got = np.asarray(indexer_scores_pallas(q8, w8, k8, pos, k_scale, scores_kernel="gluon"))
    assert (np.isfinite(got) == visible).all()
    # The fp8 tensor cores sum each k32 chain in a narrower accumulator than fp32 (tests/test_pallas_kernels.py),
    # which can move a logit across a bf16 rounding boundary: one bf16 step (2^-8) of that term.
    assert rel_err(got[visible], want[visible]) < 2e-3
    unwritten = np.asarray(indexer_scores_pallas(q8, w8, k8, pos, k_scale, scores_kernel="gluon",
                                                 fill_hidden=False))
    np.testing.assert_array_equal(unwritten[visible], got[visible])


@pytest.mark.gpu
def test_fp8_indexer_topk_through_the_gluon_scores_selects_the_reference_keys():
    _require_gluon()
    q8, w8, k8, k_scale, pos = _inputs(3, 2, 600, 3000, 64, 128)
    q, w = q8.astype(jnp.float32), w8  # already quantised: quantising again is exact (amax maps to 448)
    for kernel in ("gluon", "pallas"):
        got = np.asarray(indexer_topk_pallas(q, w, k8, pos, topk=64, k_scale=k_scale, scores_kernel=kernel))
        want = np.asarray(indexer_topk_reference(q, w, k8, pos, topk=64, k_scale=k_scale))
        assert (np.sort(got, -1) == np.sort(want, -1)).mean() > 0.99, kernel  # equal but for near-ties
