"""Reproduce the IndexCache paper's analyses at small scale (docs/RESULTS.md).

Pipeline, every step with this library's own entry points (each skipped when its output already exists in --work,
so an interrupted run resumes):
  1. train a small DSA model with the training job: stage `dense` (LM + indexers alongside), then stage `sparse`
     (DSA, every layer Full) -> the base model;
  2. the cross-layer top-k overlap heat map of the base model;
  3. the greedy pattern search on the calibration half of the held-out split, down to the smallest retention;
  4. training-free: held-out LM loss and passkey retrieval for all-Full, and for each retention the uniform
     interleave and the searched pattern;
  5. training-aware: from the base model, stage `indexcache` with the uniform pattern of each retention, and a
     control that trains the same steps all-Full (stage `sparse`), so extra training is not mistaken for the
     effect of the distillation; each evaluated as in 4;
  6. results.json, the plots, and RESULTS.md (tables with the shapes, device, date, steps and wall times).

    python scripts/reproduce_paper.py --out docs      # the full run (on an H100: about 4.5 minutes)
    python scripts/reproduce_paper.py --config configs/train_tiny.yaml --dense-steps 20 --sparse-steps 10 \\
        --ft-steps 5 --out /tmp/repro --work /tmp/repro/work    # a CPU smoke run of the whole pipeline
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from indexcache_jax import evaluate  # noqa: E402
from indexcache_jax.checkpoint import load_model  # noqa: E402
from indexcache_jax.pattern import IndexCachePattern  # noqa: E402
from indexcache_jax.search import full_layers_for, greedy_search  # noqa: E402
from indexcache_jax.train import load_train_config, train  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_stage(args, name: str, overrides: list[str], seconds: dict) -> pathlib.Path:
    """Train one stage into WORK/name (resumes or skips if done) -> its final model directory."""
    run_dir = pathlib.Path(args.work) / name
    if (run_dir / "final").exists():
        log(f"{name}: already trained ({run_dir / 'final'})")
        return run_dir / "final"
    config = load_train_config(args.config, overrides + [f"checkpoint.directory={run_dir}"])
    log(f"{name}: stage {config.stage}, {config.steps} steps, pattern {config.indexcache.pattern or 'all Full'}")
    started = time.perf_counter()
    train(config, run_dir, impl=args.impl)
    seconds[name] = time.perf_counter() - started
    return run_dir / "final"


def stage_overrides(stage: str, steps: int, init_from: pathlib.Path | None, pattern: str | None) -> list[str]:
    out = [f"stage={stage}", f"steps={steps}", f"indexcache.pattern={pattern or 'null'}", "indexcache.retention=null"]
    if init_from is not None:
        out += ["model=null", f"init_from={init_from}", "optim.warmup_steps=10"]
    return out


def evaluate_pattern(params, model, pattern: str, batches, tasks, impl) -> dict:
    loss = evaluate.lm_loss(params, model, batches, pattern, impl=impl)
    retrieval = evaluate.retrieval_accuracy(params, model, tasks, pattern, impl=impl)
    return {"pattern": pattern, "lm_loss": loss, "retrieval": retrieval["accuracy"],
            "digit_accuracy": retrieval["digit_accuracy"], "cells": retrieval["cells"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/repro_small.yaml")
    parser.add_argument("--work", default="runs/repro", help="training runs and the search path (resumable)")
    parser.add_argument("--out", default="docs", help="RESULTS.md goes here, plots and results.json in OUT/results")
    parser.add_argument("--dense-steps", type=int, default=4000)
    parser.add_argument("--sparse-steps", type=int, default=800)
    parser.add_argument("--ft-steps", type=int, default=400, help="steps of each training-aware run and the control")
    parser.add_argument("--retentions", default="0.5,0.25,0.125")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out LM batches (of data.batch_size/2)")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--lengths", default="128,256", help="passkey lengths (the model trains at 256)")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--per-cell", type=int, default=40)
    parser.add_argument("--impl", default=None)
    args = parser.parse_args()
    out_dir = pathlib.Path(args.out)
    results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.work).mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started_all = time.perf_counter()

    # 1. the base model
    dense = run_stage(args, "dense", stage_overrides("dense", args.dense_steps, None, None), seconds)
    base_path = run_stage(args, "base", stage_overrides("sparse", args.sparse_steps, dense, None), seconds)
    base_cfg, base_params = load_model(base_path)
    model = base_cfg.model
    n = model.num_layers
    job = load_train_config(args.config)
    batch = max(1, job.data.batch_size // 2)
    calib = evaluate.as_batches(evaluate.heldout_sequences(job.data, model.vocab_size, "calib"), batch)
    calib = calib[:args.calib_batches]
    heldout = evaluate.as_batches(evaluate.heldout_sequences(job.data, model.vocab_size, "eval"), batch)
    heldout = heldout[:args.eval_batches]
    tasks = evaluate.retrieval_tasks([int(x) for x in args.lengths.split(",")],
                                     [float(x) for x in args.depths.split(",")], args.per_cell, seed=1)

    # 2. overlap
    t0 = time.perf_counter()
    overlap = evaluate.layer_overlap(base_params, model, heldout[:2], impl=args.impl)
    evaluate.save_heatmap(overlap, results_dir / "overlap.png",
                          f"top-k overlap between layers (base model, k={model.topk_for(heldout[0].shape[1] - 1)}, "
                          f"T={heldout[0].shape[1] - 1})")
    seconds["overlap"] = time.perf_counter() - t0
    log("overlap:\n" + "\n".join(" ".join(f"{v:.2f}" for v in row) for row in overlap))

    # 3. greedy search
    retentions = [float(r) for r in args.retentions.split(",")]
    t0 = time.perf_counter()
    search = greedy_search(base_params, model, calib, min_full=min(full_layers_for(r, n) for r in retentions),
                           path_file=results_dir / "search.json", impl=args.impl, progress=log)
    seconds["search"] = time.perf_counter() - t0

    # 4. training-free
    t0 = time.perf_counter()
    free = {"all_full": evaluate_pattern(base_params, model, "F" * n, heldout, tasks, args.impl)}
    for r in retentions:
        uniform = str(IndexCachePattern.uniform(n, r))
        searched = search.pattern_with(full_layers_for(r, n))
        free[f"uniform_{r:g}"] = evaluate_pattern(base_params, model, uniform, heldout, tasks, args.impl)
        free[f"searched_{r:g}"] = evaluate_pattern(base_params, model, searched, heldout, tasks, args.impl)
        log(f"training-free r={r:g}: uniform {uniform} loss {free[f'uniform_{r:g}']['lm_loss']:.4f} "
            f"retrieval {free[f'uniform_{r:g}']['retrieval']:.3f} | searched {searched} loss "
            f"{free[f'searched_{r:g}']['lm_loss']:.4f} retrieval {free[f'searched_{r:g}']['retrieval']:.3f}")
    seconds["training_free_eval"] = time.perf_counter() - t0

    # 5. training-aware, with an all-Full control of the same steps
    aware = {}
    control_path = run_stage(args, "control", stage_overrides("sparse", args.ft_steps, base_path, None), seconds)
    control_cfg, control_params = load_model(control_path)
    aware["control_all_full"] = evaluate_pattern(control_params, model, "F" * n, heldout, tasks, args.impl)
    for r in retentions:
        uniform = str(IndexCachePattern.uniform(n, r))
        aware[f"control_uniform_{r:g}"] = evaluate_pattern(control_params, model, uniform, heldout, tasks, args.impl)
        path = run_stage(args, f"indexcache_{r:g}", stage_overrides("indexcache", args.ft_steps, base_path, uniform),
                         seconds)
        params = load_model(path)[1]
        aware[f"trained_uniform_{r:g}"] = evaluate_pattern(params, model, uniform, heldout, tasks, args.impl)
        log(f"training-aware r={r:g} {uniform}: loss {aware[f'trained_uniform_{r:g}']['lm_loss']:.4f} retrieval "
            f"{aware[f'trained_uniform_{r:g}']['retrieval']:.3f} (control, training-free: loss "
            f"{aware[f'control_uniform_{r:g}']['lm_loss']:.4f} retrieval "
            f"{aware[f'control_uniform_{r:g}']['retrieval']:.3f})")
    seconds["total"] = time.perf_counter() - started_all

    results = {
        "date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
        "jax": jax.__version__, "python": sys.version.split()[0], "config": args.config,
        "steps": {"dense": args.dense_steps, "sparse": args.sparse_steps, "finetune": args.ft_steps},
        "model": {"layers": n, "hidden": model.hidden_size, "heads": model.num_heads, "index_topk": model.index_topk,
                  "index_heads": model.index_n_heads, "seq_len": job.data.seq_len,
                  "params": int(sum(x.size for x in jax.tree.leaves(base_params)))},
        "data": {"batch_size": job.data.batch_size, "calib_sequences": int(sum(len(b) for b in calib)),
                 "eval_sequences": int(sum(len(b) for b in heldout)), "retrieval_lengths": args.lengths,
                 "retrieval_depths": args.depths, "retrieval_per_cell": args.per_cell},
        "overlap": overlap.tolist(),
        "search": {"evaluations": search.evaluations, "seconds": search.seconds,
                   "path": [{"num_full": s.num_full, "pattern": s.pattern, "loss": s.loss} for s in search.steps]},
        "training_free": free, "training_aware": aware, "seconds": seconds,
        "command": " ".join(sys.argv),
    }
    (results_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, retentions, results_dir / "retention.png")
    (out_dir / "RESULTS.md").write_text(render(results, retentions))
    log(f"done in {seconds['total']:.0f} s: {out_dir / 'RESULTS.md'}")


def plot(results: dict, retentions: list[float], path: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    free, aware = results["training_free"], results["training_aware"]
    series = {
        "uniform (training-free)": [free[f"uniform_{r:g}"] for r in retentions],
        "searched (training-free)": [free[f"searched_{r:g}"] for r in retentions],
        "uniform + IndexCache training": [aware[f"trained_uniform_{r:g}"] for r in retentions],
        "uniform, control model (training-free)": [aware[f"control_uniform_{r:g}"] for r in retentions],
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "lm_loss", "held-out LM loss"), (axes[1], "retrieval", "passkey exact match")):
        for name, rows in series.items():
            ax.plot(retentions, [row[key] for row in rows], marker="o", label=name)
        ax.axhline(free["all_full"][key], color="black", linestyle="--", label="all Full (base)")
        ax.axhline(aware["control_all_full"][key], color="gray", linestyle=":", label="all Full (control)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(retentions, [f"1/{round(1 / r)}" for r in retentions])
        ax.set_xlabel("retention (Full layers / layers)")
        ax.set_title(label)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict, retentions: list[float]) -> str:
    m, free, aware = results["model"], results["training_free"], results["training_aware"]

    lengths = sorted({c["length"] for c in free["all_full"]["cells"]})

    def row(name, entry):
        by_length = [np.mean([c["accuracy"] for c in entry["cells"] if c["length"] == n]) for n in lengths]
        return f"| {name} | `{entry['pattern']}` | {entry['lm_loss']:.4f} | {entry['retrieval']:.3f} | " + \
            " | ".join(f"{a:.3f}" for a in by_length) + f" | {entry['digit_accuracy']:.3f} |"

    header = ("| configuration | pattern | held-out LM loss | passkey exact | "
              + " | ".join(f"exact @{n}" for n in lengths) + " | passkey digits |")
    rule = "|---" * (5 + len(lengths)) + "|"

    lines = [
        "# Results: the IndexCache paper's analyses at small scale",
        "",
        f"Generated by `{results['command']}` on {results['device']} ({results['date']}, jax {results['jax']}, "
        f"Python {results['python']}). Numbers are what this run measured; nothing is edited by hand.",
        "",
        "## Setup",
        f"- Model: {m['layers']} layers, width {m['hidden']}, {m['heads']} MLA heads, indexer {m['index_heads']} "
        f"heads, top-{m['index_topk']} of {m['seq_len']} tokens, {m['params']:,} parameters, byte-level "
        f"(`{results['config']}`).",
        f"- Training (our training job, embedded corpus: the interpreter's standard-library sources + passkey "
        f"documents): stage `dense` {results['steps']['dense']} steps, then `sparse` (DSA, all Full) "
        f"{results['steps']['sparse']} steps = the base model; batch {results['data']['batch_size']} x "
        f"{m['seq_len']} tokens.",
        f"- Held-out data (never trained on): calibration {results['data']['calib_sequences']} sequences (the "
        f"search), evaluation {results['data']['eval_sequences']} sequences (LM loss).",
        f"- Passkey retrieval: lengths {results['data']['retrieval_lengths']}, depths "
        f"{results['data']['retrieval_depths']}, {results['data']['retrieval_per_cell']} documents per cell; exact "
        f"match of the 5 digits (teacher-forced argmax = greedy decoding for exact match).",
        "",
        "## 1. Cross-layer overlap of the top-k sets",
        "",
        "Fraction of layer i's selected keys that layer j also selects (base model, all Full, tokens past the "
        "first k).",
        "",
        "![overlap](results/overlap.png)",
        "",
        "| layer | " + " | ".join(str(j) for j in range(m["layers"])) + " |",
        "|---" * (m["layers"] + 1) + "|",
    ]
    for i, r in enumerate(results["overlap"]):
        lines.append(f"| {i} | " + " | ".join(f"{v:.2f}" for v in r) + " |")
    adjacent = [results["overlap"][i][i + 1] for i in range(m["layers"] - 1)]
    lines += ["", f"Adjacent layers share {np.mean(adjacent):.2f} of their keys on average (min {min(adjacent):.2f},"
              f" max {max(adjacent):.2f}).", ""]
    lines += ["## 2. Training-free IndexCache", "",
              header, rule, row("all Full", free["all_full"])]
    for r in retentions:
        lines.append(row(f"1/{round(1 / r)} uniform", free[f"uniform_{r:g}"]))
        lines.append(row(f"1/{round(1 / r)} searched", free[f"searched_{r:g}"]))
    s = results["search"]
    lines += ["", f"Search cost: {s['evaluations']} loss evaluations in {s['seconds']:.1f} s (calibration set above). "
              "Greedy path:", "", "| Full layers | pattern | calibration loss |", "|---|---|---|"]
    lines += [f"| {p['num_full']} | `{p['pattern']}` | {p['loss']:.4f} |" for p in s["path"]]
    lines += ["", "## 3. Training-aware IndexCache (multi-layer distillation)", "",
              f"From the base model, {results['steps']['finetune']} steps of stage `indexcache` with the uniform "
              f"pattern of each retention; the control trains the same {results['steps']['finetune']} steps with "
              "every layer Full (stage `sparse`) and is then evaluated training-free with the same patterns.", "",
              header, rule, row("control, all Full", aware["control_all_full"])]
    for r in retentions:
        lines.append(row(f"1/{round(1 / r)} control (training-free)", aware[f"control_uniform_{r:g}"]))
        lines.append(row(f"1/{round(1 / r)} IndexCache-trained", aware[f"trained_uniform_{r:g}"]))
    lines += ["", "![loss and retrieval by retention](results/retention.png)", "",
              "## Wall time (s)", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["seconds"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
