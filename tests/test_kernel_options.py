"""`pallas_kernels.dispatch.Kernels`: the implementation with its GPU kernels' options, taken wherever `impl=` is.
Its fields are validated by name, the dispatch hands each to the kernel it names, and the model passes it through
to the dispatch unchanged."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from indexcache_jax import forward
from pallas_kernels import _gluon, dispatch, indexer, indexer_slots
from pallas_kernels.dispatch import Kernels
from pallas_kernels.sparse_attention import Tiles
from test_pallas_kernels import _sparse_inputs


@pytest.mark.parametrize("field,value", [("impl", "gpu"), ("sparse_forward", "cuda"), ("sparse_backward", "gpu"),
                                         ("distribution", None), ("indexer_scores", "triton"),
                                         ("indexer_backward", "cuda"), ("topk", "radix"), ("slot_scores", "cuda"),
                                         ("backward_d_s_bytes", -1),
                                         ("indexer_chunk_bytes", 0), ("indexer_chunk_bytes", 1.5),
                                         ("backward_d_s_bytes", True)])
def test_bad_options_name_their_field(field, value):
    with pytest.raises(ValueError, match=f"kernels.{field}: must be"):
        Kernels(**{field: value})


def test_kernels_are_static_arguments_and_a_name_means_the_defaults():
    assert hash(Kernels(distribution="pallas")) == hash(Kernels(distribution="pallas"))
    assert dispatch.kernels_of("interpret") == Kernels(impl="interpret")
    assert dispatch.kernels_of(Kernels(sparse_backward="pallas")).impl == dispatch.default_impl()
    assert dispatch.resolve_impl(Kernels(impl="interpret")) == "interpret"
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.kernels_of("gpu")


def test_dispatch_hands_each_option_to_its_kernel(monkeypatch):
    """Each dispatch function calls its kernel with the options that concern it (the kernels replaced by
    recorders); a name alone gives the kernels' own defaults."""
    calls = {}

    def recorder(name):
        def record(*args, **kwargs):
            # the trainable kernels take their options positionally: (interpret, kernel choice)
            calls[name] = args[4:] if name.endswith("_trainable") else kwargs
            return (args[0], args[0]) if name == "sparse_mla_decode_pallas" else args[0]  # decode: (out, lse)
        return record

    for name in ("sparse_mla_pallas", "sparse_mla_decode_pallas", "sparse_attention_distribution_pallas",
                 "indexer_topk_pallas", "indexer_scores_trainable", "indexer_slot_scores_trainable"):
        monkeypatch.setattr(dispatch, name, recorder(name))
    q, kv, idx = _sparse_inputs(0, 1, 3, 20, 4, 8, 4, 5, np.float32)
    options = Kernels(impl="interpret", sparse_forward="pallas", sparse_backward="gluon", distribution="gluon",
                      indexer_scores="pallas", indexer_backward="gluon", topk="pallas", slot_scores="gluon",
                      backward_d_s_bytes=123, indexer_chunk_bytes=456)
    for impl, want_tiles in ((options, Tiles(forward_kernel="pallas", backward_kernel="gluon", backward_d_s_bytes=123)),
                             ("interpret", Tiles())):
        kernel = "gluon" if impl is options else "auto"
        dispatch.sparse_mla(q, kv, idx, scale=0.3, value_dim=8, impl=impl)
        assert calls["sparse_mla_pallas"]["tiles"] == want_tiles and calls["sparse_mla_pallas"]["interpret"]
        dispatch.sparse_mla(q[:, :1], kv, idx[:, :1], scale=0.3, value_dim=8, impl=impl)
        assert calls["sparse_mla_decode_pallas"]["forward_kernel"] == want_tiles.forward_kernel
        dispatch.sparse_attention_distribution(q, kv, idx, scale=0.3, value_dim=8, impl=impl)
        assert calls["sparse_attention_distribution_pallas"]["kernel"] == kernel
        dispatch.indexer_topk(q, q[..., 0], kv, idx[..., 0], topk=2, impl=impl)
        want = ("pallas", "pallas", 456) if impl is options else ("auto", "auto", 1 << 30)
        names = ("scores_kernel", "topk_kernel", "chunk_bytes")
        assert tuple(calls["indexer_topk_pallas"][name] for name in names) == want
        dispatch.indexer_scores(q, q[..., 0], kv, idx[..., 0], impl=impl)
        assert calls["indexer_scores_trainable"] == (True, kernel)
        dispatch.indexer_slot_scores(q[..., 0, :], q[..., 0], kv, idx, impl=impl)
        assert calls["indexer_slot_scores_trainable"] == (True, kernel)


def test_the_model_passes_the_options_to_the_kernels(small_config, small_params):
    """Through the jitted forward: a Gluon forward asked for in interpret mode (Pallas kernels only) is refused by
    the kernel's own check; with the reference implementation the options change nothing (up to float32 rounding:
    on a GPU, two compiles of the same program need not agree to the bit)."""
    tokens = jax.random.randint(jax.random.key(3), (1, 10), 0, small_config.vocab_size)
    with pytest.raises(ValueError, match="forward_kernel='gluon' cannot run: the Pallas interpreter"):
        forward(small_params, tokens, config=small_config, impl=Kernels(impl="interpret", sparse_forward="gluon"))
    want = forward(small_params, tokens, config=small_config, impl="reference")
    got = forward(small_params, tokens, config=small_config, impl=Kernels(impl="reference", distribution="pallas"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resolve", [indexer.resolve_backward_kernel, indexer_slots.resolve_kernel])
def test_resolvers_import_their_gluon_module_only_where_gluon_runs(monkeypatch, resolve):
    """On a GPU install without triton the resolvers whose limits live in a Gluon module (which imports triton)
    give the Pallas kernel under "auto" and say why under "gluon", instead of failing to import that module."""
    monkeypatch.setattr(_gluon, "unavailable_reason", lambda: "no triton here (stand-in)")
    for module in ("pallas_kernels.indexer_backward_gluon", "pallas_kernels.indexer_slots_gluon"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    options = dict(interpret=False, dtype=jnp.bfloat16, heads=64, width=128)
    assert resolve("auto", **options) == "pallas"
    with pytest.raises(ValueError, match="'gluon' cannot run: no triton here"):
        resolve("gluon", **options)
