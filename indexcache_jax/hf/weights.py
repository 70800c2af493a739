"""HuggingFace tensor names <-> our parameter tree, in both directions, from one table.

`tensor_map` lists every tensor a checkpoint of the given shape holds and where it lives in our stacked parameter
tree. Loading and exporting both read that table, so they cannot drift apart. Two conversions cover every tensor:

  copy    same shape (norm weights, embeddings, the router bias)
  linear  a torch Linear weight [out, in] <-> ours [*in_dims, *out_dims] (transposed; per-head dims split out)

Loading streams: shard headers are read first (so missing, unknown and truncated tensors are reported before any
data is read), then shard by shard each tensor is viewed through the file's memory map, dequantised if fp8,
converted and written into its slot of one preallocated host array per parameter. Each finished parameter moves to
the device and its host array is freed, so at most one full copy of the weights exists at any time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
from typing import Iterable, Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from indexcache_jax.config import Config, ModelConfig
from indexcache_jax.hf.hf_config import config_to_hf, family_of, fp8_block_size
from indexcache_jax.hf.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # "x.weight" is stored as fp8 beside "x.weight_scale_inv" (per-block multipliers)


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, corrupt or does not match its config; the message names what."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one HF tensor lives in our tree: leaf `path`, slot `index` within the stacked leaf (layer and, for
    routed experts, expert), conversion `kind`, and for `linear` how many leading slot dims form torch's `in`."""

    path: tuple[str, ...]
    index: tuple[int, ...]
    kind: str
    in_dims: int = 1


_ATTENTION = (
    ("input_layernorm.weight", ("input_layernorm", "weight"), "copy"),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), "copy"),
    ("self_attn.q_a_proj.weight", ("self_attn", "q_a_proj"), "linear"),
    ("self_attn.q_a_layernorm.weight", ("self_attn", "q_a_layernorm", "weight"), "copy"),
    ("self_attn.q_b_proj.weight", ("self_attn", "q_b_proj"), "linear"),
    ("self_attn.kv_a_proj_with_mqa.weight", ("self_attn", "kv_a_proj_with_mqa"), "linear"),
    ("self_attn.kv_a_layernorm.weight", ("self_attn", "kv_a_layernorm", "weight"), "copy"),
    ("self_attn.kv_b_proj.weight", ("self_attn", "kv_b_proj"), "linear"),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj"), "linear2"),  # [D, H*V] <-> [H, V, D]
)
_INDEXER = (
    ("self_attn.indexer.wq_b.weight", ("indexer", "wq_b"), "linear"),
    ("self_attn.indexer.wk.weight", ("indexer", "wk"), "linear"),
    ("self_attn.indexer.k_norm.weight", ("indexer", "k_norm", "weight"), "copy"),
    ("self_attn.indexer.k_norm.bias", ("indexer", "k_norm", "bias"), "copy"),
    ("self_attn.indexer.weights_proj.weight", ("indexer", "weights_proj"), "linear"),
)
_SWIGLU = (("gate_proj.weight", "gate_proj", "linear"), ("up_proj.weight", "up_proj", "linear"),
           ("down_proj.weight", "down_proj", "linear"))


def _target(path, index, kind) -> Target:
    return Target(path=path, index=index, kind="linear" if kind.startswith("linear") else kind,
                  in_dims=2 if kind == "linear2" else 1)


def tensor_map(config: ModelConfig, indexer_layers: Optional[Iterable[int]] = None) -> dict[str, Target]:
    """Every HF tensor name of a checkpoint for `config` -> its Target. `indexer_layers`: the layers whose indexer
    weights the checkpoint holds (default: all but config.shared_only_layers)."""
    if indexer_layers is None:
        indexer_layers = set(range(config.num_layers)) - set(config.shared_only_layers)
    indexer_layers = set(indexer_layers)
    table = {"model.embed_tokens.weight": _target(("embed_tokens",), (), "copy"),
             "model.norm.weight": _target(("norm", "weight"), (), "copy")}
    if not config.tie_word_embeddings:
        table["lm_head.weight"] = _target(("lm_head",), (), "linear")
    for start, stop, ffn in config.layer_segments:
        stack = "dense_layers" if ffn == "dense" else "moe_layers"
        for layer in range(start, stop):
            prefix, slot = f"model.layers.{layer}.", (layer - start,)
            rows = list(_ATTENTION) + (list(_INDEXER) if layer in indexer_layers else [])
            if ffn == "dense":
                rows += [(f"mlp.{hf}", ("mlp", ours), kind) for hf, ours, kind in _SWIGLU]
            else:
                moe = config.moe
                rows += [("mlp.gate.weight", ("mlp", "gate"), "linear"),
                         ("mlp.gate.e_score_correction_bias", ("mlp", "e_score_correction_bias"), "copy")]
                if moe.n_shared_experts:
                    rows += [(f"mlp.shared_experts.{hf}", ("mlp", "shared_experts", ours), kind)
                             for hf, ours, kind in _SWIGLU]
                for expert in range(moe.n_routed_experts):
                    for hf, ours, kind in _SWIGLU:
                        table[f"{prefix}mlp.experts.{expert}.{hf}"] = _target(
                            (stack, "mlp", f"experts_{ours}"), (layer - start, expert), kind)
            for hf, ours, kind in rows:
                table[prefix + hf] = _target((stack, *ours), slot, kind)
    return table


# ---- conversions ---------------------------------------------------------------------------------------------

def _hf_shape(target: Target, slot_shape: tuple[int, ...]) -> tuple[int, ...]:
    if target.kind == "copy":
        return slot_shape
    return (math.prod(slot_shape[target.in_dims:]), math.prod(slot_shape[:target.in_dims]))


def to_ours(hf: np.ndarray, target: Target, slot_shape: tuple[int, ...]) -> np.ndarray:
    return hf if target.kind == "copy" else hf.T.reshape(slot_shape)


def write_slot(slot: np.ndarray, hf: np.ndarray, target: Target) -> None:
    """slot[...] = to_ours(hf), as one strided copy straight into the (contiguous) slot, no temporary."""
    if target.kind == "copy":
        slot[...] = hf
    else:
        slot.reshape(math.prod(slot.shape[:target.in_dims]), -1)[...] = hf.T


def to_hf(ours: np.ndarray, target: Target) -> np.ndarray:
    if target.kind == "copy":
        return ours
    return ours.reshape(math.prod(ours.shape[:target.in_dims]), -1).T


def dequantize_fp8(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """w[i, j] = fp8[i, j] * scale[i // block_rows, j // block_cols], in float32."""
    rows, cols = weight.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if scale.shape != want:
        raise ValueError(f"scale shape {list(scale.shape)} does not tile weight {list(weight.shape)} in blocks of "
                         f"{list(block)} (expected {list(want)})")
    full = np.repeat(np.repeat(scale.astype(np.float32), block[0], axis=0), block[1], axis=1)[:rows, :cols]
    return weight.astype(np.float32) * full


# ---- the checkpoint directory --------------------------------------------------------------------------------

def read_hf_config(directory: pathlib.Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a HuggingFace checkpoint directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _weight_map(directory: pathlib.Path) -> dict[str, str]:
    """HF tensor name -> shard file name, from the index file or the single-file checkpoint's header."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(err).__name__}: {err})") from err
        missing = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
        if missing:
            raise CheckpointError(f"{directory}: shard file(s) {missing} listed in {INDEX_FILE} are missing")
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if single.is_file():
        return {name: SINGLE_FILE for name in SafetensorsFile(single).names}
    raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def _is_ignored(name: str, config: ModelConfig) -> bool:
    """Tensors transformers also skips: multi-token-prediction layers past num_layers, cached RoPE tables."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(match and int(match.group(1)) >= config.num_layers) or name.endswith("rotary_emb.inv_freq")


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_hf_params(directory: str | os.PathLike, config: Config, hf_config: Optional[dict] = None) -> nnx.State:
    """Parameters of the HF checkpoint in `directory` as our nnx.State (in config.model.param_dtype)."""
    directory = pathlib.Path(directory)
    model = config.model
    hf_config = read_hf_config(directory) if hf_config is None else hf_config
    block = fp8_block_size(hf_config)
    weight_map = _weight_map(directory)
    table = tensor_map(model)

    stored = {n for n in weight_map if not _is_ignored(n, model)}
    scales = {n for n in stored if n.endswith(SCALE_SUFFIX)}
    unknown = (stored - scales) - set(table) | {s for s in scales if s[:-len(SCALE_SUFFIX)] not in table}
    if unknown:
        raise CheckpointError(f"{directory}: {len(unknown)} tensor(s) the config does not account for: "
                              f"{_listing(unknown)}")
    missing = set(table) - stored
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} tensor(s) the config requires are missing: "
                              f"{_listing(missing)}")
    if scales and block is None:
        raise CheckpointError(f"{directory}: weight scales ({_listing(scales, 3)}) present but config.json has no "
                              f"fp8 quantization_config")
    skipped = len([n for n in weight_map if _is_ignored(n, model)])
    if skipped:
        log.info("%s: skipping %d tensors of layers past num_layers=%d (multi-token prediction)", directory,
                 skipped, model.num_layers)

    files = {}
    for shard in sorted(set(weight_map[n] for n in stored)):
        try:
            files[shard] = SafetensorsFile(directory / shard)  # reads and checks the header only
        except SafetensorsError as err:
            raise CheckpointError(str(err)) from err
    for name in stored:
        if name not in files[weight_map[name]].names:
            raise CheckpointError(f"{directory / weight_map[name]}: {INDEX_FILE} lists tensor {name!r} in this "
                                  f"shard but the file does not hold it")

    # One host array per parameter, in its final dtype (the router bias stays float32, as in transformers).
    # Zeros are what layers without indexer weights keep (config.shared_only_layers).
    host = jax.tree.map(lambda leaf: _aligned_zeros(leaf.shape, leaf.dtype), nnx.to_pure_dict(_abstract_state(model)))
    for shard, file in files.items():
        for name in file.names:
            if name not in table:
                continue
            target = table[name]
            leaf = _get(host, target.path)
            slot_shape = leaf.shape[len(target.index):]
            value = file.read(name)
            where = f"{directory / shard}: tensor {name!r}"
            if file.dtype(name) in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
                scale_name = name + SCALE_SUFFIX
                if scale_name not in weight_map:
                    raise CheckpointError(f"{where} is fp8 but has no {scale_name!r}")
                try:
                    value = dequantize_fp8(value, files[weight_map[scale_name]].read(scale_name), block)
                except ValueError as err:
                    raise CheckpointError(f"{where}: {err}") from err
            want = _hf_shape(target, slot_shape)
            if value.shape != want:
                raise CheckpointError(f"{where} has shape {list(value.shape)}, config.json implies {list(want)}")
            write_slot(leaf[target.index], value, target)
        file.close()
    state = _abstract_state(model)
    nnx.replace_by_pure_dict(state, _to_device(host))  # in place
    return state


def _build(model: ModelConfig):
    from indexcache_jax.model import DSATransformer  # noqa: PLC0415 (local: only the shapes are needed here)
    return DSATransformer(model, rngs=nnx.Rngs(0))


def _abstract_state(model: ModelConfig) -> nnx.State:
    return nnx.split(nnx.eval_shape(lambda: _build(model)))[1]


def _aligned_zeros(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """np.zeros, but starting on a 64-byte boundary: jax's CPU backend then adopts the buffer in device_put
    instead of copying it (measured: an unaligned 512 MB bf16 array costs a second 512 MB)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _to_device(host: dict) -> dict:
    """Move each host array to the device and drop the host copy as we go (never two full copies). Each transfer
    is awaited before the next starts: device_put may copy asynchronously and holds the host array until done."""
    out = {}
    for key in list(host):
        value = host.pop(key)
        out[key] = _to_device(value) if isinstance(value, dict) else jax.device_put(value).block_until_ready()
        del value
    return out


# ---- export --------------------------------------------------------------------------------------------------

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


def export_hf(directory: str | os.PathLike, config: Config, params: nnx.State, *, model_type: Optional[str] = None,
              dtype: str = "float32", max_shard_bytes: int = 4 * 2**30, overwrite: bool = False) -> pathlib.Path:
    """Write `params` as a HuggingFace checkpoint (config.json, sharded safetensors and their index) that
    transformers loads as DeepseekV32ForCausalLM or GlmMoeDsaForCausalLM (default: the family whose indexer RoPE
    layout the model uses). GLM files carry no indexer for Shared layers, as GLM's own checkpoints do.

    Everything is written under `<directory>.partial` and renamed into place at the end, so an interrupted export
    never leaves a directory that looks complete. Holds at most one host copy of the parameters.
    """
    directory = pathlib.Path(directory)
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose another path or pass overwrite=True")
    model_type = family_of(config, model_type)
    hf_config = config_to_hf(config, model_type, dtype)
    indexer_layers = (range(config.model.num_layers) if model_type == "deepseek_v32"
                      else config.pattern().full_layers)
    table = tensor_map(config.model, indexer_layers)
    pure = nnx.to_pure_dict(params)
    host: dict[tuple[str, ...], np.ndarray] = {}

    def hf_tensor(name: str) -> np.ndarray:
        target = table[name]
        if target.path not in host:
            host[target.path] = np.asarray(_get(pure, target.path))
        value = to_hf(host[target.path][target.index], target)
        keep_fp32 = target.path[-1] == "e_score_correction_bias"  # transformers keeps it in float32
        return value.astype(np.float32 if keep_fp32 else EXPORT_DTYPES[dtype])

    def nbytes(name: str) -> int:
        target = table[name]
        leaf = _get(pure, target.path)
        return math.prod(leaf.shape[len(target.index):]) * EXPORT_DTYPES[dtype].itemsize

    shards: list[list[str]] = [[]]
    size = 0
    for name in table:
        if shards[-1] and size + nbytes(name) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(name)

    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map, total = {}, 0
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(partial / file, {name: hf_tensor(name) for name in names}, {"format": "pt"})
        weight_map.update({name: file for name in names})
    (partial / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    (partial / "config.json").write_text(json.dumps(hf_config, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(partial, directory)
    return directory
