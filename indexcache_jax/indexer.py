"""The lightning indexer: scores every earlier token for each query and keeps the top-k (SPEC §1).

    q_I = q_resid W_qb -> [B,T,G,I];  k_I = LayerNorm(x W_k) -> [B,T,I] (one key per token, shared by all heads)
    w   = x W_w * G^-0.5 -> [B,T,G];  I[b,t,s] = sum_g w[b,t,g] ReLU(I^-0.5 q_I[b,t,g] . k_I[b,s])
RoPE acts on the first P dims of q_I and k_I, in the model family's layout (config.indexer_rope_layout).
Production kernels also apply a Hadamard rotation before fp8 quantisation; it is orthogonal, so it keeps every dot
product and the bf16/fp32 form here is the exact reference.
Shape letters: B T S D, Q q_lora_rank, G index_n_heads, I index_head_dim, P qk_rope_head_dim, K top-k slots.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from indexcache_jax.config import ModelConfig
from indexcache_jax.distill import masked_log_softmax
from indexcache_jax.nn import LayerNorm, project, weight
from indexcache_jax.rope import apply_rope


class LightningIndexer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.wq_b = weight(rngs, c, c.q_lora_rank, c.index_n_heads, c.index_head_dim)  # [Q,G,I]
        self.wk = weight(rngs, c, c.hidden_size, c.index_head_dim)  # [D,I]
        self.k_norm = LayerNorm(c.index_head_dim, c.indexer_norm_eps, c.param_dtype)
        self.weights_proj = weight(rngs, c, c.hidden_size, c.index_n_heads)  # [D,G]

    def _rope(self, x, rope):
        """Rotate the first P dims of x [..., I]; the rest pass through."""
        p = self.config.qk_rope_head_dim
        return jnp.concatenate([apply_rope(x[..., :p], *rope, self.config.indexer_rope_layout), x[..., p:]], -1)

    def keys(self, x, rope):
        """x [B,T,D] -> indexer keys [B,T,I] (what the indexer cache holds)."""
        k = self.k_norm(project("btd,di->bti", x, self.wk, self.config.compute_dtype))
        return self._rope(k, rope)

    def queries(self, q_resid, x, rope):
        """q_resid [B,T,Q], x [B,T,D] (the block's normed input) -> indexer queries q [B,T,G,I] and head weights
        w f32[B,T,G]."""
        c = self.config
        q = self._rope(project("btq,qgi->btgi", q_resid, self.wq_b, c.compute_dtype), rope)
        # Both constant scales fold into the head weights: c * ReLU(a) == ReLU(c * a) for c > 0.
        head_scale = (c.index_n_heads ** -0.5) * (c.index_head_dim ** -0.5)
        return q, project("btd,dg->btg", x, self.weights_proj, jnp.float32) * head_scale

    def select(self, q_resid, x, keys, q_positions, rope, *, topk: int, impl=None):
        """Top-k earlier tokens per query. q_resid [B,T,Q], x [B,T,D], keys [B,S,I], q_positions int[B,T] ->
        int32[B,T,topk] in the top-k convention of `pallas_kernels.topk_reference`."""
        q, w = self.queries(q_resid, x, rope)
        return select_top_k(q, w, keys, q_positions, topk=topk, impl=impl, fp8=self.config.indexer_fp8,
                            fp8_head_sum=self.config.indexer_fp8_head_sum)

    @staticmethod
    def log_probs(q, w, keys, q_positions, indices=None, *, impl=None):
        """The indexer's distribution (softmax of its scores) as log-probabilities f32, from queries q [B,T,G,I],
        w [B,T,G] (see `queries`) and keys [B,S,I]: over each query's selected slots indices int32[B,T,K] ->
        [B,T,K], or (indices None) over all visible keys -> [B,T,S]; 0 outside the set (distill.masked_log_softmax).
        Differentiable: the distillation losses train the indexer through this, by the dispatch's differentiable
        scores (`impl`): over the slots `indexer_slot_scores`, over all keys `indexer_scores`, whose kernels never
        store the per-head logits ([B,T,K,G] or [B,T,S,G]) that autodiff of the references keeps."""
        keys = keys.astype(q.dtype)
        if indices is None:
            scores = pallas_kernels.indexer_scores(q, w, keys, q_positions, impl=impl)  # -inf where not visible
            return masked_log_softmax(scores, jnp.isfinite(scores))
        scores = pallas_kernels.indexer_slot_scores(q, w, keys, indices, impl=impl)
        return masked_log_softmax(scores, indices >= 0)


def select_top_k(q, w, keys, q_positions, *, topk: int, impl=None, fp8: bool = False, key_scales=None,
                 fp8_head_sum: str = "bf16"):
    """Top-k of the indexer scores of q [B,T,G,I], w [B,T,G], keys [B,S,I] -> int32[B,T,topk] (fp8: scored with
    fp8-quantised inputs, see `ModelConfig.indexer_fp8`; key_scales f32[B,S]: keys already fp8, from the cache;
    fp8_head_sum: `ModelConfig.indexer_fp8_head_sum`)."""
    # The selection is piecewise constant in its inputs (its gradient is zero) and the fused kernels define no
    # JVP: cut the graph here so that differentiating the model never tries to differentiate them.
    if key_scales is None:
        keys = keys.astype(q.dtype)
    q, w, keys = jax.lax.stop_gradient((q, w, keys))
    return pallas_kernels.indexer_topk(q, w, keys, q_positions, topk=topk, impl=impl, fp8=fp8, k_scale=key_scales,
                                       fp8_head_sum=fp8_head_sum)
