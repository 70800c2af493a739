"""Check the Pallas kernels against the references on the GPU, then time them at DeepSeek-V3.2 shapes.

Shapes (SPEC §4): indexer 64 heads x 128, top-k 2048, 128 attention heads over the 576 = 512 + 64 latent, batch 1,
bf16 inputs, fp32 accumulation. For each context S:
  scores   the indexer-scores kernel on the last `--chunk` queries of the context (full rows), TFLOP/s over the
           visible (causal) pairs only, against the XLA reference on the same chunk; bf16 and fp8 (inputs
           quantised beforehand, as a cache of fp8 keys would be), each with the default kernel (Gluon on Hopper)
           and with the Pallas one; fp8 with the bf16 head sum (the default) and the fp32 one;
  top-k    the selection kernels on `--topk-rows` random rows (all S long) against `lax.top_k`, GB/s over the bytes
           read once, and how many rows fell back to the whole-row select;
  indexer  scores + top-k for every query of the context (the dispatch's chunked path), causal TFLOP/s; bf16 and
           fp8 (quantisation included); for fp8 also the same path with the top-k replaced by a one-column read
           (`indexer_fp8_scores_ms`), so that the top-k's share is measured, not estimated, and with the fp32
           head sum (`indexer_fp8_fp32sum_ms`, the default scores kernel);
  sparse   sparse MLA prefill for `--sparse-queries` queries, each over 2048 slots, TFLOP/s, with the default
           forward kernel (Gluon on Hopper, else Pallas) and the Pallas one; and apart, the first 2048 queries of a
           causal sequence, which see (and select) only t + 1 keys; with Gluon, also its split_slots schedule
           (TFLOP/s and its relative error against the default);
  decode   sparse MLA decode, batch `--decode-batch`, GB/s over the gathered rows it must read (both kernels;
           with Gluon, the split_slots schedule at one split, in us), after `--settle` seconds idle;
  dense    cuDNN causal flash attention over the whole context, 128 heads, d = 128 (the bar to beat);
  layer    the sparse prefill of a whole causal layer, measured in one call: all S queries, query t over K
           random ids from [0, t] (ids 0..t then -1 while t < K); with `--no-layer`, estimated instead from the
           first 2048 queries as timed plus the rest at the per-query rate of full rows (both are recorded when
           measured: `sparse_layer_ms`, `sparse_layer_extrapolated_ms`). Needs ~37.6 GB at S = 128K;
  dsa      indexer + sparse prefill for the whole context, one layer (compare with dense); bf16 and fp8 indexer.
  steady   the DSA step (fp8 indexer, then the sparse prefill over the ids it selected, one jitted function) and
           dense, each after `--steady` seconds of back-to-back calls (`timed_steady`): the power state of a
           prefill that runs layer after layer, which the sections above, timed from a cooler start, do not reach
           (at 128K on an H100 the DSA parts read 3-6% faster). `dsa_steady_speedup` is the ratio to quote.
Median of `--repeats` samples after a warm-up, each sample the mean of calls dispatched back to back over about
20 ms (see `timed`); inputs are random normal, never zeros.

Clocks: an H100 at its 700 W cap lowers its SM clock (1.5-1.7 GHz under the fp8 indexer, 1.98 GHz idle; read
with nvidia-smi, docs/BENCHMARKS.md), and the short decode kernel (~0.1 ms) read 103-152 us across runs for the
same inputs, for reasons not established. So decode is timed after `--settle` seconds idle, not in whatever state
the prefill left, and every section records the SM clock and power nvidia-smi reads right after it (`clock_*`
fields; None without nvidia-smi). The long whole-context sections (fp8 indexer, sparse layer, dense) also sample
them every 100 ms while they are timed, after compiling (`power_*`: median and lowest SM clock, median power).

    python scripts/bench_kernels.py --check                       # correctness on the GPU only
    python scripts/bench_kernels.py --contexts 8192 32768 65536 131072
    python scripts/bench_kernels.py --sweep topk fp8 --contexts 32768  # tile variants (fp8: also the decode
                                                                      # indexer over an fp8 key cache)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels import indexer as indexer_module  # noqa: E402
from pallas_kernels.indexer import head_sum_ablation, indexer_scores_pallas, indexer_topk_pallas  # noqa: E402
from pallas_kernels.indexer_reference import (indexer_scores_reference, quantize_fp8,  # noqa: E402
                                              quantize_fp8_keys)
from pallas_kernels.sparse_attention import (Tiles, resolve_forward_kernel,  # noqa: E402
                                             sparse_mla_decode_pallas, sparse_mla_pallas)
from pallas_kernels.sparse_attention_reference import (sparse_mla_decode_reference,  # noqa: E402
                                                       sparse_mla_reference)
from pallas_kernels.topk import FALLBACK, candidate_counts, topk_pallas  # noqa: E402
from pallas_kernels.topk_reference import topk_reference  # noqa: E402

G, I, K, H, R, P = 64, 128, 2048, 128, 512, 64
BF16 = jnp.bfloat16


def timed(fn, *args, repeats: int = 5, min_seconds: float = 0.02) -> float:
    """Median seconds per call of fn(*args) (jitted), after one warm-up call.

    Each of the `repeats` samples dispatches calls back to back until it spans about `min_seconds`, then waits
    once: a sub-millisecond kernel timed one call at a time also times the host's dispatch (the decode kernel
    read 496 us that way and 221 us back to back on an H100), which a jitted decode or training step does not pay
    per kernel."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, min(1000, round(min_seconds / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            result = fn(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def gpu_clock() -> Optional[str]:
    """The SM clock and power draw as nvidia-smi reads them now ("1980 MHz, 130.2 W"), None where it cannot."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class PowerSampler:
    """nvidia-smi sampling the SM clock, the power and whether the power cap holds the clock down, every 100 ms
    while a `with` block runs; `summary` is then "SM clock median 1185 MHz (lowest 1140), power median 651 W,
    power cap 9 of 9 samples", or None without nvidia-smi. (The clock is read at each sample; `power.draw` is
    averaged over nvidia-smi's own window, so sections of ~1 s read low.)"""

    def __enter__(self):
        try:
            self._process = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,"
                                              "clocks_event_reasons.sw_power_cap",
                                              "--format=csv,noheader,nounits", "-lms", "100"],
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._process = None
        self.summary = None
        return self

    def __exit__(self, *exc_info):
        if self._process is None:
            return
        self._process.terminate()
        try:
            text, _ = self._process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a sampler that does not stop must not stop the bench
            self._process.kill()
            text, _ = self._process.communicate()
        samples = []
        for line in text.splitlines():
            fields = [v.strip() for v in line.split(",")]
            try:
                clock, power = float(fields[0]), float(fields[1])
            except (ValueError, IndexError):  # a partial last line, or "[N/A]"
                continue
            samples.append((clock, power, len(fields) > 2 and fields[2] == "Active"))
        if samples:
            clocks, powers, capped = zip(*samples, strict=True)
            self.summary = (f"SM clock median {statistics.median(clocks):.0f} MHz (lowest {min(clocks):.0f}), "
                            f"power median {statistics.median(powers):.0f} W, power cap {sum(capped)} of "
                            f"{len(samples)} samples")


def timed_steady(fn, *args, seconds: float) -> tuple[float, Optional[str]]:
    """(median seconds per call, PowerSampler summary) in the power state that running fn for long reaches: fn runs
    back to back for `seconds` first, then is timed (`timed`, 5 samples) over about `seconds` more while sampled.
    An H100 reaches its power cap within a second or two of a heavy kernel and lowers its clock; a call timed
    before that (as `timed` alone does for a single long call) runs faster than it would in a model's prefill,
    which runs layer after layer."""
    jax.block_until_ready(fn(*args))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        jax.block_until_ready(fn(*args))
    with PowerSampler() as power:
        t = timed(fn, *args, repeats=5, min_seconds=seconds / 5)
    return t, power.summary


def causal_slot_ids(key, s: int, k: int):
    """int32 [1, s, k]: query t's ids, k random keys from [0, t] sorted (repeats allowed, as in the per-query
    sample), or while t < k all of 0..t then -1 (what a causal top-k selects there)."""
    pos = jnp.arange(s, dtype=jnp.int32)[:, None]
    slots = jnp.arange(k, dtype=jnp.int32)[None, :]
    drawn = jnp.sort(jax.random.randint(key, (s, k), 0, pos + 1), axis=-1)
    return jnp.where(pos < k, jnp.where(slots <= pos, slots, -1), drawn).astype(jnp.int32)[None]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def selection_ok(ids, scores, k) -> bool:
    """Every selected id is visible and no unselected key scores above the lowest selected one (up to rounding)."""
    ids, scores = np.asarray(ids), np.asarray(scores, np.float64)
    for row_ids, row in zip(ids.reshape(-1, k), scores.reshape(-1, scores.shape[-1]), strict=True):
        chosen = row_ids[row_ids >= 0]
        visible = np.isfinite(row)
        if len(chosen) != min(k, visible.sum()) or not visible[chosen].all() or len(set(chosen)) != len(chosen):
            return False
        rest = np.setdiff1d(np.flatnonzero(visible), chosen)
        if len(rest) and row[rest].max() > row[chosen].min() + 1e-3 * max(1.0, abs(row[chosen].min())):
            return False
    return True


def check(key) -> list[str]:
    """Pallas vs reference on ragged shapes, bf16 and fp32; returns failures (printed as a table)."""
    failures, rows = [], []
    # fp32: Triton's dots may run in tf32 (~3e-4 relative, METHOD.md); the references run at "highest" precision.
    for dtype, tol in ((jnp.float32, 2e-3), (BF16, 2e-2)):
        for (b, t, s, g, i, k) in ((2, 77, 300, 8, 32, 40), (1, 130, 130, 64, 128, 64), (1, 5, 2000, 4, 16, 512)):
            ks = jax.random.split(key, 4)
            q = jax.random.normal(ks[0], (b, t, g, i), dtype)
            w = jax.random.normal(ks[1], (b, t, g), jnp.float32)
            kk = jax.random.normal(ks[2], (b, s, i), dtype)
            pos = jnp.sort(jax.random.randint(ks[3], (b, t), 0, s), axis=1)
            ref = indexer_scores_reference(q, w, kk, pos)
            got = indexer_scores_pallas(q, w, kk, pos)
            finite = np.isfinite(np.asarray(ref))
            same_mask = bool((np.isfinite(np.asarray(got)) == finite).all())
            err = rel_err(np.asarray(got)[finite], np.asarray(ref)[finite])
            ids = indexer_topk_pallas(q, w, kk, pos, topk=k)
            sel = selection_ok(ids, ref, k)
            exact = bool((np.asarray(topk_pallas(ref, k)) == np.asarray(topk_reference(ref, k))).all())
            rows.append(("indexer", jnp.dtype(dtype).name, (b, t, s, g, i, k),
                         err, same_mask and sel and exact))
            _print_row(rows[-1])
            if not (err < tol and same_mask and sel and exact):
                failures.append(f"indexer {dtype} {(b, t, s, g, i, k)}: err {err:.2e} mask {same_mask} "
                                f"selection {sel} topk-exact {exact}")
        if dtype == BF16:
            failures += check_fp8_and_long_rows(key)
        for (b, t, s, h, r, p, k) in ((2, 9, 300, 3, 16, 8, 40), (1, 33, 1000, 128, 512, 64, 256),
                                      (3, 4, 64, 20, 64, 32, 64)):
            ks = jax.random.split(key, 3)
            q = jax.random.normal(ks[0], (b, t, h, r + p), dtype)
            kv = jax.random.normal(ks[1], (b, s, r + p), dtype)
            scores = jax.random.normal(ks[2], (b, t, s))
            idx = topk_reference(jnp.where(jax.random.uniform(ks[2], (b, t, s)) < 0.9, scores, -jnp.inf), k)
            idx = idx.at[:, 0].set(-1)  # a query with no valid slot
            ref = sparse_mla_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=0.1, value_dim=r)
            got = sparse_mla_pallas(q, kv, idx, scale=0.1, value_dim=r)
            err = rel_err(got, ref)
            dref = sparse_mla_decode_reference(q[:, 1].astype(jnp.float32), kv.astype(jnp.float32), idx[:, 1],
                                               scale=0.1, value_dim=r)
            dgot = sparse_mla_decode_pallas(q[:, 1], kv, idx[:, 1], scale=0.1, value_dim=r)
            derr = rel_err(dgot, dref)
            ok = err < tol and derr < tol and bool(np.isfinite(np.asarray(got, np.float32)).all())
            rows.append(("sparse", jnp.dtype(dtype).name, (b, t, s, h, r, p, k), max(err, derr), ok))
            _print_row(rows[-1])
            if not ok:
                failures.append(f"sparse {dtype} {(b, t, s, h, r, p, k)}: prefill err {err:.2e} decode {derr:.2e}")
    return failures


def check_fp8_and_long_rows(key) -> list[str]:
    """fp8 scores against the fp8 reference; top-k on long rows (random, ties, causal lengths) equal to
    `topk_reference` id for id."""
    failures = []
    ks = jax.random.split(key, 6)
    b, t, s, g, i = 1, 256, 4096, 64, 128
    q, kk = jax.random.normal(ks[0], (b, t, g, i)), jax.random.normal(ks[1], (b, s, i))
    w = jax.random.normal(ks[2], (b, t, g))
    pos = (s - t + jnp.arange(t))[None]
    q8, w8, k8, k_scale = quantize_fp8(q, w, kk)
    ref = np.asarray(indexer_scores_reference(q8, w8, k8, pos, k_scale))
    finite = np.isfinite(ref)
    ref_fp32 = np.asarray(indexer_scores_reference(q8, w8, k8, pos, k_scale, fp8_head_sum="fp32"))
    # The fp8 tensor cores' accumulator is narrower than fp32: 3e-4 with the fp32 head sum; with the bf16 one a
    # logit it moves across a rounding boundary moves its term by one bf16 step (tests/test_indexer_gluon.py).
    for head_sum, kernel, want, bound in (("bf16", "auto", ref, 2e-3), ("fp32", "pallas", ref_fp32, 3e-4)):
        got = np.asarray(indexer_scores_pallas(q8, w8, k8, pos, k_scale, fp8_head_sum=head_sum,
                                               scores_kernel=kernel))
        err = rel_err(got[finite], want[finite])
        ok = err < bound and bool((np.isfinite(got) == finite).all())
        _print_row((f"fp8 {head_sum} sum", "e4m3", (b, t, s, g, i), err, ok))
        if not ok:
            failures.append(f"fp8 scores, {head_sum} head sum: err {err:.2e}")
    rows = jax.random.normal(ks[3], (64, 131072))
    lengths = jax.random.randint(ks[4], (64,), 1, 131073).at[:4].set(131072)
    ties = jnp.round(rows * 4) / 4  # few distinct values: many ties at the cut, overflowing candidates
    for name, x in (("random", rows), ("ties", ties)):
        for lens in (None, lengths):
            vis = x if lens is None else jnp.where(jnp.arange(x.shape[1])[None] < lens[:, None], x, -jnp.inf)
            same = bool((np.asarray(topk_pallas(x, K, lens)) == np.asarray(topk_reference(vis, K))).all())
            _print_row(("topk", name, (64, 131072, K, "causal" if lens is not None else "full"), 0.0, same))
            if not same:
                failures.append(f"topk {name} lengths={lens is not None}: differs from the reference")
    return failures


def topk_fallbacks(rows) -> int:
    """How many rows the candidate pass sent to the whole-row select (default options)."""
    return int((np.asarray(candidate_counts(rows, K)) == FALLBACK).sum())


def _print_row(row) -> None:
    name, dtype, shape, err, ok = row
    print(f"check {name:8s} {dtype:10s} {str(shape):32s} rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)


def scores_inputs(ks, s: int, chunk: int):
    """The last `chunk` queries of a context of s (rows of length up to s), and their causal FLOPs."""
    q = jax.random.normal(ks[0], (1, chunk, G, I), BF16)
    w = jax.random.normal(ks[1], (1, chunk, G), jnp.float32)
    k = jax.random.normal(ks[2], (1, s, I), BF16)
    pos = (s - chunk + jnp.arange(chunk, dtype=jnp.int32))[None]
    visible_pairs = float(chunk) * (s - chunk) + chunk * (chunk + 1) / 2
    return (q, w, k, pos), 2.0 * visible_pairs * G * I


def split_slots_forward():
    """The Gluon forward's split_slots schedule (the default before the seesaw), one split, on inputs that need no
    padding (128 heads, 2048 slots, 512 + 64), jitted: -> (out [B, T, 1, H, R], lse)."""
    from pallas_kernels.sparse_attention_gluon import sparse_forward_gluon
    return jax.jit(lambda q_, kv_, i_: sparse_forward_gluon(q_, kv_, i_, scale=0.07, value_dim=R, num_splits=1,
                                                            out_dtype=BF16, schedule="split_slots"))


def scores_only_indexer():
    """`indexer_topk_pallas` with fp8, its top-k replaced by a read of one column per row (the scores must still
    be computed, the selection costs ~nothing): the whole-context indexer minus this is the top-k's share."""
    def no_topk(scores, topk, lengths=None, **kernel_options):
        return jnp.broadcast_to(scores[..., :1].astype(jnp.int32), scores.shape[:-1] + (topk,))

    def run(q_, w_, k_, p_):
        real, indexer_module.topk_pallas = indexer_module.topk_pallas, no_topk
        try:  # swapped only while tracing: the jitted function keeps what it traced
            return indexer_topk_pallas(q_, w_, k_, p_, topk=K, fp8=True)
        finally:
            indexer_module.topk_pallas = real
    return jax.jit(run)


def bench_context(s: int, args, key) -> dict:
    out = {"context": s}
    ks = jax.random.split(key, 8)
    (q, w, k, pos), flops = scores_inputs(ks, s, min(args.chunk, s))
    t = timed(jax.jit(indexer_scores_pallas), q, w, k, pos, repeats=args.repeats)
    out["scores_ms"], out["scores_tflops"] = t * 1e3, flops / t / 1e12
    q8, w8, k8, k_scale = quantize_fp8(q, w, k)
    t8 = timed(jax.jit(indexer_scores_pallas), q8, w8, k8, pos, k_scale, repeats=args.repeats)
    out["scores_fp8_ms"], out["scores_fp8_tflops"] = t8 * 1e3, flops / t8 / 1e12
    pallas = jax.jit(functools.partial(indexer_scores_pallas, scores_kernel="pallas"))
    out["scores_pallas_tflops"] = flops / timed(pallas, q, w, k, pos, repeats=args.repeats) / 1e12
    for name, options in (("pallas_bf16sum", dict(scores_kernel="pallas")), ("fp32sum", dict(fp8_head_sum="fp32")),
                          ("pallas_fp32sum", dict(scores_kernel="pallas", fp8_head_sum="fp32"))):
        fn = jax.jit(functools.partial(indexer_scores_pallas, **options))
        out[f"scores_fp8_{name}_tflops"] = flops / timed(fn, q8, w8, k8, pos, k_scale, repeats=args.repeats) / 1e12
    del q8, w8, k8
    if s <= 32768:
        t_ref = timed(jax.jit(indexer_scores_reference), q, w, k, pos, repeats=args.repeats)
        out["scores_xla_ms"] = t_ref * 1e3
    # -- top-k on rows of length s --
    rows = jax.random.normal(ks[3], (args.topk_rows, s), jnp.float32)
    t = timed(jax.jit(lambda x: topk_pallas(x, K)), rows, repeats=args.repeats)
    t_xla = timed(jax.jit(lambda x: jax.lax.top_k(x, K)[1]), rows, repeats=args.repeats)
    out["topk_ms"], out["topk_xla_ms"] = t * 1e3, t_xla * 1e3
    out["topk_gbs"] = rows.size * 4 / t / 1e9
    out["topk_fallback_rows"] = topk_fallbacks(rows)
    # -- whole-context indexer (scores + top-k, chunked) --
    qf = jax.random.normal(ks[4], (1, s, G, I), BF16)
    wf = jax.random.normal(ks[5], (1, s, G), jnp.float32)
    posf = jnp.arange(s, dtype=jnp.int32)[None]
    indexer = jax.jit(lambda q_, w_, k_, p_: indexer_topk_pallas(q_, w_, k_, p_, topk=K))
    t_index = timed(indexer, qf, wf, k, posf, repeats=max(1, args.repeats // 2))
    causal_flops = 2.0 * (s * (s + 1) / 2) * G * I
    out["indexer_ms"], out["indexer_tflops"] = t_index * 1e3, causal_flops / t_index / 1e12
    indexer8 = jax.jit(lambda q_, w_, k_, p_: indexer_topk_pallas(q_, w_, k_, p_, topk=K, fp8=True))
    jax.block_until_ready(indexer8(qf, wf, k, posf))  # compiled before sampling: the samples are of the runs
    with PowerSampler() as power:
        t_index8 = timed(indexer8, qf, wf, k, posf, repeats=max(1, args.repeats // 2))
    out["power_indexer_fp8"] = power.summary
    out["indexer_fp8_ms"] = t_index8 * 1e3
    scores_only = timed(scores_only_indexer(), qf, wf, k, posf, repeats=max(1, args.repeats // 2))
    out["indexer_fp8_scores_ms"] = scores_only * 1e3
    indexer8_fp32sum = jax.jit(lambda q_, w_, k_, p_: indexer_topk_pallas(q_, w_, k_, p_, topk=K, fp8=True,
                                                                          fp8_head_sum="fp32"))
    out["indexer_fp8_fp32sum_ms"] = timed(indexer8_fp32sum, qf, wf, k, posf, repeats=max(1, args.repeats // 2)) * 1e3
    out["clock_indexer"] = gpu_clock()
    del qf, wf
    # -- sparse prefill: `sparse_queries` queries x K slots --
    nq = min(args.sparse_queries, s)
    kv = jax.random.normal(ks[6], (1, s, R + P), BF16)
    qs = jax.random.normal(ks[7], (1, nq, H, R + P), BF16)
    idx = jnp.sort(jax.random.randint(ks[0], (1, nq, K), 0, s), axis=-1).astype(jnp.int32)

    def sparse_fn(kernel):
        return jax.jit(lambda q_, kv_, i_: sparse_mla_pallas(q_, kv_, i_, scale=0.07, value_dim=R,
                                                             tiles=Tiles(forward_kernel=kernel)))
    sparse = sparse_fn("auto")  # the Gluon kernel on Hopper with triton installed, else Pallas
    out["sparse_kernel"] = resolve_forward_kernel("auto", False, BF16, R)
    t = timed(sparse, qs, kv, idx, repeats=args.repeats)
    sparse_flops = 2.0 * nq * H * K * (R + P + R)
    out["sparse_ms"], out["sparse_tflops"] = t * 1e3, sparse_flops / t / 1e12
    out["sparse_ms_per_query"] = t * 1e3 / nq
    if out["sparse_kernel"] != "pallas":
        t = timed(sparse_fn("pallas"), qs, kv, idx, repeats=args.repeats)
        out["sparse_pallas_tflops"] = sparse_flops / t / 1e12
    if out["sparse_kernel"] == "gluon":  # the other Gluon schedule, on the same (unpadded) shapes
        other = split_slots_forward()
        t = timed(other, qs, kv, idx, repeats=args.repeats)
        out["sparse_split_slots_tflops"] = sparse_flops / t / 1e12
        out["sparse_split_slots_rel_err"] = rel_err(other(qs, kv, idx)[0][:, :, 0], sparse(qs, kv, idx))
    # The first K queries of a causal sequence see t + 1 < K keys and select all of them (ids 0..t, then -1):
    # timed apart for the whole-layer estimate below, so that a kernel that skips -1 slot blocks gets the credit.
    head = min(K, s)
    slots = jnp.arange(K, dtype=jnp.int32)[None, :]
    idx_head = jnp.where(slots <= jnp.arange(head, dtype=jnp.int32)[:, None], slots, -1)[None]
    qs_head = jax.random.normal(ks[5], (1, head, H, R + P), BF16)
    out["sparse_head_ms"] = timed(sparse, qs_head, kv, idx_head, repeats=args.repeats) * 1e3
    del qs_head
    out["clock_sparse"] = gpu_clock()
    out["sparse_layer_extrapolated_ms"] = out["sparse_head_ms"] + out["sparse_ms_per_query"] * (s - head)
    # -- sparse decode --
    time.sleep(args.settle)
    bd = args.decode_batch
    kvd = jax.random.normal(ks[1], (bd, s, R + P), BF16)
    qd = jax.random.normal(ks[2], (bd, H, R + P), BF16)
    idxd = jnp.sort(jax.random.randint(ks[3], (bd, K), 0, s), axis=-1).astype(jnp.int32)
    decode_bytes = bd * (K * (R + P) * 2 + K * 4 + H * (R + P) * 2 + H * R * 2)
    kernels = [("auto", "")] + ([("pallas", "_pallas")] if out["sparse_kernel"] != "pallas" else [])
    for kernel, suffix in kernels:
        decode = jax.jit(lambda q_, kv_, i_, kernel=kernel: sparse_mla_decode_pallas(
            q_, kv_, i_, scale=0.07, value_dim=R, forward_kernel=kernel))
        t = timed(decode, qd, kvd, idxd, repeats=args.repeats * 4)
        out[f"decode{suffix}_us"], out[f"decode{suffix}_gbs"] = t * 1e6, decode_bytes / t / 1e9
    if out["sparse_kernel"] == "gluon":  # one split: what the default picks at B = 64 on an H100
        t = timed(split_slots_forward(), qd[:, None], kvd, idxd[:, None], repeats=args.repeats * 4)
        out["decode_split_slots_us"] = t * 1e6
    out["clock_decode"] = gpu_clock()
    del kvd
    # -- dense cuDNN flash attention, whole context --
    qh = jax.random.normal(ks[4], (1, s, H, 128), BF16)
    dense = dense_attention()
    try:
        jax.block_until_ready(dense(qh))
        with PowerSampler() as power:
            t_dense = timed(dense, qh, repeats=args.repeats)
        out["power_dense"] = power.summary
        out["dense_ms"] = t_dense * 1e3
        out["clock_dense"] = gpu_clock()
    except Exception as err:  # noqa: BLE001 (report, do not hide: the table says why it is missing)
        out["dense_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    del qh
    # -- the whole causal layer's sparse prefill in one call (q repeats the timed queries: values do not matter),
    # last: its ~38 GB at 128K are not allocated and freed before the decode and dense timings --
    if not args.no_layer:
        qs_layer = jnp.tile(qs, (1, -(-s // nq), 1, 1))[:, :s]
        idx_layer = causal_slot_ids(ks[5], s, K)
        jax.block_until_ready(sparse(qs_layer, kv, idx_layer))
        with PowerSampler() as power:
            out["sparse_layer_ms"] = timed(sparse, qs_layer, kv, idx_layer, repeats=max(1, args.repeats // 2),
                                           min_seconds=0.0) * 1e3
        out["power_sparse_layer"] = power.summary
        del qs_layer, idx_layer
    # -- one DSA layer over the whole context = indexer + sparse prefill for all s queries (measured, or with
    # --no-layer estimated: the first K timed with their causal slot counts, the other s - K at the per-query
    # rate of full rows) --
    sparse_layer_ms = out.get("sparse_layer_ms", out["sparse_layer_extrapolated_ms"])
    out["dsa_ms"] = t_index * 1e3 + sparse_layer_ms
    out["dsa_fp8_ms"] = t_index8 * 1e3 + sparse_layer_ms
    if args.steady > 0:
        out.update(steady_dsa_and_dense(s, args.steady, ks[6]))
    return out


def dense_attention():
    """The bar to beat: cuDNN causal flash attention, q = k = v [1, S, H, 128] (values do not matter)."""
    return jax.jit(lambda q_: jax.nn.dot_product_attention(q_, q_, q_, is_causal=True, implementation="cudnn"))


def dsa_step():
    """One DSA attention step as a model's layer runs it, jitted whole: the fp8 indexer over every query of the
    context, then the sparse prefill of every query over the ids it selected."""
    def step(q, w, k, positions, q_latent, kv):
        ids = indexer_topk_pallas(q, w, k, positions, topk=K, fp8=True)
        return sparse_mla_pallas(q_latent, kv, ids, scale=0.07, value_dim=R)
    return jax.jit(step)


def steady_dsa_and_dense(s: int, seconds: float, key) -> dict:
    """The DSA step (`dsa_step`) and dense cuDNN over the whole context, each in the power state of running for long
    (`timed_steady`). Needs ~42 GB at S = 128K (the sparse prefill's q and output dominate)."""
    ks = jax.random.split(key, 6)
    out = {}
    qh = jax.random.normal(ks[0], (1, s, H, 128), BF16)
    dense = dense_attention()
    try:
        t, out["power_dense_steady"] = timed_steady(dense, qh, seconds=seconds)
        out["dense_steady_ms"] = t * 1e3
    except Exception as err:  # noqa: BLE001 (report, do not hide: the table says why it is missing)
        out["dense_steady_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    del qh
    inputs = (jax.random.normal(ks[1], (1, s, G, I), BF16), jax.random.normal(ks[2], (1, s, G), jnp.float32),
              jax.random.normal(ks[3], (1, s, I), BF16), jnp.arange(s, dtype=jnp.int32)[None],
              jax.random.normal(ks[4], (1, s, H, R + P), BF16), jax.random.normal(ks[5], (1, s, R + P), BF16))
    t, out["power_dsa_step_steady"] = timed_steady(dsa_step(), *inputs, seconds=seconds)
    out["dsa_step_steady_ms"] = t * 1e3
    if "dense_steady_ms" in out:
        out["dsa_steady_speedup"] = out["dense_steady_ms"] / out["dsa_step_steady_ms"]
    return out


def _sweep_variant(name: str, fn, args, flops: float, repeats: int) -> None:
    """Time one scores variant and compare it with the reference on the first 64 queries: a tile choice can
    compile into wrong scores (512-row bf16 tiles did on an H100), and a fast wrong variant must not win."""
    try:
        q, w, k, pos, *k_scale = args
        got = np.asarray(fn(*args)[:, :64])
        want = np.asarray(indexer_scores_reference(q[:, :64], w[:, :64], k, pos[:, :64], *k_scale))
        finite = np.isfinite(want)
        wrong = not (np.isfinite(got) == finite).all() or rel_err(got[finite], want[finite]) > 2e-2
        t = timed(fn, *args, repeats=repeats)
        print(f"sweep {name}: {t * 1e3:.2f} ms {flops / t / 1e12:.0f} TFLOP/s"
              f"{'  WRONG (differs from the reference)' if wrong else ''}", flush=True)
    except Exception as err:  # noqa: BLE001 (a variant that does not compile is reported, not fatal)
        print(f"sweep {name}: {type(err).__name__} {str(err)[:120]}", flush=True)


def sweep(args, key) -> None:
    """Tile/warp variants of the kernels named by --sweep at one context (--contexts[0]); prints ms per variant."""
    s = args.contexts[0]
    ks = jax.random.split(key, 8)
    (q, w, k, pos), flops = scores_inputs(ks, s, min(args.chunk, s))
    # (rows, key block, heads per step, warps, stages, walk_keys); 0 = the default
    score_tiles = ((128, 128, 0, 4, 4, False), (128, 128, 16, 4, 4, False), (128, 128, 32, 4, 4, False),
                   (256, 128, 32, 8, 3, False), (128, 64, 16, 4, 4, False), (128, 128, 0, 4, 3, True),
                   (128, 64, 0, 4, 3, True), (256, 64, 0, 8, 3, True), (256, 64, 0, 8, 2, True),
                   (256, 128, 0, 8, 3, True), (256, 64, 0, 8, 4, True), (128, 64, 32, 4, 3, True))
    for rows, bk, hps, warps, stages, walk in score_tiles if "scores" in args.sweep else ():
        fn = jax.jit(lambda a, b, c, d, rows=rows, bk=bk, hps=hps, warps=warps, stages=stages, walk=walk:
                     indexer_scores_pallas(a, b, c, d, rows_per_tile=rows, block_k=bk, heads_per_step=hps,
                                           num_warps=warps, num_stages=stages, walk_keys=walk))
        _sweep_variant(f"scores rows={rows} bk={bk} heads_per_step={hps} warps={warps} stages={stages} "
                       f"walk_keys={walk}", fn, (q, w, k, pos), flops, args.repeats)
    q8, w8, k8, k_scale = quantize_fp8(q, w, k)
    # (rows, key block, warps, stages, walk_keys)
    fp8_tiles = ((128, 128, 4, 4, False), (256, 128, 8, 3, False), (256, 64, 4, 4, False),
                 (128, 128, 4, 3, True), (128, 64, 4, 3, True), (128, 64, 4, 4, True), (128, 64, 4, 5, True),
                 (256, 64, 8, 3, True), (256, 64, 8, 4, True), (128, 32, 4, 4, True)
                 ) if not args.ablation_only else ()
    for rows, bk, warps, stages, walk in fp8_tiles if "fp8" in args.sweep else ():
        fn = jax.jit(lambda a, b, c, d, e, rows=rows, bk=bk, warps=warps, stages=stages, walk=walk:
                     indexer_scores_pallas(a, b, c, d, e, rows_per_tile=rows, block_k=bk, num_warps=warps,
                                           num_stages=stages, walk_keys=walk))
        _sweep_variant(f"scores fp8 rows={rows} bk={bk} warps={warps} stages={stages} walk_keys={walk}", fn,
                       (q8, w8, k8, pos, k_scale), flops, args.repeats)
    if "fp8" in args.sweep:  # decode: the indexer of one new token per row over an fp8 key cache or a bf16 one
        bd = args.decode_batch
        kd = jax.random.normal(ks[4], (bd, s, I), BF16)
        qd = jax.random.normal(ks[5], (bd, 1, G, I), BF16)
        wd = jax.random.normal(ks[6], (bd, 1, G), jnp.float32)
        posd = jnp.full((bd, 1), s - 1, jnp.int32)
        kd8, kd_scale = quantize_fp8_keys(kd)
        for name, fn, args_ in (
                ("bf16 keys", lambda a, b, c, d: indexer_topk_pallas(a, b, c, d, topk=K), (qd, wd, kd, posd)),
                ("bf16 keys quantised at each call", lambda a, b, c, d: indexer_topk_pallas(a, b, c, d, topk=K,
                                                                                           fp8=True),
                 (qd, wd, kd, posd)),
                ("fp8 key cache", lambda a, b, c, d, e: indexer_topk_pallas(a, b, c, d, topk=K, k_scale=e),
                 (qd, wd, kd8, posd, kd_scale))):
            t = timed(jax.jit(fn), *args_, repeats=args.repeats * 4)
            print(f"sweep decode indexer B={bd} S={s}, {name}: {t * 1e6:.0f} us", flush=True)
        del kd, kd8
    if "fp8" in args.sweep:  # ablation: what the ReLU + head weights cost, bf16 vs fp8 tensor-core inputs
        for name, args_ in (("bf16", (q, w, k, pos, None)), ("fp8", (q8, w8, k8, pos, k_scale))):
            for epilogue, scores_fn in (("relu_weighted_sum", indexer_scores_pallas), ("sum", head_sum_ablation)):
                t = timed(jax.jit(scores_fn), *args_, repeats=args.repeats)
                print(f"sweep scores ablation {name} epilogue={epilogue}: {t * 1e3:.2f} ms "
                      f"{flops / t / 1e12:.0f} TFLOP/s", flush=True)
    rows_ = jax.random.normal(ks[3], (args.topk_rows, s), jnp.float32)
    if "topk" in args.sweep:
        t1 = timed(jax.jit(lambda x: candidate_counts(x, K)), rows_, repeats=args.repeats)
        print(f"sweep topk candidates kernel alone (defaults): {t1 * 1e3:.2f} ms", flush=True)
    # (candidates block, select block, warps, stages, sample); 0 = the default
    topk_variants = ((512, 0, 4, 3, 1024), (1024, 0, 4, 3, 1024), (1024, 0, 8, 3, 1024), (1024, 0, 4, 2, 1024),
                     (1024, 0, 4, 3, 2048), (2048, 0, 8, 3, 1024), (1024, 128, 4, 3, 1024),
                     (1024, 256, 4, 3, 1024), (1024, 1024, 4, 3, 1024))
    for block, select_block, warps, stages, sample in topk_variants if "topk" in args.sweep else ():
        t = timed(jax.jit(lambda x, b=block, sb=select_block, wp=warps, st=stages, sp=sample: topk_pallas(
            x, K, block=b, select_block=sb, num_warps=wp, num_stages=st, sample=sp)), rows_, repeats=args.repeats)
        print(f"sweep topk block={block} select_block={select_block} warps={warps} stages={stages} "
              f"sample={sample}: {t * 1e3:.2f} ms", flush=True)
    if "sparse" not in args.sweep:
        return
    nq = min(args.sparse_queries, s)
    kv = jax.random.normal(ks[6], (1, s, R + P), BF16)
    qs = jax.random.normal(ks[7], (1, nq, H, R + P), BF16)
    idx = jnp.sort(jax.random.randint(ks[0], (1, nq, K), 0, s), axis=-1).astype(jnp.int32)
    sflops = 2.0 * nq * H * K * (R + P + R)
    for bk, bh, warps in ((32, 64, 8), (64, 64, 8), (16, 64, 8), (32, 32, 4), (64, 32, 4), (32, 128, 8),
                          (64, 64, 4), (32, 64, 16), (64, 16, 4), (32, 16, 4), (128, 16, 4), (128, 32, 8),
                          (64, 32, 8)):
        fn = jax.jit(lambda a, b, c, bk=bk, bh=bh, warps=warps: sparse_mla_pallas(
            a, b, c, scale=0.07, value_dim=R, tiles=Tiles(block_k=bk, block_h=bh, num_warps=warps)))
        try:
            t = timed(fn, qs, kv, idx, repeats=args.repeats)
            print(f"sweep sparse bk={bk} bh={bh} warps={warps}: {t * 1e3:.2f} ms {sflops / t / 1e12:.0f} TFLOP/s",
                  flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"sweep sparse {bk} {bh} {warps}: {type(err).__name__} {str(err)[:100]}", flush=True)
    bd = args.decode_batch
    kvd = jax.random.normal(ks[1], (bd, s, R + P), BF16)
    qd = jax.random.normal(ks[2], (bd, H, R + P), BF16)
    idxd = jnp.sort(jax.random.randint(ks[3], (bd, K), 0, s), axis=-1).astype(jnp.int32)
    dbytes = bd * (K * (R + P) * 2 + K * 4 + H * (R + P) * 2 + H * R * 2)
    for bk, bh, warps, splits in ((32, 64, 8, 0), (64, 64, 8, 0), (32, 64, 8, 1), (32, 64, 8, 4), (32, 32, 4, 0),
                                  (64, 128, 8, 0), (32, 64, 16, 0), (64, 32, 4, 0), (16, 32, 4, 0), (32, 16, 4, 0),
                                  (16, 16, 4, 0), (64, 16, 4, 0), (32, 32, 4, 4), (32, 32, 4, 8), (32, 32, 2, 0)):
        fn = jax.jit(lambda a, b, c, bk=bk, bh=bh, warps=warps, sp=splits: sparse_mla_decode_pallas(
            a, b, c, scale=0.07, value_dim=R, block_k=bk, block_h=bh, num_warps=warps, num_splits=sp))
        try:
            t = timed(fn, qd, kvd, idxd, repeats=args.repeats * 4)
            print(f"sweep decode bk={bk} bh={bh} warps={warps} splits={splits}: {t * 1e6:.0f} us "
                  f"{dbytes / t / 1e9:.0f} GB/s", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"sweep decode {bk} {bh} {warps} {splits}: {type(err).__name__} {str(err)[:100]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the references")
    parser.add_argument("--sweep", nargs="*", choices=["scores", "fp8", "topk", "sparse"],
                        help="time tile variants of these kernels (none named: all) at the first context, then stop")
    parser.add_argument("--ablation-only", action="store_true", help="with --sweep fp8: only the epilogue ablation")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the references")
    parser.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--topk-rows", type=int, default=1024)
    parser.add_argument("--sparse-queries", type=int, default=4096)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds idle before timing decode (not in the prefill's power state)")
    parser.add_argument("--no-layer", action="store_true",
                        help="estimate the whole layer's sparse prefill from --sparse-queries instead of timing "
                             "all S queries (which needs ~37.6 GB at S = 128K)")
    parser.add_argument("--steady", type=float, default=5.0,
                        help="seconds each of the DSA step and dense runs before, and about as long while, it is "
                             "timed in the power state of a long prefill (0: skip)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(f"{datetime.date.today()} jax {jax.__version__} device {jax.devices()[0].device_kind}")
    key = jax.random.key(0)
    failures = []
    if not args.no_check:
        with jax.default_matmul_precision("highest"):
            failures = check(key)
    if failures:
        print("FAILURES:\n  " + "\n  ".join(failures), flush=True)
    if args.check:
        sys.exit(1 if failures else 0)
    if args.sweep is not None:
        args.sweep = args.sweep or ["scores", "fp8", "topk", "sparse"]
        sweep(args, key)
        return
    results = []
    for s in args.contexts:
        results.append(bench_context(s, args, jax.random.fold_in(key, s)))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    cols = [("context", "{:>7d}"), ("scores_tflops", "{:8.1f}"), ("scores_pallas_tflops", "{:8.1f}"),
            ("scores_fp8_tflops", "{:8.1f}"), ("scores_fp8_pallas_bf16sum_tflops", "{:8.1f}"),
            ("scores_fp8_fp32sum_tflops", "{:8.1f}"), ("scores_fp8_pallas_fp32sum_tflops", "{:8.1f}"),
            ("topk_ms", "{:8.2f}"), ("topk_xla_ms", "{:8.2f}"), ("topk_fallback_rows", "{:4d}"),
            ("indexer_ms", "{:9.1f}"), ("indexer_fp8_ms", "{:9.1f}"), ("indexer_fp8_scores_ms", "{:9.1f}"),
            ("indexer_fp8_fp32sum_ms", "{:9.1f}"),
            ("sparse_tflops", "{:8.1f}"), ("sparse_layer_ms", "{:9.1f}"), ("sparse_layer_extrapolated_ms", "{:9.1f}"),
            ("sparse_pallas_tflops", "{:8.1f}"), ("sparse_split_slots_tflops", "{:8.1f}"),
            ("decode_us", "{:8.0f}"), ("decode_pallas_us", "{:8.0f}"), ("decode_split_slots_us", "{:8.0f}"),
            ("dsa_ms", "{:9.1f}"), ("dsa_fp8_ms", "{:9.1f}"), ("dense_ms", "{:9.1f}"),
            ("dsa_step_steady_ms", "{:9.1f}"), ("dense_steady_ms", "{:9.1f}"), ("dsa_steady_speedup", "{:6.2f}")]
    print(" ".join(f"{c:>18s}" for c, _ in cols))
    for r in results:
        print(" ".join(f"{(fmt.format(r[c]) if c in r else 'n/a'):>18s}" for c, fmt in cols))


if __name__ == "__main__":
    main()
