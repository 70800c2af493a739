"""prefill / decode_step / generate: incremental decoding reproduces a full forward pass, batching conventions
hold, sampling is what it says, and capacity and vocabulary errors are loud."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from indexcache_jax import decode_step, forward, generate, init_cache, prefill
from indexcache_jax.inference import _decode_step
from indexcache_jax.sampling import sample_tokens


@pytest.fixture(scope="module")
def sequences(small_config):
    return jax.random.randint(jax.random.key(11), (2, 16), 0, small_config.vocab_size)


@pytest.mark.parametrize("fp8", [False, True])  # fp8: the cache holds fp8 indexer keys, quantised when written
@pytest.mark.parametrize("pattern", ["FFFF", "FSSS"])  # all Full, and retention 1/4
def test_decode_after_prefill_matches_full_forward_token_by_token(small_config, small_params, sequences, pattern,
                                                                 fp8):
    small_config = dataclasses.replace(small_config, indexer_fp8=fp8)
    full = np.asarray(forward(small_params, sequences, pattern, config=small_config))  # [2,16,V]
    lengths = np.array([9, 5])  # different prompt lengths in one right-padded batch
    prompts = np.where(np.arange(16)[None] < lengths[:, None], np.asarray(sequences), 0)[:, :9]
    cache = init_cache(small_config, 2, 24)
    keys = cache.segments[0]
    assert keys.index_keys.dtype == (jnp.float8_e4m3fn if fp8 else small_config.compute_dtype)
    assert (keys.index_key_scales is not None) == fp8
    logits, cache = prefill(small_params, prompts, cache, pattern, config=small_config, lengths=lengths)
    errors = [rel_err(logits[b], full[b, lengths[b] - 1]) for b in range(2)]
    for step in range(16 - lengths.max()):
        next_tokens = np.asarray(sequences)[np.arange(2), lengths + step]
        logits, cache = decode_step(small_params, next_tokens, cache, pattern, config=small_config)
        errors += [rel_err(logits[b], full[b, lengths[b] + step]) for b in range(2)]
    np.testing.assert_array_equal(cache.lengths, lengths + 16 - lengths.max())
    assert max(errors) < 1e-5, errors


def test_all_logits_prefill_matches_forward(small_config, small_params, sequences):
    logits, _ = prefill(small_params, sequences, init_cache(small_config, 2, 20), "FSFS", config=small_config,
                        all_logits=True)
    assert rel_err(logits, forward(small_params, sequences, "FSFS", config=small_config)) < 1e-5


def test_greedy_generate_equals_a_manual_decode_loop(small_config, small_params, sequences):
    prompts, new = sequences[:, :6], 5
    out = generate(small_params, prompts, config=small_config, max_new_tokens=new, pattern="FSSS")
    logits, cache = prefill(small_params, prompts, init_cache(small_config, 2, 11), "FSSS", config=small_config)
    manual = []
    for _ in range(new):
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        manual.append(token)
        logits, cache = decode_step(small_params, token, cache, "FSSS", config=small_config)
    np.testing.assert_array_equal(out.tokens, jnp.stack(manual, 1))
    np.testing.assert_array_equal(out.num_tokens, [new, new])


def test_left_and_right_padding_give_the_same_continuations(small_config, small_params, sequences):
    lengths = np.array([7, 3])
    seq = np.asarray(sequences)[:, :7]
    right = np.where(np.arange(7)[None] < lengths[:, None], seq, 0)
    left = np.stack([np.concatenate([np.zeros(7 - n, np.int32), seq[b, :n]]) for b, n in enumerate(lengths)])
    kw = dict(config=small_config, max_new_tokens=6, pattern="FSFS")
    out_right = generate(small_params, right, lengths, padding_side="right", **kw)
    out_left = generate(small_params, left, lengths, padding_side="left", **kw)
    np.testing.assert_array_equal(out_left.tokens, out_right.tokens)
    # Row 1 alone (no batch-mate, no padding) continues the same way: padding is invisible.
    alone = generate(small_params, seq[1:, :3], **kw)
    np.testing.assert_array_equal(alone.tokens[0], out_right.tokens[1])


def test_sampling_is_reproducible_and_eos_stops_rows(small_config, small_params, sequences):
    kw = dict(config=small_config, max_new_tokens=8, temperature=1.5, top_p=0.9)
    a = generate(small_params, sequences[:, :4], key=jax.random.key(1), **kw)
    b = generate(small_params, sequences[:, :4], key=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    greedy = generate(small_params, sequences[:, :4], config=small_config, max_new_tokens=8)
    eos = int(greedy.tokens[0, 2])
    stopped = generate(small_params, sequences[:, :4], config=small_config, max_new_tokens=8, eos_id=eos)
    first_eos = int(np.argmax(np.asarray(greedy.tokens[0]) == eos))
    assert int(stopped.num_tokens[0]) == first_eos + 1
    assert (np.asarray(stopped.tokens[0, first_eos:]) == eos).all()


def test_top_p_keeps_the_nucleus_and_temperature_zero_is_greedy():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, 1.0, 0.5))(keys))[:, 0]
    assert set(draws.tolist()) == {0, 1}  # mass before token 2 is 0.7 >= 0.5: cut
    assert abs((draws == 0).mean() - 4 / 7) < 0.05
    assert int(sample_tokens(logits, keys[0], 0.0, 0.5)[0]) == 0
    full = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, 1.0, 1.0))(keys))[:, 0]
    assert set(full.tolist()) == {0, 1, 2, 3}


def test_capacity_and_vocabulary_errors(small_config, small_params, sequences):
    with pytest.raises(ValueError, match="cache overflow"):
        prefill(small_params, sequences, init_cache(small_config, 2, 8), config=small_config)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prefill(small_params, sequences.at[0, 0].set(100), init_cache(small_config, 2, 20), config=small_config)
    with pytest.raises(ValueError, match="cache was made for 3"):
        prefill(small_params, sequences, init_cache(small_config, 3, 20), config=small_config)
    with pytest.raises(ValueError, match=r"lengths must be 2 values in \[1, 16\]"):
        prefill(small_params, sequences, init_cache(small_config, 2, 20), config=small_config, lengths=[0, 16])
    with pytest.raises(ValueError, match=r"lengths must be 2 values in \[1, 16\]"):
        prefill(small_params, sequences, init_cache(small_config, 2, 20), config=small_config, lengths=[16])
    with pytest.raises(ValueError, match=r"prompt_lengths must be 2 values in \[1, 16\]"):
        generate(small_params, sequences, [3, 17], config=small_config, max_new_tokens=2)
    with pytest.raises(ValueError, match="cache_len=10 is too small"):
        generate(small_params, sequences, config=small_config, max_new_tokens=4, cache_len=10)
    _, cache = prefill(small_params, sequences[:, :4], init_cache(small_config, 2, 4), config=small_config)
    with pytest.raises(ValueError, match="cache overflow"):
        decode_step(small_params, jnp.array([1, 2]), cache, config=small_config)
    with pytest.raises(ValueError, match="one token per row"):
        decode_step(small_params, jnp.array([1, 2, 3]), cache, config=small_config)


def test_overflow_inside_jit_gives_nan_and_keeps_the_length(small_config, small_params, sequences):
    _, cache = prefill(small_params, sequences[:, :4], init_cache(small_config, 2, 5), config=small_config,
                       lengths=np.array([4, 3]))
    flags = jnp.ones(4, bool)
    logits, cache = _decode_step(small_params, jnp.array([1, 2]), cache, flags, config=small_config, impl=None)
    np.testing.assert_array_equal(cache.lengths, [5, 4])
    logits, cache = _decode_step(small_params, jnp.array([1, 2]), cache, flags, config=small_config, impl=None)
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1])).all()
    np.testing.assert_array_equal(cache.lengths, [5, 5])


def test_the_configured_fp8_head_sum_reaches_every_selection(small_config, small_params, sequences, monkeypatch):
    """`model.indexer_fp8_head_sum` is what forward, prefill, decode and the per-layer `Indexer.select` hand the
    indexer kernels."""
    import pallas_kernels
    from test_model import loop_forward
    seen = []
    original = pallas_kernels.indexer_topk

    def spy(*args, **kwargs):
        seen.append((kwargs.get("fp8"), kwargs.get("fp8_head_sum")))
        return original(*args, **kwargs)

    monkeypatch.setattr(pallas_kernels, "indexer_topk", spy)
    config = dataclasses.replace(small_config, indexer_fp8=True, indexer_fp8_head_sum="fp32")
    state = {"cache": init_cache(config, 2, 8)}  # prefill and decode donate the cache they are given

    def step(fn, *args):
        state["cache"] = fn(small_params, *args, state["cache"], "FSFS", config=config)[1]

    phases = {"forward": lambda: forward(small_params, sequences, "FSFS", config=config),
              "prefill": lambda: step(prefill, sequences[:, :6]),
              "decode": lambda: step(decode_step, sequences[:, 6]),
              "Indexer.select": lambda: loop_forward(config, small_params, sequences, lambda layer: layer)}
    for phase, run in phases.items():
        seen.clear()
        run()
        assert seen and set(seen) == {(True, "fp32")}, (phase, seen)
