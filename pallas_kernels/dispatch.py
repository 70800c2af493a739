"""The one place that chooses a kernel implementation. The model calls these functions, never a kernel directly.

impl:
  "reference"  plain-jnp kernels (`*_reference.py`): the CPU fallback and the ground truth;
  "pallas"     compiled Pallas/Triton kernels for the GPU (the kernels issue, #4);
  "interpret"  the same Pallas kernels run by the Pallas interpreter, so CPU tests check the GPU logic;
  None         the platform default: "reference" until the Pallas kernels land.
Decode (one query per row) and prefill have separate kernels on the GPU; the T == 1 check picks between them.
"""

from typing import Literal, Optional

from pallas_kernels.indexer_reference import indexer_topk_decode_reference, indexer_topk_reference
from pallas_kernels.sparse_attention_reference import sparse_mla_decode_reference, sparse_mla_reference

Impl = Literal["reference", "pallas", "interpret"]
IMPLS = ("reference", "pallas", "interpret")


def resolve_impl(impl: Optional[str]) -> str:
    """Validate `impl` and replace None by the platform default."""
    if impl is None:
        return "reference"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)} or None, got {impl!r}")
    if impl != "reference":
        raise NotImplementedError(f"impl={impl!r}: the Pallas kernels are not built yet (issue #4); "
                                  "use impl='reference'")
    return impl


def indexer_topk(q, w, k, q_positions, *, topk: int, impl: Optional[str] = None):
    """Indexer scores + top-k. q [B,T,G,I], w [B,T,G], k [B,S,I], q_positions int[B,T] -> int32[B,T,topk]."""
    resolve_impl(impl)
    if q.shape[1] == 1:
        return indexer_topk_decode_reference(q[:, 0], w[:, 0], k, q_positions[:, 0], topk=topk)[:, None]
    return indexer_topk_reference(q, w, k, q_positions, topk=topk)


def sparse_mla(q, kv, indices, *, scale: float, value_dim: int, impl: Optional[str] = None):
    """Sparse MLA (MQA form). q [B,T,H,L], kv [B,S,L], indices int32[B,T,K] -> [B,T,H,value_dim]."""
    resolve_impl(impl)
    if q.shape[1] == 1:
        return sparse_mla_decode_reference(q[:, 0], kv, indices[:, 0], scale=scale, value_dim=value_dim)[:, None]
    return sparse_mla_reference(q, kv, indices, scale=scale, value_dim=value_dim)
