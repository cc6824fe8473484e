"""torch.nn modules running on omniattn (forward and backward). Importing this module imports torch."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_uniform_

from ._core import attention

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """A drop-in replacement for torch.nn.MultiheadAttention: same constructor, same parameter names
    (in_proj_weight or q/k/v_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias), so
    ``load_state_dict(torch_mha.state_dict())`` works; the attention itself runs on omniattn, reading the projected
    heads in place through their strides. It trains: under autograd the attention is omniattn's
    torch.autograd.Function (its backward is omniattn.attention_backward).

    forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, average_attn_weights=True,
    is_causal=False) returns (attn_output, None). Masks follow torch.nn.MultiheadAttention: a boolean attn_mask or
    key_padding_mask marks with True the pairs that may NOT attend; float masks are added to the logits; attn_mask is
    [L, S] or [N * num_heads, L, S]. is_causal=True applies a top-left causal mask (on top of attn_mask, if given).

    Not supported (NotImplementedError): need_weights=True, dropout while training, add_bias_kv, add_zero_attn.
    Differences: a query row whose keys are all masked gives 0 instead of NaN.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("omniattn.nn.MultiheadAttention: add_bias_kv and add_zero_attn are not supported")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self):
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)

    def _weights(self):
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight.chunk(3)
        else:
            w = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return w, b

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights:
            raise NotImplementedError("omniattn.nn.MultiheadAttention does not compute attention weights "
                                      "(need_weights=True); pass need_weights=False")
        if self.training and self.dropout > 0.0:
            raise NotImplementedError("omniattn.nn.MultiheadAttention has no dropout: call .eval() or set dropout=0")
        batched = query.dim() == 3
        if not batched:  # unbatched (L, E): a batch of one
            dim = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(dim), key.unsqueeze(dim), value.unsqueeze(dim)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:
            n, tgt_len, _ = query.shape
            src_len = key.shape[1]
        else:
            tgt_len, n, _ = query.shape
            src_len = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim

        (w_q, w_k, w_v), (b_q, b_k, b_v) = self._weights()

        def heads_view(x):  # projected [.., E] -> [N, len, heads, head_dim] view (bshd), no copy
            x = x.unflatten(-1, (heads, head_dim))
            return x if self.batch_first else x.transpose(0, 1)

        q = heads_view(F.linear(query, w_q, b_q))
        k = heads_view(F.linear(key, w_k, b_k))
        v = heads_view(F.linear(value, w_v, b_v))

        mask, score = self._masks(attn_mask, key_padding_mask, n, tgt_len, src_len)
        # The output buffer in the module's sequence layout, so out_proj reads it as [.., E] without a copy.
        if self.batch_first:
            buf = torch.empty((n, tgt_len, heads, head_dim), dtype=q.dtype)
            out = buf
        else:
            buf = torch.empty((tgt_len, n, heads, head_dim), dtype=q.dtype)
            out = buf.transpose(0, 1)
        attention(q, k, v, out=out, mask=mask, score=score, causal="top_left" if is_causal else False)
        result = self.out_proj(buf.flatten(-2))
        if not batched:
            result = result.squeeze(0 if self.batch_first else 1)
        return result, None

    def _masks(self, attn_mask, key_padding_mask, n, tgt_len, src_len):
        """torch's masks (True / -inf = blocked) as omniattn's: a boolean `may attend` table and an additive bias."""
        allowed = bias = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise ValueError(f"attn_mask should have shape {(tgt_len, src_len)}, got {tuple(attn_mask.shape)}")
                am = attn_mask.view(1, 1, tgt_len, src_len)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (n * self.num_heads, tgt_len, src_len):
                    raise ValueError(f"attn_mask should have shape {(n * self.num_heads, tgt_len, src_len)}, "
                                     f"got {tuple(attn_mask.shape)}")
                am = attn_mask.view(n, self.num_heads, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask must be 2-d or 3-d, got {attn_mask.dim()}-d")
            if am.dtype in (torch.bool, torch.uint8):
                allowed = ~am.bool()
            else:
                bias = am
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, src_len):
                raise ValueError(f"key_padding_mask should have shape {(n, src_len)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            kp = key_padding_mask.view(n, 1, 1, src_len)
            if kp.dtype in (torch.bool, torch.uint8):
                keep = ~kp.bool()
                allowed = keep if allowed is None else allowed & keep
            else:
                bias = kp if bias is None else bias + kp
        return allowed, bias
