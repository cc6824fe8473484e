"""NATTEN-style entry points: neighborhood and halo attention over heads-last tensors [batch, *spatial, heads, dim].

    out = omniattn.na2d(q, k, v, kernel_size=7)                       # q, k, v: [B, H_img, W_img, heads, dim]
    out = omniattn.na3d(q, k, v, (3, 7, 7), stride=(1, 2, 2), is_causal=(True, False, False))
    out = omniattn.halo2d(q, k, v, block=8, halo=3)

These only translate: the spatial axes are flattened into the sequence axis (a view when the strides allow it, as
numpy / torch reshape decide) and the call becomes omniattn.attention with masks.neighborhood / masks.halo over the
spatial grid. Parameter rules (kernel * dilation <= size, 1 <= stride <= kernel, ...) are checked by the C++ library.
GQA / MQA work as in attention(): k and v may have fewer heads than q.
"""

from . import masks
from ._arrays import is_torch

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "halo_attention", "halo1d", "halo2d", "halo3d"]


def _flatten(x, rank, name):
    if x.ndim != rank + 3:
        raise ValueError(f"omniattn: {name} must be {rank + 3}-d [batch, {rank} spatial axes, heads, dim] for a rank-{rank} "
                         f"grid, got shape {tuple(x.shape)}")
    shape = tuple(x.shape)
    tokens = 1
    for n in shape[1:1 + rank]:
        tokens *= n
    return x.reshape(shape[0], tokens, shape[-2], shape[-1])


def _concat(a, b):
    if is_torch(a):
        import torch

        return torch.cat((a, b), dim=1)
    import numpy as np

    return np.concatenate((a, b), axis=1)


def _grid_attention(q, k, v, rank, mask, scale, return_lse, kwargs, additional_keys=None, additional_values=None):
    from ._core import attention

    spatial = tuple(q.shape[1:1 + rank])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[1:1 + rank]) != spatial:
            raise ValueError(f"omniattn: {name} has spatial shape {tuple(x.shape[1:1 + rank])}, q has {spatial}: "
                             "neighborhood attention needs one token grid")
    kf, vf = _flatten(k, rank, "k"), _flatten(v, rank, "v")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("omniattn: additional_keys and additional_values go together")
    if additional_keys is not None:
        # NATTEN's additional KV: [batch, extra, heads_kv, dim] keys every query also sees, after the grid's keys
        # (one concatenated copy of K and V; the library runs grid | ~sinks(tokens) on its grid path).
        tokens = kf.shape[1]
        kf, vf = _concat(kf, additional_keys), _concat(vf, additional_values)
        mask = mask | ~masks.sinks(tokens)
    result = attention(_flatten(q, rank, "q"), kf, vf, mask=mask, scale=scale, return_lse=return_lse, **kwargs)
    out, lse = result if return_lse else (result, None)
    batch, heads = q.shape[0], q.shape[-2]
    out = out.reshape((batch,) + spatial + (heads, out.shape[-1]))
    if lse is None:
        return out
    # NATTEN returns the log-sum-exp heads-last too: [batch, *spatial, heads].
    lse = lse.reshape((batch, heads) + spatial)
    lse = lse.movedim(1, -1) if is_torch(lse) else lse.transpose((0,) + tuple(range(2, rank + 2)) + (1,))
    return out, lse


def neighborhood_attention(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, return_lse=False,
                           additional_keys=None, additional_values=None, **kwargs):
    """Neighborhood attention over heads-last [batch, *spatial, heads, dim] tensors with 1 to 3 spatial axes (the rank
    is q.ndim - 3). kernel_size, stride, dilation and is_causal are an int / bool for every axis or one per axis, with
    NATTEN's semantics. additional_keys / additional_values ([batch, extra, heads_kv, dim], NATTEN's additional KV)
    are keys every query sees besides its neighborhood. Extra keyword arguments (backend, threads, ...) go to
    omniattn.attention."""
    rank = q.ndim - 3
    mask = masks.neighborhood(tuple(q.shape[1:1 + rank]), kernel_size, dilation=dilation, stride=stride, is_causal=is_causal)
    return _grid_attention(q, k, v, rank, mask, scale, return_lse, kwargs, additional_keys, additional_values)


def _na(rank):
    def na(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, return_lse=False,
           additional_keys=None, additional_values=None, **kwargs):
        if q.ndim != rank + 3:
            raise ValueError(f"omniattn: na{rank}d takes {rank + 3}-d [batch, {rank} spatial axes, heads, dim] tensors, "
                             f"got q of shape {tuple(q.shape)}")
        return neighborhood_attention(q, k, v, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
                                      scale=scale, return_lse=return_lse, additional_keys=additional_keys,
                                      additional_values=additional_values, **kwargs)

    na.__name__ = f"na{rank}d"
    na.__doc__ = (f"{rank}-D neighborhood attention (NATTEN's na{rank}d): q, k, v are [batch, {rank} spatial axes, heads, "
                  "dim]; see neighborhood_attention.")
    return na


na1d, na2d, na3d = _na(1), _na(2), _na(3)


def halo_attention(q, k, v, block, halo, scale=None, return_lse=False, **kwargs):
    """HaloNet's blocked local attention over heads-last [batch, *spatial, heads, dim] tensors (1 to 3 spatial axes):
    queries in blocks of `block` tokens per axis see their block widened by `halo` on each side, clipped at borders."""
    rank = q.ndim - 3
    mask = masks.halo(tuple(q.shape[1:1 + rank]), block, halo)
    return _grid_attention(q, k, v, rank, mask, scale, return_lse, kwargs)


def _halo(rank):
    def fn(q, k, v, block, halo, scale=None, return_lse=False, **kwargs):
        if q.ndim != rank + 3:
            raise ValueError(f"omniattn: halo{rank}d takes {rank + 3}-d [batch, {rank} spatial axes, heads, dim] tensors, "
                             f"got q of shape {tuple(q.shape)}")
        return halo_attention(q, k, v, block, halo, scale=scale, return_lse=return_lse, **kwargs)

    fn.__name__ = f"halo{rank}d"
    fn.__doc__ = f"{rank}-D HaloNet blocked local attention; see halo_attention."
    return fn


halo1d, halo2d, halo3d = _halo(1), _halo(2), _halo(3)
