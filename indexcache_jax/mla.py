"""Multi-head Latent Attention (DeepSeek-V3), in its training form and its absorbed ("MQA") inference form.

Per token: q_resid = RMSNorm(x W_qa) [Q]; q = q_resid W_qb -> per head q_nope [N] ++ q_rope [P];
latent = x W_kva -> c_kv [R] (RMSNorm'd) ++ k_rope [P] (one rope key shared by all heads).
W_kvb expands c_kv per head into k_nope [N] and v [V].

Training form ("MHA"): expand c_kv into per-head keys and values, then ordinary causal softmax attention.
Absorbed form ("MQA"): fold W_kvb's key part into the query (q_latent = q_nope W_uk^T, [R]) and its value part into
the output, so all heads attend over the same cached latent rows [R + P] and take c_kv as values. The two are the
same function (tested); the absorbed form is what DSA's sparse kernels consume (SPEC §1).
Shape letters: B T S D H, Q q_lora_rank, R kv_lora_rank, N qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim,
L = R + P, K top-k slots.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from indexcache_jax.config import ModelConfig
from indexcache_jax.nn import RMSNorm, project, weight
from indexcache_jax.rope import apply_rope
# DENSE_LSE_NAME: the dense attention's log-sum-exp per head, f32[B,T,H], kept by every rematerialisation (block.py,
# model.py): the warm-up's backward needs only the distribution, which takes it, so the attention's forward is not
# run again. It is the kernels' own name for their lse residual, so one name keeps both.
from pallas_kernels.dense_attention import LSE_NAME as DENSE_LSE_NAME

# The sparse stages' distillation target f32[B,T,K], named so that a rematerialisation can keep it (model.py).
SPARSE_TARGET_NAME = "sparse_distillation_target"


class MLAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.q_a_proj = weight(rngs, c, c.hidden_size, c.q_lora_rank)  # [D,Q]
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.latent_norm_eps, c.param_dtype)
        self.q_b_proj = weight(rngs, c, c.q_lora_rank, c.num_heads, c.qk_head_dim)  # [Q,H,N+P]
        self.kv_a_proj_with_mqa = weight(rngs, c, c.hidden_size, c.latent_dim)  # [D,R+P]
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.latent_norm_eps, c.param_dtype)
        self.kv_b_proj = weight(rngs, c, c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)  # [R,H,N+V]
        self.o_proj = weight(rngs, c, c.num_heads, c.v_head_dim, c.hidden_size)  # [H,V,D]

    def queries(self, x, rope):
        """x [B,T,D] -> q_resid [B,T,Q] (the indexer reads it too), q_nope [B,T,H,N], q_rope [B,T,H,P] (rotated)."""
        c = self.config
        q_resid = self.q_a_layernorm(project("btd,dq->btq", x, self.q_a_proj, c.compute_dtype))
        q = project("btq,qhe->bthe", q_resid, self.q_b_proj, c.compute_dtype)
        q_nope, q_rope = jnp.split(q, [c.qk_nope_head_dim], axis=-1)
        return q_resid, q_nope, apply_rope(q_rope, *rope, "interleaved")

    def latent(self, x, rope):
        """x [B,T,D] -> latent KV rows [B,T,L]: normalised c_kv [R] ++ rotated k_rope [P] (what the cache holds)."""
        c = self.config
        kv = project("btd,dl->btl", x, self.kv_a_proj_with_mqa, c.compute_dtype)
        c_kv, k_rope = jnp.split(kv, [c.kv_lora_rank], axis=-1)
        return jnp.concatenate([self.kv_a_layernorm(c_kv), apply_rope(k_rope, *rope, "interleaved")], axis=-1)

    def _kv_b(self):
        """W_kvb split into its key part W_uk [R,H,N] and value part W_uv [R,H,V], in the compute dtype."""
        w = self.kv_b_proj[...].astype(self.config.compute_dtype)
        return w[..., :self.config.qk_nope_head_dim], w[..., self.config.qk_nope_head_dim:]

    def _output(self, o):
        """Per-head values o [B,T,H,V] -> [B,T,D]."""
        return project("bthv,hvd->btd", o, self.o_proj, self.config.compute_dtype)

    def attend_sparse(self, q_nope, q_rope, kv_rows, indices, impl=None, with_distribution=False):
        """Absorbed-form attention of each query over its top-k latent rows.

        q_nope [B,T,H,N], q_rope [B,T,H,P], kv_rows [B,S,L], indices int32[B,T,K] (-1 = empty slot) -> [B,T,D], or
        with_distribution: ([B,T,D], the head-averaged attention distribution over the slots f32[B,T,K], 0 at -1
        slots, stop-gradient: the sparse stages' distillation target), which reuses the attention's log-sum-exp.
        """
        c = self.config
        q_mqa = self._absorbed_query(q_nope, q_rope)
        kv_rows = kv_rows.astype(q_mqa.dtype)
        o_latent, lse = pallas_kernels.sparse_mla(q_mqa, kv_rows, indices, scale=c.softmax_scale,
                                                  value_dim=c.kv_lora_rank, impl=impl, return_lse=True)  # [B,T,H,R]
        out = self._output(jnp.einsum("bthr,rhv->bthv", o_latent, self._kv_b()[1]))
        if not with_distribution:
            return out
        return out, checkpoint_name(pallas_kernels.sparse_attention_distribution(
            q_mqa, kv_rows, indices, scale=c.softmax_scale, value_dim=c.kv_lora_rank, lse=lse, impl=impl),
            SPARSE_TARGET_NAME)

    def _absorbed_query(self, q_nope, q_rope):
        """q_nope [B,T,H,N], q_rope [B,T,H,P] -> the MQA-form query [B,T,H,L]: W_uk folded into q_nope."""
        w_uk = self._kv_b()[0]
        q_latent = jnp.einsum("bthn,rhn->bthr", q_nope.astype(w_uk.dtype), w_uk)
        return jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)

    def expand_keys(self, kv_rows):
        """Latent rows [B,S,L] -> the training form's keys and values, in the compute dtype: k_nope [B,S,H,N] (c_kv
        W_uk), k_rope [B,S,P] (shared by the heads), values [B,S,H,V] (c_kv W_uv)."""
        return _expand_keys(kv_rows, *self._kv_b(), self.config.kv_lora_rank)

    def reuse_expanded_keys(self, kv_rows, expanded):
        """`expand_keys(kv_rows)`, already made (outside the query chunks, once for all of them): its value, and in
        the backward pass the expansion's gradient into kv_rows and W_kvb, without its forward product. `expanded`
        itself gets no gradient."""
        return _known_expansion(kv_rows, *self._kv_b(), expanded, self.config.kv_lora_rank)

    def attend_dense(self, q_nope, q_rope, kv_rows, q_positions, mask=None, with_distribution=False, impl=None,
                     expanded=None):
        """Training-form causal attention over all keys: per-head keys and values expanded from c_kv.

        q_nope [B,T,H,N], q_rope [B,T,H,P], kv_rows [B,S,L], q_positions int[B,T]; key s is visible to query t
        when s <= q_positions[b,t] and (if given) mask[b,t,s]. -> [B,T,D], or with_distribution: ([B,T,D], the
        head-averaged attention distribution f32[B,T,S], stop-gradient: the dense warm-up's distillation target).
        `pallas_kernels.dense_attention` (`impl`): on a GPU its kernels never store the [B,H,T,S] logits; the
        reference (and any mask) materialises them. expanded: `expand_keys(kv_rows)`, where the caller made it (the
        gradient then still reaches kv_rows and W_kvb: `reuse_expanded_keys`).
        """
        c = self.config
        if expanded is None:
            k_nope, k_rope, values = self.expand_keys(kv_rows)
        else:
            k_nope, k_rope, values = self.reuse_expanded_keys(kv_rows, expanded)
        q_rope = q_rope.astype(k_rope.dtype)
        out, lse = pallas_kernels.dense_attention(q_nope, q_rope, k_nope, k_rope, values, q_positions,
                                                  scale=c.softmax_scale, impl=impl, mask=mask, return_lse=True)
        if not with_distribution:
            return self._output(out)
        # Named so that rematerialisation keeps it: the backward then recomputes the distribution, not the forward.
        lse = checkpoint_name(lse, DENSE_LSE_NAME)
        probs = pallas_kernels.dense_attention_distribution(q_nope, q_rope, k_nope, k_rope, q_positions,
                                                            scale=c.softmax_scale, lse=lse, impl=impl, mask=mask)
        return self._output(out), probs


def _expand_keys(kv_rows, w_uk, w_uv, rank: int):
    """kv_rows [B,S,L], W_uk [R,H,N], W_uv [R,H,V] -> (k_nope [B,S,H,N], k_rope [B,S,P], values [B,S,H,V])."""
    c_kv, k_rope = jnp.split(kv_rows.astype(w_uk.dtype), [rank], axis=-1)
    return jnp.einsum("bsr,rhn->bshn", c_kv, w_uk), k_rope, jnp.einsum("bsr,rhv->bshv", c_kv, w_uv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _known_expansion(kv_rows, w_uk, w_uv, expanded, rank: int):
    """`_expand_keys(kv_rows, w_uk, w_uv, rank)` whose value `expanded` already holds. Why: the dense stage's query
    chunks share one layer's expansion, which costs about as much as a chunk of 1024 queries' attention at
    DeepSeek-V3.2's shapes; each chunk's backward pass still takes its gradient into the latent rows and weights
    (what made the expansion inside the chunk cost), whose sum over the chunks is small ([B,S,L], [R,H,N+V])."""
    del kv_rows, w_uk, w_uv, rank
    return expanded


def _known_expansion_fwd(kv_rows, w_uk, w_uv, expanded, rank):
    return expanded, (kv_rows, w_uk, w_uv)


def _known_expansion_bwd(rank, inputs, cotangent):
    # The expansion is bilinear: its transpose needs the inputs, not the forward's product (XLA drops it).
    _, vjp = jax.vjp(functools.partial(_expand_keys, rank=rank), *inputs)
    return (*vjp(cotangent), None)


_known_expansion.defvjp(_known_expansion_fwd, _known_expansion_bwd)
