"""The inference cache: per layer, the MLA latent rows and the indexer keys of every token seen so far.

MLA caches 576 numbers per token and layer in DeepSeek-V3.2 (c_kv 512 ++ k_rope 64), the indexer one key of
index_head_dim (128), in fp8 with one scale per token when the model's indexer runs in fp8. Buffers are
preallocated to `max_len`; `lengths[b]` counts the tokens of row b written so far (rows fill independently, so
batched prompts of different lengths need no padding inside the cache).
Every layer caches its indexer keys, Shared ones included: the key projection is O(D*I) per token, negligible next to
the O(S*G*I) scoring that IndexCache skips, and it keeps the cache valid under any pattern, so a cache prefilled
with one pattern can be decoded with another (the pattern search and the evaluation rely on that).
Layout: one `LayerCache` per run of layers of `config.layer_segments`, stacked [N_run, B, S, ...] so the layer scan
reads and writes its slice as scan inputs/outputs.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from indexcache_jax.config import ModelConfig
from pallas_kernels.indexer_reference import quantize_fp8_keys


@struct.dataclass
class LayerCache:
    latent: jax.Array  # [(N,) B, S, L]: normalised c_kv ++ rotated k_rope
    index_keys: jax.Array  # [(N,) B, S, I]; float8_e4m3fn when the model's indexer runs in fp8
    index_key_scales: Optional[jax.Array] = None  # f32[(N,) B, S] with fp8 keys (key ~= key8 * scale), else None

    def append(self, offsets, latent_new, keys_new) -> LayerCache:
        """One layer's slice: write latent_new [B,T,L] and keys_new [B,T,I] at rows' offsets int[B]. An fp8 cache
        quantises the new keys here, once per token (per row, so exactly what quantising the whole cache gives)."""
        write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), at, 0))
        scales = None
        if self.index_key_scales is not None:
            keys_new, new_scales = quantize_fp8_keys(keys_new)
            scales = write(self.index_key_scales, new_scales, offsets)
        return LayerCache(write(self.latent, latent_new, offsets), write(self.index_keys, keys_new, offsets), scales)


@struct.dataclass
class KVCache:
    segments: tuple[LayerCache, ...]  # one per run of config.layer_segments
    lengths: jax.Array  # int32[B], tokens written per row

    @property
    def max_len(self) -> int:
        return self.segments[0].latent.shape[2]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens, in `dtype` (default: the compute dtype)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    dtype = dtype or config.compute_dtype
    fp8 = config.indexer_fp8  # fp8 keys + per-token scales: half the bytes, and no re-quantising at each step

    def layer_cache(layers: int) -> LayerCache:
        rows = (layers, batch_size, max_len)
        # Zero keys quantise to zeros with scale 1 (quantize_fp8_keys), so unwritten rows look the same either way.
        return LayerCache(latent=jnp.zeros((*rows, config.latent_dim), dtype),
                          index_keys=jnp.zeros((*rows, config.index_head_dim), jnp.float8_e4m3fn if fp8 else dtype),
                          index_key_scales=jnp.ones(rows, jnp.float32) if fp8 else None)
    segments = tuple(layer_cache(stop - start) for start, stop, _ in config.layer_segments)
    return KVCache(segments=segments, lengths=jnp.zeros((batch_size,), jnp.int32))
