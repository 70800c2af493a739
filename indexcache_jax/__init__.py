"""indexcache-jax: DeepSeek Sparse Attention with IndexCache cross-layer index reuse, in JAX/Flax NNX.

Shape legend, used in every docstring and einsum string of the package:
  B batch           T query tokens of this step     S key tokens (cache slots)     D model width
  H attention heads Q q_lora_rank                   R kv_lora_rank (latent c_kv)   P qk_rope_head_dim
  N qk_nope_head_dim V v_head_dim                   L = R + P (one cached MLA row)
  G indexer heads   I indexer head width            K top-k slots per query        V* vocabulary (logits)
  E routed experts  F expert width                  M flattened tokens (B*T)       A experts per token

Typical use:
    cfg = load_config("configs/tiny.yaml")
    params = init_params(cfg.model, seed=0)
    out = generate(params, prompts, config=cfg.model, pattern=cfg.pattern(), max_new_tokens=32)

    cfg, params = load_model("path/to/checkpoint")   # ours (Orbax) or a HuggingFace DeepSeek-V3.2 / GLM-5 directory

Training-free IndexCache and evaluation: `indexcache_jax.search.greedy_search`, `indexcache_jax.evaluate`.
"""

from indexcache_jax.cache import KVCache, LayerCache, init_cache
from indexcache_jax.checkpoint import load_model, save_model
from indexcache_jax.config import Config, IndexCacheConfig, ModelConfig, MoEConfig, RopeScaling, load_config
from indexcache_jax.configlib import ConfigError
from indexcache_jax.inference import Generation, decode_step, generate, prefill
from indexcache_jax.model import (DSATransformer, bind, forward, forward_with_indexer_loss, init_params, layer_indices,
                                  model_graphdef, pattern_flags, training_losses)
from indexcache_jax.pattern import IndexCachePattern

__all__ = [
    "Config", "ConfigError", "DSATransformer", "Generation", "IndexCacheConfig", "IndexCachePattern", "KVCache",
    "LayerCache", "ModelConfig", "MoEConfig", "RopeScaling", "bind", "decode_step", "forward",
    "forward_with_indexer_loss", "generate", "init_cache", "init_params", "layer_indices", "load_config",
    "load_model", "model_graphdef", "pattern_flags", "prefill", "save_model", "training_losses",
]
