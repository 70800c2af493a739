"""Layer rematerialisation (`remat="layer"`): the same loss and gradients as keeping every activation, less memory
for the backward pass, and a Full layer's top-k is kept rather than selected again (the indexer's scores over
every visible key are the most expensive thing a layer could recompute: counted in tests/test_query_chunks.py,
which compiles the same gradients for its chunks). Reference kernels on CPU. The op counts and memory ratios are
those of XLA's CPU compile: on a GPU these tests skip them, and `scripts/bench_train.py` measures the memory at
real shapes (docs/BENCHMARKS.md)."""

import re

import jax
import numpy as np
import pytest

import indexcache_jax.model as model
from conftest import rel_err
from indexcache_jax import init_params
from indexcache_jax.model import forward_with_indexer_loss, next_token_loss
from indexcache_jax.train import load_train_config
from indexcache_jax.train.loop import make_optimizer, make_train_step
from conftest import DENSE
from test_train import JOB, SMALL as SMALL_JOB


ON_CPU = jax.default_backend() == "cpu"
cpu_compile_only = pytest.mark.skipif(not ON_CPU, reason="counts XLA's CPU compile (see the module docstring)")


def _objective(config, tokens, pattern, attention, remat, **options):
    """The LM loss plus half the distillation loss; options: forward_with_indexer_loss's impl and query_chunk."""
    def objective(params):
        logits, indexer_loss = forward_with_indexer_loss(params, tokens[:, :-1], pattern, config=config,
                                                         attention=attention, remat=remat, **options)
        return next_token_loss(logits, tokens) + 0.5 * indexer_loss
    return objective


def _tokens(config, batch, length, seed=3):
    return jax.random.randint(jax.random.key(seed), (batch, length + 1), 0, config.vocab_size)


@pytest.mark.parametrize("attention,pattern", [("sparse", "FSFS"), ("dense", "FFFF")])
def test_layer_remat_gives_the_same_loss_and_gradients(small_config, small_params, attention, pattern):
    """The MoE model (a dense-FFN run, then an MoE run: two scans), with the distillation loss in the objective."""
    tokens = _tokens(small_config, 2, 24)
    kept = jax.jit(jax.value_and_grad(_objective(small_config, tokens, pattern, attention, "none")))(small_params)
    remat = jax.jit(jax.value_and_grad(_objective(small_config, tokens, pattern, attention, "layer")))(small_params)
    assert abs(float(remat[0]) - float(kept[0])) <= 1e-6 * abs(float(kept[0]))
    checked = 0
    for got, want in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(kept[1]), strict=True):
        if np.abs(np.asarray(want)).max() > 0:
            assert rel_err(got, want) < 1e-5
            checked += 1
        else:  # gradients that are exactly zero (e.g. the routing bias) stay exactly zero
            assert np.abs(np.asarray(got)).max() == 0
    assert checked > 20


def _compiled_gradient(config, params, tokens, remat, attention="sparse", **options):
    objective = _objective(config, tokens, "FSFS", attention, remat, **options)
    return jax.jit(jax.value_and_grad(objective)).lower(params).compile()


@cpu_compile_only
def test_layer_remat_lowers_the_memory_of_the_backward_pass(small_config, small_params):
    tokens = _tokens(small_config, 2, 128)
    temp = {remat: _compiled_gradient(small_config, small_params, tokens, remat).memory_analysis().temp_size_in_bytes
            for remat in ("none", "layer")}
    assert temp["layer"] < 0.7 * temp["none"], temp


@pytest.mark.parametrize("variant", [
    ["remat=layer"],
    # Slow (a second compile of the whole step): tests/test_bench_helpers.py runs the job's step with and without
    # query chunks by default (the same first loss, less compiled memory), and tests/test_query_chunks.py compares
    # the model's loss and gradients with and without chunks.
    pytest.param(["query_chunk=20"], marks=pytest.mark.slow)])
def test_train_step_with_less_memory_matches_the_plain_step(variant):
    """One optimiser step of the training job's own step function, from the same parameters and batch; the job's
    `remat` or `query_chunk` (48 tokens: two chunks and a partial one) reaches the step (its compiled backward
    needs less memory)."""
    steps, temp = {}, {}
    for name, overrides in (("plain", []), ("variant", variant)):
        config = load_train_config(JOB, SMALL_JOB + ["stage=indexcache"] + overrides)
        model_config = config.model_config(config.model)
        params = init_params(model_config.model, seed=0)
        optimizer = make_optimizer(config, params)
        step = make_train_step(config, model_config.model, optimizer, impl=None)
        batch = _tokens(model_config.model, 2, 48, seed=5)[None]
        flags = model.pattern_flags(config.indexcache.pattern, model_config.model)
        opt_state = optimizer.init(params)
        # lowered before the call: on an accelerator the step takes params' and opt_state's buffers
        temp[name] = step.lower(params, opt_state, batch, flags).compile().memory_analysis().temp_size_in_bytes
        steps[name] = step(params, opt_state, batch, flags)
    if ON_CPU:
        assert temp["variant"] < 0.8 * temp["plain"], temp
    (p_none, _, m_none), (p_layer, _, m_layer) = steps["plain"], steps["variant"]
    for name in ("loss", "lm_loss", "indexer_loss", "grad_norm"):
        # + 1e-7: the tiny job's indexer loss is a KL of ~6e-5, the difference of two float32 sums of ~log K per
        # token; chunks round those at other places, which moves it by up to ~1e-7 absolute
        assert abs(float(m_layer[name]) - float(m_none[name])) <= 1e-5 * abs(float(m_none[name])) + 1e-7, name
    for got, want in zip(jax.tree.leaves(p_layer), jax.tree.leaves(p_none), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def _forward_kernel_runs(compiled, kernel: str) -> dict[str, int]:
    """The Pallas kernel `kernel`'s runs in a compiled interpret-mode program (its outer loop, named by the kernel),
    by the pass that runs it: the forward ("jvp(...)") or a recomputation inside the backward ("transpose(...)")."""
    runs = {}
    for op_name in re.findall(r"\bwhile\(.*?op_name=\"([^\"]*)\"", compiled.as_text()):
        if op_name.endswith(f"/{kernel}/while"):
            where = op_name.split("/")[1].split("(")[0]
            runs[where] = runs.get(where, 0) + 1
    return runs


@cpu_compile_only
@pytest.mark.parametrize("attention,kernel", [("dense", "dense_attention_forward"), ("sparse", "sparse_mla")])
def test_keeping_the_attention_output_runs_the_forward_kernel_once_with_the_same_gradients(attention, kernel):
    """remat="layer_keep_attention" (interpret kernels, 32 tokens as two chunks of 16: the layer's policy must reach
    the chunks' recomputation inside it): the attention's forward kernel runs in the forward pass only, and the
    loss and gradients are those of remat="layer", which runs the kernel again in the backward pass."""
    params = init_params(DENSE, seed=1)
    tokens = _tokens(DENSE, 1, 32)
    plain, keeping = (_compiled_gradient(DENSE, params, tokens, remat, attention, impl="interpret", query_chunk=16)
                      for remat in ("layer", "layer_keep_attention"))
    assert _forward_kernel_runs(plain, kernel) == {"jvp": 1, "transpose": 1}
    assert _forward_kernel_runs(keeping, kernel) == {"jvp": 1}
    (loss, grads), (kept_loss, kept_grads) = plain(params), keeping(params)
    assert abs(float(kept_loss) - float(loss)) <= 1e-6 * abs(float(loss))
    checked = 0
    for got, want in zip(jax.tree.leaves(kept_grads), jax.tree.leaves(grads), strict=True):
        if np.abs(np.asarray(want)).max() > 0:
            assert rel_err(got, want) < 1e-5
            checked += 1
    assert checked > 10


@cpu_compile_only
@pytest.mark.parametrize("remat", ["layer", "none"])
def test_rematerialisations_keep_the_sparse_distillation_target(remat):
    """The sparse stages' distillation target (the attention's distribution over the slots) is kept by the layers'
    rematerialisation and by the query chunks' (remat="none" with chunks): its kernel runs in the forward pass
    only, not again in the backward pass."""
    params = init_params(DENSE, seed=1)
    compiled = _compiled_gradient(DENSE, params, _tokens(DENSE, 1, 32), remat, impl="interpret", query_chunk=16)
    assert _forward_kernel_runs(compiled, "sparse_attention_distribution") == {"jvp": 1}
    # the attention's forward does run again (its residuals are not kept): the count tells the passes apart
    assert _forward_kernel_runs(compiled, "sparse_mla") == {"jvp": 1, "transpose": 1}


def test_unknown_remat_mode_is_named(small_config, small_params):
    tokens = _tokens(small_config, 1, 8)
    modes = "\\['none', 'layer', 'layer_keep_attention'\\]"
    with pytest.raises(ValueError, match=f"remat must be one of {modes}, got 'all'"):
        forward_with_indexer_loss(small_params, tokens, config=small_config, remat="all")
    with pytest.raises(ValueError, match="remat"):
        model.forward(small_params, tokens, config=small_config, remat="everything")
    with pytest.raises(ValueError, match="remat must be one of"):  # a bound module checks it too
        model.bind(small_config, small_params).with_indexer_loss(tokens, model.pattern_flags(None, small_config),
                                                                 remat="layers")
