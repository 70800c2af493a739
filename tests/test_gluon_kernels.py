"""The Gluon sparse MLA forward (`pallas_kernels.sparse_attention_gluon`) and its dispatch.

Gluon has no interpreter, so on CPU (and in CI) the kernel is compiled for sm_90 by Triton's own compiler, which
needs no GPU. It must compile at the production shape and at small, padded and split shapes, fit in shared memory,
not spill, and issue its dots at the shapes that make the two warpgroups split the work: the logits as m64n32
(each warpgroup half of the 64 slots; a duplicated QK^T would show as m64n64) and the value dot as m64n(R/2).
Its numbers are checked on a Hopper GPU against the float32 reference (tests marked gpu).
"""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from pallas_kernels import _gluon
from pallas_kernels._blocking import gather_slot_rows
from pallas_kernels.sparse_attention import (Tiles, _sparse_call, combine_splits, sparse_mla_decode_pallas,
                                             sparse_mla_pallas)
from pallas_kernels.sparse_attention_reference import sparse_mla_decode_reference, sparse_mla_reference

SMEM_LIMIT = 232448  # bytes of shared memory one H100 program may use

# (heads, latent R, rope P, slots K, splits, input dtype, output dtype): padded sizes, as the wrapper passes them
COMPILE_CASES = [(128, 512, 64, 2048, 1, "bf16", "bf16"),  # DeepSeek-V3.2 prefill
                 (128, 512, 64, 2048, 8, "bf16", "fp32"),  # its decode, split
                 (64, 16, 16, 128, 1, "fp16", "fp16"),  # the smallest widths
                 (64, 256, 32, 384, 3, "bf16", "fp32")]


def _compile(heads, r, p, k, splits, dtype, out_dtype, schedule="split_slots"):
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import sparse_attention_gluon as gluon
    constants = gluon.kernel_constants((1, 5, heads, r + p), 300, k, splits, r, 0.1)
    kernel, num_warps = gluon.SCHEDULES[schedule]
    compiled, _ = _gluon.compile_gluon(kernel, [f"*{dtype}", f"*{dtype}", "*i32", f"*{out_dtype}", "*fp32"],
                                       num_warps=num_warps, capability=90, constexprs=constants)
    return compiled


def _ptxas_log(ptx, tmp_path):
    from triton.backends.nvidia.compiler import get_ptxas
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    return subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(source), "-o",
                           str(tmp_path / "kernel.cubin")], capture_output=True, text=True, check=True).stderr


def _sass(tmp_path):
    """The SASS of the cubin `_ptxas_log` last wrote to tmp_path, by the nvdisasm that ships with Triton."""
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    return subprocess.run([nvdisasm, "-c", str(tmp_path / "kernel.cubin")], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_gluon_forward_compiles_for_hopper_splits_each_dot_over_the_warpgroups_and_does_not_spill(
        case, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "")  # as jax-triton's import leaves it: compiling must not need it
    heads, r, p = case[:3]
    compiled = _compile(*case)
    ptx = compiled.asm["ptx"]
    assert compiled.metadata.shared <= SMEM_LIMIT
    shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)
    # one pass of the slot loop: (P + R) / 16 logits steps of m64n32, 64 / 16 value steps of m64n(R/2)
    assert shapes.count("m64n32k16") == (p + r) // 16 and shapes.count(f"m64n{r // 2}k16") == 64 // 16
    assert len(shapes) == (p + r) // 16 + 4, sorted(set(shapes))
    log = _ptxas_log(ptx, tmp_path)
    assert re.search(r"Used (\d+) registers", log) and int(re.search(r"Used (\d+) registers", log)[1]) <= 255
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log


# (heads, R, P, K, splits, dtype, out dtype) with at least two pairs of slot blocks per split
SEESAW_CASES = [(128, 512, 64, 2048, 1, "bf16", "bf16"), (128, 512, 64, 2048, 8, "bf16", "fp32"),
                (64, 256, 32, 768, 3, "bf16", "fp32"), (64, 64, 16, 256, 1, "fp16", "fp16"),
                (192, 128, 128, 512, 2, "bf16", "bf16")]


@pytest.mark.parametrize("case", SEESAW_CASES)
def test_seesaw_schedule_compiles_gives_each_warpgroup_whole_logits_blocks_and_does_not_spill(case, tmp_path):
    """Per warpgroup partition: one m64n64 logits block ((R + P) / 16 steps) and two value dots of its R/2 columns
    (4 steps each); two partitions of 4 warps; shared memory within the estimate the dispatch checks."""
    from collections import Counter

    from pallas_kernels import sparse_attention_gluon as gluon
    heads, r, p, k, splits = case[:5]
    assert gluon.schedule_for(r, p, k // splits) == "seesaw"
    compiled = _compile(*case, schedule="seesaw")
    assert compiled.metadata.num_warps == 8
    assert compiled.metadata.shared <= gluon.seesaw_smem_bytes(r, p) <= SMEM_LIMIT
    ptx = compiled.asm["ptx"]
    shapes = Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
    assert shapes == Counter({"m64n64k16": 2 * (r + p) // 16}) + Counter({f"m64n{r // 2}k16": 2 * 2 * 4}), shapes
    # buffers land by cp.async arrivals of every thread; probabilities and maxima by one arrival per warpgroup
    assert len(re.findall(r"cp\.async\.mbarrier\.arrive\.noinc", ptx)) >= 4
    log = _ptxas_log(ptx, tmp_path)
    assert int(re.search(r"Used (\d+) registers", log)[1]) <= 255
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log


def test_schedule_choice_follows_what_the_seesaw_supports():
    gluon = pytest.importorskip("pallas_kernels.sparse_attention_gluon")
    assert gluon.schedule_for(512, 64, 2048) == "seesaw"  # DeepSeek-V3.2
    assert gluon.schedule_for(512, 64, 256) == "seesaw"
    assert gluon.schedule_for(512, 64, 128) == "split_slots"  # one pair of blocks
    assert gluon.schedule_for(512, 64, 320) == "split_slots"  # not whole pairs
    assert gluon.schedule_for(32, 32, 2048) == "split_slots"  # value halves narrower than 64 bytes
    assert gluon.schedule_for(512, 128, 2048) == "split_slots"  # shared memory
    q = jnp.ones((1, 2, 64, 48), jnp.bfloat16)
    kv = jnp.ones((1, 9, 48), jnp.bfloat16)
    for schedule, match in (("seesaw", "unpadded or unsupported input.*schedule seesaw"),
                            ("pingpong", "schedule must be one of")):
        with pytest.raises(ValueError, match=match):
            gluon.sparse_forward_gluon(q, kv, jnp.zeros((1, 2, 256), jnp.int32), scale=0.1, value_dim=32,
                                       num_splits=1, out_dtype=jnp.float32, schedule=schedule)


def test_gluon_forward_synchronises_its_cta_at_most_8_times():
    """CTA barriers (bar.sync) in the whole kernel at the production shape: 5 in the slot loop, 3 in the prologue
    and epilogue. An earlier schedule had 12 per slot block (cross-warpgroup reductions and a layout conversion),
    and was 7% slower on an H100 (docs/BENCHMARKS.md, session 18)."""
    count = len(re.findall(r"\bbar\.sync\b", _compile(*COMPILE_CASES[0]).asm["ptx"]))
    assert count <= 8, count


def test_forward_kernel_choice_is_validated():
    q = jnp.ones((1, 2, 4, 24), jnp.bfloat16)
    kv = jnp.ones((1, 5, 24), jnp.bfloat16)
    idx = jnp.zeros((1, 2, 3), jnp.int32)
    with pytest.raises(ValueError, match="forward_kernel must be one of"):
        sparse_mla_pallas(q, kv, idx, scale=0.1, value_dim=16, tiles=Tiles(forward_kernel="triton"))
    with pytest.raises(ValueError, match="forward_kernel='gluon' cannot run: .*float32"):
        sparse_mla_pallas(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=0.1, value_dim=16,
                          tiles=Tiles(forward_kernel="gluon"))
    with pytest.raises(ValueError, match="forward_kernel='gluon' cannot run: it takes q and kv of one dtype"):
        sparse_mla_pallas(q, kv.astype(jnp.float16), idx, scale=0.1, value_dim=16, tiles=Tiles(forward_kernel="gluon"))
    with pytest.raises(ValueError, match="forward_kernel='gluon' cannot run: the Pallas interpreter"):
        sparse_mla_pallas(q, kv, idx, scale=0.1, value_dim=16, interpret=True, tiles=Tiles(forward_kernel="gluon"))
    if not _gluon.available():
        with pytest.raises(ValueError, match="forward_kernel='gluon' cannot run"):
            sparse_mla_pallas(q, kv, idx, scale=0.1, value_dim=16, tiles=Tiles(forward_kernel="gluon"))


def test_gluon_forward_refuses_unpadded_or_unsupported_inputs_before_compiling():
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels.sparse_attention_gluon import sparse_forward_gluon
    q = jnp.ones((1, 2, 64, 48), jnp.bfloat16)
    kv = jnp.ones((1, 9, 48), jnp.bfloat16)

    def call(q_=q, kv_=kv, slots=128, splits=1):
        return sparse_forward_gluon(q_, kv_, jnp.zeros((1, 2, slots), jnp.int32), scale=0.1, value_dim=32,
                                    num_splits=splits, out_dtype=jnp.float32)
    for bad in (dict(slots=64), dict(slots=192, splits=3), dict(slots=96), dict(q_=q[:, :, :32]),
                dict(q_=q.astype(jnp.float32), kv_=kv.astype(jnp.float32)), dict(kv_=kv.astype(jnp.float16))):
        with pytest.raises(ValueError, match="unpadded or unsupported input"):
            call(**bad)


@pytest.mark.parametrize("before", [None, "/some/cache"])
def test_importing_jax_triton_leaves_the_triton_cache_setting_as_it_was(before, tmp_path, monkeypatch):
    """jax_triton's import blanks TRITON_CACHE_DIR, which would break every other triton.compile in the process.
    A stand-in module that does the same checks that the import helper puts the setting back."""
    (tmp_path / "jax_triton").mkdir()
    (tmp_path / "jax_triton" / "__init__.py").write_text('import os\nos.environ["TRITON_CACHE_DIR"] = ""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    if before is None:
        monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_DIR", before)
    module = _gluon._import_jax_triton()
    assert module.__file__.startswith(str(tmp_path))
    assert os.environ.get("TRITON_CACHE_DIR") == before


# ---- vmap, on CPU: the real wrapper and validation around a stand-in for jax-triton's launch ------------------

def _stand_in_launch(q, kv, indices, *, kernel, out_shape, grid, num_warps, **constants):
    """`gluon_call` for `sparse_forward_gluon`: the float32 reference per split, from the kernel's constants, handed
    through a callback that, like jax-triton's call, has no batching rule."""
    del kernel, num_warps
    splits, value_dim, scale = constants["SPLITS"], constants["VALUE_DIM"], constants["SCALE_LOG2"] / np.log2(np.e)
    assert grid == (q.shape[1] * q.shape[2] // 64, q.shape[0] * splits)
    q, kv = q.astype(jnp.float32), kv.astype(jnp.float32)
    outs, lses = [], []
    for ids in jnp.split(indices, splits, axis=-1):  # [B, T, K/n]
        outs.append(sparse_mla_reference(q, kv, ids, scale=scale, value_dim=value_dim))
        logits = jnp.einsum("bthl,btkl->bthk", q, gather_slot_rows(kv, ids)) * scale
        lses.append(jax.nn.logsumexp(jnp.where((ids >= 0)[:, :, None], logits, -jnp.inf), axis=-1))
    results = (jnp.stack(outs, 2).astype(out_shape[0].dtype), jnp.stack(lses, 2))
    return jax.pure_callback(lambda *arrays: arrays, tuple(out_shape), *results)


@pytest.fixture
def gluon_stand_in(monkeypatch):
    gluon = pytest.importorskip("pallas_kernels.sparse_attention_gluon")  # needs triton, not a GPU
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(gluon, "gluon_call", _stand_in_launch)
    return gluon


def test_gluon_forward_maps_under_vmap_by_folding_into_its_batch(gluon_stand_in):
    """jax.vmap (nested, any in_axes, shared inputs) over the Gluon prefill and decode equals a loop of the
    reference; the launch itself cannot be vmapped, as jax-triton's cannot."""
    q, kv, idx = _inputs(6, 2, 3, 40, 5, 16, 16, 100, jnp.bfloat16)
    qs = jnp.stack([q, q[:, ::-1], -q])  # [V, B, T, H, L]
    kvs = jnp.stack([kv, kv[:, ::-1]], axis=1)  # [B, V', S, L]
    tiles = Tiles(forward_kernel="gluon")

    def prefill(q_, kv_, idx_):
        return sparse_mla_pallas(q_, kv_, idx_, scale=0.3, value_dim=16, tiles=tiles)

    def reference(q_, kv_, idx_):
        return sparse_mla_reference(q_.astype(jnp.float32), kv_.astype(jnp.float32), idx_, scale=0.3, value_dim=16)

    got = jax.jit(jax.vmap(prefill, in_axes=(0, None, None)))(qs, kv, idx)
    assert got.shape == (3, 2, 3, 5, 16)
    for v in range(3):
        assert rel_err(got[v], reference(qs[v], kv, idx)) < 1.5e-2
    # differentiated (the forward of the custom VJP, which the backward's Pallas kernels would follow)
    got_linearized = jax.vmap(lambda q_: jax.vjp(lambda x: prefill(x, kv, idx), q_)[0])(qs)
    np.testing.assert_array_equal(np.asarray(got_linearized, np.float32), np.asarray(got, np.float32))
    got = jax.vmap(jax.vmap(prefill, in_axes=(None, 1, None)), in_axes=(0, None, None))(qs, kvs, idx)
    assert got.shape == (3, 2, 2, 3, 5, 16)
    for v in range(3):
        for w in range(2):
            assert rel_err(got[v, w], reference(qs[v], kvs[:, w], idx)) < 1.5e-2
    idxs = jnp.stack([idx[:, 2], jnp.where(idx[:, 2] % 3 == 0, -1, idx[:, 2])])  # [V, B, K]
    got = jax.vmap(lambda q_, i_: sparse_mla_decode_pallas(q_, kv, i_, scale=0.3, value_dim=16, num_splits=2,
                                                           forward_kernel="gluon"), in_axes=(None, 0))(q[:, 2], idxs)
    for v in range(2):
        want = sparse_mla_decode_reference(q[:, 2].astype(jnp.float32), kv.astype(jnp.float32), idxs[v],
                                           scale=0.3, value_dim=16)
        assert rel_err(got[v], want) < 1.5e-2
    q_padded = jnp.pad(qs, ((0, 0), (0, 0), (0, 0), (0, 59), (0, 0)))  # 64 heads, 128 slots: as the wrapper pads
    idx_padded = jnp.pad(idx, ((0, 0), (0, 0), (0, 28)), constant_values=-1)
    launch = functools.partial(gluon_stand_in.sparse_forward_gluon, kv=kv, indices=idx_padded, scale=0.3,
                               value_dim=16, num_splits=1, out_dtype=jnp.float32)
    assert launch(q_padded[0])[0].shape == (2, 3, 1, 64, 16)
    with pytest.raises(NotImplementedError, match="vmap"):
        jax.vmap(launch)(q_padded)


# ---- on a Hopper GPU -----------------------------------------------------------------------------------------

def _require_gluon():
    if not _gluon.available():
        pytest.skip(str(_gluon.unavailable_reason()))


def _inputs(seed, b, t, s, h, r, p, k, dtype, holes=0.3):
    """Random q, kv and sorted slot rows; query 0 of each row has no valid slot, the others a random share of -1
    slots anywhere (some whole 64-slot blocks)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, r + p)), dtype)
    kv = jnp.asarray(rng.standard_normal((b, s, r + p)), dtype)
    idx = np.sort(rng.integers(0, s, (b, t, k)), axis=-1).astype(np.int32)
    idx[rng.random(idx.shape) < holes] = -1
    idx[:, 0] = -1
    if k > 128:
        idx[:, 1 % t, 64:128] = -1
    return q, kv, jnp.asarray(idx)


# the last four run the seesaw schedule (at least in prefill)
GPU_SHAPES = [(2, 5, 30, 3, 8, 4, 7), (1, 4, 40, 20, 16, 16, 40), (1, 3, 50, 4, 160, 24, 20),
              (1, 6, 3000, 128, 512, 64, 2048), (2, 3, 700, 96, 512, 64, 300), (2, 4, 500, 64, 64, 16, 600),
              (1, 3, 900, 64, 256, 32, 1000)]


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 1.5e-2), (jnp.float16, 4e-3)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.gpu
def test_gluon_prefill_and_decode_equal_reference(shape, dtype, tol):
    _require_gluon()
    q, kv, idx = _inputs(3, *shape, dtype)
    value_dim = shape[4]
    tiles = Tiles(forward_kernel="gluon")
    with jax.default_matmul_precision("highest"):
        want = sparse_mla_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=0.3,
                                    value_dim=value_dim)
        want_decode = sparse_mla_decode_reference(q[:, 2].astype(jnp.float32), kv.astype(jnp.float32), idx[:, 2],
                                                  scale=0.3, value_dim=value_dim)
    got = sparse_mla_pallas(q, kv, idx, scale=0.3, value_dim=value_dim, tiles=tiles)
    assert got.dtype == dtype and np.isfinite(np.asarray(got, np.float32)).all()
    assert np.all(np.asarray(got[:, 0], np.float32) == 0)  # no valid slot: zeros, like the reference
    assert rel_err(got[:, 1:], want[:, 1:]) < tol
    for splits in (0, 1, 3):
        got_decode = sparse_mla_decode_pallas(q[:, 2], kv, idx[:, 2], scale=0.3, value_dim=value_dim,
                                              num_splits=splits, forward_kernel="gluon")
        assert rel_err(got_decode, want_decode) < tol, splits


@pytest.mark.gpu
def test_gluon_and_pallas_forwards_agree_on_output_and_log_sum_exp():
    """The backward kernels take the forward's log-sum-exp: the Gluon forward's must be the Pallas forward's."""
    _require_gluon()
    q, kv, idx = _inputs(4, 1, 9, 2000, 128, 512, 64, 1024, jnp.bfloat16)
    results = {kernel: _sparse_call(q, kv, idx, scale=0.05, value_dim=512, num_splits=1, out_dtype=jnp.float32,
                                    interpret=False, block_k=64, block_h=32, num_warps=4, forward_kernel=kernel)
               for kernel in ("gluon", "pallas")}
    (out_g, lse_g), (out_p, lse_p) = results["gluon"], results["pallas"]
    assert rel_err(out_g[:, 1:], out_p[:, 1:]) < 2e-3
    assert np.all(np.asarray(lse_g[:, 0]) == -np.inf) and np.all(np.asarray(lse_p[:, 0]) == -np.inf)
    np.testing.assert_allclose(np.asarray(lse_g[:, 1:]), np.asarray(lse_p[:, 1:]), rtol=0, atol=2e-3)


@pytest.mark.gpu
def test_gluon_forward_and_its_gradients_under_vmap_equal_the_pallas_kernels():
    _require_gluon()
    q, kv, idx = _inputs(7, 2, 5, 300, 20, 64, 32, 200, jnp.bfloat16)
    qs = jnp.stack([q, -q, q[:, ::-1]])

    def loss(forward_kernel):
        def f(q_, kv_):
            out = sparse_mla_pallas(q_, kv_, idx, scale=0.2, value_dim=64, tiles=Tiles(forward_kernel=forward_kernel))
            return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32)))
        return jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1)), in_axes=(0, None)))

    (value_g, (dq_g, dkv_g)), (value_p, (dq_p, dkv_p)) = loss("gluon")(qs, kv), loss("pallas")(qs, kv)
    np.testing.assert_allclose(np.asarray(value_g), np.asarray(value_p), rtol=2e-2)
    assert rel_err(dq_g, dq_p) < 2e-2 and rel_err(dkv_g, dkv_p) < 2e-2


@pytest.mark.parametrize("shape,splits,schedule", [
    ((1, 6, 3000, 128, 512, 64, 2048), 1, "split_slots"), ((2, 3, 700, 64, 512, 64, 256), 2, "split_slots"),
    ((1, 4, 40, 64, 16, 16, 128), 1, "split_slots"), ((2, 2, 500, 64, 256, 32, 384), 3, "split_slots"),
    ((1, 6, 3000, 128, 512, 64, 2048), 1, "seesaw"), ((2, 3, 700, 64, 512, 64, 512), 2, "seesaw"),
    ((2, 2, 500, 64, 256, 32, 768), 3, "seesaw"), ((1, 4, 300, 192, 128, 128, 512), 2, "seesaw"),
    ((2, 3, 90, 64, 64, 16, 256), 1, "seesaw")])
@pytest.mark.gpu
def test_gluon_kernel_on_padded_split_inputs_equals_the_reference(shape, splits, schedule):
    """Each schedule of the kernel itself (no dispatch padding) on inputs already padded, with its splits merged
    by their lse."""
    _require_gluon()
    from pallas_kernels.sparse_attention_gluon import sparse_forward_gluon
    q, kv, idx = _inputs(8, *shape, jnp.bfloat16)
    value_dim = shape[4]
    out, lse = sparse_forward_gluon(q, kv, idx, scale=0.3, value_dim=value_dim, num_splits=splits,
                                    out_dtype=jnp.float32, schedule=schedule)
    assert np.all(np.asarray(lse[:, 0]) == -np.inf) and np.isfinite(np.asarray(lse[:, 1:])).all()
    merged, _ = combine_splits(out, lse)
    with jax.default_matmul_precision("highest"):
        want = sparse_mla_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=0.3,
                                    value_dim=value_dim)
    assert rel_err(merged[:, 1:], want[:, 1:]) < 1.5e-2 and np.all(np.asarray(merged[:, 0]) == 0)


@pytest.mark.gpu
def test_gluon_forward_with_more_tokens_than_a_grid_axis_holds():
    """70000 tokens: more than the 65535 programs of a CUDA grid's second or third axis."""
    _require_gluon()
    q, kv, idx = _inputs(5, 1, 70000, 500, 3, 16, 16, 128, jnp.bfloat16, holes=0.1)
    got = sparse_mla_pallas(q, kv, idx, scale=0.3, value_dim=16, tiles=Tiles(forward_kernel="gluon"))
    rows = np.array([1, 2, 65535, 65536, 69999])
    want = sparse_mla_reference(q[:, rows].astype(jnp.float32), kv.astype(jnp.float32), idx[:, rows], scale=0.3,
                                value_dim=16)
    assert rel_err(got[:, rows], want) < 1.5e-2
