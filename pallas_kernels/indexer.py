"""Lightning-indexer scores on the GPU, fused: the per-head logits never reach HBM (SPEC §1).

    I[b,t,s] = sum_g w[b,t,g] * ReLU(q[b,t,g,:] . k[b,s,:])     for s <= pos[b,t], else -inf

A [block_q, block_k] tile is scored at once: the block_q queries' G heads form one [block_q*G, I] operand, so a
single tensor-core dot against the key tile gives every head's logits at once ([block_q*G, block_k], fp32
accumulation); ReLU, the head weights and the sum over heads happen in registers. Tiles wholly above the causal
diagonal are written as -inf without any arithmetic. For prefill one program loads a query tile once and walks all
its key tiles, so only keys stream from L2 (re-reading the query tile for every key tile had held bf16 at ~380
TFLOP/s); for decode, with too few query tiles to fill the GPU, one program takes one (key tile, query tile).
Shapes as in `indexer_reference`.

`indexer_topk_pallas` chunks the queries so that one chunk's scores ([B, chunk, S] fp32) stay under a memory
budget, scores each chunk with this kernel and selects with `topk.topk_pallas`, which stops each row at its
causal length. `indexer_scores_trainable` is the scores kernel with its backward (`indexer_backward`), for the
losses that differentiate the scores.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._blocking import map_query_blocks
from pallas_kernels._pallas import (PROGRAMS_TO_FILL_GPU, compiler_params, dot_size, next_pow2, pad_axis,
                                    round_up)
from pallas_kernels._triton_ops import fp8_dot_nt
from pallas_kernels.indexer_backward import indexer_scores_backward_call
from pallas_kernels.indexer_reference import check_fp8_head_sum, round_to_bf16, scored_inputs
from pallas_kernels.sparse_attention import GLUON_DTYPES
from pallas_kernels.topk import topk_pallas


def _to_bf16_and_back(x, interpret: bool):
    """x f32 rounded to bf16 (nearest, ties to even), in f32: the same rounding either way. Triton lowers the astype
    pair to cvt.rn.bf16x2.f32 and back; XLA, which runs the interpreter, may drop such a pair as excess precision,
    so there the bits are rounded (`round_to_bf16`; in Triton that ran at 472 TFLOP/s on an H100, the pair at
    596-600 on an H200). Either way this kernel with the bf16 head sum is slower than with the fp32 one (~900): on
    Hopper the fp8 default is the Gluon kernel (`indexer_gluon`); this one serves decode and other GPUs."""
    return round_to_bf16(x) if interpret else x.astype(jnp.bfloat16).astype(jnp.float32)


def _score_tile(head_group_of, groups: int, keys, key_scales, positions, first_key, *, block_q: int,
                block_k: int, heads_per_step: int, precision, epilogue: str, interpret: bool):
    """Scores of the tile's block_q queries against keys [block_k, I] (first id first_key) -> f32 [block_q,
    block_k], -inf where a key is past a query's position. head_group_of(g) -> (q [block_q*hg, I], w
    [block_q*hg]): head group g of the `groups`."""
    def head_group(g, acc):
        q_group, w_group = head_group_of(g)
        # logits^T [block_k, block_q*hg]: the head sum runs along the accumulator's columns, which a warp holds
        # (shuffles), instead of along its rows, which span warps (a trip through shared memory).
        if keys.dtype == jnp.float8_e4m3fn:  # the plain dot misses Hopper's fp8 tensor cores (_triton_ops)
            logits = fp8_dot_nt(keys, q_group)
        else:
            logits = lax.dot_general(keys, q_group, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                     precision=precision)
        relu, weights = jnp.maximum(logits, 0.0), w_group.astype(jnp.float32)
        if epilogue == "bf16_head_sum":  # the fp8 indexer's rounding (indexer_reference, indexer_gluon)
            relu, weights = _to_bf16_and_back(relu, interpret), _to_bf16_and_back(weights, interpret)
        weighted = relu * weights[None, :]
        if epilogue == "sum":  # profiling ablation only (head_sum_ablation)
            weighted = logits
        return acc + jnp.sum(weighted.reshape(block_k, block_q, heads_per_step), axis=2)

    scores = lax.fori_loop(0, groups, head_group, jnp.zeros((block_k, block_q), jnp.float32)).T
    if key_scales is not None:
        scores = scores * key_scales[None, :]
    key_ids = first_key + lax.iota(jnp.int32, block_k)
    return jnp.where(key_ids[None, :] <= positions[:, None], scores, -jnp.inf)


def _scores_kernel(q_ref, w_ref, k_ref, pos_ref, *refs, block_q: int, block_k: int, heads_per_step: int,
                   precision, epilogue: str, write_hidden: bool, interpret: bool):
    # One [block_q, block_k] tile per program. q_ref [n, block_q*hg, I] and w_ref [n, block_q*hg]: the tile's
    # queries x heads in n = G/hg head groups (rows query-major within a group); k_ref [block_k, I], pos_ref
    # [block_q], (fp8: k_scale_ref [block_k]), out_ref [block_q, block_k]
    *k_scale_ref, out_ref = refs
    first_key = pl.program_id(0) * block_k
    positions = pos_ref[...]
    last_visible = jnp.max(positions)

    if write_hidden:
        @pl.when(first_key > last_visible)
        def _():
            out_ref[...] = jnp.full((block_q, block_k), -jnp.inf, jnp.float32)

    @pl.when(first_key <= last_visible)
    def _():
        out_ref[...] = _score_tile(lambda g: (q_ref[g], w_ref[g]), q_ref.shape[0], k_ref[...],
                                   k_scale_ref[0][...] if k_scale_ref else None, positions, first_key,
                                   block_q=block_q, block_k=block_k,
                                   heads_per_step=heads_per_step, precision=precision, epilogue=epilogue,
                                   interpret=interpret)


def _scores_rows_kernel(q_ref, w_ref, k_ref, pos_ref, *refs, block_q: int, block_k: int, heads_per_step: int,
                        precision, epilogue: str, write_hidden: bool, interpret: bool):
    # One program per block_q queries, walking every key tile with the same query tile.
    # q_ref / w_ref as in _scores_kernel, k_ref [S', I] (the row's keys), pos_ref [block_q], (fp8: k_scale_ref
    # [S']), out_ref [block_q, S']
    *k_scale_ref, out_ref = refs
    positions = pos_ref[...]
    num_blocks = out_ref.shape[1] // block_k
    visible_blocks = jnp.minimum((jnp.max(positions) + block_k) // block_k, num_blocks)  # 0 for padded queries
    groups = q_ref.shape[0]
    if groups == 1:  # the default (all heads in one dot): load the query tile once, not once per key tile
        q_tile, w_tile = q_ref[0], w_ref[0]

        def head_group_of(g):
            return q_tile, w_tile
    else:
        def head_group_of(g):
            return q_ref[g], w_ref[g]

    # (The loops pass their carry through: with traced bounds a literal yield does not lower to Triton.)
    def visible(j, carry):
        keys = pl.ds(j * block_k, block_k)
        out_ref[:, keys] = _score_tile(head_group_of, groups, k_ref[keys, :],
                                       k_scale_ref[0][keys] if k_scale_ref else None, positions, j * block_k,
                                       block_q=block_q, block_k=block_k, heads_per_step=heads_per_step,
                                       precision=precision, epilogue=epilogue, interpret=interpret)
        return carry

    def hidden(j, carry):  # wholly above the causal diagonal: no arithmetic
        out_ref[:, pl.ds(j * block_k, block_k)] = jnp.full((block_q, block_k), -jnp.inf, jnp.float32)
        return carry

    lax.fori_loop(0, visible_blocks, visible, visible_blocks)
    if write_hidden:
        lax.fori_loop(visible_blocks, num_blocks, hidden, visible_blocks)


class _Tiling(NamedTuple):
    """How q [B,T,G,I] and k [B,S,I] are padded and tiled: a tile is block_q queries x block_k keys, and one dot
    covers rows = block_q queries x `step` heads (G padded to heads_p = groups * step)."""
    block_q: int
    block_k: int
    step: int
    groups: int
    heads_p: int
    width_p: int
    num_q_p: int
    num_keys_p: int

    @property
    def rows(self) -> int:
        return self.block_q * self.step

    @classmethod
    def of(cls, q_shape, num_keys: int, *, rows_per_tile: int, heads_per_step: int, block_k: int) -> "_Tiling":
        heads, width = q_shape[2], q_shape[3]
        heads_p, width_p = dot_size(heads), dot_size(width)  # zero heads (w = 0) and zero dims change nothing
        step = min(heads_per_step or heads_p, heads_p)
        if heads_p % step or step & (step - 1):
            raise ValueError(f"heads_per_step must be a power of two dividing {heads_p}, got {heads_per_step}")
        block_q = max(1, rows_per_tile // step)
        block_k = min(block_k, dot_size(num_keys))
        return cls(block_q, block_k, step, heads_p // step, heads_p, width_p, round_up(q_shape[1], block_q),
                   round_up(num_keys, block_k))

    def pad(self, q, w, k, q_positions):
        q = pad_axis(pad_axis(pad_axis(q, 3, self.width_p), 2, self.heads_p), 1, self.num_q_p)
        w = pad_axis(pad_axis(w, 2, self.heads_p), 1, self.num_q_p)
        k = pad_axis(pad_axis(k.astype(q.dtype), 2, self.width_p), 1, self.num_keys_p)
        positions = pad_axis(q_positions.astype(jnp.int32), 1, self.num_q_p, -1)  # padded queries see nothing
        return q, w, k, positions

    def by_group(self, x):
        """[B, T, G, ...] -> [B, T/block_q, n, block_q*step, ...]: one head group's rows contiguous, query-major."""
        x = x.reshape(x.shape[0], self.num_q_p // self.block_q, self.block_q, self.groups, self.step, *x.shape[3:])
        x = jnp.moveaxis(x, 3, 2)
        return x.reshape(x.shape[0], self.num_q_p // self.block_q, self.groups, self.rows, *x.shape[5:])


# (rows per tile, key block, warps, stages) by program kind and input bytes, from H100 sweeps at DeepSeek-V3.2
# shapes (docs/BENCHMARKS.md). Walking: 2-byte 256/64/8/3 (bf16 565 TFLOP/s at 32K and 128K), 1-byte 128/64/4/3
# (fp8 850-901); 4-byte inputs walk only when asked, in tiles that fit shared memory. Per tile: 128/128/4/4.
_WALKING_TILES = {1: (128, 64, 4, 3), 2: (256, 64, 8, 3), 4: (128, 64, 4, 2)}
_PER_TILE_TILES = (128, 128, 4, 4)
MAX_ROWS_PER_TILE = 256  # 512-row bf16 tiles gave wrong scores (rel. error 0.88) from the Triton backend on an H100


SCORES_KERNELS = ("auto", "pallas", "gluon")
GLUON_SCORES_DTYPES = (jnp.dtype(jnp.float8_e4m3fn),) + GLUON_DTYPES  # what `indexer_gluon` scores


def _walks_keys(q_shape, tiles: _Tiling, itemsize: int) -> bool:
    # 4-byte inputs only when asked: fp32 key tiles leave few pipeline stages
    return itemsize <= 2 and q_shape[0] * (tiles.num_q_p // tiles.block_q) >= PROGRAMS_TO_FILL_GPU


def walks_keys_by_default(q_shape, num_keys: int, itemsize: int) -> bool:
    """Whether the Pallas scores kernel, at its default tiling, walks the keys for q [B,T,G,I] of `itemsize`-byte
    inputs: at least PROGRAMS_TO_FILL_GPU programs of block_q queries (block_q = rows per tile / padded heads, so
    1 query for 128 fp8 heads, 2 for 64, 4 for 32)."""
    rows, block, _, _ = _WALKING_TILES[itemsize]
    tiles = _Tiling.of(q_shape, num_keys, rows_per_tile=rows, heads_per_step=0, block_k=block)
    return _walks_keys(q_shape, tiles, itemsize)


def gluon_head_sum(fp8: bool, fp8_head_sum: str) -> str:
    """`indexer_gluon`'s head sum for these inputs: "tensor" for fp8 with the bf16 head sum, else "fp32"."""
    return "tensor" if fp8 and fp8_head_sum == "bf16" else "fp32"


def resolve_scores_kernel(scores_kernel: str, *, dtype, interpret: bool, heads: int, width: int,
                          pallas_tiling: bool) -> str:
    """"pallas" or "gluon" (`indexer_gluon`, Hopper: fp8, bf16 or fp16 inputs) for `indexer_scores_pallas`. "auto"
    takes Gluon where it runs, unless a Pallas tiling option is given (pallas_tiling); an explicit "gluon" that
    cannot run is an error that says why."""
    if scores_kernel not in SCORES_KERNELS:
        raise ValueError(f"scores_kernel must be one of {list(SCORES_KERNELS)}, got {scores_kernel!r}")
    if scores_kernel == "pallas":
        return "pallas"
    if interpret:
        reason = "the Pallas interpreter runs Pallas kernels only"
    elif jnp.dtype(dtype) not in GLUON_SCORES_DTYPES:
        reason = f"it scores float8_e4m3fn, bfloat16 and float16 inputs, got {jnp.dtype(dtype).name}"
    else:
        from pallas_kernels import _gluon
        reason = _gluon.unavailable_reason()
        if reason is None:
            from pallas_kernels.indexer_gluon import unsupported_reason
            reason = unsupported_reason(heads, width)
    if scores_kernel == "gluon":
        if reason is not None:
            raise ValueError(f"scores_kernel='gluon' cannot run: {reason}")
        return "gluon"
    return "gluon" if reason is None and not pallas_tiling else "pallas"


@functools.partial(jax.jit, static_argnames=("interpret", "block_k", "rows_per_tile", "heads_per_step",
                                             "num_warps", "num_stages", "walk_keys", "fill_hidden", "fp8_head_sum",
                                             "scores_kernel"))
def indexer_scores_pallas(q, w, k, q_positions, k_scale=None, *, interpret: bool = False, block_k: int = 0,
                          rows_per_tile: int = 0, heads_per_step: int = 0, num_warps: int = 0,
                          num_stages: int = 0, walk_keys: Optional[bool] = None, fill_hidden: bool = True,
                          fp8_head_sum: str = "bf16", scores_kernel: str = "auto"):
    """q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> scores f32[B,T,S] (-inf where s > pos).
    fp8: q and k float8_e4m3fn and k_scale f32[B,S] (`indexer_reference.quantize_fp8`); fp8_head_sum: "bf16"
    (default) or "fp32", as in `indexer_reference.indexer_scores_reference`.

    scores_kernel: "pallas" (this module), "gluon" (`indexer_gluon`, Hopper, fp8/bf16/fp16 inputs; at
    DeepSeek-V3.2 shapes on an H100, prefill fp8 with the bf16 head sum 1088-1116 TFLOP/s against this kernel's
    898-921, bf16 at the same power-capped ~550; decode and short chunks, which it walks in key splits,
    1.3-1.8x faster than this kernel's per-tile programs) or "auto" (`resolve_scores_kernel`). The options below
    (walk_keys included) tile the Pallas kernel; giving any of them selects it under "auto".

    One tensor-core dot covers rows_per_tile rows = block_q queries x heads_per_step heads (0 = all G); a program
    loops over the G / heads_per_step head groups of its block_q queries, so each key tile is read once per block_q
    queries. walk_keys: one program per block_q queries walks all their key tiles with its query tile loaded once
    (with all heads in one group), so only the keys stream from L2 (on an H100 at 32K and 128K: bf16 565, fp8
    850-901 TFLOP/s); otherwise one program per (key tile, query tile), which keeps a GPU busy when there are few
    query tiles, as in decode (on the same 4096-query chunks: 340-380 bf16, 525-555 fp8). None: walk when there
    are at least PROGRAMS_TO_FILL_GPU query tiles and 1- or 2-byte inputs. rows_per_tile, block_k, num_warps,
    num_stages: 0 = the defaults for the program kind and input dtype (`_WALKING_TILES`, `_PER_TILE_TILES`);
    rows_per_tile at most MAX_ROWS_PER_TILE.
    fill_hidden=False leaves the key tiles wholly past a query tile's last position unwritten (undefined values,
    not -inf): for callers that stop each row at its causal length, such as `indexer_topk_pallas`, it saves
    writing the hidden half of a causal [T, S] block."""
    check_fp8_head_sum(fp8_head_sum)
    fp8 = k_scale is not None
    if fp8:
        _check_fp8_inputs(q, k)
    kernel = resolve_scores_kernel(
        scores_kernel, dtype=q.dtype, interpret=interpret, heads=q.shape[2], width=q.shape[3],
        pallas_tiling=any((block_k, rows_per_tile, heads_per_step, num_warps, num_stages)) or walk_keys is not None)
    if kernel == "gluon":
        from pallas_kernels._gluon import vmap_by_folding_into_batch
        from pallas_kernels.indexer_gluon import scores_gluon
        gluon_scores = functools.partial(scores_gluon, head_sum=gluon_head_sum(fp8, fp8_head_sum),
                                         fill_hidden=fill_hidden)
        return vmap_by_folding_into_batch(gluon_scores)(q, w, k, q_positions, *([k_scale] if fp8 else []))
    epilogue = "bf16_head_sum" if fp8 and fp8_head_sum == "bf16" else "fp32_head_sum"
    return _scores(q, w, k, q_positions, k_scale, epilogue=epilogue, interpret=interpret,
                   block_k=block_k, rows_per_tile=rows_per_tile, heads_per_step=heads_per_step,
                   num_warps=num_warps, num_stages=num_stages, walk_keys=walk_keys, fill_hidden=fill_hidden)


def _check_fp8_inputs(q, k):
    if not (q.dtype == k.dtype == jnp.float8_e4m3fn):
        raise ValueError(f"k_scale means fp8 inputs: q and k must be float8_e4m3fn, got {q.dtype} and {k.dtype}")


def head_sum_ablation(q, w, k, q_positions, k_scale=None, **options):
    """Profiling only, not scores: `indexer_scores_pallas` with the ReLU and head weights dropped (a plain sum of
    q_h . k over heads), to time what the epilogue costs. Options as in `indexer_scores_pallas`."""
    return _scores(q, w, k, q_positions, k_scale, epilogue="sum", **options)


def _scores(q, w, k, q_positions, k_scale, *, epilogue: str, interpret: bool = False, block_k: int = 0,
            rows_per_tile: int = 0, heads_per_step: int = 0, num_warps: int = 0, num_stages: int = 0,
            walk_keys: Optional[bool] = None, fill_hidden: bool = True):
    fp8 = k_scale is not None
    if fp8:
        _check_fp8_inputs(q, k)
    if rows_per_tile > MAX_ROWS_PER_TILE:
        raise ValueError(f"rows_per_tile must be at most {MAX_ROWS_PER_TILE} (larger tiles computed wrong scores "
                         f"on an H100), got {rows_per_tile}")

    def tiling(defaults):
        rows, block, warps, stages = defaults
        return (_Tiling.of(q.shape, k.shape[1], rows_per_tile=rows_per_tile or rows,
                           heads_per_step=heads_per_step, block_k=block_k or block), warps, stages)

    tiles, warps, stages = tiling(_WALKING_TILES[q.dtype.itemsize])
    if walk_keys is None:
        walk_keys = _walks_keys(q.shape, tiles, q.dtype.itemsize)
    if not walk_keys:
        tiles, warps, stages = tiling(_PER_TILE_TILES)
    num_warps, num_stages = num_warps or warps, num_stages or stages
    batch, num_q, num_keys = q.shape[0], q.shape[1], k.shape[1]
    block_q, block_k, groups = tiles.block_q, tiles.block_k, tiles.groups
    q, w, k, positions = tiles.pad(q, w, k, q_positions)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    common = dict(block_q=block_q, block_k=block_k, heads_per_step=tiles.step, precision=precision,
                  epilogue=epilogue, write_hidden=fill_hidden, interpret=interpret)
    q_spec = (None, None, groups, tiles.rows, k.shape[2])
    w_spec = (None, None, groups, tiles.rows)
    k_scales = [pad_axis(k_scale.astype(jnp.float32), 1, k.shape[1])] if fp8 else []
    out_shape = jax.ShapeDtypeStruct((batch, q.shape[1], k.shape[1]), jnp.float32)
    params = dict(interpret=interpret, name="indexer_scores",
                  compiler_params=None if interpret else compiler_params(num_warps, num_stages=num_stages))
    if walk_keys:
        scores = pl.pallas_call(
            functools.partial(_scores_rows_kernel, **common),
            grid=(q.shape[1] // block_q, batch),
            in_specs=[pl.BlockSpec(q_spec, lambda i, b: (b, i, 0, 0, 0)),
                      pl.BlockSpec(w_spec, lambda i, b: (b, i, 0, 0)),
                      pl.BlockSpec((None, k.shape[1], k.shape[2]), lambda i, b: (b, 0, 0)),
                      pl.BlockSpec((None, block_q), lambda i, b: (b, i))]
            + [pl.BlockSpec((None, k.shape[1]), lambda i, b: (b, 0))] * fp8,
            out_specs=pl.BlockSpec((None, block_q, k.shape[1]), lambda i, b: (b, i, 0)),
            out_shape=out_shape, **params,
        )(tiles.by_group(q), tiles.by_group(w), k, positions, *k_scales)
        return scores[:, :num_q, :num_keys]
    scores = pl.pallas_call(
        functools.partial(_scores_kernel, **common),
        # Key tiles on the grid's first axis, which the GPU schedules fastest: programs running together share
        # their query tile and stream the (L2-resident) keys. Query tiles first re-read all queries from HBM once
        # per key tile (ncu on an H100: ~16 GB of DRAM traffic for a 4096 x 32K chunk).
        grid=(k.shape[1] // block_k, q.shape[1] // block_q, batch),
        in_specs=[pl.BlockSpec(q_spec, lambda j, i, b: (b, i, 0, 0, 0)),
                  pl.BlockSpec(w_spec, lambda j, i, b: (b, i, 0, 0)),
                  pl.BlockSpec((None, block_k, k.shape[2]), lambda j, i, b: (b, j, 0)),
                  pl.BlockSpec((None, block_q), lambda j, i, b: (b, i))]
        + [pl.BlockSpec((None, block_k), lambda j, i, b: (b, j))] * fp8,
        out_specs=pl.BlockSpec((None, block_q, block_k), lambda j, i, b: (b, i, j)),
        out_shape=out_shape, **params,
    )(tiles.by_group(q), tiles.by_group(w), k, positions, *k_scales)
    return scores[:, :num_q, :num_keys]


def resolve_backward_kernel(backward_kernel: str, *, interpret: bool, dtype, heads: int, width: int) -> str:
    """The scores' backward kernels that run: "gluon" (`indexer_backward_gluon`, Hopper, 2-byte inputs) or
    "pallas" (`indexer_backward`). "auto" takes Gluon where it runs, "gluon" insists (an error says why it cannot
    run), "pallas" always is; interpret mode is Pallas. heads, width: as given (padded here)."""
    from pallas_kernels.sparse_attention import resolve_kernel_choice

    def reason():
        from pallas_kernels import _gluon
        return _gluon.unavailable_or_unsupported("pallas_kernels.indexer_backward_gluon", dtype, dot_size(heads),
                                                 dot_size(width))

    return resolve_kernel_choice("backward_kernel", backward_kernel, interpret, reason)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def indexer_scores_trainable(q, w, k, q_positions, interpret: bool = False, backward_kernel: str = "auto"):
    """`indexer_scores_pallas` (bf16 or fp32 inputs) with a kernel backward: differentiable in q, w and k without
    ever storing the per-head logits [B,T,S,G] that autodiff of the reference keeps. backward_kernel: "auto",
    "gluon" (`indexer_backward_gluon`) or "pallas" (`indexer_backward`), see `resolve_backward_kernel`."""
    return _trainable_fwd(q, w, k, q_positions, interpret, backward_kernel)[0]


def _trainable_fwd(q, w, k, q_positions, interpret, backward_kernel):
    resolve_backward_kernel(backward_kernel, interpret=interpret, dtype=q.dtype, heads=q.shape[2],
                            width=q.shape[3])  # a bad choice fails here, not when the gradient is taken
    return indexer_scores_pallas(q, w, k, q_positions, interpret=interpret), (q, w, k, q_positions)


def _trainable_bwd(interpret, backward_kernel, residuals, d_scores):
    q, w, k, q_positions = residuals
    batch, num_q, heads, width = q.shape
    num_keys = k.shape[1]
    # All heads in one dot, as in the forward; 64-key tiles keep d_q [block_q*G, I] and the tile's logits in
    # registers together.
    tiles = _Tiling.of(q.shape, num_keys, rows_per_tile=128, heads_per_step=0, block_k=64)
    gluon = resolve_backward_kernel(backward_kernel, interpret=interpret, dtype=q.dtype, heads=heads,
                                    width=width) == "gluon"
    if gluon:  # its key-side programs take 128 keys
        from pallas_kernels import indexer_backward_gluon
        tiles = tiles._replace(num_keys_p=round_up(num_keys, indexer_backward_gluon.KEYS.value))
    q_p, w_p, k_p, positions = tiles.pad(q, w.astype(jnp.float32), k, q_positions)
    d_scores = pad_axis(pad_axis(d_scores.astype(jnp.float32), 1, tiles.num_q_p), 2, tiles.num_keys_p)
    if gluon:
        d_q, d_w, d_k = _gluon_backward(q_p.reshape(batch, -1, tiles.width_p), w_p.reshape(batch, -1), k_p,
                                        positions, d_scores, heads=tiles.heads_p)
    else:
        d_q, d_w, d_k = indexer_scores_backward_call(
            tiles.by_group(q_p)[:, :, 0], tiles.by_group(w_p)[:, :, 0], k_p,
            positions.reshape(batch, tiles.num_q_p // tiles.block_q, tiles.block_q), d_scores, block_q=tiles.block_q,
            block_k=tiles.block_k, heads=tiles.heads_p, num_warps=8, interpret=interpret)
    d_q = d_q.reshape(batch, tiles.num_q_p, tiles.heads_p, tiles.width_p)[:, :num_q, :heads, :width]
    d_w = d_w.reshape(batch, tiles.num_q_p, tiles.heads_p)[:, :num_q, :heads]
    return d_q, d_w.astype(w.dtype), d_k[:, :num_keys, :width].astype(k.dtype), None


def _gluon_backward(q_rows, w_rows, k, positions, d_scores, *, heads: int):
    """`indexer_backward_gluon.indexer_scores_backward_gluon`, under `jax.vmap` too (jax-triton's call has no
    batching rule: mapped axes fold into the batch axis)."""
    from pallas_kernels import _gluon
    from pallas_kernels.indexer_backward_gluon import indexer_scores_backward_gluon
    unmapped = functools.partial(indexer_scores_backward_gluon, heads=heads)
    return _gluon.vmap_by_folding_into_batch(unmapped)(q_rows, w_rows, k, positions, d_scores)


indexer_scores_trainable.defvjp(_trainable_fwd, _trainable_bwd)


def indexer_topk_pallas(q, w, k, q_positions, *, topk: int, interpret: bool = False, fp8: bool = False,
                        k_scale=None, chunk_bytes: int = 1 << 30, fp8_head_sum: str = "bf16",
                        scores_kernel: str = "auto", topk_kernel: str = "auto"):
    """q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> int32[B,T,topk] (the top-k convention).
    fp8: quantise the inputs (`indexer_reference.quantize_fp8`) and score on fp8 tensor cores; k_scale f32[B,S]:
    k is already fp8 (an fp8 key cache) and only the queries are quantised (`indexer_reference.scored_inputs`).
    fp8_head_sum, scores_kernel: as in `indexer_scores_pallas`; topk_kernel: both passes of the top-k
    (`topk.topk_pallas`'s candidates_kernel and select_kernel).

    Queries go in chunks whose fp32 scores take at most chunk_bytes ([B, chunk, S])."""
    q, w, k, k_scale = scored_inputs(q, w, k, fp8=fp8, k_scale=k_scale)
    batch, num_q = q.shape[:2]
    num_keys = k.shape[1]
    chunk = max(1, min(num_q, chunk_bytes // (4 * batch * num_keys)))
    chunk = next_pow2(chunk) // 2 if next_pow2(chunk) > chunk else chunk  # a power of two, for even tiles

    def one_chunk(q_c, w_c, pos_c):
        # Each row's top-k stops at its causal length, so the tiles past it need not be written.
        scores = indexer_scores_pallas(q_c, w_c, k, pos_c, k_scale, interpret=interpret, fill_hidden=False,
                                       fp8_head_sum=fp8_head_sum, scores_kernel=scores_kernel)
        return topk_pallas(scores, topk, pos_c + 1, interpret=interpret, candidates_kernel=topk_kernel,
                           select_kernel=topk_kernel)

    if chunk >= num_q:
        return one_chunk(q, w, q_positions)
    return map_query_blocks(one_chunk, chunk, (q, w, q_positions), fills=(0, 0, -1))
