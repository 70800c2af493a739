"""The indexer distillation losses computed inside the layer scan (indexcache_jax/distill.py) against a plain
per-layer loop that keeps every served layer's distribution in full [B,T,S] form: the multi-layer loss has the
value of 1/(m+1) sum_j KL(p_j || q) and the gradient of KL(mean_j p_j || q); the dense warm-up's loss is the KL to
the dense attention; the LM loss never reaches an indexer and the distillation never reaches the main model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from conftest import SMALL, rel_err
from indexcache_jax import IndexCachePattern, bind, init_params
from indexcache_jax.model import forward_with_indexer_loss
from indexcache_jax.rope import rope_angles
from test_model import _blocks

CONFIG = dataclasses.replace(SMALL, num_layers=5)  # 1 dense + 4 MoE layers: a group spans the two scans


def _kl(p, logq):
    """mean over (b, t) of KL(p || q); p, logq [B,T,S], p = 0 outside q's support."""
    return jnp.mean(jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0), axis=-1))


def _reference_losses(params, tokens, pattern: str, attention: str):
    """A Python loop over the layers. Returns (value, mean_form): value = mean over Full layers of
    1/(m+1) sum_j KL(p_j || q), mean_form = mean over Full layers of KL(mean_j p_j || q); every distribution is
    over S keys, restricted to the Full layer's selected set (all visible keys for attention="dense")."""
    model = bind(CONFIG, params)
    batch, length = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
    rope = rope_angles(pos, CONFIG)
    flags = IndexCachePattern(pattern).flags
    hidden = model.embed_tokens[...][tokens]
    groups = []  # (log q of the Full layer, [p_j of the layers it serves])
    indices = None
    for layer, block in enumerate(_blocks(model)):
        x = block.input_layernorm(hidden)
        q_resid, q_nope, q_rope = block.self_attn.queries(x, rope)
        kv, keys = block.self_attn.latent(x, rope), block.indexer.keys(x, rope)
        if attention == "dense":
            visible = jnp.arange(length)[None, None, :] <= pos[:, :, None]
        else:
            if flags[layer]:
                indices = block.indexer.select(q_resid, x, keys, pos, rope, topk=CONFIG.topk_for(length))
            visible = jnp.any(indices[..., None] == jnp.arange(length), axis=2)  # [B,T,S] the selected set
        if flags[layer]:
            x_in, q_in = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_resid)
            iq, iw = block.indexer.queries(q_in, x_in, rope)
            scores = pallas_kernels.indexer_scores_reference(iq, iw, block.indexer.keys(x_in, rope), pos)
            groups.append((jax.nn.log_softmax(jnp.where(visible, scores, -jnp.inf), axis=-1), []))
        attn, p = block.self_attn.attend_dense(q_nope, q_rope, kv, pos, mask=visible, with_distribution=True)
        groups[-1][1].append(p)
        hidden = hidden + attn
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    value = sum(sum(_kl(p, logq) for p in ps) / len(ps) for logq, ps in groups) / len(groups)
    mean_form = sum(_kl(sum(ps) / len(ps), logq) for logq, ps in groups) / len(groups)
    return value, mean_form


def _leaves(tree, indexer: bool) -> dict:
    """The indexers' leaves (indexer=True) or every other leaf, by path."""
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)
            if ("indexer" in jax.tree_util.keystr(p)) == indexer}


def _indexer_leaves(tree):
    return _leaves(tree, indexer=True)


def _main_leaves(tree):
    return _leaves(tree, indexer=False)


@pytest.fixture(scope="module")
def setup():
    params = init_params(CONFIG, seed=3)
    tokens = jax.random.randint(jax.random.key(11), (2, 14), 0, CONFIG.vocab_size)
    return params, tokens


@pytest.mark.parametrize("pattern,attention", [("FSSFS", "sparse"), ("FFFFF", "sparse"), ("FSSFS", "dense")])
def test_scan_loss_matches_the_per_layer_loop_in_value_and_gradient(setup, pattern, attention):
    params, tokens = setup

    def ours(p):
        return forward_with_indexer_loss(p, tokens, pattern, config=CONFIG, attention=attention)[1]

    value, grads = jax.value_and_grad(ours)(params)
    # the value of the multi-layer form, the gradient of the mean form
    (_, ref_value), ref_grads = jax.jit(jax.value_and_grad(
        lambda p: _reference_losses(p, tokens, pattern, attention)[::-1], has_aux=True))(params)
    assert float(ref_value) > 1e-3  # the distributions differ: the check is not 0 == 0
    assert abs(float(value) - float(ref_value)) <= 1e-4 * float(ref_value), (value, ref_value)

    got, want = _indexer_leaves(grads), _indexer_leaves(ref_grads)
    full_layer_grads = 0
    for name, g in want.items():
        if np.linalg.norm(np.asarray(g)) > 0:
            full_layer_grads += 1
            assert rel_err(got[name], g) < 1e-4, name
        else:
            np.testing.assert_array_equal(got[name], 0.0)
    assert full_layer_grads >= 4  # wq_b, wk, k_norm, weights_proj all get a gradient
    for name, g in _main_leaves(grads).items():
        np.testing.assert_array_equal(g, 0.0, err_msg=name)  # the distillation never reaches the main model


def test_multi_layer_value_differs_from_the_mean_form_by_the_spread_of_the_served_layers(setup):
    params, tokens = setup
    value, mean_form = _reference_losses(params, tokens, "FSSFS", "sparse")
    # Jensen: 1/(m+1) sum_j KL(p_j || q) >= KL(mean p || q), equal only when the served layers agree.
    assert float(value) > float(mean_form) + 1e-6


def test_shared_layers_indexers_get_no_gradient(setup):
    params, tokens = setup
    grads = jax.grad(lambda p: forward_with_indexer_loss(p, tokens, "FSSFS", config=CONFIG)[1])(params)
    wk = _indexer_leaves(grads)
    # Layer 0 is the dense scan; the MoE scan holds layers 1..4, of which only layer 3 (index 2) is Full.
    moe_wk = np.asarray(next(v for k, v in wk.items() if "moe_layers" in k and "wk" in k))
    assert np.linalg.norm(moe_wk[2]) > 0
    np.testing.assert_array_equal(moe_wk[[0, 1, 3]], 0.0)


def test_lm_loss_never_reaches_an_indexer(setup):
    params, tokens = setup
    weights = jax.random.normal(jax.random.key(1), (*tokens.shape, CONFIG.vocab_size))

    def logits_objective(p):
        return jnp.sum(forward_with_indexer_loss(p, tokens, "FSFFS", config=CONFIG)[0] * weights)

    grads = jax.grad(logits_objective)(params)
    assert max(float(jnp.max(jnp.abs(g))) for g in _main_leaves(grads).values()) > 0
    for name, g in _indexer_leaves(grads).items():
        np.testing.assert_array_equal(g, 0.0, err_msg=name)


def test_logits_equal_the_plain_forward(setup):
    from indexcache_jax import forward  # noqa: PLC0415
    params, tokens = setup
    for attention in ("sparse", "dense"):
        logits, _ = forward_with_indexer_loss(params, tokens, "FSSFS", config=CONFIG, attention=attention)
        # Bit-equal on CPU; a GPU compiles the two graphs with different fusions (float32 rounding, ~1e-7).
        assert rel_err(logits, forward(params, tokens, "FSSFS", config=CONFIG, attention=attention)) < 1e-5


@pytest.mark.parametrize("impl", ["interpret"] + (["pallas"] if jax.default_backend() == "gpu" else []))
@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_training_gradients_run_through_the_kernels(setup, attention, impl):
    """Training differentiates the model through the kernels: the selection is cut with a stop-gradient; the sparse
    attention and the indexer's scores over the selected slots (sparse stages), and the all-keys indexer scores
    (dense warm-up's KL), have Pallas backward kernels. Interpret mode runs the same kernel code on CPU."""
    params, tokens = setup

    def objective(p, impl):
        logits, indexer_loss = forward_with_indexer_loss(p, tokens, "FSFFS", config=CONFIG, impl=impl,
                                                         attention=attention)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + indexer_loss

    got = jax.grad(objective)(params, impl)
    want = jax.grad(objective)(params, "reference")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        if np.linalg.norm(np.asarray(w)) > 0:
            assert rel_err(g, w) < (1e-4 if impl == "interpret" else 2e-3), jax.tree_util.keystr(path)


@pytest.mark.gpu
def test_bf16_sparse_stage_trains_the_indexer_through_the_gluon_slot_kernels(setup):
    """In bf16 on Hopper the sparse stages' indexer loss runs the Gluon slot kernels ("auto") inside the layer
    scan: the model's gradients equal those with the Pallas slot kernels (the same products; fp32 sums in another
    order), and the indexer's are not zero."""
    from pallas_kernels import _gluon
    from pallas_kernels.indexer_slots import resolve_kernel
    if not _gluon.available():
        pytest.skip(f"the Gluon kernels cannot run here: {_gluon.unavailable_reason()}")
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    assert resolve_kernel("auto", interpret=False, dtype=jnp.bfloat16, heads=config.index_n_heads,
                          width=config.index_head_dim) == "gluon"
    params, tokens = setup

    def objective(p, impl):
        logits, indexer_loss = forward_with_indexer_loss(p, tokens, "FSFFS", config=config, impl=impl,
                                                         attention="sparse")
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0]) + indexer_loss

    grad = jax.jit(jax.grad(objective), static_argnums=1)
    got = grad(params, pallas_kernels.Kernels(impl="pallas"))
    want = grad(params, pallas_kernels.Kernels(impl="pallas", slot_scores="pallas"))
    indexer_norm = 0.0
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        name = jax.tree_util.keystr(path)
        if "indexer" in name:
            indexer_norm += float(np.linalg.norm(np.asarray(g, np.float32)))
        if np.linalg.norm(np.asarray(w, np.float32)) > 0:
            assert rel_err(g, w) < 2e-2, name
    assert indexer_norm > 0
