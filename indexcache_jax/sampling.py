"""Next-token choice from logits: greedy, or temperature + nucleus (top-p) sampling.

Temperature and top_p are runtime values, so changing them does not recompile; temperature <= 0 means greedy.
"""

import jax
import jax.numpy as jnp


def sample_tokens(logits, key, temperature, top_p):
    """logits f32[B,V] -> int32[B]. Keeps the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token always stays), renormalises, and samples at `temperature`."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    # top_p >= 1 keeps everything even where the float cumulative sum rounds past 1.
    kept = (mass_before < top_p) | (top_p >= 1.0)
    kept = kept.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    sampled = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
    return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)
