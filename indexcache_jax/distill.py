"""The indexer's distillation losses, computed inside the layer scan (DSA warm-up and sparse stage, SPEC §1;
training-aware IndexCache, SPEC §2).

A Full layer l's indexer serves layers l..l+m (itself and the Shared layers after it). Its loss is

    L_l = 1/(m+1) * sum_j mean_{b,t} KL(p_t^(l+j) || q_t^(l))

p^(l+j): layer l+j's attention distribution, summed over heads and L1-normalised, over the keys the layers attend
(the shared selected set in the sparse stages, all visible keys in the dense warm-up); a stop-gradient target.
q^(l) = softmax of the indexer's scores over the same keys (log-probabilities `indexer_logp`).

Since sum_j KL(p_j || q) = sum_j sum p_j log p_j - sum (sum_j p_j) log q, the scan carries only the running sum
of the served layers' distributions and of their negative entropies: O(T*K) per step, O(L*T*K) of residuals for
the backward pass, never the L^2 pairs. The gradient with respect to the indexer is that of KL(mean_j p_j || q)
(tested against that form). The job's indexer loss is the mean of L_l over Full layers.

Shape letters: B batch, T queries, K keys of the distribution (top-k slots, or S keys in the dense warm-up).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy


class DistillState(NamedTuple):
    """The scan carry of the distillation (all float32)."""

    indexer_logp: jax.Array  # [B,T,K] log q of the current Full layer (0 where a key is not in the set)
    sum_p: jax.Array  # [B,T,K] sum of the served layers' distributions so far (stop-gradient)
    sum_neg_entropy: jax.Array  # [] sum over served layers, tokens and keys of p log p
    served: jax.Array  # [] layers served by the current Full layer so far (m+1 when complete)
    loss_sum: jax.Array  # [] sum of L_l over finished Full layers
    num_groups: jax.Array  # [] finished Full layers


def init_state(batch: int, num_q: int, num_keys: int) -> DistillState:
    zeros = jnp.zeros((batch, num_q, num_keys), jnp.float32)
    scalar = jnp.float32(0)
    return DistillState(zeros, zeros, scalar, scalar, scalar, scalar)


def masked_log_softmax(scores, valid):
    """log-softmax of scores [..., K] over the `valid` entries; 0 (not -inf) elsewhere, so that 0 * log q stays 0
    in both passes. A row with no valid entry is all 0."""
    scores = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    shifted = jnp.where(valid, scores - row_max, -jnp.inf)
    log_norm = jnp.log(jnp.maximum(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True), 1e-30))
    return jnp.where(valid, shifted - log_norm, 0.0)


def _group_loss(state: DistillState):
    """L_l of the finished group (0 when no layer was served), and whether there was a group."""
    num_tokens = state.sum_p.shape[0] * state.sum_p.shape[1]
    cross = jnp.sum(state.sum_p * state.indexer_logp)  # sum_j sum p_j log q
    served = jnp.maximum(state.served, 1.0)
    return (state.sum_neg_entropy - cross) / (served * num_tokens), state.served > 0


def finish_group(state: DistillState) -> DistillState:
    loss, had_group = _group_loss(state)
    return state._replace(loss_sum=state.loss_sum + jnp.where(had_group, loss, 0.0),
                          num_groups=state.num_groups + had_group.astype(jnp.float32),
                          served=jnp.float32(0))


def start_group(state: DistillState, indexer_logp) -> DistillState:
    """A Full layer: close the previous layer's group and start distilling `indexer_logp` [B,T,K]."""
    state = finish_group(state)
    return state._replace(indexer_logp=indexer_logp.astype(jnp.float32), sum_p=jnp.zeros_like(state.sum_p),
                          sum_neg_entropy=jnp.float32(0))


def add_layer(state: DistillState, p) -> DistillState:
    """Every layer: add its attention distribution p [B,T,K] (rows sum to 1 over the set) to the current group."""
    p = jax.lax.stop_gradient(p.astype(jnp.float32))
    return state._replace(sum_p=state.sum_p + p,
                          sum_neg_entropy=state.sum_neg_entropy + jnp.sum(xlogy(p, p)),
                          served=state.served + 1.0)


def indexer_loss(state: DistillState):
    """After the last layer: mean over Full layers of L_l."""
    state = finish_group(state)
    return state.loss_sum / jnp.maximum(state.num_groups, 1.0)

