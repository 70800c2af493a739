"""Rotary position embedding in the two layouts DSA models use (SPEC §1).

  interleaved  rotates pairs (x[2i], x[2i+1])            DeepSeek MLA's q_rope/k_rope; GLM-5's indexer
  half_split   rotates pairs (x[i], x[i + P/2])          DeepSeek-V3.2's indexer ("rotate_half")
Pair i turns by angle position * theta^(-2i/P). Both layouts are the same rotation on permuted dims, so a q·k dot
product is the same whichever is used, as long as q and k use the same one; checkpoints fix which one the weights
were trained with.
"""

import math

import jax.numpy as jnp
import numpy as np

from indexcache_jax.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Per-pair angular frequency f32[P/2]: theta^(-2i/P), blended with theta^(-2i/P) / factor under YaRN.

    Computed on the host in float32, the same arithmetic as the HF rotary embeddings, so checkpoints see the angles
    they were trained with.
    """
    dim, theta = config.qk_rope_head_dim, config.rope_theta
    base_freq = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolated = (np.float32(1.0) / base_freq).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return extrapolated
    interpolated = (np.float32(1.0) / (np.float32(scaling.factor) * base_freq)).astype(np.float32)

    def pair_of_rotations(num_rotations):
        """The (fractional) pair index whose wavelength fits `num_rotations` times in the original context."""
        return dim * math.log(scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = pair_of_rotations(scaling.beta_fast), pair_of_rotations(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep_original = np.float32(1.0) - ramp  # 1 for fast-rotating pairs (kept), 0 for slow ones (interpolated)
    return (interpolated * (1 - keep_original) + extrapolated * keep_original).astype(np.float32)


def rope_angles(positions, config: ModelConfig):
    """positions int[B,T] -> (cos, sin), each f32[B,T,P/2], times YaRN's attention factor where configured."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    factor = 1.0 if config.rope_scaling is None else config.rope_scaling.rope_attention_factor
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


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
