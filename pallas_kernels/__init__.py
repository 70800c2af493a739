"""Kernels for DeepSeek Sparse Attention: each fast kernel beside its plain-jnp reference, one dispatch point.

Shape letters: B batch, T queries, S keys, H attention heads, G indexer heads, I indexer head width,
L latent key width (R + P), R latent value width (kv_lora_rank), K top-k slots.
"""

from pallas_kernels.dispatch import (IMPLS, Kernels, dense_attention, dense_attention_distribution, indexer_scores,
                                     indexer_slot_scores, indexer_topk, resolve_impl, sparse_attention_distribution,
                                     sparse_mla)
from pallas_kernels.indexer_reference import (indexer_scores_reference, indexer_slot_scores_reference,
                                              indexer_topk_decode_reference, indexer_topk_reference, quantize_fp8)
from pallas_kernels.sparse_attention_reference import (sparse_attention_distribution_reference,
                                                       sparse_mla_decode_reference, sparse_mla_reference)
from pallas_kernels.topk_reference import INVALID, topk_reference

__all__ = [
    "IMPLS", "INVALID", "Kernels", "dense_attention", "dense_attention_distribution", "indexer_scores",
    "indexer_scores_reference", "indexer_slot_scores", "indexer_slot_scores_reference", "indexer_topk",
    "indexer_topk_decode_reference", "indexer_topk_reference", "quantize_fp8", "resolve_impl",
    "sparse_attention_distribution", "sparse_attention_distribution_reference", "sparse_mla",
    "sparse_mla_decode_reference", "sparse_mla_reference",
    "topk_reference",
]
