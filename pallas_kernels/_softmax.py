"""The softmax pieces the attention references share: a row's log-sum-exp and its probabilities, both defined for
rows with nothing valid (a padded query), where a plain softmax would give NaN."""

import jax
import jax.numpy as jnp


def log_sum_exp(logits):
    """f32[..., K] (-inf where invalid) -> f32[...], -inf for a row with nothing valid, with a finite gradient
    there too."""
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = jnp.sum(jnp.exp(logits - row_max), axis=-1)
    has_any = total > 0
    return jnp.where(has_any, row_max[..., 0] + jnp.log(jnp.where(has_any, total, 1.0)), -jnp.inf)


def probabilities(logits, lse):
    """exp(logits - lse), 0 where invalid and for rows with nothing valid (lse = -inf)."""
    valid = (logits > -jnp.inf) & (lse[..., None] > -jnp.inf)
    return jnp.where(valid, jnp.exp(jnp.where(valid, logits - lse[..., None], 0.0)), 0.0)
