"""The `indexcache` command line. Subcommands are thin: they parse arguments and call library functions."""

from __future__ import annotations

import argparse
import pathlib
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


def _heldout(args, vocab_size: int, part: str) -> list:
    """The calibration ("calib") or evaluation ("eval") half of the data's held-out split, as batches."""
    from indexcache_jax.evaluate import as_batches, heldout_sequences  # noqa: PLC0415
    from indexcache_jax.train.config import DataConfig  # noqa: PLC0415
    data = DataConfig(source=args.data, paths=tuple(args.paths), token_dtype=args.token_dtype, seq_len=args.seq_len,
                      seed=args.data_seed, eval_fraction=args.heldout_fraction, embedded_bytes=args.embedded_bytes,
                      passkey_fraction=args.passkey_fraction if args.data == "embedded" else 0.0)
    data.validate("data")
    return as_batches(heldout_sequences(data, vocab_size, part), args.batch_size, args.num_seqs)


def run_search(args) -> None:
    from indexcache_jax.search import full_layers_for, greedy_search  # noqa: PLC0415
    cfg, params = load_model(args.model, dtype=args.dtype)
    n = cfg.model.num_layers
    retentions = [float(r) for r in args.retain.split(",")]
    targets = {r: full_layers_for(r, n) for r in retentions}
    batches = _heldout(args, cfg.model.vocab_size, "calib")
    print(f"greedy search: {n} layers down to {min(targets.values())} Full; calibration {len(batches)} batches of "
          f"{batches[0].shape}; device {jax.devices()[0].device_kind}", flush=True)
    result = greedy_search(params, cfg.model, batches, min_full=min(targets.values()), path_file=args.out,
                           impl=args.impl, progress=lambda line: print(line, flush=True))
    print(f"{result.evaluations} loss evaluations in {result.seconds:.1f} s; path written to {args.out}")
    for r, num_full in targets.items():
        step = result.step_with(num_full)
        print(f"retention {r:g} ({num_full} Full): {step.pattern} calibration loss {step.loss:.4f}")


def _eval_pattern(args, n: int, default) -> str:
    from indexcache_jax.search import full_layers_for, load_path  # noqa: PLC0415
    if args.pattern is not None:
        return str(IndexCachePattern.parse(args.pattern, n))
    if args.retain is None:
        return str(default)
    if args.search is None:
        return str(IndexCachePattern.uniform(n, args.retain))
    try:
        return load_path(args.search)[0].pattern_with(full_layers_for(args.retain, n))
    except ValueError as err:
        raise ValueError(f"--search {args.search}: {err} (retention {args.retain})") from err


def run_eval(args) -> None:
    import json  # noqa: PLC0415
    from indexcache_jax import evaluate  # noqa: PLC0415
    cfg, params = load_model(args.model, dtype=args.dtype)
    model = cfg.model
    pattern = _eval_pattern(args, model.num_layers, cfg.pattern())
    batches = _heldout(args, model.vocab_size, "eval")
    report = {"model": str(args.model), "pattern": pattern, "device": jax.devices()[0].device_kind}
    loss = evaluate.lm_loss(params, model, batches, pattern, impl=args.impl)
    report["lm"] = {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": int(sum(b[:, 1:].size for b in batches))}
    print(f"pattern {pattern}: held-out LM loss {loss:.4f} (perplexity {np.exp(loss):.2f}) over "
          f"{report['lm']['tokens']:,} tokens")
    if args.lengths:
        tasks = evaluate.retrieval_tasks([int(x) for x in args.lengths.split(",")],
                                         [float(x) for x in args.depths.split(",")], args.per_cell, args.data_seed)
        report["retrieval"] = evaluate.retrieval_accuracy(params, model, tasks, pattern, batch_size=args.batch_size,
                                                          impl=args.impl)
        print(f"passkey retrieval: exact {report['retrieval']['accuracy']:.3f}, digits "
              f"{report['retrieval']['digit_accuracy']:.3f}")
        for cell in report["retrieval"]["cells"]:
            print(f"  length {cell['length']:5d} depth {cell['depth']:.2f}: {cell['accuracy']:.3f}")
    if args.heatmap:
        overlap = evaluate.layer_overlap(params, model, batches[:args.overlap_batches], impl=args.impl)
        report["overlap"] = overlap.tolist()
        evaluate.save_heatmap(overlap, args.heatmap, f"top-k overlap between layers ({args.model})")
        print(f"overlap heat map written to {args.heatmap}")
        print("\n".join(" ".join(f"{v:.2f}" for v in row) for row in overlap))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"report written to {args.out}")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=["embedded", "text", "tokens"], default="embedded",
                        help="held-out data source (default: the embedded corpus's held-out split)")
    parser.add_argument("--paths", nargs="*", default=[], help="files for --data text/tokens")
    parser.add_argument("--token-dtype", choices=["uint16", "uint32"], default="uint16")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-seqs", type=int, default=None, help="at most this many held-out sequences")
    parser.add_argument("--data-seed", type=int, default=0, help="the training job's data.seed (same held-out split)")
    parser.add_argument("--heldout-fraction", type=float, default=0.05, help="the training job's data.eval_fraction")
    parser.add_argument("--embedded-bytes", type=int, default=2_000_000, help="the training job's data.embedded_bytes")
    parser.add_argument("--passkey-fraction", type=float, default=0.2, help="the training job's data.passkey_fraction")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the checkpoint's dtype")
    parser.add_argument("--impl", choices=["reference", "pallas", "interpret"], default=None,
                        help="kernel implementation (default: chosen by platform)")


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

    se = sub.add_parser("search", help="training-free IndexCache: greedy Full/Shared pattern search by LM loss")
    se.add_argument("--model", required=True, help="checkpoint directory (ours or HuggingFace)")
    se.add_argument("--retain", required=True, help="retention ratio(s), e.g. 0.25 or 0.5,0.25,0.125")
    se.add_argument("--out", default="search.json", help="the search path (JSON); an existing one is resumed")
    _data_arguments(se)
    se.set_defaults(func=run_search)

    ev = sub.add_parser("eval", help="held-out LM loss, passkey retrieval and cross-layer top-k overlap")
    ev.add_argument("--model", required=True, help="checkpoint directory (ours or HuggingFace)")
    ev.add_argument("--pattern", help="IndexCache pattern (default: the checkpoint's, or see --retain)")
    ev.add_argument("--retain", type=float, help="uniform interleave at this retention, or with --search the "
                                                 "searched pattern")
    ev.add_argument("--search", help="a search path JSON (indexcache search --out)")
    ev.add_argument("--lengths", default="", help="passkey document lengths, e.g. 128,256 (empty: skip)")
    ev.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths")
    ev.add_argument("--per-cell", type=int, default=8, help="documents per (length, depth)")
    ev.add_argument("--heatmap", help="write the all-Full model's cross-layer overlap heat map (PNG) here")
    ev.add_argument("--overlap-batches", type=int, default=4)
    ev.add_argument("--out", help="write the report as JSON here")
    _data_arguments(ev)
    ev.set_defaults(func=run_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "batch_size", "seq_len", "per_cell", "overlap_batches"):
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
