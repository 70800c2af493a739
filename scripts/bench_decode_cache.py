"""Decode-step time against the preallocated cache length (configs/tiny.yaml, batch 1, reference kernels).

Shows how the decode cost scales with max_len: the reference indexer scores every cache slot (static shapes), and
each layer's cache slice passes through the layer scan. Run: python scripts/bench_decode_cache.py
"""
import time, jax, jax.numpy as jnp, numpy as np
import indexcache_jax as ic
from indexcache_jax.inference import _decode_step
cfg = ic.load_config("configs/tiny.yaml").model
params = ic.init_params(cfg, 0)
print(f"# decode step, {jax.devices()[0].device_kind}, jax {jax.__version__}")
print("| max_len | pattern | ms/step |")
print("|---|---|---|")
for max_len in (512, 2048, 8192):
    for pat in ("FFFFFFFF", "FSSSFSSS"):
        flags = ic.pattern_flags(pat, cfg)
        cache = ic.init_cache(cfg, 1, max_len)
        _, cache = ic.prefill(params, np.ones((1, 16), np.int32), cache, pat, config=cfg)
        tok = jnp.array([3], jnp.int32)
        lg, cache = _decode_step(params, tok, cache, flags, config=cfg, impl=None); lg.block_until_ready()
        t = time.perf_counter()
        for _ in range(10):
            lg, cache = _decode_step(params, tok, cache, flags, config=cfg, impl=None)
        lg.block_until_ready()
        print(f"| {max_len} | {pat} | {(time.perf_counter()-t)/10*1e3:.2f} |")
