"""Linear attention (include/omniattn/linear.h) in flash-linear-attention's conventions.

    o, final_state = omniattn.linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True)

q, k are [batch, seq, heads, K], v [batch, seq, heads, V] (numpy or CPU torch; float32, bfloat16 or float16), the
scale multiplies q (default K ** -0.5), decays are log-space (g <= 0): `head_log_decay` [heads] for a fixed decay per
head (RetNet, Lightning), `g` [batch, seq, heads] for a data-dependent one per token and head (simple GLA, Mamba-2) or
[batch, seq, heads, K] per channel (GLA). States are float32 [batch, heads, K, V]. As everywhere in the package,
Python translates; the rules and their messages are the library's.

linear_attention_backward gives the gradients; on torch tensors that require grad, linear_attention records a
torch.autograd.Function whose backward runs it (gradients reach q, k, v, g, head_log_decay and initial_state).
"""

from . import _omniattn as _C
from ._core import _check_run_options, _empty, _int64_vector, _operand
from ._arrays import is_torch, torch_module

__all__ = ["linear_attention", "linear_attention_backward"]


def linear_attention(q, k, v, *, scale=None, g=None, head_log_decay=None, feature_map="identity", normalize=False,
                     causal=True, prefix=0, initial_state=None, output_final_state=False, chunk_size=64,
                     cu_seqlens=None, backend="cpu", threads=0):
    """Linear attention: S_t = diag(exp(g_t)) S_{t-1} + phi(k_t)^T v_t, o_t = scale phi(q_t) S_t (see linear.h).

    feature_map  "identity", "elu_plus_one", "relu" or "softmax" (over the K features), applied to q and k
    normalize    divide by scale phi(q_t) . z_t, z_t the decayed running sum of phi(k) (classic linear attention)
    causal       False: every token reads the state of the whole sequence (no decay)
    prefix       JRT's prefix-linear form: the first `prefix` tokens read the state of the whole prefix, the rest
                 are causal (no decay)
    initial_state / output_final_state   the recurrent state in and out, so a prefill followed by calls with its
                 final state equals one long call
    chunk_size   tokens per chunk of the chunked kernel; backend "cpu" (the kernel) or "reference" (fp64 oracle)
    cu_seqlens   varlen (fla's convention): q, k, v are [1, total, heads, *] packed sequences, sequence s owns tokens
                 [cu_seqlens[s], cu_seqlens[s + 1]) with its own state; states are [num_seqs, heads, K, V]
    Returns (o, final_state): o like v in q's framework and dtype, final_state float32 or None.
    Autograd: when torch records gradients and q, k, v, g, a torch head_log_decay or initial_state requires grad,
    the call is a torch.autograd.Function whose backward runs linear_attention_backward (gradients of o and of
    final_state flow back).
    """
    kw = dict(scale=scale, feature_map=feature_map, normalize=normalize, causal=causal, prefix=prefix,
              chunk_size=chunk_size, cu_seqlens=_offsets(cu_seqlens), backend=backend, threads=threads)
    if _records_grad(q, k, v, g, head_log_decay, initial_state):
        result = _function().apply(kw, output_final_state, q, k, v, g, head_log_decay, initial_state)
        return result if output_final_state else (result, None)
    return _forward(q, k, v, g, head_log_decay, initial_state, output_final_state, **kw)


def _offsets(cu_seqlens):
    """cu_seqlens as an int64 numpy array (integers only, by the library's rule), or None."""
    return None if cu_seqlens is None else _int64_vector(cu_seqlens, "cu_seqlens")


def _sequences(q, cu_seqlens):
    """The states' first dim: the batch, or the number of packed sequences."""
    return q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1


def _forward(q, k, v, g, head_log_decay, initial_state, output_final_state, *, scale, feature_map, normalize, causal,
             prefix, chunk_size, cu_seqlens, backend, threads):
    if head_log_decay is not None and is_torch(head_log_decay):
        head_log_decay = head_log_decay.detach().float().numpy()
    if backend not in ("cpu", "reference"):
        raise ValueError(f"omniattn: backend must be 'cpu' or 'reference', got {backend!r}")
    _check_run_options(backend, threads)
    if getattr(q, "ndim", 0) != 4:
        raise ValueError(f"omniattn: q must be [batch, seq, heads, K], got {getattr(q, 'shape', type(q).__name__)}")
    out = _empty(q, tuple(q.shape[:-1]) + (v.shape[-1],))
    final = (_empty(q, (_sequences(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[-1]), "float32")
             if output_final_state else None)
    ops = [_operand(name, x, False) for name, x in (("q", q), ("k", k), ("v", v), ("out", out))]
    g_op = None if g is None else _operand("g", g, False)
    extra = {name: (None if x is None else _operand(name, x, False)[0])
             for name, x in (("initial_state", initial_state), ("final_state", final))}
    _C.linear_attention(*(x for x, _ in ops), as_bf16=any(flag for _, flag in ops + ([g_op] if g_op else [])),
                        g=None if g_op is None else g_op[0], scale=scale,
                        feature_map=feature_map, normalize=normalize, causal=causal, prefix=int(prefix),
                        head_log_decay=head_log_decay,
                        chunk=int(chunk_size), threads=int(threads), reference=backend == "reference",
                        cu_seqlens=cu_seqlens, **extra)
    return out, final


def linear_attention_backward(q, k, v, d_out, *, d_final_state=None, scale=None, g=None, head_log_decay=None,
                              feature_map="identity", normalize=False, causal=True, prefix=0, initial_state=None,
                              chunk_size=64, cu_seqlens=None, backend="cpu", threads=0):
    """The gradients of linear_attention(q, k, v, ...) (same arguments) given d_out (and d_final_state, float32
    [batch, heads, K, V]): returns (dq, dk, dv, dg, d_head_log_decay, d_initial_state) in q's framework; dq, dk, dv in
    q's dtype, the others float32, and None for what the call has not (no g, no head_log_decay, no initial_state)."""
    if backend not in ("cpu", "reference"):
        raise ValueError(f"omniattn: backend must be 'cpu' or 'reference', got {backend!r}")
    _check_run_options(backend, threads)
    if getattr(q, "ndim", 0) != 4:
        raise ValueError(f"omniattn: q must be [batch, seq, heads, K], got {getattr(q, 'shape', type(q).__name__)}")
    dq, dk, dv = _empty(q, tuple(q.shape)), _empty(k, tuple(k.shape)), _empty(v, tuple(v.shape))
    dg = None if g is None else _empty(q, tuple(g.shape), "float32")
    d_head = None if head_log_decay is None else _empty(q, (q.shape[2],), "float32")
    cu_seqlens = _offsets(cu_seqlens)
    d_s0 = (None if initial_state is None
            else _empty(q, (_sequences(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[-1]), "float32"))
    ops = [_operand(name, x, False) for name, x in (("q", q), ("k", k), ("v", v), ("d_out", d_out), ("dq", dq),
                                                    ("dk", dk), ("dv", dv))]
    g_op = None if g is None else _operand("g", g, False)
    extra = {name: (None if x is None else _operand(name, x, False)[0])
             for name, x in (("initial_state", initial_state), ("d_final_state", d_final_state), ("dg", dg),
                             ("d_head_log_decay", d_head), ("d_initial_state", d_s0))}
    if head_log_decay is not None and is_torch(head_log_decay):
        head_log_decay = head_log_decay.detach().float().numpy()
    _C.linear_attention_backward(*(x for x, _ in ops), as_bf16=any(flag for _, flag in ops + ([g_op] if g_op else [])),
                                 g=None if g_op is None else g_op[0], scale=scale, feature_map=feature_map,
                                 normalize=normalize, causal=causal, prefix=int(prefix), head_log_decay=head_log_decay,
                                 chunk=int(chunk_size), threads=int(threads), reference=backend == "reference",
                                 cu_seqlens=cu_seqlens, **extra)
    return dq, dk, dv, dg, d_head, d_s0


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

    names = ("q", "k", "v", "g", "head_log_decay", "initial_state")

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
                head_log_decay=x["head_log_decay"], initial_state=x["initial_state"], **ctx.kw)
            need = ctx.needs_input_grad[2:]  # after kw and output_final_state: q, k, v, g, head_log_decay, initial_state
            out = [None, None]
            for i, grad in enumerate(grads):
                src = args[i]
                out.append(grad.to(src.dtype) if grad is not None and need[i] and is_torch(src) else None)
            return tuple(out)

    _FUNCTION.append(LinearAttentionFunction)
    return LinearAttentionFunction
