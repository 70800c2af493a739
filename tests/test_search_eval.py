"""Training-free IndexCache and evaluation: the greedy search finds a planted pattern, compiles once for all
candidates and resumes; the overlap metric and the retrieval tasks are right on hand-made cases; the CLI writes
the search path, the report and the heat map."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL
from indexcache_jax import cli, init_params
from indexcache_jax.checkpoint import save_model
from indexcache_jax.config import Config
from indexcache_jax.evaluate import (ANSWER_DIGITS, _answer_hits, layer_overlap, overlap_matrix, retrieval_accuracy,
                                     retrieval_tasks)
from indexcache_jax.inference import generate
from indexcache_jax.model import forward, pattern_flags
from indexcache_jax.search import full_layers_for, greedy_search
from indexcache_jax.train.data import PASSKEY_QUESTION

PLANTED = dataclasses.replace(SMALL, num_layers=6, moe=None, vocab_size=48, index_topk=4)
SILENT = (1, 2, 4, 5)  # layers whose attention output is zeroed: their selection cannot change anything


def _planted():
    """Layers 1, 2, 4, 5 write nothing from attention (o_proj = 0), so making them Shared leaves the loss exactly
    unchanged; layer 3 attends for real with its own indexer. Calibration data: the all-Full model's own greedy
    continuations, so any change of layer 3's selection moves the logits away from the targets."""
    params = init_params(PLANTED, seed=5)
    o_proj = params["dense_layers"]["self_attn"]["o_proj"]
    o_proj[...] = o_proj[...].at[jnp.asarray(SILENT)].set(0.0)
    prompts = jax.random.randint(jax.random.key(2), (4, 4), 0, PLANTED.vocab_size)
    out = generate(params, prompts, config=PLANTED, max_new_tokens=28, pattern="FFFFFF")
    tokens = np.concatenate([np.asarray(prompts), np.asarray(out.tokens)], axis=1).astype(np.int32)  # [4, 32]
    return params, [tokens[:2], tokens[2:]]


@pytest.fixture(scope="module")
def planted():
    return _planted()


def test_greedy_search_finds_the_planted_pattern_and_compiles_once(planted):
    params, batches = planted
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    after_start = []
    def progress(line):
        if line.startswith("start"):
            after_start.append(len(compiles))
    result = greedy_search(params, PLANTED, batches, min_full=1, progress=progress)
    patterns = [s.pattern for s in result.steps]
    assert patterns[0] == "FFFFFF"
    assert patterns[1:5] == ["FSFFFF", "FSSFFF", "FSSFSF", "FSSFSS"]  # the silent layers go first, lowest first
    assert patterns[5] == "FSSSSS"
    baseline = result.steps[0].loss
    assert all(result.steps[k].loss == baseline for k in range(1, 5))  # sharing a silent layer is free, exactly
    assert result.steps[4].candidates[3] > baseline + 1e-3  # sharing layer 3 costs
    assert result.evaluations == 1 + 5 + 4 + 3 + 2 + 1
    # Every pattern after the first evaluation ran without a new compilation: the pattern is a runtime input.
    assert after_start and len(compiles) == after_start[0], (after_start, len(compiles))


def test_search_resumes_from_its_path_and_refuses_another_model(planted, tmp_path):
    params, batches = planted
    path = tmp_path / "search.json"

    class Interrupt(Exception):
        pass

    def stop_after_two(line):
        if line.startswith("step 2"):
            raise Interrupt
    with pytest.raises(Interrupt):
        greedy_search(params, PLANTED, batches, min_full=2, path_file=path, progress=stop_after_two)
    saved = json.loads(path.read_text())
    assert [s["num_full"] for s in saved["steps"]] == [6, 5, 4]
    lines = []
    resumed = greedy_search(params, PLANTED, batches, min_full=2, path_file=path, progress=lines.append)
    assert lines[0].startswith("resuming") and resumed.steps[-1].pattern == "FSSFSS"
    assert resumed.evaluations == 1 + 5 + 4 + 3 + 2
    other = init_params(PLANTED, seed=6)
    with pytest.raises(ValueError, match="another model or calibration set"):
        greedy_search(other, PLANTED, batches, min_full=2, path_file=path, progress=None)


def test_full_layers_for_matches_uniform_interleave():
    assert [full_layers_for(r, 8) for r in (1, 0.5, 0.25, 0.125, 0.01)] == [8, 4, 2, 1, 1]
    with pytest.raises(ValueError, match="retention"):
        full_layers_for(0, 8)


def test_overlap_matrix_on_hand_made_sets():
    # 3 layers, 1 row, 4 tokens, K = 2; tokens 0..1 see at most 2 keys (excluded with min_position=2).
    a = np.array([[[0, -1], [0, 1], [0, 1], [1, 3]]])
    b = np.array([[[0, -1], [0, 1], [0, 2], [2, 3]]])  # shares 1 of 2 at tokens 2 and 3
    c = np.array([[[0, -1], [0, 1], [1, 2], [0, 2]]])  # with a: 1 of 2 at token 2, none at 3; with b: 1 of 2
    got = overlap_matrix(np.stack([a, b, c]), num_keys=4, min_position=2)
    want = np.array([[1, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 1]])
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(overlap_matrix(np.stack([a, b]), num_keys=4)[0, 1], (1 + 1 + 0.5 + 0.5) / 4)
    with pytest.raises(ValueError, match="no token at position"):
        overlap_matrix(np.stack([a, b]), num_keys=4, min_position=4)


def test_layer_overlap_of_identical_layers_is_one_and_of_the_shared_pattern_is_exact(planted):
    params, batches = planted
    overlap = layer_overlap(params, PLANTED, batches)
    assert overlap.shape == (6, 6)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    assert np.all((overlap >= 0) & (overlap <= 1)) and overlap.min() < 1  # random indexers disagree


def test_retrieval_tasks_are_deterministic_and_well_formed():
    a = retrieval_tasks([96, 128], [0.1, 0.9], per_cell=3, seed=4)
    b = retrieval_tasks([96, 128], [0.1, 0.9], per_cell=3, seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    assert [t.tokens.shape for t in a] == [(6, 96), (6, 128)]
    doc = bytes(a[1].tokens[0].astype(np.uint8))
    answer = doc[-ANSWER_DIGITS:]
    assert answer.isdigit() and doc[:-ANSWER_DIGITS].endswith(PASSKEY_QUESTION)
    assert doc.index(b"The pass key is " + answer) < 0.3 * len(doc)  # depth 0.1
    assert not np.array_equal(a[0].tokens, retrieval_tasks([96], [0.1, 0.9], 3, seed=5)[0].tokens)


def test_retrieval_accuracy_counts_teacher_forced_answer_digits():
    config = dataclasses.replace(PLANTED, vocab_size=256, max_position_embeddings=256)
    params = init_params(config, seed=1)
    tasks = retrieval_tasks([96], [0.5], per_cell=4, seed=0)
    flags = pattern_flags("FSFSFS", config)
    logits = forward(params, tasks[0].tokens[:, :-1], flags, config=config)
    manual = np.argmax(np.asarray(logits)[:, -ANSWER_DIGITS:], -1) == tasks[0].tokens[:, -ANSWER_DIGITS:]
    np.testing.assert_array_equal(_answer_hits(params, jnp.asarray(tasks[0].tokens), flags, config=config), manual)
    # Make the answers right by construction: a task whose "answer" is what the model predicts.
    forged = tasks[0].tokens.copy()
    forged[:, -ANSWER_DIGITS:] = np.argmax(np.asarray(logits)[:, -ANSWER_DIGITS:], -1)
    teacher_forced_ok = np.all(np.argmax(np.asarray(forward(params, forged[:, :-1], flags, config=config))
                                         [:, -ANSWER_DIGITS:], -1) == forged[:, -ANSWER_DIGITS:], axis=1)
    report = retrieval_accuracy(params, config, [dataclasses.replace(tasks[0], tokens=forged)], "FSFSFS")
    assert report["accuracy"] == pytest.approx(teacher_forced_ok.mean())
    assert report["cells"] == [{"length": 96, "depth": 0.5, "accuracy": report["accuracy"]}]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        retrieval_accuracy(params, config, retrieval_tasks([300], [0.5], 1), "FSFSFS")


def test_cli_search_and_eval_write_their_outputs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = dataclasses.replace(PLANTED, vocab_size=256, max_position_embeddings=256)
    model = save_model(tmp_path / "model", Config(model=config), init_params(config, seed=0))
    data = ["--seq-len", "96", "--batch-size", "2", "--num-seqs", "4", "--embedded-bytes", "100000"]
    assert cli.main(["search", "--model", str(model), "--retain", "0.5,0.34", "--out", str(tmp_path / "s.json"),
                     *data]) == 0
    out = capsys.readouterr().out
    assert "retention 0.5 (3 Full)" in out and "retention 0.34 (2 Full)" in out
    steps = json.loads((tmp_path / "s.json").read_text())["steps"]
    assert [s["num_full"] for s in steps] == [6, 5, 4, 3, 2]
    assert cli.main(["eval", "--model", str(model), "--retain", "0.34", "--search", str(tmp_path / "s.json"),
                     "--lengths", "96", "--depths", "0.5", "--per-cell", "2", "--heatmap", str(tmp_path / "o.png"),
                     "--overlap-batches", "1", "--out", str(tmp_path / "r.json"), *data]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pattern"] == steps[-1]["pattern"]
    assert np.isfinite(report["lm"]["loss"]) and 0 <= report["retrieval"]["accuracy"] <= 1
    assert np.array(report["overlap"]).shape == (6, 6)
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["eval", "--model", str(model), "--retain", "0.125", "--search", str(tmp_path / "s.json"),
                     *data]) == 2
    assert "no pattern with 1 Full layers" in capsys.readouterr().err
