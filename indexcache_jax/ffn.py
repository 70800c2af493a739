"""Feed-forward layers: dense SwiGLU, and the DeepSeek-V3 mixture of experts.

MoE routing (DeepSeek-V3): scores = sigmoid(x W_gate); experts are chosen on scores + e_score_correction_bias
(a load-balancing bias that shifts the choice but not the weights), first keeping the topk_group groups whose two best
biased scores sum highest, then the num_experts_per_tok best experts inside them. Combine weights are the unbiased
scores of the chosen experts, L1-normalised when norm_topk_prob, times routed_scaling_factor. Shared experts see
every token.
Dispatch is dropless: token-expert pairs are sorted by expert and run through `lax.ragged_dot`, so compute scales
with num_experts_per_tok, not with the number of experts. `MoE.dense_reference` computes every expert for testing.
Shape letters: M tokens (B*T flattened), D width, E routed experts, F expert width, A experts per token.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from indexcache_jax.config import ModelConfig
from indexcache_jax.nn import project, weight


class MLP(nnx.Module):
    """SwiGLU: down(silu(x W_gate) * x W_up)."""

    def __init__(self, config: ModelConfig, width: int, *, rngs: nnx.Rngs):
        self.dtype = config.compute_dtype
        self.gate_proj = weight(rngs, config, config.hidden_size, width)
        self.up_proj = weight(rngs, config, config.hidden_size, width)
        self.down_proj = weight(rngs, config, width, config.hidden_size)

    def __call__(self, x):
        h = jax.nn.silu(project("...d,df->...f", x, self.gate_proj, self.dtype)) * project(
            "...d,df->...f", x, self.up_proj, self.dtype)
        return project("...f,fd->...d", h, self.down_proj, self.dtype)


class RouterBias(nnx.Variable):
    """e_score_correction_bias: set by the load-balancing rule, not by gradients, so it is not an nnx.Param."""


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        m = config.moe
        self.config = config
        self.gate = weight(rngs, config, config.hidden_size, m.n_routed_experts)  # [D,E]
        self.e_score_correction_bias = RouterBias(jnp.zeros((m.n_routed_experts,), jnp.float32))
        e, d, f = m.n_routed_experts, config.hidden_size, m.moe_intermediate_size
        self.experts_gate_proj = weight(rngs, config, e, d, f)
        self.experts_up_proj = weight(rngs, config, e, d, f)
        self.experts_down_proj = weight(rngs, config, e, f, d)
        self.shared_experts = (MLP(config, f * m.n_shared_experts, rngs=rngs) if m.n_shared_experts else None)

    def route(self, x):
        """x [M,D] -> (combine weights f32[M,A], expert ids int32[M,A])."""
        m = self.config.moe
        scores = jax.nn.sigmoid(project("md,de->me", x, self.gate, jnp.float32))
        biased = scores + self.e_score_correction_bias[...]
        groups = biased.reshape(x.shape[0], m.n_group, -1)
        group_score = jax.lax.top_k(groups, min(2, groups.shape[-1]))[0].sum(-1)  # [M,n_group]
        kept_groups = jax.lax.top_k(group_score, m.topk_group)[1]
        group_mask = jnp.zeros_like(group_score, bool).at[jnp.arange(x.shape[0])[:, None], kept_groups].set(True)
        biased = jnp.where(jnp.repeat(group_mask, groups.shape[-1], axis=-1), biased, -jnp.inf)
        expert_ids = jax.lax.top_k(biased, m.num_experts_per_tok)[1]
        weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
        if m.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return weights * m.routed_scaling_factor, expert_ids.astype(jnp.int32)

    def _shared(self, x):
        return 0 if self.shared_experts is None else self.shared_experts(x)

    def __call__(self, x):
        """x [B,T,D] -> [B,T,D]."""
        dtype = self.config.compute_dtype
        flat = x.reshape(-1, x.shape[-1])
        weights, expert_ids = self.route(flat)
        num_experts = self.config.moe.n_routed_experts
        order = jnp.argsort(expert_ids.reshape(-1), stable=True)  # token-expert pairs grouped by expert
        token_of_pair = order // expert_ids.shape[-1]
        group_sizes = jnp.bincount(expert_ids.reshape(-1), length=num_experts).astype(jnp.int32)
        xs = flat[token_of_pair].astype(dtype)
        gate = jax.lax.ragged_dot(xs, self.experts_gate_proj[...].astype(dtype), group_sizes)
        up = jax.lax.ragged_dot(xs, self.experts_up_proj[...].astype(dtype), group_sizes)
        out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, self.experts_down_proj[...].astype(dtype), group_sizes)
        out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
        routed = jnp.zeros(flat.shape, jnp.float32).at[token_of_pair].add(out)
        return (routed.astype(dtype).reshape(x.shape) + self._shared(x)).astype(dtype)

    def dense_reference(self, x):
        """Every expert on every token, weighted by the same routing: the ground truth for the ragged dispatch."""
        dtype = self.config.compute_dtype
        flat = x.reshape(-1, x.shape[-1])
        weights, expert_ids = self.route(flat)
        combine = jnp.zeros((flat.shape[0], self.config.moe.n_routed_experts), jnp.float32)
        combine = combine.at[jnp.arange(flat.shape[0])[:, None], expert_ids].add(weights)
        h = jax.nn.silu(project("md,edf->mef", flat, self.experts_gate_proj, dtype)) * project(
            "md,edf->mef", flat, self.experts_up_proj, dtype)
        out = jnp.einsum("mef,efd,me->md", h, self.experts_down_proj[...].astype(dtype), combine.astype(dtype))
        return (out.reshape(x.shape) + self._shared(x)).astype(dtype)
