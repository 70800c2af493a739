"""Time the backward kernels (training) on the GPU against autodiff of the XLA references, at DeepSeek-V3.2 shapes.

  sparse   forward + backward of sparse MLA for `--sparse-queries` queries x 2048 slots (128 heads, latent 512 + 64)
           over a context of S keys; bf16. TFLOP/s over the backward's matmul FLOPs, 2·H·K·(3·576 + 2·512) per query
           (logits recomputed, dP, d_q, d_kv's key and value parts): the default (the Gluon kernels where they run:
           d_kv, which also stores dS, then d_q from dS), `pallas` (both Pallas kernels, which recompute the logits
           and dP for d_q too), and the Pallas tile variants of `--sweep`.
  scores   forward, and the gradient function, of the indexer scores (64 heads x 128) for T = S causal queries;
           bf16. The kernels' gradient function is their backward alone (XLA drops the unused forward): the
           default (Gluon on Hopper) and the Pallas one, with the relative difference of the two; TFLOP/s over the
           backward's matmul FLOPs on the visible pairs, 4 dots of 2·G·I each (logits recomputed by both kernels,
           d_q, d_k). The reference's gradient function keeps the [T, S, G] logits of its forward, so it runs only
           up to `--reference-max`.
  slots    forward, and the gradient function, of the indexer scores over each query's selected slots (what the
           sparse stage's distillation loss trains through; 64 heads x 128, K = 2048, T = S causal queries, each
           slot set a random K-subset of the visible keys in ascending order, as the top-k gives; bf16): the kernels
           (`indexer_slots`: the default, Gluon on Hopper, and the Pallas ones) against autodiff of the plain-JAX
           reference, with XLA's temporary bytes of each gradient function and each one's error against the
           float32 reference (up to `--reference-max`).
  distribution
           the sparse stages' distillation target, the head-averaged attention distribution over each query's
           slots (128 heads, latent 512 + 64, K = 2048, T = S causal queries with `slots`' selection; bf16): the
           kernels (`sparse_distribution`: the default, Gluon on Hopper, and the Pallas kernel) given the forward's
           lse, the Pallas kernel computing its own, and the plain-JAX reference, with each one's error against the
           float32 reference (up to `--reference-max`); TFLOP/s over the logits' FLOPs, 2·H·576 per valid slot;
           `--distribution-sweep` adds both Gluon program shapes and Pallas tile variants.
Median of `--repeats` samples after a warm-up (`bench_kernels.timed`); random normal inputs and cotangents.

    python scripts/bench_backward.py --contexts 32768 131072 --scores-lengths 4096 8192 --slot-lengths 4096 16384 \
        --distribution-lengths 4096 16384
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench_kernels import rel_err, timed  # noqa: E402
from pallas_kernels.indexer import indexer_scores_trainable, resolve_backward_kernel as resolve_scores_backward  # noqa: E402,E501
from pallas_kernels.indexer_reference import indexer_scores_reference, indexer_slot_scores_reference  # noqa: E402
from pallas_kernels.indexer_slots import indexer_slot_scores_trainable  # noqa: E402
from pallas_kernels.sparse_attention import Tiles, resolve_backward_kernel, sparse_mla_pallas  # noqa: E402
from pallas_kernels.sparse_attention_reference import (sparse_attention_distribution_reference,  # noqa: E402
                                                       sparse_mla_reference)
from pallas_kernels.sparse_distribution import GLUON_SHAPES, sparse_attention_distribution_pallas  # noqa: E402

G, I, K, H, R, P = 64, 128, 2048, 128, 512, 64
BF16 = jnp.bfloat16


def grad_fn(forward):
    """(inputs..., cotangent) -> gradients of <forward(inputs), cotangent>, jitted."""
    def loss(*args):
        *inputs, cotangent = args
        return jnp.sum(forward(*inputs).astype(jnp.float32) * cotangent)
    return jax.jit(lambda *args: jax.grad(loss, argnums=tuple(range(len(args) - 1)))(*args))


def bench_sparse(s: int, args) -> dict:
    keys = jax.random.split(jax.random.key(s), 4)
    nq = args.sparse_queries
    q = jax.random.normal(keys[0], (1, nq, H, R + P), BF16)
    kv = jax.random.normal(keys[1], (1, s, R + P), BF16)
    # Neighbouring queries of a real prefill share most of their selection: draw each query's slots from a window
    # of 4K keys around its position (unique, sorted), so the scatter into d_kv collides as it would in training.
    centre = jnp.linspace(2 * K, s - 1, nq).astype(jnp.int32)[:, None]  # centre - window >= 0: no repeats
    window = jax.vmap(lambda kk: jax.random.permutation(kk, 2 * K)[:K])(jax.random.split(keys[2], nq))
    idx = jnp.sort(jnp.clip(centre - window, 0, s - 1), axis=-1)[None].astype(jnp.int32)
    d_out = jax.random.normal(keys[3], (1, nq, H, R), jnp.float32)
    flops = 2.0 * nq * H * K * (3 * (R + P) + 2 * R)
    out = {"context": s, "queries": nq}
    out["backward_kernels"] = resolve_backward_kernel("auto", False, BF16, R, P)
    variants = [("default", Tiles()), ("pallas", Tiles(backward_kernel="pallas"))] + [
        (f"bk{bk}_bh{bh}_w{w}", Tiles(backward_block_k=bk, backward_block_h=bh, backward_num_warps=w,
                                      backward_kernel="pallas"))
        for bk, bh, w in ((16, 16, 4), (32, 16, 4), (64, 16, 4), (32, 32, 4), (64, 32, 4), (32, 32, 8), (64, 16, 8),
                          (32, 64, 8))] * args.sweep
    forward_only = jax.jit(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=0.07, value_dim=R))
    t_fwd = timed(forward_only, q, kv, repeats=args.repeats)
    out["forward_ms"] = t_fwd * 1e3
    for name, tiles in variants:
        fn = grad_fn(lambda q_, kv_, tiles=tiles: sparse_mla_pallas(q_, kv_, idx, scale=0.07, value_dim=R,
                                                                     tiles=tiles))
        try:
            t = timed(fn, q, kv, d_out, repeats=args.repeats) - t_fwd
            out[f"backward_ms_{name}"] = t * 1e3
            out[f"backward_tflops_{name}"] = flops / t / 1e12
        except Exception as err:  # noqa: BLE001
            out[f"backward_ms_{name}"] = f"{type(err).__name__}: {str(err)[:120]}"
    ref = grad_fn(lambda q_, kv_: sparse_mla_reference(q_, kv_, idx, scale=0.07, value_dim=R))
    out["reference_backward_ms"] = (timed(ref, q, kv, d_out, repeats=args.repeats) - t_fwd) * 1e3
    got = grad_fn(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=0.07, value_dim=R))(q, kv, d_out)
    want = ref(q.astype(jnp.float32), kv.astype(jnp.float32), d_out)
    out["rel_err_d_q"], out["rel_err_d_kv"] = (rel_err(g, w) for g, w in zip(got, want, strict=True))
    got = grad_fn(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=0.07, value_dim=R,
                                                    tiles=Tiles(backward_kernel="pallas")))(q, kv, d_out)
    out["rel_err_d_q_pallas"], out["rel_err_d_kv_pallas"] = (rel_err(g, w) for g, w in zip(got, want, strict=True))
    return out


def bench_scores(t: int, args) -> dict:
    keys = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(keys[0], (1, t, G, I), BF16)
    w = jax.random.normal(keys[1], (1, t, G), jnp.float32) * G ** -0.5
    k = jax.random.normal(keys[2], (1, t, I), BF16)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    d_scores = jax.random.normal(keys[3], (1, t, t), jnp.float32)
    pairs = t * (t + 1) / 2
    out = {"length": t, "backward_kernel": resolve_scores_backward("auto", interpret=False, dtype=BF16, heads=G,
                                                                   width=I)}
    out["forward_ms"] = timed(jax.jit(lambda *a: indexer_scores_trainable(*a, pos)), q, w, k,
                              repeats=args.repeats) * 1e3
    # "default": the kernels "auto" picks (Gluon on Hopper); "pallas": the Pallas kernels. The gradient function
    # runs the backward alone: XLA drops the forward, whose output the gradient does not need.
    grads = {label: grad_fn(lambda q_, w_, k_, kernel=kernel: indexer_scores_trainable(q_, w_, k_, pos, False, kernel))
             for label, kernel in (("default", "auto"), ("pallas", "pallas"))}
    for label, fn in grads.items():
        tg = timed(fn, q, w, k, d_scores, repeats=args.repeats)
        out[f"gradient_ms_{label}"], out[f"gradient_tflops_{label}"] = tg * 1e3, 4 * 2.0 * G * I * pairs / tg / 1e12
    got = {label: fn(q, w, k, d_scores) for label, fn in grads.items()}
    for part, g, r in zip(("d_q", "d_w", "d_k"), got["default"], got["pallas"], strict=True):
        out[f"rel_diff_default_pallas_{part}"] = rel_err(g, r)
    if t <= args.reference_max:
        # its gradient function keeps the forward: autodiff needs the [T, S, G] logits
        ref = grad_fn(lambda q_, w_, k_: indexer_scores_reference(q_, w_, k_, pos))
        out["reference_gradient_ms"] = timed(ref, q, w, k, d_scores, repeats=args.repeats) * 1e3
        with jax.default_matmul_precision("highest"):
            want = ref(q.astype(jnp.float32), w, k.astype(jnp.float32), d_scores)
        for label in grads:
            for part, g, r in zip(("d_q", "d_w", "d_k"), got[label], want, strict=True):
                out[f"rel_err_{label}_{part}"] = rel_err(g, r)
    return out


def causal_selection(key, t: int, slots: int):
    """int32[1, t, slots]: for query i a random min(slots, i + 1)-subset of keys 0..i, ascending, then -1."""
    visible = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    values, ids = jax.lax.top_k(jnp.where(visible, jax.random.uniform(key, (t, t)), -1.0), slots)
    ids = jnp.sort(jnp.where(values >= 0, ids, t), axis=-1)
    return jnp.where(ids == t, -1, ids).astype(jnp.int32)[None]


def bench_slots(t: int, args) -> dict:
    keys = jax.random.split(jax.random.key(t), 5)
    q = jax.random.normal(keys[0], (1, t, G, I), BF16)
    w = jax.random.normal(keys[1], (1, t, G), jnp.float32) * G ** -0.5
    k = jax.random.normal(keys[2], (1, t, I), BF16)
    idx = causal_selection(keys[3], t, K)
    d_scores = jax.random.normal(keys[4], idx.shape, jnp.float32)
    out = {"length": t, "slots": K}
    forms = {"kernel": lambda q_, w_, k_: indexer_slot_scores_trainable(q_, w_, k_, idx),  # the default
             "pallas": lambda q_, w_, k_: indexer_slot_scores_trainable(q_, w_, k_, idx, False, "pallas"),
             "reference": lambda q_, w_, k_: indexer_slot_scores_reference(q_, w_, k_, idx)}
    grads = {}
    for name, forward in forms.items():
        if name == "reference" and t > args.reference_max:
            continue
        out[f"{name}_forward_ms"] = timed(jax.jit(forward), q, w, k, repeats=args.repeats) * 1e3
        grads[name] = grad_fn(forward)
        # the gradient function alone: the kernels' backward does not need their forward's output, so XLA drops it
        out[f"{name}_gradient_ms"] = timed(grads[name], q, w, k, d_scores, repeats=args.repeats) * 1e3
        compiled = grads[name].lower(q, w, k, d_scores).compile()
        out[f"{name}_temp_gb"] = compiled.memory_analysis().temp_size_in_bytes / 1e9
    out["forward_tflops"] = 2.0 * t * K * G * I / out["kernel_forward_ms"] / 1e9
    if t <= args.reference_max:
        with jax.default_matmul_precision("highest"):
            want = grads["reference"](q.astype(jnp.float32), w, k.astype(jnp.float32), d_scores)
        for name, grad in grads.items():
            for part, g, r in zip(("d_q", "d_w", "d_k"), grad(q, w, k, d_scores), want, strict=True):
                out[f"{name}_rel_err_{part}"] = rel_err(g, r)
    return out


DISTRIBUTION_TILES = [(64, 64, 4), (128, 64, 8)]  # the Pallas kernel's (heads, slots, warps): session 28's best two


def bench_distribution(t: int, args) -> dict:
    keys = jax.random.split(jax.random.key(t + 1), 3)
    q = jax.random.normal(keys[0], (1, t, H, R + P), BF16)
    kv = jax.random.normal(keys[1], (1, t, R + P), BF16)
    idx = causal_selection(keys[2], t, K)
    scale = (R + P) ** -0.5
    valid_slots = float(jnp.sum(idx >= 0))
    out = {"length": t, "slots": K, "heads": H, "valid_slots": valid_slots}
    attention = jax.jit(lambda q_, kv_: sparse_mla_pallas(q_, kv_, idx, scale=scale, value_dim=R, return_lse=True))
    out["attention_forward_ms"] = timed(attention, q, kv, repeats=args.repeats) * 1e3
    lse = attention(q, kv)[1]
    def kernel(**options):
        return lambda q_, kv_, lse_: sparse_attention_distribution_pallas(q_, kv_, idx, lse_, scale=scale,
                                                                          value_dim=R, **options)
    forms = {"kernel": kernel(),  # the default: Gluon where it runs
             "pallas": kernel(kernel="pallas"),
             "kernel_own_lse": lambda q_, kv_, lse_: sparse_attention_distribution_pallas(q_, kv_, idx, scale=scale,
                                                                                          value_dim=R),
             "reference": lambda q_, kv_, lse_: sparse_attention_distribution_reference(q_, kv_, idx, scale=scale)}
    if args.distribution_sweep:
        for shape in GLUON_SHAPES:
            forms[f"gluon_{shape}"] = kernel(kernel="gluon", gluon_shape=shape)
        for block_h, block_k, warps in DISTRIBUTION_TILES:
            forms[f"pallas_h{block_h}_k{block_k}_w{warps}"] = kernel(kernel="pallas", block_h=block_h,
                                                                     block_k=block_k, num_warps=warps)
    results = {}
    for name, fn in forms.items():
        if name == "reference" and t > args.reference_max:
            continue
        results[name] = jax.jit(fn)
        out[f"{name}_ms"] = timed(results[name], q, kv, lse, repeats=args.repeats) * 1e3
        out[f"{name}_tflops"] = 2.0 * valid_slots * H * (R + P) / out[f"{name}_ms"] / 1e9
    if t <= args.reference_max:
        want = jax.jit(lambda q_, kv_: sparse_attention_distribution_reference(
            q_.astype(jnp.float32), kv_.astype(jnp.float32), idx, scale=scale, block_q=16))
        with jax.default_matmul_precision("highest"):
            want = want(q, kv)
        for name, fn in results.items():
            out[f"{name}_rel_err"] = rel_err(fn(q, kv, lse), want)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument("--sparse-queries", type=int, default=1024)
    parser.add_argument("--scores-lengths", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--slot-lengths", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--distribution-lengths", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--distribution-sweep", action="store_true", help="also time the distribution kernel's tiles")
    parser.add_argument("--reference-max", type=int, default=4096)
    parser.add_argument("--sweep", action="store_true", help="also time backward tile variants of sparse MLA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    sections = [("sparse", args.contexts, bench_sparse), ("scores", args.scores_lengths, bench_scores),
                ("slots", args.slot_lengths, bench_slots),
                ("distribution", args.distribution_lengths, bench_distribution)]
    for name, lengths, bench in sections:
        results[name] = []
        for length in lengths:
            results[name].append(bench(length, args))
            print(json.dumps(results[name][-1]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
