"""Lightning-indexer scores and the top-k they select, reference form (SPEC §1).

    I[b,t,s] = sum_g w[b,t,g] * ReLU(q[b,t,g,:] . k[b,s,:])     for s <= pos[b,t], else -inf

The callers fold the indexer's constant scales (index_n_heads^-0.5 and index_head_dim^-0.5) into `w`: ReLU is
positively homogeneous, so c * ReLU(a) == ReLU(c * a) for c > 0, and the kernel stays a plain weighted sum.

fp8 (`quantize_fp8`, as DeepSeek-V3.2 runs its indexer): each key row and each query head is scaled by its own
amax / 448 and rounded to float8_e4m3fn. The query scale folds into w by the same homogeneity; the key scale
multiplies the head sum:  I[b,t,s] = k_scale[b,s] * sum_g (w * q_scale)[b,t,g] * ReLU(q8 . k8).  Products of two
e4m3 values are exact in fp32. The head sum then runs on the tensor cores (`indexer_gluon`): fp8_head_sum="bf16"
(the default) rounds ReLU(q8 . k8) and w * q_scale to bf16 before the fp32 sum; "fp32" sums them unrounded, as
DeepSeek's DeepGEMM kernel does. On random DeepSeek-V3.2-shaped inputs both selected the unquantised scores'
top-2048 equally often (docs/BENCHMARKS.md, session 22): fp8's rounding of the inputs (2^-4) dominates bf16's (2^-9).
Shapes: B batch, T queries, S keys, G indexer heads, I indexer head width, K top-k slots.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._blocking import gather_slot_rows, map_query_blocks
from pallas_kernels.topk_reference import topk_reference


FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_HEAD_SUMS = ("bf16", "fp32")


def round_to_bf16(x):
    """f32 x rounded to the nearest bf16 (ties to even), kept in f32, as `cvt.rn.bf16x2.f32` rounds. Bit arithmetic,
    not an astype round trip, which XLA may drop as excess precision (it did, in one fusion of the interpreted
    Pallas kernel and not in another). For finite x."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def check_fp8_head_sum(fp8_head_sum: str) -> None:
    if fp8_head_sum not in FP8_HEAD_SUMS:
        raise ValueError(f"fp8_head_sum must be one of {list(FP8_HEAD_SUMS)}, got {fp8_head_sum!r}")


def _quantize_rows(x):
    """x [..., I] -> (float8_e4m3fn [..., I], f32 scale [...]) with x ~= x8 * scale, per row of the last axis."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (x / scale[..., None]).astype(jnp.float8_e4m3fn), scale


def quantize_fp8_keys(k):
    """Indexer keys k [..., S, I] -> (k8 float8_e4m3fn [..., S, I], k_scale f32[..., S]). Per row, so a key cache
    can quantise each token once, when it is written, and get what quantising the whole cache would give."""
    return _quantize_rows(k)


def quantize_fp8_queries(q, w):
    """Indexer queries q [B,T,G,I] and head weights w [B,T,G] -> (q8 [B,T,G,I], w * q_scale f32[B,T,G])."""
    q8, q_scale = _quantize_rows(q)
    return q8, w.astype(jnp.float32) * q_scale


def quantize_fp8(q, w, k):
    """Indexer inputs to fp8 with per-row scales: q [B,T,G,I], w [B,T,G], k [B,S,I] ->
    (q8 [B,T,G,I], w * q_scale f32[B,T,G], k8 [B,S,I], k_scale f32[B,S])."""
    return (*quantize_fp8_queries(q, w), *quantize_fp8_keys(k))


def scored_inputs(q, w, k, *, fp8: bool = False, k_scale=None):
    """The indexer's inputs as the scores see them -> (q, w, k, k_scale or None): unchanged; quantised (fp8); or,
    with k_scale given, keys already fp8 (a cache written with `quantize_fp8_keys`) and only q and w quantised."""
    if k_scale is None:
        return quantize_fp8(q, w, k) if fp8 else (q, w, k, None)
    if k.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"k_scale means fp8 keys (float8_e4m3fn), got keys of dtype {k.dtype}")
    return (*quantize_fp8_queries(q, w), k, k_scale)


def indexer_scores_reference(q, w, k, q_positions, k_scale=None, *, fp8_head_sum: str = "bf16"):
    """q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] (k_scale f32[B,S] for fp8 inputs) ->
    scores f32[B,T,S] (-inf where s > pos). fp8_head_sum: how fp8 scores sum over heads (module docstring)."""
    check_fp8_head_sum(fp8_head_sum)
    fp8 = k_scale is not None
    if fp8:  # exact products in fp32 (what the tensor cores do), then the key scale
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    highest = jax.lax.Precision.HIGHEST if fp8 else None
    logits = jnp.einsum("btgi,bsi->btsg", q, k, preferred_element_type=jnp.float32, precision=highest)
    relu, w = jax.nn.relu(logits), w.astype(jnp.float32)
    if fp8 and fp8_head_sum == "bf16":
        relu, w = round_to_bf16(relu), round_to_bf16(w)
    scores = jnp.einsum("btsg,btg->bts", relu, w, precision=highest)
    if fp8:
        scores = scores * k_scale[:, None, :]
    visible = jnp.arange(k.shape[1])[None, None, :] <= q_positions[:, :, None]
    return jnp.where(visible, scores, -jnp.inf)


def indexer_slot_scores_reference(q, w, k, indices):
    """The scores over each query's selected slots: q [B,T,G,I], w [B,T,G], k [B,S,I], indices int32[B,T,K]
    (-1 = no slot) -> f32[B,T,K] = sum_g w ReLU(q_g . k[idx]), 0 at -1 slots. Materialises the gathered keys
    [B,T,K,I] and the logits [B,T,K,G] (`indexer_slots` has the kernels that do not)."""
    rows = gather_slot_rows(k, indices)  # [B,T,K,I]
    logits = jnp.einsum("btgi,btki->btkg", q, rows, preferred_element_type=jnp.float32)
    scores = jnp.einsum("btkg,btg->btk", jax.nn.relu(logits), w.astype(jnp.float32))
    return jnp.where(indices >= 0, scores, 0.0)


def indexer_topk_reference(q, w, k, q_positions, *, topk: int, block_q: int = 128, fp8: bool = False,
                           k_scale=None, fp8_head_sum: str = "bf16"):
    """Top-k key ids per query: q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> int32[B,T,topk].
    fp8: score with the fp8-quantised inputs (`quantize_fp8`); k_scale f32[B,S]: k is already fp8 (`scored_inputs`).
    fp8_head_sum as in `indexer_scores_reference`.

    Blocked over queries so that at most [B, block_q, S, G] logits exist at once, never [B, T, S, G].
    """
    q, w, k, k_scale = scored_inputs(q, w, k, fp8=fp8, k_scale=k_scale)

    def one_block(q_blk, w_blk, pos_blk):
        return topk_reference(indexer_scores_reference(q_blk, w_blk, k, pos_blk, k_scale, fp8_head_sum=fp8_head_sum),
                              topk)

    # Padded queries sit at position -1: they see no key and select nothing.
    return map_query_blocks(one_block, block_q, (q, w, q_positions), fills=(0, 0, -1))


def indexer_topk_decode_reference(q, w, k, q_positions, *, topk: int, fp8: bool = False, k_scale=None,
                                  fp8_head_sum: str = "bf16"):
    """Decode, one new token per row: q [B,G,I], w [B,G], k [B,S,I], q_positions int[B] -> int32[B,topk]."""
    q, w, k, k_scale = scored_inputs(q, w, k, fp8=fp8, k_scale=k_scale)
    scores = indexer_scores_reference(q[:, None], w[:, None], k, q_positions[:, None], k_scale,
                                      fp8_head_sum=fp8_head_sum)
    return topk_reference(scores, topk)[:, 0]
