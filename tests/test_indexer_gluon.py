"""The indexer scores in Gluon (`pallas_kernels.indexer_gluon`), the bf16 head sum they compute, and the dispatch.

Gluon has no interpreter: on CPU (and in CI) the kernel is compiled for sm_90 by Triton's compiler, which needs no
GPU; it must compile at the production shape and at padded small ones, not spill, keep to the registers and shared
memory that let the measured number of programs share an SM, and issue the dots that make its design: the logits
as m64n128k32 (fp8) or m64n128k16 (bf16/fp16), and with the fp8 head sum on the tensor cores a second dot,
m64n8k16 bf16 from registers after one `cvt.rn.relu.bf16x2.f32` per two logits. Its wrapper (padding, slicing,
vmap, input checks) runs on CPU around a stand-in launch. The arithmetic it implements is checked on CPU through
the Pallas kernel in interpret mode (tests/test_pallas_kernels.py) and here against the reference; the kernel's
own scores are checked on a Hopper GPU (tests marked gpu).
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

# (batch, queries, keys, heads, width): DeepSeek-V3.2 prefill, then ragged small and wide shapes, and decode (one
# query per row, the keys walked in splits)
COMPILE_CASES = [(1, 131072, 131072, 64, 128), (1, 37, 100, 4, 16), (2, 64, 256, 128, 64), (1, 8, 64, 200, 200),
                 (64, 1, 131072, 64, 128)]
# (Triton pointer type, head sum, programs per SM at the production shape, as measured on an H100)
VARIANTS = {"fp8 tensor": ("fp8e4nv", "tensor", 4), "fp8 fp32": ("fp8e4nv", "fp32", 3),
            "bf16 fp32": ("bf16", "fp32", 2), "fp16 fp32": ("fp16", "fp32", 2)}
COMPILES = ([(case, "fp8 tensor") for case in COMPILE_CASES] + [(case, "bf16 fp32") for case in COMPILE_CASES]
            + [(COMPILE_CASES[0], "fp8 fp32"), (COMPILE_CASES[1], "fp16 fp32")])


def _compile(batch, num_q, num_keys, heads, width, variant):
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import indexer_gluon
    pointer, head_sum, _ = VARIANTS[variant]
    constants, _ = indexer_gluon.kernel_constants(num_q, num_keys, heads, width, batch=batch,
                                                  itemsize=1 if pointer == "fp8e4nv" else 2, head_sum=head_sum,
                                                  fill_hidden=True)
    compiled, _ = _gluon.compile_gluon(indexer_gluon._scores_kernel,
                                       [f"*{pointer}", "*fp32", f"*{pointer}", "*fp32", "*i32", "*fp32"],
                                       num_warps=indexer_gluon.NUM_WARPS, capability=90, constexprs=constants)
    return compiled, constants


@pytest.mark.parametrize("case, variant", COMPILES)
def test_gluon_scores_compile_for_hopper_with_their_dots(case, variant, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "")  # as jax-triton's import leaves it: compiling must not need it
    from triton.backends.nvidia.compiler import get_ptxas
    compiled, constants = _compile(*case, variant)
    ptx = compiled.asm["ptx"]
    (tmp_path / "k.ptx").write_text(ptx)
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log
    rows, width = constants["BLOCK_Q"] * constants["HEADS"], constants["DIM"]
    dots = collections.Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.f32\.\w+)", ptx))
    pointer, head_sum, programs_per_sm = VARIANTS[variant]
    if pointer == "fp8e4nv":
        logits = {f"m64n{rows}k32.f32.e4m3": width // 32}
    else:
        logits = {f"m64n{rows}k16.f32.{pointer.replace('fp', 'f')}": width // 16}
    if head_sum == "tensor":
        assert dots == {**logits, "m64n8k16.f32.bf16": rows // 16}, dots
        assert "cvt.rn.relu.bf16x2.f32" in ptx
    else:
        assert dots == logits, dots
        assert "cvt.rn.relu" not in ptx and "bf16x2" not in ptx  # nothing rounded: the sum stays in fp32
    assert compiled.metadata.shared + 1024 <= SMEM_PER_SM, compiled.metadata.shared
    if case == COMPILE_CASES[0]:  # the tile (2 queries x 64 heads) and programs per SM it was measured with
        assert rows == 128, constants
        registers = int(re.search(r"Used (\d+) registers", log)[1])
        assert programs_per_sm * 128 * registers <= 65536, log
        assert programs_per_sm * (compiled.metadata.shared + 1024) <= SMEM_PER_SM, compiled.metadata.shared
        from pallas_kernels import indexer_gluon
        assert constants["STAGES"] == indexer_gluon.STAGES


def test_the_widest_two_byte_tiles_take_fewer_ring_stages():
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import indexer_gluon
    from pallas_kernels.sparse_attention import GLUON_SMEM_BYTES
    for itemsize, head_sum, heads, width, stages in [(2, "fp32", 256, 256, 3), (2, "fp32", 64, 128, 4),
                                                     (1, "tensor", 256, 256, 4), (1, "fp32", 256, 256, 4)]:
        constants, _ = indexer_gluon.kernel_constants(64, 64, heads, width, batch=1, itemsize=itemsize,
                                                      head_sum=head_sum, fill_hidden=True)
        assert constants["STAGES"] == stages, (itemsize, heads, width)
        block_bytes = indexer_gluon.BLOCK_K.value * constants["DIM"] * itemsize
        used = constants["BLOCK_Q"] * constants["HEADS"] * constants["DIM"] * itemsize + stages * block_bytes
        assert used <= GLUON_SMEM_BYTES
        if stages < indexer_gluon.STAGES:  # as many as fit
            assert used + block_bytes > GLUON_SMEM_BYTES


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
    common = dict(dtype=jnp.float8_e4m3fn, interpret=False, heads=64, width=128, pallas_tiling=False)
    with pytest.raises(ValueError, match="scores_kernel must be one of .* got 'cuda'"):
        resolve_scores_kernel("cuda", **common)
    assert resolve_scores_kernel("pallas", **common) == "pallas"
    for change, reason in [(dict(interpret=True), "interpreter"), (dict(dtype=jnp.float32), "got float32")]:
        with pytest.raises(ValueError, match=f"scores_kernel='gluon' cannot run: .*{reason}"):
            resolve_scores_kernel("gluon", **{**common, **change})
        assert resolve_scores_kernel("auto", **{**common, **change}) == "pallas"
    for dtype in (jnp.float8_e4m3fn, jnp.bfloat16, jnp.float16):
        if _gluon.available():
            assert resolve_scores_kernel("auto", **{**common, "dtype": dtype}) == "gluon"
            with pytest.raises(ValueError, match="at most 256 heads"):
                resolve_scores_kernel("gluon", **{**common, "dtype": dtype, "heads": 300})
        else:
            assert resolve_scores_kernel("auto", **{**common, "dtype": dtype}) == "pallas"
    # the Pallas kernel's own tiling options keep it under "auto"
    assert resolve_scores_kernel("auto", **{**common, "pallas_tiling": True}) == "pallas"
    assert indexer.gluon_head_sum(True, "bf16") == "tensor"
    assert indexer.gluon_head_sum(True, "fp32") == indexer.gluon_head_sum(False, "bf16") == "fp32"


@pytest.mark.parametrize("option", [dict(walk_keys=False), dict(walk_keys=True), dict(block_k=64),
                                    dict(num_warps=4), dict(rows_per_tile=128), dict(heads_per_step=16),
                                    dict(num_stages=2), {}])
def test_a_pallas_tiling_option_selects_the_pallas_kernel_under_auto(option, monkeypatch):
    seen = []
    real = indexer.resolve_scores_kernel
    monkeypatch.setattr(indexer, "resolve_scores_kernel",
                        lambda *a, **kw: seen.append(kw["pallas_tiling"]) or real(*a, **kw))
    shaped = jax.ShapeDtypeStruct  # traced only: no kernel runs
    jax.eval_shape(functools.partial(indexer.indexer_scores_pallas, interpret=True, **option),
                   shaped((1, 300, 64, 128), jnp.bfloat16), shaped((1, 300, 64), jnp.float32),
                   shaped((1, 64, 128), jnp.bfloat16), shaped((1, 300), jnp.int32))
    assert seen == [bool(option)]


@pytest.mark.parametrize("heads, queries, itemsize, walks", [
    (128, 300, 1, True), (64, 300, 1, False), (64, 600, 1, True), (32, 600, 1, False), (32, 1100, 1, True),
    (64, 1000, 2, False), (64, 1100, 2, True), (64, 100000, 4, False)])
def test_the_pallas_kernel_walks_from_enough_query_tiles(heads, queries, itemsize, walks):
    # The Pallas kernel walks from PROGRAMS_TO_FILL_GPU (264) query tiles of 128 // heads fp8 queries (256 // heads
    # bf16); fp32 inputs never walk by default. Counting query pairs whatever the heads misjudged 32 and 128 heads.
    assert indexer.walks_keys_by_default((1, queries, heads, 128), 4096, itemsize) is walks


def _inputs(seed, b, t, s, g, i):
    """fp8-quantised indexer inputs (q8, w * q_scale, k8, k_scale) and positions, some -1 (padded queries)."""
    q, w, k, pos = _indexer_inputs(seed, b, t, s, g, i, jnp.bfloat16)
    return (*quantize_fp8(q, w, k), pos)


def test_rows_are_walked_in_splits_only_where_the_query_blocks_leave_the_gpu_idle():
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import indexer_gluon
    from pallas_kernels._pallas import PROGRAMS_TO_FILL_GPU
    assert indexer_gluon.key_splits(2048, 2048) == (1, 2048)  # prefill: 4096 queries of 128K, whole rows
    for programs, blocks in [(64, 2048), (64, 512), (1, 5), (8, 64), (38, 5), (1, 1), (527, 4096), (1, 4096),
                             (3, 1000)]:
        splits, split_blocks = indexer_gluon.key_splits(programs, blocks)
        assert (splits - 1) * split_blocks < blocks <= splits * split_blocks  # every block once, no empty split
        assert split_blocks >= min(blocks, indexer_gluon.MIN_SPLIT_BLOCKS)
        # no split longer than the target of 2 x PROGRAMS_TO_FILL_GPU programs needs, but for rows too short to
        # cut into splits of the minimum length
        target_blocks = -(-blocks * programs // (2 * PROGRAMS_TO_FILL_GPU))
        assert split_blocks <= max(2 * indexer_gluon.MIN_SPLIT_BLOCKS - 1, target_blocks)
    assert indexer_gluon.key_splits(64, 2048) == (9, 228)  # decode, B = 64 at 128K: 576 programs
    constants, grid = indexer_gluon.kernel_constants(1, 131072, 64, 128, batch=64, itemsize=1, head_sum="tensor",
                                                     fill_hidden=True)
    assert grid == (1, 9, 64) and constants["BLOCK_Q"] == 1 and constants["NUM_Q"] == 1


# ---- the wrapper, on CPU: padding, slicing and vmap around a stand-in for jax-triton's launch ------------------

def _stand_in_launch(q, w, k, k_scale, positions, *, kernel, out_shape, grid, num_warps, **constants):
    """`gluon_call` for `scores_gluon`: the reference on the padded inputs, checked against the constants, handed
    through a callback that, like jax-triton's call, has no batching rule."""
    del kernel, num_warps
    assert q.shape[1:] == (constants["NUM_Q"], constants["HEADS"], constants["DIM"])
    assert k.shape[1] == constants["NUM_KEYS"] and constants["NUM_KEYS"] % 64 == 0 and k.dtype == q.dtype
    splits = grid[1]  # the key blocks, cut into splits of SPLIT_BLOCKS, none empty
    assert grid == (constants["NUM_Q"] // constants["BLOCK_Q"], splits, q.shape[0])
    assert (splits - 1) * constants["SPLIT_BLOCKS"] < constants["NUM_KEYS"] // 64 <= splits * constants["SPLIT_BLOCKS"]
    fp8 = q.dtype == jnp.float8_e4m3fn
    assert k_scale.shape == ((q.shape[0], constants["NUM_KEYS"]) if fp8 else (q.shape[0],))
    head_sum = "bf16" if constants["TENSOR_HEAD_SUM"] else "fp32"
    scores = indexer_scores_reference(q, w, k, positions, k_scale if fp8 else None, fp8_head_sum=head_sum)
    return jax.pure_callback(lambda x: x, out_shape, scores)


@pytest.mark.parametrize("dtype, head_sum", [("fp8", "bf16"), ("fp8", "fp32"), (jnp.bfloat16, "bf16"),
                                             (jnp.float16, "fp32")])
def test_gluon_wrapper_pads_slices_and_maps_under_vmap(dtype, head_sum, monkeypatch):
    indexer_gluon = pytest.importorskip("pallas_kernels.indexer_gluon")  # needs triton, not a GPU
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(indexer_gluon, "gluon_call", _stand_in_launch)
    if dtype == "fp8":
        q, w, k, k_scale, pos = _inputs(1, 2, 7, 100, 5, 20)  # 5 heads of 20 -> 16 of 32; 7 queries -> 8
    else:  # 2-byte inputs: widths pad to 16, queries to 8 per program with 16 heads; k in fp32 is cast
        q, w, k, pos = _indexer_inputs(1, 2, 7, 100, 5, 20, dtype)
        k, k_scale = k.astype(jnp.float32), None
    want = indexer_scores_reference(q, w, k.astype(q.dtype), pos, k_scale, fp8_head_sum=head_sum)
    got = indexer_scores_pallas(q, w, k, pos, k_scale, scores_kernel="gluon", fp8_head_sum=head_sum)
    assert got.shape == want.shape
    # the padded heads and dims change the reference's summation order only
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    mapped = jax.vmap(lambda a, b_, c: indexer_scores_pallas(a, b_, k, c, k_scale, scores_kernel="gluon",
                                                             fp8_head_sum=head_sum),
                      in_axes=1)(q[:, :, None], w[:, :, None], pos[:, :, None])
    np.testing.assert_allclose(jnp.moveaxis(mapped, 0, 1)[:, :, 0], want, rtol=1e-5, atol=1e-5)


def test_gluon_scores_reject_inputs_that_do_not_match_their_head_sum():
    indexer_gluon = pytest.importorskip("pallas_kernels.indexer_gluon")
    q8, w8, k8, k_scale, pos = _inputs(1, 1, 4, 64, 4, 16)
    q, w, k, _ = _indexer_inputs(1, 1, 4, 64, 4, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="head_sum must be one of .* got 'bf16'"):
        indexer_gluon.scores_gluon(q8, w8, k8, pos, k_scale, head_sum="bf16")
    with pytest.raises(ValueError, match="2-byte inputs neither: got q bfloat16, k_scale None, head_sum='tensor'"):
        indexer_gluon.scores_gluon(q, w, k, pos, head_sum="tensor")
    with pytest.raises(ValueError, match="got q float8_e4m3fn, k_scale None"):
        indexer_gluon.scores_gluon(q8, w8, k8, pos, head_sum="fp32")
    with pytest.raises(ValueError, match="got q bfloat16, k_scale given"):
        indexer_gluon.scores_gluon(q, w, k, pos, k_scale, head_sum="fp32")
    with pytest.raises(ValueError, match="q must be float8_e4m3fn, bfloat16 or float16, got float32"):
        indexer_gluon.scores_gluon(q.astype(jnp.float32), w, k, pos, head_sum="fp32")


# ---- the kernel, on a Hopper GPU ---------------------------------------------------------------------------------

def _require_gluon():
    if not _gluon.available():
        pytest.skip(f"Gluon kernels cannot run here: {_gluon.unavailable_reason()}")


# ragged; padded heads and widths (rows walked in 4 splits); a 4096-key row in 16 splits; 200 heads of 200;
# decode (one query, 16 splits); two queries per row of 5000 keys, in splits
GPU_SHAPES = [(2, 37, 300, 64, 128), (1, 130, 1000, 4, 16), (2, 9, 200, 128, 64), (1, 64, 4096, 64, 128),
              (1, 3, 70, 200, 200), (8, 1, 4096, 64, 128), (3, 2, 5000, 64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
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
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", ["fp8", jnp.bfloat16, jnp.float16])
def test_gluon_scores_with_the_fp32_head_sum_equal_the_reference(shape, dtype):
    _require_gluon()
    if dtype == "fp8":
        q, w, k, k_scale, pos = _inputs(4, *shape)
    else:
        (q, w, k, pos), k_scale = _indexer_inputs(4, *shape, dtype), None
    want = np.asarray(indexer_scores_reference(q, w, k, pos, k_scale, fp8_head_sum="fp32"))
    visible = np.isfinite(want)
    got = np.asarray(indexer_scores_pallas(q, w, k, pos, k_scale, scores_kernel="gluon", fp8_head_sum="fp32"))
    assert (np.isfinite(got) == visible).all()
    # 2-byte products are exact in fp32 and summed in fp32 (in another order than the reference); fp8's k32
    # chains are summed in the tensor cores' narrower accumulator (~1e-4)
    assert rel_err(got[visible], want[visible]) < (3e-4 if dtype == "fp8" else 1e-5)
    pallas = np.asarray(indexer_scores_pallas(q, w, k, pos, k_scale, scores_kernel="pallas", fp8_head_sum="fp32"))
    assert rel_err(got[visible], pallas[visible]) < (3e-4 if dtype == "fp8" else 1e-5)
    unwritten = np.asarray(indexer_scores_pallas(q, w, k, pos, k_scale, scores_kernel="gluon", fp8_head_sum="fp32",
                                                 fill_hidden=False))
    np.testing.assert_array_equal(unwritten[visible], got[visible])


@pytest.mark.gpu
def test_indexer_topk_through_the_gluon_scores_selects_the_reference_keys():
    _require_gluon()
    q8, w8, k8, k_scale, pos = _inputs(3, 2, 600, 3000, 64, 128)
    q, w = q8.astype(jnp.float32), w8  # already quantised: quantising again is exact (amax maps to 448)
    for kernel in ("gluon", "pallas"):
        got = np.asarray(indexer_topk_pallas(q, w, k8, pos, topk=64, k_scale=k_scale, scores_kernel=kernel))
        want = np.asarray(indexer_topk_reference(q, w, k8, pos, topk=64, k_scale=k_scale))
        assert (np.sort(got, -1) == np.sort(want, -1)).mean() > 0.99, kernel  # equal but for near-ties
    qb, wb, kb, pos = _indexer_inputs(3, 2, 600, 3000, 64, 128, jnp.bfloat16)
    want = np.asarray(indexer_topk_reference(qb, wb, kb, pos, topk=64))
    got = np.asarray(indexer_topk_pallas(qb, wb, kb, pos, topk=64, scores_kernel="gluon"))
    assert (np.sort(got, -1) == np.sort(want, -1)).mean() > 0.999
