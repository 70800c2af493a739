"""The few Pallas names that moved between jax releases (0.10 here and in CI, 0.11 on the GPU machine), and the
padding helpers every kernel wrapper shares.

The GPU kernels target Pallas's Triton backend: refs are pointers into HBM, block shapes must be powers of two,
and `dot` needs every dimension >= 16 (the tensor-core minimum), so the wrappers pad to those sizes.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # jax >= 0.7: masked loads and stores live in the Triton module
    from jax.experimental.pallas import triton as _pltriton
    load = _pltriton.load
    store = _pltriton.store
    _CompilerParams = getattr(_pltriton, "CompilerParams", None) or _pltriton.TritonCompilerParams
except (ImportError, AttributeError):  # older releases kept them in pallas itself
    load, store = pl.load, pl.store
    _CompilerParams = pl.TritonCompilerParams  # type: ignore[attr-defined]

DOT_MIN = 16  # smallest dimension a Triton tensor-core dot accepts
# Programs that fill a large GPU in one wave: two per SM of an H100 (132 SMs). Below this, kernels split their work
# further (decode's slot splits; the indexer's per-key-tile programs).
PROGRAMS_TO_FILL_GPU = 264


def compiler_params(num_warps: int, num_stages: int = 2):
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_size(n: int) -> int:
    """n rounded up to a power of two that a tensor-core dot accepts."""
    return max(DOT_MIN, next_pow2(n))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x, axis: int, size: int, value=0):
    """Pad x along `axis` at the end up to `size` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def skip_blocks_without_slots(idx_ref, block_k: int, body):
    """body(j, carry), the step of a fori_loop over blocks of block_k slot ids in idx_ref, made to pass the carry
    through unchanged where block j holds no valid (>= 0) id. In a causal sequence the lists of the first K tokens
    end in blocks of -1 slots; a backward kernel that sends their atomic adds to a sink row has every program
    hammer that one row at once."""
    def step(j, carry):
        ids = idx_ref[pl.ds(j * block_k, block_k)]
        return lax.cond(jnp.max(ids) >= 0, lambda c: body(j, c), lambda c: c, carry)
    return step
