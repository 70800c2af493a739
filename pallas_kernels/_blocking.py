"""Shared by the reference kernels: query blocking (bound memory by processing block_q queries at a time) and the
slot gather."""

import jax
import jax.numpy as jnp


def map_query_blocks(fn, block_q: int, blocked_args, fills):
    """Apply fn to [B, block_q, ...] slices of every array in `blocked_args` (all [B, T, ...]) in sequence.

    T is padded up to a multiple of block_q with `fills` (one per array; e.g. position -1 so padded queries see
    nothing) and the padding is cut from fn's output, an array or tuple of arrays that are each [B, block_q, ...].
    """
    batch, num_q = blocked_args[0].shape[:2]
    block_q = min(block_q, num_q)
    num_blocks = -(-num_q // block_q)
    pad = num_blocks * block_q - num_q

    def to_blocks(x, fill):  # [B,T,...] -> [nb,B,block_q,...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(batch, num_blocks, block_q, *x.shape[2:]), 1, 0)

    def from_blocks(x):  # [nb,B,block_q,...] -> [B,T,...]
        return jnp.moveaxis(x, 0, 1).reshape(batch, num_blocks * block_q, *x.shape[3:])[:, :num_q]

    out = jax.lax.map(lambda args: fn(*args), tuple(to_blocks(x, f) for x, f in zip(blocked_args, fills, strict=True)))
    return jax.tree.map(from_blocks, out)


def gather_slot_rows(rows, indices):
    """rows [B,S,X], indices int[B,T,K] -> [B,T,K,X], the rows each query's slots select (row 0 stands in for -1
    slots; callers mask them)."""
    return jax.vmap(lambda rows_b, idx_b: rows_b[jnp.where(idx_b >= 0, idx_b, 0)])(rows, indices)
