"""One DSA transformer block: MLA attention whose keys are chosen by the lightning indexer, then the FFN.

IndexCache (SPEC §2) lives in `DSABlock.__call__`: a Full layer runs its indexer and passes its top-k on; a Shared
layer skips the indexer and attends with the indices carried from the nearest preceding Full layer.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from indexcache_jax.cache import LayerCache
from indexcache_jax.config import ModelConfig
from indexcache_jax.distill import DistillState, add_layer, start_group
from indexcache_jax.ffn import MLP, MoE
from indexcache_jax.indexer import LightningIndexer, select_top_k
from indexcache_jax.mla import MLAttention
from indexcache_jax.nn import RMSNorm
from pallas_kernels.dispatch import ImplArg

TOPK_NAME = "dsa_topk_indices"  # a Full layer's selection, kept by the layer rematerialisation (model.py)


class LayerContext(NamedTuple):
    """What every layer of one forward step shares (computed once, outside the layer scan)."""

    positions: jax.Array  # int32[B,T], absolute position of each query token
    write_offsets: Optional[jax.Array]  # int32[B], cache row where this step's first token goes; None: no cache
    rope: tuple  # (cos, sin) f32[B,T,P/2] at `positions`; MLA and the indexer rotate by the same angles
    topk: int  # index slots per query (static)
    attention: str  # "sparse" (DSA) or "dense" (all earlier tokens; no indexer runs) (static)
    impl: ImplArg  # kernel implementation for pallas_kernels.dispatch (static)


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

        With a DistillState (training, no cache) a Full layer starts a new distillation group with its indexer's
        distribution over the keys it selected (all visible keys in dense mode), and every layer adds its
        attention distribution over the same keys (see distill.py).
        """
        x = self.input_layernorm(hidden)
        q_resid, q_nope, q_rope = self.self_attn.queries(x, ctx.rope)
        # The indexer reads the block's activations through a stop-gradient: only the distillation loss trains
        # it, and it never trains anything but the indexer.
        x_in, q_in = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_resid)
        kv_rows, index_keys = self.self_attn.latent(x, ctx.rope), self.indexer.keys(x_in, ctx.rope)
        key_scales = None  # with an fp8 key cache: the keys come quantised, one scale per token
        if cache is not None:  # attend over everything cached so far, this step's tokens included
            cache = cache.append(ctx.write_offsets, kv_rows, index_keys)
            kv_rows, index_keys, key_scales = cache.latent, cache.index_keys, cache.index_key_scales

        if ctx.attention == "dense":
            if distill is None:
                attn = self.self_attn.attend_dense(q_nope, q_rope, kv_rows, ctx.positions)
            else:
                attn, probs = self.self_attn.attend_dense(q_nope, q_rope, kv_rows, ctx.positions,
                                                          with_distribution=True)
                def start_dense_group(d):
                    q, w = self.indexer.queries(q_in, x_in, ctx.rope)
                    return start_group(d, self.indexer.log_probs(q, w, index_keys, ctx.positions, impl=ctx.impl))

                distill = jax.lax.cond(is_full, start_dense_group, lambda d: d, distill)
                distill = add_layer(distill, probs)
        else:
            def run_indexer(carry):
                indices, distill = carry
                q, w = self.indexer.queries(q_in, x_in, ctx.rope)
                indices = checkpoint_name(
                    select_top_k(q, w, index_keys, ctx.positions, topk=ctx.topk, impl=ctx.impl,
                                 fp8=self.indexer.config.indexer_fp8, key_scales=key_scales,
                                 fp8_head_sum=self.indexer.config.indexer_fp8_head_sum), TOPK_NAME)
                if distill is not None:
                    distill = start_group(distill, self.indexer.log_probs(q, w, index_keys, ctx.positions, indices,
                                                                            impl=ctx.impl))
                return indices, distill

            def reuse_carried(carry):
                return carry

            # lax.cond on the runtime flag executes one branch: Shared layers never score or select.
            indices, distill = jax.lax.cond(is_full, run_indexer, reuse_carried, (indices, distill))
            if distill is None:
                attn = self.self_attn.attend_sparse(q_nope, q_rope, kv_rows, indices, impl=ctx.impl)
            else:
                attn, probs = self.self_attn.attend_sparse(q_nope, q_rope, kv_rows, indices, impl=ctx.impl,
                                                           with_distribution=True)
                distill = add_layer(distill, probs)

        hidden = hidden + attn.astype(hidden.dtype)
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden)).astype(hidden.dtype)
        return hidden, indices, cache, distill
