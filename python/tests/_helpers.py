"""Independent float64 references (plain numpy / plain torch math, not the library) and small data makers."""

import numpy as np
import pytest


def causal_allowed(lq, lk, align):
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    return j <= i + ((lk - lq) if align == "bottom_right" else 0)


def ref_attention(q, k, v, *, scale=None, causal=None, allowed=None, bias=None, layout="bshd", lse=False):
    """softmax(scale * q k^T + bias, masked) v in float64 numpy; rows with no allowed key give 0 (lse -inf).
    q/k/v in `layout`; allowed / bias broadcastable to [B, H, Lq, Lk]."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if layout == "bshd":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    b, h, lq, d = q.shape
    lk = k.shape[2]
    group = h // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias
    ok = np.ones((b, h, lq, lk), dtype=bool)
    if causal:
        ok &= causal_allowed(lq, lk, causal)
    if allowed is not None:
        ok &= allowed
    s = np.where(ok, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhij,bhjd->bhid", p / np.where(denom > 0, denom, 1.0), v)
    with np.errstate(divide="ignore"):
        l = np.log(denom[..., 0]) + m[..., 0]
    l = np.where(denom[..., 0] > 0, l, -np.inf)
    if layout == "bshd":
        out = out.transpose(0, 2, 1, 3)
    return (out, l) if lse else out


def torch_ref(q, k, v, *, scale=None, causal=None, allowed=None, bias=None, layout="bhsd"):
    """The same math in float64 torch (PyTorch 1.13 has no F.scaled_dot_product_attention): softmax(q@k^T*scale +
    bias) @ v with masked entries at -inf; fully masked rows give 0."""
    import torch

    q, k, v = (x.detach().to(torch.float64) for x in (q, k, v))
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    lq, d = q.shape[-2], q.shape[-1]
    lk = k.shape[-2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / d ** 0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + torch.as_tensor(bias).to(torch.float64)
    ok = torch.ones(s.shape, dtype=torch.bool)
    if causal:
        ok = ok & torch.from_numpy(causal_allowed(lq, lk, causal))
    if allowed is not None:
        ok = ok & torch.as_tensor(allowed)
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.matmul(p, v)
    return out.transpose(1, 2) if layout == "bshd" else out


def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def qkv(rng, b=2, lq=9, lk=13, hq=4, hkv=2, d=16, dv=8, layout="bshd", dtype=np.float32):
    if layout == "bshd":
        shapes = [(b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, dv)]
    else:
        shapes = [(b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv)]
    return [randn(rng, s, dtype) for s in shapes]


def torch_or_skip():
    return pytest.importorskip("torch")


def rope_math(x, pos, theta=10000.0):
    """NeoX-halves rotary embedding of bhsd x at integer positions pos [seq] (plain torch, differentiable)."""
    import torch

    d = x.shape[-1]
    half = d // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    ang = pos.to(torch.float64)[:, None] * freq[None, :]
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def math_attention(q, k, v, *, scale=None, causal=None, allowed=None, score=None, sinks=None, rope=False):
    """softmax(score(q k^T * scale) masked, with an optional sink logit column) v in plain torch ops on bhsd tensors:
    what torch's autograd differentiates for the reference gradients. score(s, h, i, j) takes [B, H, Lq, Lk] logits
    and broadcastable index grids."""
    import torch

    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if rope:
        q = rope_math(q, torch.arange(lq) + (lk - lq))
        k = rope_math(k, torch.arange(lk))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / d ** 0.5 if scale is None else scale)
    h = torch.arange(q.shape[1])[None, :, None, None]
    i = torch.arange(lq)[None, None, :, None]
    j = torch.arange(lk)[None, None, None, :]
    if score is not None:
        s = score(s, h, i, j)
    ok = torch.ones(s.shape, dtype=torch.bool)
    if causal:
        ok = ok & (j <= i + ((lk - lq) if causal == "bottom_right" else 0))
    if allowed is not None:
        ok = ok & allowed
    s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(s.shape[:3] + (1,))], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return torch.matmul(p, v)
