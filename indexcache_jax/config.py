"""Model configuration: one frozen dataclass per concept, loaded from YAML and validated field by field.

Names follow the HuggingFace `DeepseekV32Config` / `GlmMoeDsaConfig` keys where one exists, so a checkpoint's
`config.json` maps onto these fields with few renames. Derived quantities (head dims, softmax scale, which layers are
dense) are properties, never configured.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Literal, Optional

import jax.numpy as jnp

from indexcache_jax.configlib import ConfigError, check, from_mapping, read_yaml
from indexcache_jax.pattern import IndexCachePattern

RopeLayout = Literal["half_split", "interleaved"]
DType = Literal["float32", "bfloat16", "float16"]
Fp8HeadSum = Literal["bf16", "fp32"]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """DeepSeek-V3 style mixture of experts: sigmoid router with score-correction bias, group-limited top-k."""

    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int = 1
    n_group: int = 1  # experts are split into n_group groups; tokens may only route into topk_group of them
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0  # the first k layers use the dense FFN instead of MoE

    def validate(self, where: str = "moe") -> None:
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            check(getattr(self, name) > 0, f"{where}.{name}", f"must be > 0, got {getattr(self, name)}")
        check(self.n_shared_experts >= 0, f"{where}.n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        check(self.first_k_dense_replace >= 0, f"{where}.first_k_dense_replace",
              f"must be >= 0, got {self.first_k_dense_replace}")
        check(self.n_routed_experts % self.n_group == 0, f"{where}.n_group",
              f"must divide n_routed_experts={self.n_routed_experts}, got {self.n_group}")
        check(self.topk_group <= self.n_group, f"{where}.topk_group",
              f"must be <= n_group={self.n_group}, got {self.topk_group}")
        experts_reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        check(self.num_experts_per_tok <= experts_reachable, f"{where}.num_experts_per_tok",
              f"must be <= topk_group * experts per group = {experts_reachable}, got {self.num_experts_per_tok}")
        check(self.routed_scaling_factor > 0, f"{where}.routed_scaling_factor",
              f"must be > 0, got {self.routed_scaling_factor}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (the `rope_type: yarn` block of DeepSeek-V3.x / GLM-5 configs).

    Frequencies below the [beta_slow, beta_fast] rotation band are divided by `factor`, those above are kept, and a
    linear ramp blends between (per rotated pair). Two scale corrections follow the HF / DeepSeek definition:
    cos and sin are multiplied by `attention_factor` (default mscale(factor, mscale) / mscale(factor,
    mscale_all_dim)), and the MLA softmax scale by mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set,
    where mscale(s, m) = 0.1 m ln(s) + 1 for s > 1.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True

    def validate(self, where: str = "rope_scaling") -> None:
        check(self.factor >= 1, f"{where}.factor", f"must be >= 1, got {self.factor}")
        check(self.original_max_position_embeddings > 0, f"{where}.original_max_position_embeddings",
              f"must be > 0, got {self.original_max_position_embeddings}")
        check(self.beta_fast > self.beta_slow > 0, f"{where}.beta_fast",
              f"must be > beta_slow > 0, got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}")

    @staticmethod
    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    @property
    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.mscale_of(self.factor, self.mscale) / self.mscale_of(self.factor, self.mscale_all_dim)
        return self.mscale_of(self.factor)

    @property
    def softmax_correction(self) -> float:
        """What the MLA softmax scale is multiplied by."""
        return self.mscale_of(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A DSA transformer: MLA attention + lightning indexer per layer, dense SwiGLU or MoE FFN (SPEC §1)."""

    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # N
    num_heads: int  # H, attention heads
    q_lora_rank: int  # Q, rank of the query compression (the indexer reads this q_resid too)
    kv_lora_rank: int  # R, the latent c_kv width (512 in DeepSeek-V3.2)
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # P, the rope part of q/k (64 in DeepSeek-V3.2)
    v_head_dim: int
    index_n_heads: int  # G, indexer heads (64 in DeepSeek-V3.2, 32 in GLM-5)
    index_head_dim: int  # I, indexer head width (128)
    index_topk: int  # K, tokens each query attends to (2048 in the released models)
    intermediate_size: int  # dense SwiGLU width (the first_k_dense_replace layers when moe is set)
    moe: Optional[MoEConfig] = None
    indexer_rope_layout: RopeLayout = "half_split"  # DeepSeek-V3.2: half_split; GLM-5: interleaved
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6  # the block and final RMSNorms
    latent_norm_eps: float = 1e-6  # q_a_layernorm and kv_a_layernorm (fixed at 1e-6 in DeepSeek and GLM code)
    indexer_norm_eps: float = 1e-6  # the indexer's key LayerNorm
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: DType = "float32"  # compute dtype of matmuls; norms, softmax and indexer scores stay in float32
    # Select with indexer scores computed from fp8 (e4m3) queries and keys with per-row scales, as DeepSeek-V3.2
    # serves; the indexer's training loss (log_probs) stays in the compute dtype.
    indexer_fp8: bool = False
    # With indexer_fp8, how the scores sum over heads (pallas_kernels.indexer_reference: fp8_head_sum): "bf16"
    # rounds each ReLU'd logit and weight to bf16 first (on Hopper the sum then runs on the tensor cores); "fp32"
    # sums them unrounded (the Pallas kernel, ~20% slower fp8 prefill scores on an H100, 2-9% faster decode).
    indexer_fp8_head_sum: Fp8HeadSum = "bf16"
    param_dtype: DType = "float32"
    # Layers whose checkpoint carries no indexer weights (GLM-5 drops them from its Shared layers). They hold zero
    # indexer weights here, and every pattern must keep them Shared.
    shared_only_layers: tuple[int, ...] = ()

    def validate(self, where: str = "model") -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim",
                    "index_topk", "intermediate_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            check(value > 0, f"{where}.{name}", f"must be > 0, got {value}")
        for name in ("qk_rope_head_dim",):
            check(getattr(self, name) % 2 == 0, f"{where}.{name}", f"must be even (RoPE rotates pairs), "
                  f"got {getattr(self, name)}")
        check(self.qk_rope_head_dim <= self.index_head_dim, f"{where}.index_head_dim",
              f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (the indexer ropes its first "
              f"qk_rope_head_dim dims), got {self.index_head_dim}")
        check(self.rope_theta > 0, f"{where}.rope_theta", f"must be > 0, got {self.rope_theta}")
        for name in ("rms_norm_eps", "latent_norm_eps", "indexer_norm_eps"):
            check(getattr(self, name) > 0, f"{where}.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{where}.rope_scaling")
        bad = [i for i in self.shared_only_layers if not 0 < i < self.num_layers]
        check(not bad, f"{where}.shared_only_layers",
              f"layer ids must be in [1, num_layers={self.num_layers}) (layer 0 is always Full), got {bad}")
        if self.moe is not None:
            self.moe.validate(f"{where}.moe")
            check(self.moe.first_k_dense_replace <= self.num_layers, f"{where}.moe.first_k_dense_replace",
                  f"must be <= num_layers={self.num_layers}, got {self.moe.first_k_dense_replace}")

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached MLA token: c_kv (R) followed by k_rope (P); 576 in DeepSeek-V3.2."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        correction = 1.0 if self.rope_scaling is None else self.rope_scaling.softmax_correction
        return self.qk_head_dim ** -0.5 * correction

    @property
    def num_dense_layers(self) -> int:
        """Layers [0, num_dense_layers) use the dense FFN, the rest MoE."""
        return self.num_layers if self.moe is None else self.moe.first_k_dense_replace

    @property
    def layer_segments(self) -> tuple[tuple[int, int, str], ...]:
        """Runs of layers with the same FFN kind, as (start, stop, "dense" | "moe"). Each run is one stack of
        parameters and one `lax.scan`; layers only differ in shape between runs (first_k_dense_replace)."""
        cut = self.num_dense_layers
        runs = ((0, cut, "dense"), (cut, self.num_layers, "moe"))
        return tuple(run for run in runs if run[1] > run[0])

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def topk_for(self, num_keys: int) -> int:
        """Index slots per query over `num_keys` keys: index_topk, capped by how many keys exist."""
        return min(self.index_topk, num_keys)


@dataclasses.dataclass(frozen=True)
class IndexCacheConfig:
    """Which layers run their indexer. Give `pattern` ("FSSS...", one letter per layer) or `retention`
    (fraction of Full layers, placed by uniform interleave); neither means all Full."""

    pattern: Optional[str] = None
    retention: Optional[float] = None

    def validate(self, where: str = "indexcache") -> None:
        check(self.pattern is None or self.retention is None, where,
              "give either pattern or retention, not both")
        if self.retention is not None:
            check(0 < self.retention <= 1, f"{where}.retention", f"must be in (0, 1], got {self.retention}")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole YAML file: the model and its IndexCache pattern."""

    model: ModelConfig
    indexcache: IndexCacheConfig = IndexCacheConfig()

    def validate(self, where: str = "") -> None:
        try:
            pattern = self.pattern()
        except ValueError as err:
            raise ConfigError(f"indexcache.pattern: {err}") from err
        full_without_indexer = sorted(set(self.model.shared_only_layers) & set(pattern.full_layers))
        check(not full_without_indexer, "indexcache",
              f"pattern {pattern} makes layer(s) {full_without_indexer} Full, but model.shared_only_layers says "
              f"they have no indexer weights")

    def pattern(self) -> IndexCachePattern:
        n = self.model.num_layers
        if self.indexcache.pattern is not None:
            return IndexCachePattern.parse(self.indexcache.pattern, num_layers=n)
        if self.indexcache.retention is not None:
            return IndexCachePattern.uniform(n, self.indexcache.retention)
        return IndexCachePattern.all_full(n)


def config_from_dict(data: dict[str, Any]) -> Config:
    return from_mapping(Config, data, "")


def load_config(path: str | pathlib.Path) -> Config:
    """Load and validate a YAML config; errors name the file and the field."""
    data = read_yaml(path)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
