"""Inference entry points for notebooks and servers: prefill, decode_step and generate over parameter pytrees.

Batching convention: prompts are right-padded. Row b of `tokens [B,T]` holds `lengths[b]` real tokens followed by
padding; its tokens take positions cache.lengths[b] + t. Padding is written to the cache past the row's length, is
never visible to a real token (causality) and is overwritten by the next decoded tokens. Logits at padding positions
are meaningless. `generate(..., padding_side="left")` accepts left-padded prompts and moves them to this convention.

Capacity: a row whose tokens would run past `cache.max_len` gets NaN logits and its length is not advanced
(inside jit nothing can raise); the Python entry points check concrete inputs first and raise instead.
IndexCache applies at every step: the pattern is a runtime input, and at decode time a Shared layer reuses the
current token's indices from the nearest preceding Full layer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.cache import KVCache, init_cache
from indexcache_jax.config import ModelConfig
from indexcache_jax.model import bind, check_tokens, pattern_flags
from indexcache_jax.sampling import sample_tokens
from pallas_kernels.dispatch import ImplArg


def _extend(params, tokens, lengths, cache, flags, *, config, impl, all_logits, query_chunk=0):
    """Append `tokens [B,T]` (lengths[b] real ones per row) to the cache; the core of prefill and decode."""
    overflow = cache.lengths + tokens.shape[1] > cache.max_len  # bool[B]
    logits_at = None if all_logits else jnp.maximum(lengths - 1, 0)
    logits, new_cache = bind(config, params)(tokens, flags, cache=cache, logits_at=logits_at, impl=impl,
                                             query_chunk=query_chunk)
    bad_rows = overflow.reshape((-1,) + (1,) * (logits.ndim - 1))
    logits = jnp.where(bad_rows, jnp.nan, logits)
    return logits, new_cache.replace(lengths=jnp.where(overflow, cache.lengths, cache.lengths + lengths))


@functools.partial(jax.jit, static_argnames=("config", "impl", "all_logits", "query_chunk"),
                   donate_argnames=("cache",))
def _prefill(params, tokens, lengths, cache, flags, *, config, impl, all_logits, query_chunk):
    return _extend(params, tokens, lengths, cache, flags, config=config, impl=impl, all_logits=all_logits,
                   query_chunk=query_chunk)


def _decode(params, tokens, cache, flags, *, config, impl):
    """One token per row, tokens int[B] -> (logits [B,V], cache): shared by decode_step and generate's loop."""
    ones = jnp.ones_like(cache.lengths)
    return _extend(params, tokens[:, None], ones, cache, flags, config=config, impl=impl, all_logits=False)


@functools.partial(jax.jit, static_argnames=("config", "impl"), donate_argnames=("cache",))
def _decode_step(params, tokens, cache, flags, *, config, impl):
    return _decode(params, tokens, cache, flags, config=config, impl=impl)


def _prompt_lengths(lengths, batch: int, width: int, name: str):
    """Real tokens per row of a right- or left-padded [batch, width] prompt as int32[batch] (default: all width);
    concrete values must lie in [1, width]."""
    if lengths is None:
        return jnp.full((batch,), width, jnp.int32)
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.shape != (batch,) or (values < 1).any() or (values > width).any():
            raise ValueError(f"{name} must be {batch} values in [1, {width}] (the padded prompt length), got "
                             f"{values.tolist()}")
    return jnp.asarray(lengths, jnp.int32)


def _check_capacity(cache: KVCache, new_tokens: int) -> None:
    if isinstance(cache.lengths, jax.core.Tracer):
        return
    lengths = np.asarray(cache.lengths)
    if (lengths + new_tokens > cache.max_len).any():
        raise ValueError(f"cache overflow: rows hold {lengths.tolist()} tokens, adding {new_tokens} would pass "
                         f"max_len={cache.max_len}; allocate a larger cache with init_cache(..., max_len=...)")


def prefill(params, tokens, cache: KVCache, pattern=None, *, config: ModelConfig, lengths=None,
            impl: ImplArg = None, all_logits: bool = False, query_chunk: int = 0):
    """Run a batch of prompts through the model and fill the cache.

    tokens int[B,T] (right-padded), lengths int[B] (default: all T), cache from init_cache (or partly filled:
    the prompt continues each row) -> (logits f32[B,V] at each row's last real token, or f32[B,T,V] with
    all_logits=True; the updated cache). The input cache is donated: use the returned one. query_chunk: run each
    layer's per-token part over this many prompt tokens at a time (0: all at once), which bounds its per-head
    activations for long prompts (indexcache_jax/model.py).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens has batch {tokens.shape[0]} but the cache was made for {cache.batch_size}")
    check_tokens(tokens, config)
    _check_capacity(cache, tokens.shape[1])
    lengths = _prompt_lengths(lengths, tokens.shape[0], tokens.shape[1], "lengths")
    return _prefill(params, tokens, lengths, cache, pattern_flags(pattern, config),
                    config=config, impl=impl, all_logits=all_logits, query_chunk=query_chunk)


def decode_step(params, tokens, cache: KVCache, pattern=None, *, config: ModelConfig, impl: ImplArg = None):
    """One token per row: tokens int[B] -> (logits f32[B,V] for the next token, the cache with it appended).
    The input cache is donated: use the returned one. The vocabulary and capacity checks read the tokens and
    cache lengths on the host (a small device-to-host copy per call); `generate` and calls from inside your own
    jit skip them, and fall back to NaN logits for bad rows."""
    tokens = jnp.asarray(tokens)
    if tokens.shape != (cache.batch_size,):
        raise ValueError(f"decode_step takes one token per row, shape ({cache.batch_size},); got {tokens.shape}")
    check_tokens(tokens, config)
    _check_capacity(cache, 1)
    return _decode_step(params, tokens, cache, pattern_flags(pattern, config), config=config, impl=impl)


class Generation(NamedTuple):
    tokens: jax.Array  # int32[B, max_new_tokens]; after a row's eos_id, the row repeats eos_id
    num_tokens: jax.Array  # int32[B], generated tokens per row up to and including the first eos_id
    cache: KVCache


def to_right_padded(prompts, lengths):
    """Left-padded prompts [B,T] (real tokens at the end of each row) -> right-padded (real tokens first)."""
    shift = prompts.shape[1] - lengths
    return jax.vmap(lambda row, s: jnp.roll(row, -s))(prompts, shift)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "impl", "left_padded"))
def _generate(params, prompts, lengths, cache, flags, key, temperature, top_p, eos_id, *, config,
              max_new_tokens, impl, left_padded):
    if left_padded:
        prompts = to_right_padded(prompts, lengths)
    logits, cache = _extend(params, prompts, lengths, cache, flags, config=config, impl=impl, all_logits=False)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_tokens(logits, keys[0], temperature, top_p)

    def step(carry, step_key):
        token, cache, done = carry
        logits, cache = _decode(params, token, cache, flags, config=config, impl=impl)
        nxt = jnp.where(done, eos_id, sample_tokens(logits, step_key, temperature, top_p))
        return (nxt, cache, done | (nxt == eos_id)), nxt

    (_, cache, _), rest = jax.lax.scan(step, (first, cache, first == eos_id), keys[1:])
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    is_eos = tokens == eos_id
    num = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens).astype(jnp.int32)
    return Generation(tokens, num, cache)


def generate(params, prompts, prompt_lengths=None, *, config: ModelConfig, max_new_tokens: int, pattern=None,
             key=None, temperature: float = 0.0, top_p: float = 1.0, eos_id: Optional[int] = None,
             padding_side: str = "right", cache_len: Optional[int] = None,
             impl: ImplArg = None) -> Generation:
    """Prefill the prompts and decode `max_new_tokens` tokens per row, all inside one jitted function.

    prompts int[B,T] padded on `padding_side` ("right": real tokens first; "left": real tokens last),
    prompt_lengths int[B] real tokens per row (default T). temperature 0 is greedy; otherwise nucleus sampling with
    top_p, reproducible from `key`. eos_id (optional) stops a row; the cache holds the padded prompt width
    T + max_new_tokens tokens unless cache_len is larger.
    """
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [batch, length], got shape {prompts.shape}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_tokens(prompts, config, "prompts")
    batch, width = prompts.shape
    lengths = _prompt_lengths(prompt_lengths, batch, width, "prompt_lengths")
    needed = width + max_new_tokens
    if cache_len is not None and cache_len < needed:
        raise ValueError(f"cache_len={cache_len} is too small for prompts of {width} tokens plus "
                         f"max_new_tokens={max_new_tokens}; need at least {needed}")
    cache = init_cache(config, batch, cache_len or needed)
    key = jax.random.key(0) if key is None else key
    return _generate(params, prompts, lengths, cache, pattern_flags(pattern, config), key,
                     jnp.float32(temperature), jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id),
                     config=config, max_new_tokens=max_new_tokens, impl=impl, left_padded=padding_side == "left")
