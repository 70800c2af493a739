"""The training job: `train(config)` runs a resumable Optax loop with Orbax checkpoints.

Functional NNX: the model is `params` (an nnx.State pytree, fp32 master weights); one jitted `train_step` maps
(params, opt_state, batches) to new ones, accumulating gradients over micro-batches with `lax.scan`. Checkpoints
(Orbax `CheckpointManager`, async, keep-last-N) hold params, optimiser state and the step; the data position is the
step itself (batches are random access, see data.py), so a resumed run repeats exactly what an uninterrupted one
would have done. Orbax writes each checkpoint under a temporary name and commits it when complete; a checkpoint that
still fails to restore is skipped with a warning (and kept on disk). SIGTERM finishes the current step, saves and
returns; a non-finite loss stops the job before anything is saved from it.

Stages: `sparse` (top-k selection on, LM loss) is what this module trains today; the indexer's distillation losses
(`dense_warmup`'s KL, the sparse stage's KL on the selected set, IndexCache's multi-layer distillation) are not
built yet and are refused with a clear error.
"""

from __future__ import annotations

import dataclasses
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

from indexcache_jax.checkpoint import load_model, save_model
from indexcache_jax.model import forward, init_params, pattern_flags
from indexcache_jax.train.config import TrainConfig, dump_train_config
from indexcache_jax.train.data import Splits, batches, load_sequences

log = logging.getLogger(__name__)

_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm  # renamed in newer optax
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
        return "indexer" if "indexer" in keys else "main"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: TrainConfig, params) -> optax.GradientTransformation:
    o = config.optim

    def adamw(lr: float, weight_decay: float):
        decay_steps = max(config.steps, o.warmup_steps + 1)
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, o.warmup_steps, decay_steps, lr * o.min_lr_ratio)
        return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay)

    transforms = {
        "main": adamw(o.lr, o.weight_decay),
        "indexer": adamw(o.indexer_lr or o.lr, o.weight_decay if o.indexer_weight_decay is None
                         else o.indexer_weight_decay),
        "frozen": optax.set_to_zero(),
    }
    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.multi_transform(transforms, param_labels(params)))


# ---- the step ---------------------------------------------------------------------------------------------------

def lm_loss(params, tokens, flags, *, model_config, attention: str, impl: Optional[str]):
    """Mean next-token cross-entropy of tokens [B, L+1] (inputs [:L], targets [1:])."""
    logits = forward(params, tokens[:, :-1], flags, config=model_config, attention=attention, impl=impl)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def make_train_step(model_config, optimizer, *, attention: str, impl: Optional[str]):
    grad_fn = jax.value_and_grad(lambda p, t, f: lm_loss(p, t, f, model_config=model_config, attention=attention,
                                                         impl=impl))

    @jax.jit
    def train_step(params, opt_state, micro_batches, flags):
        """micro_batches int32[A, B, L+1] -> (params, opt_state, mean loss, grad norm)."""
        def accumulate(carry, tokens):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(params, tokens, flags)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.float32(0), zeros), micro_batches)
        count = micro_batches.shape[0]
        grads = jax.tree.map(lambda g: g / count, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss_sum / count, _tree_norm(grads)

    return train_step


def make_eval_step(model_config, *, attention: str, impl: Optional[str]):
    return jax.jit(lambda p, t, f: lm_loss(p, t, f, model_config=model_config, attention=attention, impl=impl))


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


def _initial_model(config: TrainConfig):
    if config.init_from is not None:
        base, params = load_model(config.init_from, dtype="float32")  # fp32 master weights
        return base.model, params
    model = dataclasses.replace(config.model, param_dtype="float32")
    return model, init_params(model, seed=config.seed)


def train(config: TrainConfig, run_dir: Optional[str] = None, *, impl: Optional[str] = None,
          max_steps_this_run: Optional[int] = None, out=sys.stdout) -> TrainResult:
    """Run (or resume) the job. `max_steps_this_run` stops early (tests; the checkpoint cadence is unchanged)."""
    if config.stage != "sparse":
        raise TrainingError(f"stage {config.stage!r}: the indexer distillation losses are not built yet; "
                            f"only stage 'sparse' (LM loss with top-k selection) trains today")
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

    train_step = make_train_step(model_config, optimizer, attention="sparse", impl=impl)
    eval_step = make_eval_step(model_config, attention="sparse", impl=impl)
    accum = config.optim.grad_accum
    tokens_per_step = accum * config.data.batch_size * config.data.seq_len
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    losses, eval_losses = [], {}
    last_step = config.steps if max_steps_this_run is None else min(config.steps, step + max_steps_this_run)
    started, first_step = time.perf_counter(), step
    interrupted = False
    try:
        with _Stop() as stop:
            while step < last_step and not stop.requested:
                micro = np.stack([train_data[step * accum + m] for m in range(accum)])
                params, opt_state, loss, grad_norm = train_step(params, opt_state, jnp.asarray(micro), flags)
                loss = float(loss)
                if not math.isfinite(loss):
                    manager.wait_until_finished()
                    kept = manager.latest_step()
                    raise TrainingError(f"loss is {loss} at step {step + 1}; stopping. Nothing from this step was "
                                        f"saved; the last good checkpoint is step {kept} in {run_dir / 'checkpoints'}")
                step += 1
                losses.append(loss)
                record = {"step": step, "loss": loss, "grad_norm": float(grad_norm)}
                if step % config.log.eval_every_steps == 0 or step == config.steps:
                    record["eval_loss"] = eval_losses[step] = float(np.mean(
                        [eval_step(params, jnp.asarray(eval_data[i]), flags) for i in range(config.log.eval_batches)]))
                elapsed = time.perf_counter() - started
                record["tokens_per_s"] = (step - first_step) * tokens_per_step / elapsed
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if config.log.progress and (step % config.log.every_steps == 0 or step == last_step):
                    eta = elapsed / (step - first_step) * (config.steps - step)
                    extra = f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                    print(f"step {step}/{config.steps} loss {loss:.4f}{extra} "
                          f"{record['tokens_per_s']:,.0f} tok/s eta {eta:,.0f}s", file=out, flush=True)
                if step % config.checkpoint.every_steps == 0 or step == config.steps or stop.requested:
                    _save(manager, step, params, opt_state, {"step": step, "loss": loss})
            interrupted = stop.requested
    finally:
        metrics_file.close()
        manager.wait_until_finished()
        manager.close()
    if interrupted:
        print(f"SIGTERM: saved step {step} in {run_dir / 'checkpoints'}; rerun the same command to resume",
              file=out, flush=True)
    if step == config.steps and not (run_dir / "final").exists():
        save_model(run_dir / "final", full_config, params)
    return TrainResult(step=step, losses=losses, eval_losses=eval_losses, interrupted=interrupted, run_dir=run_dir)

