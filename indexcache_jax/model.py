"""The DSA transformer: embedding, the layer stack as one `lax.scan` per run of same-shaped layers, final norm and
LM head; and the functional entry points that build, bind and run it over parameter pytrees.

The scan carry is (hidden [B,T,D], indices int32[B,T,K]): the top-k of the nearest Full layer so far, which a
Shared layer reads instead of running its indexer. The pattern enters as a runtime bool[N] array, so one compiled
function serves every pattern.

Rematerialisation (`remat`, training at long context): without it the backward pass keeps every layer's
activations, which at DeepSeek-V3.2's attention shapes is many GB per layer at 32K tokens. remat="layer" keeps
only each layer's inputs (the scan carry), its top-k indices and, when the indexers are distilled, the sparse
attention's distribution over those slots (`SAVED_BY_LAYER_REMAT`), and recomputes the rest of the layer in the
backward pass; the indices are kept because re-selecting them means re-running the indexer's scores over every
visible key and the top-k (and they take no gradient); the distribution, the distillation target f32[B,T,K], because
recomputing it is a kernel run of its own, for as many bytes as the indices (the sparse step 3.6% faster at 32K:
docs/BENCHMARKS.md, session 54). On an H100 with two DeepSeek-V3.2-shaped layers remat="layer" halves the step's
temporaries for 8-11% more time, and 32K tokens fit where 16K did without it (docs/BENCHMARKS.md, session 34).
remat="layer_keep_attention" also keeps each layer's attention output and log-sum-exp (the kernels' residuals,
`ATTENTION_RESIDUALS`), so neither recomputation runs the attention's forward kernel again: with the dense
attention [B,T,H,V] more per layer (1 GiB at 32K tokens at DeepSeek-V3.2's shapes, 128 heads x 128 in bf16), with
the sparse one [B,T,H,R] (4 GiB: the latent width 512), in the compute dtype. The kernels alone name these; the
reference kernels' autodiff saves other values, so under impl="reference" it is "layer".

Query chunks (`query_chunk`, long contexts): what remat="layer" still holds at once is one layer's per-token
tensors over the whole sequence, the [T, heads, latent] queries and outputs of the absorbed attention (and the
[heads, T, T] logits of the dense warm-up). query_chunk=C runs each layer's per-token part (everything after the
latent KV rows and indexer keys: queries, selection, attention, FFN) over C queries at a time, each chunk
rematerialised on its own (block.over_query_chunks): the same function, for one more forward pass of that part.
With remat="layer" too, that part still runs forward twice, not three times: the layer's recomputation needs
nothing of the chunks but their inputs, so autodiff drops its copy of them. On an H100 with two DeepSeek-V3.2-
shaped layers, remat="layer" with query_chunk=8192 trains 128K tokens (44 GB of temporaries), and at 32K it
takes 1.4% more time per step than remat="layer" alone, with 25 instead of 36 GB (docs/BENCHMARKS.md, session 35).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from indexcache_jax.block import (SAVED_BY_CHUNK_REMAT, DSABlock, LayerContext, initial_distill_source,
                                  over_query_chunks, runs_in_chunks)
from indexcache_jax.mla import DENSE_LSE_NAME
from indexcache_jax.cache import KVCache
from indexcache_jax.config import ModelConfig
from indexcache_jax.distill import indexer_loss, init_state
from indexcache_jax.nn import RMSNorm, compute_copy, project, weight, with_compute_copy
from indexcache_jax.pattern import IndexCachePattern, as_flags
from indexcache_jax.rope import rope_angles
from pallas_kernels.dense_attention import OUTPUT_NAME as DENSE_OUTPUT_NAME
from pallas_kernels.dispatch import ImplArg
from pallas_kernels.sparse_attention import LSE_NAME as SPARSE_LSE_NAME, OUTPUT_NAME as SPARSE_OUTPUT_NAME

ATTENTION_MODES = ("sparse", "dense")
REMAT_MODES = ("none", "layer", "layer_keep_attention")
SAVED_BY_LAYER_REMAT = SAVED_BY_CHUNK_REMAT  # the top-k, the dense lse, the sparse distillation target
# What remat="layer_keep_attention" keeps besides: the attention kernels' residuals, its output and lse. The layer's
# policy reaches the query chunks' rematerialisation inside it too, so neither runs the attention's forward again.
ATTENTION_RESIDUALS = (DENSE_OUTPUT_NAME, DENSE_LSE_NAME, SPARSE_OUTPUT_NAME, SPARSE_LSE_NAME)


def _stacked_blocks(config: ModelConfig, ffn: str, num: int, rngs: nnx.Rngs) -> DSABlock:
    """`num` blocks with independently initialised weights, stacked on a leading layer axis."""
    graphdefs, states = zip(*(nnx.split(DSABlock(config, ffn, rngs=rngs)) for _ in range(num)), strict=True)
    return nnx.merge(graphdefs[0], jax.tree.map(lambda *layers: jnp.stack(layers), *states))


def scan_layers(stack: DSABlock, hidden, indices, flags, ctx: LayerContext, cache, distill=None,
                collect_indices: bool = False, remat: str = "none"):
    """Run a stack of blocks: hidden [B,T,D], indices int32[B,T,K], flags bool[N_run] (True = Full), cache: the
    run's stacked LayerCache or None, distill: a DistillState carried through the layers or None ->
    (hidden, indices, updated cache, distill, every layer's indices int32[N_run,B,T,K] if collect_indices).
    remat: see the module docstring."""
    graphdef, stacked_params = nnx.split(stack)

    def layer_step(carry, layer_inputs):
        hidden, indices, distill = carry
        params, is_full, layer_cache = layer_inputs
        block = nnx.merge(graphdef, params)
        hidden, indices, layer_cache, distill = block(hidden, indices, is_full, ctx, layer_cache, distill)
        return (hidden, indices, distill), (layer_cache, indices if collect_indices else None)

    if remat not in REMAT_MODES:  # checked here, where every entry point's layers pass
        raise ValueError(f"remat must be one of {list(REMAT_MODES)}, got {remat!r}")
    if remat != "none":
        saved = SAVED_BY_LAYER_REMAT + (ATTENTION_RESIDUALS if remat == "layer_keep_attention" else ())
        # prevent_cse=False: inside a scan nothing can be CSE'd across the recomputation (jax.checkpoint's docs)
        layer_step = jax.checkpoint(layer_step, prevent_cse=False,
                                    policy=jax.checkpoint_policies.save_only_these_names(*saved))
    (hidden, indices, distill), (cache, per_layer) = jax.lax.scan(layer_step, (hidden, indices, distill),
                                                                  (stacked_params, flags, cache))
    return hidden, indices, cache, distill, per_layer


class DSATransformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = weight(rngs, config, config.vocab_size, config.hidden_size)  # [V,D]
        stacks = {ffn: _stacked_blocks(config, ffn, stop - start, rngs) for start, stop, ffn in config.layer_segments}
        self.dense_layers = stacks.get("dense")  # layers [0, num_dense_layers)
        self.moe_layers = stacks.get("moe")  # the rest
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_dtype)
        self.lm_head = None if config.tie_word_embeddings else weight(rngs, config, config.hidden_size,
                                                                       config.vocab_size)  # [D,V]

    def __call__(self, tokens, flags, *, cache: Optional[KVCache] = None, logits_at=None, attention="sparse",
                 impl=None, remat: str = "none", query_chunk: int = 0):
        """tokens int[B,T], flags bool[N] -> (logits f32[B,T,V], or [B,V] at positions logits_at int[B];
        the cache with this step's rows written (lengths unchanged) or None).

        Without a cache the tokens attend among themselves from position 0. With one, row b's tokens sit at
        positions cache.lengths[b] + t and attend over everything cached before them. Token ids outside the
        vocabulary embed as NaN, so they can never yield plausible-looking logits.
        """
        hidden, new_cache, _, _ = self._layers(tokens, flags, cache, attention, impl, with_distill=False,
                                               remat=remat, query_chunk=query_chunk)
        if logits_at is not None:
            hidden = jnp.take_along_axis(hidden, logits_at[:, None, None], axis=1)[:, 0]
        return self._logits(hidden), new_cache

    def with_indexer_loss(self, tokens, flags, *, attention="sparse", impl=None, remat: str = "none",
                          query_chunk: int = 0):
        """Training: tokens int[B,T], flags bool[N] -> (logits f32[B,T,V], the indexers' distillation loss f32[]).

        The loss is distill.py's: each Full layer's indexer against the attention distributions of the layers it
        serves (itself alone when every layer is Full), over the selected keys (attention="sparse") or all
        visible keys ("dense", the warm-up). It reaches only the indexers' weights; the logits' gradient never
        reaches them.
        """
        hidden, _, distill_state, _ = self._layers(tokens, flags, None, attention, impl, with_distill=True,
                                                   remat=remat, query_chunk=query_chunk)
        return self._logits(hidden), indexer_loss(distill_state)

    def training_losses(self, tokens, flags, *, attention="sparse", impl=None, remat: str = "none",
                        query_chunk: int = 0):
        """Training: tokens int[B,T+1] -> (the mean next-token cross-entropy of tokens[:, 1:] given tokens[:, :-1],
        the indexers' distillation loss), both f32[]: `next_token_loss` of `with_indexer_loss`, except that with
        query_chunk the LM head and its loss run over the chunks too (each rematerialised), so the f32 [B,T,V*]
        logits never exist at once (67 GB at 128K tokens with DeepSeek-V3.2's vocabulary of 129280)."""
        hidden, _, distill_state, _ = self._layers(tokens[:, :-1], flags, None, attention, impl, with_distill=True,
                                                   remat=remat, query_chunk=query_chunk)
        # The head's weight cast to the compute dtype once, not in every chunk (see nn.compute_copies)
        chunked = runs_in_chunks(query_chunk, hidden.shape[1])
        head_copy = compute_copy(self._head_weight(), self.config.compute_dtype) if chunked else None
        token_losses = over_query_chunks(
            lambda h, targets, head_copy: token_cross_entropy(self._logits(h, head_copy), targets),
            (hidden, tokens[:, 1:]), head_copy, query_chunk, differentiable=False)
        return jnp.mean(token_losses), indexer_loss(distill_state)

    def layer_indices(self, tokens, flags, *, impl=None, query_chunk: int = 0):
        """The top-k indices every layer attends with, int32[N,B,T,K] (a Shared layer's are its Full layer's)."""
        return self._layers(tokens, flags, None, "sparse", impl, with_distill=False, collect_indices=True,
                            query_chunk=query_chunk)[3]

    def _layers(self, tokens, flags, cache, attention, impl, *, with_distill: bool, collect_indices: bool = False,
                remat: str = "none", query_chunk: int = 0):
        """-> (final hidden [B,T,D] before the norm, new cache or None, DistillState or None, per-layer indices
        int32[N,B,T,K] or None). query_chunk: see the module docstring."""
        if isinstance(query_chunk, bool) or not isinstance(query_chunk, (int, np.integer)) or query_chunk < 0:
            raise ValueError(f"query_chunk must be an int >= 0 (0: all queries at once), got {query_chunk!r}")
        query_chunk = int(query_chunk)
        c = self.config
        batch, num_q = tokens.shape
        offsets = jnp.zeros((batch,), jnp.int32) if cache is None else cache.lengths
        positions = offsets[:, None] + jnp.arange(num_q, dtype=jnp.int32)[None, :]
        num_keys = num_q if cache is None else cache.max_len
        # Weights cast once per layer for its query chunks (block.py) where that costs no memory: inside the layer
        # rematerialisation, or in inference (a cache: nothing is differentiated). Without remat the copies would be
        # kept for the backward pass, every layer's at once.
        ctx = LayerContext(positions=positions, write_offsets=None if cache is None else offsets,
                           rope=rope_angles(positions, c),
                           topk=c.topk_for(num_keys), attention=attention, impl=impl, query_chunk=query_chunk,
                           cast_weights_once=remat != "none" or cache is not None)

        hidden = jnp.take(self.embed_tokens[...], tokens, axis=0, mode="fill", fill_value=jnp.nan)
        hidden = hidden.astype(c.compute_dtype)
        indices = jnp.full((batch, num_q, ctx.topk), -1, jnp.int32)  # layer 0 is Full and overwrites this
        distill_state = None
        if with_distill:
            distill_state = init_state(initial_distill_source(c, batch, num_q, num_keys, attention, ctx.topk))
        stacks = {"dense": self.dense_layers, "moe": self.moe_layers}
        new_segments, per_layer = [], []
        for run, (start, stop, ffn) in enumerate(c.layer_segments):
            run_cache = None if cache is None else cache.segments[run]
            hidden, indices, run_cache, distill_state, run_indices = scan_layers(
                stacks[ffn], hidden, indices, flags[start:stop], ctx, run_cache, distill_state, collect_indices,
                remat)
            new_segments.append(run_cache)
            per_layer.append(run_indices)
        new_cache = None if cache is None else cache.replace(segments=tuple(new_segments))
        return hidden, new_cache, distill_state, jnp.concatenate(per_layer) if collect_indices else None

    def _head_weight(self) -> nnx.Param:
        """The LM head's weight: its own [D,V], or the embedding [V,D] when tied."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def _logits(self, hidden, head_copy=None):
        """[..., D] -> f32[..., V]. head_copy: the head's weight in the compute dtype (`nn.compute_copy`), or
        None to cast it here."""
        c = self.config
        hidden = self.norm(hidden)
        spec = "...d,vd->...v" if self.lm_head is None else "...d,dv->...v"
        logits = project(spec, hidden, with_compute_copy(self._head_weight(), head_copy), c.compute_dtype)
        return logits.astype(jnp.float32)


# ---- functional entry points ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def model_graphdef(config: ModelConfig) -> nnx.GraphDef:
    """The static structure of the model for `config` (no weights are materialised)."""
    return nnx.split(nnx.eval_shape(lambda: DSATransformer(config, rngs=nnx.Rngs(0))))[0]


def init_params(config: ModelConfig, seed: int = 0) -> nnx.State:
    """Randomly initialised parameters (an nnx.State pytree), deterministic in `seed`."""
    return nnx.split(DSATransformer(config, rngs=nnx.Rngs(seed)))[1]


def bind(config: ModelConfig, params: nnx.State) -> DSATransformer:
    """The module for `params`, for use inside a jitted function."""
    return nnx.merge(model_graphdef(config), params)


def check_tokens(tokens, config: ModelConfig, name: str = "tokens") -> None:
    """Raise ValueError for ids outside [0, vocab_size). Skipped for traced values (they embed as NaN instead)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= config.vocab_size):
        bad = arr[(arr < 0) | (arr >= config.vocab_size)]
        raise ValueError(f"{name} contains id(s) {sorted(set(bad.tolist()))[:8]} outside the vocabulary "
                         f"[0, {config.vocab_size})")


def check_flags(flags, config: ModelConfig):
    """Runtime pattern flags as a bool[N] array; concrete ones must have layer 0 Full."""
    flags = jnp.asarray(flags)
    if flags.shape != (config.num_layers,) or flags.dtype != jnp.bool_:
        raise ValueError(f"pattern flags must be bool[{config.num_layers}], got {flags.dtype}{list(flags.shape)}")
    if not isinstance(flags, jax.core.Tracer) and not bool(flags[0]):
        raise ValueError("pattern flags: layer 0 must be Full (True); a Shared layer needs an earlier Full layer")
    if not isinstance(flags, jax.core.Tracer) and config.shared_only_layers:
        full_without_indexer = [i for i in config.shared_only_layers if bool(flags[i])]
        if full_without_indexer:
            raise ValueError(f"pattern flags: layer(s) {full_without_indexer} have no indexer weights "
                             f"(model.shared_only_layers) and must stay Shared")
    return flags


def pattern_flags(pattern: IndexCachePattern | str | np.ndarray | None, config: ModelConfig):
    """Any accepted pattern form (None = all Full, "FSSS...", IndexCachePattern, bool[N]) -> checked bool[N]."""
    return check_flags(as_flags(pattern, config.num_layers), config)


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}, got {attention!r}")


@functools.partial(jax.jit, static_argnames=("config", "attention", "impl", "remat", "query_chunk"))
def _forward(params, tokens, flags, *, config, attention, impl, remat, query_chunk):
    return bind(config, params)(tokens, flags, attention=attention, impl=impl, remat=remat,
                                query_chunk=query_chunk)[0]


def forward(params: nnx.State, tokens, pattern=None, *, config: ModelConfig, attention: str = "sparse",
            impl: ImplArg = None, remat: str = "none", query_chunk: int = 0):
    """Logits f32[B,T,V] of a whole sequence (training and evaluation; no cache). `pattern`: see pattern_flags;
    attention="dense" attends to all earlier tokens and runs no indexer (the dense warm-up's model); remat: what
    the gradient keeps (`REMAT_MODES`); query_chunk: queries per chunk of each layer's per-token part (0: all at
    once). See the module docstring for both."""
    _check_attention(attention)
    check_tokens(tokens, config)
    return _forward(params, jnp.asarray(tokens), pattern_flags(pattern, config), config=config, attention=attention,
                    impl=impl, remat=remat, query_chunk=query_chunk)


def token_cross_entropy(logits, targets):
    """logits [..., V], targets int[...] -> each position's cross-entropy f32[...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def next_token_loss(logits, tokens):
    """Mean next-token cross-entropy: logits f32[B,L,V] of inputs tokens[:, :-1], targets tokens[:, 1:] (int[B,L+1])."""
    return jnp.mean(token_cross_entropy(logits, tokens[:, 1:]))


@functools.partial(jax.jit, static_argnames=("config", "attention", "impl", "remat", "query_chunk"))
def _forward_with_indexer_loss(params, tokens, flags, *, config, attention, impl, remat, query_chunk):
    return bind(config, params).with_indexer_loss(tokens, flags, attention=attention, impl=impl, remat=remat,
                                                  query_chunk=query_chunk)


def forward_with_indexer_loss(params: nnx.State, tokens, pattern=None, *, config: ModelConfig,
                              attention: str = "sparse", impl: ImplArg = None, remat: str = "none",
                              query_chunk: int = 0):
    """Training: (logits f32[B,T,V], the indexers' distillation loss f32[]) of a whole sequence; see
    DSATransformer.with_indexer_loss and distill.py. attention="dense" is the warm-up's form; remat and
    query_chunk as in `forward`."""
    _check_attention(attention)
    check_tokens(tokens, config)
    return _forward_with_indexer_loss(params, jnp.asarray(tokens), pattern_flags(pattern, config), config=config,
                                      attention=attention, impl=impl, remat=remat, query_chunk=query_chunk)


def is_indexer_weight(path) -> bool:
    """Whether a parameter's tree path (from `jax.tree_util.tree_map_with_path`) lies in an indexer."""
    return "indexer" in [getattr(k, "key", getattr(k, "name", None)) for k in path]


def freeze_main(params: nnx.State) -> nnx.State:
    """params with every weight but the indexers' behind a stop-gradient: what the dense warm-up trains."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if is_indexer_weight(path) else jax.lax.stop_gradient(x), params)


@functools.partial(jax.jit, static_argnames=("config", "attention", "impl", "remat", "query_chunk", "frozen_main"))
def _training_losses(params, tokens, flags, *, config, attention, impl, remat, query_chunk, frozen_main):
    if frozen_main:
        params = freeze_main(params)
    return bind(config, params).training_losses(tokens, flags, attention=attention, impl=impl, remat=remat,
                                                query_chunk=query_chunk)


def training_losses(params: nnx.State, tokens, pattern=None, *, config: ModelConfig, attention: str = "sparse",
                    impl: ImplArg = None, remat: str = "none", query_chunk: int = 0, frozen_main: bool = False):
    """Training: tokens int[B,L+1] (inputs [:L], targets [1:]) -> (LM loss, the indexers' distillation loss), both
    f32[]. The values of `next_token_loss(forward_with_indexer_loss(...))` without the [B,L,V*] logits: with
    query_chunk the LM head runs per chunk of tokens too (DSATransformer.training_losses). Arguments as in
    `forward`; frozen_main: only the indexers' weights get a gradient (the others' is zero), as in the dense
    warm-up."""
    _check_attention(attention)
    check_tokens(tokens, config)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, length + 1] with length >= 1 (inputs and their next tokens), "
                         f"got shape {tokens.shape}")
    return _training_losses(params, tokens, pattern_flags(pattern, config), config=config, attention=attention,
                            impl=impl, remat=remat, query_chunk=query_chunk, frozen_main=bool(frozen_main))


@functools.partial(jax.jit, static_argnames=("config", "impl", "query_chunk"))
def _layer_indices(params, tokens, flags, *, config, impl, query_chunk):
    return bind(config, params).layer_indices(tokens, flags, impl=impl, query_chunk=query_chunk)


def layer_indices(params: nnx.State, tokens, pattern=None, *, config: ModelConfig, impl: ImplArg = None,
                  query_chunk: int = 0):
    """The top-k indices each layer attends with, int32[N,B,T,K] (ascending ids, then -1; see topk_reference);
    query_chunk as in `forward`."""
    check_tokens(tokens, config)
    return _layer_indices(params, jnp.asarray(tokens), pattern_flags(pattern, config), config=config, impl=impl,
                          query_chunk=query_chunk)
