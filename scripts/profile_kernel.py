"""Run one Pallas kernel a few times at DeepSeek-V3.2 shapes, and nothing else, so that a profiler sees only it.

The benchmarks also run the XLA references, which make a whole-script Nsight Compute run far too long. Here each
kernel runs `--calls` times after compiling (no reference, no timing), e.g.:

    ncu -k regex:sparse_mla_backward --launch-skip 2 --launch-count 2 --section SpeedOfLight \\
        python scripts/profile_kernel.py sparse_backward --context 32768
    ncu -k regex:indexer_scores --launch-skip 1 --launch-count 1 --metrics \\
        sm__inst_executed_pipe_tensor_op_gmma.sum python scripts/profile_kernel.py scores_fp8

Kernels: scores, scores_fp8 (the indexer-scores kernel on the last `--queries` queries of the context), topk
(its two kernels on `--queries` rows of the context's length, k = 2048),
sparse (prefill forward: the default kernel, Gluon's seesaw schedule on Hopper with triton installed),
sparse_pallas (the Pallas forward, `sparse_mla`), sparse_backward (its two backward kernels, behind one forward),
decode (batch `--batch`). Inputs are random normal.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench_kernels import BF16, H, K, P, R, scores_inputs  # noqa: E402
from pallas_kernels.indexer import indexer_scores_pallas  # noqa: E402
from pallas_kernels.indexer_reference import quantize_fp8  # noqa: E402
from pallas_kernels.sparse_attention import Tiles, sparse_mla_decode_pallas, sparse_mla_pallas  # noqa: E402
from pallas_kernels.topk import topk_pallas  # noqa: E402


def kernel_call(name: str, s: int, queries: int, batch: int):
    """(jitted function, its arguments) for the kernel called `name` at context s."""
    ks = jax.random.split(jax.random.key(0), 6)
    if name in ("scores", "scores_fp8"):
        (q, w, k, pos), _ = scores_inputs(ks, s, queries)  # the benchmark's inputs: the context's last queries
        if name == "scores":
            return jax.jit(indexer_scores_pallas), (q, w, k, pos)
        q8, w8, k8, k_scale = quantize_fp8(q, w, k)
        return jax.jit(indexer_scores_pallas), (q8, w8, k8, pos, k_scale)
    if name == "topk":
        rows = jax.random.normal(ks[0], (queries, s), jnp.float32)
        return jax.jit(lambda x: topk_pallas(x, K)), (rows,)
    if name == "decode":
        q = jax.random.normal(ks[0], (batch, H, R + P), BF16)
        kv = jax.random.normal(ks[1], (batch, s, R + P), BF16)
        idx = jnp.sort(jax.random.randint(ks[2], (batch, K), 0, s), axis=-1).astype(jnp.int32)
        return jax.jit(lambda a, b, c: sparse_mla_decode_pallas(a, b, c, scale=0.07, value_dim=R)), (q, kv, idx)
    q = jax.random.normal(ks[0], (1, queries, H, R + P), BF16)
    kv = jax.random.normal(ks[1], (1, s, R + P), BF16)
    idx = jnp.sort(jax.random.randint(ks[2], (1, queries, K), 0, s), axis=-1).astype(jnp.int32)
    if name in ("sparse", "sparse_pallas"):
        tiles = Tiles(forward_kernel="pallas" if name == "sparse_pallas" else "auto")
        return jax.jit(lambda a, b, c: sparse_mla_pallas(a, b, c, scale=0.07, value_dim=R, tiles=tiles)), (q, kv, idx)
    if name == "sparse_backward":
        d_out = jax.random.normal(ks[3], (1, queries, H, R), jnp.float32)

        def loss(a, b):
            return jnp.sum(sparse_mla_pallas(a, b, idx, scale=0.07, value_dim=R).astype(jnp.float32) * d_out)
        return jax.jit(jax.grad(loss, argnums=(0, 1))), (q, kv)
    raise ValueError(f"unknown kernel {name!r}: scores, scores_fp8, topk, sparse, sparse_pallas, sparse_backward "
                     "or decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=["scores", "scores_fp8", "topk", "sparse", "sparse_pallas", "sparse_backward",
                                                     "decode"])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    fn, inputs = kernel_call(args.kernel, args.context, args.queries, args.batch)
    for _ in range(args.calls):
        jax.block_until_ready(fn(*inputs))
    print(f"ran {args.kernel} {args.calls} times at context {args.context}", flush=True)


if __name__ == "__main__":
    main()
