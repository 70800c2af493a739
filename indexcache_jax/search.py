"""Training-free IndexCache: the greedy, loss-driven search for a Full/Shared pattern (SPEC §2).

Start with every layer Full (layers without indexer weights, `model.shared_only_layers`, stay Shared). Each step
tries every remaining Full layer except layer 0 as Shared, evaluates the LM loss of each candidate on the
calibration batches and commits the lowest. The path passes through every number of Full layers, so one run
yields the patterns of several retention ratios. The pattern is a runtime input of one jitted loss function: the
whole search compiles once per batch shape.

The path is written as JSON after every step (atomically); rerunning with the same model and calibration data
resumes from it. A different model or calibration set is refused (its fingerprint differs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from indexcache_jax.config import ModelConfig
from indexcache_jax.configlib import to_mapping
from indexcache_jax.evaluate import lm_loss
from indexcache_jax.pattern import IndexCachePattern
from pallas_kernels.dispatch import ImplArg


@dataclasses.dataclass
class SearchStep:
    num_full: int
    pattern: str
    loss: float
    candidates: dict[int, float]  # layer made Shared -> calibration loss (empty for the starting pattern)
    seconds: float  # wall time of this step's evaluations


@dataclasses.dataclass
class SearchResult:
    steps: list[SearchStep]
    evaluations: int  # loss evaluations (patterns scored) over the whole path, resumed ones included
    seconds: float  # wall time over the whole path

    def step_with(self, num_full: int) -> SearchStep:
        for step in self.steps:
            if step.num_full == num_full:
                return step
        raise ValueError(f"the search path has no pattern with {num_full} Full layers "
                         f"(it reached {self.steps[-1].num_full})")

    def pattern_with(self, num_full: int) -> str:
        return self.step_with(num_full).pattern


def load_path(path: str | os.PathLike) -> tuple[SearchResult, Optional[str]]:
    """A search path JSON (as greedy_search writes it) -> (the result so far, its fingerprint)."""
    saved = json.loads(pathlib.Path(path).read_text())
    steps = [SearchStep(s["num_full"], s["pattern"], s["loss"], {int(k): v for k, v in s["candidates"].items()},
                        s["seconds"]) for s in saved["steps"]]
    return SearchResult(steps, saved["evaluations"], saved["seconds"]), saved.get("fingerprint")


def full_layers_for(retention: float, num_layers: int) -> int:
    """Number of Full layers kept at a retention ratio: round(retention * N), at least 1 (as
    IndexCachePattern.uniform, so searched and uniform patterns compare at equal cost)."""
    if not 0 < retention <= 1:
        raise ValueError(f"retention must be in (0, 1], got {retention}")
    return max(1, round(retention * num_layers))


def fingerprint(config: ModelConfig, params, batches: Sequence[np.ndarray]) -> str:
    """What a resumed search must share with the original: the model (config and a checksum of its weights) and
    the calibration tokens."""
    digest = hashlib.sha256(json.dumps(to_mapping(config), sort_keys=True, default=str).encode())
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    for batch in batches:
        digest.update(np.ascontiguousarray(batch, np.int32).tobytes())
    return digest.hexdigest()[:16]


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def greedy_search(params, config: ModelConfig, batches: Sequence[np.ndarray], *, min_full: int,
                  path_file: Optional[str | os.PathLike] = None, impl: ImplArg = None,
                  progress: Optional[Callable[[str], None]] = print) -> SearchResult:
    """Greedy path from all-Full down to `min_full` Full layers, scored by mean LM loss over `batches`."""
    n = config.num_layers
    if not 1 <= min_full <= n:
        raise ValueError(f"min_full must be in [1, {n}], got {min_full}")
    say = progress or (lambda _: None)
    stamp = fingerprint(config, params, batches)
    path_file = pathlib.Path(path_file) if path_file is not None else None
    steps, evaluations, spent = [], 0, 0.0
    if path_file is not None and path_file.exists():
        saved, saved_stamp = load_path(path_file)
        if saved_stamp != stamp:
            raise ValueError(f"{path_file}: this search path belongs to another model or calibration set "
                             f"(fingerprint {saved_stamp} != {stamp}); use another --out or delete it")
        steps, evaluations, spent = saved.steps, saved.evaluations, saved.seconds
        say(f"resuming the search from {path_file}: {steps[-1].num_full} Full layers, loss {steps[-1].loss:.4f}")

    def save():
        if path_file is not None:
            _write_atomic(path_file, json.dumps({
                "fingerprint": stamp, "num_layers": n, "evaluations": evaluations, "seconds": spent,
                "steps": [dataclasses.asdict(s) for s in steps]}, indent=1))

    def score(pattern: str) -> float:
        nonlocal evaluations
        evaluations += 1
        return lm_loss(params, config, batches, pattern, impl=impl)

    if not steps:
        start = "".join("S" if i in config.shared_only_layers else "F" for i in range(n))
        started = time.perf_counter()
        loss = score(start)
        seconds = time.perf_counter() - started
        spent += seconds
        steps.append(SearchStep(start.count("F"), start, loss, {}, seconds))
        save()
        say(f"start: {start} ({start.count('F')} Full) loss {loss:.4f}")
    while steps[-1].num_full > min_full:
        current = steps[-1].pattern
        started = time.perf_counter()
        candidates = {}
        for layer in range(1, n):
            if current[layer] != "F":
                continue
            candidate = current[:layer] + "S" + current[layer + 1:]
            candidates[layer] = score(candidate)
            say(f"  {steps[-1].num_full - 1} Full: try layer {layer} Shared -> {candidate} loss "
                f"{candidates[layer]:.4f}")
        if not candidates:
            break  # only layer 0 is Full
        best = min(candidates, key=candidates.get)  # ties: the lowest layer
        chosen = current[:best] + "S" + current[best + 1:]
        seconds = time.perf_counter() - started
        spent += seconds
        steps.append(SearchStep(chosen.count("F"), chosen, candidates[best], candidates, seconds))
        save()
        say(f"step {len(steps) - 1}: {chosen} ({chosen.count('F')} Full) loss {candidates[best]:.4f} "
            f"[{len(candidates)} candidates, {seconds:.1f}s]")
    IndexCachePattern(steps[-1].pattern)  # the result is a valid pattern
    return SearchResult(steps, evaluations, spent)
