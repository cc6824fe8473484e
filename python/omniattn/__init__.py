"""omniattn: one CPU attention operator for every attention variant, for numpy and PyTorch users.

    import omniattn
    out = omniattn.attention(q, k, v, causal=True)          # [batch, seq, heads, dim] numpy arrays or torch tensors
    out = omniattn.scaled_dot_product_attention(q, k, v)    # torch SDPA's signature and [batch, heads, seq, dim]

Inputs are never copied: the C++ library reads them through their strides. Submodules: omniattn.masks (composable
masks), omniattn.scores (score modifiers), omniattn.nn (a drop-in torch.nn.MultiheadAttention; needs torch).
Only numpy is required; torch is used when you pass torch tensors. omniattn.attention_backward gives the gradients,
and on torch tensors that require grad attention() is differentiable (loss.backward() works).
omniattn.merge_attention_states combines attention over disjoint key sets (out, lse pairs) into attention over all.
omniattn.KVCache is a paged KV cache and omniattn.decode (= omniattn.prefill) attends new queries to it.
"""

import importlib as _importlib

from . import masks, scores
from ._core import (BlockMask, attention, attention_backward, build_block_mask, explain, from_bf16,
                    merge_attention_states, reference_attention, scaled_dot_product_attention, to_bf16)
from ._omniattn import __version__
from .kv_cache import KVCache, decode, prefill
from .linear import LinearGrads, linear_attention, linear_attention_backward, performer_projection
from .neighborhood import (halo1d, halo2d, halo3d, halo_attention, na1d, na2d, na3d,
                           neighborhood_attention)

__all__ = ["attention", "attention_backward", "merge_attention_states", "scaled_dot_product_attention", "explain",
           "reference_attention", "BlockMask", "build_block_mask", "masks", "scores", "nn", "to_bf16", "from_bf16",
           "__version__", "na1d", "na2d", "na3d", "neighborhood_attention", "halo_attention", "halo1d", "halo2d",
           "halo3d", "KVCache", "decode", "prefill", "linear_attention", "linear_attention_backward",
           "performer_projection", "LinearGrads"]


def __getattr__(name):
    if name == "nn":  # imported on first use: it needs torch
        return _importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'omniattn' has no attribute {name!r}")
