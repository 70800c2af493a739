"""Time a whole-sequence forward pass of a random-weight DSA model under several IndexCache patterns.

It measures what the runtime pattern buys with the *reference* kernels (XLA indexer + lax.top_k + gathered sparse
attention): one compiled function, Shared layers skipping their indexer through lax.cond. Prints a table; add
--json PATH to keep the numbers.

    python scripts/bench_patterns.py --config configs/tiny.yaml --seq 512 --batch 1
"""

import argparse
import dataclasses
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax import IndexCachePattern, bind, init_params, load_config, pattern_flags


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--retentions", default="1,0.5,0.25,0.125")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                        help="override an integer model field, e.g. --set index_topk=256")
    parser.add_argument("--json")
    args = parser.parse_args()

    cfg = load_config(args.config).model
    cfg = dataclasses.replace(cfg, **{k: int(v) for k, v in (s.split("=") for s in args.set)})
    params = init_params(cfg, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    fn = jax.jit(lambda p, t, flags: bind(cfg, p)(t, flags)[0])

    rows = []
    for retention in (float(r) for r in args.retentions.split(",")):
        pattern = IndexCachePattern.uniform(cfg.num_layers, retention)
        flags = pattern_flags(pattern, cfg)
        jax.block_until_ready(fn(params, tokens, flags))  # compile (first pattern only) and warm up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(params, tokens, flags))
            times.append(time.perf_counter() - start)
        rows.append({"pattern": str(pattern), "retention": pattern.retention,
                     "median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times)})
    base = rows[0]["median_ms"]
    device = jax.devices()[0].device_kind
    print(f"# forward, {device}, jax {jax.__version__}, {datetime.date.today()}, B={args.batch} T={args.seq}, "
          f"{cfg.num_layers} layers, D={cfg.hidden_size}, H={cfg.num_heads}, indexer {cfg.index_n_heads}x"
          f"{cfg.index_head_dim}, top-{cfg.index_topk}, dtype {cfg.dtype}, compiled once: {fn._cache_size()} "
          "executable(s)")
    print("| pattern | retention | median ms | min ms | speed-up vs all-Full |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pattern']} | {r['retention']:.3f} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
              f"{base / r['median_ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "config": dataclasses.asdict(cfg), "args": vars(args), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
