"""Evaluation of a model under an IndexCache pattern: held-out LM loss, long-context passkey retrieval, and the
cross-layer overlap of the top-k sets (the paper's first finding).

Every function takes the pattern as runtime flags, so one compiled function serves every pattern (the greedy
search relies on this). Shapes: N layers, B batch, T tokens, K top-k slots, S keys.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.config import ModelConfig
from indexcache_jax.model import check_tokens, forward, layer_indices, next_token_loss, pattern_flags
from indexcache_jax.train.config import DataConfig
from indexcache_jax.train.data import load_sequences, passkey_document
from pallas_kernels.dispatch import ImplArg

ANSWER_DIGITS = 5  # passkey_document's answers are 5 digits, the last bytes of the document


# ---- held-out data -----------------------------------------------------------------------------------------------

def heldout_sequences(data: DataConfig, vocab_size: int, part: str) -> np.ndarray:
    """Half of the data's held-out split (never trained on): part "calib" (the greedy search's calibration set)
    or "eval" (evaluation), disjoint, int32[N, L+1]."""
    if part not in ("calib", "eval"):
        raise ValueError(f"part must be 'calib' or 'eval', got {part!r}")
    heldout = load_sequences(data, vocab_size).eval
    if len(heldout) < 2:
        raise ValueError(f"data: the held-out split has {len(heldout)} sequence(s); raise data.eval_fraction or the "
                         f"amount of data so that calibration and evaluation each get one")
    half = len(heldout) // 2
    return heldout[:half] if part == "calib" else heldout[half:]


def as_batches(sequences: np.ndarray, batch_size: int, max_sequences: Optional[int] = None) -> list[np.ndarray]:
    """Consecutive batches [batch_size, L+1] (the last partial batch is dropped so every batch compiles alike)."""
    sequences = sequences[:max_sequences] if max_sequences else sequences
    num = len(sequences) // batch_size
    if num == 0:
        raise ValueError(f"{len(sequences)} sequences do not fill one batch of {batch_size}")
    return [sequences[i * batch_size:(i + 1) * batch_size] for i in range(num)]


# ---- LM loss ---------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "impl"))
def batch_lm_loss(params, tokens, flags, *, config: ModelConfig, impl: ImplArg = None):
    """Mean next-token cross-entropy of tokens int32[B, L+1] under runtime pattern flags bool[N]."""
    return next_token_loss(forward(params, tokens[:, :-1], flags, config=config, impl=impl), tokens)


def lm_loss(params, config: ModelConfig, batches: Sequence[np.ndarray], pattern=None, *, impl=None) -> float:
    """Mean LM loss over equal-sized batches."""
    flags = pattern_flags(pattern, config)
    return float(np.mean([float(batch_lm_loss(params, jnp.asarray(b), flags, config=config, impl=impl))
                          for b in batches]))


# ---- passkey retrieval -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RetrievalTasks:
    """Passkey documents (train/data.py's format): tokens uint8-as-int32[M, length], answer digits at the end."""

    length: int
    depths: np.ndarray  # f32[M] where the needle sits in the filler (0 = start, 1 = end)
    tokens: np.ndarray  # int32[M, length]


def retrieval_tasks(lengths: Sequence[int], depths: Sequence[float], per_cell: int, seed: int = 0) \
        -> list[RetrievalTasks]:
    """`per_cell` documents for every (length, depth), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        docs, cell_depths = [], []
        for depth in depths:
            for _ in range(per_cell):
                docs.append(np.frombuffer(passkey_document(rng, length, depth)[0], np.uint8))
                cell_depths.append(depth)
        out.append(RetrievalTasks(length, np.asarray(cell_depths, np.float32), np.stack(docs).astype(np.int32)))
    return out


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def _answer_hits(params, tokens, flags, *, config, impl=None):
    """bool[B, 5]: does the greedy prediction at each answer position equal the answer digit (teacher-forced)?"""
    logits = forward(params, tokens[:, :-1], flags, config=config, impl=impl)[:, -ANSWER_DIGITS:]
    return jnp.argmax(logits, axis=-1) == tokens[:, -ANSWER_DIGITS:]


def retrieval_accuracy(params, config: ModelConfig, tasks: Sequence[RetrievalTasks], pattern=None, *,
                       batch_size: int = 16, impl=None) -> dict:
    """Exact-match accuracy of the 5 answer digits. Teacher-forced argmax at every answer position equals greedy
    generation for exact match (the first wrong digit fails both), and costs one forward pass.
    -> {"accuracy", "digit_accuracy", "cells": [{"length", "depth", "accuracy"}]}"""
    if config.vocab_size < 256:
        raise ValueError(f"passkey retrieval is byte-level: needs model.vocab_size >= 256, got {config.vocab_size}")
    flags = pattern_flags(pattern, config)
    cells, exact, digits = [], [], []
    for task in tasks:
        if task.length > config.max_position_embeddings:
            raise ValueError(f"retrieval length {task.length} exceeds model.max_position_embeddings "
                             f"{config.max_position_embeddings}")
        hits = np.concatenate([np.asarray(_answer_hits(params, jnp.asarray(task.tokens[i:i + batch_size]), flags,
                                                       config=config, impl=impl))
                               for i in range(0, len(task.tokens), batch_size)])
        exact.append(hits.all(axis=1))
        digits.append(hits.mean(axis=1))
        for depth in np.unique(task.depths):
            cells.append({"length": task.length, "depth": float(depth),
                          "accuracy": float(hits.all(axis=1)[task.depths == depth].mean())})
    return {"accuracy": float(np.concatenate(exact).mean()), "digit_accuracy": float(np.concatenate(digits).mean()),
            "cells": cells}


# ---- cross-layer overlap ----------------------------------------------------------------------------------------

def overlap_matrix(indices: np.ndarray, num_keys: int, min_position: int = 0) -> np.ndarray:
    """Fraction of shared indices between every pair of layers: indices int32[N,B,T,K] (-1 = empty) ->
    f32[N,N] with [i,j] = mean over tokens t >= min_position of |S_i(t) & S_j(t)| / |S_i(t)|.

    Pass min_position = K: before that every visible token is selected and the overlap is trivially 1."""
    indices = np.asarray(indices)
    num_layers = indices.shape[0]
    indices = indices[:, :, min_position:]  # [N,B,T',K]
    if indices.shape[2] == 0:
        raise ValueError(f"no token at position >= {min_position}: use longer sequences")
    flat = indices.reshape(num_layers, -1, indices.shape[-1])  # [N,X,K]
    member = np.zeros((num_layers, flat.shape[1], num_keys + 1), np.float32)  # slot num_keys absorbs the -1s
    np.put_along_axis(member, np.where(flat >= 0, flat, num_keys), 1.0, axis=2)
    member = member[..., :num_keys]
    counts = member.sum(-1)  # [N,X]
    shared = np.einsum("nxs,mxs->nmx", member, member)
    return (shared / np.maximum(counts[:, None, :], 1)).mean(-1)


def layer_overlap(params, config: ModelConfig, batches: Sequence[np.ndarray], *, impl=None) -> np.ndarray:
    """overlap_matrix of the all-Full model (every layer its own indexer) over the batches' inputs."""
    mats = []
    for batch in batches:
        tokens = jnp.asarray(batch[:, :-1])
        check_tokens(tokens, config)
        num_keys = tokens.shape[1]
        idx = layer_indices(params, tokens, None, config=config, impl=impl)
        mats.append(overlap_matrix(np.asarray(idx), num_keys, min_position=config.topk_for(num_keys)))
    return np.mean(mats, axis=0)


def save_heatmap(matrix: np.ndarray, path: str | pathlib.Path, title: str) -> pathlib.Path:
    """A labelled heat map PNG of an [N,N] matrix in [0,1] (needs matplotlib: pip install 'indexcache-jax[plots]')."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as err:
        raise ValueError("the heat map needs matplotlib: pip install 'indexcache-jax[plots]'") from err
    path = pathlib.Path(path)
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.45 * n))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] < 0.6 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
