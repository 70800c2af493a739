"""Causal dense MLA attention (training form) and its head-averaged distribution on the GPU, never storing the
[B,H,T,S] logits: the dense stages' attention (`dense_attention_reference` states the math).

Why: the dense warm-up distils each indexer towards its layer's attention distribution over *all* visible keys.
In plain XLA that is a softmax over materialised fp32 logits, [H, C, S] per chunk of C queries: 17 GB for 256
queries of a 128K context at 128 heads, and XLA streams them through HBM several times (session 35 ran the
warm-up at 8K; longer did not fit). Two kernels replace it:

  1. `_forward_kernel`, one program per (row, head, block of queries): a flash-attention forward (online softmax,
     the output accumulated in fp32) over key blocks up to the block's last visible key, so causal rows cost
     their visible half. It returns the output and each head's log-sum-exp (lse).
  2. `_distribution_kernel`, one program per (row, block of queries, block of keys): for every head, the logits
     again and exp(logits - lse), summed over heads in fp32, divided by H; one [block_q, block_k] tile stored.
     Tiles wholly past the block's last visible key store zeros without a dot.
The price of never storing the logits is the QK dot twice (once per kernel); the distribution is C x S fp32, H times
smaller than the logits.

Gradients (`jax.custom_vjp`): the forward saves its output and lse; the backward recomputes the probabilities
from the lse (flash-attention's backward) in two kernels: `_key_grads_kernel`, one program per (row, block of
keys) looping over heads and over the query blocks that see those keys, gives d_k_nope and d_values per head and
d_k_rope summed over the heads that share it; `_query_grads_kernel`, one program per (row, head, block of queries),
gives d_q. On Hopper `dense_attention_backward_gluon` runs the same two kernels in Gluon (`backward_kernel`,
1.5x these at DeepSeek-V3.2's shapes), and `dense_distribution_gluon` the distribution (1.34x the Pallas kernel
at 128K). The dense warm-up never differentiates its attention (its main model is frozen); the `dense` stage does.
The distribution is a target: not differentiable, the dispatch stops its inputs' gradients.

In the forward and the two gradient kernels, tiles that every real query of a block sees whole skip the causal mask
(only those straddling the diagonal pay for it; queries that see nothing get lse +inf, so p = 0 with no mask), and
every exp there is an exp2 with the scale folded into log2(e) (the wrapper hands the kernels lse in base 2). The
distribution kernel masks every tile, by one additive bias per tile shared by its heads (measured faster than an
unmasked second body: see its comment).

Widths are zero-padded to tensor-core sizes (zeros change no dot), queries to whole blocks (position -1: nothing
visible, zeros out, lse -inf), keys to whole blocks (never visible: ids past the last key are masked).
Shapes: B batch, T queries, S keys, H heads, N nope width, P rope width, V value width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from pallas_kernels._pallas import compiler_params, dot_size, next_pow2, pad_axis, round_up

# Tiles (queries per program, keys per step or program, warps), one per kernel, chosen on an H100 at DeepSeek-V3.2's
# shapes (128 heads, 128 + 64 -> 128; scripts/bench_dense.py, docs/BENCHMARKS.md 2026-12-05). Forward, last chunk of
# 1024 queries at 128K keys: 36.4 ms with 128x128 (8 warps) vs 47.6 ms with 64x64 (4). The backward at 32K: 34.2 ms
# with 128x64 (8) vs 42.2 ms with 64x64; 128x128 needs more shared memory than the H100 has. The distribution
# reloads every head's q and k in every tile, which bounds it (session 42: loading q once per tile, a wrong-output
# ablation, ran in 14.0 ms where the kernel takes 24; dropping its exp changed nothing), so the larger tile's reuse
# wins: 20.7 ms at 128x128 (8) vs 23.9 at 64x64 (4) and 73 at 128x128 (4) (with the additive mask; session 38's
# kernel, two selects per logit, was slower at 128x128: 27.7 vs 24.1).
FORWARD_TILES = (128, 128, 8)
BACKWARD_TILES = (128, 64, 8)
DISTRIBUTION_TILES = (128, 128, 8)
_LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
_LN_2 = 0.6931471805599453


def _dot(a, b, precision, transpose_b: bool = True):
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _visible(positions, first_key: int | jax.Array, block_k: int, num_keys: int):
    """bool[block_q, block_k]: key first_key + j is visible to the query at positions[i]."""
    ids = first_key + lax.iota(jnp.int32, block_k)
    return (ids[None, :] <= positions[:, None]) & (ids[None, :] < num_keys)


def _blocks_to_walk(positions, block_k: int, num_keys: int):
    """Key blocks holding every key visible to some query of the block (0 when none is: padded queries)."""
    last = jnp.minimum(jnp.max(positions), num_keys - 1)
    return jnp.maximum(last + 1 + block_k - 1, 0) // block_k


def _first_real_position(positions, num_keys: int):
    """The smallest position of a real query (num_keys when every query is padding, position -1)."""
    return jnp.min(jnp.where(positions >= 0, positions, num_keys))


def _seen_whole(positions, first_key: int | jax.Array, block_k: int, num_keys: int):
    """Every real query sees all of keys first_key .. first_key + block_k - 1: the tile needs no causal mask."""
    last_key = first_key + block_k - 1
    return (last_key < num_keys) & (last_key <= _first_real_position(positions, num_keys))


def _blocks_seen_whole(positions, block_k: int, num_keys: int):
    """Leading key blocks that every real query of the block sees whole: these need no causal mask, so of a causal
    chunk's blocks only the few that straddle its diagonal pay for it. Padded queries (position -1) are left out
    of the count; the kernels zero their rows instead."""
    whole = jnp.minimum((_first_real_position(positions, num_keys) + 1) // block_k, num_keys // block_k)
    return jnp.minimum(whole, _blocks_to_walk(positions, block_k, num_keys))


def _forward_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, pos_ref, out_ref, lse_ref, *, scale: float,
                    block_k: int, num_keys: int, precision):
    # qn_ref [Bq, N], qr_ref [Bq, P] (this head's block of queries), kn_ref [S, N], kr_ref [S, P], v_ref [S, V]
    # (this head's keys, the shared rope key, this head's values), pos_ref [Bq], out_ref [Bq, V], lse_ref [Bq].
    # The softmax runs in base 2 with the scale folded into log2(e) (exp2 is the hardware's instruction; exp costs a
    # multiply more per logit); row_max is in those units and the lse is converted back to natural log at the end.
    positions = pos_ref[...]
    q_nope, q_rope = qn_ref[...], qr_ref[...]
    block_q = positions.shape[0]
    scale_log2 = scale * _LOG2_E

    def attend_block(j, carry, masked: bool):
        row_max, row_sum, acc = carry
        keys = pl.ds(j * block_k, block_k)
        logits = (_dot(q_nope, kn_ref[keys, :], precision) + _dot(q_rope, kr_ref[keys, :], precision)) * scale_log2
        if masked:
            logits = jnp.where(_visible(positions, j * block_k, block_k, num_keys), logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # nothing visible yet: keep exp2() finite
        probs = jnp.exp2(logits - safe_max[:, None])
        rescale = jnp.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + jnp.sum(probs, axis=1)
        acc = acc * rescale[:, None] + _dot(probs.astype(v_ref.dtype), v_ref[keys, :], precision,
                                            transpose_b=False)
        return new_max, row_sum, acc

    init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, v_ref.shape[1]), jnp.float32))
    whole = _blocks_seen_whole(positions, block_k, num_keys)
    carry = lax.fori_loop(0, whole, functools.partial(attend_block, masked=False), init)
    row_max, row_sum, acc = lax.fori_loop(whole, _blocks_to_walk(positions, block_k, num_keys),
                                          functools.partial(attend_block, masked=True), carry)
    has_any = (row_sum > 0) & (positions >= 0)  # a padded query's row took the unmasked blocks: drop it
    total = jnp.where(has_any, row_sum, 1.0)
    out_ref[...] = jnp.where(has_any[:, None], acc / total[:, None], 0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has_any, (row_max + jnp.log2(total)) * _LN_2, -jnp.inf)


def _distribution_kernel(qn_ref, qr_ref, kn_ref, kr_ref, pos_ref, lse_ref, out_ref, *, scale: float,
                         num_heads: int, num_keys: int, precision):
    # qn_ref [Bq, H, N], qr_ref [Bq, H, P], kn_ref [Bk, H, N], kr_ref [Bk, P], pos_ref [Bq], lse_ref [H, Bq] (in
    # base 2), out_ref [Bq, Bk]: this tile of the head-averaged distribution. The mask is made once per tile as
    # an exponent bias (0 visible, -inf not), so each head pays one add for it instead of two selects, and exp2
    # of -inf is 0 (no faster at 64x64 tiles, where loads bound the kernel; at 128x128 it runs faster than session
    # 38's two-select kernel did: see DISTRIBUTION_TILES). A second, unmasked body for the tiles seen whole (a cond
    # between the two, as the key-gradient kernel has) made this kernel 50-65% slower on an H100 (128K: 24.2 ->
    # 36.3 ms; docs/BENCHMARKS.md, session 41).
    positions = pos_ref[...]
    block_k = kr_ref.shape[0]
    first_key = pl.program_id(2) * block_k
    # Finite logits (padded keys are zeros) and lse +inf for queries that see nothing: no inf - inf below.
    bias = jnp.where(_visible(positions, first_key, block_k, num_keys), 0.0, -jnp.inf)
    k_rope = kr_ref[...]
    scale_log2 = scale * _LOG2_E

    def add_head(h, total):
        logits = _dot(qn_ref[:, h, :], kn_ref[:, h, :], precision) + _dot(qr_ref[:, h, :], k_rope, precision)
        return total + jnp.exp2(logits * scale_log2 + (bias - lse_ref[h, :][:, None]))

    def tile(_):
        return lax.fori_loop(0, num_heads, add_head, jnp.zeros(bias.shape, jnp.float32)) / num_heads

    out_ref[...] = lax.cond(first_key <= jnp.max(positions), tile,
                            lambda _: jnp.zeros(bias.shape, jnp.float32), None)


def _check(q_nope, q_rope, k_nope, k_rope, q_positions, values=None, lse=None):
    """Shape errors that name the offending input."""
    if q_nope.ndim != 4 or q_rope.ndim != 4 or k_nope.ndim != 4 or k_rope.ndim != 3 or q_positions.ndim != 2:
        raise ValueError(f"want q_nope [B,T,H,N], q_rope [B,T,H,P], k_nope [B,S,H,N], k_rope [B,S,P], "
                         f"q_positions [B,T]; got {q_nope.shape}, {q_rope.shape}, {k_nope.shape}, {k_rope.shape}, "
                         f"{q_positions.shape}")
    (b, t, h, n), p = q_nope.shape, q_rope.shape[-1]
    if q_rope.shape[:3] != (b, t, h):
        raise ValueError(f"q_rope {q_rope.shape} must be [B, T, H, P] with B, T, H = {(b, t, h)} of q_nope")
    if k_nope.shape[0] != b or k_nope.shape[2:] != (h, n):
        raise ValueError(f"k_nope {k_nope.shape} must be [B={b}, S, H={h}, N={n}] to match q_nope {q_nope.shape}")
    if k_rope.shape != (b, k_nope.shape[1], p):
        raise ValueError(f"k_rope {k_rope.shape} must be [B, S, P] = {(b, k_nope.shape[1], p)}")
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions {q_positions.shape} must be [B, T] = {(b, t)}")
    if values is not None and values.shape[:3] != k_nope.shape[:3]:
        raise ValueError(f"values {values.shape} must be [B, S, H, V] with B, S, H = {k_nope.shape[:3]} of k_nope")
    if lse is not None and lse.shape != (b, t, h):
        raise ValueError(f"lse {lse.shape} must be [B, T, H] = {(b, t, h)}, the attention's log-sum-exp per head")


def _padded(q_nope, q_rope, k_nope, k_rope, q_positions, block_q: int, block_k: int):
    """Widths to tensor-core sizes, queries to whole blocks (position -1), keys to whole blocks."""
    n_p, p_p = dot_size(q_nope.shape[-1]), dot_size(q_rope.shape[-1])
    t_p, s_p = round_up(q_nope.shape[1], block_q), round_up(k_nope.shape[1], block_k)
    q_nope = pad_axis(pad_axis(q_nope, 3, n_p), 1, t_p)
    q_rope = pad_axis(pad_axis(q_rope, 3, p_p), 1, t_p)
    k_nope = pad_axis(pad_axis(k_nope, 3, n_p), 1, s_p)
    k_rope = pad_axis(pad_axis(k_rope, 2, p_p), 1, s_p)
    q_positions = pad_axis(q_positions.astype(jnp.int32), 1, t_p, -1)
    return q_nope, q_rope, k_nope, k_rope, q_positions


def _lse_for_kernels(lse, q_positions, num_q_padded: int, num_heads_padded: int | None = None):
    """lse f32[B,T,H] as the kernels read it, f32[B,H,T_p], in base 2 (lse * log2(e): the kernels' exponents are
    logits * scale * log2(e) - lse2), and +inf for every query that sees nothing (position -1, padding, padded
    heads), so that exp2(exponent) is 0 there and unmasked tiles need no row mask."""
    lse = jnp.where(q_positions[..., None] >= 0, lse.astype(jnp.float32) * _LOG2_E, jnp.inf)
    lse = pad_axis(jnp.moveaxis(lse, 2, 1), 2, num_q_padded, jnp.inf)
    return lse if num_heads_padded is None else pad_axis(lse, 1, num_heads_padded, jnp.inf)


def _tiles(tiles, name: str) -> tuple[int, int, int]:
    """(block_q, block_k, num_warps) as ints; Triton's tiles are powers of two of at least 16."""
    try:
        block_q, block_k, num_warps = (int(t) for t in tiles)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (block_q, block_k, num_warps), got {tiles!r}") from None
    if any(t < 16 or t & (t - 1) for t in (block_q, block_k)) or num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"{name}: block_q and block_k must be powers of two >= 16 and num_warps a power of two, "
                         f"got {tiles!r}")
    return block_q, block_k, num_warps


def _check_scale(scale) -> float:
    """The softmax scale as a Python float: it is compiled into the kernels (folded into exp2's log2(e)), so it
    must be a concrete, finite, positive number, not a traced value."""
    try:
        value = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"scale must be a concrete Python number (it is compiled into the kernels), got "
                         f"{scale!r}") from None
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return value


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _resolve_gluon_choice(which: str, choice: str, module: str, *, interpret: bool, dtypes, widths,
                          pallas_tiling: bool) -> str:
    """"pallas" or "gluon" by `sparse_attention.resolve_kernel_choice`: "auto" takes Gluon where it runs (a Hopper
    GPU with triton and jax-triton; the inputs all bf16 or all fp16; `module`'s unsupported_reason None for the
    widths), unless Pallas tiles were given (pallas_tiling). dtypes: of q_nope, q_rope, k_nope, k_rope (and
    values for the attention); widths: (N, P, V), or (N, P) for the distribution."""
    from pallas_kernels.sparse_attention import resolve_kernel_choice
    if choice == "auto" and pallas_tiling:
        return "pallas"

    def reason():
        names = [jnp.dtype(d).name for d in dtypes]
        if len(set(names)) != 1:
            inputs = "q, k and values" if len(names) == 5 else "q and k"
            return f"it takes {inputs} of one dtype, got {names}"
        from pallas_kernels import _gluon
        return _gluon.unavailable_or_unsupported(module, dtypes[0], *widths)
    return resolve_kernel_choice(which, choice, interpret, reason)


def resolve_forward_kernel(forward_kernel: str, **kwargs) -> str:
    """The forward's kernel (`dense_attention_gluon` on Hopper) by `_resolve_gluon_choice`'s rule; keyword
    arguments interpret, dtypes, widths, pallas_tiling."""
    return _resolve_gluon_choice("forward_kernel", forward_kernel, "pallas_kernels.dense_attention_gluon", **kwargs)


def resolve_backward_kernel(backward_kernel: str, **kwargs) -> str:
    """The backward's two kernels (`dense_attention_backward_gluon` on Hopper), by the same rule."""
    return _resolve_gluon_choice("backward_kernel", backward_kernel, "pallas_kernels.dense_attention_backward_gluon",
                                 **kwargs)


def resolve_distribution_kernel(distribution_kernel: str, **kwargs) -> str:
    """The distribution's kernel (`dense_distribution_gluon` on Hopper), by the same rule (widths (N, P))."""
    return _resolve_gluon_choice("distribution_kernel", distribution_kernel, "pallas_kernels.dense_distribution_gluon",
                                 **kwargs)


def _forward(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale, interpret, kernel, block_q, block_k,
             num_warps):
    if kernel == "gluon":
        from pallas_kernels.dense_attention_gluon import dense_forward_gluon
        return dense_forward_gluon(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale=scale)
    (batch, num_q, heads, _), num_keys, value_dim = q_nope.shape, k_nope.shape[1], values.shape[-1]
    qn, qr, kn, kr, positions = _padded(q_nope, q_rope, k_nope, k_rope, q_positions, block_q, block_k)
    v = pad_axis(pad_axis(values, 3, dot_size(value_dim)), 1, kn.shape[1])
    n_p, p_p, v_p, s_p = qn.shape[-1], qr.shape[-1], v.shape[-1], kn.shape[1]
    body = functools.partial(_forward_kernel, scale=scale, block_k=block_k, num_keys=num_keys,
                             precision=_precision(q_nope.dtype))
    out, lse = pl.pallas_call(
        body,
        grid=(batch, heads, qn.shape[1] // block_q),
        in_specs=[pl.BlockSpec((None, block_q, None, n_p), lambda b, h, i: (b, i, h, 0)),
                  pl.BlockSpec((None, block_q, None, p_p), lambda b, h, i: (b, i, h, 0)),
                  pl.BlockSpec((None, s_p, None, n_p), lambda b, h, i: (b, 0, h, 0)),
                  pl.BlockSpec((None, s_p, p_p), lambda b, h, i: (b, 0, 0)),
                  pl.BlockSpec((None, s_p, None, v_p), lambda b, h, i: (b, 0, h, 0)),
                  pl.BlockSpec((None, block_q), lambda b, h, i: (b, i))],
        out_specs=[pl.BlockSpec((None, block_q, None, v_p), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((batch, qn.shape[1], heads, v_p), values.dtype),
                   jax.ShapeDtypeStruct((batch, heads, qn.shape[1]), jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(num_warps, num_stages=2),
        name="dense_attention_forward",
    )(qn, qr, kn, kr, v, positions)
    return out[:, :num_q, :, :value_dim], jnp.moveaxis(lse[:, :, :num_q], 1, 2)


# The names of the backward pass's residuals, for rematerialisation policies (`jax.checkpoint_policies`): a policy
# that saves both lets a recomputation drop the forward kernel, whose outputs are then all known (the out name costs
# [B,T,H,V] per call; the lse, f32[B,T,H], is small).
OUTPUT_NAME = "dense_attention_output"
LSE_NAME = "dense_attention_lse"


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _attention(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale, interpret, forward_kernel, forward_tiles,
               backward_kernel, backward_tiles):
    return _forward(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale, interpret, forward_kernel,
                    *forward_tiles)


def _attention_fwd(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale, interpret, forward_kernel,
                   forward_tiles, backward_kernel, backward_tiles):
    out, lse = _forward(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale, interpret, forward_kernel,
                        *forward_tiles)
    # Named here, on the residuals: a name on the custom_vjp's outputs names other variables, so a policy that
    # saved those would still run this kernel again (checked: docs/BENCHMARKS.md, session 53)
    out, lse = checkpoint_name(out, OUTPUT_NAME), checkpoint_name(lse, LSE_NAME)
    return (out, lse), (q_nope, q_rope, k_nope, k_rope, values, q_positions, out, lse)


def _key_grads_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, pos_ref, do_ref, lse_ref, delta_ref,
                      dkn_ref, dkr_ref, dv_ref, *, scale: float, num_heads: int, block_q: int, num_keys: int,
                      precision):
    # One block of keys, every head: qn_ref [T, H, N], qr_ref [T, H, P], kn_ref [Bk, H, N], kr_ref [Bk, P],
    # v_ref [Bk, H, V], pos_ref [T], do_ref [T, H, V], lse_ref (base 2, +inf for padded queries), delta_ref [H, T]
    # -> dkn_ref [Bk, H, N], dv_ref [Bk, H, V] per head and dkr_ref [Bk, P] summed over the heads that share the
    # rope key.
    block_k = kr_ref.shape[0]
    first_key = pl.program_id(1) * block_k
    k_rope = kr_ref[...]
    dtype = kr_ref.dtype
    scale_log2 = scale * _LOG2_E

    def head(h, d_rope):
        k_nope, values = kn_ref[:, h, :], v_ref[:, h, :]

        def query_block(i, carry):
            queries = pl.ds(i * block_q, block_q)
            positions = pos_ref[queries]

            def add(carry, masked: bool):
                d_nope, d_rope, d_values = carry
                q_nope, q_rope, d_out = qn_ref[queries, h, :], qr_ref[queries, h, :], do_ref[queries, h, :]
                logits = _dot(q_nope, k_nope, precision) + _dot(q_rope, k_rope, precision)
                exponent = logits * scale_log2 - lse_ref[h, queries][:, None]  # lse in base 2
                if masked:
                    visible = _visible(positions, first_key, block_k, num_keys)
                    probs = jnp.where(visible, jnp.exp2(jnp.where(visible, exponent, 0.0)), 0.0)  # [Bq, Bk]
                else:
                    probs = jnp.exp2(exponent)
                d_values += _dot(probs.T.astype(dtype), d_out, precision, transpose_b=False)
                d_logits = probs * (_dot(d_out, values, precision) - delta_ref[h, queries][:, None]) * scale
                d_logits = d_logits.T.astype(dtype)  # [Bk, Bq]
                return (d_nope + _dot(d_logits, q_nope, precision, transpose_b=False),
                        d_rope + _dot(d_logits, q_rope, precision, transpose_b=False), d_values)

            # Query blocks that see none of these keys (all earlier, or padding) are skipped; those whose every
            # real query sees all of them take the unmasked body.
            return lax.cond(jnp.max(positions) >= first_key,
                            lambda c: lax.cond(_seen_whole(positions, first_key, block_k, num_keys),
                                               functools.partial(add, masked=False),
                                               functools.partial(add, masked=True), c),
                            lambda c: c, carry)

        zeros = (jnp.zeros(kn_ref.shape[::2], jnp.float32), d_rope, jnp.zeros(v_ref.shape[::2], jnp.float32))
        d_nope, d_rope, d_values = lax.fori_loop(0, pos_ref.shape[0] // block_q, query_block, zeros)
        dkn_ref[:, h, :] = d_nope.astype(dkn_ref.dtype)
        dv_ref[:, h, :] = d_values.astype(dv_ref.dtype)
        return d_rope

    dkr_ref[...] = lax.fori_loop(0, num_heads, head, jnp.zeros(kr_ref.shape, jnp.float32)).astype(dkr_ref.dtype)


def _query_grads_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, pos_ref, do_ref, lse_ref, delta_ref,
                        dqn_ref, dqr_ref, *, scale: float, block_k: int, num_keys: int, precision):
    # One head's block of queries, as the forward: qn_ref [Bq, N], qr_ref [Bq, P], kn_ref [S, N], kr_ref [S, P],
    # v_ref [S, V], pos_ref, lse_ref, delta_ref [Bq], do_ref [Bq, V] -> dqn_ref [Bq, N], dqr_ref [Bq, P].
    # The probabilities in base 2, as the forward computes them; blocks seen whole need no mask.
    positions = pos_ref[...]
    q_nope, q_rope, d_out = qn_ref[...], qr_ref[...], do_ref[...]
    lse_log2, delta = lse_ref[...], delta_ref[...]  # base 2; +inf for padded queries: p = 0 unmasked
    scale_log2 = scale * _LOG2_E
    dtype = kn_ref.dtype

    def key_block(j, carry, masked: bool):
        d_nope, d_rope = carry
        keys = pl.ds(j * block_k, block_k)
        k_nope, k_rope = kn_ref[keys, :], kr_ref[keys, :]
        logits = _dot(q_nope, k_nope, precision) + _dot(q_rope, k_rope, precision)
        if masked:
            visible = _visible(positions, j * block_k, block_k, num_keys)
            probs = jnp.where(visible, jnp.exp2(jnp.where(visible, logits * scale_log2 - lse_log2[:, None], 0.0)),
                              0.0)
        else:
            probs = jnp.exp2(logits * scale_log2 - lse_log2[:, None])
        d_logits = (probs * (_dot(d_out, v_ref[keys, :], precision) - delta[:, None]) * scale).astype(dtype)
        return (d_nope + _dot(d_logits, k_nope, precision, transpose_b=False),
                d_rope + _dot(d_logits, k_rope, precision, transpose_b=False))

    init = (jnp.zeros(qn_ref.shape, jnp.float32), jnp.zeros(qr_ref.shape, jnp.float32))
    whole = _blocks_seen_whole(positions, block_k, num_keys)
    carry = lax.fori_loop(0, whole, functools.partial(key_block, masked=False), init)
    d_nope, d_rope = lax.fori_loop(whole, _blocks_to_walk(positions, block_k, num_keys),
                                   functools.partial(key_block, masked=True), carry)
    dqn_ref[...] = d_nope.astype(dqn_ref.dtype)
    dqr_ref[...] = d_rope.astype(dqr_ref.dtype)


def _backward(q_nope, q_rope, k_nope, k_rope, values, q_positions, out, lse, d_out, d_lse, *, scale, interpret,
              kernel, block_q, block_k, num_warps):
    """Flash-attention backward: d_logits = p (dO . v - delta) with delta = rowsum(dO * out) - d_lse (the lse's
    cotangent adds p d_lse), recomputing p from the saved lse. Two kernels: per key block (all heads, so that the
    rope key's gradient sums over heads in registers) d_k and d_v; per (head, query block) d_q. kernel "gluon":
    `dense_attention_backward_gluon`'s two (the tiles are the Pallas kernels')."""
    (batch, num_q, heads, n), num_keys = q_nope.shape, k_nope.shape[1]
    p, v = q_rope.shape[-1], values.shape[-1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse  # [B,T,H]
    if kernel == "gluon":
        from pallas_kernels.dense_attention_backward_gluon import dense_backward_gluon
        return dense_backward_gluon(q_nope, q_rope, k_nope, k_rope, values, q_positions, d_out,
                                    _lse_for_kernels(lse, q_positions, num_q), jnp.moveaxis(delta, 2, 1), scale=scale)
    qn, qr, kn, kr, positions = _padded(q_nope, q_rope, k_nope, k_rope, q_positions, block_q, block_k)
    heads_p = next_pow2(heads)
    t_p, s_p, n_p, p_p, v_p = qn.shape[1], kn.shape[1], qn.shape[-1], qr.shape[-1], dot_size(v)
    vals = pad_axis(pad_axis(values, 3, v_p), 1, s_p)
    d_o = pad_axis(pad_axis(d_out.astype(values.dtype), 3, v_p), 1, t_p)
    # lse and delta as [B,H,T]; padded queries get lse +inf (p = 0) and are skipped anyway (position -1)
    lse_t = _lse_for_kernels(lse, q_positions, t_p)
    delta_t = pad_axis(jnp.moveaxis(delta, 2, 1), 2, t_p)
    precision = _precision(q_nope.dtype)
    params = None if interpret else compiler_params(num_warps, num_stages=2)

    # Key gradients: the heads are a block dimension here (a power of two for Triton; padded heads never read).
    qn_h, qr_h, kn_h, vals_h, d_o_h = (pad_axis(x, 2, heads_p) for x in (qn, qr, kn, vals, d_o))
    lse_h, delta_h = _lse_for_kernels(lse, q_positions, t_p, heads_p), pad_axis(delta_t, 1, heads_p)
    whole_q = lambda width: pl.BlockSpec((None, t_p, heads_p, width), lambda b, j: (b, 0, 0, 0))  # noqa: E731
    key_block = lambda width: pl.BlockSpec((None, block_k, heads_p, width), lambda b, j: (b, j, 0, 0))  # noqa: E731
    per_head_q = pl.BlockSpec((None, heads_p, t_p), lambda b, j: (b, 0, 0))
    dkn, dkr, dv = pl.pallas_call(
        functools.partial(_key_grads_kernel, scale=scale, num_heads=heads, block_q=block_q, num_keys=num_keys,
                          precision=precision),
        grid=(batch, s_p // block_k),
        in_specs=[whole_q(n_p), whole_q(p_p), key_block(n_p), pl.BlockSpec((None, block_k, p_p),
                                                                            lambda b, j: (b, j, 0)),
                  key_block(v_p), pl.BlockSpec((None, t_p), lambda b, j: (b, 0)), whole_q(v_p), per_head_q,
                  per_head_q],
        out_specs=[key_block(n_p), pl.BlockSpec((None, block_k, p_p), lambda b, j: (b, j, 0)), key_block(v_p)],
        out_shape=[jax.ShapeDtypeStruct(kn_h.shape, k_nope.dtype), jax.ShapeDtypeStruct(kr.shape, k_rope.dtype),
                   jax.ShapeDtypeStruct(vals_h.shape, values.dtype)],
        interpret=interpret, compiler_params=params, name="dense_attention_key_grads",
    )(qn_h, qr_h, kn_h, kr, vals_h, positions, d_o_h, lse_h, delta_h)

    # Query gradients: one program per (head, block of queries), walking the keys it sees.
    def q_spec(width):
        return pl.BlockSpec((None, block_q, None, width), lambda b, h, i: (b, i, h, 0))

    def k_spec(width):
        return pl.BlockSpec((None, s_p, None, width), lambda b, h, i: (b, 0, h, 0))

    def row_spec():
        return pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    dqn, dqr = pl.pallas_call(
        functools.partial(_query_grads_kernel, scale=scale, block_k=block_k, num_keys=num_keys,
                          precision=precision),
        grid=(batch, heads, t_p // block_q),
        in_specs=[q_spec(n_p), q_spec(p_p), k_spec(n_p), pl.BlockSpec((None, s_p, p_p), lambda b, h, i: (b, 0, 0)),
                  k_spec(v_p), pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)), q_spec(v_p), row_spec(),
                  row_spec()],
        out_specs=[q_spec(n_p), q_spec(p_p)],
        out_shape=[jax.ShapeDtypeStruct(qn.shape, q_nope.dtype), jax.ShapeDtypeStruct(qr.shape, q_rope.dtype)],
        interpret=interpret, compiler_params=params, name="dense_attention_query_grads",
    )(qn, qr, kn, kr, vals, positions, d_o, lse_t, delta_t)
    return (dqn[:, :num_q, :, :n], dqr[:, :num_q, :, :p], dkn[:, :num_keys, :heads, :n],
            dkr[:, :num_keys, :p], dv[:, :num_keys, :heads, :v])


def _attention_bwd(scale, interpret, forward_kernel, forward_tiles, backward_kernel, backward_tiles, residuals,
                   cotangents):
    *inputs, q_positions, out, lse = residuals
    d_out, d_lse = cotangents
    block_q, block_k, num_warps = backward_tiles
    grads = _backward(*inputs, q_positions, out, lse, d_out, d_lse, scale=scale, interpret=interpret,
                      kernel=backward_kernel, block_q=block_q, block_k=block_k, num_warps=num_warps)
    return (*grads, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def dense_attention_pallas(q_nope, q_rope, k_nope, k_rope, values, q_positions, *, scale: float,
                           interpret: bool = False, return_lse: bool = False,
                           tiles: tuple[int, int, int] | None = None,
                           backward_tiles: tuple[int, int, int] | None = None, forward_kernel: str = "auto",
                           backward_kernel: str = "auto"):
    """Inputs and outputs as `dense_attention_reference` (out in the dtype of values; lse f32[B,T,H]).
    Differentiable in every input but q_positions, by the backward kernels (module docstring). `tiles` and
    `backward_tiles` are (block_q, block_k, num_warps) of the Pallas forward (None: FORWARD_TILES) and of the two
    Pallas backward kernels (None: BACKWARD_TILES). forward_kernel: "gluon" (`dense_attention_gluon`, Hopper,
    bf16/fp16: on an H100 at DeepSeek-V3.2's shapes 1.43-1.52x this module's Pallas forward, docs/BENCHMARKS.md
    session 43), "pallas", or "auto" (`resolve_forward_kernel`: Gluon where it runs, unless `tiles` is given);
    backward_kernel likewise for the backward (`dense_attention_backward_gluon`; "auto" keeps Pallas where
    `backward_tiles` is given)."""
    _check(q_nope, q_rope, k_nope, k_rope, q_positions, values=values)
    dtypes = [x.dtype for x in (q_nope, q_rope, k_nope, k_rope, values)]
    widths = (q_nope.shape[-1], q_rope.shape[-1], values.shape[-1])
    kernel = resolve_forward_kernel(forward_kernel, interpret=bool(interpret), dtypes=dtypes, widths=widths,
                                    pallas_tiling=tiles is not None)
    backward = resolve_backward_kernel(backward_kernel, interpret=bool(interpret), dtypes=dtypes, widths=widths,
                                       pallas_tiling=backward_tiles is not None)
    out, lse = _attention(q_nope, q_rope, k_nope, k_rope, values, q_positions, _check_scale(scale), bool(interpret),
                          kernel, _tiles(FORWARD_TILES if tiles is None else tiles, "tiles"), backward,
                          _tiles(BACKWARD_TILES if backward_tiles is None else backward_tiles, "backward_tiles"))
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "tiles", "kernel"))
def dense_attention_distribution_pallas(q_nope, q_rope, k_nope, k_rope, q_positions, lse, *, scale: float,
                                        interpret: bool = False, tiles: tuple[int, int, int] | None = None,
                                        kernel: str = "auto"):
    """The head-averaged distribution f32[B,T,S] given the attention's lse f32[B,T,H] (`dense_attention_pallas(...,
    return_lse=True)`); inputs as `dense_attention_reference`. Not differentiable (no VJP). `tiles` is (block_q,
    block_k, num_warps) of the Pallas kernel (None: DISTRIBUTION_TILES). kernel: "gluon"
    (`dense_distribution_gluon`, Hopper, bf16/fp16), "pallas", or "auto" (`resolve_distribution_kernel`)."""
    _check(q_nope, q_rope, k_nope, k_rope, q_positions, lse=lse)
    scale = _check_scale(scale)
    block_q, block_k, num_warps = _tiles(DISTRIBUTION_TILES if tiles is None else tiles, "tiles")
    kernel = resolve_distribution_kernel(kernel, interpret=bool(interpret),
                                         dtypes=[x.dtype for x in (q_nope, q_rope, k_nope, k_rope)],
                                         widths=(q_nope.shape[-1], q_rope.shape[-1]), pallas_tiling=tiles is not None)
    if kernel == "gluon":
        from pallas_kernels.dense_distribution_gluon import dense_distribution_gluon
        return dense_distribution_gluon(q_nope, q_rope, k_nope, k_rope, q_positions,
                                        _lse_for_kernels(lse, q_positions, q_nope.shape[1]), scale=scale)
    (batch, num_q, heads, _), num_keys = q_nope.shape, k_nope.shape[1]
    qn, qr, kn, kr, positions = _padded(q_nope, q_rope, k_nope, k_rope, q_positions, block_q, block_k)
    # The heads are a block dimension here, which Triton wants a power of two; the padded heads are never read.
    heads_p = next_pow2(heads)
    qn, qr, kn = (pad_axis(x, 2, heads_p) for x in (qn, qr, kn))
    lse = _lse_for_kernels(lse, q_positions, qn.shape[1], heads_p)
    n_p, p_p = qn.shape[-1], qr.shape[-1]
    body = functools.partial(_distribution_kernel, scale=scale, num_heads=heads, num_keys=num_keys,
                             precision=_precision(q_nope.dtype))
    dist = pl.pallas_call(
        body,
        grid=(batch, qn.shape[1] // block_q, kn.shape[1] // block_k),
        in_specs=[pl.BlockSpec((None, block_q, heads_p, n_p), lambda b, i, j: (b, i, 0, 0)),
                  pl.BlockSpec((None, block_q, heads_p, p_p), lambda b, i, j: (b, i, 0, 0)),
                  pl.BlockSpec((None, block_k, heads_p, n_p), lambda b, i, j: (b, j, 0, 0)),
                  pl.BlockSpec((None, block_k, p_p), lambda b, i, j: (b, j, 0)),
                  pl.BlockSpec((None, block_q), lambda b, i, j: (b, i)),
                  pl.BlockSpec((None, heads_p, block_q), lambda b, i, j: (b, 0, i))],
        out_specs=pl.BlockSpec((None, block_q, block_k), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((batch, qn.shape[1], kn.shape[1]), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(num_warps, num_stages=2),
        name="dense_attention_distribution",
    )(qn, qr, kn, kr, positions, lse)
    return dist[:, :num_q, :num_keys]
