"""The indexer's distillation losses, computed inside the layer scan (DSA warm-up and sparse stage, SPEC §1;
training-aware IndexCache, SPEC §2).

A Full layer l's indexer serves layers l..l+m (itself and the Shared layers after it). Its loss is

    L_l = 1/(m+1) * sum_j mean_{b,t} KL(p_t^(l+j) || q_t^(l))

p^(l+j): layer l+j's attention distribution, summed over heads and L1-normalised, over the keys the layers attend
(the shared selected set in the sparse stages, all visible keys in the dense warm-up); a stop-gradient target.
q^(l) = softmax of the indexer's scores over the same keys (log-probabilities `log q`).

Each KL(p_j || q) = sum p_j (log p_j - log q) is a sum over its own layer's tokens and keys, so every layer adds
it as soon as its p_j exists (`token_kl`, inside the block's query chunks) and the scan carries scalars plus the
Full layer's `source`: what gives log q to the layers it serves. In the sparse stages that is
log q itself, f32[B,T,K]; in the dense warm-up, where log q would be [B,T,S] (17 GB in f32 at 64K tokens), it is
the indexer's queries, head weights and keys, from which each layer recomputes log q one query chunk at a time
(block.py). No layer's distribution, nor a sum of them, passes from layer to layer. The gradient with respect
to the indexer is that of KL(mean_j p_j || q) (tested against that form). The job's indexer loss is the mean of
L_l over Full layers.

Shape letters: B batch, T queries, K keys of the distribution (top-k slots, or S keys in the dense warm-up).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy


class DistillState(NamedTuple):
    """The scan carry of the distillation (scalars float32)."""

    source: Any  # a pytree: what gives the current Full layer's log q (block.py)
    kl: jax.Array  # [] sum over the group's layers of mean_{b,t} KL(p_j || q)
    served: jax.Array  # [] layers served by the current Full layer so far (m+1 when complete)
    loss_sum: jax.Array  # [] sum of L_l over finished Full layers
    num_groups: jax.Array  # [] finished Full layers


def init_state(source) -> DistillState:
    """Before layer 0 (a Full layer, which replaces `source`, a pytree of placeholder arrays)."""
    scalar = jnp.float32(0)
    return DistillState(source, scalar, scalar, scalar, scalar)


def masked_log_softmax(scores, valid):
    """log-softmax of scores [..., K] over the `valid` entries; 0 (not -inf) elsewhere, so that 0 * log q stays 0
    in both passes. A row with no valid entry is all 0."""
    scores = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    shifted = jnp.where(valid, scores - row_max, -jnp.inf)
    log_norm = jnp.log(jnp.maximum(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True), 1e-30))
    return jnp.where(valid, shifted - log_norm, 0.0)


def token_kl(p, log_q):
    """One layer's distribution p [B,C,K] (rows sum to 1 over the set; stop-gradient) and its Full layer's log q
    [B,C,K] (0 outside the set) -> KL(p || q) = sum_k p (log p - log q), f32[B,C]. Differenced per key before the
    sum: when q is close to p, sum p log p and sum p log q are each O(log K) and their difference is not."""
    p = jax.lax.stop_gradient(p.astype(jnp.float32))
    return jnp.sum(xlogy(p, p) - p * log_q, axis=-1)


def _finish_group(state: DistillState, close=True) -> DistillState:
    """Where `close` (bool[]: a Full layer begins, or the stack ends): add the group's L_l, if it served any
    layer, and start an empty group. Scalars only: the source is left as it is."""
    had_group = close & (state.served > 0)
    loss = state.kl / jnp.maximum(state.served, 1.0)
    return state._replace(loss_sum=state.loss_sum + jnp.where(had_group, loss, 0.0),
                          num_groups=state.num_groups + had_group.astype(jnp.float32),
                          kl=jnp.where(close, 0.0, state.kl), served=jnp.where(close, 0.0, state.served))


def add_layer(state: DistillState, is_full, source, kl) -> DistillState:
    """Every layer, after its token_kl f32[B,T] (against `source`'s log q): a Full layer (is_full bool[]) first
    closes the previous layer's group; `source` is the group's from here on (a Shared layer passes the carried one
    through)."""
    state = _finish_group(state, close=is_full)
    return state._replace(source=source, kl=state.kl + jnp.mean(kl), served=state.served + 1.0)


def indexer_loss(state: DistillState):
    """After the last layer: mean over Full layers of L_l."""
    state = _finish_group(state)
    return state.loss_sum / jnp.maximum(state.num_groups, 1.0)
