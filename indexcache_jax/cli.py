"""The `indexcache` command line. Subcommands are thin: they parse arguments and call library functions."""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.cache import init_cache
from indexcache_jax.checkpoint import load_model, save_model
from indexcache_jax.config import load_config
from indexcache_jax.configlib import ConfigError
from indexcache_jax.inference import decode_step, generate, prefill
from indexcache_jax.model import init_params
from indexcache_jax.pattern import IndexCachePattern


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def run_generate(args) -> None:
    """A model (a checkpoint by path, or random weights from a config): prefill + decode with timings, then one
    generate() call."""
    if (args.config is None) == (args.model is None):
        raise ValueError("give exactly one of --config (random weights) or --model (a checkpoint path)")
    start = time.perf_counter()
    if args.model is not None:
        cfg, params = load_model(args.model, dtype=args.dtype)
        source = f"loaded from {args.model}"
    else:
        cfg = load_config(args.config)
        params = init_params(cfg.model, args.seed)
        source = f"random (seed {args.seed})"
    params = jax.block_until_ready(params)
    model_cfg = cfg.model
    pattern = IndexCachePattern.parse(args.pattern, model_cfg.num_layers) if args.pattern else cfg.pattern()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model: {model_cfg.num_layers} layers, width {model_cfg.hidden_size}, {model_cfg.num_heads} heads, "
          f"index_topk {model_cfg.index_topk}, {'MoE' if model_cfg.moe else 'dense FFN'}, dtype {model_cfg.dtype}")
    print(f"IndexCache pattern: {pattern} (retention {pattern.retention:.3f})")
    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"weights: {source}, {num_params:,} parameters in {time.perf_counter() - start:.2f} s")

    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, model_cfg.vocab_size, (args.batch, args.prompt_len), dtype=np.int32)
    max_len = args.prompt_len + args.new_tokens

    def prefill_once():
        return prefill(params, prompts, init_cache(model_cfg, args.batch, max_len), pattern, config=model_cfg,
                       impl=args.impl)

    (_, _), first = _timed(prefill_once)
    (logits, cache), steady = _timed(prefill_once)
    tok_s = args.batch * args.prompt_len / steady
    print(f"prefill B={args.batch} T={args.prompt_len}: first call {first:.2f} s (compile), then {steady * 1e3:.1f} ms"
          f" ({tok_s:,.0f} tokens/s)")

    token = jnp.argmax(logits, -1).astype(jnp.int32)
    (logits, cache), first = _timed(decode_step, params, token, cache, pattern, config=model_cfg, impl=args.impl)
    start = time.perf_counter()
    for _ in range(args.new_tokens - 1):
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        logits, cache = decode_step(params, token, cache, pattern, config=model_cfg, impl=args.impl)
    jax.block_until_ready(logits)
    per_step = (time.perf_counter() - start) / max(args.new_tokens - 1, 1)
    print(f"decode B={args.batch}: first call {first:.2f} s (compile), then {per_step * 1e3:.2f} ms/step "
          f"({args.batch / per_step:,.0f} tokens/s, Python loop over decode_step)")

    out, seconds = _timed(generate, params, prompts, config=model_cfg, max_new_tokens=args.new_tokens,
                          pattern=pattern, key=jax.random.key(args.seed), temperature=args.temperature,
                          top_p=args.top_p, impl=args.impl)
    print(f"generate (one jitted prefill + scan of decode steps): {seconds:.2f} s including compile")
    print(f"row 0 continuation: {np.asarray(out.tokens[0]).tolist()}")


def run_convert(args) -> None:
    """HF checkpoint -> our checkpoint (--from-hf), or any model checkpoint -> HF files (--to-hf)."""
    from indexcache_jax.hf import export_hf  # noqa: PLC0415 (keeps `generate` start-up light)
    if (args.from_hf is None) == (args.to_hf is None):
        raise ValueError("give exactly one of --from-hf PATH or --to-hf PATH")
    start = time.perf_counter()
    if args.from_hf is not None:
        cfg, params = load_model(args.from_hf, dtype=args.dtype)
        out = save_model(args.out, cfg, params, overwrite=args.overwrite)
    else:
        cfg, params = load_model(args.to_hf)
        out = export_hf(args.out, cfg, params, model_type=args.model_type, dtype=args.dtype or cfg.model.param_dtype,
                        overwrite=args.overwrite)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"wrote {out}: {num_params:,} parameters, {cfg.model.num_layers} layers, IndexCache pattern "
          f"{cfg.pattern()}, in {time.perf_counter() - start:.2f} s")


def run_train(args) -> None:
    from indexcache_jax.train import load_train_config, train  # noqa: PLC0415 (grain/optax only when training)
    config = load_train_config(args.config, args.set)
    result = train(config, args.run_dir, impl=args.impl)
    state = "stopped by SIGTERM" if result.interrupted else "done"
    print(f"{state}: step {result.step}/{config.steps}; run directory {result.run_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="indexcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="prefill + decode a model (checkpoint or random weights), with timings")
    gen.add_argument("--config", help="YAML config for a randomly initialised model (e.g. configs/tiny.yaml)")
    gen.add_argument("--model", help="checkpoint directory: ours (indexcache convert/train) or HuggingFace")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the checkpoint's dtype")
    gen.add_argument("--pattern", help="IndexCache pattern, one F/S per layer (default: the config's)")
    gen.add_argument("--batch", type=int, default=2)
    gen.add_argument("--prompt-len", type=int, default=128)
    gen.add_argument("--new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--impl", choices=["reference", "pallas", "interpret"], default=None,
                     help="kernel implementation (default: chosen by platform)")
    gen.set_defaults(func=run_generate)

    conv = sub.add_parser("convert", help="HuggingFace checkpoint <-> our Orbax checkpoint")
    conv.add_argument("--from-hf", metavar="PATH", help="a DeepSeek-V3.2 / GLM-5 HuggingFace checkpoint directory")
    conv.add_argument("--to-hf", metavar="PATH", help="a model checkpoint (ours or HF) to export as HF files")
    conv.add_argument("--out", required=True, help="directory to write (must not exist unless --overwrite)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="parameter dtype to write (default: the source's; fp8 sources load as bfloat16)")
    conv.add_argument("--model-type", choices=["deepseek_v32", "glm_moe_dsa"],
                      help="--to-hf family (default: by the model's indexer RoPE layout)")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(func=run_convert)

    tr = sub.add_parser("train", help="continued pretraining from a job file (resumes from its checkpoints)")
    tr.add_argument("--config", required=True, help="job YAML (e.g. configs/train_tiny.yaml)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field, e.g. --set optim.lr=3e-4 (repeatable; value parsed as YAML)")
    tr.add_argument("--run-dir", help="where checkpoints, config.yaml and metrics.jsonl go "
                                      "(default: checkpoint.directory)")
    tr.add_argument("--impl", choices=["reference", "pallas", "interpret"], default=None,
                    help="kernel implementation (default: chosen by platform)")
    tr.set_defaults(func=run_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens"):
        if getattr(args, name, 1) < 1:
            print(f"indexcache: error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    try:
        args.func(args)
    except (ConfigError, ValueError, NotImplementedError, FileExistsError, FileNotFoundError, RuntimeError) as err:
        print(f"indexcache: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
