"""The training job: `train(config)` runs a resumable Optax loop with Orbax checkpoints.

Functional NNX: the model is `params` (an nnx.State pytree, fp32 master weights); one jitted `train_step` maps
(params, opt_state, batches) to new ones, accumulating gradients over micro-batches with `lax.scan`. Checkpoints
(Orbax `CheckpointManager`, async, keep-last-N) hold params, optimiser state and the step; the data position is the
step itself (batches are random access, see data.py), so a resumed run repeats exactly what an uninterrupted one
would have done. Orbax writes each checkpoint under a temporary name and commits it when complete; a checkpoint that
still fails to restore is skipped with a warning (and kept on disk). SIGTERM finishes the current step, saves and
returns; a non-finite loss stops the job before anything is saved from it.

Stages (SPEC §1-2; the losses are computed inside the layer scan, see indexcache_jax/distill.py):
- `dense`: dense attention; objective = LM loss + indexer_loss_weight * KL to the dense attention (pretraining a
  dense model from scratch while its indexers learn alongside, detached; what precedes `dense_warmup` when there
  is no pretrained model).
- `dense_warmup`: dense attention; the objective is the indexers' KL to their layers' head-averaged attention
  distributions; every non-indexer weight is frozen (its optimiser is `set_to_zero`, so not even weight decay moves
  it), and the indexers see their inputs through a stop-gradient.
- `sparse`: top-k selection in every layer; objective = LM loss + indexer_loss_weight * KL on the selected set. The
  two parts reach disjoint weights: the LM loss never reaches an indexer and the KL never reaches the main model.
- `indexcache`: as `sparse` with a Full/Shared pattern; each Full layer's indexer distils the layers it serves
  (multi-layer distillation). Shared layers' indexers take no part: their updates are masked to exactly zero.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from indexcache_jax.checkpoint import load_model, save_model
from indexcache_jax.model import init_params, is_indexer_weight, pattern_flags, training_losses
from indexcache_jax.train.config import TrainConfig, dump_train_config
from indexcache_jax.train.data import Splits, batches, load_sequences
from pallas_kernels.dispatch import ImplArg, Kernels

log = logging.getLogger(__name__)

_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm  # renamed in newer optax
BEST_FILE = "best.json"
FROZEN = ("e_score_correction_bias",)  # routing bias: set by load balancing, not by gradients or weight decay


class TrainingError(RuntimeError):
    """The job cannot go on (non-finite loss, unsupported stage); the message says why and what was kept."""


@dataclasses.dataclass
class TrainResult:
    step: int  # optimiser steps completed
    losses: list[float]  # training loss of every step run by this call
    eval_losses: dict[int, float]
    interrupted: bool  # stopped by SIGTERM (a checkpoint of `step` was saved)
    run_dir: pathlib.Path


# ---- optimiser --------------------------------------------------------------------------------------------------

def param_labels(params) -> Any:
    """"indexer" for the indexer's weights, "frozen" for FROZEN buffers, "main" for the rest."""
    def label(path, _):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if any(k in FROZEN for k in keys):
            return "frozen"
        return "indexer" if is_indexer_weight(path) else "main"
    return jax.tree_util.tree_map_with_path(label, params)


STAGE_ATTENTION = {"dense": "dense", "dense_warmup": "dense", "sparse": "sparse", "indexcache": "sparse"}


def indexer_layer_mask(params, model_config, flags):
    """1.0 for every weight but the indexers of Shared layers (0.0 along those layers of the stacked axis).
    flags may be traced: the mask is computed in the step, so one compiled step serves every pattern."""
    flags = jnp.asarray(flags).astype(jnp.float32)
    segments = {f"{ffn}_layers": flags[start:stop] for start, stop, ffn in model_config.layer_segments}

    def mask(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "indexer" not in keys:
            return jnp.ones((), jnp.float32)
        layer_flags = next(segments[k] for k in keys if k in segments)
        return layer_flags.reshape((-1,) + (1,) * (jnp.ndim(leaf) - 1))
    return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(config: TrainConfig, params) -> optax.GradientTransformation:
    """Clip, then AdamW per group ("main", "indexer"; "frozen" never moves). dense_warmup freezes "main" too.
    (The train step also zeroes the updates of Shared layers' indexers: see indexer_layer_mask.)"""
    o = config.optim

    def adamw(lr: float, weight_decay: float):
        decay_steps = max(config.steps, o.warmup_steps + 1)
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, o.warmup_steps, decay_steps, lr * o.min_lr_ratio)
        return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay)

    transforms = {
        "main": optax.set_to_zero() if config.stage == "dense_warmup" else adamw(o.lr, o.weight_decay),
        "indexer": adamw(o.indexer_lr or o.lr, o.weight_decay if o.indexer_weight_decay is None
                         else o.indexer_weight_decay),
        "frozen": optax.set_to_zero(),
    }
    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.multi_transform(transforms, param_labels(params)))


# ---- the step ---------------------------------------------------------------------------------------------------

def stage_losses(params, tokens, flags, *, model_config, stage: str, indexer_loss_weight: float,
                 impl: ImplArg, remat: str = "none", query_chunk: int = 0):
    """tokens [B, L+1] (inputs [:L], targets [1:]) -> (the stage's objective, {"lm_loss", "indexer_loss"})."""
    lm, indexer_loss = training_losses(params, tokens, flags, config=model_config, attention=STAGE_ATTENTION[stage],
                                       impl=impl, remat=remat, query_chunk=query_chunk,
                                       frozen_main=stage == "dense_warmup")
    objective = indexer_loss if stage == "dense_warmup" else lm + indexer_loss_weight * indexer_loss
    return objective, {"lm_loss": lm, "indexer_loss": indexer_loss}


def _donated_arguments() -> tuple[int, ...]:
    """The train step's params and opt_state are replaced by its outputs: on an accelerator their buffers are
    handed to it, so that the step holds one copy of the weights and the optimiser state, not two (14.5 GB at
    DeepSeek-V3.2's attention shapes with two layers; docs/BENCHMARKS.md). Not on CPU, where an array and the
    host view that an async checkpoint writes from in the background may share memory."""
    return (0, 1) if jax.default_backend() != "cpu" else ()


def make_train_step(config: TrainConfig, model_config, optimizer, *, impl: ImplArg):
    losses = functools.partial(stage_losses, model_config=model_config, stage=config.stage,
                               indexer_loss_weight=config.optim.indexer_loss_weight, impl=impl, remat=config.remat,
                               query_chunk=config.query_chunk)
    grad_fn = jax.value_and_grad(losses, has_aux=True)

    @functools.partial(jax.jit, donate_argnums=_donated_arguments())
    def train_step(params, opt_state, micro_batches, flags):
        """micro_batches int32[A, B, L+1] -> (params, opt_state, metrics: mean loss, lm_loss, indexer_loss over
        the micro-batches, and the gradient norm)."""
        def accumulate(carry, tokens):
            sums, grad_sum = carry
            (loss, parts), grads = grad_fn(params, tokens, flags)
            sums = jax.tree.map(jnp.add, sums, {"loss": loss, **parts})
            return (sums, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = {"loss": jnp.float32(0), "lm_loss": jnp.float32(0), "indexer_loss": jnp.float32(0)}
        (sums, grad_sum), _ = jax.lax.scan(accumulate, (first, zeros), micro_batches)
        count = micro_batches.shape[0]
        grads = jax.tree.map(lambda g: g / count, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # Shared layers' indexers serve no layer: no update at all (their gradient is already 0; this stops
        # weight decay too). All ones for an all-Full pattern.
        updates = jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates,
                               indexer_layer_mask(params, model_config, flags))
        metrics = {k: v / count for k, v in sums.items()} | {"grad_norm": _tree_norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    return train_step


def make_eval_step(config: TrainConfig, model_config, *, impl: ImplArg):
    """-> jitted (params, tokens, flags) -> {"loss", "lm_loss", "indexer_loss"} of the stage."""
    def evaluate(params, tokens, flags):
        loss, parts = stage_losses(params, tokens, flags, model_config=model_config, stage=config.stage,
                                   indexer_loss_weight=config.optim.indexer_loss_weight, impl=impl,
                                   query_chunk=config.query_chunk)
        return {"loss": loss, **parts}
    return jax.jit(evaluate)


# ---- checkpoints ------------------------------------------------------------------------------------------------

def _manager(config: TrainConfig, run_dir: pathlib.Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(run_dir / "checkpoints", options=options)


def _save(manager: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    manager.check_for_errors()  # a failed background save stops the job here, not silently
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
        meta=ocp.args.JsonSave(meta)))


def restore_latest(manager: ocp.CheckpointManager, params, opt_state, quarantine: Optional[pathlib.Path] = None):
    """(step, params, opt_state) from the newest checkpoint that restores; None if none does. A checkpoint that
    fails is reported and, given `quarantine`, moved there (never deleted), so later saves can reuse its step."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 (any failure to read means: not usable, try the previous one)
            log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                        step, manager.directory, type(err).__name__, str(err)[:300])
            if quarantine is not None:
                quarantine.mkdir(parents=True, exist_ok=True)
                target_dir = quarantine / str(step)
                if target_dir.exists():
                    target_dir = quarantine / f"{step}.{int(time.time())}"
                (pathlib.Path(manager.directory) / str(step)).rename(target_dir)
                log.warning("moved the unreadable checkpoint to %s", target_dir)
            continue
        state = restored["state"]
        return step, state["params"], state["opt_state"]
    return None


# ---- the job ----------------------------------------------------------------------------------------------------

class _Stop:
    """SIGTERM -> finish the step, save, return."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):  # noqa: ARG001
            self.requested = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def master_weights_config(model):
    """The model config that training keeps its weights in: fp32 master weights, the config's compute dtype."""
    return dataclasses.replace(model, param_dtype="float32")


def _initial_model(config: TrainConfig):
    if config.init_from is not None:
        base, params = load_model(config.init_from, dtype="float32")  # fp32 master weights
        return base.model, params
    model = master_weights_config(config.model)
    return model, init_params(model, seed=config.seed)


def _best_so_far(run_dir: pathlib.Path) -> float:
    """Eval loss of the saved best model (RUN_DIR/best), inf if there is none."""
    meta = run_dir / "best" / BEST_FILE
    return json.loads(meta.read_text())["eval_loss"] if meta.is_file() else math.inf


def _evaluate(eval_step, params, eval_data, flags, num_batches: int) -> dict[str, float]:
    results = [eval_step(params, jnp.asarray(eval_data[i]), flags) for i in range(num_batches)]
    return {f"eval_{k}": float(np.mean([r[k] for r in results])) for k in results[0]}


def train(config: TrainConfig, run_dir: Optional[str] = None, *, impl: ImplArg = None,
          max_steps_this_run: Optional[int] = None, out=sys.stdout) -> TrainResult:
    """Run (or resume) the job. `max_steps_this_run` stops early (tests; the checkpoint cadence is unchanged).

    RUN_DIR gets: config.yaml (resolved), checkpoints/ (Orbax, keep-last-N), metrics.jsonl, tensorboard/ (event
    files), best/ (the model with the lowest eval loss so far, with best.json) and final/ (the model at the last
    step); best/ and final/ are model checkpoints that every entry point loads.

    impl: the kernel implementation, a name or a `Kernels`, in place of the config's `kernels` section (a name
    replaces only its implementation); config.yaml records what runs."""
    if isinstance(impl, Kernels):
        config = dataclasses.replace(config, kernels=impl)
    elif impl is not None:
        config = dataclasses.replace(config, kernels=dataclasses.replace(config.kernels, impl=impl))
    run_dir = pathlib.Path(run_dir or config.checkpoint.directory).resolve()  # Orbax wants absolute paths
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_train_config(config))

    model_config, params = _initial_model(config)
    full_config = config.model_config(model_config)
    flags = pattern_flags(full_config.pattern(), model_config)
    splits: Splits = load_sequences(config.data, model_config.vocab_size)
    train_data = batches(splits.train, config.data.batch_size, config.data.seed)
    eval_data = batches(splits.eval, min(config.data.batch_size, len(splits.eval)), config.data.seed)

    optimizer = make_optimizer(config, params)
    opt_state = optimizer.init(params)
    manager = _manager(config, run_dir)
    step = 0
    steps_before = set(manager.all_steps())
    restored = restore_latest(manager, params, opt_state, quarantine=run_dir / "corrupt")
    if set(manager.all_steps()) != steps_before or (restored and restored[0] != max(steps_before)):
        manager.close()  # some were moved aside: start a manager that sees only what is left
        manager = _manager(config, run_dir)
    if restored is not None:
        step, params, opt_state = restored
        print(f"resumed from {run_dir / 'checkpoints'} at step {step}", file=out, flush=True)
    # Orbax restores arrays committed to a device and a fresh state is uncommitted: jit compiles a different program
    # for each, so a persistent compilation cache filled by the first run would not serve its restart. Commit both.
    params, opt_state = jax.device_put((params, opt_state), jax.devices()[0])

    train_step = make_train_step(config, model_config, optimizer, impl=config.kernels)
    eval_step = make_eval_step(config, model_config, impl=config.kernels)
    accum = config.optim.grad_accum
    tokens_per_step = accum * config.data.batch_size * config.data.seq_len
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)
    best_eval = _best_so_far(run_dir)
    losses, eval_losses = [], {}
    last_step = config.steps if max_steps_this_run is None else min(config.steps, step + max_steps_this_run)
    started, first_step = time.perf_counter(), step
    interrupted = False
    try:
        with _Stop() as stop:
            while step < last_step and not stop.requested:
                micro = np.stack([train_data[step * accum + m] for m in range(accum)])
                params, opt_state, metrics = train_step(params, opt_state, jnp.asarray(micro), flags)
                record = {k: float(v) for k, v in metrics.items()}
                loss = record["loss"]
                if not math.isfinite(loss):
                    manager.wait_until_finished()
                    kept = manager.latest_step()
                    raise TrainingError(f"loss is {loss} at step {step + 1}; stopping. Nothing from this step was "
                                        f"saved; the last good checkpoint is step {kept} in {run_dir / 'checkpoints'}")
                step += 1
                losses.append(loss)
                record = {"step": step, **record}
                if step % config.log.eval_every_steps == 0 or step == config.steps:
                    record |= _evaluate(eval_step, params, eval_data, flags, config.log.eval_batches)
                    eval_losses[step] = record["eval_loss"]
                    if record["eval_loss"] < best_eval:
                        best_eval = record["eval_loss"]
                        save_model(run_dir / "best", full_config, params, overwrite=True, extra_files={
                            BEST_FILE: json.dumps({"step": step, "eval_loss": best_eval})})
                elapsed = time.perf_counter() - started
                record["tokens_per_s"] = (step - first_step) * tokens_per_step / elapsed
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                for name, value in record.items():
                    if name != "step":
                        board.add_scalar(name, value, step)
                if config.log.progress and (step % config.log.every_steps == 0 or step == last_step):
                    print(_progress_line(config, record, elapsed / (step - first_step)), file=out, flush=True)
                if step % config.checkpoint.every_steps == 0 or step == config.steps or stop.requested:
                    _save(manager, step, params, opt_state, {"step": step, "loss": loss})
            interrupted = stop.requested
    finally:
        metrics_file.close()
        board.close()
        manager.wait_until_finished()
        manager.close()
    if interrupted:
        print(f"SIGTERM: saved step {step} in {run_dir / 'checkpoints'}; rerun the same command to resume",
              file=out, flush=True)
    if step == config.steps and not (run_dir / "final").exists():
        save_model(run_dir / "final", full_config, params)
    return TrainResult(step=step, losses=losses, eval_losses=eval_losses, interrupted=interrupted, run_dir=run_dir)


def _progress_line(config: TrainConfig, record: dict, seconds_per_step: float) -> str:
    step = record["step"]
    parts = [f"step {step}/{config.steps}", f"loss {record['loss']:.4g}"]
    if config.stage != "dense_warmup":
        parts.append(f"(lm {record['lm_loss']:.4f} indexer {record['indexer_loss']:.3g})")
    if "eval_loss" in record:
        parts.append(f"eval {record['eval_loss']:.4g}")
    parts += [f"{record['tokens_per_s']:,.0f} tok/s", f"eta {seconds_per_step * (config.steps - step):,.0f}s"]
    return " ".join(parts)
