"""HuggingFace checkpoints of DeepSeek-V3.2 and GLM-5: load them into our parameter tree, and export ours back.

    config, params = load_hf("path/to/DeepSeek-V3.2-Exp")          # bf16 or fp8 (dequantised on load) weights
    export_hf("out/hf", config, params)                             # transformers loads it unchanged
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

from flax import nnx

from indexcache_jax.config import Config
from indexcache_jax.hf.hf_config import FAMILIES, config_from_hf, config_to_hf
from indexcache_jax.hf.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from indexcache_jax.hf.weights import CheckpointError, export_hf, load_hf_params, read_hf_config, tensor_map


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / "config.json").is_file()


def load_hf(directory: str | os.PathLike, *, dtype: Optional[str] = None) -> tuple[Config, nnx.State]:
    """(Config, params) of the HF checkpoint in `directory`. The Config carries the checkpoint's IndexCache pattern
    (GLM's indexer_types; all Full for DeepSeek). `dtype` overrides the parameter and compute dtype."""
    directory = pathlib.Path(directory)
    hf_config = read_hf_config(directory)
    config = config_from_hf(hf_config, dtype=dtype)
    return config, load_hf_params(directory, config, hf_config)


__all__ = [
    "FAMILIES", "CheckpointError", "SafetensorsError", "SafetensorsFile", "config_from_hf", "config_to_hf",
    "export_hf", "is_hf_checkpoint", "load_hf", "load_hf_params", "read_hf_config", "tensor_map",
    "write_safetensors",
]
