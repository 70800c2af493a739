"""Rotary position embedding in the two layouts DSA models use (SPEC §1).

  interleaved  rotates pairs (x[2i], x[2i+1])            DeepSeek MLA's q_rope/k_rope; GLM-5's indexer
  half_split   rotates pairs (x[i], x[i + P/2])          DeepSeek-V3.2's indexer ("rotate_half")
Pair i turns by angle position * theta^(-2i/P). Both layouts are the same rotation on permuted dims, so a q·k dot
product is the same whichever is used, as long as q and k use the same one; checkpoints fix which one the weights
were trained with.
"""

import jax.numpy as jnp


def rope_angles(positions, dim: int, theta: float):
    """positions int[B,T] -> (cos, sin), each f32[B,T,dim/2]."""
    inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin, layout: str):
    """Rotate x [B,T,P] or [B,T,H,P] by (cos, sin) [B,T,P/2]; computed in float32, returned in x.dtype."""
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if layout == "interleaved":
        even, odd = x32[..., 0::2], x32[..., 1::2]
        out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)
    elif layout == "half_split":
        first, second = jnp.split(x32, 2, axis=-1)
        out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    else:
        raise ValueError(f"RoPE layout must be 'interleaved' or 'half_split', got {layout!r}")
    return out.astype(x.dtype)
