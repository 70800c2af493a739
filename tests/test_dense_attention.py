"""The dense stages' attention kernels (`pallas_kernels.dense_attention`) against the float32 reference: the causal
output and each head's log-sum-exp, the head-averaged distribution given that lse, the gradients (the backward
kernels; bf16 too), and the dispatch (the attention with its lse, then the constant target; a mask sent to the
reference; the lse kept by rematerialisation). Interpret mode on CPU; on a GPU also the compiled kernels.

Ragged on purpose: queries and keys not multiples of the blocks, a chunk of queries whose positions start inside
the keys (as `query_chunk` gives), padded queries with position -1 (nothing visible), head counts and widths that
are not powers of two, batch 2."""

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from conftest import check_kernel_choice_rules, rel_err
from pallas_kernels.dense_attention import dense_attention_distribution_pallas, dense_attention_pallas
from pallas_kernels.dense_attention_reference import (dense_attention_distribution_reference,
                                                      dense_attention_reference)

ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["interpret"] + (["pallas"] if ON_GPU else [])
SCALE = 0.3
# Small shapes want small tiles; the forward's and the backward's differ, as their defaults do.
TILES = dict(tiles=(32, 16, 4), backward_tiles=(16, 32, 4))
DIST_TILES = dict(tiles=(16, 16, 4))
# (B, T queries, S keys, H, N, P, V, position of the first query)
SHAPES = [(2, 21, 50, 3, 8, 8, 12, 29),  # a last chunk: 21 queries ending at key 49, three key blocks and a part
          (1, 40, 40, 4, 16, 8, 16, 0),  # a whole causal sequence, queries over three blocks (the last partial)
          (2, 9, 70, 2, 24, 16, 8, 30),  # a middle chunk: keys past the last query's position are never visible
          (1, 17, 60, 2, 8, 8, 8, 32)]  # the last query block's one query at 48, the first key of a key block


def _inputs(shape, dtype, seed=0):
    b, t, s, h, n, p, v, first = shape
    ks = jax.random.split(jax.random.key(seed), 5)

    def normal(key, dims):
        return jax.random.normal(key, dims, jnp.float32).astype(dtype)
    positions = jnp.broadcast_to(first + jnp.arange(t, dtype=jnp.int32), (b, t))
    return (normal(ks[0], (b, t, h, n)), normal(ks[1], (b, t, h, p)), normal(ks[2], (b, s, h, n)),
            normal(ks[3], (b, s, p)), normal(ks[4], (b, s, h, v)), positions)


def _f32(xs):
    return tuple(x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in xs)


def _want(inputs):
    with jax.default_matmul_precision("highest"):
        out, lse = dense_attention_reference(*_f32(inputs), scale=SCALE, return_lse=True)
        q_nope, q_rope, k_nope, k_rope, _, positions = _f32(inputs)
        dist = dense_attention_distribution_reference(q_nope, q_rope, k_nope, k_rope, positions, scale=SCALE)
    return out, lse, dist


def _tol(impl, dtype):
    return 1e-5 if impl == "interpret" and dtype == jnp.float32 else 2e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_lse_and_distribution_equal_reference(impl, dtype, shape):
    inputs = _inputs(shape, dtype)
    out, lse = dense_attention_pallas(*inputs, scale=SCALE, interpret=impl == "interpret", return_lse=True,
                                      **TILES)
    q_nope, q_rope, k_nope, k_rope, _, positions = inputs
    dist = dense_attention_distribution_pallas(q_nope, q_rope, k_nope, k_rope, positions, lse, scale=SCALE,
                                               interpret=impl == "interpret", **DIST_TILES)
    want_out, want_lse, want_dist = _want(inputs)
    assert out.dtype == dtype and out.shape == want_out.shape and dist.shape == want_dist.shape
    tol = _tol(impl, dtype)
    assert rel_err(out, want_out) < tol
    assert rel_err(lse, want_lse) < tol
    assert rel_err(dist, want_dist) < tol
    visible = np.arange(shape[2])[None, None, :] <= np.asarray(positions)[:, :, None]
    assert np.all(np.asarray(dist)[~visible] == 0)  # exactly nothing past a query's position
    np.testing.assert_allclose(np.asarray(dist).sum(-1), 1.0, rtol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_queries_see_nothing(impl):
    """Position -1 (a padded query): zeros out, lse -inf, a zero distribution; its neighbours are unaffected."""
    inputs = list(_inputs(SHAPES[0], jnp.float32))
    inputs[5] = inputs[5].at[:, 3].set(-1)
    out, lse = dense_attention_pallas(*inputs, scale=SCALE, interpret=impl == "interpret", return_lse=True,
                                      **TILES)
    dist = dense_attention_distribution_pallas(*inputs[:4], inputs[5], lse, scale=SCALE,
                                               interpret=impl == "interpret", **DIST_TILES)
    assert np.all(np.asarray(out[:, 3]) == 0) and np.all(np.isneginf(np.asarray(lse[:, 3])))
    assert np.all(np.asarray(dist[:, 3]) == 0)
    want_out, _, want_dist = _want(tuple(inputs))
    assert rel_err(out, want_out) < 1e-5 and rel_err(dist, want_dist) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_equal_reference(impl, shape):
    """Output and lse are differentiable in every input but the positions, by the backward kernels (the key
    gradients per key block over all heads, the query gradients per head and query block); a padded query
    (position -1) contributes nothing, and keys no query sees get zero gradients."""
    inputs = list(_inputs(shape, jnp.float32, seed=1))
    inputs[5] = inputs[5].at[:, 1].set(-1)
    cot_out, cot_lse = (jax.random.normal(jax.random.key(7), x.shape) for x in _want(tuple(inputs))[:2])
    cot_lse = jnp.where(inputs[5][..., None] >= 0, cot_lse, 0.0)  # the padded query's lse is -inf

    def loss(fn, *x):
        out, lse = fn(*x, inputs[5])
        return jnp.sum(out * cot_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * cot_lse)

    def kernel(*x):
        return dense_attention_pallas(*x, scale=SCALE, interpret=impl == "interpret", return_lse=True, **TILES)

    def reference(*x):
        return dense_attention_reference(*x, scale=SCALE, return_lse=True)
    got = jax.grad(lambda *x: loss(kernel, *x), argnums=range(5))(*inputs[:5])
    with jax.default_matmul_precision("highest"):
        want = jax.grad(lambda *x: loss(reference, *x), argnums=range(5))(*inputs[:5])
    for name, g, w in zip(("q_nope", "q_rope", "k_nope", "k_rope", "values"), got, want, strict=True):
        assert rel_err(g, w) < (1e-5 if impl == "interpret" else 2e-3), name
    assert np.all(np.asarray(got[0][:, 1]) == 0) and np.all(np.asarray(got[1][:, 1]) == 0)
    unseen = int(np.max(np.asarray(inputs[5]))) + 1
    assert np.all(np.asarray(got[2][:, unseen:]) == 0) and np.all(np.asarray(got[4][:, unseen:]) == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_gradients_equal_the_float32_reference(impl):
    inputs = _inputs(SHAPES[1], jnp.bfloat16, seed=5)
    cot = jax.random.normal(jax.random.key(8), _want(inputs)[0].shape)

    def loss(fn, *x):
        return jnp.sum(fn(*x, inputs[5]).astype(jnp.float32) * cot)
    got = jax.grad(lambda *x: loss(functools.partial(dense_attention_pallas, scale=SCALE, interpret=impl ==
                                                     "interpret", **TILES), *x), argnums=range(5))(*inputs[:5])
    with jax.default_matmul_precision("highest"):
        want = jax.grad(lambda *x: loss(functools.partial(dense_attention_reference, scale=SCALE), *x),
                        argnums=range(5))(*_f32(inputs[:5]))
    for name, g, w in zip(("q_nope", "q_rope", "k_nope", "k_rope", "values"), got, want, strict=True):
        assert rel_err(g, w) < 3e-2, name


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_gives_output_lse_and_a_constant_target(impl):
    """The dispatch's two calls as the model makes them: the attention with its lse, then the distribution given
    that lse (or computing it); no gradient flows through the distribution (a target), while the output's
    gradient is the reference's."""
    inputs = _inputs(SHAPES[2], jnp.float32, seed=2)
    q_nope, q_rope, k_nope, k_rope, _, positions = inputs
    out, lse = pallas_kernels.dense_attention(*inputs, scale=SCALE, impl=impl, return_lse=True)
    want_out, want_lse, want_dist = _want(inputs)
    assert rel_err(out, want_out) < 1e-5 and rel_err(lse, want_lse) < 1e-5
    for given in (lse, None):
        dist = pallas_kernels.dense_attention_distribution(q_nope, q_rope, k_nope, k_rope, positions, scale=SCALE,
                                                           lse=given, impl=impl)
        assert rel_err(dist, want_dist) < 1e-5

    def target(q, lse):
        return jnp.sum(pallas_kernels.dense_attention_distribution(q, q_rope, k_nope, k_rope, positions,
                                                                   scale=SCALE, lse=lse, impl=impl) ** 2)
    through_target = jax.grad(target, argnums=(0, 1))(q_nope, lse)
    assert all(np.all(np.asarray(g) == 0) for g in through_target)
    through_output = jax.grad(lambda q: jnp.sum(pallas_kernels.dense_attention(
        q, *inputs[1:], scale=SCALE, impl=impl) ** 2))(q_nope)
    assert np.linalg.norm(np.asarray(through_output)) > 0


def test_dispatch_sends_a_mask_to_the_reference():
    """A mask (the ground truth of sparse attention in tests) runs the reference in every implementation."""
    inputs = _inputs(SHAPES[1], jnp.float32, seed=3)
    mask = jax.random.bernoulli(jax.random.key(4), 0.6, (1, 40, 40)) | jnp.eye(40, dtype=bool)[None]
    got = pallas_kernels.dense_attention(*inputs, scale=SCALE, impl="interpret", mask=mask)
    want = dense_attention_reference(*inputs, scale=SCALE, mask=mask)
    assert rel_err(got, want) < 1e-6
    dist = pallas_kernels.dense_attention_distribution(*inputs[:4], inputs[5], scale=SCALE, impl="interpret",
                                                       mask=mask)
    assert np.all(np.asarray(dist)[~np.asarray(mask)] == 0)
    assert rel_err(got, dense_attention_reference(*inputs, scale=SCALE)) > 1e-2  # the mask did hide keys


def test_errors_name_the_offending_input():
    q_nope, q_rope, k_nope, k_rope, values, positions = _inputs(SHAPES[0], jnp.float32)
    with pytest.raises(ValueError, match="k_rope"):
        dense_attention_pallas(q_nope, q_rope, k_nope, k_rope[:, :-1], values, positions, scale=SCALE)
    with pytest.raises(ValueError, match="values"):
        dense_attention_pallas(q_nope, q_rope, k_nope, k_rope, values[:, :-1], positions, scale=SCALE)
    with pytest.raises(ValueError, match="q_positions"):
        dense_attention_pallas(q_nope, q_rope, k_nope, k_rope, values, positions[:, :-1], scale=SCALE)
    with pytest.raises(ValueError, match="lse"):
        dense_attention_distribution_pallas(q_nope, q_rope, k_nope, k_rope, positions, jnp.zeros((2, 21, 2)),
                                            scale=SCALE)
    with pytest.raises(ValueError, match="backward_tiles"):
        dense_attention_pallas(q_nope, q_rope, k_nope, k_rope, values, positions, scale=SCALE,
                               backward_tiles=(64, 48, 4))
    with pytest.raises(ValueError, match="tiles"):
        dense_attention_distribution_pallas(q_nope, q_rope, k_nope, k_rope, positions, jnp.zeros((2, 21, 3)),
                                            scale=SCALE, tiles=(64, 64))
    for bad in (0.0, -SCALE, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            dense_attention_pallas(q_nope, q_rope, k_nope, k_rope, values, positions, scale=bad)
    with pytest.raises(ValueError, match="scale must be a concrete"):
        jax.jit(lambda s: dense_attention_pallas(q_nope, q_rope, k_nope, k_rope, values, positions, scale=s))(SCALE)


@pytest.mark.gpu
def test_compiled_kernels_at_deepseek_shapes():
    """128 heads, widths 128 + 64 and values 128, bf16, default tiles (each kernel's own): a chunk of 512 queries
    ending a context of 2048 keys, against the float32 reference; the gradients too."""
    inputs = _inputs((1, 512, 2048, 128, 128, 64, 128, 1536), jnp.bfloat16)
    out, lse = pallas_kernels.dense_attention(*inputs, scale=(192 ** -0.5), impl="pallas", return_lse=True)
    dist = pallas_kernels.dense_attention_distribution(*inputs[:4], inputs[5], scale=(192 ** -0.5), lse=lse,
                                                       impl="pallas")
    cot = jax.random.normal(jax.random.key(8), out.shape)

    def loss(fn, *x):
        return jnp.sum(fn(*x, inputs[5], scale=192 ** -0.5).astype(jnp.float32) * cot)
    got = jax.grad(lambda *x: loss(functools.partial(pallas_kernels.dense_attention, impl="pallas"), *x),
                   argnums=range(5))(*inputs[:5])
    with jax.default_matmul_precision("highest"):
        f32 = _f32(inputs)
        want_out, want_lse = dense_attention_reference(*f32, scale=192 ** -0.5, return_lse=True)
        want_dist = dense_attention_distribution_reference(*f32[:4], f32[5], scale=192 ** -0.5)
        want = jax.grad(lambda *x: loss(dense_attention_reference, *x), argnums=range(5))(*f32[:5])
    assert rel_err(out, want_out) < 2e-2 and rel_err(dist, want_dist) < 2e-2
    for name, g, w in zip(("q_nope", "q_rope", "k_nope", "k_rope", "values"), got, want, strict=True):
        assert rel_err(g, w) < 3e-2, name


def _pallas_calls(jaxpr, name):
    """How many pallas_call equations named `name` the jaxpr holds, at any depth."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "pallas_call" and name in str(eqn.params)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    count += _pallas_calls(sub, name)
    return count


@pytest.mark.parametrize("remat,query_chunk", [("none", 8), ("layer", 0), ("layer", 8)])
def test_warm_up_backward_recomputes_the_distribution_not_the_forward(monkeypatch, remat, query_chunk):
    """The dense warm-up's gradient (interpret kernels, traced): rematerialisation keeps each head's lse
    (mla.DENSE_LSE_NAME), so the backward runs the distribution kernel again but never the attention's forward,
    which appears once per layer scan (two segments in SMALL: dense and MoE layers)."""
    import indexcache_jax.block as block  # noqa: PLC0415
    import indexcache_jax.model as model  # noqa: PLC0415
    from conftest import SMALL  # noqa: PLC0415

    params = model.init_params(SMALL, seed=0)
    tokens = jax.random.randint(jax.random.key(0), (1, 17), 0, SMALL.vocab_size)

    def calls():
        def objective(p):
            return model.training_losses(p, tokens, "FSFS", config=SMALL, attention="dense", impl="interpret",
                                         remat=remat, query_chunk=query_chunk, frozen_main=True)[1]
        jaxpr = jax.make_jaxpr(jax.grad(objective))(params).jaxpr
        return _pallas_calls(jaxpr, "dense_attention_forward"), _pallas_calls(jaxpr, "dense_attention_distribution")
    forward, distribution = calls()
    segments = len(SMALL.layer_segments) * (2 if query_chunk and 16 % query_chunk else 1)
    assert forward == segments and distribution > forward, (forward, distribution)
    monkeypatch.setattr(block, "SAVED_BY_CHUNK_REMAT", (block.TOPK_NAME,))
    monkeypatch.setattr(model, "SAVED_BY_LAYER_REMAT", (block.TOPK_NAME,))
    jax.clear_caches()  # the jitted loss would give back its first trace
    assert calls()[0] > forward  # without the name kept, the backward runs the forward again


def _exp2s_in_flight(sass: str, issued: str, waited: str) -> list:
    """Per stretch of SASS from a line matching `issued` to the next matching `waited`: its MUFU.EX2 count (the
    exp2s ptxas placed while the dot issued there is in flight)."""
    counts, in_flight = [], False
    for line in sass.splitlines():
        if re.search(issued, line) and not in_flight:
            counts.append(0)
            in_flight = True
        elif re.search(waited, line):
            in_flight = False
        elif in_flight and "MUFU.EX2" in line:
            counts[-1] += 1
    return counts


# ---- the Gluon forward (`dense_attention_gluon`): compiled on CPU, run on a Hopper GPU -----------------------------

# (T queries, S keys, H, N, P, V) as the wrapper passes them: DeepSeek-V3.2's chunk; ragged small widths; the widest
# that fit shared memory at 128 keys per step
GLUON_COMPILE_CASES = [(1024, 131072, 128, 128, 64, 128), (300, 1000, 5, 24, 8, 40), (100, 500, 2, 100, 28, 128)]


@pytest.mark.parametrize("case", GLUON_COMPILE_CASES)
def test_gluon_forward_compiles_for_hopper_with_its_dots_and_does_not_spill(case, tmp_path, monkeypatch):
    """Triton's compiler, no GPU: the kernel fits shared memory, keeps within 255 registers without spilling, and
    issues (N + P) / 16 logits steps of m64n(block_k), each warpgroup 64 of the 128 queries, and block_k / 16 value
    steps of m64nV three times each: block 0's logits, then per key block in the unmasked and the masked loop, and
    the last block's value dot. In the SASS, each loop's value dot is still in flight while that loop's exp2s run
    (ptxas waits for it only after most of them)."""
    pytest.importorskip("triton.experimental.gluon")
    from test_gluon_kernels import SMEM_LIMIT, _ptxas_log, _sass  # noqa: PLC0415

    from pallas_kernels import _gluon, dense_attention_gluon  # noqa: PLC0415
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    num_q, num_keys, heads, n, p, v = case
    constants, grid = dense_attention_gluon.kernel_constants(num_q, num_keys, heads, n, p, v, batch=2, scale=0.1)
    n_p, p_p, v_p, block_k = constants["NOPE"], constants["ROPE"], constants["VALUE"], constants["BLOCK_K"]
    assert (n_p, p_p, v_p) == tuple(max(16, 1 << (w - 1).bit_length()) for w in (n, p, v))
    assert grid == (-(-num_q // 128), heads, 2) and constants["KEYS_P"] % block_k == 0
    assert block_k == 128
    compiled, _ = _gluon.compile_gluon(dense_attention_gluon._forward_kernel,
                                       ["*bf16"] * 5 + ["*i32", "*bf16", "*fp32"], num_warps=8, capability=90,
                                       constexprs=constants)
    assert compiled.metadata.shared <= SMEM_LIMIT
    shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", compiled.asm["ptx"])
    logits, values = f"m64n{block_k}k16", f"m64n{v_p}k16"
    if logits == values:
        assert shapes.count(logits) == 3 * ((n_p + p_p) // 16 + block_k // 16)
    else:
        assert shapes.count(logits) == 3 * (n_p + p_p) // 16 and shapes.count(values) == 3 * block_k // 16
    assert len(shapes) == 3 * ((n_p + p_p) // 16 + block_k // 16), sorted(set(shapes))
    log = _ptxas_log(compiled.asm["ptx"], tmp_path)
    assert int(re.search(r"Used (\d+) registers", log)[1]) <= 255
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log
    # exp2s between a value dot's first instruction (its A operand in registers) and the wait for it
    exp2s_under_value_dots = _exp2s_in_flight(_sass(tmp_path), r"HGMMA\.\S+ R\d+, R\d+,",
                                              r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0")
    per_thread = 128 * block_k // (32 * 8)  # one block's probabilities over 8 warps
    assert sum(count >= per_thread // 2 for count in exp2s_under_value_dots) == 2, exp2s_under_value_dots


# (option, resolver in dense_attention, number of inputs, their widths) and each kernel's own width cases: (widths,
# what "auto" takes, the error of an explicit "gluon" or None)
KERNEL_CHOICES = {
    "forward_kernel": ("resolve_forward_kernel", 5, (128, 64, 128), [
        ((128, 64, 256), "pallas", None),
        ((128, 128, 128), "pallas", "more than .* bytes of shared memory")]),  # 128 keys per step do not fit
    "backward_kernel": ("resolve_backward_kernel", 5, (128, 64, 128), [
        ((100, 28, 128), "gluon", None),  # padded: 128 + 32
        ((128, 128, 128), "pallas", r"registers, widths up to 320 in all \(padded\), got \(128, 128, 128\)")]),
    "distribution_kernel": ("resolve_distribution_kernel", 4, (128, 64), [
        ((100, 28), "gluon", None),
        ((128, 128), "pallas", "more than .* bytes of shared memory")]),
}


@pytest.mark.parametrize("which", KERNEL_CHOICES)
def test_kernel_choice_is_validated_and_follows_the_platform(which, monkeypatch):
    """The Gluon-or-Pallas rules the three resolvers share (`dense_attention._resolve_gluon_choice`), then the
    widths each Gluon kernel takes."""
    from pallas_kernels import _gluon  # noqa: PLC0415
    dense_attention = importlib.import_module("pallas_kernels.dense_attention")  # the package's name is a function
    resolver, num_inputs, widths, width_cases = KERNEL_CHOICES[which]
    bf16 = [jnp.bfloat16] * num_inputs
    choose = functools.partial(getattr(dense_attention, resolver), interpret=False, dtypes=bf16, widths=widths,
                               pallas_tiling=False)
    check_kernel_choice_rules(lambda kernel, interpret: choose(kernel, interpret=interpret), which)
    pytest.importorskip("triton.experimental.gluon")
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)  # as on a Hopper GPU
    assert choose("auto") == "gluon"
    assert choose("auto", dtypes=[jnp.float16] * num_inputs) == "gluon"
    assert choose("auto", pallas_tiling=True) == "pallas"  # Pallas tiles were given
    assert choose("auto", dtypes=[jnp.float32] * num_inputs) == "pallas"
    with pytest.raises(ValueError, match=f"{which}='gluon' cannot run: .*bfloat16 or float16 inputs, got float32"):
        choose("gluon", dtypes=[jnp.float32] * num_inputs)
    mixed = bf16[:-1] + [jnp.float16]
    with pytest.raises(ValueError, match=re.escape(f"of one dtype, got {[jnp.dtype(d).name for d in mixed]}")):
        choose("gluon", dtypes=mixed)
    with pytest.raises(ValueError, match="widths up to 128 .* got nope 192"):
        choose("gluon", widths=(192,) + widths[1:])
    for case_widths, auto, error in width_cases:
        assert choose("auto", widths=case_widths) == auto, case_widths
        if error is not None:
            with pytest.raises(ValueError, match=error):
                choose("gluon", widths=case_widths)


def _lse_err(lse, want) -> float:
    """rel_err over the finite entries, once the -inf entries (queries that see nothing) are found to match."""
    lse, want = np.asarray(lse), np.asarray(want)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want))
    return rel_err(lse[np.isfinite(want)], want[np.isfinite(want)])


def _stand_in_forward_launch(qn, qr, kn, kr, v, positions, *, kernel, out_shape, grid, num_warps, **constants):
    """`gluon_call` for `dense_forward_gluon`: the reference on the padded inputs, checked against the constants,
    handed through a callback that, like jax-triton's call, has no batching rule."""
    del kernel, num_warps
    batch, num_q_p, heads, n_p = qn.shape
    assert (num_q_p, heads, n_p, qr.shape[-1], v.shape[-1]) == (constants["NUM_Q"], constants["HEADS"],
                                                                 constants["NOPE"], constants["ROPE"],
                                                                 constants["VALUE"])
    assert kn.shape[1] == kr.shape[1] == v.shape[1] == constants["KEYS_P"]
    assert constants["KEYS_P"] % constants["BLOCK_K"] == 0 and num_q_p % 128 == 0
    assert grid == (num_q_p // 128, heads, batch) and positions.shape == (batch, num_q_p)
    out, lse = dense_attention_reference(qn, qr, kn, kr, v, positions, return_lse=True,
                                         scale=constants["SCALE_LOG2"] / 1.4426950408889634)
    return jax.pure_callback(lambda o, s: (o, s), out_shape, out, jnp.moveaxis(lse, 1, 2))


def test_gluon_forward_wrapper_pads_slices_and_maps_under_vmap(monkeypatch):
    """On CPU, around a stand-in for the launch: the wrapper pads queries to 128, keys to the key tile and widths
    to powers of two (padded queries see nothing), slices the outputs back, and maps under vmap."""
    dense_attention_gluon = pytest.importorskip("pallas_kernels.dense_attention_gluon")  # needs triton, not a GPU
    from pallas_kernels import _gluon  # noqa: PLC0415
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(dense_attention_gluon, "gluon_call", _stand_in_forward_launch)
    inputs = list(_inputs(SHAPES[0], jnp.bfloat16))
    inputs[5] = inputs[5].at[1, 2].set(-1)
    out, lse = dense_attention_pallas(*inputs, scale=SCALE, return_lse=True, forward_kernel="gluon")
    want_out, want_lse, _ = _want(tuple(inputs))
    assert out.shape == want_out.shape and out.dtype == jnp.bfloat16 and lse.shape == want_lse.shape
    assert rel_err(out, want_out) < 1e-2 and _lse_err(lse, want_lse) < 1e-5
    assert np.all(np.asarray(out[1, 2]) == 0) and np.isneginf(np.asarray(lse[1, 2])).all()
    mapped = jax.vmap(lambda *x: dense_attention_pallas(*x, scale=SCALE, return_lse=True, forward_kernel="gluon"),
                      in_axes=(1, 1, None, None, None, 1))(*(x[:, :, None] if i in (0, 1, 5) else x
                                                             for i, x in enumerate(inputs)))
    np.testing.assert_array_equal(np.asarray(jnp.moveaxis(mapped[0], 0, 1)[:, :, 0]), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(jnp.moveaxis(mapped[1], 0, 1)[:, :, 0]), np.asarray(lse))


def _require_gluon():
    from pallas_kernels import _gluon  # noqa: PLC0415
    if not _gluon.available():
        pytest.skip(f"Gluon kernels cannot run here: {_gluon.unavailable_reason()}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", SHAPES + [(1, 300, 1000, 5, 24, 8, 40, 700), (1, 130, 600, 2, 100, 28, 128, 0)])
def test_gluon_forward_equals_the_reference_and_the_pallas_forward(shape, dtype):
    """Ragged shapes (queries past one block of 128, keys past whole key tiles, widths padded), a padded query,
    bf16 and fp16; the same gradients as with the Pallas forward (the backward kernels are shared; only the
    residuals out and lse come from another kernel)."""
    _require_gluon()
    inputs = list(_inputs(shape, dtype, seed=3))
    inputs[5] = inputs[5].at[:, 1].set(-1)
    out, lse = dense_attention_pallas(*inputs, scale=SCALE, return_lse=True, forward_kernel="gluon")
    pallas_out, pallas_lse = dense_attention_pallas(*inputs, scale=SCALE, return_lse=True, forward_kernel="pallas")
    want_out, want_lse, _ = _want(tuple(inputs))
    assert rel_err(out, want_out) < 1e-2 and _lse_err(lse, want_lse) < 1e-5
    assert rel_err(out, pallas_out) < 1e-2 and _lse_err(lse, pallas_lse) < 1e-5
    assert np.all(np.asarray(out[:, 1]) == 0) and np.isneginf(np.asarray(lse[:, 1])).all()
    cot = jax.random.normal(jax.random.key(9), out.shape)

    def grads(kernel):
        def loss(*x):
            return jnp.sum(dense_attention_pallas(*x, inputs[5], scale=SCALE, forward_kernel=kernel,
                                                  backward_kernel="pallas").astype(jnp.float32) * cot)
        return jax.grad(loss, argnums=range(5))(*inputs[:5])
    for name, g, w in zip(("q_nope", "q_rope", "k_nope", "k_rope", "values"), grads("gluon"), grads("pallas"),
                          strict=True):
        assert rel_err(g, w) < 1e-2, name


# ---- the Gluon backward (`dense_attention_backward_gluon`): compiled on CPU, run on a Hopper GPU --------------------


@pytest.mark.parametrize("case", GLUON_COMPILE_CASES)
def test_gluon_backward_compiles_for_hopper_with_its_dots_and_does_not_spill(case, tmp_path, monkeypatch):
    """Triton's compiler, no GPU: both kernels fit shared memory, keep within 255 registers without spilling in
    their loops (d_q: nowhere) and issue their wgmma steps. d_q per key block (unmasked loop, masked loop): S
    (N + P) / 16 steps of m64n(block_k), dP V / 16 of m64n(block_k), then dS . k block_k / 16 of m64nN and of m64nP.
    d_k, d_v per query block, keys on the rows: S^T (N + P) / 16 of m64n(block_q), dP^T V / 16, then block_q / 16
    each of m64nV, m64nN, m64nP; in the SASS, the step's exp2s between the wait for S^T alone and the next wait,
    and the unseen key blocks' zeros stored in 16-byte vectors."""
    pytest.importorskip("triton.experimental.gluon")
    from test_gluon_kernels import SMEM_LIMIT, _ptxas_log, _sass  # noqa: PLC0415

    from pallas_kernels import _gluon, dense_attention_backward_gluon as bwd  # noqa: PLC0415
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    num_q, num_keys, heads, n, p, v = case
    plan = bwd.kernel_constants(num_q, num_keys, heads, n, p, v, batch=2, scale=0.1)
    (query, query_grid), (key, key_grid) = plan["query"], plan["key"]
    n_p, p_p, v_p = query["NOPE"], query["ROPE"], query["VALUE"]
    assert (n_p, p_p, v_p) == tuple(max(16, 1 << (w - 1).bit_length()) for w in (n, p, v))
    assert query_grid == (-(-num_q // 128), heads, 2) and query["KEYS_P"] % 128 == 0
    groups = -(-heads // key["GROUP"])
    assert key_grid == (query["KEYS_P"] // 128, groups, 2) and (groups - 1) * key["GROUP"] < heads
    steps = {"query": (query["BLOCK_K"], 2), "key": (key["BLOCK_Q"], 1)}  # the d_q kernel has two loops
    for name, kernel, pointers in (("query", bwd._query_grads_kernel,
                                    ["*bf16"] * 5 + ["*i32", "*bf16", "*fp32", "*fp32", "*bf16", "*bf16"]),
                                   ("key", bwd._key_grads_kernel,
                                    ["*bf16"] * 5 + ["*i32", "*bf16", "*fp32", "*fp32", "*i32", "*bf16", "*bf16",
                                                     "*fp32"])):
        compiled, _ = _gluon.compile_gluon(kernel, pointers, num_warps=8, capability=90, constexprs=plan[name][0])
        assert compiled.metadata.shared <= SMEM_LIMIT, name
        block, loops = steps[name]
        want = {}
        for shape, count in ((f"m64n{block}k16", (n_p + p_p + v_p) // 16), (f"m64n{n_p}k16", block // 16),
                             (f"m64n{p_p}k16", block // 16), (f"m64n{v_p}k16", block // 16 if name == "key" else 0)):
            want[shape] = want.get(shape, 0) + count * loops
        shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", compiled.asm["ptx"])
        assert {s: shapes.count(s) for s in set(shapes)} == {s: c for s, c in want.items() if c}, name
        log = _ptxas_log(compiled.asm["ptx"], tmp_path)
        assert int(re.search(r"Used (\d+) registers", log)[1]) <= 255, name
        sass = _sass(tmp_path)
        lines = sass.splitlines()
        dots = [i for i, line in enumerate(lines) if "HGMMA" in line]
        # the loops run between the first and the last dot: no local memory there (the key kernel at
        # DeepSeek-V3.2's shape spills 112 bytes of the d_k_rope store's address offsets before its head loop)
        assert not [line for line in lines[dots[0]:dots[-1]] if re.search(r"\b(STL|LDL)", line)], (name, log)
        if name == "query":
            assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], (name, log)
            continue
        # each step's exp2s run while its dP^T dot is in flight: between the wait for S^T alone (one group
        # outstanding) and the next wait
        exp2s_under_dp = _exp2s_in_flight(sass, r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", r"WARPGROUP\.DEPBAR")
        assert exp2s_under_dp == [128 * block // (32 * 8)], exp2s_under_dp
        # a key block no query sees stores its zeros in 16-byte vectors: [128, width] tiles over 256 threads, d_k
        # and d_v in bf16 (one head at a time), d_k_rope in fp32; the gradients' own stores stay narrower
        assert len(re.findall(r"\bSTG\.E\.128\b", sass)) == (2 * n_p + 2 * v_p + 4 * p_p) // 32, name


def _stand_in_backward_launch(*arrays, kernel, out_shape, grid, num_warps, **constants):
    """`gluon_call` for `dense_backward_gluon`: each kernel's outputs computed in float32 from the padded inputs,
    checked against the constants, through a callback with no batching rule. The key kernel's stand-in takes
    only the query blocks from `start` on, as the kernel walks them, so a start past a query that sees the keys
    loses its share and the gradients come out wrong."""
    from pallas_kernels import dense_attention_backward_gluon as bwd  # noqa: PLC0415
    del num_warps
    qn, qr, kn, kr, v, positions, d_o, lse2, delta = (x.astype(jnp.float32) if x.dtype != jnp.int32 else x
                                                      for x in arrays[:9])
    batch, num_q_p, heads, _ = qn.shape
    keys_p, num_keys, scale = kn.shape[1], constants["NUM_KEYS"], constants["SCALE"]
    assert (num_q_p, keys_p, heads) == (constants["NUM_Q"], constants["KEYS_P"], constants["HEADS"])
    assert (qn.shape[-1], qr.shape[-1], v.shape[-1]) == (constants["NOPE"], constants["ROPE"], constants["VALUE"])
    assert lse2.shape == delta.shape == (batch, heads, num_q_p) and positions.shape == (batch, num_q_p)
    ids = jnp.arange(keys_p)
    visible = (ids[None, None, :] <= positions[:, :, None]) & (ids < num_keys)[None, None, :]  # [B, T_p, S_p]
    logits = jnp.einsum("bthn,bshn->bhts", qn, kn) + jnp.einsum("bthp,bsp->bhts", qr, kr)
    probs = jnp.where(visible[:, None], jnp.exp2(logits * scale * 1.4426950408889634 - lse2[..., None]), 0.0)
    d_logits = probs * (jnp.einsum("bthv,bshv->bhts", d_o, v) - delta[..., None]) * scale
    if kernel is bwd._query_grads_kernel:
        assert grid == (num_q_p // 128, heads, batch) and keys_p % constants["BLOCK_K"] == 0
        outs = (jnp.einsum("bhts,bshn->bthn", d_logits, kn), jnp.einsum("bhts,bsp->bthp", d_logits, kr))
    else:
        assert kernel is bwd._key_grads_kernel
        block_q, group, start = constants["BLOCK_Q"], constants["GROUP"], arrays[9]
        assert grid == (keys_p // 128, -(-heads // group), batch) and start.shape == (batch, grid[0])
        walked = jnp.arange(num_q_p)[None, :, None] // block_q >= jnp.repeat(start, 128, axis=1)[:, None, :]
        probs, d_logits = probs * walked[:, None], d_logits * walked[:, None]
        d_rope = jnp.einsum("bhts,bthp->bhsp", d_logits, qr)
        d_rope = jnp.stack([d_rope[:, g * group:(g + 1) * group].sum(1) for g in range(grid[1])], axis=1)
        outs = (jnp.einsum("bhts,bthn->bshn", d_logits, qn), jnp.einsum("bhts,bthv->bshv", probs, d_o), d_rope)
    outs = tuple(x.astype(shape.dtype) for x, shape in zip(outs, out_shape, strict=True))
    return jax.pure_callback(lambda *x: x, tuple(out_shape), *outs)


def test_gluon_key_kernel_fills_the_gpu_with_the_key_blocks_a_chunk_sees():
    """The key kernel's grid covers every key block, but only those some query sees have work: a long context's
    first query chunk of 1024 sees 8 blocks of 128 keys, which the kernel splits into enough head groups for a wave
    of an H100 (132 SMs), within MAX_KEY_GROUPS partial d_k_rope sums; a whole layer keeps few groups, and a short
    one as many as fill the GPU."""
    bwd = pytest.importorskip("pallas_kernels.dense_attention_backward_gluon")

    def key_plan(num_q, num_keys):
        constants, grid = bwd.kernel_constants(num_q, num_keys, 128, 128, 64, 128, batch=1, scale=0.1)["key"]
        assert grid[1] == -(-128 // constants["GROUP"])
        return grid
    first_chunk = key_plan(1024, 32768)
    assert first_chunk[0] == 256 and 8 * first_chunk[1] >= 128 and first_chunk[1] <= bwd.MAX_KEY_GROUPS
    assert key_plan(1024, 131072)[1] == first_chunk[1]  # the same chunk sees the same keys at any context
    whole = key_plan(32768, 32768)
    assert whole[0] * whole[1] >= bwd.TARGET_PROGRAMS and whole[1] <= 4
    short = key_plan(1024, 1024)  # every block seen: no cap, 2 heads a program (~4 waves), as before the cap
    assert short == (8, 64, 1) and short[1] > bwd.MAX_KEY_GROUPS


def test_gluon_backward_wrapper_pads_plans_the_walk_and_maps_under_vmap(monkeypatch):
    """On CPU, around stand-ins for the launches: the wrapper pads queries, keys and widths, hands the key kernel
    the first query block that sees each key block, sums the rope gradient's per-group partials, slices the
    gradients back, and maps under vmap. Positions not in order (a later chunk's queries first) and a padded
    query."""
    bwd = pytest.importorskip("pallas_kernels.dense_attention_backward_gluon")  # needs triton, not a GPU
    from pallas_kernels import _gluon, dense_attention_gluon  # noqa: PLC0415
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(bwd, "gluon_call", _stand_in_backward_launch)
    monkeypatch.setattr(dense_attention_gluon, "gluon_call", _stand_in_forward_launch)  # its residuals, on CPU
    monkeypatch.setattr(bwd, "TARGET_PROGRAMS", 8)  # two keys blocks x batch 2: two groups of heads
    shape = (2, 150, 300, 3, 24, 8, 40, 150)
    inputs = list(_inputs(shape, jnp.bfloat16, seed=4))
    inputs[5] = jnp.concatenate([inputs[5][:, 75:], inputs[5][:, :75] - 150], axis=1).at[1, 2].set(-1)
    cot = jax.random.normal(jax.random.key(8), inputs[4].shape[:1] + inputs[0].shape[1:3] + inputs[4].shape[3:])

    def grads(fn, xs):
        return jax.grad(lambda *x: jnp.sum(fn(*x, xs[5]).astype(jnp.float32) * cot), argnums=range(5))(*xs[:5])
    got = grads(functools.partial(dense_attention_pallas, scale=SCALE, forward_kernel="gluon",
                                  backward_kernel="gluon"), inputs)
    with jax.default_matmul_precision("highest"):
        want = grads(functools.partial(dense_attention_reference, scale=SCALE), _f32(inputs))
    for name, g, w in zip(("q_nope", "q_rope", "k_nope", "k_rope", "values"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == jnp.bfloat16, name
        assert rel_err(g, w) < 2e-2, name
    assert np.all(np.asarray(got[0][1, 2]) == 0)  # the padded query
    starts = bwd.first_query_blocks(jnp.asarray([[0, 1, 2, 3, 5, 6, 7, 8], [5, 6, 7, 8, 0, 1, 2, 3], [-1] * 8]),
                                    4, 4, 4)  # query blocks of 4, key blocks of 4
    np.testing.assert_array_equal(np.asarray(starts), [[0, 1, 1, 2], [0, 0, 0, 2], [2, 2, 2, 2]])
    cot = cot[:, :, None]
    mapped = jax.vmap(lambda *x: jax.grad(lambda *y: jnp.sum(dense_attention_pallas(
        *y, x[5], scale=SCALE, forward_kernel="gluon", backward_kernel="gluon").astype(jnp.float32) * x[6]),
        argnums=(0, 2))(*x[:5]), in_axes=(1, 1, None, None, None, 1, 1))(
        *(x[:, :, None] if i in (0, 1, 5) else x for i, x in enumerate(inputs)), cot)
    np.testing.assert_allclose(np.asarray(jnp.moveaxis(mapped[0], 0, 1)[:, :, 0], np.float32),
                               np.asarray(got[0], np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", SHAPES + [(1, 300, 1000, 5, 24, 8, 40, 700), (1, 130, 600, 2, 100, 28, 128, 0)])
def test_gluon_backward_equals_the_reference_and_the_pallas_backward(shape, dtype):
    """Ragged shapes (queries past one block, keys past whole key blocks, widths padded, the widest it takes),
    padded queries, bf16 and fp16: the Gluon backward's gradients against the float32 reference's and the Pallas
    backward's, through the lse's cotangent too."""
    _require_gluon()
    inputs = list(_inputs(shape, dtype, seed=5))
    inputs[5] = inputs[5].at[:, 1].set(-1)
    cot = jax.random.normal(jax.random.key(9), inputs[0].shape[:3] + inputs[4].shape[-1:])
    cot_lse = jax.random.normal(jax.random.key(10), inputs[0].shape[:3])

    def grads(fn, xs):
        def loss(*x):
            out, lse = fn(*x, xs[5])
            return jnp.sum(out.astype(jnp.float32) * cot) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * cot_lse)
        return jax.grad(loss, argnums=range(5))(*xs[:5])
    got = grads(functools.partial(dense_attention_pallas, scale=SCALE, return_lse=True, backward_kernel="gluon"),
                inputs)
    pallas = grads(functools.partial(dense_attention_pallas, scale=SCALE, return_lse=True,
                                     backward_kernel="pallas"), inputs)
    with jax.default_matmul_precision("highest"):
        want = grads(functools.partial(dense_attention_reference, scale=SCALE, return_lse=True), _f32(inputs))
    for name, g, p, w in zip(("q_nope", "q_rope", "k_nope", "k_rope", "values"), got, pallas, want, strict=True):
        assert rel_err(g, w) < 2e-2 and rel_err(g, p) < 2e-2, name
    assert np.all(np.asarray(got[0][:, 1]) == 0)


# ---- the Gluon distribution (`dense_distribution_gluon`): compiled on CPU, run on a Hopper GPU ----------------------


@pytest.mark.parametrize("case", GLUON_COMPILE_CASES)
def test_gluon_distribution_compiles_for_hopper_with_its_dots_and_hardly_spills(case, tmp_path, monkeypatch):
    """Triton's compiler, no GPU: the kernel fits shared memory, keeps within 255 registers and issues per head, for
    each half of its 256 keys, (N + P) / 16 logits steps of m64n128 (each warpgroup 64 of the 128 queries). Its two
    halves' sums and one set of logits take 192 registers a thread; ptxas spills at most 16 bytes (at DeepSeek-V3.2's
    widths one 8-byte wgmma shared-memory descriptor, reloaded once per head; 352 bytes, the sums among them, with
    a second set of logits)."""
    pytest.importorskip("triton.experimental.gluon")
    from test_gluon_kernels import SMEM_LIMIT, _ptxas_log  # noqa: PLC0415

    from pallas_kernels import _gluon, dense_distribution_gluon as dist  # noqa: PLC0415
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    num_q, num_keys, heads, n, p, _ = case
    constants, grid = dist.kernel_constants(num_q, num_keys, heads, n, p, batch=2, scale=0.1)
    n_p, p_p = constants["NOPE"], constants["ROPE"]
    assert (n_p, p_p) == tuple(max(16, 1 << (w - 1).bit_length()) for w in (n, p))
    assert (constants["OUT_Q"], constants["NUM_KEYS"]) == (num_q, num_keys) and constants["KEYS_P"] % 256 == 0
    assert grid == (-(-num_q // 128), constants["KEYS_P"] // 256, 2)
    compiled, _ = _gluon.compile_gluon(dist._distribution_kernel, ["*bf16"] * 4 + ["*i32", "*fp32", "*fp32"],
                                       num_warps=8, capability=90, constexprs=constants)
    assert compiled.metadata.shared <= SMEM_LIMIT
    shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", compiled.asm["ptx"])
    assert shapes == ["m64n128k16"] * (2 * (n_p + p_p) // 16)
    log = _ptxas_log(compiled.asm["ptx"], tmp_path)
    assert int(re.search(r"Used (\d+) registers", log)[1]) <= 255
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert len(spills) == 1 and int(spills[0]) <= 16, log


def _stand_in_distribution_launch(qn, qr, kn, kr, positions, lse2, *, kernel, out_shape, grid, num_warps,
                                  **constants):
    """`gluon_call` for `dense_distribution_gluon`: the distribution in float32 from the padded inputs and the lse
    the kernel reads (base 2, +inf where nothing is seen), checked against the constants, written at the real
    [B, T, S] as the kernel writes it, through a callback with no batching rule."""
    del kernel, num_warps
    qn, qr, kn, kr = (x.astype(jnp.float32) for x in (qn, qr, kn, kr))
    batch, num_q_p, heads, _ = qn.shape
    keys_p, num_keys, num_q = kn.shape[1], constants["NUM_KEYS"], constants["OUT_Q"]
    assert (num_q_p, keys_p, heads) == (constants["NUM_Q"], constants["KEYS_P"], constants["HEADS"])
    assert (qn.shape[-1], qr.shape[-1]) == (constants["NOPE"], constants["ROPE"]) and keys_p % 256 == 0
    assert grid == (num_q_p // 128, keys_p // 256, batch) and num_q_p % 128 == 0
    assert lse2.shape == (batch, heads, num_q_p) and positions.shape == (batch, num_q_p)
    assert out_shape.shape == (batch, num_q, num_keys)
    logits = jnp.einsum("bthn,bshn->bhts", qn, kn) + jnp.einsum("bthp,bsp->bhts", qr, kr)
    probs = jnp.exp2(logits * constants["SCALE_LOG2"] - lse2[..., None])
    visible = jnp.arange(keys_p)[None, None, :] <= positions[:, :, None]
    dist = jnp.where(visible, probs.sum(1) / heads, 0.0)[:, :num_q, :num_keys]
    return jax.pure_callback(lambda x: x, out_shape, dist)


def test_gluon_distribution_wrapper_pads_hands_the_lse_and_maps_under_vmap(monkeypatch):
    """On CPU, around a stand-in for the launch: the wrapper pads queries to 128, keys to 256 and widths to powers
    of two, hands the lse in base 2 (+inf for a padded query, whose row is zeros), and maps under vmap."""
    dist_gluon = pytest.importorskip("pallas_kernels.dense_distribution_gluon")  # needs triton, not a GPU
    from pallas_kernels import _gluon  # noqa: PLC0415
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(dist_gluon, "gluon_call", _stand_in_distribution_launch)
    inputs = list(_inputs(SHAPES[0], jnp.bfloat16))
    inputs[5] = inputs[5].at[1, 2].set(-1)
    _, lse, want = _want(tuple(inputs))
    q_nope, q_rope, k_nope, k_rope, _, positions = inputs
    got = dense_attention_distribution_pallas(q_nope, q_rope, k_nope, k_rope, positions, lse, scale=SCALE,
                                              kernel="gluon")
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-5 and np.all(np.asarray(got[1, 2]) == 0)
    mapped = jax.vmap(lambda *x: dense_attention_distribution_pallas(*x, scale=SCALE, kernel="gluon"),
                      in_axes=(1, 1, None, None, 1, 1))(q_nope[:, :, None], q_rope[:, :, None], k_nope, k_rope,
                                                        positions[:, :, None], lse[:, :, None])
    np.testing.assert_array_equal(np.asarray(jnp.moveaxis(mapped, 0, 1)[:, :, 0]), np.asarray(got))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", SHAPES + [(1, 300, 1000, 5, 24, 8, 40, 700), (1, 130, 600, 2, 100, 28, 128, 0),
                                            (2, 200, 700, 3, 128, 64, 16, 500)])
def test_gluon_distribution_equals_the_reference_and_the_pallas_distribution(shape, dtype):
    """Ragged shapes (queries past one block, keys past whole tiles and halves of a tile, widths padded,
    DeepSeek-V3.2's widths), a padded query, bf16 and fp16, given the forward's lse: zeros exactly where the query
    does not see the key, rows summing to 1."""
    _require_gluon()
    inputs = list(_inputs(shape, dtype, seed=6))
    inputs[5] = inputs[5].at[:, 1].set(-1)
    q_nope, q_rope, k_nope, k_rope, _, positions = inputs
    _, lse = dense_attention_pallas(*inputs, scale=SCALE, return_lse=True)
    got = dense_attention_distribution_pallas(q_nope, q_rope, k_nope, k_rope, positions, lse, scale=SCALE,
                                              kernel="gluon")
    pallas = dense_attention_distribution_pallas(q_nope, q_rope, k_nope, k_rope, positions, lse, scale=SCALE,
                                                 kernel="pallas")
    _, _, want = _want(tuple(inputs))
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-2 and rel_err(got, pallas) < 1e-4
    visible = np.arange(shape[2])[None, None, :] <= np.asarray(positions)[:, :, None]
    assert np.all(np.asarray(got)[~visible] == 0) and np.all(np.asarray(got[:, 1]) == 0)
    real = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got).sum(-1)[real], 1.0, rtol=1e-3)
