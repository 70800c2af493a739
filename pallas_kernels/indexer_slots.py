"""The indexer's scores over each query's selected slots, differentiable: what the sparse stage's distillation loss
(`LightningIndexer.log_probs` with indices) trains the indexer through.

    s[b,t,j] = sum_g w[b,t,g] ReLU(q[b,t,g] . k[b, idx[b,t,j]])          (0 at -1 slots)

Backward, with ds[b,t,j] the cotangent of the scores and m[t,j,g] = 1[q[t,g] . k[idx_j] > 0]:

    d_w[t,g]     = sum_j ds[t,j] ReLU(q[t,g] . k[idx_j])
    d_q[t,g]     = sum_j ds[t,j] w[t,g] m[t,j,g] k[idx_j]
    d_k[idx_j]  += sum_g ds[t,j] w[t,g] m[t,j,g] q[t,g]

Why kernels: autodiff of the plain-JAX form (`indexer_reference.indexer_slot_scores_reference`) materialises the
gathered keys [B,T,K,I] and the logits [B,T,K,G] and keeps them for the backward. On an H100 at T = 4096, K = 2048,
G = 64, I = 128 that was 4.3 GB of temporaries and 215 ms forward + backward, nine times the sparse MLA attention's
own forward + backward at the same shape (docs/BENCHMARKS.md, session 27). Here one program per token gathers its
slots' keys block_k at a time inside the kernel, and the logits never leave registers:

  - forward: logits [block_k, G] = keys . q^T on the tensor cores, then ReLU and the head sum on the CUDA cores;
  - backward: the same logits, then d_w on the CUDA cores, d_q += G^T . keys and d_rows = G . q on the tensor cores
    (G = ds w m [block_k, G], rounded to the input dtype for both dots, as the sparse MLA backward rounds dS), and
    d_rows added into an fp32 d_k with relaxed atomics (`_triton_ops`): many tokens select the same key. Row S of
    d_k is a sink for the -1 slots of a block that has valid ones too, whose adds are discarded; a block of -1
    slots only is skipped (`_pallas.skip_blocks_without_slots`: sent to the sink, the causal tails of the first
    K tokens' lists made every program add into that one row at once, 11.2 ms against 1.8 ms at T = 4096).

On Hopper the same two passes run in Gluon (`indexer_slots_gluon`; `resolve_kernel`, `Kernels.slot_scores`) for
bf16/fp16 inputs of at most 64 heads x 128: on an H100 at T = 32768 (64 x 128, K = 2048, causal) the forward takes
2.4 ms against this module's 3.7, the backward 13.8 against 17.5, its d_k added with 16-byte atomics
(docs/BENCHMARKS.md, session 33).

A slot id repeated within a token (our top-k never repeats one, but it is valid input) counts once per occurrence,
as in the reference. Shapes: B batch, T queries, S keys, G indexer heads (G_p padded), I head width (I_p padded),
K slots (K_p padded with -1 to a multiple of block_k).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._pallas import compiler_params, dot_size, load, pad_axis, round_up, skip_blocks_without_slots
from pallas_kernels._triton_ops import atomic_add_relaxed

BLOCK_K = 64  # slots per step
NUM_WARPS = 4
_CONTRACT_LAST = (((1,), (1,)), ((), ()))
_MATMUL = (((1,), (0,)), ((), ()))


def _gather_keys(k_ref, ids, num_keys: int):
    """The key rows of slot ids int32[block_k] -> [block_k, I_p]; -1 slots read row 0 (the caller masks them) and
    ids past the keys are clipped to the last one."""
    rows = jnp.clip(ids, 0, num_keys - 1)[:, None]
    return load(k_ref.at[rows, lax.iota(jnp.int32, k_ref.shape[1])[None, :]])


def _logits(keys, q, precision):
    return lax.dot_general(keys, q, _CONTRACT_LAST, preferred_element_type=jnp.float32, precision=precision)


def _scores_kernel(q_ref, w_ref, k_ref, idx_ref, out_ref, *, block_k: int, num_keys: int, precision):
    # q_ref [G_p, I_p], w_ref f32[G_p], k_ref [S, I_p] (this row's keys), idx_ref int32[K_p], out_ref f32[K_p]
    q, w = q_ref[...], w_ref[...]

    def slot_block(j, _):
        ids = idx_ref[pl.ds(j * block_k, block_k)]
        keys = _gather_keys(k_ref, ids, num_keys)
        scores = jnp.sum(jnp.maximum(_logits(keys, q, precision), 0.0) * w[None, :], axis=1)
        out_ref[pl.ds(j * block_k, block_k)] = jnp.where(ids >= 0, scores, 0.0)
        return 0

    lax.fori_loop(0, idx_ref.shape[0] // block_k, slot_block, 0)


def _backward_kernel(q_ref, w_ref, k_ref, idx_ref, d_ref, _d_k_zeros_ref, d_q_ref, d_w_ref, d_k_ref, *,
                     block_k: int, num_keys: int, precision):
    # q_ref [G_p, I_p], w_ref f32[G_p], k_ref [S, I_p], idx_ref int32[K_p], d_ref f32[K_p] (the scores' cotangent),
    # d_q_ref [G_p, I_p], d_w_ref f32[G_p], d_k_ref f32[S+1, I_p] (aliased with _d_k_zeros_ref: starts at zero)
    q, w = q_ref[...], w_ref[...]

    @functools.partial(skip_blocks_without_slots, idx_ref, block_k)
    def slot_block(j, carry):
        d_q, d_w = carry
        ids = idx_ref[pl.ds(j * block_k, block_k)]
        keys = _gather_keys(k_ref, ids, num_keys)
        logits = _logits(keys, q, precision)  # [block_k, G_p]
        d_scores = jnp.where(ids >= 0, d_ref[pl.ds(j * block_k, block_k)], 0.0)[:, None]
        d_w = d_w + jnp.sum(d_scores * jnp.maximum(logits, 0.0), axis=0)
        grad = jnp.where(logits > 0, d_scores * w[None, :], 0.0).astype(q.dtype)  # [block_k, G_p]
        d_q = d_q + lax.dot_general(grad.T, keys, _MATMUL, preferred_element_type=jnp.float32, precision=precision)
        d_rows = lax.dot_general(grad, q, _MATMUL, preferred_element_type=jnp.float32, precision=precision)
        sink = jnp.where(ids >= 0, ids, num_keys)[:, None]
        atomic_add_relaxed(d_k_ref, (sink, lax.iota(jnp.int32, d_k_ref.shape[1])[None, :]), d_rows)
        return d_q, d_w

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    d_q, d_w = lax.fori_loop(0, idx_ref.shape[0] // block_k, slot_block, init)
    d_q_ref[...] = d_q.astype(d_q_ref.dtype)
    d_w_ref[...] = d_w


def _pad(q, w, k, indices, gluon: bool = False):
    """Heads and width to tensor-core powers of two (zero queries and weights add nothing; the Gluon kernels take
    64 heads), slots to a multiple of the slot block (-1). -> (q, w f32, k, indices, block_k)."""
    heads_p, width_p = dot_size(q.shape[2]), dot_size(q.shape[3])
    if gluon:
        from pallas_kernels.indexer_slots_gluon import BLOCK_K as GLUON_BLOCK_K, HEADS
        heads_p = HEADS.value
    q = pad_axis(pad_axis(q, 2, heads_p), 3, width_p)
    w = pad_axis(w.astype(jnp.float32), 2, heads_p)
    k = pad_axis(k.astype(q.dtype), 2, width_p)
    block_k = GLUON_BLOCK_K.value if gluon else min(BLOCK_K, dot_size(indices.shape[-1]))
    indices = pad_axis(indices.astype(jnp.int32), 2, round_up(indices.shape[-1], block_k), -1)
    return q, w, k, indices, block_k


def _specs(q, k, indices):
    """BlockSpecs of q, w, k, idx for a (token, batch) grid; one program per token."""
    heads, width, num_keys, slots = q.shape[2], q.shape[3], k.shape[1], indices.shape[2]
    return [pl.BlockSpec((None, None, heads, width), lambda t, b: (b, t, 0, 0)),
            pl.BlockSpec((None, None, heads), lambda t, b: (b, t, 0)),
            pl.BlockSpec((None, num_keys, width), lambda t, b: (b, 0, 0)),
            pl.BlockSpec((None, None, slots), lambda t, b: (b, t, 0))]


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def resolve_kernel(kernel: str, *, interpret: bool, dtype, heads: int, width: int) -> str:
    """The kernels that run, forward and backward: "gluon" (`indexer_slots_gluon`: Hopper, 2-byte inputs, at most
    64 heads of width at most 128) or "pallas" (this module's). "auto" takes Gluon where it runs, "gluon" insists
    (an error says why it cannot run), "pallas" always is; interpret mode is Pallas. heads, width: as given."""
    from pallas_kernels.sparse_attention import resolve_kernel_choice

    def reason():
        from pallas_kernels import _gluon
        return _gluon.unavailable_or_unsupported("pallas_kernels.indexer_slots_gluon", dtype, heads, dot_size(width))

    return resolve_kernel_choice("kernel", kernel, interpret, reason)


def indexer_slot_scores_pallas(q, w, k, indices, *, interpret: bool = False, kernel: str = "auto"):
    """q [B,T,G,I], w [B,T,G], k [B,S,I], indices int32[B,T,K] (-1 = no slot) -> f32[B,T,K] (0 at -1 slots).
    kernel: "auto", "gluon" or "pallas" (`resolve_kernel`). Not differentiable by itself:
    `indexer_slot_scores_trainable` is."""
    _check(q, w, k, indices)
    num_slots = indices.shape[2]
    gluon = resolve_kernel(kernel, interpret=interpret, dtype=q.dtype, heads=q.shape[2], width=q.shape[3]) == "gluon"
    q, w, k, indices, block_k = _pad(q, w, k, indices, gluon)
    if gluon:
        from pallas_kernels import _gluon
        from pallas_kernels.indexer_slots_gluon import slot_scores_gluon
        return _gluon.vmap_by_folding_into_batch(slot_scores_gluon)(q, w, k, indices)[:, :, :num_slots]
    batch, num_q = q.shape[:2]
    scores = pl.pallas_call(
        functools.partial(_scores_kernel, block_k=block_k, num_keys=k.shape[1], precision=_precision(q.dtype)),
        grid=(num_q, batch),
        in_specs=_specs(q, k, indices),
        out_specs=pl.BlockSpec((None, None, indices.shape[2]), lambda t, b: (b, t, 0)),
        out_shape=jax.ShapeDtypeStruct(indices.shape, jnp.float32),
        interpret=interpret, compiler_params=None if interpret else compiler_params(NUM_WARPS),
        name="indexer_slot_scores",
    )(q, w, k, indices)
    return scores[:, :, :num_slots]


def _check(q, w, k, indices):
    batch, num_q, heads, width = q.shape
    want = {"w": (w.shape, (batch, num_q, heads)), "indices": (indices.shape[:2], (batch, num_q)),
            "k": ((k.shape[0], k.shape[2]), (batch, width))}
    for name, (got, expected) in want.items():
        if tuple(got) != tuple(expected):
            raise ValueError(f"indexer slot scores: {name} has shape {got} where q {q.shape} needs {expected} "
                             f"(q [B,T,G,I], w [B,T,G], k [B,S,I], indices [B,T,K])")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def indexer_slot_scores_trainable(q, w, k, indices, interpret: bool = False, kernel: str = "auto"):
    """`indexer_slot_scores_pallas`, differentiable in q, w and k (indices take no gradient), with a kernel
    backward (this module's, or `indexer_slots_gluon`'s: `kernel` chooses both passes, as in `resolve_kernel`):
    neither pass stores the per-head logits [B,T,K,G] or the gathered keys."""
    return indexer_slot_scores_pallas(q, w, k, indices, interpret=interpret, kernel=kernel)


def _trainable_fwd(q, w, k, indices, interpret, kernel):
    return indexer_slot_scores_pallas(q, w, k, indices, interpret=interpret, kernel=kernel), (q, w, k, indices)


def _trainable_bwd(interpret, kernel, residuals, d_scores):
    q, w, k, indices = residuals
    batch, num_q, heads, width = q.shape
    num_keys = k.shape[1]
    gluon = resolve_kernel(kernel, interpret=interpret, dtype=q.dtype, heads=heads, width=width) == "gluon"
    q_p, w_p, k_p, idx_p, block_k = _pad(q, w, k, indices, gluon)
    d_scores = pad_axis(d_scores.astype(jnp.float32), 2, idx_p.shape[2])
    if gluon:
        from pallas_kernels import _gluon
        from pallas_kernels.indexer_slots_gluon import slot_scores_backward_gluon
        d_q, d_w, d_k = _gluon.vmap_by_folding_into_batch(slot_scores_backward_gluon)(q_p, w_p, k_p, idx_p,
                                                                                        d_scores)
        return (d_q[:, :, :heads, :width], d_w[:, :, :heads].astype(w.dtype), d_k[:, :, :width].astype(k.dtype),
                None)
    heads_p, width_p = q_p.shape[2:]
    d_q, d_w, d_k = pl.pallas_call(
        functools.partial(_backward_kernel, block_k=block_k, num_keys=num_keys, precision=_precision(q_p.dtype)),
        grid=(num_q, batch),
        in_specs=_specs(q_p, k_p, idx_p) + [
            pl.BlockSpec((None, None, idx_p.shape[2]), lambda t, b: (b, t, 0)),
            pl.BlockSpec((None, num_keys + 1, width_p), lambda t, b: (b, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, heads_p, width_p), lambda t, b: (b, t, 0, 0)),
                   pl.BlockSpec((None, None, heads_p), lambda t, b: (b, t, 0)),
                   pl.BlockSpec((None, num_keys + 1, width_p), lambda t, b: (b, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(q_p.shape, q_p.dtype),
                   jax.ShapeDtypeStruct(w_p.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, num_keys + 1, width_p), jnp.float32)],
        input_output_aliases={5: 2},
        interpret=interpret, compiler_params=None if interpret else compiler_params(NUM_WARPS),
        name="indexer_slot_scores_backward",
    )(q_p, w_p, k_p, idx_p, d_scores, jnp.zeros((batch, num_keys + 1, width_p), jnp.float32))
    return (d_q[:, :, :heads, :width].astype(q.dtype), d_w[:, :, :heads].astype(w.dtype),
            d_k[:, :num_keys, :width].astype(k.dtype), None)


indexer_slot_scores_trainable.defvjp(_trainable_fwd, _trainable_bwd)
