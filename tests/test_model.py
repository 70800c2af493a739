"""The layer stack: the scan with its carried indices computes exactly what a plain per-layer loop computes; an
all-Full pattern is plain DSA; Shared layers use the nearest preceding Full layer's indices and never run their
indexer; one compiled function serves every pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from conftest import rel_err
from indexcache_jax import IndexCachePattern, bind, forward, init_params
from indexcache_jax.rope import rope_angles


def _blocks(model):
    """The model's layers as separate modules, in order."""
    out = []
    for stack in (model.dense_layers, model.moe_layers):
        if stack is None:
            continue
        graphdef, state = nnx.split(stack)
        num = jax.tree.leaves(state)[0].shape[0]
        out += [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(num)]
    return out


def loop_forward(config, params, tokens, index_source):
    """Reference: a Python loop over layers; layer l attends with the indices of layer index_source(l)'s own
    indexer. No scan, no cond, no carry."""
    model = bind(config, params)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    rope = rope_angles(pos, config)
    hidden = model.embed_tokens[...][tokens]
    own_indices = {}
    for layer, block in enumerate(_blocks(model)):
        x = block.input_layernorm(hidden)
        q_resid, q_nope, q_rope = block.self_attn.queries(x, rope)
        kv, keys = block.self_attn.latent(x, rope), block.indexer.keys(x, rope)
        own_indices[layer] = block.indexer.select(q_resid, x, keys, pos, rope, topk=config.topk_for(t))
        hidden = hidden + block.self_attn.attend_sparse(q_nope, q_rope, kv, own_indices[index_source(layer)])
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    return model.norm(hidden) @ model.lm_head[...]


@pytest.fixture(scope="module")
def tokens(small_config):
    return jax.random.randint(jax.random.key(7), (2, 12), 0, small_config.vocab_size)


def test_all_full_is_plain_dsa(small_config, small_params, tokens):
    plain_dsa = loop_forward(small_config, small_params, tokens, index_source=lambda l: l)
    assert rel_err(forward(small_params, tokens, "FFFF", config=small_config), plain_dsa) < 1e-5


@pytest.mark.parametrize("layout", ["FSSS", "FSFS", "FFSF"])
def test_shared_layers_use_the_nearest_preceding_full_layer(small_config, small_params, tokens, layout):
    pattern = IndexCachePattern(layout)
    shared = loop_forward(small_config, small_params, tokens, index_source=pattern.source_layer)
    got = forward(small_params, tokens, pattern, config=small_config)
    assert rel_err(got, shared) < 1e-5
    # The case is built so that sharing matters: every layer's own indexer picks differently.
    plain = loop_forward(small_config, small_params, tokens, index_source=lambda l: l)
    assert rel_err(got, plain) > 1e-3


def test_nearest_not_first_full_layer(small_config, small_params, tokens):
    """In FSFS, layer 3 must reuse layer 2's indices, not layer 0's."""
    got = forward(small_params, tokens, "FSFS", config=small_config)
    from_first = loop_forward(small_config, small_params, tokens, index_source=lambda l: 0 if l != 2 else 2)
    assert rel_err(got, from_first) > 1e-3


def test_dense_ffn_model_runs_as_one_layer_run(dense_config, tokens):
    params = init_params(dense_config, seed=1)
    assert bind(dense_config, params).moe_layers is None
    got = forward(params, tokens, "FSFS", config=dense_config)
    expected = loop_forward(dense_config, params, tokens, IndexCachePattern("FSFS").source_layer)
    assert rel_err(got, expected) < 1e-5


def test_shared_layers_never_run_the_indexer_and_patterns_do_not_recompile(small_config, small_params, tokens,
                                                                             monkeypatch):
    runs, traces = [], []
    original = pallas_kernels.indexer_topk

    def counting_indexer_topk(*args, **kwargs):
        traces.append(1)
        jax.debug.callback(lambda: runs.append(1))  # executes only when the branch does
        return original(*args, **kwargs)

    monkeypatch.setattr(pallas_kernels, "indexer_topk", counting_indexer_topk)
    fn = jax.jit(lambda p, t, flags: bind(small_config, p)(t, flags)[0])
    calls, traces_after_first_call = {}, None
    for layout in ["FFFF", "FSSS", "FSFS", "FSSF"]:
        before = len(runs)
        jax.block_until_ready(fn(small_params, tokens, jnp.asarray(IndexCachePattern(layout).flags)))
        jax.effects_barrier()
        calls[layout] = len(runs) - before
        traces_after_first_call = traces_after_first_call or len(traces)
    assert calls == {"FFFF": 4, "FSSS": 1, "FSFS": 2, "FSSF": 2}
    assert len(traces) == traces_after_first_call  # traced (compiled) once, whatever the pattern


def test_dense_attention_runs_no_indexer_and_differs_from_sparse(small_config, small_params, tokens):
    dense = forward(small_params, tokens, config=small_config, attention="dense")
    sparse = forward(small_params, tokens, config=small_config)
    assert rel_err(sparse, dense) > 1e-3
    with pytest.raises(ValueError, match="attention must be one of"):
        forward(small_params, tokens, config=small_config, attention="linear")


def test_bad_inputs_raise(small_config, small_params, tokens):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 61\)"):
        forward(small_params, tokens.at[0, 3].set(61), config=small_config)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        forward(small_params, tokens.at[1, 0].set(-2), config=small_config)
    with pytest.raises(ValueError, match="has 3 letters but the model has 4"):
        forward(small_params, tokens, "FSF", config=small_config)
    with pytest.raises(ValueError, match="layer 0 must be"):
        forward(small_params, tokens, np.array([False, True, True, True]), config=small_config)
    with pytest.raises(ValueError, match="layer 0 must be 'F'"):
        forward(small_params, tokens, "SFFF", config=small_config)


def test_out_of_vocab_under_jit_gives_nan_not_plausible_logits(small_config, small_params, tokens):
    fn = jax.jit(lambda p, t: bind(small_config, p)(t, jnp.ones(4, bool))[0])
    logits = fn(small_params, tokens.at[0, 5].set(999))
    assert np.isnan(np.asarray(logits[0, 5:])).all() and np.isfinite(np.asarray(logits[1])).all()
