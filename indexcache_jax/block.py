"""One DSA transformer block: MLA attention whose keys are chosen by the lightning indexer, then the FFN.

IndexCache (SPEC §2) lives in `DSABlock`: a Full layer runs its indexer and passes its top-k on; a Shared layer
skips the indexer and attends with the indices carried from the nearest preceding Full layer.

A block has two parts. The sequence-wide part normalises the input and projects every token's latent KV row and
indexer key (and appends them to the cache). Everything after it is per query token: its queries, its top-k, its
attention over the rows, the output projection and the FFN. That per-token part can run in chunks of queries
(`LayerContext.query_chunk`, `over_query_chunks`), each rematerialised in the backward pass: at DeepSeek-V3.2's
shapes the per-token part holds [T, 128 heads, 576] tensors (9.7 GB in bf16 at 64K tokens, several live at once),
which chunking bounds by the chunk instead of the sequence.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from indexcache_jax.cache import LayerCache
from indexcache_jax.config import ModelConfig
from indexcache_jax.distill import DistillState, add_layer, token_kl
from indexcache_jax.ffn import MLP, MoE
from indexcache_jax.indexer import LightningIndexer, select_top_k
from indexcache_jax.mla import DENSE_LSE_NAME, SPARSE_TARGET_NAME, MLAttention
from indexcache_jax.nn import RMSNorm, compute_copies, with_compute_copies
from pallas_kernels.dispatch import ImplArg

TOPK_NAME = "dsa_topk_indices"  # a Full layer's selection, kept by every rematerialisation (here and model.py)
# What every rematerialisation keeps (the chunks' here, the layers' in model.py): besides the top-k, the dense
# attention's lse and the sparse stages' distillation target, each [B,T,K] or smaller per layer. Keeping the target
# spares the backward a run of its kernel: the sparse step at 32K 3.6% faster for 0.4 GB a layer on an H100
# (docs/BENCHMARKS.md, session 54).
SAVED_BY_CHUNK_REMAT = (TOPK_NAME, DENSE_LSE_NAME, SPARSE_TARGET_NAME)


class LayerContext(NamedTuple):
    """What every layer of one forward step shares (computed once, outside the layer scan)."""

    positions: jax.Array  # int32[B,T], absolute position of each query token
    write_offsets: Optional[jax.Array]  # int32[B], cache row where this step's first token goes; None: no cache
    rope: tuple  # (cos, sin) f32[B,T,P/2] at `positions`; MLA and the indexer rotate by the same angles
    topk: int  # index slots per query (static)
    attention: str  # "sparse" (DSA) or "dense" (all earlier tokens; no indexer runs) (static)
    impl: ImplArg  # kernel implementation for pallas_kernels.dispatch (static)
    query_chunk: int = 0  # queries per chunk of the per-token part (static); 0: all at once (over_query_chunks)
    cast_weights_once: bool = False  # the chunks read weights cast before them (nn.compute_copies) (static)


class _Keys(NamedTuple):
    """What a layer's queries attend to and select from (the whole sequence or cache)."""

    kv_rows: jax.Array  # [B,S,L] latent KV rows
    index_keys: jax.Array  # [B,S,I] indexer keys (fp8 with key_scales, from an fp8 cache)
    key_scales: Optional[jax.Array]  # f32[B,S] or None


class DSABlock(nnx.Module):
    def __init__(self, config: ModelConfig, ffn: str, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_dtype)
        self.self_attn = MLAttention(config, rngs=rngs)
        self.indexer = LightningIndexer(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_dtype)
        self.mlp = MLP(config, config.intermediate_size, rngs=rngs) if ffn == "dense" else MoE(config, rngs=rngs)

    def __call__(self, hidden, indices, is_full, ctx: LayerContext, cache: Optional[LayerCache],
                 distill: Optional[DistillState] = None):
        """hidden [B,T,D], indices int32[B,T,K] (from the nearest preceding Full layer), is_full bool[] ->
        (hidden, indices for the next layer, this layer's updated cache slice or None, distill).

        With a DistillState (training, no cache; its source from `initial_distill_source`) the layer adds its
        KL terms to the group of its Full layer (itself when Full, which then makes its indexer the group's
        source), over the keys that layer selected (all visible keys in dense mode); see distill.py.
        """
        x = self.input_layernorm(hidden)
        # The indexer reads the block's activations through a stop-gradient: only the distillation loss trains
        # it, and it never trains anything but the indexer.
        keys = _Keys(self.self_attn.latent(x, ctx.rope), self.indexer.keys(jax.lax.stop_gradient(x), ctx.rope),
                     None)
        if cache is not None:  # attend over everything cached so far, this step's tokens included
            cache = cache.append(ctx.write_offsets, keys.kv_rows, keys.index_keys)
            keys = _Keys(cache.latent, cache.index_keys, cache.index_key_scales)
        # The source's per-query part is split into the chunks; its whole part (the dense warm-up's indexer keys,
        # chosen here once for all chunks: this layer's own when Full) goes to every chunk beside the layer's keys.
        source_per_query, source_whole = distill.source if distill is not None else (None, None)
        if distill is not None and ctx.attention == "dense":
            source_whole = jnp.where(is_full, keys.index_keys, source_whole)
        # Dense attention's per-head keys and values ([B,S,H,N], [B,S,P], [B,S,H,V]) are made here once for all
        # chunks, not in every chunk (XLA need not hoist a size-inflating product out of the chunks' loop): at
        # DeepSeek-V3.2's shapes the expansion costs as much as a chunk of 1024 queries' attention. They reach the
        # chunks without a gradient; each chunk takes its gradient into kv_rows and W_kvb itself
        # (`MLAttention.reuse_expanded_keys`), so no [B,S,H,N+V] gradient is summed over the chunks.
        expanded = None
        if ctx.attention == "dense":
            expanded = jax.lax.stop_gradient(self.self_attn.expand_keys(keys.kv_rows))
        # Over query chunks, the weights are cast to the compute dtype here, once, not in every chunk (nn.py), where
        # the caller allows it (LayerContext.cast_weights_once: not where the copies would outlive the layer).
        cast_once = ctx.cast_weights_once and runs_in_chunks(ctx.query_chunk, hidden.shape[1])
        copies = compute_copies(self, self.self_attn.config.compute_dtype) if cast_once else None

        def per_token(hidden, x, positions, rope, indices, source_per_query, keys_and_source):
            *keys_and_source, copies = keys_and_source
            block = self if copies is None else with_compute_copies(self, copies)
            return block._per_token(hidden, x, positions, rope, indices, *keys_and_source, source_per_query,
                                    is_full, ctx)

        hidden, indices, source_per_query, token_kls = over_query_chunks(
            per_token, (hidden, x, ctx.positions, ctx.rope, indices, source_per_query),
            (keys, source_whole, expanded, copies), ctx.query_chunk,
            differentiable=(cache is None, cache is None, False, False))
        if distill is not None:
            distill = add_layer(distill, is_full, (source_per_query, source_whole), token_kls)
        return hidden, indices, cache, distill

    def _per_token(self, hidden, x, positions, rope, indices, keys: _Keys, source_whole, expanded, source_per_query,
                   is_full, ctx: LayerContext):
        """The block after its sequence-wide part, for C queries: hidden and x (its normed form) [B,C,D], positions
        int32[B,C], rope (cos, sin) [B,C,P/2], indices int32[B,C,K] (carried), and the distillation source's two
        parts (None, None without distillation): the per-query part carried, the whole part already the group's ->
        (hidden [B,C,D], indices [B,C,K], the group's source_per_query (this layer's own when Full), and
        distill.token_kl f32[B,C]; the last two None without distillation).

        Sources (`initial_distill_source`): sparse: per query the Full layer's log q f32[B,C,K], whole (); dense:
        per query its indexer queries and head weights (q [B,C,G,I], w f32[B,C,G]), whole its keys [B,S,I], from
        which every layer of the group recomputes log q [B,C,S] over the chunk's visible keys. expanded: the dense
        attention's keys and values (`MLAttention.expand_keys`) when the block made them once for all chunks,
        else None."""
        q_resid, q_nope, q_rope = self.self_attn.queries(x, rope)
        x_in, q_in = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_resid)
        distill = source_per_query is not None
        log_q = probs = None

        if ctx.attention == "dense":
            if not distill:
                attn = self.self_attn.attend_dense(q_nope, q_rope, keys.kv_rows, positions, impl=ctx.impl,
                                                   expanded=expanded)
            else:
                source_per_query = jax.lax.cond(is_full, lambda _: self.indexer.queries(q_in, x_in, rope),
                                                lambda carried: carried, source_per_query)
                log_q = self.indexer.log_probs(*source_per_query, source_whole, positions, impl=ctx.impl)
                attn, probs = self.self_attn.attend_dense(q_nope, q_rope, keys.kv_rows, positions,
                                                          with_distribution=True, impl=ctx.impl, expanded=expanded)
        else:
            def run_indexer(indices, _carried_log_q):
                q, w = self.indexer.queries(q_in, x_in, rope)
                indices = checkpoint_name(
                    select_top_k(q, w, keys.index_keys, positions, topk=ctx.topk, impl=ctx.impl,
                                 fp8=self.indexer.config.indexer_fp8, key_scales=keys.key_scales,
                                 fp8_head_sum=self.indexer.config.indexer_fp8_head_sum), TOPK_NAME)
                if not distill:
                    return indices, None
                return indices, self.indexer.log_probs(q, w, keys.index_keys, positions, indices, impl=ctx.impl)

            # lax.cond on the runtime flag executes one branch: Shared layers never score or select.
            indices, log_q = jax.lax.cond(is_full, run_indexer, lambda indices, carried: (indices, carried),
                                          indices, source_per_query)
            source_per_query = log_q
            if not distill:
                attn = self.self_attn.attend_sparse(q_nope, q_rope, keys.kv_rows, indices, impl=ctx.impl)
            else:
                attn, probs = self.self_attn.attend_sparse(q_nope, q_rope, keys.kv_rows, indices, impl=ctx.impl,
                                                           with_distribution=True)

        token_kls = token_kl(probs, log_q) if distill else None
        hidden = hidden + attn.astype(hidden.dtype)
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden)).astype(hidden.dtype)
        return hidden, indices, source_per_query, token_kls


def initial_distill_source(config: ModelConfig, batch: int, num_q: int, num_keys: int, attention: str,
                           topk: int):
    """Placeholders of a DistillState's source (layer 0 is Full and replaces them): (per-query part, whole part),
    shaped as `DSABlock._per_token` documents."""
    if attention == "dense":
        c = config
        queries = (jnp.zeros((batch, num_q, c.index_n_heads, c.index_head_dim), c.compute_dtype),
                   jnp.zeros((batch, num_q, c.index_n_heads), jnp.float32))
        return queries, jnp.zeros((batch, num_keys, c.index_head_dim), c.compute_dtype)
    return jnp.zeros((batch, num_q, topk), jnp.float32), ()


def runs_in_chunks(chunk: int, num_queries: int) -> bool:
    """Whether `over_query_chunks` splits `num_queries` queries into chunks of `chunk` (0, or >= T: one call)."""
    return 0 < chunk < num_queries


def over_query_chunks(fn, per_query, keys, chunk: int, *, differentiable):
    """fn(*per_query, keys) over chunks of `chunk` queries -> its outputs, concatenated over queries.

    per_query: a tuple of pytrees of [B,T,...] arrays, split along T; keys: a pytree (a layer's `_Keys` and weight
    copies; the LM head's weight copy, model.py) passed whole to every chunk. chunk 0 (or >= T): one call over all
    T. Otherwise every chunk is one `jax.checkpoint`ed call, which keeps only its
    inputs and its top-k (SAVED_BY_CHUNK_REMAT) for the backward pass, so one chunk's activations are live at a time;
    the price is one more forward pass of fn (and no more inside a layer rematerialisation, whose recomputation
    needs only the chunks' inputs). Chunks run in a `lax.map`, and a last partial chunk (T not a multiple of
    chunk) in a call of its own.

    differentiable: the gradient may flow to `keys` (a bool, or a tree of bools that is a prefix of `keys`: per
    part). Every chunk adds its part of the keys' gradient into one sum, which autodiff would keep in the keys'
    dtype; such keys instead reach the chunks without a gradient, each beside a float32 sink that collects it
    (`_gradient_sink`), so that a bf16 model sums its chunks' key gradients in float32 as the unchunked kernels do,
    and rounds the sum once. The chunks read the keys as they are (a float32 copy would cost every chunk a cast).
    Not for a cache (inference), nor for keys that get no gradient: both would only allocate a sink.
    """
    num_q = jax.tree.leaves(per_query)[0].shape[1]
    if not runs_in_chunks(chunk, num_q):
        return fn(*per_query, keys)

    def with_sinks(part, grows_gradient):
        if not grows_gradient:
            return part
        return jax.tree.map(lambda k: _gradient_sink(k) if jnp.issubdtype(k.dtype, jnp.floating) else k, part)
    keys = jax.tree.map(lambda grows_gradient, part: with_sinks(part, grows_gradient), differentiable, keys)

    def one_chunk(per_query, keys):
        return fn(*per_query, jax.tree.map(_drain_into_sink, keys, is_leaf=lambda k: isinstance(k, _Sunk)))

    # prevent_cse=False: inside a scan (the layers', and lax.map's) nothing can be CSE'd across the recomputation
    one_chunk = jax.checkpoint(one_chunk, prevent_cse=False,
                               policy=jax.checkpoint_policies.save_only_these_names(*SAVED_BY_CHUNK_REMAT))
    whole = num_q // chunk * chunk

    def chunks(x):  # [B, whole, ...] -> [whole/chunk, B, chunk, ...]
        return jnp.moveaxis(x[:, :whole].reshape(x.shape[0], whole // chunk, chunk, *x.shape[2:]), 1, 0)

    def unchunk(y):  # [n, B, chunk, ...] -> [B, n * chunk, ...]
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(y.shape[0], -1, *y.shape[3:])

    out = jax.tree.map(unchunk, jax.lax.map(lambda xs: one_chunk(xs, keys), jax.tree.map(chunks, per_query)))
    if whole < num_q:
        tail = one_chunk(jax.tree.map(lambda x: x[:, whole:], per_query), keys)
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), out, tail)
    return out


class _Sunk(NamedTuple):
    """Keys whose gradient a float32 sink collects (`_gradient_sink`)."""

    value: jax.Array  # the keys, without a gradient of their own
    sink: jax.Array  # float32 zeros shaped like value: its cotangent is value's


@jax.custom_vjp
def _gradient_sink(value):
    """value -> _Sunk(value, float32 zeros like it). In the backward pass the sink's cotangent (float32: the sum
    of every `_drain_into_sink` use's) becomes value's, rounded to value's dtype once."""
    return _Sunk(value, jnp.zeros(value.shape, jnp.float32))


def _gradient_sink_fwd(value):
    return _gradient_sink(value), jnp.zeros((), value.dtype)  # the residual only carries the dtype


def _gradient_sink_bwd(like, cotangent):
    # cotangent.value is zero: _drain_into_sink sends none to it
    return (cotangent.sink.astype(like.dtype),)


_gradient_sink.defvjp(_gradient_sink_fwd, _gradient_sink_bwd)


@jax.custom_vjp
def _drain_into_sink_impl(value, sink):
    del sink  # only its cotangent matters
    return value


def _drain_fwd(value, sink):
    return value, None


def _drain_bwd(_, cotangent):
    return None, cotangent.astype(jnp.float32)


_drain_into_sink_impl.defvjp(_drain_fwd, _drain_bwd)


def _drain_into_sink(keys):
    """A `_Sunk` -> its value, whose cotangent goes to the sink in float32; other leaves as they are."""
    if not isinstance(keys, _Sunk):
        return keys
    return _drain_into_sink_impl(jax.lax.stop_gradient(keys.value), keys.sink)
