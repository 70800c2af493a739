"""The Gluon kernels of the indexer's scores over selected slots (`pallas_kernels.indexer_slots_gluon`).

Gluon has no interpreter, so on CPU (and in CI) both kernels are compiled for sm_90 by Triton's own compiler: they
must fit the programs per SM they were tuned for, not spill, issue their dots at the expected shapes with the
expected operands, and add d_k with 16-byte atomics. The wrapper's padding, slicing and vmap folding run around a
stand-in launch. The numbers are checked on a Hopper GPU (tests marked gpu) against autodiff of the float32
reference and against the Pallas kernels.
"""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import check_kernel_choice_rules, rel_err
from pallas_kernels import dispatch
from pallas_kernels.dispatch import Kernels
from pallas_kernels.indexer_reference import indexer_slot_scores_reference
from pallas_kernels.indexer_slots import indexer_slot_scores_trainable, resolve_kernel

SMEM_PER_SM = 232448  # bytes of shared memory the programs on one H100 SM may use together

# (padded index head dim, padded slots, dtype): DeepSeek-V3.2's 128 x 2048, the narrowest width, one block
COMPILE_CASES = [(128, 2048, "bf16"), (16, 192, "fp16"), (64, 64, "bf16")]


@pytest.mark.parametrize("width,slots,dtype", COMPILE_CASES)
def test_slot_kernels_compile_for_hopper_fit_their_programs_per_sm_and_do_not_spill(width, slots, dtype, tmp_path):
    """Forward: the logits dot only (m64n64, rows from shared memory), four programs per SM. Backward: the same
    logits dot, the row dot d_rows = G^T q in pieces of 64 columns (G^T from registers) and d_q = G rows (both
    from shared memory); two programs per SM (shared memory and registers), d_k added with one 16-byte atomic per
    4 columns (no scalar or 8-byte ones)."""
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import _gluon
    from pallas_kernels import indexer_slots_gluon as gluon
    from test_gluon_kernels import _ptxas_log
    kind = {"bf16": "bf16", "fp16": "f16"}[dtype]
    inputs = [f"*{dtype}", "*fp32", f"*{dtype}", "*i32"]
    piece = min(width, 64)
    cases = ((gluon._forward_kernel, inputs + ["*fp32"], gluon.FORWARD_STAGES, 4,
              Counter({("m64n64k16", "%"): width // 16})),
             (gluon._backward_kernel, inputs + ["*fp32", "*fp32", f"*{dtype}", "*fp32", "*fp32"],
              gluon.BACKWARD_STAGES, 2, Counter({("m64n64k16", "%"): width // 16})
              + Counter({(f"m64n{piece}k16", "{"): width // piece * 4}) + Counter({(f"m64n{width}k16", "%"): 4})))
    for kernel, pointers, stages, per_sm, want_dots in cases:
        compiled, _ = _gluon.compile_gluon(kernel, pointers, num_warps=gluon.NUM_WARPS, capability=90,
                                           constexprs=gluon.kernel_constants(1000, 4096, slots, width, stages))
        ptx = compiled.asm["ptx"]
        dots = Counter(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.{kind}\.{kind} "
                                  r"\{[^}]*\}, (\S)", ptx))
        assert dots == want_dots, (kernel.__name__, dots)
        log = _ptxas_log(ptx, tmp_path)
        registers = int(re.search(r"Used (\d+) registers", log)[1])
        assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log
        if width == 128:  # the production shape: as many programs per SM as the timings were taken with
            assert per_sm * compiled.metadata.shared <= SMEM_PER_SM, (kernel.__name__, compiled.metadata.shared)
            assert per_sm * gluon.NUM_WARPS * 32 * registers <= 65536, (kernel.__name__, registers)
        atomics = re.findall(r"atom\.global\.gpu\.relaxed\.add\.(\S+)", ptx)
        if kernel is gluon._backward_kernel:
            assert atomics == ["v4.f32"] * (width // 8), Counter(atomics)  # 64 x width / 128 threads / 4
        else:
            assert atomics == []


def test_slot_kernel_choice_is_validated_and_explained():
    check_kernel_choice_rules(lambda kernel, interpret: resolve_kernel(kernel, interpret=interpret,
                                                                      dtype=jnp.bfloat16, heads=64, width=128),
                              "kernel")
    with pytest.raises(ValueError, match="kernels.slot_scores: must be"):
        Kernels(slot_scores="triton")


def test_unsupported_inputs_are_named():
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels.indexer_slots_gluon import slot_scores_gluon, unsupported_reason
    assert unsupported_reason(jnp.bfloat16, 64, 128) is None and unsupported_reason(jnp.float16, 3, 16) is None
    assert "float32" in unsupported_reason(jnp.float32, 64, 128)
    assert "65 indexer heads" in unsupported_reason(jnp.bfloat16, 65, 128)
    assert "index head dim 256" in unsupported_reason(jnp.bfloat16, 64, 256)
    q = jnp.zeros((1, 4, 32, 128), jnp.bfloat16)  # unpadded heads: the wrapper pads them to 64
    with pytest.raises(ValueError, match=r"slot_scores_gluon: unpadded or unsupported input .*q \(1, 4, 32, 128\)"):
        slot_scores_gluon(q, jnp.zeros((1, 4, 32), jnp.float32), jnp.zeros((1, 8, 128), jnp.bfloat16),
                          jnp.zeros((1, 4, 64), jnp.int32))


# ---- on CPU: the wrapper around a stand-in launch -----------------------------------------------------------------

def _inputs(seed, b, t, s, g, i, k, dtype, drop=0.25):
    """Random q, w, keys, a cotangent, and slot ids with -1 slots scattered, a query with none valid, ids repeated
    within a token, and a whole block of -1 slots between valid ones where k > 128."""
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, t, g, i), dtype)
    w = jax.random.normal(ks[1], (b, t, g), jnp.float32) * g ** -0.5
    keys = jax.random.normal(ks[2], (b, s, i), dtype)
    ids = jax.random.randint(ks[3], (b, t, k), 0, s)
    ids = jnp.where(jax.random.uniform(ks[4], (b, t, k)) < drop, -1, ids).at[0, 0].set(-1)
    if k > 128:
        ids = ids.at[:, 1::2, 64:128].set(-1)
    return q, w, keys, ids.astype(jnp.int32), jax.random.normal(ks[5], (b, t, k), jnp.float32)


def _stand_in_launch(*arrays, kernel, out_shape, grid, num_warps, input_output_aliases=None, **constants):
    """The kernels by their formulas (the reference's autodiff, float32), after checking the launch: padded 64
    heads and a multiple of 64 slots, one program per token."""
    from pallas_kernels import indexer_slots_gluon as gluon
    q, w, k, indices = arrays[:4]
    assert q.shape[2] == 64 and indices.shape[2] % 64 == 0 and w.dtype == jnp.float32 and k.dtype == q.dtype
    assert grid == (q.shape[1], q.shape[0]) and num_warps == gluon.NUM_WARPS
    assert constants == gluon.kernel_constants(q.shape[1], k.shape[1], indices.shape[2], q.shape[3],
                                               constants["STAGES"])
    f32 = [x.astype(jnp.float32) for x in (q, w, k)]
    if kernel is gluon._forward_kernel:
        return indexer_slot_scores_reference(*f32, indices)
    assert input_output_aliases == {5: 2} and arrays[5].shape == k.shape and arrays[5].dtype == jnp.float32
    d_q, d_w, d_k = jax.vjp(lambda *a: indexer_slot_scores_reference(*a, indices), *f32)[1](arrays[4])
    return [d_q.astype(q.dtype), d_w, arrays[5] + d_k]  # d_k is added into the aliased buffer


@pytest.fixture
def gluon_stand_in(monkeypatch):
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import _gluon
    from pallas_kernels import indexer_slots_gluon as gluon
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(gluon, "gluon_call", _stand_in_launch)


def test_auto_takes_gluon_only_for_inputs_it_supports(gluon_stand_in):
    """Where Gluon runs (stood in here), "auto" takes it for 2-byte inputs of at most 64 heads x 128 and Pallas for
    the rest; "gluon" names what it cannot take."""
    def choose(kernel, dtype, heads, width):
        return resolve_kernel(kernel, interpret=False, dtype=dtype, heads=heads, width=width)
    assert choose("auto", jnp.bfloat16, 64, 128) == choose("auto", jnp.float16, 3, 12) == "gluon"
    assert choose("auto", jnp.float32, 64, 128) == choose("auto", jnp.bfloat16, 65, 128) == "pallas"
    assert choose("auto", jnp.bfloat16, 64, 129) == "pallas"  # pads to 256
    with pytest.raises(ValueError, match="kernel='gluon' cannot run: index head dim 256"):
        choose("gluon", jnp.bfloat16, 64, 200)


def test_gluon_wrapper_pads_slices_and_maps_under_vmap(gluon_stand_in):
    """Heads padded to 64 and sliced back, slots padded with -1 to whole blocks, widths to powers of two; under
    jit(vmap(grad)) the mapped axis folds into the batch: forward and gradients equal the reference's."""
    q, w, keys, ids, d = _inputs(0, 3, 5, 40, 3, 12, 70, jnp.float32)
    q, keys = q.astype(jnp.bfloat16), keys.astype(jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, w, keys)]

    def loss(kernel):
        def f(q, w, k, ids, d):
            scores = (indexer_slot_scores_reference(q[None], w[None], k[None], ids[None]) if kernel is None else
                      indexer_slot_scores_trainable(q[None], w[None], k[None], ids[None], False, kernel))
            return jnp.sum(scores * d[None])
        return f

    got = jax.jit(jax.vmap(jax.value_and_grad(loss("gluon"), argnums=(0, 1, 2))))(q, w, keys, ids, d)
    want = jax.vmap(jax.value_and_grad(loss(None), argnums=(0, 1, 2)))(*f32, ids, d)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    for g, r, dtype in zip(got[1], want[1], (jnp.bfloat16, jnp.float32, jnp.bfloat16), strict=True):
        assert g.dtype == dtype and g.shape == r.shape
        assert rel_err(g, r) < 5e-3  # the stand-in rounds d_q to bf16, the wrapper d_k
    scores = indexer_slot_scores_trainable(q, w, keys, ids, False, "gluon")
    assert (np.asarray(scores)[np.asarray(ids) < 0] == 0).all()


# ---- on a Hopper GPU ------------------------------------------------------------------------------------------------

def _require_gluon():
    from pallas_kernels import _gluon
    if not _gluon.available():
        pytest.skip(f"the Gluon kernels cannot run here: {_gluon.unavailable_reason()}")


def _with_grads(kernel, q, w, keys, ids, d):
    out, vjp = jax.vjp(lambda *a: indexer_slot_scores_trainable(*a, ids, False, kernel), q, w, keys)
    return (out,) + vjp(d)


# (B, T, S, G, I, K): DeepSeek-V3.2's heads and width with a ragged slot count, heads and widths below the dot
# minimum, 40 heads padded to 64, one slot block per token, T > S
GPU_SHAPES = [(2, 37, 300, 64, 128, 150), (1, 6, 300, 3, 12, 19), (1, 200, 1000, 40, 64, 300),
              (2, 64, 64, 64, 128, 64), (1, 300, 200, 64, 128, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 5e-3), (jnp.float16, 1e-3)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gluon_slot_scores_and_gradients_equal_the_reference_and_the_pallas_kernels(shape, dtype, tol):
    """Scores (1e-5: fp32 accumulation of the same products) and d_q, d_w, d_k (G rounded to the input dtype, as
    the Pallas kernels round it) against autodiff of the float32 reference, and no further from it than the
    Pallas kernels."""
    _require_gluon()
    q, w, keys, ids, d = _inputs(1, *shape, dtype)
    with jax.default_matmul_precision("highest"):
        f32 = [x.astype(jnp.float32) for x in (q, w, keys)]
        want = jax.vjp(lambda *a: indexer_slot_scores_reference(*a, ids), *f32)
        want = (want[0],) + want[1](d)
    got = jax.jit(lambda *a: _with_grads("gluon", *a))(q, w, keys, ids, d)
    pallas = jax.jit(lambda *a: _with_grads("pallas", *a))(q, w, keys, ids, d)
    assert (np.asarray(got[0])[np.asarray(ids) < 0] == 0).all()
    for name, g, p, r, bound in zip(("scores", "d_q", "d_w", "d_k"), got, pallas, want, (1e-5, tol, 1e-5, tol),
                                    strict=True):
        assert g.dtype == p.dtype and g.shape == r.shape, name
        assert rel_err(g, r) < bound, (name, rel_err(g, r))
        assert rel_err(g, r) <= 1.5 * rel_err(p, r) + 1e-6, (name, rel_err(g, r), rel_err(p, r))


@pytest.mark.gpu
def test_gluon_slot_scores_under_jit_vmap_equal_unmapped():
    """The vmapped call folds the mapped axis into the kernels' batch. d_q, d_w and the scores are one program's
    sums: equal to 1e-6; d_k adds with atomics, in an order that may differ: one bf16 step."""
    _require_gluon()
    q, w, keys, ids, d = _inputs(3, 3, 20, 90, 64, 128, 130, jnp.bfloat16)
    fn = jax.jit(lambda *a: _with_grads("gluon", *a))
    mapped = jax.jit(jax.vmap(lambda *a: _with_grads("gluon", *(x[None] for x in a))))(q, w, keys, ids, d)
    for b in range(3):
        single = fn(q[b:b + 1], w[b:b + 1], keys[b:b + 1], ids[b:b + 1], d[b:b + 1])
        for name, got, want in zip(("scores", "d_q", "d_w", "d_k"), mapped, single, strict=True):
            rtol, atol = (2.0 ** -7, 1e-5) if name == "d_k" else (1e-6, 1e-6)
            np.testing.assert_allclose(np.asarray(got[b], np.float32), np.asarray(want, np.float32), rtol=rtol,
                                       atol=atol, err_msg=name)


@pytest.mark.gpu
def test_dispatch_takes_the_slot_kernel_option():
    """`Kernels.slot_scores` reaches the kernels: "gluon" and "pallas" agree through the dispatch; "gluon" for
    float32 inputs names why it cannot run."""
    _require_gluon()
    q, w, keys, ids, _ = _inputs(5, 1, 30, 100, 64, 128, 70, jnp.bfloat16)
    runs = {kernel: dispatch.indexer_slot_scores(q, w, keys, ids, impl=Kernels(impl="pallas", slot_scores=kernel))
            for kernel in ("gluon", "pallas")}
    assert rel_err(runs["gluon"], runs["pallas"]) < 1e-6
    with pytest.raises(ValueError, match="kernel='gluon' cannot run: it takes bfloat16 or float16 inputs"):
        dispatch.indexer_slot_scores(q.astype(jnp.float32), w, keys.astype(jnp.float32), ids,
                                     impl=Kernels(impl="pallas", slot_scores="gluon"))
