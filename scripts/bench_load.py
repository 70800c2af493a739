"""Time HuggingFace checkpoint loading and measure its peak memory against the checkpoint's size.

Exports a randomly initialised DeepSeek-V3.2-style model (MoE, fp32 or bf16) as sharded safetensors, then loads it
with `load_hf` in a fresh subprocess and reports wall time, throughput and the peak resident memory the load added
(VmHWM after loading minus the resident memory before it). The loader's promise is at most one full copy of the
weights at a time, so the extra peak should be close to 1x the checkpoint size, not 2x.

    python scripts/bench_load.py                 # ~1.2 GB bf16 checkpoint in 256 MB shards
    python scripts/bench_load.py --experts 16    # smaller
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def child(directory: str) -> None:
    """Runs in the subprocess: load and report."""
    import jax  # noqa: PLC0415

    from indexcache_jax.hf import load_hf  # noqa: PLC0415
    jax.numpy.zeros(1).block_until_ready()  # backend initialised before the baseline
    before = _rss_bytes()
    start = time.perf_counter()
    config, params = load_hf(directory)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    num_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"seconds": seconds, "param_bytes": num_bytes, "rss_before": before, "peak_rss": peak}))


def _peak_rss_bytes() -> int:
    """VmHWM, the high-water mark of this process's own address space. Not ru_maxrss: Linux carries the parent's
    maximum over fork+exec, so a child of a parent that held the weights would report the parent's peak."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    import jax  # noqa: PLC0415

    from indexcache_jax import Config, IndexCacheConfig, init_params, load_config  # noqa: PLC0415
    from indexcache_jax.hf import export_hf  # noqa: PLC0415

    tiny = load_config(REPO / "configs/tiny.yaml").model
    model = dataclasses.replace(
        tiny, vocab_size=32000, hidden_size=2048, num_layers=4, num_heads=16, q_lora_rank=512, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, index_n_heads=16, index_head_dim=64,
        intermediate_size=4096, indexer_rope_layout="half_split", dtype=args.dtype, param_dtype=args.dtype,
        moe=dataclasses.replace(tiny.moe, n_routed_experts=args.experts, moe_intermediate_size=1024, n_group=4))
    config = Config(model=model, indexcache=IndexCacheConfig())
    with tempfile.TemporaryDirectory() as tmp:
        params = init_params(model, seed=0)
        start = time.perf_counter()
        export_hf(pathlib.Path(tmp) / "hf", config, params, dtype=args.dtype, max_shard_bytes=args.shard_mb * 2**20)
        export_seconds = time.perf_counter() - start
        files = list((pathlib.Path(tmp) / "hf").glob("*.safetensors"))
        disk = sum(f.stat().st_size for f in files)
        del params
        out = subprocess.run([sys.executable, __file__, "--child", str(pathlib.Path(tmp) / "hf")], check=True,
                             capture_output=True, text=True, cwd=REPO).stdout
        result = json.loads(out.strip().splitlines()[-1])
    extra = result["peak_rss"] - result["rss_before"]
    print(f"device: {jax.devices()[0].device_kind}; {len(files)} shards, {disk / 2**30:.2f} GiB on disk ({args.dtype})")
    print(f"export: {export_seconds:.1f} s ({disk / 2**30 / export_seconds:.2f} GiB/s)")
    print(f"load:   {result['seconds']:.1f} s ({disk / 2**30 / result['seconds']:.2f} GiB/s), "
          f"parameters {result['param_bytes'] / 2**30:.2f} GiB")
    print(f"peak resident memory added by the load: {extra / 2**30:.2f} GiB = {extra / disk:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
