"""The training job: loss goes down, resume after SIGKILL repeats the uninterrupted trajectory exactly, SIGTERM
leaves a loadable checkpoint, a corrupt checkpoint is skipped (and kept), NaN stops the job, bad configs name the
field. Shapes are small (seq 32, batch 4, the tiny model) so every test runs in seconds on a CPU."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
import typing

import jax
import numpy as np
import pytest
import yaml

from conftest import REPO
from indexcache_jax import cli
from indexcache_jax.checkpoint import load_model
from indexcache_jax.configlib import ConfigError
from indexcache_jax.model import REMAT_MODES
from indexcache_jax.train import TrainingError, load_train_config, param_labels, train
from indexcache_jax.train.config import TrainConfig
from indexcache_jax.train.data import PASSKEY_QUESTION, batches, load_sequences, passkey_document
from indexcache_jax.train.loop import _manager, restore_latest

JOB = REPO / "configs/train_tiny.yaml"
SMALL = ["data.seq_len=96", "data.batch_size=4", "data.embedded_bytes=60000", "log.eval_batches=1",
         "model.num_layers=4", "model.index_topk=8", "indexcache.pattern=FSFS", "optim.warmup_steps=2"]


def _job(*extra):
    return load_train_config(JOB, SMALL + list(extra))


def _losses(run_dir: pathlib.Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _cli_process(run_dir, *extra):
    args = [sys.executable, "-m", "indexcache_jax.cli", "train", "--config", str(JOB), "--run-dir", str(run_dir)]
    for item in SMALL + list(extra):
        args += ["--set", item]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _wait_for_step(run_dir, step, proc, timeout=300, checkpoint=None):
    """Waits until the job has logged `step` and, if given, finalised the async checkpoint of step `checkpoint`
    (Orbax renames its temporary directory to the bare step number when the save is complete)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logged = (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= step
        saved = checkpoint is None or (run_dir / "checkpoints" / str(checkpoint)).is_dir()
        if logged and saved:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {step} (checkpoint {checkpoint}) in time")


def _tensorboard_scalars(run_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """Every scalar in the run's TensorBoard event files, read record by record (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event  # noqa: PLC0415
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            length = int.from_bytes(data[at:at + 8], "little")
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_embedded_job_loss_goes_down(tmp_path):
    result = train(_job("steps=30", "log.eval_every_steps=15"), tmp_path)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert result.step == 30 and last < first - 1.0, (first, last)
    assert set(result.eval_losses) == {15, 30} and np.isfinite(result.eval_losses[30])
    assert (tmp_path / "final" / "config.yaml").exists() and (tmp_path / "config.yaml").exists()
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["eval_loss"] == min(result.eval_losses.values())
    assert best["step"] == min(result.eval_losses, key=result.eval_losses.get)
    scalars = _tensorboard_scalars(tmp_path)
    assert sorted(scalars["loss"]) == list(range(1, 31))
    np.testing.assert_allclose([scalars["loss"][s] for s in range(1, 31)], result.losses, rtol=1e-6)
    assert set(scalars["eval_loss"]) == {15, 30} and "indexer_loss" in scalars and "tokens_per_s" in scalars


def _leaves(params, indexer: bool) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)
            if ("indexer" in jax.tree_util.keystr(p)) == indexer}


def test_dense_warmup_trains_only_the_indexers_and_their_kl_goes_down(tmp_path):
    # A larger init makes the attention far from uniform, so the KL has something to learn.
    config = _job("stage=dense_warmup", "indexcache.pattern=FFFF", "model.initializer_range=0.5", "steps=25",
                  "optim.lr=1.0e-2", "log.eval_every_steps=100")
    initial = _initial_params(config)
    result = train(config, tmp_path)
    final = load_model(tmp_path / "final")[1]
    for name, value in _leaves(initial, indexer=False).items():
        np.testing.assert_array_equal(_leaves(final, indexer=False)[name], value, err_msg=name)  # frozen exactly
    changed = [n for n, v in _leaves(initial, indexer=True).items() if not np.array_equal(_leaves(final, True)[n], v)]
    assert len(changed) == len(_leaves(initial, indexer=True))
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5]), result.losses


def test_indexcache_stage_leaves_the_indexers_of_shared_layers_untouched(tmp_path):
    config = _job("stage=indexcache", "indexcache.pattern=FSFS", "steps=3", "log.eval_every_steps=100")
    initial = _initial_params(config)
    train(config, tmp_path)
    final = load_model(tmp_path / "final")[1]
    # Layer 0 is the dense scan; the MoE scan holds layers 1..3, where layer 2 (index 1) is Full.
    for name, value in _leaves(initial, indexer=True).items():
        got = _leaves(final, indexer=True)[name]
        if "moe_layers" in name:
            np.testing.assert_array_equal(got[[0, 2]], value[[0, 2]], err_msg=name)  # Shared layers 1 and 3
            assert not np.array_equal(got[1], value[1]), name
        else:
            assert not np.array_equal(got, value), name
    assert all(not np.array_equal(_leaves(final, False)[n], v) for n, v in _leaves(initial, False).items()
               if "e_score_correction_bias" not in n)


def test_text_with_a_local_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    text = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(words), 3000)
    text.write_text(" ".join(words[i] + (" zeta" if i == 0 else "") for i in ids))
    config = load_train_config(JOB, SMALL + ["data.source=text", f"data.paths=[{text}]",
                                             f"data.tokenizer={tmp_path / 'tokenizer.json'}"]).data
    splits = load_sequences(config, 256)
    every = np.concatenate([splits.train.ravel(), splits.eval.ravel()])
    assert set(np.unique(every)) == {0, 1, 2, 3, 4, 5}  # the word ids, with "zeta" as [UNK] (0)
    row = splits.train[0]
    assert np.all((row[1:] != 0) | (row[:-1] == 1))  # [UNK] only ever follows "alpha", as written
    with pytest.raises(ValueError, match="tokenizer.json has 6 tokens but model.vocab_size is 4"):
        load_sequences(config, 4)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_train_config(JOB, SMALL + [f"data.tokenizer={tmp_path / 'tokenizer.json'}"])  # embedded source


def test_resume_after_sigkill_repeats_the_uninterrupted_run(tmp_path):
    settings = ("steps=9", "checkpoint.every_steps=3", "log.eval_every_steps=100")
    reference = train(_job(*settings), tmp_path / "uninterrupted").losses
    killed = tmp_path / "killed"
    proc = _cli_process(killed, *settings)
    _wait_for_step(killed, 5, proc, checkpoint=3)  # on a slow machine the async save may lag the steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = train(_job(*settings), killed)
    start = 9 - len(resumed.losses)
    assert 3 <= start <= 9 and start % 3 == 0  # resumed from a complete checkpoint
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(resumed.losses, reference[start:])  # bit for bit
    else:  # the killed run is a CPU subprocess, and GPU reductions are not bit-deterministic
        np.testing.assert_allclose(resumed.losses, reference[start:], rtol=1e-5)


def test_sigterm_saves_a_complete_loadable_checkpoint(tmp_path):
    proc = _cli_process(tmp_path, "steps=1000", "checkpoint.every_steps=1000")
    _wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "SIGTERM: saved step" in output
    config = _job("steps=1000")
    stopped_at = max(_losses(tmp_path))
    manager = _manager(config, tmp_path)
    params = _initial_params(config)
    from indexcache_jax.train.loop import make_optimizer  # noqa: PLC0415
    restored = restore_latest(manager, params, make_optimizer(config, params).init(params))
    manager.close()
    assert restored is not None and restored[0] == stopped_at


def _initial_params(config):
    from indexcache_jax.train.loop import _initial_model  # noqa: PLC0415
    return _initial_model(config)[1]


def test_corrupt_latest_checkpoint_is_skipped_and_kept(tmp_path, caplog):
    """The newest checkpoint, unreadable, is moved aside and the run resumes from the one before; the resumed run
    compiles the step for the same argument types and placements as the fresh one (a restored state is committed to
    its device, a fresh one was not: two programs, and a persistent compilation cache could not serve a restart)."""
    settings = ("steps=9", "checkpoint.every_steps=4", "log.eval_every_steps=100")  # the resume test's schedule
    compiled = []
    for run in ("fresh", "resumed"):
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles(True):
            result = train(_job(*settings), tmp_path, max_steps_this_run=8 if run == "fresh" else None)
        compiled.append([r.getMessage() for r in caplog.records
                         if r.getMessage().startswith("Compiling jit(train_step)")])
        if run == "fresh":
            for path in (tmp_path / "checkpoints" / "8").rglob("*"):
                if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
                    path.write_bytes(b"garbage")
    assert len(compiled[0]) == 1 and compiled[1] == compiled[0], compiled
    assert "checkpoint step 8" in caplog.text and "cannot be restored" in caplog.text
    assert len(result.losses) == 5  # steps 5..9 after resuming from step 4
    assert (tmp_path / "corrupt" / "8").exists()  # moved aside, not deleted


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*last good checkpoint is step \d+"):
        train(_job("steps=20", "optim.lr=1.0e+30", "optim.warmup_steps=0", "checkpoint.every_steps=1"), tmp_path)


def test_indexer_and_routing_bias_get_their_own_labels_and_the_bias_stays_fixed(tmp_path):
    config = _job("steps=2")
    params = _initial_params(config)
    labels = jax.tree_util.tree_leaves_with_path(param_labels(params))
    by_label = {}
    for path, label in labels:
        by_label.setdefault(label, []).append(jax.tree_util.keystr(path))
    assert all("indexer" in p for p in by_label["indexer"]) and len(by_label["indexer"]) == 10
    assert all("e_score_correction_bias" in p for p in by_label["frozen"])
    assert not any("indexer" in p for p in by_label["main"])


@pytest.mark.parametrize("override,field", [
    ("stage=indexcache", "indexcache"),  # stage indexcache without a pattern
    ("stage=sparse", "indexcache"),  # the small job's pattern has Shared layers: that is stage indexcache
    ("optim.indexer_loss_weight=-1", "optim.indexer_loss_weight"),
    ("data.seq_len=1", "data.seq_len"),
    ("data.seq_len=40", "data.seq_len"),  # too short for the passkey documents
    ("optim.lr=-1", "optim.lr"),
    ("optim.bogus=1", "optim.bogus"),
    ("steps=many", "steps"),
    ("data.source=text", "data.paths"),
    ("model.vocab_size=100", "model.vocab_size"),
    ("kernels.sparse_backward=cuda", "kernels.sparse_backward"),
    ("kernels.backward_d_s_bytes=-1", "kernels.backward_d_s_bytes"),
    ("kernels.impl=gpu", "kernels.impl"),
    ("remat=all", "remat"),
    ("query_chunk=-4", "query_chunk"),
    ("query_chunk=1.5", "query_chunk"),
])
def test_bad_config_values_name_the_field(override, field):
    if override == "stage=indexcache":
        with pytest.raises(ConfigError, match="indexcache"):
            load_train_config(JOB, SMALL + [override, "indexcache.pattern=null"])
        return
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        load_train_config(JOB, SMALL + [override])


def test_the_job_takes_every_remat_mode_of_the_model():
    assert typing.get_args(typing.get_type_hints(TrainConfig)["remat"]) == REMAT_MODES
    assert load_train_config(JOB, SMALL + ["remat=layer_keep_attention"]).remat == "layer_keep_attention"


def test_kernels_section_reaches_the_kernels_and_the_run_records_it(tmp_path):
    """The job's `kernels` section goes down to the dispatch: a Gluon forward asked for under the interpreter
    (Pallas kernels only) is refused by the kernel's own check. impl= replaces only the implementation, and
    config.yaml records what ran; a bad value names the file and the field."""
    with pytest.raises(ValueError, match="forward_kernel='gluon' cannot run: the Pallas interpreter"):
        train(_job("steps=1", "kernels.sparse_forward=gluon"), tmp_path, impl="interpret")
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())["kernels"]
    assert recorded["impl"] == "interpret" and recorded["sparse_forward"] == "gluon"
    with pytest.raises(ConfigError, match=f"{JOB}: kernels.distribution: must be one of"):
        load_train_config(JOB, SMALL + ["kernels.distribution=fast"])


def test_missing_data_file_and_bad_override_syntax_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.txt"):
        load_train_config(JOB, SMALL + ["data.source=text", f"data.paths=[{tmp_path / 'nope.txt'}]"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_train_config(JOB, ["steps"])


def test_batches_are_a_pure_function_of_seed_and_step():
    config = _job().data
    seqs = load_sequences(config, 256).train
    a, b = batches(seqs, 4, seed=1), batches(seqs, 4, seed=1)
    np.testing.assert_array_equal(a[7], b[7])
    assert not np.array_equal(a[7], batches(seqs, 4, seed=2)[7])
    assert not np.array_equal(a[0], a[len(seqs) // 4])  # each epoch reshuffles


def test_passkey_documents_state_the_key_at_the_depth_and_ask_at_the_end():
    rng = np.random.default_rng(0)
    doc, answer = passkey_document(rng, 200, depth=0.5)
    assert len(doc) == 200 and doc.endswith(PASSKEY_QUESTION + answer)
    at = doc.index(b"The pass key is " + answer + b". Remember")
    assert 0.3 < at / 200 < 0.7


def test_token_files_pack_and_out_of_vocab_ids_are_named(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 300
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    config = load_train_config(JOB, SMALL + ["data.source=tokens", f"data.paths=[{path}]",
                                             "data.eval_fraction=0.1"]).data
    splits = load_sequences(config, 300)
    assert splits.train.shape[1] == 97 and len(splits.train) + len(splits.eval) == (1000 - 1) // 96
    row = splits.train[0]
    np.testing.assert_array_equal(np.diff(row) % 300, 1)  # consecutive tokens, windows intact
    with pytest.raises(ValueError, match="tokens.bin holds token id 299 >= model vocab_size 256"):
        load_sequences(config, 256)


def test_cli_train_runs_and_reports_errors(tmp_path, capsys):
    argv = ["train", "--config", str(JOB), "--run-dir", str(tmp_path)]
    for item in SMALL + ["steps=2", "log.eval_every_steps=2"]:
        argv += ["--set", item]
    assert cli.main(argv) == 0
    assert "done: step 2/2" in capsys.readouterr().out
    assert cli.main(argv + ["--set", "stage=dense_warmup"]) == 2
    assert "indexcache" in capsys.readouterr().err
