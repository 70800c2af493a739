"""Model checkpoints on disk: our own format (Orbax parameters + the YAML config), and loading either that or a
HuggingFace checkpoint by path, so every entry point that takes a model accepts both.

Our layout, one directory:
    config.yaml   the full Config (model + IndexCache pattern), loadable with `load_config`
    params/       the parameter tree, written by an Orbax StandardCheckpointer
It is written under `<path>.partial` and renamed into place when complete, so a crash never leaves a directory
that looks like a checkpoint but is not one.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from typing import Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from indexcache_jax.config import Config, load_config
from indexcache_jax.configlib import ConfigError, to_mapping
from indexcache_jax.hf import is_hf_checkpoint, load_hf
from indexcache_jax.model import DSATransformer

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"


def abstract_params(config: Config) -> nnx.State:
    """The parameter tree's shapes and dtypes (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: DSATransformer(config.model, rngs=nnx.Rngs(0))))[1]


def save_model(path: str | os.PathLike, config: Config, params: nnx.State, *, overwrite: bool = False,
               extra_files: Optional[dict[str, str]] = None) -> pathlib.Path:
    """Write (config, params) as one checkpoint directory; refuses to replace an existing path unless asked.
    `extra_files` (name -> text) are written into the directory before it is committed."""
    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another path or pass overwrite=True")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / CONFIG_FILE).write_text(yaml.safe_dump(to_mapping(config), sort_keys=False))
    for name, text in (extra_files or {}).items():
        (partial / name).write_text(text)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(partial / PARAMS_DIR, nnx.to_pure_dict(params))
        checkpointer.wait_until_finished()
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
    return path


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    path = pathlib.Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def load_model(path: str | os.PathLike, *, dtype: Optional[str] = None) -> tuple[Config, nnx.State]:
    """(Config, params) from our checkpoint directory or a HuggingFace one (config.json + safetensors).
    `dtype` ("float32", "bfloat16", "float16") overrides the parameter and compute dtype."""
    path = pathlib.Path(path)
    if is_model_checkpoint(path):
        config = load_config(path / CONFIG_FILE)
        stored = abstract_params(config)
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), nnx.to_pure_dict(stored))
        with ocp.StandardCheckpointer() as checkpointer:
            _check_stored_shapes(path, checkpointer, target)
            restored = checkpointer.restore(path.absolute() / PARAMS_DIR, target)
        nnx.replace_by_pure_dict(stored, restored)
        return (config, stored) if dtype is None else with_dtype(config, stored, dtype)
    if is_hf_checkpoint(path):
        return load_hf(path, dtype=dtype)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    raise ValueError(f"{path}: not a model checkpoint: expected {CONFIG_FILE} + {PARAMS_DIR}/ (indexcache) or "
                     f"config.json + *.safetensors (HuggingFace)")


def _check_stored_shapes(path: pathlib.Path, checkpointer, target) -> None:
    """Compare the stored arrays with what config.yaml implies before reading any data, naming the differences."""
    try:
        stored = checkpointer.metadata(path.absolute() / PARAMS_DIR)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise ValueError(f"{path / PARAMS_DIR}: unreadable Orbax checkpoint ({type(err).__name__}: {err})") from err
    stored = dict(jax.tree_util.tree_leaves_with_path(getattr(stored, "item_metadata", stored)))
    wanted = dict(jax.tree_util.tree_leaves_with_path(target))
    problems = [f"{jax.tree_util.keystr(k)} missing" for k in wanted if k not in stored]
    problems += [f"{jax.tree_util.keystr(k)} not in the config" for k in stored if k not in wanted]
    problems += [f"{jax.tree_util.keystr(k)} stored {list(stored[k].shape)}, config implies {list(v.shape)}"
                 for k, v in wanted.items() if k in stored and tuple(stored[k].shape) != tuple(v.shape)]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ValueError(f"{path / PARAMS_DIR}: parameters do not match {path / CONFIG_FILE}: "
                         f"{'; '.join(problems[:6])}{more}")


def with_dtype(config: Config, params: nnx.State, dtype: str) -> tuple[Config, nnx.State]:
    """The model with parameters and compute in `dtype` (the router bias stays float32)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype: must be float32, bfloat16 or float16, got {dtype!r}")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype, param_dtype=dtype))
    target = abstract_params(config)
    cast = jax.tree.map(lambda value, like: jnp.asarray(value, like.dtype), nnx.to_pure_dict(params),
                        nnx.to_pure_dict(target))
    nnx.replace_by_pure_dict(target, cast)
    return config, target
