"""HuggingFace `config.json` of DeepSeek-V3.2 (`deepseek_v32`) and GLM-5 (`glm_moe_dsa`) <-> our `Config`.

The two families differ where it matters to us in three ways: the indexer's RoPE layout (half-split in DeepSeek,
interleaved in GLM), GLM's per-layer `indexer_types` (its IndexCache pattern; its Shared layers carry no indexer
weights at all), and defaults. Keys a config leaves out take the transformers class defaults of its family, so we
build the model transformers would build. Settings that would change the computation and that we do not implement
(attention bias, another activation, another router) are errors that name the key, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Optional

from indexcache_jax.config import Config, IndexCacheConfig, ModelConfig, MoEConfig, RopeScaling
from indexcache_jax.configlib import ConfigError
from indexcache_jax.pattern import IndexCachePattern

FAMILIES = {
    "deepseek_v32": {"architecture": "DeepseekV32ForCausalLM", "indexer_rope_layout": "half_split"},
    "glm_moe_dsa": {"architecture": "GlmMoeDsaForCausalLM", "indexer_rope_layout": "interleaved"},
}

# transformers 5.x class defaults for the keys we read (DeepseekV32Config, and GlmMoeDsaConfig's overrides).
_DEFAULTS = {
    "deepseek_v32": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, norm_topk_prob=True,
        hidden_act="silu", max_position_embeddings=163840, initializer_range=0.02, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, index_topk=2048, index_head_dim=128,
        index_n_heads=64, first_k_dense_replace=3),
}
_DEFAULTS["glm_moe_dsa"] = dict(
    _DEFAULTS["deepseek_v32"], vocab_size=154880, hidden_size=6144, intermediate_size=12288, num_hidden_layers=78,
    num_attention_heads=64, q_lora_rank=2048, v_head_dim=256, qk_nope_head_dim=192, n_group=1, topk_group=1,
    max_position_embeddings=202752, rms_norm_eps=1e-5, index_n_heads=32)

# What transformers hard-codes and our config makes explicit.
HF_NORM_EPS = 1e-6  # q_a_layernorm, kv_a_layernorm (RMSNorm) and the indexer's k_norm (LayerNorm)


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"config.json: {key}: {message}")


def _rope(data: dict[str, Any], max_positions: int) -> tuple[float, Optional[RopeScaling]]:
    """rope_theta and YaRN settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    if data.get("rope_parameters") is not None:
        key, params = "rope_parameters", dict(data["rope_parameters"])
    else:
        key, params = "rope_scaling", dict(data.get("rope_scaling") or {})
        params.setdefault("rope_theta", data.get("rope_theta", 10000.0))
    theta = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise _fail(f"{key}.rope_type", f"only 'default' and 'yarn' are implemented, got {rope_type!r}")
    if "original_max_position_embeddings" not in params:
        raise _fail(f"{key}.original_max_position_embeddings", "required for yarn")
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or max_positions / original  # transformers' rule when factor is absent
    optional = {name: float(params[name]) for name in ("mscale", "mscale_all_dim", "attention_factor")
                if params.get(name) is not None}
    try:
        scaling = RopeScaling(factor=float(factor), original_max_position_embeddings=original,
                              beta_fast=float(params.get("beta_fast") or 32),
                              beta_slow=float(params.get("beta_slow") or 1),
                              truncate=bool(params.get("truncate", True)), **optional)
        scaling.validate(key)
    except ConfigError as err:
        raise ConfigError(f"config.json: {err}") from err
    return theta, scaling


def _pattern(model_type: str, data: dict[str, Any], num_layers: int) -> str:
    """GLM's per-layer indexer modes as our "FS..." pattern (transformers' resolution order); DeepSeek: all Full."""
    if model_type != "glm_moe_dsa":
        return "F" * num_layers
    if data.get("indexer_types") is not None:
        key, modes = "indexer_types", list(data["indexer_types"])
    elif data.get("index_topk_pattern") is not None:
        key, raw = "index_topk_pattern", data["index_topk_pattern"]
        modes = [{"F": "full", "S": "shared"}.get(c, c) for c in raw] if isinstance(raw, str) else list(raw)
    else:
        key = "index_topk_freq"
        freq, offset = max(int(data.get("index_topk_freq", 1)), 1), int(data.get("index_skip_topk_offset", 2))
        modes = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(num_layers)]
    letters = {"full": "F", "shared": "S"}
    bad = sorted({m for m in modes if m not in letters}, key=str)
    if bad:
        raise _fail(key, f"entries must be 'full' or 'shared', got {bad}")
    if len(modes) != num_layers:
        raise _fail(key, f"has {len(modes)} entries for num_hidden_layers={num_layers}")
    return "".join(letters[m] for m in modes)


def config_from_hf(data: dict[str, Any], *, dtype: Optional[str] = None) -> Config:
    """Our Config for a parsed `config.json`. `dtype` sets param and compute dtype; by default the checkpoint's own
    (`dtype`/`torch_dtype`; fp8 checkpoints are dequantised to bfloat16)."""
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise _fail("model_type", f"{model_type!r} is not a supported DSA model; supported: {sorted(FAMILIES)}")
    hf = dict(_DEFAULTS[model_type])
    hf.update({k: v for k, v in data.items() if v is not None or k in ("q_lora_rank",)})
    if hf["q_lora_rank"] is None:
        raise _fail("q_lora_rank", "null (no query compression) is not supported; DSA's indexer reads q_resid")
    for key, want in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"),
                      ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if key in hf and hf[key] != want:
            raise _fail(key, f"only {want!r} is implemented, got {hf[key]!r}")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise _fail("num_key_value_heads", f"MLA needs num_key_value_heads == num_attention_heads={heads}, "
                                           f"got {hf['num_key_value_heads']}")
    num_layers = hf["num_hidden_layers"]
    num_dense = min(hf["first_k_dense_replace"], num_layers)
    expected_mlp = ["dense"] * num_dense + ["sparse"] * (num_layers - num_dense)
    if hf.get("mlp_layer_types") is not None and list(hf["mlp_layer_types"]) != expected_mlp:
        raise _fail("mlp_layer_types", f"must be first_k_dense_replace={num_dense} 'dense' layers then 'sparse' "
                                       f"ones, got {hf['mlp_layer_types']}")
    moe = None
    if num_dense < num_layers:
        moe = MoEConfig(
            n_routed_experts=hf["n_routed_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"], n_shared_experts=hf["n_shared_experts"],
            n_group=hf["n_group"], topk_group=hf["topk_group"],
            routed_scaling_factor=float(hf["routed_scaling_factor"]), norm_topk_prob=bool(hf["norm_topk_prob"]),
            first_k_dense_replace=num_dense)
    if dtype is None:
        dtype = "bfloat16" if _fp8(data) else (hf.get("dtype") or hf.get("torch_dtype") or "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise _fail("dtype", f"must be float32, bfloat16 or float16 (or an fp8 quantization_config), got {dtype!r}")
    theta, scaling = _rope(hf, hf["max_position_embeddings"])
    pattern = _pattern(model_type, hf, num_layers)
    try:
        model = ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=num_layers, num_heads=heads,
            q_lora_rank=hf["q_lora_rank"], kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
            index_n_heads=hf["index_n_heads"], index_head_dim=hf["index_head_dim"], index_topk=hf["index_topk"],
            intermediate_size=hf["intermediate_size"], moe=moe,
            indexer_rope_layout=FAMILIES[model_type]["indexer_rope_layout"], rope_theta=theta, rope_scaling=scaling,
            rms_norm_eps=float(hf["rms_norm_eps"]), latent_norm_eps=HF_NORM_EPS, indexer_norm_eps=HF_NORM_EPS,
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=bool(hf["tie_word_embeddings"]), initializer_range=float(hf["initializer_range"]),
            dtype=dtype, param_dtype=dtype,
            shared_only_layers=tuple(i for i, letter in enumerate(pattern) if letter == "S"))
        model.validate("config.json")
        config = Config(model=model, indexcache=IndexCacheConfig(pattern=pattern))
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"config.json: {err}") from err
    except TypeError as err:  # e.g. a string where a number belongs
        raise ConfigError(f"config.json: a value has the wrong type ({err})") from err
    return config


def _fp8(data: dict[str, Any]) -> bool:
    quant = data.get("quantization_config") or {}
    return quant.get("quant_method") == "fp8"


def fp8_block_size(data: dict[str, Any]) -> Optional[tuple[int, int]]:
    """The (rows, cols) block of fp8 weight scales, or None for an unquantised checkpoint."""
    if not _fp8(data):
        quant = data.get("quantization_config")
        if quant:
            raise _fail("quantization_config.quant_method",
                        f"only 'fp8' (block-quantised) is supported, got {quant.get('quant_method')!r}")
        return None
    block = data["quantization_config"].get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _fail("quantization_config.weight_block_size", f"must be two positive integers, got {block!r}")
    return tuple(block)


def family_of(config: Config, model_type: Optional[str] = None) -> str:
    """The HF family to export to: given, or the one whose indexer RoPE layout the model uses."""
    if model_type is None:
        model_type = {v["indexer_rope_layout"]: k for k, v in FAMILIES.items()}[config.model.indexer_rope_layout]
    if model_type not in FAMILIES:
        raise ValueError(f"model_type must be one of {sorted(FAMILIES)}, got {model_type!r}")
    if FAMILIES[model_type]["indexer_rope_layout"] != config.model.indexer_rope_layout:
        raise ValueError(f"{model_type}'s indexer RoPE layout is {FAMILIES[model_type]['indexer_rope_layout']}, "
                         f"this model's is {config.model.indexer_rope_layout}: its indexer would score other keys")
    return model_type


def config_to_hf(config: Config, model_type: Optional[str] = None, dtype: str = "float32") -> dict[str, Any]:
    """`config.json` for transformers. DeepSeek-V3.2 has no IndexCache pattern, so exporting a pattern with Shared
    layers needs the GLM family; eps values transformers hard-codes must match."""
    model_type = family_of(config, model_type)
    m = config.model
    pattern: IndexCachePattern = config.pattern()
    if model_type == "deepseek_v32" and pattern.full_layers != tuple(range(m.num_layers)):
        raise ValueError(f"deepseek_v32 runs every layer's indexer; pattern {pattern} has Shared layers. Export "
                         f"an all-Full pattern, or a model with an interleaved indexer RoPE as glm_moe_dsa")
    for name in ("latent_norm_eps", "indexer_norm_eps"):
        if getattr(m, name) != HF_NORM_EPS:
            raise ValueError(f"model.{name}={getattr(m, name)}, but transformers fixes it at {HF_NORM_EPS}")
    moe = m.moe or MoEConfig(n_routed_experts=1, num_experts_per_tok=1, moe_intermediate_size=1,
                             first_k_dense_replace=m.num_layers)  # placeholders: every layer is dense
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling is not None:
        s = m.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": m.rope_theta, "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings, "beta_fast": s.beta_fast,
                "beta_slow": s.beta_slow, "truncate": s.truncate}
        rope.update({k: getattr(s, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                     if getattr(s, k) is not None})
    num_dense = m.num_dense_layers
    out = {
        "architectures": [FAMILIES[model_type]["architecture"]], "model_type": model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "moe_intermediate_size": moe.moe_intermediate_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_heads,
        "n_shared_experts": moe.n_shared_experts, "n_routed_experts": moe.n_routed_experts,
        "routed_scaling_factor": moe.routed_scaling_factor, "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank, "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
        "qk_nope_head_dim": m.qk_nope_head_dim, "n_group": moe.n_group, "topk_group": moe.topk_group,
        "num_experts_per_tok": moe.num_experts_per_tok, "norm_topk_prob": moe.norm_topk_prob,
        "hidden_act": "silu", "max_position_embeddings": m.max_position_embeddings,
        "initializer_range": m.initializer_range, "rms_norm_eps": m.rms_norm_eps,
        "tie_word_embeddings": m.tie_word_embeddings, "rope_parameters": rope, "attention_bias": False,
        "index_topk": m.index_topk, "index_head_dim": m.index_head_dim, "index_n_heads": m.index_n_heads,
        "first_k_dense_replace": num_dense,
        "mlp_layer_types": ["dense"] * num_dense + ["sparse"] * (m.num_layers - num_dense),
        "dtype": dtype,
    }
    if model_type == "glm_moe_dsa":
        out["indexer_types"] = ["full" if pattern.flags[i] else "shared" for i in range(m.num_layers)]
    return out
