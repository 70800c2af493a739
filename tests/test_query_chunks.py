"""Query chunks (`query_chunk`): each layer's per-token part over chunks of queries, each rematerialised
(block.over_query_chunks). The same function as running all queries at once, for less memory.

Two levels. The kernels: every query-side kernel the per-token part calls (the indexer's top-k, its scores over
all keys and over the slots, the sparse attention and its distribution), run on consecutive chunks of queries
against all keys, equals the kernel on all queries: outputs concatenated, the keys' gradients summed. In
interpret mode on CPU; on a GPU also compiled, at DeepSeek-V3.2's shapes (the Gluon kernels). The model: the same
loss and gradients (the MoE model, sparse and dense stages, the distillation loss, a last partial chunk, with and
without layer remat), the same prefill with a cache, less memory, the top-k not selected again in the chunks'
recomputation, and a bad chunk named."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import indexcache_jax.block as block
import indexcache_jax.model as model
import pallas_kernels
from conftest import DENSE, rel_err
from indexcache_jax import init_params
from indexcache_jax.cache import init_cache
from indexcache_jax.inference import prefill
from indexcache_jax.model import (bind, forward, forward_with_indexer_loss, is_indexer_weight, layer_indices,
                                  next_token_loss, pattern_flags, training_losses)

ON_GPU = jax.default_backend() == "gpu"
ON_CPU = jax.default_backend() == "cpu"
cpu_compile_only = pytest.mark.skipif(not ON_CPU, reason="counts XLA's CPU compile")

# (B, T = S, indexer heads G, width I, attention heads H, latent R, rope P, slots K), chunk boundaries
SMALL = ((2, 39, 4, 16, 4, 16, 8, 8), (0, 13, 26, 39))  # chunks of one shape: one compile serves the three
DEEPSEEK = ((1, 4096, 64, 128, 128, 512, 64, 2048), (0, 1024, 2560, 4096))
KERNEL_CASES = [("interpret", SMALL)] + ([(None, SMALL), (None, DEEPSEEK)] if ON_GPU else [])


def _kernel_inputs(shape):
    b, t, g, i, h, r, p, _ = shape
    ks = jax.random.split(jax.random.key(0), 6)
    bf16 = jnp.bfloat16
    return dict(q_i=jax.random.normal(ks[0], (b, t, g, i), bf16), w=jax.random.normal(ks[1], (b, t, g), jnp.float32),
                k_i=jax.random.normal(ks[2], (b, t, i), bf16),
                q=(jax.random.normal(ks[3], (b, t, h, r + p), jnp.float32) * (r + p) ** -0.25).astype(bf16),
                kv=(jax.random.normal(ks[4], (b, t, r + p), jnp.float32) * (r + p) ** -0.25).astype(bf16),
                pos=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))


@functools.partial(jax.jit, static_argnames=("impl", "r"))  # the three chunks share one shape: one compile
def _query_side(x, idx, impl, r, cotangents):
    """Every query-side kernel on x's queries (against all keys) -> (outputs, the gradients (d_q_i, d_w, d_k_i, d_q,
    d_kv) of the differentiable ones' inner product with `cotangents`, [B, T, ...] like their outputs)."""
    scale = (x["q"].shape[-1]) ** -0.5

    def differentiable(q_i, w, k_i, q, kv):
        out = pallas_kernels.sparse_mla(q, kv, idx, scale=scale, value_dim=r, impl=impl)
        slot = pallas_kernels.indexer_slot_scores(q_i, w, k_i, idx, impl=impl)
        scores = pallas_kernels.indexer_scores(q_i, w, k_i, x["pos"], impl=impl)
        return out, slot, jnp.where(jnp.isfinite(scores), scores, 0.0)

    outputs, vjp = jax.vjp(differentiable, x["q_i"], x["w"], x["k_i"], x["q"], x["kv"])
    grads = vjp(cotangents)
    _, lse = pallas_kernels.sparse_mla(x["q"], x["kv"], idx, scale=scale, value_dim=r, impl=impl, return_lse=True)
    dist = pallas_kernels.sparse_attention_distribution(x["q"], x["kv"], idx, scale=scale, value_dim=r, lse=lse,
                                                        impl=impl)
    return dict(zip(("out", "slot", "scores"), outputs, strict=True)) | dict(lse=lse, dist=dist), grads


@pytest.mark.parametrize("impl,case", KERNEL_CASES, ids=lambda v: f"T{v[0][1]}" if isinstance(v, tuple) else str(v))
def test_query_side_kernels_on_chunks_of_queries_equal_the_whole(impl, case):
    """Forward outputs concatenated; gradients: the per-query ones concatenated, the keys' summed over chunks.
    Bounds: bf16 outputs and gradients are rounded once per chunk rather than once, so they may differ by a bf16
    rounding (2^-8 relative); everything accumulated in float32 agrees to float32 rounding."""
    shape, bounds = case
    r, topk = shape[5], shape[7]
    x = _kernel_inputs(shape)
    idx = pallas_kernels.indexer_topk(x["q_i"], x["w"], x["k_i"], x["pos"], topk=topk, impl=impl)
    assert (np.asarray(idx) >= 0).sum(-1).max() == topk  # late queries fill every slot: the selection matters
    b, t = shape[:2]
    ks = jax.random.split(jax.random.key(1), 3)
    cotangents = (jax.random.normal(ks[0], (b, t, shape[4], r), jnp.bfloat16),
                  jax.random.normal(ks[1], (b, t, topk)), jax.random.normal(ks[2], (b, t, t)))
    whole, whole_grads = _query_side(x, idx, impl, r, cotangents)

    per_query = ("q_i", "w", "pos", "q")
    chunks = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = dict(x) | {name: x[name][:, start:stop] for name in per_query}
        chunk_idx = pallas_kernels.indexer_topk(chunk["q_i"], chunk["w"], x["k_i"], chunk["pos"], topk=topk,
                                                impl=impl)
        np.testing.assert_array_equal(chunk_idx, idx[:, start:stop])  # the same selection, query by query
        chunks.append(_query_side(chunk, chunk_idx, impl, r, tuple(c[:, start:stop] for c in cotangents)))

    for name, bound in (("out", 8e-3), ("lse", 1e-6), ("slot", 1e-6), ("scores", 1e-6), ("dist", 1e-5)):
        got = np.concatenate([np.asarray(out[name], np.float32) for out, _ in chunks], axis=1)
        assert rel_err(got, whole[name]) < bound, name
    for i, name in enumerate(("d_q_i", "d_w", "d_k_i", "d_q", "d_kv")):
        if name in ("d_k_i", "d_kv"):  # every chunk adds to every key's gradient
            got = sum(np.asarray(grads[i], np.float32) for _, grads in chunks)
        else:
            got = np.concatenate([np.asarray(grads[i], np.float32) for _, grads in chunks], axis=1)
        bound = 1e-6 if whole_grads[i].dtype == jnp.float32 else 8e-3
        assert rel_err(got, whole_grads[i]) < bound, name


# ---- the model ---------------------------------------------------------------------------------------------------

def _tokens(config, batch, length, seed=3):
    return jax.random.randint(jax.random.key(seed), (batch, length + 1), 0, config.vocab_size)


def _objective(config, tokens, pattern, attention, remat, query_chunk):
    def objective(params):
        logits, indexer_loss = forward_with_indexer_loss(params, tokens[:, :-1], pattern, config=config,
                                                         attention=attention, remat=remat, query_chunk=query_chunk)
        return next_token_loss(logits, tokens) + 0.5 * indexer_loss, indexer_loss
    return objective


@pytest.mark.parametrize("attention,pattern,query_chunk,remat", [
    ("sparse", "FSFS", 7, "none"),  # 24 queries: three chunks of 7 and a partial one of 3
    ("sparse", "FSFS", 8, "layer"),  # three whole chunks, inside the layers' rematerialisation
    ("dense", "FSFS", 7, "layer")])  # the warm-up's dense attention and its distillation over every key
def test_query_chunks_give_the_same_loss_and_gradients(small_config, small_params, attention, pattern, query_chunk,
                                                       remat):
    """The MoE model (its routing is per token, so chunks route alike), float32, distillation loss included."""
    tokens = _tokens(small_config, 2, 24)

    def value_and_grad(chunk, remat):
        return jax.jit(jax.value_and_grad(_objective(small_config, tokens, pattern, attention, remat, chunk),
                                          has_aux=True))(small_params)

    (loss, indexer_loss), grads = value_and_grad(0, "none")
    (chunked_loss, chunked_indexer_loss), chunked_grads = value_and_grad(query_chunk, remat)
    assert abs(float(chunked_loss) - float(loss)) <= 1e-6 * abs(float(loss))
    assert float(indexer_loss) > 0 and abs(float(chunked_indexer_loss) - float(indexer_loss)) <= 1e-5 * float(
        indexer_loss)
    checked = 0
    for got, want in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(grads), strict=True):
        if np.abs(np.asarray(want)).max() > 0:
            assert rel_err(got, want) < 2e-5
            checked += 1
        else:
            assert np.abs(np.asarray(got)).max() == 0
    assert checked > 20


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_frozen_main_warm_up_trains_the_indexers_alone_with_the_same_gradient(small_config, small_params, impl):
    """The dense warm-up's loss with frozen_main (the job's dense_warmup stage): the main model behind a stop-gradient
    and the dense attention's keys expanded once per layer for all chunks. Same indexer loss and indexer gradients
    as the plain unchunked loss; every other gradient exactly zero. With impl="interpret" the dense kernels run."""
    tokens = _tokens(small_config, 2, 24)

    def grads(frozen_main, chunk, remat, impl):
        def objective(params):
            return training_losses(params, tokens, "FSFS", config=small_config, attention="dense", impl=impl,
                                   remat=remat, query_chunk=chunk, frozen_main=frozen_main)[1]
        return jax.value_and_grad(objective)(small_params)

    loss, want = grads(False, 0, "none", "reference")
    frozen_loss, got = grads(True, 7, "layer", impl)
    assert float(loss) > 0 and abs(float(frozen_loss) - float(loss)) <= 1e-5 * float(loss)
    checked = 0
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        if is_indexer_weight(path):
            assert rel_err(g, w) < 1e-4, jax.tree_util.keystr(path)
            checked += 1
        else:
            assert np.abs(np.asarray(g)).max() == 0, jax.tree_util.keystr(path)
    assert checked >= 5


def _loop_depths_of(jaxpr, primitive, shape, depth=0):
    """The loop nesting depth (scan and while bodies) of every `primitive` (a name) in `jaxpr` whose output has
    `shape`."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive and tuple(eqn.outvars[0].aval.shape) == shape:
            found.append(depth)
        inner = depth + (eqn.primitive.name in ("scan", "while"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _loop_depths_of(sub, primitive, shape, inner)
    return found


def test_dense_attention_expands_its_keys_outside_the_chunks(dense_config):
    """Traced, not timed: the dense attention's per-head keys and values [B,S,H,N] are products in the layer scan's
    body (loop depth 1), none inside the chunks' loop (depth 2), whether the main model trains (their gradient
    then summed over the chunks) or is frozen (the warm-up)."""
    params = init_params(dense_config, seed=1)
    tokens = _tokens(dense_config, 2, 32)
    c = dense_config
    shape = (2, 32, c.num_heads, c.qk_nope_head_dim)

    def depths(frozen_main):
        def objective(p):
            return training_losses(p, tokens, "FSFS", config=c, attention="dense", remat="layer", query_chunk=8,
                                   frozen_main=frozen_main)[1]
        return _loop_depths_of(jax.make_jaxpr(jax.grad(objective))(params).jaxpr, "dot_general", shape)

    frozen, plain = depths(True), depths(False)
    assert frozen and plain, (frozen, plain)
    assert set(frozen) == set(plain) == {1}, (frozen, plain)


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_chunks_read_weights_cast_once_per_layer_with_the_same_loss_and_gradients(attention, monkeypatch):
    """bf16 compute over float32 weights, layer rematerialisation: each layer casts its weights once, before its
    chunks, and so does the chunked LM head; the chunks' projections read those copies (on an H100 XLA cast a
    DeepSeek-V3.2 layer's weights again in every chunk otherwise: 138 ms of a 32K step, docs/BENCHMARKS.md session
    51). The loss and every gradient are those of chunks that cast the weights themselves, bit for bit. Without the
    layer rematerialisation no copies: they would be kept for the backward pass, every layer's."""
    c = dataclasses.replace(DENSE, dtype="bfloat16")
    params = init_params(c, seed=1)
    tokens = _tokens(c, 2, 32)
    real_copies, real_copy, made = block.compute_copies, model.compute_copy, []

    flags = pattern_flags("FSFS", c)

    def objective(p, remat="layer"):  # the model's own method: `training_losses` is jitted and would not retrace
        return sum(bind(c, p).training_losses(tokens, flags, attention=attention, remat=remat, query_chunk=8))

    def run(layer_copies, head_copy, gradient=True):
        monkeypatch.setattr(block, "compute_copies", layer_copies)
        monkeypatch.setattr(model, "compute_copy", head_copy)
        return jax.jit(jax.value_and_grad(objective) if gradient else objective)(params)

    def counted(module, dtype):
        made.append(real_copies(module, dtype))
        return made[-1]

    def doubled(copy):
        return None if copy is None else 2 * copy
    loss, grads = run(counted, real_copy)
    assert len(made) == 1 and sum(x is not None for x in made[0]) >= 8  # once per layer scan body
    want_loss, want_grads = run(lambda module, dtype: [None] * len(real_copies(module, dtype)),
                                lambda w, dtype: None)  # every chunk casts
    assert float(loss) == float(want_loss)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the chunks compute with the copies, not with casts of their own: doubled copies change the loss
    layers_doubled = run(lambda module, dtype: [doubled(x) for x in real_copies(module, dtype)], real_copy,
                         gradient=False)
    head_doubled = run(real_copies, lambda w, dtype: doubled(real_copy(w, dtype)), gradient=False)
    for other in (layers_doubled, head_doubled):
        assert abs(float(other) - float(loss)) > 1e-3 * abs(float(loss))
    # without the layer rematerialisation the copies would be kept for the backward pass, every layer's: none made
    made.clear()
    monkeypatch.setattr(block, "compute_copies", counted)
    jax.make_jaxpr(jax.grad(lambda p: objective(p, remat="none")))(params)
    assert made == []


def test_chunks_sum_the_keys_gradient_in_float32_and_round_it_once():
    """bf16 keys shared by 16 chunks and a partial one: their summed gradient is as close to the exact one as one
    bf16 rounding (1.6x its error allows the chunks' own bf16 roundings before a float32 sum; a sum kept in bf16,
    autodiff's own, is 3x off); and the chunks read the keys as they are, with no float32 copy cast back in every
    chunk."""
    batch, num_q, num_keys, width, chunk = 2, 16 * 4 + 3, 40, 32, 4
    ks = jax.random.split(jax.random.key(3), 3)
    queries = jax.random.normal(ks[0], (batch, num_q, width), jnp.bfloat16)
    keys = jax.random.normal(ks[1], (batch, num_keys, width), jnp.bfloat16)
    cotangent = jax.random.normal(ks[2], (batch, num_q, num_keys), jnp.bfloat16)

    def logits(q, k):  # -> bf16 [B,C,S]
        return jnp.einsum("bcd,bsd->bcs", q, k)

    def chunked(k):
        return block.over_query_chunks(lambda q, k: logits(q, k), (queries,), k, chunk, differentiable=True)

    out, vjp = jax.vjp(chunked, keys)
    (got,) = vjp(cotangent)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(logits(queries, keys), np.float32))
    exact = np.einsum("bcs,bcd->bsd", np.asarray(cotangent, np.float64), np.asarray(queries, np.float64))
    one_rounding = rel_err(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), exact)
    assert got.dtype == jnp.bfloat16 and rel_err(got, exact) < 1.6 * one_rounding, (rel_err(got, exact), one_rounding)
    parts = [jax.vjp(lambda k, i=i: logits(queries[:, i:i + chunk], k), keys)[1](cotangent[:, i:i + chunk])[0]
             for i in range(0, num_q, chunk)]
    assert len(parts) == 17 and rel_err(functools.reduce(lambda total, p: total + p, parts), exact) > 2 * one_rounding
    assert _loop_depths_of(jax.make_jaxpr(chunked)(keys).jaxpr, "convert_element_type", keys.shape) == []


def test_query_chunks_give_the_same_logits_indices_and_prefill(small_config, small_params):
    """Without gradients: the forward's logits, every layer's indices, and a prefill into a partly filled cache
    (its logits, the cache it writes, and the next decoded step)."""
    tokens = _tokens(small_config, 2, 21)[:, :-1]
    assert rel_err(forward(small_params, tokens, "FSSF", config=small_config, query_chunk=6),
                   forward(small_params, tokens, "FSSF", config=small_config)) < 1e-6
    np.testing.assert_array_equal(layer_indices(small_params, tokens, "FSFS", config=small_config, query_chunk=8),
                                  layer_indices(small_params, tokens, "FSFS", config=small_config))
    results = []
    for chunk in (0, 4):
        cache = init_cache(small_config, batch_size=2, max_len=32)
        _, cache = prefill(small_params, tokens[:, :5], cache, "FSFS", config=small_config)
        logits, cache = prefill(small_params, tokens[:, 5:], cache, "FSFS", config=small_config,
                                lengths=jnp.array([15, 11]), all_logits=True, query_chunk=chunk)
        results.append((logits, cache))
    (logits, cache), (chunked_logits, chunked_cache) = results
    assert rel_err(chunked_logits, logits) < 1e-6
    for got, want in zip(jax.tree.leaves(chunked_cache), jax.tree.leaves(cache), strict=True):
        assert rel_err(got, want) < 1e-6 if np.abs(np.asarray(want)).max() > 0 else (np.asarray(got) == 0).all()


def _compiled_gradient(config, params, tokens, remat, query_chunk, attention="sparse", pattern=None):
    pattern = pattern or ("FSFS" if attention == "sparse" else "FFFF")
    objective = _objective(config, tokens, pattern, attention, remat, query_chunk)
    return jax.jit(jax.value_and_grad(objective, has_aux=True)).lower(params).compile()


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_gradients():
    """The module's compiled gradients go when it ends (conftest's `_release_compiled_programs` says why)."""
    yield
    _dense_ffn_gradient.cache_clear()


@functools.cache
def _dense_ffn_gradient(length: int, remat: str, query_chunk: int, attention: str = "sparse"):
    """The compiled gradient of the dense-FFN model (seed 1, batch 2) at `length` tokens, compiled once for the
    module: the memory and op-count tests below read the same programs (the suite is bound by XLA's compiles).
    Not for a test that patches what the model saves: that one must compile afresh."""
    return _compiled_gradient(DENSE, init_params(DENSE, seed=1), _tokens(DENSE, 2, length), remat, query_chunk,
                              attention)


@cpu_compile_only
@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_query_chunks_lower_the_memory_of_the_backward_pass(attention):
    temp = {(remat, chunk): _dense_ffn_gradient(128, remat, chunk, attention).memory_analysis().temp_size_in_bytes
            for remat in ("none", "layer") for chunk in (0, 16)}
    assert temp["none", 16] < 0.5 * temp["none", 0], temp
    assert temp["layer", 16] < 0.7 * temp["layer", 0], temp


@cpu_compile_only
def test_dense_warm_up_distillation_memory_grows_linearly_with_the_sequence(dense_config):
    """The dense warm-up's distillation carries its Full layer's indexer queries, head weights and keys through
    the layers, not log q or the served layers' summed distributions over every key (f32 [B,T,S] each, which the
    scan keeps per layer for the backward pass). With layer remat and chunks of 16 queries, the gradient's
    temporary memory at 512 tokens is about twice that at 256 (measured 1.96x; the [B,T,S] carries made it 3.8x)."""
    params = init_params(dense_config, seed=1)
    temp = {length: _compiled_gradient(dense_config, params, _tokens(dense_config, 2, length), "layer", 16, "dense",
                                       "FSFS").memory_analysis().temp_size_in_bytes for length in (256, 512)}
    assert temp[512] < 2.3 * temp[256], temp


def _top_k_ops(compiled) -> int:
    return len(re.findall(r"\bTopK\b|topk\(|custom_call_target=\"TopK\"", compiled.as_text()))


@cpu_compile_only
def test_layer_remat_and_query_chunks_keep_the_top_k_instead_of_selecting_again(monkeypatch):
    """Counted in the compiled gradient (dense FFN: the indexer's is the only top-k; 128 queries in 8 whole chunks
    of 16, so the chunks are one loop body): one top-k, as many with layer remat or chunks as with neither. With the
    indices not saved (by the layers' or the chunks' rematerialisation) the recomputation selects again."""
    assert _top_k_ops(_dense_ffn_gradient(128, "none", 0)) == 1
    assert _top_k_ops(_dense_ffn_gradient(128, "layer", 0)) == 1
    assert _top_k_ops(_dense_ffn_gradient(128, "none", 16)) == 1
    params, tokens = init_params(DENSE, seed=1), _tokens(DENSE, 2, 128)
    for module, name, remat, chunk in ((model, "SAVED_BY_LAYER_REMAT", "layer", 0),
                                       (block, "SAVED_BY_CHUNK_REMAT", "none", 16)):
        with monkeypatch.context() as patch:
            patch.setattr(module, name, ())
            jax.clear_caches()  # trace afresh: the patched policy is read while tracing
            assert _top_k_ops(_compiled_gradient(DENSE, params, tokens, remat, chunk)) == 2, name
    jax.clear_caches()


@cpu_compile_only
def test_chunks_inside_layer_remat_run_forward_twice_not_three_times():
    """Counted as dot ops in the compiled gradient: layer remat with chunks has no more than layer remat alone. A
    third forward pass of the chunks (the layer's recomputation running them again) would add every dot of a
    chunk (the queries, the indexer, the attention and the FFN)."""

    def dots(remat, query_chunk):
        return len(re.findall(r"= \S+ dot\(", _dense_ffn_gradient(128, remat, query_chunk).as_text()))

    per_chunk = dots("none", 16) - dots("none", 0)  # the chunks' loop body: its own copy of every dot
    assert per_chunk >= 8
    assert dots("layer", 16) <= dots("layer", 0)


def test_bad_query_chunk_is_named(small_config, small_params):
    tokens = _tokens(small_config, 1, 8)[:, :-1]
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match=f"query_chunk must be an int >= 0 .*got {re.escape(repr(bad))}"):
            forward(small_params, tokens, config=small_config, query_chunk=bad)
    with pytest.raises(ValueError, match="query_chunk"):
        forward_with_indexer_loss(small_params, tokens, config=small_config, query_chunk=-8)
    with pytest.raises(ValueError, match="query_chunk"):
        forward(small_params, tokens, config=small_config, query_chunk=np.int64(-3))
    with pytest.raises(ValueError, match="query_chunk"):  # a bound module checks it too
        bind(small_config, small_params).with_indexer_loss(tokens, pattern_flags(None, small_config), query_chunk=-2)


def test_training_losses_equal_the_loss_of_the_logits(dense_config):
    """`training_losses` (the job's objective: with chunks, the LM head runs per chunk too; 24 tokens in chunks of
    7) against `next_token_loss` of `forward_with_indexer_loss`'s logits: the same two losses and gradients."""
    params = init_params(dense_config, seed=2)
    tokens = _tokens(dense_config, 2, 24)

    def from_logits(params):
        logits, indexer_loss = forward_with_indexer_loss(params, tokens[:, :-1], "FSFS", config=dense_config)
        return next_token_loss(logits, tokens) + 0.5 * indexer_loss, indexer_loss

    def chunked(params):
        lm, indexer_loss = training_losses(params, tokens, "FSFS", config=dense_config, query_chunk=7)
        return lm + 0.5 * indexer_loss, indexer_loss

    (want, want_indexer), want_grads = jax.jit(jax.value_and_grad(from_logits, has_aux=True))(params)
    (got, got_indexer), grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    assert abs(float(got_indexer) - float(want_indexer)) <= 1e-5 * float(want_indexer)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert rel_err(g, w) < 2e-5 if np.abs(np.asarray(w)).max() > 0 else np.abs(np.asarray(g)).max() == 0
    with pytest.raises(ValueError, match="length \\+ 1"):
        training_losses(params, tokens[:, :1], config=dense_config)


@cpu_compile_only
def test_training_losses_never_hold_the_whole_logits(dense_config):
    """With a vocabulary of 8192, the gradient of `training_losses` with chunks needs less memory than that of the
    loss of the whole logits (the layers chunked alike) by more than one f32 [B, T, V*] logits array."""
    config = dataclasses.replace(dense_config, vocab_size=8192)
    params = init_params(config, seed=1)
    tokens = _tokens(config, 2, 256)

    def temp(objective):
        return jax.jit(jax.grad(objective)).lower(params).compile().memory_analysis().temp_size_in_bytes

    def from_logits(p):
        logits, indexer_loss = forward_with_indexer_loss(p, tokens[:, :-1], "FSFS", config=config, query_chunk=16)
        return next_token_loss(logits, tokens) + indexer_loss

    def chunked(p):
        return sum(training_losses(p, tokens, "FSFS", config=config, query_chunk=16))

    logits_bytes = 2 * 256 * 8192 * 4
    assert temp(chunked) < temp(from_logits) - logits_bytes
