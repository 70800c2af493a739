"""Shared fixtures: small models whose shapes make every code path matter (top-k < context, MoE after a dense
first layer, Shared layers), and the --runslow switch."""

import dataclasses
import gc
import importlib.metadata
import os
import pathlib
import tempfile


def _cpu_only() -> bool:
    """JAX is told to use the CPU, or no GPU plugin is installed."""
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        return True
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return not any(name.lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm")) for name in names)


if _cpu_only():
    # Before jax starts its backend, and inherited by the CLI subprocesses of the job tests. The tests compile
    # hundreds of small programs and run most once: LLVM's optimisation of the CPU code costs more than it saves
    # (docs/BENCHMARKS.md, session 54). It changes the machine code, not XLA's buffers or what is computed. Session
    # 36 set it first; the worker crashes that followed (for which 8643e75 dropped it) were workers past
    # vm.max_map_count, which `_release_compiled_programs` prevents (session 53).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import hypothesis  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from indexcache_jax import ModelConfig, MoEConfig, init_params  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

jax.config.update("jax_enable_x64", False)


def pytest_configure(config):
    """One persistent compilation cache for the session's processes (xdist workers and the CLI subprocesses the
    job tests start, through the environment): many tests compile the same small training step."""
    cache_dir = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(
        pathlib.Path(tempfile.gettempdir()) / f"indexcache-jax-test-xla-cache-{os.getuid()}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    hypothesis.settings.load_profile("runslow" if config.getoption("--runslow") else "default_suite")


# Property tests that leave max_examples to the profile compile a kernel per example (interpret mode): few by
# default, to keep the suite within CI's time; `--runslow` draws more.
hypothesis.settings.register_profile("default_suite", max_examples=6)
hypothesis.settings.register_profile("runslow", max_examples=24)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test file, drop JAX's caches of compiled programs. Why: every CPU executable that stays alive
    keeps its code mapped (a few memory maps for a small function, hundreds for a model's gradient), and a process
    may hold at most vm.max_map_count maps (65530 by default). An xdist worker that runs half the suite kept
    everything it compiled (jit caches), passed that limit late in the suite, and then XLA crashed with a
    segmentation fault wherever it next mapped code: in a compile, or loading from the persistent cache. Session 53
    reproduced it by lowering the limit to 9000 (test_query_chunks.py and test_remat.py alone reach 14,000 maps in
    one process). Programs a later file needs again load from the persistent cache."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    no_gpu = not any(d.platform == "gpu" for d in jax.devices())
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and no_gpu:
            item.add_marker(skip_gpu)


SMALL = ModelConfig(
    vocab_size=61, hidden_size=32, num_layers=4, num_heads=4, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=4, index_head_dim=16, index_topk=4,
    intermediate_size=48, initializer_range=0.2,
    moe=MoEConfig(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                  n_group=4, topk_group=2, routed_scaling_factor=1.5, first_k_dense_replace=1))


@pytest.fixture(scope="session")
def small_config() -> ModelConfig:
    """4 layers (1 dense + 3 MoE), top-4 selection; large init so layers differ and routing is not uniform."""
    return SMALL


@pytest.fixture(scope="session")
def small_params(small_config):
    return init_params(small_config, seed=0)


DENSE = dataclasses.replace(SMALL, moe=None)


@pytest.fixture(scope="session")
def dense_config() -> ModelConfig:
    """The small model with a dense FFN in every layer (one layer run, no MoE)."""
    return DENSE


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, computed in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_kernel_choice_rules(choose, which: str) -> None:
    """The rules every Gluon-or-Pallas resolver follows (`sparse_attention.resolve_kernel_choice`), for inputs its
    Gluon kernel takes. choose(kernel, interpret) -> "gluon" or "pallas"; which: the option's name in errors."""
    assert choose("pallas", False) == "pallas"
    assert choose("auto", True) == "pallas"  # the interpreter runs Pallas kernels only
    with pytest.raises(ValueError, match=f"{which} must be one of"):
        choose("cuda", False)
    with pytest.raises(ValueError, match=f"{which}='gluon' cannot run: the Pallas interpreter"):
        choose("gluon", True)
    if jax.default_backend() != "gpu":
        assert choose("auto", False) == "pallas"
        with pytest.raises(ValueError, match=f"{which}='gluon' cannot run: the default backend"):
            choose("gluon", False)
