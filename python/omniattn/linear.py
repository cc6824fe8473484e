"""Linear attention (include/omniattn/linear.h) in flash-linear-attention's conventions.

    o, final_state = omniattn.linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True)

q, k are [batch, seq, heads, K], v [batch, seq, heads, V] (numpy or CPU torch; float32, bfloat16 or float16), the
scale multiplies q (default K ** -0.5), decays are log-space (g <= 0): `head_log_decay` [heads] for a fixed decay per
head (RetNet, Lightning), `g` [batch, seq, heads] for a data-dependent one per token and head (simple GLA, Mamba-2) or
[batch, seq, heads, K] per channel (GLA). States are float32 [batch, heads, K, V]. As everywhere in the package,
Python translates; the rules and their messages are the library's.

Hedgehog's learned maps and Performer's random features project q and k first: `projection` W [heads, K, F] (or
[K, F], shared by the heads) and `projection_bias` [heads, F] (or [F]) make each row x into x W + b, the feature map
acts on its F features, and the states (and a per-channel g) are over F:

    W = omniattn.performer_projection(heads, K, 256, seed=0)       # FAVOR+ orthogonal random features
    o, _ = omniattn.linear_attention(q * K ** -0.25, k * K ** -0.25, v, feature_map="performer", projection=W,
                                     scale=1.0, causal=False, normalize=True)    # ~ softmax attention

linear_attention_backward gives the gradients; on torch tensors that require grad, linear_attention records a
torch.autograd.Function whose backward runs it (gradients reach q, k, v, g, g_backward, head_log_decay, initial_state
and the projection's weight and bias: Hedgehog's maps train through it).
"""

import collections

from . import _omniattn as _C
from ._core import _check_run_options, _empty, _int64_vector, _operand
from ._arrays import is_torch, torch_module

__all__ = ["linear_attention", "linear_attention_backward", "performer_projection", "LinearGrads"]

# What linear_attention_backward returns: a tuple of nine (it was six before the projection and g_backward).
LinearGrads = collections.namedtuple("LinearGrads", ["dq", "dk", "dv", "dg", "d_head_log_decay", "d_initial_state", "d_projection",
                                                     "d_projection_bias", "dg_backward"])


def performer_projection(heads, dim, features, *, seed=0, orthogonal=True):
    """Performer's random directions, float32 numpy [heads, dim, features] (see linear.h performer_projection): Gaussian
    columns, orthogonal within blocks of `dim` when `orthogonal`; the same for a seed on every platform."""
    return _C.performer_projection(int(heads), int(dim), int(features), seed=int(seed), orthogonal=bool(orthogonal))


def linear_attention(q, k, v, *, scale=None, g=None, head_log_decay=None, feature_map="identity", normalize=False, flow=False,
                     causal=True, prefix=0, initial_state=None, output_final_state=False, chunk_size=64,
                     cu_seqlens=None, projection=None, projection_bias=None, g_backward=None, backend="cpu",
                     threads=0):
    """Linear attention: S_t = diag(exp(g_t)) S_{t-1} + phi(k_t)^T v_t, o_t = scale phi(q_t) S_t (see linear.h).

    feature_map  "identity", "elu_plus_one", "relu", "softmax" (over the features), "exp" or "performer" (needs a
                 projection), applied to q and k after the projection
    projection, projection_bias   W [heads, K, F] or [K, F], b [heads, F] or [F]: q, k rows x become x W + b first
                 (Hedgehog, Performer); the states are then [batch, heads, F, V]
    normalize    divide by scale phi(q_t) . z_t, z_t the decayed running sum of phi(k) (classic linear attention)
    flow         Flowformer's flow-conservation normalisation (causal=False, no decay, positive features such as
                 feature_map="sigmoid"; scale=1.0 for Flowformer's own form): competition over the keys, allocation
                 of the queries (see linear.h)
    causal       False: every token reads the state of the whole sequence; with a decay (g or head_log_decay) this is
                 ViG's bidirectional form: the causal call plus the same call over the reversed tokens, summed (each
                 holds the token itself), with `g_backward` the reversed scan's own gates (default: g); no states
    prefix       JRT's prefix-linear form: the first `prefix` tokens read the state of the whole prefix, the rest
                 are causal (no decay)
    initial_state / output_final_state   the recurrent state in and out, so a prefill followed by calls with its
                 final state equals one long call
    chunk_size   tokens per chunk of the chunked kernel; backend "cpu" (the kernel) or "reference" (fp64 oracle)
    cu_seqlens   varlen (fla's convention): q, k, v are [1, total, heads, *] packed sequences, sequence s owns tokens
                 [cu_seqlens[s], cu_seqlens[s + 1]) with its own state; states are [num_seqs, heads, K, V]
    Returns (o, final_state): o like v in q's framework and dtype, final_state float32 or None.
    Autograd: when torch records gradients and q, k, v, g, a torch head_log_decay, initial_state, projection or
    projection_bias requires grad,
    the call is a torch.autograd.Function whose backward runs linear_attention_backward (gradients of o and of
    final_state flow back).
    """
    kw = dict(scale=scale, feature_map=feature_map, normalize=normalize, flow=flow, causal=causal, prefix=prefix,
              chunk_size=chunk_size, cu_seqlens=_offsets(cu_seqlens), backend=backend, threads=threads)
    if _records_grad(q, k, v, g, head_log_decay, initial_state, projection, projection_bias, g_backward):
        result = _function().apply(kw, output_final_state, q, k, v, g, head_log_decay, initial_state, projection,
                                   projection_bias, g_backward)
        return result if output_final_state else (result, None)
    return _forward(q, k, v, g, head_log_decay, initial_state, projection, projection_bias, g_backward, output_final_state,
                    **kw)


def _offsets(cu_seqlens):
    """cu_seqlens as an int64 numpy array (integers only, by the library's rule), or None."""
    return None if cu_seqlens is None else _int64_vector(cu_seqlens, "cu_seqlens")


def _sequences(q, cu_seqlens):
    """The states' first dim: the batch, or the number of packed sequences."""
    return q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1


def _state_rows(q, projection):
    """The states' K: q's features, or the projection's F (its last dim)."""
    return q.shape[3] if projection is None else projection.shape[-1]


def _values(x):
    """A torch parameter (head_log_decay, the projection) as the float32 numpy array the library reads; others as is."""
    return x.detach().float().numpy() if x is not None and is_torch(x) else x


def _forward(q, k, v, g, head_log_decay, initial_state, projection, projection_bias, g_backward, output_final_state, *, scale,
             feature_map, normalize, flow, causal, prefix, chunk_size, cu_seqlens, backend, threads):
    head_log_decay, projection, projection_bias = (_values(x) for x in (head_log_decay, projection, projection_bias))
    if backend not in ("cpu", "reference"):
        raise ValueError(f"omniattn: backend must be 'cpu' or 'reference', got {backend!r}")
    _check_run_options(backend, threads)
    if getattr(q, "ndim", 0) != 4:
        raise ValueError(f"omniattn: q must be [batch, seq, heads, K], got {getattr(q, 'shape', type(q).__name__)}")
    out = _empty(q, tuple(q.shape[:-1]) + (v.shape[-1],))
    final = (_empty(q, (_sequences(q, cu_seqlens), q.shape[2], _state_rows(q, projection), v.shape[-1]), "float32")
             if output_final_state else None)
    ops = [_operand(name, x, False) for name, x in (("q", q), ("k", k), ("v", v), ("out", out))]
    g_op = None if g is None else _operand("g", g, False)
    gb_op = None if g_backward is None else _operand("g_backward", g_backward, False)
    extra = {name: (None if x is None else _operand(name, x, False)[0])
             for name, x in (("initial_state", initial_state), ("final_state", final))}
    _C.linear_attention(*(x for x, _ in ops), as_bf16=any(flag for _, flag in ops + [x for x in (g_op, gb_op) if x]),
                        g=None if g_op is None else g_op[0], g_backward=None if gb_op is None else gb_op[0], scale=scale,
                        feature_map=feature_map, normalize=normalize, causal=causal, prefix=int(prefix),
                        head_log_decay=head_log_decay,
                        chunk=int(chunk_size), threads=int(threads), reference=backend == "reference",
                        cu_seqlens=cu_seqlens, projection=projection, projection_bias=projection_bias, flow=bool(flow),
                        **extra)
    return out, final


def linear_attention_backward(q, k, v, d_out, *, d_final_state=None, scale=None, g=None, head_log_decay=None,
                              feature_map="identity", normalize=False, flow=False, causal=True, prefix=0,
                              initial_state=None,
                              chunk_size=64, cu_seqlens=None, projection=None, projection_bias=None, g_backward=None,
                              backend="cpu", threads=0):
    """The gradients of linear_attention(q, k, v, ...) (same arguments) given d_out (and d_final_state, float32
    [batch, heads, K or F, V]): returns a LinearGrads (dq, dk, dv, dg, d_head_log_decay, d_initial_state,
    d_projection, d_projection_bias, dg_backward) in q's framework; dq, dk, dv in q's dtype, the others float32 (the
    projection's in its weight's and bias's shapes), and None for what the call has not (no g, no head_log_decay, no
    initial_state, no projection or bias, no g_backward)."""
    if backend not in ("cpu", "reference"):
        raise ValueError(f"omniattn: backend must be 'cpu' or 'reference', got {backend!r}")
    _check_run_options(backend, threads)
    if getattr(q, "ndim", 0) != 4:
        raise ValueError(f"omniattn: q must be [batch, seq, heads, K], got {getattr(q, 'shape', type(q).__name__)}")
    dq, dk, dv = _empty(q, tuple(q.shape)), _empty(k, tuple(k.shape)), _empty(v, tuple(v.shape))
    dg = None if g is None else _empty(q, tuple(g.shape), "float32")
    dgb = None if g_backward is None else _empty(q, tuple(g_backward.shape), "float32")
    d_head = None if head_log_decay is None else _empty(q, (q.shape[2],), "float32")
    cu_seqlens = _offsets(cu_seqlens)
    head_log_decay, projection, projection_bias = (_values(x) for x in (head_log_decay, projection, projection_bias))
    d_s0 = (None if initial_state is None
            else _empty(q, (_sequences(q, cu_seqlens), q.shape[2], _state_rows(q, projection), v.shape[-1]), "float32"))
    d_w, d_b = (None if x is None else _empty(q, tuple(x.shape), "float32") for x in (projection, projection_bias))
    ops = [_operand(name, x, False) for name, x in (("q", q), ("k", k), ("v", v), ("d_out", d_out), ("dq", dq),
                                                    ("dk", dk), ("dv", dv))]
    g_op = None if g is None else _operand("g", g, False)
    gb_op = None if g_backward is None else _operand("g_backward", g_backward, False)
    extra = {name: (None if x is None else _operand(name, x, False)[0])
             for name, x in (("initial_state", initial_state), ("d_final_state", d_final_state), ("dg", dg),
                             ("dg_backward", dgb),
                             ("d_head_log_decay", d_head), ("d_initial_state", d_s0), ("d_projection", d_w),
                             ("d_projection_bias", d_b))}
    _C.linear_attention_backward(*(x for x, _ in ops), as_bf16=any(flag for _, flag in ops + [x for x in (g_op, gb_op) if x]),
                                 g=None if g_op is None else g_op[0], g_backward=None if gb_op is None else gb_op[0],
                                 scale=scale, feature_map=feature_map,
                                 normalize=normalize, causal=causal, prefix=int(prefix), head_log_decay=head_log_decay,
                                 chunk=int(chunk_size), threads=int(threads), reference=backend == "reference",
                                 cu_seqlens=cu_seqlens, projection=projection, projection_bias=projection_bias,
                                 flow=bool(flow), **extra)
    return LinearGrads(dq, dk, dv, dg, d_head, d_s0, d_w, d_b, dgb)


def _records_grad(*xs):
    if not any(x is not None and is_torch(x) for x in xs):
        return False
    torch = torch_module()
    return torch.is_grad_enabled() and any(x is not None and is_torch(x) and x.requires_grad for x in xs)


_FUNCTION = []


def _function():
    """The torch.autograd.Function of linear_attention(), made on first use (torch is optional)."""
    if _FUNCTION:
        return _FUNCTION[0]
    torch = torch_module()
    from torch.autograd.function import once_differentiable

    names = ("q", "k", "v", "g", "head_log_decay", "initial_state", "projection", "projection_bias", "g_backward")

    class LinearAttentionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, kw, output_final_state, *args):
            # Torch operands are saved for the backward (version-checked); numpy ones or lists are constants.
            args = [x.detach() if is_torch(x) else x for x in args]
            o, final = _forward(*args, output_final_state, **kw)
            ctx.kw = kw
            ctx.torch_at = [i for i, x in enumerate(args) if is_torch(x)]
            ctx.constants = [None if is_torch(x) else x for x in args]
            ctx.save_for_backward(*(args[i] for i in ctx.torch_at))
            return o if final is None else (o, final)

        @staticmethod
        @once_differentiable
        def backward(ctx, d_out, d_final=None):
            args = list(ctx.constants)
            for i, x in zip(ctx.torch_at, ctx.saved_tensors):
                args[i] = x
            x = dict(zip(names, args))
            grads = linear_attention_backward(
                x["q"], x["k"], x["v"], d_out.contiguous(),
                d_final_state=None if d_final is None else d_final.float().contiguous(), g=x["g"],
                head_log_decay=x["head_log_decay"], initial_state=x["initial_state"], projection=x["projection"],
                projection_bias=x["projection_bias"], g_backward=x["g_backward"], **ctx.kw)
            need = ctx.needs_input_grad[2:]  # after kw and output_final_state: the operands in `names` order
            out = [None, None]
            for i, grad in enumerate(grads):
                src = args[i]
                out.append(grad.to(src.dtype) if grad is not None and need[i] and is_torch(src) else None)
            return tuple(out)

    _FUNCTION.append(LinearAttentionFunction)
    return LinearAttentionFunction
