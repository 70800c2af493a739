"""Helpers of `scripts/bench_kernels.py` whose output goes into docs/BENCHMARKS.md: the causal slot ids of the
measured whole-layer sparse prefill, and the nvidia-smi power sampler's summary; and `scripts/bench_train.py`
run end to end on the tiny model."""

import importlib.util
import json
import os
import pathlib
import re
import stat
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_kernels")


@pytest.fixture(scope="module")
def xla_profile():
    return load_script("xla_profile")


def test_causal_slot_ids_select_only_visible_keys_and_all_of_them_while_fewer_than_k(bench):
    s, k = 40, 8
    ids = np.asarray(bench.causal_slot_ids(jax.random.key(3), s, k))
    assert ids.shape == (1, s, k) and ids.dtype == np.int32
    for t, row in enumerate(ids[0]):
        if t < k:  # a causal top-k sees t + 1 keys and takes them all
            np.testing.assert_array_equal(row, np.where(np.arange(k) <= t, np.arange(k), -1))
        else:
            assert (row >= 0).all() and (row <= t).all() and (np.diff(row) >= 0).all(), (t, row)
    late = ids[0, k:]
    # random, not a fixed pattern: the late rows draw over their whole visible range
    assert len(np.unique(late)) > s // 2 and late.max() > s * 3 // 4


def test_power_sampler_summarises_what_nvidia_smi_prints_and_is_none_without_it(bench, tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '1980, 150.5, Not Active\\n1530, 690.0, Active\\n1600, 650.0, Active\\n"
                    "[N/A], [N/A], [N/A]\\n'\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with bench.PowerSampler() as power:
        time.sleep(0.5)  # let the fake print before it is stopped
    assert power.summary == ("SM clock median 1600 MHz (lowest 1530), power median 650 W, power cap 2 of 3 "
                             "samples")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with bench.PowerSampler() as power:
        pass
    assert power.summary is None


def test_timed_steady_runs_for_its_warm_up_before_timing_and_times_the_calls(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi: the summary is None
    starts = []

    def call(x):
        starts.append(time.perf_counter())
        time.sleep(0.004)
        return x + 1

    begin = time.perf_counter()
    seconds, summary = bench.timed_steady(call, np.float32(2.0), seconds=0.3)
    warm_end = begin + 0.3
    timed_calls = [t for t in starts if t >= warm_end]
    assert summary is None
    # warmed for the full 0.3 s, then timed over about as long again, each timed call ~4 ms
    assert len(starts) - len(timed_calls) >= 0.3 / 0.006 and len(timed_calls) >= 5
    assert 0.004 <= seconds < 0.02


def test_train_bench_runs_the_job_step_and_query_chunks_need_less_memory(xla_profile, tmp_path):
    """scripts/bench_train.py on the tiny config: each query chunk's run compiles and times the job's step; chunks
    train the same (same loss after the same steps) with less compiled memory than none; the JSON file holds what
    was printed. The other stages' patterns with layer remat, compiled only (--impl reference). (The job's step
    with layer remat, its loss and memory, are tested in tests/test_remat.py: not timed here again, as each run is
    a compile of the whole step.)"""
    bench_train = load_script("bench_train")
    out = tmp_path / "train.json"
    common = ["--config", str(REPO / "configs" / "tiny.yaml"), "--contexts", "96", "--layers", "3"]
    runs = bench_train.main(common + ["--steps", "1", "--stages", "indexcache", "--remat", "none",
                                      "--query-chunks", "0", "32", "--json", str(out),
                                      "--profile", str(tmp_path / "traces")])
    assert [(r["stage"], r["remat"], r["query_chunk"], r["pattern"]) for r in runs] == [
        ("indexcache", "none", chunk, "FSS") for chunk in (0, 32)]
    plain, chunked = runs
    assert plain["step_ms"] > 0 and np.isfinite(plain["loss"]) and chunked["step_ms"] > 0
    assert abs(chunked["first_loss"] - plain["first_loss"]) <= 1e-5 * abs(plain["first_loss"]), runs
    assert abs(chunked["loss"] - plain["loss"]) <= 1e-3, runs
    assert chunked["compiled_temp_bytes"] < 0.8 * plain["compiled_temp_bytes"], runs
    for run in runs:  # --profile: one more step's ops, by our source lines, the backward's among them
        rows = run["profile"]["by_source"]
        assert run["profile"]["op_ms"] > 0 and abs(sum(r["share"] for r in rows) - 1) < 0.01, rows
        assert any(r["source"].startswith("indexcache_jax/") and "[transpose]" in r["primitive"] for r in rows), rows
        kernel_rows = run["profile"]["by_kernel"]
        assert kernel_rows and abs(sum(r["share"] for r in kernel_rows) - 1) < 0.01, kernel_rows
        trace = pathlib.Path(run["profile"]["trace"])  # read again later from the kept HLO, without the step
        hlo = (trace / "step.hlo.txt").read_text()
        assert xla_profile.by_source(xla_profile.op_times(xla_profile.trace_file(trace), xla_profile.module_name(hlo)),
                                     xla_profile.op_sources(hlo)) == rows
    compiled = bench_train.main(common + ["--stages", "sparse", "dense_warmup", "dense", "--remat", "layer",
                                          "--query-chunks", "32", "--compile-only", "--impl", "reference"])
    assert [(r["stage"], r["pattern"]) for r in compiled] == [("sparse", "FFF"), ("dense_warmup", "FFF"),
                                                              ("dense", "FFF")]
    assert all(r["compiled_temp_bytes"] > 0 and "step_ms" not in r for r in compiled)
    assert json.loads(out.read_text())["runs"] == runs


def big_and_small(a, b, c):
    big = jnp.einsum("ij,jk->ik", a, b)
    small = jnp.einsum("ij,jk->ik", c, c)
    fused = jnp.tanh(b @ a).sum()  # on a CPU one fusion, whose own metadata is the sum's
    return jax.grad(lambda a: jnp.sum(jnp.sin(a @ b)))(big).sum() + small.sum() + fused


def test_xla_profile_gives_each_source_line_its_ops_device_time(xla_profile, tmp_path):
    """scripts/xla_profile.py on a CPU trace: the ops of `big_and_small` grouped by line and primitive, the
    backward's dot marked as a transpose, a fusion around a dot counted as the dot; a [1024]^3 product takes far
    longer than a [32]^3 one."""
    a = jax.random.normal(jax.random.key(0), (1024, 1024))
    c = a[:32, :32] * 0.5
    compiled = jax.jit(big_and_small).lower(a, a, c).compile()
    jax.block_until_ready(compiled(a, a, c))
    with jax.profiler.trace(str(tmp_path / "step")):
        jax.block_until_ready(compiled(a, a, c))
    with jax.profiler.trace(str(tmp_path / "other")):  # another module's ops only
        jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x @ x).sum())(a))
    hlo = compiled.as_text()
    times = xla_profile.op_times(xla_profile.trace_file(tmp_path / "step"), xla_profile.module_name(hlo))
    assert times == xla_profile.op_times(xla_profile.trace_file(tmp_path / "step")) and times
    assert xla_profile.module_name(hlo) == "jit_big_and_small"
    assert xla_profile.op_times(xla_profile.trace_file(tmp_path / "other"), xla_profile.module_name(hlo)) == {}
    rows = xla_profile.by_source(times, xla_profile.op_sources(hlo))
    line = big_and_small.__code__.co_firstlineno
    ms = {(r["source"].split()[0], r["primitive"]): r["ms"] for r in rows}
    here = "tests/test_bench_helpers.py"
    big, small = (ms[(f"{here}:{line + i}", "ij,jk->ik dot_general")] for i in (1, 2))
    assert big > 20 * small > 0, rows
    assert ms[(f"{here}:{line + 3}", "dot_general")] > 20 * small, rows  # the fusion counts as its dot
    assert ms[(f"{here}:{line + 4}", "dot_general [transpose]")] > 20 * small, rows
    assert abs(sum(r["share"] for r in rows) - 1) < 0.01, rows
    # By kernel: the same events under their own names, the same total; a bad key is named.
    kernels = xla_profile.op_times(xla_profile.trace_file(tmp_path / "step"), xla_profile.module_name(hlo),
                                   by="kernel")
    assert kernels and abs(sum(ns for ns, _ in kernels.values()) - sum(ns for ns, _ in times.values())) < 1e-3
    kernel_rows = xla_profile.by_kernel(kernels, top=2)
    assert len(kernel_rows) == min(3, len(kernels)) and abs(sum(r["share"] for r in kernel_rows) - 1) < 0.01
    assert kernel_rows[0]["ms"] >= kernel_rows[1]["ms"]
    with pytest.raises(ValueError, match="'ops'"):
        xla_profile.op_times(xla_profile.trace_file(tmp_path / "step"), by="ops")
    # A GPU profile's compile turns command buffers off; XLA parses and checks the option on any backend (a wrong
    # name or value raises), so the CPU checks what the GPU will be given.
    assert xla_profile.profile_compiler_options("cpu") == {}
    gpu_options = xla_profile.profile_compiler_options("gpu")
    assert gpu_options == {"xla_gpu_enable_command_buffer": ""}
    assert np.allclose(jax.jit(big_and_small).lower(a, a, c).compile(gpu_options)(a, a, c), compiled(a, a, c))
    with pytest.raises(FileNotFoundError, match="xplane"):
        xla_profile.trace_file(tmp_path / "empty")
    with pytest.raises(ValueError, match="HloModule"):
        xla_profile.module_name("module { func.func @main() }")


def test_xla_profile_counts_a_loops_event_without_its_bodys(xla_profile):
    """On a host line a while loop's event spans its body's ops: each op keeps its own time alone (a loop of
    100 ns around ops of 30 and 50 ns, one of them around one of 20, and a later op of 10); lines derived from the
    kernels' count only where there is nothing else."""
    import types

    def event(start, duration, op):
        return types.SimpleNamespace(start_ns=start, duration_ns=duration, name=f"kernel_of_{op}",
                                     stats=[("hlo_op", op)] if op else [])
    events = [event(0, 100, "while.1"), event(10, 30, "fusion.2"), event(50, 50, "call.3"), event(60, 20, "dot.4"),
              event(55, 1, None), event(200, 10, "fusion.2")]
    assert sorted(xla_profile._self_times(events)) == sorted([("while.1", 20), ("fusion.2", 30), ("call.3", 30),
                                                              ("dot.4", 20), ("fusion.2", 10)])
    # by="kernel": the same times under the events' own names
    assert sorted(xla_profile._self_times(events, by="kernel")) == sorted(
        (f"kernel_of_{op}", ns) for op, ns in xla_profile._self_times(events))
    # Events that do not name their module are kept under any module's name (not dropped for it).
    assert xla_profile._self_times(events, "jit_step") == xla_profile._self_times(events)
    # A derived "XLA Ops" line repeats the kernels' ops: counted only where a device has nothing else (a TPU).
    line = types.SimpleNamespace
    gpu = types.SimpleNamespace(lines=[line(name="Stream #1", events=events[1:2]),
                                       line(name="XLA Ops", events=events[1:2])])
    tpu = types.SimpleNamespace(lines=[line(name="XLA Ops", events=events[3:4]), line(name="Steps", events=events)])
    assert xla_profile._hlo_op_events([gpu]) == {"fusion.2": (30, 1)}
    assert xla_profile._hlo_op_events([tpu]) == {"dot.4": (20, 1)}


def _bench_dense():
    return load_script("bench_dense")


def test_dense_bench_tilings_set_all_kernels_or_some_and_name_a_bad_entry():
    """--tiles entries: "default", one tile for all three kernels, or some kernels' own with the others at their
    defaults; a malformed entry's error names it."""
    from pallas_kernels.dense_attention import BACKWARD_TILES, DISTRIBUTION_TILES, FORWARD_TILES
    parse = _bench_dense().parse_tiling
    defaults = dict(forward=list(FORWARD_TILES), backward=list(BACKWARD_TILES), distribution=list(DISTRIBUTION_TILES))
    assert parse("default") == defaults
    assert parse("32,16,2") == dict(forward=[32, 16, 2], backward=[32, 16, 2], distribution=[32, 16, 2])
    assert parse("distribution=32,16,2") == {**defaults, "distribution": [32, 16, 2]}
    assert parse("distribution=32,16,2+forward=16,64,8") == {**defaults, "distribution": [32, 16, 2],
                                                              "forward": [16, 64, 8]}
    for bad, named in [("32,16", "'32,16'"), ("64,64,x", "'64,64,x'"), ("dist=64,64,4", "'dist'"),
                       ("forward=64,64", "'64,64'"), ("forward=64,64,4+", "''")]:
        with pytest.raises(ValueError, match=f"--tiles .*{re.escape(named)}"):
            parse(bad)


def test_dense_bench_checks_and_times_a_chunk_and_a_whole_layer(tmp_path):
    """scripts/bench_dense.py in interpret mode at a tiny shape: the last chunk is checked against the reference
    (small errors recorded) and timed, and a whole layer is timed as its chunks (the backward too); the JSON holds
    what was printed."""
    bench_dense = _bench_dense()
    out = tmp_path / "dense.json"
    runs = bench_dense.main(["--interpret", "--heads", "4", "--widths", "16", "16", "16", "--contexts", "96",
                             "--chunk", "32", "--tiles", "32,32,4", "--layer", "--backward", "--repeats", "1", "--json",
                             str(out)])
    chunk, layer = runs
    assert (chunk["keys"], chunk["queries"], chunk["first_position"]) == (96, 32, 64)
    assert chunk["out_rel_err"] < 2e-2 and chunk["dist_rel_err"] < 2e-2
    assert chunk["forward_ms"] > 0 and chunk["distribution_ms"] > 0 and chunk["reference_ms"] > 0
    assert chunk["backward_ms"] > 0 and chunk["forward_kernel"] == chunk["backward_kernel"] == "pallas"
    assert chunk["distribution_kernel"] == layer["distribution_kernel"] == "pallas"  # the interpreter's
    # The layer is its three chunks, each timed (the last one again: compared with `chunk` it would compare two
    # timings of one interpreted call, which on a loaded 2-core machine differ either way).
    assert layer["whole_layer"] and len(layer["chunk_forward_ms"]) == len(layer["chunk_distribution_ms"]) == 3
    assert all(ms > 0 for ms in layer["chunk_forward_ms"] + layer["chunk_distribution_ms"])
    assert layer["forward_ms"] == round(sum(layer["chunk_forward_ms"]), 2) >= max(layer["chunk_forward_ms"])
    assert layer["distribution_ms"] == round(sum(layer["chunk_distribution_ms"]), 2)
    assert len(layer["chunk_backward_ms"]) == 3 and all(ms > 0 for ms in layer["chunk_backward_ms"])
    assert layer["backward_ms"] == round(sum(layer["chunk_backward_ms"]), 2) and layer["backward_kernel"] == "pallas"
    assert bench_dense.visible_pairs(64, 32) == 32 * 65 + 32 * 31 // 2
    written = json.loads(out.read_text())
    assert written["runs"] == runs and written["header"]["date"]
