"""Sparse MLA attention on the GPU: gather the selected latent rows inside the kernel and attend with all heads.

One program takes one query token (prefill) or one slice of a token's slots (decode) and a block of heads. It walks
the token's top-k slots block_k at a time: loads the slot ids, gathers those latent rows straight from the cache
(c_kv in pieces of [block_k, 64] and k_rope [block_k, P], loads of contiguous row segments, no gathered copy in
HBM), computes the heads' logits with tensor-core dots (the heads share the latent rows: MQA form), and keeps an
online softmax in registers, with the output accumulator in one slice per piece. -1 slots are masked; a token
with no valid slot gets zeros. Small head counts are padded to the tensor-core minimum of 16; non-power-of-two
widths are zero-padded (zeros change no dot product).

Decode has one query per sequence, too little work for a GPU: its slots are split across `num_splits` programs
that each return a partial result and its log-sum-exp, combined afterwards (the split-K "flash decoding" scheme).

Gradients (`jax.custom_vjp`): the forward saves its output and each head's log-sum-exp; the backward's kernels
recompute the logits and turn them into probabilities with the saved log-sum-exp (no second online softmax). On
Hopper (`Tiles.backward_kernel` "auto" or "gluon") the Gluon d_kv kernel also stores dS, and d_q is a gathered
matmul of it (`sparse_attention_backward_gluon`); elsewhere, and in interpret mode, the two Pallas kernels of
`sparse_attention_backward` each recompute them. Shapes as in `sparse_attention_reference`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from pallas_kernels._latent_slots import LatentSlots
from pallas_kernels._pallas import PROGRAMS_TO_FILL_GPU, compiler_params, dot_size, pad_axis, round_up
from pallas_kernels.sparse_attention_backward import sparse_backward_call


def _sparse_kernel(q_ref, kv_ref, idx_ref, out_ref, lse_ref, *, scale: float, value_dim: int, rope_dim: int,
                   block_k: int, num_keys: int, precision):
    # q_ref [Hb, R+P], kv_ref [S, R+P] (this row's whole cache), idx_ref [Ks] (this split's slots),
    # out_ref [Hb, R], lse_ref [Hb]. The output accumulator is one [Hb, piece] slice per gathered value piece
    # (`_latent_slots` says why).
    heads = q_ref.shape[0]
    slots = LatentSlots(kv_ref, idx_ref, value_dim=value_dim, rope_dim=rope_dim, block_k=block_k,
                        num_keys=num_keys)

    def attend_block(j, carry):
        row_max, row_sum, accs = carry
        ids, values, k_rope = slots.gather(j)
        logits = slots.dot_rows(q_ref, pl.ds(0, heads), values, k_rope, precision=precision)
        logits = jnp.where(ids[None, :] >= 0, logits * scale, -jnp.inf)  # [Hb, block_k]
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # nothing valid yet: keep exp() finite
        probs = jnp.exp(logits - safe_max[:, None])
        rescale = jnp.exp(row_max - safe_max)
        row_sum = row_sum * rescale + jnp.sum(probs, axis=1)
        probs = probs.astype(kv_ref.dtype)
        accs = tuple(acc * rescale[:, None] + lax.dot_general(probs, piece, (((1,), (0,)), ((), ())),
                                                              preferred_element_type=jnp.float32,
                                                              precision=precision)
                     for acc, piece in zip(accs, values, strict=True))
        return new_max, row_sum, accs

    init = (jnp.full((heads,), -jnp.inf, jnp.float32), jnp.zeros((heads,), jnp.float32),
            tuple(jnp.zeros((heads, slots.piece), jnp.float32) for _ in slots.starts))
    row_max, row_sum, accs = lax.fori_loop(0, slots.num_blocks, attend_block, init)
    has_any = row_sum > 0
    inverse = 1.0 / jnp.where(has_any, row_sum, 1.0)
    for start, acc in zip(slots.starts, accs, strict=True):
        out_ref[:, pl.ds(start, slots.piece)] = (acc * inverse[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has_any, row_max + jnp.log(jnp.where(has_any, row_sum, 1.0)), -jnp.inf)


def pad_latent(q, kv, value_dim: int):
    """Split widths R and P padded to tensor-core sizes (a copy only when they are not already)."""
    rope_dim = q.shape[-1] - value_dim
    r_p, p_p = dot_size(value_dim), dot_size(rope_dim)
    if (r_p, p_p) == (value_dim, rope_dim):
        return q, kv, r_p, p_p

    def relayout(x):
        return jnp.concatenate([pad_axis(x[..., :value_dim], x.ndim - 1, r_p),
                                pad_axis(x[..., value_dim:], x.ndim - 1, p_p)], axis=-1)
    return relayout(q), relayout(kv), r_p, p_p


def pad_to_tiles(q, kv, indices, *, value_dim: int, block_k: int, block_h: int, num_splits: int = 1):
    """Pad to the kernels' sizes: latent widths to tensor-core powers of two, heads to a multiple of block_h, slots
    (-1) to a multiple of block_k * num_splits. Returns (q, kv, indices, r_p, p_p, block_k, block_h)."""
    q, kv, r_p, p_p = pad_latent(q, kv, value_dim)
    heads_p = dot_size(q.shape[2])
    block_h = min(block_h, heads_p)
    q = pad_axis(q, 2, round_up(heads_p, block_h))
    block_k = min(block_k, dot_size(indices.shape[-1]))
    slots = round_up(indices.shape[-1], block_k * num_splits)
    indices = pad_axis(indices.astype(jnp.int32), 2, slots, -1)
    return q, kv, indices, r_p, p_p, block_k, block_h


FORWARD_KERNELS = ("auto", "gluon", "pallas")
# The Gluon kernel's input limits, here rather than in `sparse_attention_gluon` so that checking them needs no
# triton: 2-byte inputs, and each warpgroup's half of the (padded) value columns one wgmma of n <= 256.
GLUON_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
GLUON_MAX_VALUE_DIM = 512


def _gluon_unavailable(dtype, value_dim: int, kv_dtype=None) -> Optional[str]:
    """None when the Gluon forward (`sparse_attention_gluon`) runs here for these inputs, else why not."""
    from pallas_kernels import _gluon
    if jnp.dtype(dtype) not in GLUON_DTYPES:
        return f"it takes bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if kv_dtype is not None and jnp.dtype(kv_dtype) != jnp.dtype(dtype):
        return f"it takes q and kv of one dtype, got {jnp.dtype(dtype).name} and {jnp.dtype(kv_dtype).name}"
    if dot_size(value_dim) > GLUON_MAX_VALUE_DIM:
        return f"value_dim {value_dim} pads to {dot_size(value_dim)}, above its {GLUON_MAX_VALUE_DIM}"
    return _gluon.unavailable_reason()


def resolve_kernel_choice(which: str, choice: str, interpret: bool, reason) -> str:
    """"gluon" or "pallas" for a kernel choice: "auto" takes Gluon where reason() is None, "gluon" insists (an error
    says why it cannot run), "pallas" always is; interpret mode is Pallas."""
    if choice not in FORWARD_KERNELS:
        raise ValueError(f"{which} must be one of {list(FORWARD_KERNELS)}, got {choice!r}")
    if choice == "pallas" or (interpret and choice == "auto"):
        return "pallas"
    why = "the Pallas interpreter runs Pallas kernels only" if interpret else reason()
    if why is not None and choice == "gluon":
        raise ValueError(f"{which}='gluon' cannot run: {why}")
    return "pallas" if why else "gluon"


def resolve_forward_kernel(forward_kernel: str, interpret: bool, dtype, value_dim: int, kv_dtype=None) -> str:
    """The forward kernel that runs: "gluon" or "pallas". forward_kernel "auto" takes the Gluon kernel where it runs
    (a Hopper GPU with triton and jax-triton, 2-byte inputs) and Pallas elsewhere; "gluon" insists (an error says
    why it cannot run); "pallas" always is. Interpret mode is Pallas."""
    return resolve_kernel_choice("forward_kernel", forward_kernel, interpret,
                                 lambda: _gluon_unavailable(dtype, value_dim, kv_dtype))


# The Gluon backward's limits (`sparse_attention_backward_gluon`), here so that checking them needs no triton. The
# d_kv kernel holds 64 heads x (R + P) of q, 64 x R of dO, one block of 64 gathered rows and 16 KB of scratch for
# the scatter's layout conversion in shared memory, R in pieces of 128. The d_q kernel splits d_q's columns into
# parts of at most GLUON_D_Q_MAX_PART (R / parts value columns and P / parts rope columns each, one wgmma apiece).
GLUON_SMEM_BYTES = 232448  # shared memory one program may use on an H100
GLUON_D_KV_PIECE = 128
GLUON_D_Q_MAX_PART = 288  # with 128 heads per program, 144 fp32 accumulator registers per thread
GLUON_D_S_BYTES = 1 << 30  # the most the backward's dS buffer takes by default (Tiles.backward_d_s_bytes)


def gluon_d_kv_smem_bytes(value_dim: int, rope_dim: int, itemsize: int = 2) -> int:
    """Shared memory of the Gluon d_kv kernel for padded widths: q, dO, one gathered block, the scatter's 16 KB
    layout-conversion scratch (Triton's, the same for every width) and 1 KB for alignment."""
    return (2 * 64 * (value_dim + rope_dim) + 64 * value_dim) * itemsize + 16384 + 1024


def gluon_d_q_parts(value_dim: int, rope_dim: int) -> int:
    """Column parts of the Gluon d_q kernel for padded widths R and P (powers of two): the fewest, a power of two,
    with at most GLUON_D_Q_MAX_PART columns each. DeepSeek-V3.2's 512 + 64: 2 parts of 256 + 32."""
    parts = 1
    while (value_dim + rope_dim) // parts > GLUON_D_Q_MAX_PART:
        parts *= 2
    return parts


def gluon_backward_width_reason(value_dim: int, rope_dim: int) -> Optional[str]:
    """None when the Gluon backward's kernels take padded widths R and P, else why not."""
    if (value_dim % GLUON_D_KV_PIECE or not 16 <= rope_dim <= 256
            or gluon_d_kv_smem_bytes(value_dim, rope_dim) > GLUON_SMEM_BYTES):
        return (f"it takes value widths that pad to a multiple of {GLUON_D_KV_PIECE} and rope widths that pad to "
                f"[16, 256], within {GLUON_SMEM_BYTES} bytes of shared memory; got {value_dim} + {rope_dim} padded")
    if rope_dim // gluon_d_q_parts(value_dim, rope_dim) < 16:
        return (f"its d_q kernel splits {value_dim} + {rope_dim} columns into {gluon_d_q_parts(value_dim, rope_dim)}"
                " parts, and each part's rope columns must be at least 16")
    return None


def resolve_backward_kernel(backward_kernel: str, interpret: bool, dtype, value_dim: int, rope_dim: int,
                            kv_dtype=None) -> str:
    """The backward's kernels: "gluon" (`sparse_attention_backward_gluon`: d_kv, which also stores dS, then d_q
    from it) or "pallas" (`sparse_attention_backward`), chosen as `resolve_forward_kernel` chooses."""
    def reason():
        return (gluon_backward_width_reason(dot_size(value_dim), dot_size(rope_dim))
                or _gluon_unavailable(dtype, value_dim, kv_dtype))
    return resolve_kernel_choice("backward_kernel", backward_kernel, interpret, reason)


def _gluon_call(q, kv, indices, *, scale, value_dim, num_splits, out_dtype):
    """The Gluon forward with the same contract as `_sparse_call`, under `jax.vmap` too (jax-triton's call has no
    batching rule: the mapped axes fold into the batch axis, one launch)."""
    from pallas_kernels import _gluon
    unmapped = functools.partial(_gluon_call_unmapped, scale=scale, value_dim=value_dim, num_splits=num_splits,
                                 out_dtype=out_dtype)
    return _gluon.vmap_by_folding_into_batch(unmapped)(q, kv, indices)


def _gluon_call_unmapped(q, kv, indices, *, scale, value_dim, num_splits, out_dtype):
    """Pads heads to the kernel's 64-head block and each split's slots to a multiple of two 64-slot blocks (its
    double-buffered loop needs two; -1 slots cost a masked block); `schedule_for` picks the kernel's schedule."""
    from pallas_kernels import sparse_attention_gluon as gluon
    heads, slots = q.shape[2], indices.shape[-1]
    q, kv, r_p, _ = pad_latent(q, kv, value_dim)
    q = pad_axis(q, 2, round_up(heads, gluon.BLOCK_H.value))
    indices = pad_axis(indices.astype(jnp.int32), 2, round_up(slots, 2 * gluon.BLOCK_N.value * num_splits), -1)
    schedule = gluon.schedule_for(r_p, q.shape[-1] - r_p, indices.shape[-1] // num_splits)
    out, lse = gluon.sparse_forward_gluon(q, kv, indices, scale=scale, value_dim=r_p, num_splits=num_splits,
                                          out_dtype=out_dtype, schedule=schedule)
    return out[..., :heads, :value_dim], lse[..., :heads]


def _sparse_call(q, kv, indices, *, scale, value_dim, num_splits, out_dtype, interpret, block_k, block_h,
                 num_warps, forward_kernel="auto"):
    """q [B,T,H,L], kv [B,S,L], indices [B,T,K] -> (out [B,T,n,H,R'], lse f32[B,T,n,H]) with n = num_splits."""
    if resolve_forward_kernel(forward_kernel, interpret, q.dtype, value_dim, kv.dtype) == "gluon":
        return _gluon_call(q, kv, indices, scale=scale, value_dim=value_dim, num_splits=num_splits,
                           out_dtype=out_dtype)
    batch, num_q, heads, _ = q.shape
    num_keys = kv.shape[1]
    q, kv, indices, r_p, p_p, block_k, block_h = pad_to_tiles(q, kv, indices, value_dim=value_dim,
                                                              block_k=block_k, block_h=block_h,
                                                              num_splits=num_splits)
    per_split = indices.shape[-1] // num_splits
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_sparse_kernel, scale=scale, value_dim=r_p, rope_dim=p_p, block_k=block_k,
                               num_keys=num_keys, precision=precision)
    width = r_p + p_p
    head_blocks = q.shape[2] // block_h
    # Head blocks on the fastest grid axis: the programs of one token, which gather the same rows, run side by
    # side and share them in L2. Tokens fastest re-read each token's rows from HBM once per head block when the
    # cache outgrows L2: on an H100, prefill at 128K went 212 -> 260 TFLOP/s this way (32K and decode: the same).
    grid = (head_blocks, batch, num_q, num_splits)

    def spec(shape, index):
        return pl.BlockSpec(shape, lambda h, b, t, s: index(b, t, h, s))

    out, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[spec((None, None, block_h, width), lambda b, t, h, s: (b, t, h, 0)),
                  spec((None, num_keys, width), lambda b, t, h, s: (b, 0, 0)),
                  spec((None, None, per_split), lambda b, t, h, s: (b, t, s))],
        out_specs=[spec((None, None, None, block_h, r_p), lambda b, t, h, s: (b, t, s, h, 0)),
                   spec((None, None, None, block_h), lambda b, t, h, s: (b, t, s, h))],
        out_shape=[jax.ShapeDtypeStruct((batch, num_q, num_splits, q.shape[2], r_p), out_dtype),
                   jax.ShapeDtypeStruct((batch, num_q, num_splits, q.shape[2]), jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(num_warps, num_stages=2),
        name="sparse_mla",
    )(q, kv, indices)
    return out[..., :heads, :value_dim], lse[..., :heads]


class Tiles(NamedTuple):
    """Slots per step, heads per program and warps, for the forward and the backward kernels (0 = by dtype), and
    which forward kernel and which backward kernels run (FORWARD_KERNELS each; the tiles are the Pallas kernels',
    the Gluon kernels' are fixed). backward_d_s_bytes: the most memory the Gluon backward's dS buffer may take,
    which sets how many tokens each of its launches covers (0 = GLUON_D_S_BYTES)."""
    block_k: int = 0
    block_h: int = 0
    num_warps: int = 4
    backward_block_k: int = 0
    backward_block_h: int = 0
    backward_num_warps: int = 4
    forward_kernel: str = "auto"
    backward_kernel: str = "auto"
    backward_d_s_bytes: int = 0


# The names of the backward pass's residuals, for rematerialisation policies (`jax.checkpoint_policies`): a policy
# that saves both lets a recomputation drop the forward kernel (the output costs [B,T,H,R] per call).
OUTPUT_NAME = "sparse_attention_output"
LSE_NAME = "sparse_attention_lse"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _sparse_mla(q, kv, indices, scale, value_dim, interpret, tiles):
    """-> (out [B,T,H,R], lse f32[B,T,H]), both differentiable."""
    return _sparse_mla_fwd(q, kv, indices, scale, value_dim, interpret, tiles)[0]


def _sparse_mla_fwd(q, kv, indices, scale, value_dim, interpret, tiles):
    out, lse = _sparse_call(q, kv, indices, scale=scale, value_dim=value_dim, num_splits=1, out_dtype=q.dtype,
                            interpret=interpret, block_k=tiles.block_k, block_h=tiles.block_h,
                            num_warps=tiles.num_warps, forward_kernel=tiles.forward_kernel)
    out, lse = out[:, :, 0], lse[:, :, 0]
    # Named here, on the residuals: a name on the custom_vjp's outputs names other variables, so a policy that
    # saved those would still run this kernel again (checked: docs/BENCHMARKS.md, session 53)
    out, lse = checkpoint_name(out, OUTPUT_NAME), checkpoint_name(lse, LSE_NAME)
    return (out, lse), (q, kv, indices, out, lse)


def _sparse_mla_bwd(scale, value_dim, interpret, tiles, residuals, cotangents):
    q, kv, indices, out, lse = residuals
    d_out, d_lse = cotangents
    heads, rope_dim = q.shape[2], q.shape[3] - value_dim
    # d logit_j = p_j (dP_j - delta) with delta = sum(dO * O); lse adds d_lse * p_j, which folds into delta.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse  # [B,T,H]
    if resolve_backward_kernel(tiles.backward_kernel, interpret, q.dtype, value_dim, rope_dim, kv.dtype) == "gluon":
        d_q, d_kv = _gluon_backward(q, kv, indices, d_out.astype(q.dtype), lse, delta, scale=scale,
                                    value_dim=value_dim, d_s_bytes=tiles.backward_d_s_bytes or GLUON_D_S_BYTES)
    else:
        q_p, kv_p, idx_p, r_p, p_p, block_k, block_h = pad_to_tiles(
            q, kv, indices, value_dim=value_dim, block_k=tiles.backward_block_k, block_h=tiles.backward_block_h)
        heads_p = q_p.shape[2]
        d_out_p = pad_axis(pad_axis(d_out.astype(q.dtype), 3, r_p), 2, heads_p)
        lse_p = pad_axis(lse, 2, heads_p, jnp.inf)  # padded heads: p = 0
        d_q, d_kv = sparse_backward_call(q_p, kv_p, idx_p, d_out_p, lse_p, pad_axis(delta, 2, heads_p),
                                         scale=scale, value_dim=r_p, rope_dim=p_p, block_k=block_k,
                                         block_h=block_h, num_warps=tiles.backward_num_warps, interpret=interpret)
    r_p = dot_size(value_dim)

    def unpad(x):  # [..., R' + P'] -> [..., R + P]
        return jnp.concatenate([x[..., :value_dim], x[..., r_p:r_p + rope_dim]], axis=-1)
    return unpad(d_q[:, :, :heads]), unpad(d_kv).astype(kv.dtype), None  # integer indices have no cotangent


def _gluon_backward(q, kv, indices, d_out, lse, delta, *, scale, value_dim, d_s_bytes):
    """(d_q [B,T,H',R'+P'] (dtype of q), d_kv f32[B,S,R'+P']) by the Gluon kernels (heads padded to 64, widths
    as `pad_latent`), under `jax.vmap` too (as `_gluon_call`)."""
    from pallas_kernels import _gluon
    unmapped = functools.partial(_gluon_backward_unmapped, scale=scale, value_dim=value_dim, d_s_bytes=d_s_bytes)
    return _gluon.vmap_by_folding_into_batch(unmapped)(q, kv, indices, d_out, lse, delta)


def _gluon_backward_unmapped(q, kv, indices, d_out, lse, delta, *, scale, value_dim, d_s_bytes):
    """Pads heads to the kernels' 64-head block (padded heads: lse = +inf, p = 0) and slots to whole 64-slot
    blocks, at least two (-1; Triton 3.6 fails to lower the kernel's loop with one pass), widths as
    `pad_latent`."""
    from pallas_kernels import sparse_attention_backward_gluon as gluon
    q, kv, r_p, _ = pad_latent(q, kv, value_dim)
    heads = round_up(q.shape[2], gluon.BLOCK_H.value)
    q = pad_axis(q, 2, heads)
    d_out = pad_axis(pad_axis(d_out, 3, r_p), 2, heads)
    indices = pad_axis(indices.astype(jnp.int32), 2, round_up(max(indices.shape[-1], 2 * gluon.BLOCK_N.value),
                                                               gluon.BLOCK_N.value), -1)
    return gluon.sparse_backward_gluon(q, kv, indices, d_out, pad_axis(lse, 2, heads, jnp.inf),
                                       pad_axis(delta, 2, heads), scale=scale, value_dim=r_p, d_s_bytes=d_s_bytes)


_sparse_mla.defvjp(_sparse_mla_fwd, _sparse_mla_bwd)


def _tiles(dtype, block_k, block_h):
    """Default forward tiles (an H100 sweep, docs/BENCHMARKS.md): 64 slots x 32 heads for 2-byte inputs; fp32
    takes 32 slots to fit shared memory."""
    wide = jnp.dtype(dtype).itemsize > 2
    return block_k or (32 if wide else 64), block_h or 32


def _backward_tiles(block_k, block_h):
    """Default backward tiles (an H100 sweep, docs/BENCHMARKS.md): 32 slots x 16 heads, 4 warps; d_q [heads, L]
    and d_kv [slots, L] live in fp32 registers, so the tiles are smaller than the forward's."""
    return block_k or 32, block_h or 16


def sparse_mla_pallas(q, kv, indices, *, scale: float, value_dim: int, interpret: bool = False,
                      tiles: Optional[Tiles] = None, return_lse: bool = False):
    """Prefill: q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] -> out [B,T,H,value_dim] (dtype of q), or with
    return_lse (out, lse f32[B,T,H]): each head's log-sum-exp over its valid slots (-inf where none is), which the
    forward computes anyway. Both differentiable in q and kv (`sparse_attention_backward`).

    tiles: slots and heads per step and program, and warps, of the forward and backward kernels (0 = by dtype)."""
    tiles = tiles or Tiles()
    block_k, block_h = _tiles(q.dtype, tiles.block_k, tiles.block_h)
    backward_block_k, backward_block_h = _backward_tiles(tiles.backward_block_k, tiles.backward_block_h)
    tiles = tiles._replace(block_k=block_k, block_h=block_h, backward_block_k=backward_block_k,
                           backward_block_h=backward_block_h)
    out, lse = _sparse_mla(q, kv, indices, float(scale), int(value_dim), bool(interpret), tiles)
    return (out, lse) if return_lse else out


def combine_splits(out, lse):
    """Merge split-K partials: out f32[..., n, H, R], lse f32[..., n, H] -> (f32[..., H, R], the whole lse
    f32[..., H], -inf where every split was empty)."""
    best = jnp.max(lse, axis=-2, keepdims=True)
    best = jnp.where(jnp.isfinite(best), best, 0.0)
    weights = jnp.exp(lse - best)  # [..., n, H]; empty splits (lse = -inf) weigh 0
    total = jnp.sum(weights, axis=-2)
    merged = jnp.sum(weights[..., None] * out, axis=-3)
    has_any = total > 0
    whole_lse = jnp.where(has_any, best[..., 0, :] + jnp.log(jnp.where(has_any, total, 1.0)), -jnp.inf)
    return merged / jnp.where(has_any, total, 1.0)[..., None], whole_lse


def sparse_mla_decode_pallas(q, kv, indices, *, scale: float, value_dim: int, interpret: bool = False,
                             num_splits: int = 0, block_k: int = 0, block_h: int = 0, num_warps: int = 4,
                             forward_kernel: str = "auto", return_lse: bool = False):
    """Decode: q [B,H,L], kv [B,S,L], indices int32[B,K] -> out [B,H,value_dim] (dtype of q), or with return_lse
    (out, lse f32[B,H]) as `sparse_mla_pallas`.

    num_splits = 0 picks as many splits of the K slots as fill a large GPU in one wave: two Pallas programs per SM
    (PROGRAMS_TO_FILL_GPU), one Gluon program (it takes 220 KB of shared memory). On an H100 at K = 2048, 128
    heads: Pallas at B = 64 (256 programs unsplit), one split 177 us, two 190, four 219; Gluon at B = 64, one split
    135 us, two 145, four 173; at B = 8, one 116 us, two 78, eight 71, sixteen 70.
    forward_kernel: as in `Tiles` (the Gluon kernel takes 64 heads and at least 128 slots per program)."""
    batch, heads = q.shape[:2]
    block_k, block_h = _tiles(q.dtype, block_k, block_h)
    if num_splits <= 0:
        programs = PROGRAMS_TO_FILL_GPU
        if resolve_forward_kernel(forward_kernel, interpret, q.dtype, value_dim, kv.dtype) == "gluon":
            block_h, block_k, programs = 64, 128, PROGRAMS_TO_FILL_GPU // 2
        head_blocks = -(-dot_size(heads) // min(block_h, dot_size(heads)))
        most = max(1, -(-indices.shape[-1] // min(block_k, dot_size(indices.shape[-1]))))
        num_splits = max(1, min(most, programs // (batch * head_blocks)))
    out, lse = _sparse_call(q[:, None], kv, indices[:, None], scale=scale, value_dim=value_dim,
                            num_splits=num_splits, out_dtype=jnp.float32, interpret=interpret, block_k=block_k,
                            block_h=block_h, num_warps=num_warps, forward_kernel=forward_kernel)
    out, lse = combine_splits(out[:, 0], lse[:, 0])
    return (out.astype(q.dtype), lse) if return_lse else out.astype(q.dtype)
