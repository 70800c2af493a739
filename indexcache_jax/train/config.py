"""The training job's configuration: one YAML file (model, data, optimiser, schedule, stage, IndexCache pattern,
checkpointing, logging), typed and validated like the model config, with `--set a.b=value` overrides.

    model: {...}                # as in configs/tiny.yaml, or
    init_from: path/to/ckpt     # start from a checkpoint (ours or HF); its config is the model
    indexcache: {pattern: FSSS...}
    stage: indexcache           # dense | dense_warmup | sparse | indexcache
    steps: 200
    data: {...}  optim: {...}  checkpoint: {...}  log: {...}
    kernels: {sparse_backward: pallas, backward_d_s_bytes: 268435456}   # optional: pallas_kernels.dispatch.Kernels
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Literal, Optional

import yaml

from indexcache_jax.config import Config, IndexCacheConfig, ModelConfig
from indexcache_jax.configlib import ConfigError, check, from_mapping, read_yaml, to_mapping
from pallas_kernels.dispatch import Kernels

Stage = Literal["dense", "dense_warmup", "sparse", "indexcache"]
PASSKEY_MIN_SEQ_LEN = 80  # the needle, the question and the answer of data.passkey_document


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. `source`: "embedded" (the shipped default: Python standard-library sources of the
    running interpreter mixed with synthetic passkey-retrieval documents), "text" (UTF-8 files in `paths`, byte-level
    tokens, or the local HuggingFace `tokenizer.json` given as `tokenizer`) or "tokens" (flat binary token files in
    `paths`, `token_dtype`)."""

    source: Literal["embedded", "text", "tokens"] = "embedded"
    paths: tuple[str, ...] = ()
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0
    eval_fraction: float = 0.05
    embedded_bytes: int = 2_000_000  # how much of the standard library the embedded corpus takes
    passkey_fraction: float = 0.2  # share of embedded sequences that are passkey-retrieval documents
    tokenizer: Optional[str] = None  # source "text": a local tokenizer.json (the `tokenizers` library); else bytes

    def validate(self, where: str = "data") -> None:
        check(self.seq_len >= 2, f"{where}.seq_len", f"must be >= 2, got {self.seq_len}")
        check(self.batch_size >= 1, f"{where}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(0 < self.eval_fraction < 1, f"{where}.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        check(0 <= self.passkey_fraction < 1, f"{where}.passkey_fraction",
              f"must be in [0, 1), got {self.passkey_fraction}")
        check(self.embedded_bytes > 0, f"{where}.embedded_bytes", "must be > 0")
        if self.source == "embedded":
            check(not self.paths, f"{where}.paths", "must be empty for source 'embedded'")
            check(self.passkey_fraction == 0 or self.seq_len >= PASSKEY_MIN_SEQ_LEN, f"{where}.seq_len",
                  f"passkey documents need seq_len >= {PASSKEY_MIN_SEQ_LEN} (or data.passkey_fraction: 0), "
                  f"got {self.seq_len}")
        else:
            check(bool(self.paths), f"{where}.paths", f"source {self.source!r} needs at least one path")
            missing = [p for p in self.paths if not pathlib.Path(p).is_file()]
            check(not missing, f"{where}.paths", f"file(s) not found: {missing}")
        if self.tokenizer is not None:
            check(self.source == "text", f"{where}.tokenizer",
                  f"applies to source 'text' only (source is {self.source!r})")
            check(pathlib.Path(self.tokenizer).is_file(), f"{where}.tokenizer", f"{self.tokenizer} does not exist")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to lr * min_lr_ratio, global-norm clipping, and separate
    learning rate / weight decay for the indexer parameters."""

    lr: float = 3e-3
    indexer_lr: Optional[float] = None  # default: lr
    weight_decay: float = 0.01
    indexer_weight_decay: Optional[float] = None  # default: weight_decay
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    indexer_loss_weight: float = 1.0  # sparse / indexcache stages: loss = LM + weight * indexer distillation

    def validate(self, where: str = "optim") -> None:
        for name in ("lr", "indexer_lr"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{where}.{name}", f"must be > 0, got {value}")
        check(self.clip_norm > 0, f"{where}.clip_norm", f"must be > 0, got {self.clip_norm}")
        check(self.warmup_steps >= 0, f"{where}.warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, f"{where}.min_lr_ratio", "must be in [0, 1]")
        check(self.grad_accum >= 1, f"{where}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.indexer_loss_weight >= 0, f"{where}.indexer_loss_weight",
              f"must be >= 0, got {self.indexer_loss_weight}")
        check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{where}.b1", "b1 and b2 must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    directory: str = "runs/tiny"
    every_steps: int = 50
    keep: int = 3

    def validate(self, where: str = "checkpoint") -> None:
        check(self.every_steps >= 1, f"{where}.every_steps", "must be >= 1")
        check(self.keep >= 1, f"{where}.keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10
    eval_every_steps: int = 50
    eval_batches: int = 4
    progress: bool = True

    def validate(self, where: str = "log") -> None:
        for name in ("every_steps", "eval_every_steps", "eval_batches"):
            check(getattr(self, name) >= 1, f"{where}.{name}", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: Stage
    steps: int
    model: Optional[ModelConfig] = None
    init_from: Optional[str] = None
    indexcache: IndexCacheConfig = IndexCacheConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    # The kernels the job runs and their memory bounds (the implementation too: the CLI's --impl overrides it)
    kernels: Kernels = Kernels()
    # What the backward pass keeps: "none" (every activation), "layer" (each layer's inputs, top-k indices and
    # sparse distillation target, the rest recomputed; what long contexts need to fit in memory:
    # indexcache_jax/model.py, docs/BENCHMARKS.md) or "layer_keep_attention" (also each layer's attention output:
    # more memory, one attention forward fewer)
    remat: Literal["none", "layer", "layer_keep_attention"] = "none"
    # Queries per chunk of each layer's per-token part (0: all at once): bounds the per-head activations of one
    # layer by the chunk instead of the sequence, for one more forward pass of that part (indexcache_jax/model.py)
    query_chunk: int = 0
    seed: int = 0

    def validate(self, where: str = "") -> None:
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.query_chunk >= 0, "query_chunk", f"must be >= 0 (0: all queries at once), got {self.query_chunk}")
        check((self.model is None) != (self.init_from is None), "model",
              "give exactly one of model (a fresh model) and init_from (a checkpoint path)")
        if self.init_from is not None:
            check(pathlib.Path(self.init_from).exists(), "init_from", f"{self.init_from} does not exist")
        if self.stage == "indexcache":
            check(self.indexcache.pattern is not None or self.indexcache.retention is not None, "indexcache",
                  "stage 'indexcache' trains a Shared/Full pattern: give indexcache.pattern or .retention")
        else:
            shared = (self.indexcache.pattern is not None and "S" in self.indexcache.pattern.upper()) or (
                self.indexcache.retention is not None and self.indexcache.retention < 1)
            check(not shared, "indexcache",
                  f"stage {self.stage!r} trains every layer's indexer on its own layer (all Full); a pattern with "
                  f"Shared layers is stage 'indexcache'")
        if self.model is not None:
            Config(model=self.model, indexcache=self.indexcache).validate()
            check(self.data.source != "embedded" or self.model.vocab_size >= 256, "model.vocab_size",
                  f"byte-level tokens need vocab_size >= 256, got {self.model.vocab_size}")

    def model_config(self, model: ModelConfig) -> Config:
        config = Config(model=model, indexcache=self.indexcache)
        config.validate()
        return config


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` strings (value parsed as YAML) applied to a nested mapping; errors name the override."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a mapping")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_train_config(path: str | pathlib.Path, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Load, override and validate a job file; errors name the file and the field."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        return from_mapping(TrainConfig, data, "")
    except ValueError as err:  # ConfigError, or the ValueError of a section that validates itself (kernels)
        raise ConfigError(f"{path}: {err}") from err


def dump_train_config(config: TrainConfig) -> str:
    return yaml.safe_dump(to_mapping(config), sort_keys=False)
