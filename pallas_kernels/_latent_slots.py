"""A sparse MLA program's view of one token's slots: its slot ids, and the latent rows they select gathered from
the cache in column pieces, for the forward and both backward kernels.

Why pieces: a whole [block_k, R] gather (R = 512) with a matching [heads, R] fp32 accumulator kept Triton's
register allocation above its 255-per-thread limit (an H100 profile at 32K: 10.5M local-memory spill requests
in the forward). Gathered and used VALUE_PIECE columns at a time, each piece with its own slice of the
accumulator, the forward went from 200 to 254 TFLOP/s and spilled 20x less (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._pallas import load

VALUE_PIECE = 64  # latent columns per gathered piece (an H100 sweep of 32, 64, 128, 256, 512)


class LatentSlots:
    """kv_ref [S, R+P] (one row's cache), idx_ref [K] (slot ids, -1 = none); R and P powers of two >= 16."""

    def __init__(self, kv_ref, idx_ref, *, value_dim: int, rope_dim: int, block_k: int, num_keys: int):
        self.kv_ref, self.idx_ref, self.block_k, self.num_keys = kv_ref, idx_ref, block_k, num_keys
        self.value_dim, self.rope_dim = value_dim, rope_dim
        self.piece = min(VALUE_PIECE, value_dim)
        self.starts = tuple(range(0, value_dim, self.piece))  # first column of each value piece

    @property
    def num_blocks(self) -> int:
        return self.idx_ref.shape[0] // self.block_k

    def columns(self, start: int, width: int):
        return start + lax.iota(jnp.int32, width)

    def gather(self, j):
        """Slot block j -> (ids int32[block_k], value pieces [[block_k, piece]] (the first R columns), k_rope
        [block_k, P]). -1 slots read row 0: the caller masks them."""
        ids = self.idx_ref[pl.ds(j * self.block_k, self.block_k)]
        rows = jnp.clip(ids, 0, self.num_keys - 1)[:, None]
        # Both indices are arrays (row ids x column ids), the form the Triton lowering turns into one pointer
        # tensor and the interpreter into one NumPy-style gather.
        values = [load(self.kv_ref.at[rows, self.columns(start, self.piece)[None, :]]) for start in self.starts]
        k_rope = load(self.kv_ref.at[rows, self.columns(self.value_dim, self.rope_dim)[None, :]])
        return ids, values, k_rope

    def dot_rows(self, ref, heads, values, k_rope, *, precision, with_rope: bool = True):
        """sum over the latent columns of ref[heads] x the gathered rows -> f32 [Hb, block_k]. ref [H, >= R(+P)]
        is read piece by piece where each dot needs it, not held across the slot loop (q, or dO with
        with_rope=False)."""
        def dot(a, b):
            return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                   precision=precision)
        total = dot(ref[heads, pl.ds(self.value_dim, self.rope_dim)], k_rope) if with_rope else None
        for start, piece in zip(self.starts, values, strict=True):
            part = dot(ref[heads, pl.ds(start, self.piece)], piece)
            total = part if total is None else total + part
        return total
