"""Linear attention (include/omniattn/linear.h) in flash-linear-attention's conventions.

    o, final_state = omniattn.linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True)

q, k are [batch, seq, heads, K], v [batch, seq, heads, V] (numpy or CPU torch; float32, bfloat16 or float16), the
scale multiplies q (default K ** -0.5), decays are log-space (g <= 0): `head_log_decay` [heads] for a fixed decay per
head (RetNet, Lightning), `g` [batch, seq, heads] for a data-dependent one per token and head (simple GLA, Mamba-2) or
[batch, seq, heads, K] per channel (GLA). States are float32 [batch, heads, K, V]. As everywhere in the package,
Python translates; the rules and their messages are the library's.
"""

from . import _omniattn as _C
from ._core import _check_run_options, _empty, _operand

__all__ = ["linear_attention"]


def linear_attention(q, k, v, *, scale=None, g=None, head_log_decay=None, feature_map="identity", normalize=False,
                     causal=True, prefix=0, initial_state=None, output_final_state=False, chunk_size=64,
                     backend="cpu", threads=0):
    """Linear attention: S_t = diag(exp(g_t)) S_{t-1} + phi(k_t)^T v_t, o_t = scale phi(q_t) S_t (see linear.h).

    feature_map  "identity", "elu_plus_one", "relu" or "softmax" (over the K features), applied to q and k
    normalize    divide by scale phi(q_t) . z_t, z_t the decayed running sum of phi(k) (classic linear attention)
    causal       False: every token reads the state of the whole sequence (no decay)
    prefix       JRT's prefix-linear form: the first `prefix` tokens read the state of the whole prefix, the rest
                 are causal (no decay)
    initial_state / output_final_state   the recurrent state in and out, so a prefill followed by calls with its
                 final state equals one long call
    chunk_size   tokens per chunk of the chunked kernel; backend "cpu" (the kernel) or "reference" (fp64 oracle)
    Returns (o, final_state): o like v in q's framework and dtype, final_state float32 or None.
    """
    if backend not in ("cpu", "reference"):
        raise ValueError(f"omniattn: backend must be 'cpu' or 'reference', got {backend!r}")
    _check_run_options(backend, threads)
    if getattr(q, "ndim", 0) != 4:
        raise ValueError(f"omniattn: q must be [batch, seq, heads, K], got {getattr(q, 'shape', type(q).__name__)}")
    out = _empty(q, tuple(q.shape[:-1]) + (v.shape[-1],))
    final = _empty(q, (q.shape[0], q.shape[2], q.shape[3], v.shape[-1]), "float32") if output_final_state else None
    ops = [_operand(name, x, False) for name, x in (("q", q), ("k", k), ("v", v), ("out", out))]
    g_op = None if g is None else _operand("g", g, False)
    extra = {name: (None if x is None else _operand(name, x, False)[0])
             for name, x in (("initial_state", initial_state), ("final_state", final))}
    _C.linear_attention(*(x for x, _ in ops), as_bf16=any(flag for _, flag in ops + ([g_op] if g_op else [])),
                        g=None if g_op is None else g_op[0], scale=scale,
                        feature_map=feature_map, normalize=normalize, causal=causal, prefix=int(prefix),
                        head_log_decay=head_log_decay,
                        chunk=int(chunk_size), threads=int(threads), reference=backend == "reference", **extra)
    return out, final
