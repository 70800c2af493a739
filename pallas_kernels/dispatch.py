"""The one place that chooses a kernel implementation. The model calls these functions, never a kernel directly.

impl:
  "reference"  plain-jnp kernels (`*_reference.py`): the CPU/TPU fallback and the ground truth;
  "pallas"     the GPU kernels: Pallas (Triton backend) `indexer.py`, `topk.py`, `sparse_attention.py`,
               `dense_attention.py` (the dense stages' attention and distribution), the sparse attention's
               forward running as the Gluon kernel of `sparse_attention_gluon.py` on Hopper when triton and
               jax-triton are installed (bf16/fp16 inputs), as do the indexer scores (`indexer_gluon.py`),
               both passes of the top-k (`topk_gluon.py`), the attention distribution given the forward's
               lse (`sparse_distribution_gluon.py`) and the scores over selected slots (`indexer_slots_gluon.py`);
  "interpret"  the same Pallas kernels run by the Pallas interpreter on any platform, so CPU tests check the GPU
               logic;
  None         the platform default: "pallas" on a CUDA GPU, "reference" elsewhere.
Decode (one query per row) and prefill have separate kernels; the T == 1 check picks between them.

Wherever `impl=` is taken, a `Kernels` may be given instead: the implementation with the GPU kernels' options (which
kernel runs where both Gluon and Pallas can, and how much memory the buffers they chunk over may take). The model
passes `impl` through untouched, and a training job reads it from its config's `kernels:` section.
"""

import dataclasses
from typing import Literal, Optional, Union

import jax
import jax.numpy as jnp

from pallas_kernels.dense_attention import dense_attention_distribution_pallas, dense_attention_pallas
from pallas_kernels.dense_attention_reference import (dense_attention_distribution_reference,
                                                      dense_attention_reference)
from pallas_kernels.indexer import indexer_scores_trainable, indexer_topk_pallas
from pallas_kernels.indexer_reference import (indexer_scores_reference, indexer_slot_scores_reference,
                                              indexer_topk_decode_reference, indexer_topk_reference)
from pallas_kernels.indexer_slots import indexer_slot_scores_trainable
from pallas_kernels.sparse_attention import Tiles, sparse_mla_decode_pallas, sparse_mla_pallas
from pallas_kernels.sparse_attention_reference import (sparse_attention_distribution_reference,
                                                       sparse_mla_decode_reference, sparse_mla_reference)
from pallas_kernels.sparse_distribution import sparse_attention_distribution_pallas

Impl = Literal["reference", "pallas", "interpret"]
IMPLS = ("reference", "pallas", "interpret")
KernelName = Literal["auto", "gluon", "pallas"]
KERNEL_NAMES = ("auto", "gluon", "pallas")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """An implementation (`impl`: None = by platform) and, for "pallas" and "interpret", its kernels' options.

    Kernel choices: "auto" runs the Gluon kernel where it can (a Hopper GPU with triton and jax-triton, inputs it
    supports) and the Pallas kernel elsewhere; "gluon" insists (an error says why it cannot run); "pallas" always
    runs the Pallas kernel (interpret mode runs Pallas kernels only).
      sparse_forward   sparse MLA forward, prefill and decode (`sparse_attention.resolve_forward_kernel`)
      sparse_backward  its backward (`resolve_backward_kernel`)
      distribution     the sparse stages' distillation target (`sparse_distribution`)
      indexer_scores   the indexer's scores, prefill and decode (`indexer.resolve_scores_kernel`: Gluon scores
                       fp8, bf16 and fp16)
      indexer_backward the backward of the scores over every visible key, the dense warm-up's
                       (`indexer.resolve_backward_kernel`)
      topk             both passes of the prefill indexer's top-k, candidates and select
                       (`topk.resolve_candidates_kernel`, `topk.resolve_select_kernel`)
      slot_scores      the indexer's scores over selected slots, forward and backward: the sparse stages'
                       distillation trains through them (`indexer_slots.resolve_kernel`)
      dense_forward    the dense stages' attention forward, output and lse (`dense_attention.resolve_forward_kernel`)
      dense_backward   the dense attention's backward, d_q and d_k/d_v (`dense_attention.resolve_backward_kernel`)
      dense_distribution  the dense warm-up's distillation target
                       (`dense_attention.resolve_distribution_kernel`)
    Memory bounds, in bytes:
      backward_d_s_bytes   the Gluon backward's dS buffer, over which it chunks the tokens (0 = 1 GiB)
      indexer_chunk_bytes  the prefill indexer's fp32 scores [B, chunk, S], over which it chunks the queries
    Frozen and hashable: jitted entry points take it as a static argument, as they take a name."""
    impl: Optional[Impl] = None
    sparse_forward: KernelName = "auto"
    sparse_backward: KernelName = "auto"
    distribution: KernelName = "auto"
    indexer_scores: KernelName = "auto"
    indexer_backward: KernelName = "auto"
    topk: KernelName = "auto"
    slot_scores: KernelName = "auto"
    dense_forward: KernelName = "auto"
    dense_backward: KernelName = "auto"
    dense_distribution: KernelName = "auto"
    backward_d_s_bytes: int = 0
    indexer_chunk_bytes: int = 1 << 30

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "kernels") -> None:
        """Raise ValueError naming the first bad field as `where.field`."""
        if self.impl is not None and self.impl not in IMPLS:
            raise ValueError(f"{where}.impl: must be one of {list(IMPLS)} or null, got {self.impl!r}")
        for name in ("sparse_forward", "sparse_backward", "distribution", "indexer_scores", "indexer_backward",
                     "topk", "slot_scores", "dense_forward", "dense_backward", "dense_distribution"):
            if getattr(self, name) not in KERNEL_NAMES:
                raise ValueError(f"{where}.{name}: must be one of {list(KERNEL_NAMES)}, got {getattr(self, name)!r}")
        for name, least in (("backward_d_s_bytes", 0), ("indexer_chunk_bytes", 1)):  # 0: the kernel's default
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{where}.{name}: must be an integer >= {least}, got {value!r}")


ImplArg = Union[None, str, Kernels]


def default_impl() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def kernels_of(impl: ImplArg) -> Kernels:
    """`impl` as a Kernels with its implementation resolved (`resolve_impl`): a name gets the default options."""
    return dataclasses.replace(impl if isinstance(impl, Kernels) else Kernels(), impl=resolve_impl(impl))


def resolve_impl(impl: ImplArg) -> str:
    """Validate `impl` (a name, None or a Kernels) and replace None by the platform default."""
    if isinstance(impl, Kernels):
        impl = impl.impl
    if impl is None:
        return default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)} or None, got {impl!r}")
    if impl == "pallas" and jax.default_backend() != "gpu":
        raise ValueError(f"impl='pallas' compiles for a CUDA GPU, but the default backend is "
                         f"{jax.default_backend()!r}; use impl='interpret' (slow, exact) or 'reference'")
    return impl


def indexer_topk(q, w, k, q_positions, *, topk: int, impl: ImplArg = None, fp8: bool = False, k_scale=None,
                 fp8_head_sum: str = "bf16"):
    """Indexer scores + top-k. q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> int32[B,T,topk].
    fp8: score with fp8-quantised inputs (`indexer_reference.quantize_fp8`), in every implementation; k_scale
    f32[B,S]: the keys are already fp8 (an fp8 key cache) and only the queries are quantised. fp8_head_sum: "bf16"
    (the default; on Hopper the head sum runs on the tensor cores, `indexer_gluon`) or "fp32" (`indexer_reference`
    says what each rounds)."""
    options = kernels_of(impl)
    impl = options.impl
    if impl != "reference":
        return indexer_topk_pallas(q, w, k, q_positions, topk=topk, interpret=impl == "interpret", fp8=fp8,
                                   k_scale=k_scale, fp8_head_sum=fp8_head_sum, scores_kernel=options.indexer_scores,
                                   topk_kernel=options.topk, chunk_bytes=options.indexer_chunk_bytes)
    if q.shape[1] == 1:
        return indexer_topk_decode_reference(q[:, 0], w[:, 0], k, q_positions[:, 0], topk=topk, fp8=fp8,
                                             k_scale=k_scale, fp8_head_sum=fp8_head_sum)[:, None]
    return indexer_topk_reference(q, w, k, q_positions, topk=topk, fp8=fp8, k_scale=k_scale,
                                  fp8_head_sum=fp8_head_sum)


def indexer_scores(q, w, k, q_positions, *, impl: ImplArg = None):
    """Indexer scores, differentiable in q, w and k. q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] ->
    f32[B,T,S] (-inf where s > pos). The kernels' backward never stores the per-head logits [B,T,S,G]."""
    options = kernels_of(impl)
    if options.impl == "reference":
        return indexer_scores_reference(q, w, k, q_positions)
    return indexer_scores_trainable(q, w, k, q_positions, options.impl == "interpret", options.indexer_backward)


def indexer_slot_scores(q, w, k, indices, *, impl: ImplArg = None):
    """Indexer scores over each query's selected slots, differentiable in q, w and k. q [B,T,G,I], w [B,T,G],
    k [B,S,I], indices int32[B,T,K] (-1 = no slot) -> f32[B,T,K] (0 at -1 slots). The kernels (`indexer_slots`)
    never store the gathered keys [B,T,K,I] or the per-head logits [B,T,K,G]."""
    options = kernels_of(impl)
    if options.impl == "reference":
        return indexer_slot_scores_reference(q, w, k, indices)
    return indexer_slot_scores_trainable(q, w, k, indices, options.impl == "interpret", options.slot_scores)


def sparse_mla(q, kv, indices, *, scale: float, value_dim: int, impl: ImplArg = None, return_lse: bool = False):
    """Sparse MLA (MQA form). q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] -> [B,T,H,value_dim], or with
    return_lse (out, lse f32[B,T,H]): each head's log-sum-exp of its scaled logits over the valid slots (-inf
    where none is), which `sparse_attention_distribution` takes. Prefill is differentiable in q and kv, lse
    included, in every implementation."""
    options = kernels_of(impl)
    impl, interpret = options.impl, options.impl == "interpret"
    if q.shape[1] == 1:
        if impl == "reference":
            result = sparse_mla_decode_reference(q[:, 0], kv, indices[:, 0], scale=scale, value_dim=value_dim,
                                                 return_lse=True)
        else:
            result = sparse_mla_decode_pallas(q[:, 0], kv, indices[:, 0], scale=scale, value_dim=value_dim,
                                              interpret=interpret, forward_kernel=options.sparse_forward,
                                              return_lse=True)
        out, lse = (x[:, None] for x in result)
        return (out, lse) if return_lse else out
    if impl == "reference":
        return sparse_mla_reference(q, kv, indices, scale=scale, value_dim=value_dim, return_lse=return_lse)
    tiles = Tiles(forward_kernel=options.sparse_forward, backward_kernel=options.sparse_backward,
                  backward_d_s_bytes=options.backward_d_s_bytes)
    return sparse_mla_pallas(q, kv, indices, scale=scale, value_dim=value_dim, interpret=interpret, tiles=tiles,
                             return_lse=return_lse)


def sparse_attention_distribution(q, kv, indices, *, scale: float, value_dim: int, lse=None,
                                  impl: ImplArg = None):
    """The head-averaged attention distribution of `sparse_mla` over each query's slots: the indexer's distillation
    target. q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] -> f32[B,T,K] (0 at -1 slots). lse f32[B,T,H]: the
    attention's log-sum-exp (`sparse_mla(..., return_lse=True)`), which saves the kernel a pass over the slots;
    None computes it. A target, constant by design: no gradient flows to q, kv or lse (every implementation)."""
    options = kernels_of(impl)
    impl = options.impl
    q, kv, lse = jax.lax.stop_gradient((q, kv, lse))
    if impl == "reference":
        return sparse_attention_distribution_reference(q, kv, indices, scale=scale, lse=lse)
    return sparse_attention_distribution_pallas(q, kv, indices, lse, scale=scale, value_dim=value_dim,
                                                interpret=impl == "interpret", kernel=options.distribution)


def dense_attention(q_nope, q_rope, k_nope, k_rope, values, q_positions, *, scale: float, impl: ImplArg = None,
                    mask=None, return_lse: bool = False):
    """Causal dense MLA attention in its training form (`dense_attention_reference`): q_nope [B,T,H,N], q_rope
    [B,T,H,P], k_nope [B,S,H,N], k_rope [B,S,P], values [B,S,H,V], q_positions int[B,T] (key s is visible to query
    t when s <= q_positions[b,t]) -> out [B,T,H,V], or with return_lse (out, lse f32[B,T,H]), which
    `dense_attention_distribution` takes; both differentiable. The kernels never store the [B,H,T,S] logits (nor
    does their backward); mask bool[B,T,S] (also hide where False) runs the reference."""
    options = kernels_of(impl)
    if options.impl == "reference" or mask is not None:
        return dense_attention_reference(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale=scale,
                                         mask=mask, return_lse=return_lse)
    return dense_attention_pallas(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale=scale,
                                  interpret=options.impl == "interpret", return_lse=return_lse,
                                  forward_kernel=options.dense_forward, backward_kernel=options.dense_backward)


def dense_attention_distribution(q_nope, q_rope, k_nope, k_rope, q_positions, *, scale: float, lse=None,
                                 impl: ImplArg = None, mask=None):
    """The head-averaged attention distribution of `dense_attention` over all keys: the dense warm-up's distillation
    target. Inputs as there -> f32[B,T,S] (0 where not visible). lse f32[B,T,H]: the attention's log-sum-exp
    (`dense_attention(..., return_lse=True)`); the kernel needs it (None computes it by the forward kernel) and
    then runs one pass of the QK dot, summing the heads' probabilities in fp32, never storing them. A target,
    constant by design: no gradient flows to any input (every implementation)."""
    options = kernels_of(impl)
    impl = options.impl
    q_nope, q_rope, k_nope, k_rope, lse = jax.lax.stop_gradient((q_nope, q_rope, k_nope, k_rope, lse))
    if impl == "reference" or mask is not None:
        return dense_attention_distribution_reference(q_nope, q_rope, k_nope, k_rope, q_positions, scale=scale,
                                                      lse=lse, mask=mask)
    interpret = impl == "interpret"
    if lse is None:
        values = jnp.zeros(k_nope.shape[:3] + (16,), k_nope.dtype)  # the forward's output is not wanted here
        lse = dense_attention_pallas(q_nope, q_rope, k_nope, k_rope, values, q_positions, scale=scale,
                                     interpret=interpret, return_lse=True, forward_kernel=options.dense_forward)[1]
    return dense_attention_distribution_pallas(q_nope, q_rope, k_nope, k_rope, q_positions, lse, scale=scale,
                                               interpret=interpret, kernel=options.dense_distribution)
