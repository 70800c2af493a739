"""The head-averaged attention distribution of sparse MLA over each query's slots, on the GPU: the target the
sparse stages distil the indexer towards (`indexcache_jax.distill`).

    dist[b,t,j] = 1/H sum_h exp(scale * q[b,t,h,:] . kv[b, idx[b,t,j], :] - lse[b,t,h])      (0 at -1 slots)

Why a kernel: the plain-JAX form (`sparse_attention_reference.sparse_attention_distribution_reference`) gathers
[B, block_q, K, L] rows and keeps [B, block_q, H, K] logits per query block; on an H100 at T = 4096 (H = 128,
K = 2048, L = 576, bf16) it took 19 ms, most of the sparse MLA attention's own forward + backward (23 ms), in every
layer of every sparse training step (docs/BENCHMARKS.md, session 27).

One program takes one token and a block of heads, as the forward kernel (`sparse_attention`) does: it walks the
token's slots block_k at a time, gathers their latent rows inside the kernel (`_latent_slots`), computes the logits
[block_h, block_k] on the tensor cores, turns them into probabilities with the heads' log-sum-exp, sums them over
its heads and stores block_k partial sums; XLA adds the head blocks' partials and divides by H. Given the forward's
lse (`sparse_mla(..., return_lse=True)`) that is one pass at the forward's QK FLOPs (about half of its total);
without it, a first pass over the slots computes the lse with an online max and sum (twice the QK FLOPs). Blocks
of -1 slots only (the causal tails of the first K tokens' lists) are skipped and store zeros.

On Hopper, given the lse and 2-byte inputs, the same computation runs as a Gluon kernel
(`sparse_distribution_gluon`: wgmma with q in registers, 128 heads per program, so each row is gathered once per
token): on an H100 3.20 ms at T = 4096 and 25.2 ms at T = 32768, against 5.44 and 53.1 ms for this Pallas kernel
(docs/BENCHMARKS.md, session 29).

Shapes: B batch, T queries, S keys, H heads (padded to a multiple of block_h), L = R + P latent width, K slots.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._latent_slots import LatentSlots
from pallas_kernels._pallas import compiler_params, dot_size, pad_axis, round_up, skip_blocks_without_slots
from pallas_kernels.sparse_attention import GLUON_DTYPES, pad_latent, pad_to_tiles, resolve_kernel_choice

BLOCK_K = 64  # slots per step
BLOCK_H = 64  # heads per program
NUM_WARPS = 4
# The Gluon kernel's (`sparse_distribution_gluon`) program shapes, (heads, slots per step), here so that checking
# its limits needs no triton. Its q lives in registers, (R+P)/4 per thread: at most GLUON_MAX_WIDTH latent columns.
GLUON_SHAPES = {"all_heads": (128, 64), "half_heads": (64, 64)}
GLUON_MAX_WIDTH = 576


def gluon_smem_bytes(value_dim: int, rope_dim: int, shape: str, itemsize: int = 2) -> int:
    """Shared memory of the Gluon kernel for padded widths: the two gathered buffers, and the head sum's cross-warp
    scratch (an fp32 per warp and slot)."""
    block_h, block_n = GLUON_SHAPES[shape]
    return 2 * block_n * (value_dim + rope_dim) * itemsize + block_h // 16 * block_n * 4


def gluon_shape_for(heads: int) -> str:
    """"auto"'s program shape: 64 heads per program where the model has at most 64 (all_heads would pad them to
    128), else 128, so that one program gathers each row for all of a token's heads."""
    return "half_heads" if heads <= GLUON_SHAPES["half_heads"][0] else "all_heads"


def _gluon_unavailable(q, kv, lse, value_dim: int):
    """None when the Gluon kernel runs here for these inputs, else why not."""
    from pallas_kernels import _gluon
    if lse is None:
        return "it takes the forward's lse (lse=None computes it in the Pallas kernel)"
    if jnp.dtype(q.dtype) not in GLUON_DTYPES or kv.dtype != q.dtype:
        return f"it takes q and kv of one 2-byte float dtype, got {q.dtype} and {kv.dtype}"
    r_p, p_p = dot_size(value_dim), dot_size(q.shape[-1] - value_dim)
    if r_p + p_p > GLUON_MAX_WIDTH:
        return (f"latent widths {r_p} + {p_p} (padded) exceed the {GLUON_MAX_WIDTH} columns of q it keeps in "
                "registers")
    return _gluon.unavailable_reason()


def _distribution_kernel(q_ref, kv_ref, idx_ref, *refs, scale: float, value_dim: int, rope_dim: int, block_k: int,
                         num_keys: int, num_heads: int, precision, has_lse: bool):
    # q_ref [Hb, R+P], kv_ref [S, R+P] (this row's cache), idx_ref [K], (lse_ref [Hb],) out_ref [K]: the sum over
    # this program's heads of each slot's probability.
    lse_ref, out_ref = refs if has_lse else (None, refs[0])
    block_h = q_ref.shape[0]
    slots = LatentSlots(kv_ref, idx_ref, value_dim=value_dim, rope_dim=rope_dim, block_k=block_k,
                        num_keys=num_keys)

    def block_logits(j):
        ids, values, k_rope = slots.gather(j)
        logits = slots.dot_rows(q_ref, pl.ds(0, block_h), values, k_rope, precision=precision) * scale
        return jnp.where(ids[None, :] >= 0, logits, -jnp.inf)  # [Hb, block_k]

    if has_lse:
        lse = lse_ref[...]
    else:
        def accumulate(j, carry):
            row_max, row_sum = carry
            logits = block_logits(j)
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
            safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
            row_sum = row_sum * jnp.exp(row_max - safe_max) + jnp.sum(jnp.exp(logits - safe_max[:, None]), axis=1)
            return new_max, row_sum

        init = (jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32))
        row_max, row_sum = lax.fori_loop(0, slots.num_blocks, skip_blocks_without_slots(idx_ref, block_k,
                                                                                        accumulate), init)
        has_any = row_sum > 0
        lse = jnp.where(has_any, row_max + jnp.log(jnp.where(has_any, row_sum, 1.0)), -jnp.inf)
    # Padded heads (zero queries: logits 0, not -inf) must weigh nothing: lse = +inf gives them p = 0.
    head_ids = pl.program_id(0) * block_h + lax.iota(jnp.int32, block_h)
    lse = jnp.where(head_ids < num_heads, lse, jnp.inf)

    def store_block(j, carry):
        def head_sum(_):
            logits = block_logits(j)
            # -1 slots have logits -inf (p = 0); a token with no valid slot has lse = -inf, but then every block is
            # skipped below.
            return jnp.sum(jnp.exp(logits - lse[:, None]), axis=0)
        ids = idx_ref[pl.ds(j * block_k, block_k)]
        out_ref[pl.ds(j * block_k, block_k)] = lax.cond(
            jnp.max(ids) >= 0, head_sum, lambda _: jnp.zeros((block_k,), jnp.float32), None)
        return carry

    lax.fori_loop(0, slots.num_blocks, store_block, 0)


def _check(q, kv, indices, lse):
    """Shape errors that name the offending input."""
    if q.ndim != 4 or kv.ndim != 3 or indices.ndim != 3:
        raise ValueError(f"want q [B,T,H,L], kv [B,S,L], indices [B,T,K]; got q {q.shape}, kv {kv.shape}, "
                         f"indices {indices.shape}")
    if kv.shape[0] != q.shape[0] or kv.shape[2] != q.shape[3]:
        raise ValueError(f"kv {kv.shape} must be [B={q.shape[0]}, S, L={q.shape[3]}] to match q {q.shape}")
    if indices.shape[:2] != q.shape[:2]:
        raise ValueError(f"indices {indices.shape} must be [B, T, K] with B, T = {q.shape[:2]} of q")
    if lse is not None and lse.shape != q.shape[:3]:
        raise ValueError(f"lse {lse.shape} must be [B, T, H] = {q.shape[:3]}, the forward's log-sum-exp per head")


@functools.partial(jax.jit, static_argnames=("scale", "value_dim", "interpret", "block_h", "block_k", "num_warps",
                                             "kernel", "gluon_shape"))
def sparse_attention_distribution_pallas(q, kv, indices, lse=None, *, scale: float, value_dim: int,
                                         interpret: bool = False, block_h: int = 0, block_k: int = 0,
                                         num_warps: int = NUM_WARPS, kernel: str = "auto",
                                         gluon_shape: str = "auto"):
    """q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] (-1 = no slot), lse f32[B,T,H] or None -> f32[B,T,K]: the
    head-averaged attention distribution over the slots (0 at -1 slots; all 0 for a token with no valid slot).
    value_dim: R, where the latent's value part ends (the kernel gathers it in pieces, as the forward does).

    kernel: "auto" runs the Gluon kernel (`sparse_distribution_gluon`, program shape `gluon_shape`: one of
    GLUON_SHAPES, or "auto" for `gluon_shape_for(heads)`) where it can (a Hopper GPU with triton and jax-triton,
    2-byte inputs of at most GLUON_MAX_WIDTH padded latent columns, lse given) and the Pallas kernel elsewhere;
    "gluon" insists (an error says why it cannot run); "pallas" always is; block_h, block_k and
    num_warps are the Pallas kernel's tiles. Not differentiable (no VJP): the dispatch stops its inputs' gradients."""
    _check(q, kv, indices, lse)
    if gluon_shape != "auto" and gluon_shape not in GLUON_SHAPES:
        raise ValueError(f"gluon_shape must be 'auto' or one of {sorted(GLUON_SHAPES)}, got {gluon_shape!r}")
    if resolve_kernel_choice("kernel", kernel, interpret,
                             lambda: _gluon_unavailable(q, kv, lse, value_dim)) == "gluon":
        gluon_shape = gluon_shape_for(q.shape[2]) if gluon_shape == "auto" else gluon_shape
        from pallas_kernels import _gluon
        run = functools.partial(_gluon_unmapped, scale=scale, value_dim=value_dim, shape=gluon_shape)
        return _gluon.vmap_by_folding_into_batch(run)(q, kv, indices, lse)
    batch, num_q, heads, _ = q.shape
    num_slots, num_keys = indices.shape[-1], kv.shape[1]
    q, kv, indices, r_p, p_p, block_k, block_h = pad_to_tiles(q, kv, indices, value_dim=value_dim,
                                                              block_k=block_k or BLOCK_K,
                                                              block_h=block_h or BLOCK_H)
    head_blocks, slots_p = q.shape[2] // block_h, indices.shape[-1]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    body = functools.partial(_distribution_kernel, scale=scale, value_dim=r_p, rope_dim=p_p, block_k=block_k,
                             num_keys=num_keys, num_heads=heads, precision=precision, has_lse=lse is not None)

    # Head blocks on the fastest grid axis, as in the forward: one token's programs gather the same rows together
    # and share them in L2.
    def spec(shape, index):
        return pl.BlockSpec(shape, lambda h, b, t: index(b, t, h))

    in_specs = [spec((None, None, block_h, r_p + p_p), lambda b, t, h: (b, t, h, 0)),
                spec((None, num_keys, r_p + p_p), lambda b, t, h: (b, 0, 0)),
                spec((None, None, slots_p), lambda b, t, h: (b, t, 0))]
    operands = [q, kv, indices]
    if lse is not None:
        in_specs.append(spec((None, None, block_h), lambda b, t, h: (b, t, h)))
        operands.append(pad_axis(lse.astype(jnp.float32), 2, q.shape[2], jnp.inf))
    partial_sums = pl.pallas_call(
        body,
        grid=(head_blocks, batch, num_q),
        in_specs=in_specs,
        out_specs=spec((None, None, None, slots_p), lambda b, t, h: (b, t, h, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, num_q, head_blocks, slots_p), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(num_warps, num_stages=2),
        name="sparse_attention_distribution",
    )(*operands)
    return jnp.sum(partial_sums, axis=2)[..., :num_slots] / heads


def _gluon_unmapped(q, kv, indices, lse, *, scale, value_dim, shape):
    """Pads for the Gluon kernel (widths as `pad_latent`, heads to its block with lse +inf, slots to whole blocks,
    at least two, with -1), runs it and adds its head blocks' partial sums."""
    from pallas_kernels import sparse_distribution_gluon as gluon
    heads, num_slots = q.shape[2], indices.shape[-1]
    block_h, block_n = GLUON_SHAPES[shape]
    q, kv, r_p, _ = pad_latent(q, kv, value_dim)
    q = pad_axis(q, 2, round_up(heads, block_h))
    lse = pad_axis(lse.astype(jnp.float32), 2, q.shape[2], jnp.inf)
    indices = pad_axis(indices.astype(jnp.int32), 2, round_up(max(num_slots, 2 * block_n), block_n), -1)
    partial_sums = gluon.distribution_gluon(q, kv, indices, lse, scale=scale, value_dim=r_p, shape=shape)
    return jnp.sum(partial_sums, axis=2)[..., :num_slots] / heads
