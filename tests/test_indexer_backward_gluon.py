"""The Gluon backward of the indexer scores (`pallas_kernels.indexer_backward_gluon`): the dense warm-up's gradient.

Gluon has no interpreter, so on CPU (and in CI) both kernels are compiled for sm_90 by Triton's own compiler: they
must not spill and must issue their two dots at the expected shapes with the A operand from registers. The key
side's step bounds are checked against brute force. The numbers are checked on a Hopper GPU (tests marked gpu)
against autodiff of the float32 reference and against the Pallas kernels.
"""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import check_kernel_choice_rules, rel_err
from pallas_kernels.indexer import indexer_scores_trainable, resolve_backward_kernel
from pallas_kernels.indexer_reference import indexer_scores_reference


# (padded heads, padded index head dim, dtype)
COMPILE_CASES = [(64, 128, "bf16"), (128, 128, "bf16"), (16, 32, "fp16"), (32, 64, "bf16")]


@pytest.mark.parametrize("heads,width,dtype", COMPILE_CASES)
def test_backward_kernels_compile_for_hopper_with_register_operands_and_do_not_spill(heads, width, dtype, tmp_path):
    """Per step, each kernel issues the logits dot (m64n64, width / 16 steps) and the gradient dot (m64n<width>,
    64 / 16 steps), both with the A operand a register vector (q or k loaded once; G from registers), not a
    shared-memory descriptor."""
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels import _gluon
    from pallas_kernels import indexer_backward_gluon as gluon
    from test_gluon_kernels import SMEM_LIMIT, _ptxas_log
    constants = gluon.kernel_constants(256 // heads * 4, 512, heads, width)
    inputs = [f"*{dtype}", "*fp32", f"*{dtype}", "*i32", "*fp32"]
    for kernel, pointers in ((gluon._query_side_kernel, inputs + [f"*{dtype}", "*fp32"]),
                             (gluon._key_side_kernel, inputs + ["*i32", "*fp32"])):
        splits = {"SPLITS": 3} if kernel is gluon._key_side_kernel else {}
        compiled, _ = _gluon.compile_gluon(kernel, pointers, num_warps=gluon.NUM_WARPS, capability=90,
                                           constexprs=constants | splits)
        assert compiled.metadata.shared <= SMEM_LIMIT
        ptx = compiled.asm["ptx"]
        kind = {"bf16": "bf16", "fp16": "f16"}[dtype]
        dots = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.{kind}\.{kind} "
                          r"\{[^}]*\}, (\S)", ptx)
        assert Counter(dots) == Counter({("m64n64k16", "{"): width // 16}) + Counter(
            {(f"m64n{width}k16", "{"): 64 // 16}), (kernel.__name__, dots)
        log = _ptxas_log(ptx, tmp_path)
        assert int(re.search(r"Used (\d+) registers", log)[1]) <= 255
        assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log


@pytest.mark.parametrize("heads,splits", [(16, 1), (64, 3), (128, 16)])
def test_key_side_steps_cover_exactly_the_queries_that_see_each_key_tile(heads, splits):
    """Positions rising (prefill with a cache offset, padded queries at -1 at the end), falling and random: each
    key tile's runs, back to back, start at the row step of the first query that sees one of its keys and end with
    the last; every run but the last non-empty ones has the same length."""
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels.indexer_backward_gluon import KEYS, STEP_ROWS, key_side_steps
    num_q, num_keys = 24, 4 * KEYS.value
    rng = np.random.default_rng(0)
    positions = np.stack([np.r_[np.arange(20) + 300, [-1] * 4], np.arange(num_q)[::-1] * 20,
                          rng.integers(-1, num_keys, num_q), np.full(num_q, -1)]).astype(np.int32)
    got = np.asarray(key_side_steps(jnp.asarray(positions), num_keys, heads, splits))
    assert got.shape == (4, num_keys // KEYS.value, splits, 2)
    for b in range(4):
        for tile in range(num_keys // KEYS.value):
            seeing = np.flatnonzero(positions[b] >= tile * KEYS.value)
            runs = got[b, tile]
            if not len(seeing):
                assert (runs[:, 1] == 0).all()
                continue
            first = seeing[0] * heads // STEP_ROWS.value
            end = -(-(seeing[-1] + 1) * heads // STEP_ROWS.value)
            covered = np.concatenate([np.arange(start, start + count) for start, count in runs])
            np.testing.assert_array_equal(covered, np.arange(first, end), err_msg=f"{b}, {tile}")
            assert runs[0, 1] == runs[:, 1].max() == -(-(end - first) // splits)


def test_backward_kernel_choice_is_validated_and_explained():
    check_kernel_choice_rules(lambda kernel, interpret: resolve_backward_kernel(
        kernel, interpret=interpret, dtype=jnp.bfloat16, heads=64, width=128), "backward_kernel")


def test_unsupported_inputs_are_named():
    pytest.importorskip("triton.experimental.gluon")
    from pallas_kernels.indexer_backward_gluon import unsupported_reason
    assert unsupported_reason(jnp.bfloat16, 64, 128) is None
    assert "float32" in unsupported_reason(jnp.float32, 64, 128)
    assert "256 heads" in unsupported_reason(jnp.bfloat16, 256, 128)
    assert "index head dim 256" in unsupported_reason(jnp.float16, 64, 256)


# ---- on a Hopper GPU ------------------------------------------------------------------------------------------------

def _require_gluon():
    from pallas_kernels import _gluon
    if not _gluon.available():
        pytest.skip(f"the Gluon kernels cannot run here: {_gluon.unavailable_reason()}")


def _inputs(seed, b, t, s, g, i, dtype, positions):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, g, i), dtype)
    w = jax.random.normal(ks[1], (b, t, g), jnp.float32)
    k = jax.random.normal(ks[2], (b, s, i), dtype)
    if positions == "prefill":  # the last t of s keys, as prefill after a cache
        pos = jnp.broadcast_to(jnp.arange(t) + s - t, (b, t))
    else:  # decode-like and prefill-like rows, padded queries at -1
        pos = jnp.sort(jax.random.randint(ks[3], (b, t), -1, s), axis=1)
    d_scores = jax.random.normal(ks[4], (b, t, s), jnp.float32)  # on every entry: -inf ones take no gradient
    return q, w, k, pos.astype(jnp.int32), d_scores


def _gradients(q, w, k, pos, d_scores, kernel):
    _, vjp = jax.vjp(lambda q_, w_, k_: indexer_scores_trainable(q_, w_, k_, pos, False, kernel), q, w, k)
    return vjp(d_scores)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,positions", [((2, 200, 300, 64, 128), jnp.bfloat16, "prefill"),
                                                   ((1, 70, 150, 8, 32), jnp.bfloat16, "random"),
                                                   ((2, 33, 257, 128, 128), jnp.float16, "random"),
                                                   ((1, 300, 300, 32, 64), jnp.bfloat16, "prefill"),
                                                   ((1, 129, 700, 64, 100), jnp.bfloat16, "random")])
def test_gluon_backward_equals_reference_and_pallas_gradients(shape, dtype, positions):
    """d_q, d_w, d_k against autodiff of the float32 reference (bf16 inputs upcast) and against the Pallas kernels,
    which round G to the input dtype as the Gluon kernels do: they differ only by summation order (and so by the
    rare G entry whose logit's sign or rounding flips)."""
    _require_gluon()
    q, w, k, pos, d_scores = _inputs(5, *shape, dtype, positions)
    assert resolve_backward_kernel("auto", interpret=False, dtype=dtype, heads=shape[3], width=shape[4]) == "gluon"
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda q_, w_, k_: indexer_scores_reference(q_, w_, k_, pos), q.astype(jnp.float32), w,
                         k.astype(jnp.float32))
        want = vjp(d_scores)
    got = _gradients(q, w, k, pos, d_scores, "gluon")
    pallas = _gradients(q, w, k, pos, d_scores, "pallas")
    for name, g, p, ref, dt in zip(("d_q", "d_w", "d_k"), got, pallas, want, (dtype, jnp.float32, dtype),
                                   strict=True):
        assert g.dtype == dt and g.shape == ref.shape, name
        assert rel_err(g, ref) < 1e-2, name  # G rounded to 8 bits of mantissa: ~2e-3 measured
        assert rel_err(g, p) < 2e-3, name


@pytest.mark.gpu
def test_gluon_backward_under_vmap_equals_unmapped():
    _require_gluon()
    q, w, k, pos, d_scores = _inputs(6, 3, 40, 90, 64, 128, jnp.bfloat16, "random")
    mapped = jax.vmap(lambda *a: _gradients(*(x[None] for x in a), "gluon"))(q, w, k, pos, d_scores)
    for b in range(3):
        one = _gradients(q[b:b + 1], w[b:b + 1], k[b:b + 1], pos[b:b + 1], d_scores[b:b + 1], "gluon")
        # d_k is the sum of the key-side runs' fp32 parts, taken by XLA, whose summation order may differ between
        # the folded batch of 3 and a batch of 1: an element near a rounding midpoint can then land one bf16 step
        # (2^-7 relative at most) apart (seen on an H100: one element, in most runs). d_q and d_w are the kernels'.
        for name, m, o, rtol in zip(("d_q", "d_w", "d_k"), mapped, one, (1e-5, 1e-5, 2.0 ** -7), strict=True):
            np.testing.assert_allclose(np.asarray(m[b], np.float32), np.asarray(o, np.float32), rtol=rtol, atol=1e-6,
                                       err_msg=name)


@pytest.mark.gpu
def test_dense_warm_up_gradients_through_the_model_agree_with_the_pallas_backward():
    """The dense warm-up's indexer loss of a bf16 model, differentiated through `forward_with_indexer_loss` with
    the Gluon backward (the default on Hopper) and with the Pallas one: the dispatch hands the option down the
    layer scan, and the indexers' gradients agree to the kernels' rounding."""
    import dataclasses

    from conftest import SMALL
    from indexcache_jax import init_params
    from indexcache_jax.model import forward_with_indexer_loss
    from pallas_kernels import Kernels
    _require_gluon()
    config = dataclasses.replace(SMALL, num_layers=3, dtype="bfloat16")
    assert resolve_backward_kernel("auto", interpret=False, dtype=jnp.bfloat16, heads=config.index_n_heads,
                                   width=config.index_head_dim) == "gluon"
    params = init_params(config, seed=3)
    tokens = jax.random.randint(jax.random.key(11), (2, 40), 0, config.vocab_size)

    def indexer_loss(p, kernel):
        return forward_with_indexer_loss(p, tokens, "FSF", config=config, attention="dense",
                                         impl=Kernels(impl="pallas", indexer_backward=kernel))[1]

    got = jax.grad(indexer_loss)(params, "gluon")
    want = jax.grad(indexer_loss)(params, "pallas")
    compared = 0
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        if np.linalg.norm(np.asarray(w, np.float32)) > 0:
            compared += 1
            assert rel_err(g, w) < 1e-2, jax.tree_util.keystr(path)
    assert compared >= 4  # the indexers' projections of the two Full layers at least
