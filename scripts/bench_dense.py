"""Time the dense warm-up's attention kernels (`pallas_kernels/dense_attention.py`) at DeepSeek-V3.2's shapes.

For each context S: a chunk of --chunk queries ending at S (the chunk with the most keys, as `query_chunk` gives the
last one) and, with --layer, a whole causal layer as chunks; the flash forward (output + lse) and the head-averaged
distribution given that lse, per tiling in --tiles. Rates count visible (query, key) pairs only:
forward 2 x H x (N + P + V) FLOP per pair, distribution 2 x H x (N + P); with --backward the dense stage's
backward too (alone: the saved output and lse given). Where the XLA reference fits
(--reference-up-to) it is timed too, on the same chunk, and the kernels are checked against it.

    python scripts/bench_dense.py --contexts 8192 32768 131072 --json docs/bench_dense_h100_DATE.json
    python scripts/bench_dense.py --contexts 131072 --tiles default distribution=64,64,4 --backward  # one kernel's
    python scripts/bench_dense.py --contexts 32768 --forward-kernels gluon pallas  # the two forwards
    python scripts/bench_dense.py --contexts 32768 --backward --backward-kernel pallas  # the Pallas backward
    python scripts/bench_dense.py --contexts 32768 --layer --backward  # the backward over a layer's chunks too
    python scripts/bench_dense.py --contexts 131072 --distribution-kernels gluon pallas  # the two distributions

One line of JSON per measurement. `--interpret --heads 4 --contexts 128 --chunk 64` runs it on a CPU, slowly.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from bench_kernels import rel_err, timed  # noqa: E402
from pallas_kernels.dense_attention import (  # noqa: E402
    BACKWARD_TILES, DISTRIBUTION_TILES, FORWARD_TILES, dense_attention_distribution_pallas, dense_attention_pallas,
    resolve_backward_kernel, resolve_distribution_kernel, resolve_forward_kernel)
from pallas_kernels.dense_attention_reference import dense_attention_with_distribution_reference  # noqa: E402


def inputs(batch, num_q, num_keys, heads, widths, first_position, seed=0):
    """Random normal bf16 q_nope, q_rope, k_nope, k_rope, values and the positions of num_q queries."""
    n, p, v = widths
    ks = jax.random.split(jax.random.key(seed), 5)
    shapes = [(batch, num_q, heads, n), (batch, num_q, heads, p), (batch, num_keys, heads, n),
              (batch, num_keys, p), (batch, num_keys, heads, v)]
    arrays = [jax.random.normal(k, shape, jnp.bfloat16) for k, shape in zip(ks, shapes, strict=True)]
    positions = jnp.broadcast_to(first_position + jnp.arange(num_q, dtype=jnp.int32), (batch, num_q))
    return (*arrays, positions)


def visible_pairs(first_position: int, num_q: int) -> int:
    """(query, key) pairs a causal chunk sees: query t sees first_position + t + 1 keys."""
    return num_q * (first_position + 1) + num_q * (num_q - 1) // 2


def kernels(tiles: dict, scale: float, interpret: bool, forward_kernel: str = "auto", backward_kernel: str = "auto",
            distribution_kernel: str = "auto"):
    """The forward (with its backward) and the distribution, each at `tiles`' (block_q, block_k, num_warps) for it.
    The forward tiles are the Pallas forward's: given where it runs by choice (forward_kernel "pallas") or by
    necessity (interpret); "auto" and "gluon" take the Gluon forward where it runs. Likewise the backward's and the
    distribution's."""
    forward_tiles = tuple(tiles["forward"]) if forward_kernel == "pallas" or interpret else None
    backward_tiles = tuple(tiles["backward"]) if backward_kernel == "pallas" or interpret else None
    distribution_tiles = tuple(tiles["distribution"]) if distribution_kernel == "pallas" or interpret else None
    forward = jax.jit(functools.partial(dense_attention_pallas, scale=scale, return_lse=True, interpret=interpret,
                                        tiles=forward_tiles, backward_tiles=backward_tiles,
                                        forward_kernel=forward_kernel, backward_kernel=backward_kernel))
    distribution = jax.jit(functools.partial(dense_attention_distribution_pallas, scale=scale, interpret=interpret,
                                             tiles=distribution_tiles, kernel=distribution_kernel))
    return forward, distribution


KERNELS = ("forward", "backward", "distribution")


def parse_tiling(text: str, error=None) -> dict:
    """One --tiles entry -> {kernel: [block_q, block_k, num_warps]} for the three kernels (lists: the records are
    JSON). "default": each kernel's own; "B,B,W": all three; "KERNEL=B,B,W[+KERNEL=B,B,W]": those kernels, the
    others at their defaults (so a sweep of the distribution's tiles leaves the forward and backward as they run).
    A malformed entry calls error(message) (argparse's, which exits) or raises ValueError; the message names it."""
    tiling = dict(forward=list(FORWARD_TILES), backward=list(BACKWARD_TILES), distribution=list(DISTRIBUTION_TILES))

    def tile(part: str) -> list:
        numbers = part.split(",")
        if len(numbers) != 3 or not all(n.strip().isdigit() for n in numbers):
            raise ValueError(f"--tiles {text!r}: {part!r} is not block_q,block_k,num_warps (three integers)")
        return [int(n) for n in numbers]
    if text == "default":
        return tiling
    try:
        if "=" not in text:
            return {kernel: tile(text) for kernel in KERNELS}
        for assignment in text.split("+"):
            kernel, _, part = assignment.partition("=")
            if kernel not in KERNELS:
                raise ValueError(f"--tiles {text!r}: unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")
            tiling[kernel] = tile(part)
    except ValueError as err:
        if error is None:
            raise
        error(str(err))
    return tiling


# which kernel -> (its resolver, how many of `inputs`' arrays it reads: q_nope, q_rope, k_nope, k_rope[, values])
RESOLVERS = {"forward": (resolve_forward_kernel, 5), "backward": (resolve_backward_kernel, 5),
             "distribution": (resolve_distribution_kernel, 4)}


def kernel_run(x, which: str, choice: str, interpret: bool) -> str:
    """The kernel that `kernels` runs for `which` ("forward", "backward", "distribution") on inputs x, given the
    choice: "gluon" or "pallas"."""
    resolve, arrays = RESOLVERS[which]
    return resolve(choice, interpret=interpret, dtypes=[a.dtype for a in x[:arrays]],
                   widths=tuple(x[i].shape[-1] for i in (0, 1, 4)[:arrays - 2]),
                   pallas_tiling=choice == "pallas" or interpret)


def time_chunk(args, x, first: int, tiles: dict, check: bool, forward_kernel: str = "auto",
               distribution_kernel: str = "auto") -> dict:
    """The two kernels on inputs x (`inputs`) whose queries start at position `first`."""
    n, p, v = args.widths
    scale = (n + p) ** -0.5
    num_q, num_keys = x[0].shape[1], x[2].shape[1]
    forward, distribution = kernels(tiles, scale, args.interpret, forward_kernel, args.backward_kernel,
                                    distribution_kernel)
    out, lse = forward(*x)
    record = {"keys": num_keys, "queries": num_q, "first_position": first, **tiles,
              "forward_kernel": kernel_run(x, "forward", forward_kernel, args.interpret),
              "distribution_kernel": kernel_run(x, "distribution", distribution_kernel, args.interpret)}
    if check:
        dist = distribution(*x[:4], x[5], lse)
        want_out, want_dist = jax.jit(functools.partial(dense_attention_with_distribution_reference,
                                                        scale=scale))(*x)
        record.update(out_rel_err=rel_err(out, want_out), dist_rel_err=rel_err(dist, want_dist))
    pairs = visible_pairs(first, num_q)
    t_forward = timed(forward, *x, repeats=args.repeats)
    t_dist = timed(distribution, *x[:4], x[5], lse, repeats=args.repeats)
    record.update(forward_ms=round(t_forward * 1e3, 3), distribution_ms=round(t_dist * 1e3, 3),
                  forward_tflops=round(pairs * 2 * args.heads * (n + p + v) / t_forward / 1e12, 1),
                  distribution_tflops=round(pairs * 2 * args.heads * (n + p) / t_dist / 1e12, 1))
    if num_keys <= args.reference_up_to:
        reference = jax.jit(functools.partial(dense_attention_with_distribution_reference, scale=scale))
        record["reference_ms"] = round(timed(reference, *x, repeats=args.repeats) * 1e3, 3)
    if args.backward:  # the dense stage's: d_q, d_k, d_v of the output (the two backward kernels)
        d_out = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
        _, vjp = jax.vjp(lambda *a: forward(*a, x[5])[0], *x[:5])  # the forward runs here, once
        t_backward = timed(jax.jit(lambda vjp, d_out: vjp(d_out)), vjp, d_out, repeats=args.repeats)
        record.update(backward_kernel=kernel_run(x, "backward", args.backward_kernel, args.interpret),
                      backward_ms=round(t_backward * 1e3, 3),
                      backward_tflops=round(pairs * 2 * args.heads * (4 * (n + p) + 3 * v) / t_backward / 1e12, 1))
    return record


def time_layer(args, num_keys: int, tiles: dict, forward_kernel: str = "auto",
               distribution_kernel: str = "auto") -> dict:
    """A whole causal layer as the chunks `query_chunk` makes, each timed against all keys, summed."""
    n, p, v = args.widths
    num_q = min(args.chunk, num_keys)
    whole = inputs(1, num_keys, num_keys, args.heads, args.widths, 0)
    chunk_forward_ms, chunk_dist_ms, chunk_backward_ms = [], [], []
    for first in range(0, num_keys, num_q):
        x = (whole[0][:, first:first + num_q], whole[1][:, first:first + num_q], *whole[2:5],
             whole[5][:, first:first + num_q])
        chunk = time_chunk(args, x, first, tiles, check=False, forward_kernel=forward_kernel,
                           distribution_kernel=distribution_kernel)
        chunk_forward_ms.append(chunk["forward_ms"])
        chunk_dist_ms.append(chunk["distribution_ms"])
        if args.backward:
            chunk_backward_ms.append(chunk["backward_ms"])
    forward_ms, dist_ms = sum(chunk_forward_ms), sum(chunk_dist_ms)
    pairs = visible_pairs(0, num_keys)
    record = {"keys": num_keys, "whole_layer": True, "queries_per_chunk": num_q, **tiles,
              "forward_kernel": chunk["forward_kernel"], "distribution_kernel": chunk["distribution_kernel"],
              "chunk_forward_ms": chunk_forward_ms, "chunk_distribution_ms": chunk_dist_ms,
              "forward_ms": round(forward_ms, 2), "distribution_ms": round(dist_ms, 2),
              "forward_tflops": round(pairs * 2 * args.heads * (n + p + v) / forward_ms / 1e9, 1),
              "distribution_tflops": round(pairs * 2 * args.heads * (n + p) / dist_ms / 1e9, 1)}
    if args.backward:  # the dense stage's backward over the layer's chunks (the first ones see few key blocks)
        backward_ms = sum(chunk_backward_ms)
        record.update(backward_kernel=chunk["backward_kernel"], chunk_backward_ms=chunk_backward_ms,
                      backward_ms=round(backward_ms, 2),
                      backward_tflops=round(pairs * 2 * args.heads * (4 * (n + p) + 3 * v) / backward_ms / 1e9, 1))
    return record


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--chunk", type=int, default=1024, help="queries per chunk (the job's query_chunk)")
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--widths", type=int, nargs=3, default=[128, 64, 128], metavar=("N", "P", "V"))
    parser.add_argument("--tiles", nargs="+", default=["default"],
                        help="tilings to time: 'default' (each kernel's own: FORWARD_TILES, BACKWARD_TILES, "
                             "DISTRIBUTION_TILES), block_q,block_k,num_warps for all three kernels (64,64,4), or "
                             "some kernels' own with the rest at default (distribution=128,128,8+forward=64,64,4)")
    parser.add_argument("--forward-kernels", nargs="+", default=["auto"], choices=["auto", "gluon", "pallas"],
                        help="forward kernels to time (the forward tiles apply to the Pallas forward only)")
    parser.add_argument("--distribution-kernels", nargs="+", default=["auto"], choices=["auto", "gluon", "pallas"],
                        help="distribution kernels to time (the distribution tiles apply to the Pallas kernel only)")
    parser.add_argument("--layer", action="store_true", help="also time a whole causal layer as chunks")
    parser.add_argument("--reference-up-to", type=int, default=8192, help="time the XLA reference up to this S")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward", action="store_true",
                        help="also time the backward (FLOPs counted as executed: 2 x H x (4 (N + P) + 3 V) per pair)")
    parser.add_argument("--backward-kernel", default="auto", choices=["auto", "gluon", "pallas"],
                        help="the backward's kernels (the backward tiles apply to the Pallas backward only)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpreter (any platform; slow)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    tilings = [parse_tiling(text, parser.error) for text in args.tiles]
    header = {"device": str(jax.devices()[0]), "jax": jax.__version__, "date": datetime.date.today().isoformat(),
              "argv": sys.argv[1:] if argv is None else list(argv)}
    print(json.dumps(header), flush=True)
    results = []
    for num_keys in args.contexts:
        num_q = min(args.chunk, num_keys)
        x = inputs(1, num_q, num_keys, args.heads, args.widths, num_keys - num_q)
        runs = [(tiles, kernel, dist) for kernel in args.forward_kernels for dist in args.distribution_kernels
                for tiles in tilings]
        for tiles, kernel, dist in runs:
            results.append(time_chunk(args, x, num_keys - num_q, tiles, check=num_keys <= args.reference_up_to,
                                      forward_kernel=kernel, distribution_kernel=dist))
            print(json.dumps(results[-1]), flush=True)
        del x
        if args.layer:
            for tiles, kernel, dist in runs:
                results.append(time_layer(args, num_keys, tiles, kernel, dist))
                print(json.dumps(results[-1]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"header": header, "runs": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
