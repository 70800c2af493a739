"""HuggingFace checkpoints: our loader and exporter against transformers' own DeepSeek-V3.2 and GLM-5 models.

Tiny models are built and randomised with transformers (torch, CPU, float32), saved with `save_pretrained` in
small shards, loaded by `load_hf`, and compared on random tokens. Logit error is max|ours - theirs| / max|theirs|:
float32 with a different summation order (our absorbed MLA, ragged MoE) gives ~1e-6, so the 1e-4 bound leaves room
for order effects only, never for a wrong weight, a wrong scale or a different top-k choice (each of those moves
the logits by > 1e-2, which the `sparsity matters` checks show).
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

from indexcache_jax import ConfigError, forward, generate, init_params
from indexcache_jax.cli import main
from indexcache_jax.hf import (CheckpointError, SafetensorsFile, config_from_hf, export_hf, load_hf, tensor_map,
                               write_safetensors)
from indexcache_jax.hf.weights import to_ours

VOCAB, BATCH, LENGTH = 97, 2, 40
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
    topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_topk=8, index_head_dim=16, index_n_heads=16,
    first_k_dense_replace=1, max_position_embeddings=128, eos_token_id=None, bos_token_id=None, pad_token_id=None)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
MODELS = {
    # DeepSeek's own YaRN settings (mscale == mscale_all_dim): softmax scale corrected, cos/sin not.
    "deepseek_v32": (transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM,
                     dict(rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
    "glm_full": (transformers.GlmMoeDsaConfig, transformers.GlmMoeDsaForCausalLM,
                 dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    # Shared layers carry no indexer; mscale != mscale_all_dim scales cos/sin as well as the softmax.
    "glm_shared": (transformers.GlmMoeDsaConfig, transformers.GlmMoeDsaForCausalLM,
                   dict(index_topk_pattern="FSFS", rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.7))),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Unit-gain random weights and non-trivial norms and router bias, so every tensor changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                         if n.endswith("e_score_correction_bias")]:
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 if "embed" not in name else noise)


def build_hf(kind: str, seed: int = 0):
    config_cls, model_cls, extra = MODELS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    randomise(model, seed)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def saved_tensors(directory: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint as transformers wrote it (per-expert names, unlike its in-memory
    state_dict, which fuses the experts)."""
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(shard))
    return out


def slots_by_hf_name(config, params) -> dict[str, tuple[np.ndarray, object]]:
    """HF tensor name -> (our slot for it, its Target), for checking loaded values one tensor at a time."""
    pure = nnx.to_pure_dict(params)
    out = {}
    for name, target in tensor_map(config.model).items():
        leaf = pure
        for key in target.path:
            leaf = leaf[key]
        out[name] = (np.asarray(leaf)[target.index], target)
    return out


def max_rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (transformers model, its save_pretrained directory, in shards of <= 40 KB)."""
    out = {}
    for seed, kind in enumerate(MODELS):
        model = build_hf(kind, seed)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path, max_shard_size="40KB")
        out[kind] = (model, path)
    return out


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_match_transformers(kind, checkpoints, tokens):
    model, path = checkpoints[kind]
    assert len(list(path.glob("*.safetensors"))) > 3  # the loader really streams several shards
    config, params = load_hf(path)
    assert config.model.param_dtype == "float32"
    expected_pattern = "FSFS" if kind == "glm_shared" else "FFFF"
    assert str(config.pattern()) == expected_pattern
    assert config.model.indexer_rope_layout == ("half_split" if kind == "deepseek_v32" else "interleaved")
    theirs = hf_logits(model, tokens)
    ours = forward(params, tokens, config.pattern(), config=config.model)
    assert max_rel(ours, theirs) < 1e-4
    # The sparsity matters: attending to every earlier token instead of the top-k moves the logits far.
    dense = forward(params, tokens, config.pattern(), config=config.model, attention="dense")
    assert max_rel(dense, theirs) > 1e-2
    if kind == "glm_shared":
        # and the pattern matters: running every indexer (their Shared layers have none: zeros) differs too
        every_indexer = dataclasses.replace(config.model, shared_only_layers=())
        assert max_rel(forward(params, tokens, "FFFF", config=every_indexer), theirs) > 1e-2


def test_greedy_generation_matches_transformers_generate(checkpoints, tokens):
    model, path = checkpoints["glm_shared"]
    config, params = load_hf(path)
    prompts, new = tokens[:, :12], 16
    with torch.no_grad():
        # An explicit all-ones mask: without one, generate() masks prompt tokens equal to pad_token_id.
        theirs = model.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                max_new_tokens=new, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[:, prompts.shape[1]:].numpy()
    ours = generate(params, prompts, config=config.model, max_new_tokens=new, pattern=config.pattern())
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)
    assert len(set(theirs.ravel().tolist())) > 4  # a real continuation, not one repeated token


@pytest.mark.parametrize("family,pattern", [("deepseek_v32", "FFFF"), ("glm_moe_dsa", "FSSF")])
def test_export_loads_in_transformers_with_the_same_logits(family, pattern, tmp_path, tokens):
    """A model made here (random, every norm perturbed) -> HF files -> transformers computes our logits; and
    loading the export back gives our parameters (GLM drops the Shared layers' indexers, as its checkpoints do)."""
    kind = "deepseek_v32" if family == "deepseek_v32" else "glm_full"
    config_cls, _, extra = MODELS[kind]
    base = config_from_hf(config_cls(**COMMON, **extra).to_dict())
    config = dataclasses.replace(base, indexcache=dataclasses.replace(base.indexcache, pattern=pattern))
    params = init_params(dataclasses.replace(config.model, initializer_range=0.15), seed=3)
    keys = iter(jax.random.split(jax.random.key(4), 100))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape, p.dtype), params)
    export_hf(tmp_path / "hf", config, params, max_shard_bytes=64 * 1024)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs_model).__name__ == {"deepseek_v32": "DeepseekV32ForCausalLM",
                                           "glm_moe_dsa": "GlmMoeDsaForCausalLM"}[family]
    ours = forward(params, tokens, pattern, config=config.model)
    assert max_rel(ours, hf_logits(theirs_model, tokens)) < 1e-4

    config_back, params_back = load_hf(tmp_path / "hf")
    assert str(config_back.pattern()) == pattern
    shared = [i for i, c in enumerate(pattern) if c == "S"]
    assert config_back.model.shared_only_layers == (tuple(shared) if family == "glm_moe_dsa" else ())
    flat_in, flat_back = dict(jax.tree_util.tree_leaves_with_path(params)), dict(
        jax.tree_util.tree_leaves_with_path(params_back))
    for path, value in flat_in.items():
        name = jax.tree_util.keystr(path)
        back = np.asarray(flat_back[path])
        if "indexer" in name and family == "glm_moe_dsa" and "moe_layers" in name:
            moe_shared = [i - 1 for i in shared]  # layer 0 is the dense stack
            keep = [i for i in range(back.shape[0]) if i not in moe_shared]
            np.testing.assert_array_equal(back[keep], np.asarray(value)[keep], err_msg=name)
            assert not back[moe_shared].any(), name
        else:
            np.testing.assert_array_equal(back, np.asarray(value), err_msg=name)


def test_bf16_checkpoint_loads_bit_exact(tmp_path, tokens):
    model_bf16 = build_hf("deepseek_v32", 0).to(torch.bfloat16)
    model_bf16.save_pretrained(tmp_path, max_shard_size="60KB")
    config, params = load_hf(tmp_path)
    assert config.model.param_dtype == "bfloat16"
    config32, params32 = load_hf(tmp_path, dtype="float32")
    state = {k: v.float().numpy() for k, v in saved_tensors(tmp_path).items()}
    as_bf16 = slots_by_hf_name(config, params)
    for name, (slot, target) in slots_by_hf_name(config32, params32).items():
        want = to_ours(state[name], target, slot.shape)
        np.testing.assert_array_equal(slot, want, err_msg=name)
        np.testing.assert_array_equal(as_bf16[name][0].astype(np.float32), want, err_msg=name)
    # float32 compute over the bf16 weights matches transformers loading the same files in float32 (not
    # model_bf16.float(): .to(bfloat16) also rounded its RoPE frequency buffer)
    theirs = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval(), tokens)
    assert max_rel(forward(params32, tokens, config=config32.model), theirs) < 1e-4


def _fp8_checkpoint(model, directory: pathlib.Path, block=(16, 16)) -> dict:
    """Save `model` the way DeepSeek's fp8 releases are stored: 2-D projection weights as float8_e4m3fn with a
    float32 `weight_scale_inv` per block (w = fp8 * scale); embeddings, norms, router and lm_head unquantised.
    Returns the dequantised float32 tensors by HF name (the ground truth)."""
    model.save_pretrained(directory / "f32")
    state, out, truth = saved_tensors(directory / "f32"), {}, {}
    shutil.rmtree(directory / "f32")
    for name, w in state.items():
        quantise = w.ndim == 2 and not any(part in name for part in ("embed_tokens", "lm_head", "mlp.gate.weight",
                                                                     "weights_proj"))
        if not quantise:
            out[name] = w.contiguous()
            truth[name] = w.float().numpy()
            continue
        rows, cols = w.shape
        pad = torch.zeros(-(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1])
        pad[:rows, :cols] = w
        blocks = pad.reshape(pad.shape[0] // block[0], block[0], pad.shape[1] // block[1], block[1])
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
        w8 = (w / full).to(torch.float8_e4m3fn)
        out[name], out[name + "_scale_inv"] = w8.contiguous(), scale.contiguous()
        truth[name] = (w8.float() * full).numpy()
    names = sorted(out)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        safetensors.torch.save_file({n: out[n] for n in part}, directory / file, metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in halves.items() for n in part}}))
    hf = model.config.to_dict()
    hf.update(dtype="bfloat16", quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                     "weight_block_size": list(block)})
    (directory / "config.json").write_text(json.dumps(hf))
    return truth


def test_fp8_block_quantised_checkpoint_dequantises_exactly(checkpoints, tmp_path, tokens):
    model, _ = checkpoints["glm_shared"]
    truth = _fp8_checkpoint(model, tmp_path)
    with SafetensorsFile(_shard_of(tmp_path, "model.layers.2.self_attn.kv_a_proj_with_mqa.weight")) as f:
        assert f.dtype("model.layers.2.self_attn.kv_a_proj_with_mqa.weight") == ml_dtypes.float8_e4m3fn
    config, params = load_hf(tmp_path, dtype="float32")
    for name, (slot, target) in slots_by_hf_name(config, params).items():
        np.testing.assert_array_equal(slot, to_ours(truth[name], target, slot.shape), err_msg=name)
    default_config, _ = load_hf(tmp_path)
    assert default_config.model.param_dtype == "bfloat16"  # fp8 checkpoints default to bf16 parameters
    (tmp_path / "dequantised").mkdir()
    safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in truth.items()},
                                tmp_path / "dequantised" / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path / "dequantised")
    dequantised = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantised").eval()
    ours = forward(params, tokens, config.pattern(), config=config.model)
    assert max_rel(ours, hf_logits(dequantised, tokens)) < 1e-4
    assert max_rel(ours, hf_logits(model, tokens)) > 1e-4  # fp8 did change the weights


# ---- bad checkpoints -------------------------------------------------------------------------------------------

@pytest.fixture
def broken_copy(checkpoints, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoints["deepseek_v32"][1], target)
    return target


def _shard_of(directory: pathlib.Path, tensor: str) -> pathlib.Path:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][tensor]


def test_truncated_shard_is_named(broken_copy):
    shard = _shard_of(broken_copy, "model.layers.2.self_attn.q_b_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated"):
        load_hf(broken_copy)


def test_missing_shard_is_named(broken_copy):
    shard = _shard_of(broken_copy, "model.layers.1.mlp.experts.3.up_proj.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*missing"):
        load_hf(broken_copy)


def test_other_model_type_is_rejected(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ConfigError, match="model_type.*'llama'"):
        load_hf(broken_copy)


def test_missing_and_unknown_tensors_are_named_and_mtp_layers_skipped(broken_copy):
    index_path = broken_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    extra_file = "model-extra.safetensors"
    extra = {"model.layers.4.eh_proj.weight": np.ones((2, 2), np.float32)}  # an MTP layer: skipped like HF does
    write_safetensors(broken_copy / extra_file, extra)
    index["weight_map"].update({name: extra_file for name in extra})
    index_path.write_text(json.dumps(index))
    load_hf(broken_copy)  # still loads

    write_safetensors(broken_copy / extra_file, {**extra, "model.layers.1.mlp.mystery.weight": np.ones(3, np.float32)})
    index["weight_map"]["model.layers.1.mlp.mystery.weight"] = extra_file
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"does not account for: model\.layers\.1\.mlp\.mystery\.weight"):
        load_hf(broken_copy)

    del index["weight_map"]["model.layers.1.mlp.mystery.weight"]
    del index["weight_map"]["model.layers.3.self_attn.indexer.wk.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.3\.self_attn\.indexer\.wk\.weight"):
        load_hf(broken_copy)


def test_wrong_shape_and_bad_config_values_are_named(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps(dict(config, v_head_dim=8)))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has shape "
                                              r"\[128, 32\], config\.json implies \[96, 32\]"):
        load_hf(broken_copy)
    for key, value, message in [("hidden_act", "gelu", "hidden_act"), ("num_key_value_heads", 1, "num_key_value"),
                                ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1.0}, "rope_type"),
                                ("mlp_layer_types", ["sparse"] * 4, "mlp_layer_types")]:
        (broken_copy / "config.json").write_text(json.dumps(dict(config, **{key: value})))
        with pytest.raises(ConfigError, match=message):
            load_hf(broken_copy)


def test_safetensors_reader_round_trips_every_float_format(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
               "bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
               "f8": rng.standard_normal((2, 7)).astype(ml_dtypes.float8_e4m3fn),
               "i64": rng.integers(0, 9, (6,))}
    write_safetensors(tmp_path / "a.safetensors", tensors)
    torch_read = safetensors.torch.load_file(tmp_path / "a.safetensors")  # the reference reader agrees
    np.testing.assert_array_equal(torch_read["bf16"].float().numpy(), tensors["bf16"].astype(np.float32))
    np.testing.assert_array_equal(torch_read["f8"].float().numpy(), tensors["f8"].astype(np.float32))
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        for name, value in tensors.items():
            np.testing.assert_array_equal(f.tensor(name), value)
            assert f.tensor(name).dtype == value.dtype


def test_cli_converts_both_ways_and_generates_from_either_format(checkpoints, tmp_path, tokens, capsys):
    model, hf_path = checkpoints["glm_shared"]
    assert main(["convert", "--from-hf", str(hf_path), "--out", str(tmp_path / "ours")]) == 0
    assert "IndexCache pattern FSFS" in capsys.readouterr().out
    for path in (tmp_path / "ours", hf_path):
        assert main(["generate", "--model", str(path), "--batch", "1", "--prompt-len", "8", "--new-tokens", "2"]) == 0
        out = capsys.readouterr().out
        assert f"loaded from {path}" in out and "IndexCache pattern: FSFS" in out
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_rel(hf_logits(exported, tokens), hf_logits(model, tokens)) < 1e-6  # same weights, same program
    assert main(["convert", "--from-hf", str(hf_path), "--out", str(tmp_path / "ours")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    config = config_from_hf(transformers.DeepseekV32Config(**COMMON).to_dict())
    params = init_params(config.model, seed=0)
    shared = dataclasses.replace(config, indexcache=dataclasses.replace(config.indexcache, pattern="FSFF"))
    with pytest.raises(ValueError, match="deepseek_v32 runs every layer's indexer; pattern FSFF"):
        export_hf(tmp_path / "a", shared, params)
    with pytest.raises(ValueError,
                       match="glm_moe_dsa's indexer RoPE layout is interleaved, this model's is half_split"):
        export_hf(tmp_path / "b", config, params, model_type="glm_moe_dsa")
    odd_eps = dataclasses.replace(config, model=dataclasses.replace(config.model, latent_norm_eps=1e-5))
    with pytest.raises(ValueError, match="latent_norm_eps=1e-05, but transformers fixes it at 1e-06"):
        export_hf(tmp_path / "c", odd_eps, params)
    assert not any(tmp_path.iterdir())  # nothing half-written
