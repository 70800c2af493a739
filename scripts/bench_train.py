"""Time the training job's own step at long context on the GPU, per stage, rematerialisation and query chunk, with
its memory.

The step is `train.loop.make_train_step`'s (forward with the distillation losses in the layer scan, backward,
clipping and AdamW), on the model of `--config` (default DeepSeek-V3.2's attention and indexer: 128 heads, latent
512 + 64, 64 indexer heads x 128, top-2048, hidden 7168) cut to `--layers` layers with its dense FFN (no MoE) and
a vocabulary of `--vocab` (the embedding and the LM head are not what this measures); fp32 master weights, the
config's compute dtype; one sequence of T random tokens per step.

Per (stage, T, remat, query chunk), one line of JSON:
  - compiled_temp_gb: XLA's temporaries of the compiled step (what the backward keeps lives here);
    compiled_args_gb: its arguments (weights, optimiser state, tokens); both also in bytes;
  - step_ms: median of `--steps` steps after a warm-up step (each step's output parameters feed the next), and
    tokens_per_s = T / step; first_loss, the warm-up step's objective (the same initial weights and tokens in
    every run: runs that differ only in remat or query chunk should agree), and loss, the last step's;
  - peak_gb: the device's peak memory so far in this process (runs go smallest first), where the backend tells;
  - power: the SM clock and power while the steps ran (nvidia-smi), where there is one;
  - "OOM" where the step does not fit (the error's first line is kept);
  - with `--profile DIR`: profile, one more step's device time by source line and by kernel (`profiled_step`).
`--compile-only` records the compiled memory alone, for sizes that would not fit; on a CPU with `--impl interpret`
it is XLA's CPU buffer assignment of the kernels' buffers, which differs from the GPU's (sparse, 2 layers, chunks
of 8192: 26.8 GB at 32K and 64.4 at 128K, where an H100 measured 25.0 and 44.0): compare CPU runs with each other.
Stages: sparse (every layer Full), indexcache (the first layer Full, the rest Shared: one indexer serving all),
dense_warmup (dense attention, main model frozen; the indexers distil the whole [T, T] distributions), dense
(dense attention, the whole model trained: LM loss plus the indexers' distillation; its attention's backward runs).

    python scripts/bench_train.py --contexts 8192 32768 --stages sparse indexcache --remat none layer
    python scripts/bench_train.py --contexts 65536 --remat layer --query-chunks 0 8192
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import pathlib
import statistics
import sys
import time

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import xla_profile  # noqa: E402
from bench_kernels import PowerSampler  # noqa: E402
from indexcache_jax.configlib import from_mapping, read_yaml  # noqa: E402
from indexcache_jax.model import REMAT_MODES, init_params, pattern_flags  # noqa: E402
from indexcache_jax.train.config import TrainConfig, apply_overrides  # noqa: E402
from indexcache_jax.train.loop import make_optimizer, make_train_step, master_weights_config  # noqa: E402

STAGES = ("sparse", "indexcache", "dense_warmup", "dense")
GB = 1e9


def job_config(args, stage: str, remat: str, query_chunk: int = 0) -> TrainConfig:
    """The bench's job: --config's model with --layers, --vocab, no MoE and the --set overrides."""
    model = dict(read_yaml(args.config)["model"])
    model.update(num_layers=args.layers, vocab_size=args.vocab, moe=None)
    model = apply_overrides(model, args.set)  # "key=value" strings, values parsed as YAML
    pattern = "F" + ("S" if stage == "indexcache" else "F") * (args.layers - 1)
    job = {"stage": stage, "steps": 1000, "model": model, "remat": remat, "query_chunk": query_chunk,
           "indexcache": {"pattern": pattern}}
    kernels = apply_overrides({"impl": args.impl} if args.impl else {}, args.kernel)
    if kernels:
        job["kernels"] = kernels
    return from_mapping(TrainConfig, job, "")


def _out_of_memory(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _peak_gb():
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / GB, 2) if "peak_bytes_in_use" in stats else None


def run_one(args, stage: str, length: int, remat: str, query_chunk: int = 0) -> dict:
    config = job_config(args, stage, remat, query_chunk)
    record = {"stage": stage, "tokens": length, "remat": remat, "query_chunk": query_chunk, "layers": args.layers,
              "pattern": config.indexcache.pattern}
    try:
        model_config = master_weights_config(config.model)  # what the job trains: fp32 master weights
        init = functools.partial(init_params, model_config, seed=config.seed)
        params = jax.eval_shape(init) if args.compile_only else init()  # compile only: shapes, no weights
        flags = pattern_flags(config.indexcache.pattern, model_config)
        optimizer = make_optimizer(config, params)
        opt_state = jax.eval_shape(optimizer.init, params) if args.compile_only else optimizer.init(params)
        step = make_train_step(config, model_config, optimizer, impl=config.kernels)
        batch = jax.random.randint(jax.random.key(0), (1, 1, length + 1), 0, model_config.vocab_size)
        lowered = step.lower(params, opt_state, batch, flags)
        compiled = lowered.compile()
        memory = compiled.memory_analysis()
        if memory is not None:
            record.update(compiled_temp_gb=round(memory.temp_size_in_bytes / GB, 2),
                          compiled_args_gb=round(memory.argument_size_in_bytes / GB, 2),
                          compiled_temp_bytes=int(memory.temp_size_in_bytes),
                          compiled_args_bytes=int(memory.argument_size_in_bytes))
        if args.compile_only:
            return record
        params, opt_state, metrics = compiled(params, opt_state, batch, flags)  # warm-up
        record["first_loss"] = float(metrics["loss"])  # from the same initial weights in every run
        times = []
        with PowerSampler() as power:
            for _ in range(args.steps):
                start = time.perf_counter()
                params, opt_state, metrics = compiled(params, opt_state, batch, flags)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        record.update(step_ms=round(step_s * 1e3, 1), tokens_per_s=round(length / step_s),
                      loss=round(float(metrics["loss"]), 4), power=power.summary)
        if args.profile:
            record["profile"] = profiled_step(lowered, compiled, (params, opt_state, batch, flags),
                                              pathlib.Path(args.profile) / f"{stage}_{length}_{remat}_{query_chunk}")
    except Exception as err:  # noqa: BLE001 - only out-of-memory is a result; anything else is re-raised
        if not _out_of_memory(err):
            raise
        record["error"] = "OOM: " + str(err).strip().splitlines()[0][:300]
    finally:
        params = opt_state = None
        gc.collect()
    record["peak_gb"] = _peak_gb()
    return record


def profiled_step(lowered, compiled, arguments, directory: pathlib.Path) -> dict:
    """One more step under `jax.profiler.trace(directory)`: its wall time, the ops' summed device time and the
    largest groups by source line (`xla_profile.by_source`) and by kernel (`xla_profile.by_kernel`). The step's
    optimised HLO is kept beside the trace (`directory/step.hlo.txt`) so that the trace can be read again later
    without the device. On a GPU the profiled step is compiled again without command buffers
    (`xla_profile.PROFILE_COMPILER_OPTIONS`), else its ops' kernels are traced under the buffers' names; compare its
    step_ms with the run's. The step's outputs are dropped (its donated inputs are then spent: call it last)."""
    options = xla_profile.profile_compiler_options(jax.default_backend())
    if options:
        compiled = lowered.compile(options)
    with jax.profiler.trace(str(directory)):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*arguments))
        wall_s = time.perf_counter() - start
    hlo = compiled.as_text()
    (directory / "step.hlo.txt").write_text(hlo)
    trace, module = xla_profile.trace_file(directory), xla_profile.module_name(hlo)
    times = xla_profile.op_times(trace, module)
    return {"trace": str(directory), "compiler_options": options, "step_ms": round(wall_s * 1e3, 1),
            "op_ms": round(sum(ns for ns, _ in times.values()) / 1e6, 1),
            "by_source": xla_profile.by_source(times, xla_profile.op_sources(hlo)),
            "by_kernel": xla_profile.by_kernel(xla_profile.op_times(trace, module, by="kernel"))}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "deepseek_v32_shapes.yaml"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field, e.g. --set intermediate_size=2048")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["sparse", "indexcache"])
    parser.add_argument("--remat", nargs="+", choices=REMAT_MODES, default=["none", "layer"])
    parser.add_argument("--query-chunks", type=int, nargs="+", default=[0], metavar="C",
                        help="the job's query_chunk (0: all queries at once)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile-only", action="store_true",
                        help="record the compiled memory only (no steps): what a model of --layers would need")
    parser.add_argument("--impl", choices=("pallas", "interpret", "reference"),
                        help="the kernels' implementation (default: by platform). On a CPU, --impl interpret "
                             "--compile-only gives the memory of the kernels' buffers, which the references' "
                             "per-head temporaries would hide")
    parser.add_argument("--kernel", action="append", default=[], metavar="FIELD=NAME",
                        help="a kernels option of the job (pallas_kernels.Kernels), e.g. --kernel dense_forward=pallas")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the timed steps, one more step under jax.profiler.trace(DIR/<run>) (on a GPU "
                             "compiled without command buffers), its device time by source line and by kernel in "
                             "the run's JSON (scripts/xla_profile.py)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.steps < 1:
        parser.error("--layers and --steps must be >= 1")
    if min(args.query_chunks) < 0:
        parser.error("--query-chunks must be >= 0")
    header = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "argv": sys.argv[1:] if argv is None else list(argv)}
    print(json.dumps(header), flush=True)
    results = []
    for length in sorted(args.contexts):
        for stage in args.stages:
            for remat in args.remat:
                for query_chunk in args.query_chunks:
                    results.append(run_one(args, stage, length, remat, query_chunk))
                    print(json.dumps(results[-1]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"header": header, "runs": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
