"""The attention entry points: operands to zero-copy descriptions, spec and options to plain values, one C++ call.
attention_backward binds the C++ backward the same way; on torch tensors that require grad, attention() records a
torch.autograd.Function whose backward is that call."""

import numpy as np

from . import _omniattn as _C
from ._arrays import is_torch, to_numpy, torch_module
from .masks import Grid, as_mask
from .scores import as_score

__all__ = ["attention", "attention_backward", "merge_attention_states", "scaled_dot_product_attention", "explain",
           "reference_attention", "BlockMask", "build_block_mask", "to_bf16", "from_bf16"]

_CAUSAL = {"none": "none", "top_left": "top_left", "bottom_right": "bottom_right"}
_LAYOUTS = {
    # layout: (fixed-length shape names, varlen shape names); the C++ side maps them onto [batch, seq, heads, dim]
    "bshd": ("[batch, seq, heads, dim]", "[total_tokens, heads, dim]"),
    "bhsd": ("[batch, heads, seq, dim]", "[heads, total_tokens, dim]"),
}


def _causal_mode(causal):
    """causal=True follows FlashAttention (>= 2.1): bottom-right aligned. For Lq == Lk both alignments agree."""
    if causal is None or causal is False:
        return "none"
    if causal is True:
        return "bottom_right"
    if isinstance(causal, str) and causal in _CAUSAL:
        return _CAUSAL[causal]
    raise ValueError(f"omniattn: causal must be False, True (= 'bottom_right'), 'top_left' or 'bottom_right', "
                     f"got {causal!r}")


def _torch_code(t):
    """The binding's name of a torch dtype (what it cannot read keeps torch's name, for its messages)."""
    torch = torch_module()
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}.get(t.dtype, str(t.dtype))


def _torch_dtype_code(t, name):
    code = _torch_code(t)
    if code.startswith("torch."):
        raise TypeError(f"omniattn: {name} has dtype {t.dtype}; supported: torch.float32, torch.bfloat16, torch.float16, "
                        "torch.float64 (reference backend)")
    return code


def _torch_strided(name, x):
    if x.device.type != "cpu":
        raise ValueError(f"omniattn: {name} is on {x.device}; omniattn runs on the CPU")
    if x.layout != torch_module().strided:
        raise TypeError(f"omniattn: {name} has layout {x.layout}; only strided tensors are supported")


def _operand(name, x, as_bf16):
    """What the binding reads: the numpy array itself (buffer protocol) or (data_ptr, dtype, shape, strides)."""
    if isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: the same bits as uint16
            return x.view(np.uint16), True
        if x.dtype in (np.float32, np.float16, np.float64) or (as_bf16 and x.dtype == np.uint16):
            return x, as_bf16
        hint = " (pass dtype='bf16' to read uint16 arrays as bfloat16 bits)" if x.dtype == np.uint16 else ""
        raise TypeError(f"omniattn: {name} has dtype {x.dtype}; supported: float32, float16, and bfloat16 "
                        f"(torch.bfloat16, or numpy uint16 holding bf16 bits with dtype='bf16'), float64 (reference "
                        f"backend){hint}")
    if is_torch(x):
        _torch_strided(name, x)
        return (x.data_ptr(), _torch_dtype_code(x, name), tuple(x.shape), tuple(x.stride())), as_bf16
    raise TypeError(f"omniattn: {name} must be a numpy array or a torch tensor, not {type(x).__name__}")


def _lse_shape(x, layout):
    """The LSE's shape for attention rows shaped like x: [batch, heads, seq] ([heads, total_tokens] for 3-d varlen)."""
    if x.ndim == 3:
        return (x.shape[0], x.shape[1]) if layout == "bhsd" else (x.shape[1], x.shape[0])
    b, s, h = x.shape[0], x.shape[2 if layout == "bhsd" else 1], x.shape[1 if layout == "bhsd" else 2]
    return (b, h, s)


def _empty(like, shape, dtype=None):
    """A new uninitialized array in like's framework: numpy in, numpy out; torch in, torch out."""
    if is_torch(like):
        torch = torch_module()
        return torch.empty(shape, dtype=like.dtype if dtype is None else getattr(torch, dtype))
    return np.empty(shape, dtype=like.dtype if dtype is None else dtype)


def _int64_vector(x, name):
    """cu_seqlens as int64, by the C++ rules (integers only: a float array is an error, not truncated)."""
    if x is None:
        return None
    return _C.cu_seqlens(x if isinstance(x, (list, tuple)) else to_numpy(x, name), name)


class _Call:
    """One prepared attention call: validated operands, output buffers, and the lowered mask and score."""

    def __init__(self, q, k, v, *, scale=None, causal=False, mask=None, score=None, block_mask=None, return_lse=False,
                 layout="bshd", out=None, backend="auto", threads=0, cu_seqlens_q=None, cu_seqlens_k=None,
                 dtype=None, sink_logits=None, rope=None, grad=None, lower=True):
        """grad: None (the forward), or the backward's operands: dict(lse, d_out, dq, dk, dv, d_sink, d_bias), where
        out is the forward's, dq / dk / dv may be None (allocated like q / k / v) and d_sink / d_bias say whether to
        return those gradients. lower=False validates the operands only (no mask or score is evaluated)."""
        if layout not in _LAYOUTS:
            raise ValueError(f"omniattn: layout must be 'bshd' or 'bhsd', got {layout!r}")
        if dtype not in (None, "bf16", "bfloat16"):
            raise ValueError(f"omniattn: dtype must be None or 'bf16' (read numpy uint16 arrays as bfloat16), got {dtype!r}")
        _check_run_options(backend, threads)
        if block_mask is not None and not isinstance(block_mask, BlockMask):
            raise TypeError(f"omniattn: block_mask must be an omniattn.BlockMask (see build_block_mask), "
                            f"not {type(block_mask).__name__}")
        if (cu_seqlens_q is None) != (cu_seqlens_k is None):
            raise ValueError("omniattn: pass both cu_seqlens_q and cu_seqlens_k, or neither")
        self.varlen = cu_seqlens_q is not None
        as_bf16 = dtype is not None
        rank = 3 if self.varlen else 4
        names = _LAYOUTS[layout][1 if self.varlen else 0]
        grad_ops = () if grad is None else (("d_out", grad["d_out"]), ("dq", grad.get("dq")), ("dk", grad.get("dk")),
                                            ("dv", grad.get("dv")))
        for name, x in (("q", q), ("k", k), ("v", v), ("out", out)) + grad_ops:
            if x is not None and (isinstance(x, np.ndarray) or is_torch(x)) and x.ndim != rank:
                raise ValueError(f"omniattn: {name} must be {rank}-d {names} for layout={layout!r}"
                                 f"{' with cu_seqlens' if self.varlen else ''}, got shape {tuple(x.shape)}")

        ops = [_operand(n, x, as_bf16) for n, x in (("q", q), ("k", k), ("v", v))]
        if grad is not None and out is None:
            raise TypeError("omniattn: attention_backward needs the forward's out")
        # Allocate the output in the input's framework, dtype and layout: q's shape with v's head dim.
        if out is None:
            out = _empty(q, tuple(q.shape[:-1]) + (v.shape[-1],))
        self.out = out
        op_out = _operand("out", out, as_bf16)
        grad_kw = {}
        self.grads = None
        if grad is not None:  # d_out, then the gradient buffers: the shapes of q, k, v in their framework and dtype
            self.grads = [x if x is not None else _empty(like, tuple(like.shape))
                          for x, like in ((grad.get("dq"), q), (grad.get("dk"), k), (grad.get("dv"), v))]
            grad_ops = [_operand("d_out", grad["d_out"], as_bf16)] + [
                _operand(n, x, as_bf16) for n, x in zip(("dq", "dk", "dv"), self.grads)]
            grad_kw = dict(d_out=grad_ops[0][0], dq=grad_ops[1][0], dk=grad_ops[2][0], dv=grad_ops[3][0],
                           want_d_sink=bool(grad.get("d_sink")), want_d_bias=bool(grad.get("d_bias")))
            op_out = (op_out[0], op_out[1] or any(flag for _, flag in grad_ops))
        as_bf16 = as_bf16 or any(flag for _, flag in ops + [op_out])
        self.lse = _empty(q, _lse_shape(q, layout), "float32") if return_lse else None
        cu_q = _int64_vector(cu_seqlens_q, "cu_seqlens_q")
        cu_k = _int64_vector(cu_seqlens_k, "cu_seqlens_k")

        self.kw = dict(q=ops[0][0], k=ops[1][0], v=ops[2][0], out=op_out[0], layout=layout, as_bf16=as_bf16,
                       blocks=block_mask._cxx if block_mask is not None else None,
                       lse=None if self.lse is None else _operand_lse(self.lse), backend=backend, threads=int(threads),
                       cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **_spec_values(scale, causal, sink_logits, rope), **grad_kw)
        if grad is not None:
            self.kw["lse"] = _operand_lse(grad["lse"])
        self.dims = _C.call("validate", **self.kw)  # the C++ rules first, with their messages
        if not lower:
            return

        d = self.dims
        lens_q = None if cu_q is None else np.diff(cu_q)
        lens_k = None if cu_k is None else np.diff(cu_k)
        # The index grids are built only for the masks and scores lowered here (a plain call allocates nothing).
        grid = None
        if mask is not None or score is not None or block_mask is not None:
            grid = Grid(d["batch"], d["heads_q"], d["seq_q"], d["seq_k"], lens_q, lens_k)
        if block_mask is not None:
            block_mask._check_call(grid, cu_q, cu_k)
        self.kw.update(_lowered(mask, score, grid))
        if mask is None and block_mask is not None:
            self.kw["mask"] = block_mask._cmask  # PARTIAL tiles evaluate the mask the block mask was built from

    def run(self):
        self.extra = _C.call("run", **self.kw)  # the backward's (d_sink_logits or None, d_bias or None)

    def result(self):
        return (self.out, self.lse) if self.lse is not None else self.out

    def gradients(self):
        """(dq, dk, dv), then d_sink_logits and d_bias when they were asked for (torch tensors for torch inputs)."""
        extra = [_like(self.grads[0], x) for x in self.extra if x is not None]
        return tuple(self.grads) + tuple(extra)

    def explain(self):
        return _C.call("explain", **self.kw)


def _check_run_options(backend, threads):
    if backend not in ("auto", "cpu", "reference"):
        raise ValueError(f"omniattn: backend must be 'auto', 'cpu' or 'reference', got {backend!r}")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"omniattn: threads must be an int, got {type(threads).__name__}")


def _spec_values(scale, causal, sink_logits, rope):
    """The spec's plain values as the binding takes them (attention and decode calls alike)."""
    return dict(scale=None if scale is None else float(scale), causal=_causal_mode(causal),
                sink_logits=_float_vector(sink_logits, "sink_logits"), rope=_rope_dict(rope))


def _lowered(mask, score, grid):
    """The binding's mask and score of a call whose index grids are `grid` (only those given)."""
    kw = {}
    if mask is not None:
        kw["mask"] = _C.Mask(as_mask(mask).lower(grid))
    if score is not None:
        kw["score"] = as_score(score).lower(grid)
    return kw


def _explained(info, backend):
    """select()'s (or select_decode()'s) answer as explain() prints it."""
    head = f"kernel: {info['name']}" if info["ok"] else f"no {backend} kernel fits"
    return "\n".join([head] + ["  " + r for r in info["reasons"]])


def _float_vector(x, name):
    if x is None:
        return None
    if is_torch(x):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))


def _ids(x):
    """Integer ids (RoPE positions) flattened to a list of ints, or None."""
    if x is None:
        return None
    if is_torch(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64).reshape(-1).tolist()


def _rope_dict(rope):
    """rope=True (defaults), a dict with any of theta, rotary_dim, interleaved, pos_q, pos_k, sections, or None."""
    if rope is None or rope is False:
        return None
    spec = {} if rope is True else dict(rope)
    unknown = set(spec) - {"theta", "rotary_dim", "interleaved", "pos_q", "pos_k", "sections"}
    if unknown:
        raise ValueError(f"omniattn: unknown rope keys {sorted(unknown)}")
    return dict(theta=float(spec.get("theta", 10000.0)), rotary_dim=int(spec.get("rotary_dim", 0)),
                interleaved=bool(spec.get("interleaved", False)), pos_q=_ids(spec.get("pos_q")),
                pos_k=_ids(spec.get("pos_k")), sections=[int(v) for v in spec.get("sections", [])])


def _operand_lse(lse):
    if is_torch(lse):
        _torch_strided("lse", lse)
        return (lse.data_ptr(), _torch_code(lse), tuple(lse.shape), tuple(lse.stride()))
    return lse


def _like(like, array):
    """A numpy array the binding made, in like's framework (torch in, torch out; no copy)."""
    return torch_module().from_numpy(array) if is_torch(like) else array


def attention(q, k, v, *, scale=None, causal=False, mask=None, score=None, block_mask=None, return_lse=False,
              layout="bshd", out=None, backend="auto", threads=0, cu_seqlens_q=None, cu_seqlens_k=None, dtype=None,
              sink_logits=None, rope=None):
    """Attention over numpy arrays or CPU torch tensors, without copying them.

    q [batch, seq_q, heads_q, dim], k [batch, seq_k, heads_kv, dim], v [batch, seq_k, heads_kv, dim_v]
    (layout="bshd", FlashAttention's) or [batch, heads, seq, dim] (layout="bhsd", PyTorch SDPA's); any strides.
    heads_q must be a multiple of heads_kv (GQA / MQA). dtype float32, float16 or bfloat16 (torch.bfloat16, or numpy
    uint16 arrays of bf16 bits with dtype="bf16"), or float64 (served by the reference backend only: for checking,
    e.g. torch.autograd.gradcheck); q, k, v share it.

    scale       softmax scale, default 1/sqrt(dim)
    causal      False; True = "bottom_right" (FlashAttention >= 2.1: the last query sees the last key);
                "top_left" (PyTorch is_causal). The same when seq_q == seq_k.
    mask        an omniattn.masks mask, a function mask(b, h, q, k) -> bool (evaluated once over numpy index grids
                into a table: O(B*H*Lq*Lk) memory and time at worst), or a boolean array broadcastable to
                [batch, heads_q, seq_q, seq_k] (True = may attend)
    score       an omniattn.scores modifier, a function score(s, b, h, q, k) affine in s, or a float array
                broadcastable to [batch, heads_q, seq_q, seq_k] added to the scaled logits
    block_mask  an omniattn.BlockMask built once by build_block_mask() and reused (its mask is used when mask=None)
    return_lse  also return the log-sum-exp, float32 [batch, heads_q, seq_q] ([heads_q, total_q] for varlen)
    out         write the result here (any strides; q's dtype or float32) instead of a new array
    backend     "auto", "cpu" (the fused kernels) or "reference" (the float64 oracle)
    threads     0 = all cores
    cu_seqlens_q, cu_seqlens_k   varlen: q/k/v are [total_tokens, heads, dim] and sequence s owns rows
                [cu[s], cu[s+1])
    sink_logits one extra logit per query head that takes probability mass without a value (learnable sinks)
    rope        rotary embedding of q and k inside the call: True, or a dict with theta (10000), rotary_dim (0 = all),
                interleaved (False = NeoX halves), pos_q / pos_k (int ids, [axes, batch, seq]; default: key j at j,
                query i at i + Lk - Lq), sections (multi-axis M-RoPE: rotary pairs per axis)

    Returns out (numpy in, numpy out; torch in, torch out; the dtype of q), or (out, lse). Invalid calls raise
    ValueError (TypeError for dtypes) with the library's message, e.g. "[attention] k.dim 96 != q.dim 128".
    Rows with no allowed key give 0 (lse -inf), where PyTorch gives NaN.

    Autograd: when torch records gradients and q, k, v, a torch sink_logits tensor or a torch score bias tensor
    (score=tensor, scores.bias(tensor)) requires grad, the call is a torch.autograd.Function whose backward runs
    attention_backward (same spec and backend): gradients reach q, k, v (dk, dv summed over each GQA group), the sink
    logits and the bias. lse is returned as a constant (no gradient flows through it). Other parameters (alibi
    slopes, ...) are constants. With out=, the result is computed, then copied into out by torch.
    """
    kw = dict(scale=scale, causal=causal, mask=mask, score=score, block_mask=block_mask, layout=layout,
              backend=backend, threads=threads, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dtype=dtype,
              sink_logits=sink_logits, rope=rope)
    torch = torch_module()
    if torch is not None and torch.is_grad_enabled():
        kw["score"] = as_score(score) if score is not None else None
        sinks = sink_logits if is_torch(sink_logits) else None
        bias = _grad_bias(kw["score"])
        if any(is_torch(t) and t.requires_grad for t in (q, k, v, sinks, bias)):
            return _recorded_attention(q, k, v, out, return_lse, sinks, bias, kw)
    call = _Call(q, k, v, return_lse=return_lse, out=out, **kw)
    call.run()
    return call.result()


def attention_backward(q, k, v, out, lse, d_out, *, scale=None, causal=False, mask=None, score=None, block_mask=None,
                       layout="bshd", backend="auto", threads=0, cu_seqlens_q=None, cu_seqlens_k=None, dtype=None,
                       sink_logits=None, rope=None, return_d_sink=False, return_d_bias=False, dq=None, dk=None, dv=None):
    """The gradients of a loss L through out = attention(q, k, v, ...), given d_out = dL/d out: (dq, dk, dv), then
    d_sink_logits (return_d_sink=True; float32 [heads_q]) and d_bias (return_d_bias=True: the gradient of the
    spec's one dense bias tensor, float32 in the bias's shape padded to 4-d, broadcast dims summed).

    out and lse are what attention(..., return_lse=True) returned for the same inputs and spec (the spec keywords are
    attention()'s and must be the same); d_out has out's shape (q's dtype or float32). dq, dk, dv are new arrays of
    q's, k's, v's shape and dtype in their framework, or written into the given buffers (any strides; the dtype of q
    or float32). With GQA / MQA, dk and dv hold the sums over each kv head's query heads. The CPU kernel runs float32
    and bfloat16 / float16 inputs (an out of float32 gives a better result for the latter); float64 and
    return_d_bias run on the reference backend (backend="auto" falls back to it; explain(..., backward=True) says
    what runs). Errors come from the library, e.g. "[attention_backward] d_out.seq 5 != out.seq 9".
    """
    call = _Call(q, k, v, scale=scale, causal=causal, mask=mask, score=score, block_mask=block_mask, layout=layout,
                 out=out, backend=backend, threads=threads, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 dtype=dtype, sink_logits=sink_logits, rope=rope,
                 grad=dict(lse=lse, d_out=d_out, dq=dq, dk=dk, dv=dv, d_sink=return_d_sink, d_bias=return_d_bias))
    call.run()
    return call.gradients()


def merge_attention_states(outs, lses, *, out=None, layout="bshd", threads=0):
    """Merge partial attention results over disjoint key sets into attention over their union (FlashInfer's
    merge_states, xFormers' merge_attentions): split-K, cascade (shared prefix + suffix), context-parallel shards.

    outs[i] and lses[i] are what attention(..., return_lse=True) returned for key set i: out [batch, seq, heads, dim]
    (layout="bshd") or [batch, heads, seq, dim] ("bhsd"), 3-d for varlen, and lse float32 [batch, heads, seq]
    ([heads, total] for varlen). Per row, with m = max_i lse_i and w_i = exp(lse_i - m):
        out = sum_i w_i out_i / sum_i w_i,   lse = m + log(sum_i w_i)
    in float32, the parts summed in the given order (the result does not depend on threads). A row where a part has
    lse -inf (no key of that set) takes nothing from it; a row with every lse -inf gives out 0, lse -inf.

    Returns (out, lse): out in outs[0]'s framework, dtype and shape (or written into out=, any strides, float32,
    bfloat16, float16 or float64), lse float32. torch autograd does not record the merge. Errors come from the
    library, e.g. "[merge_attention_states] outs[1].seq 7 != outs[0].seq 9".
    """
    outs, lses = list(outs), list(lses)
    ops = [_operand(f"outs[{i}]", x, False) for i, x in enumerate(outs)]
    # With no outs (or a first one of the wrong rank) there is nothing to shape the results after: the library and
    # the binding report what is wrong.
    first = outs[0] if outs and outs[0].ndim in (3, 4) else None
    if out is None and first is not None:
        out = _empty(first, tuple(first.shape))
    lse = None if first is None else _empty(first, _lse_shape(first, layout), "float32")
    op_out = (None, False) if out is None else _operand("out", out, False)
    _C.merge_attention_states([x for x, _ in ops], [_operand_lse(x) for x in lses], op_out[0],
                              None if lse is None else _operand_lse(lse), layout=layout,
                              as_bf16=any(flag for _, flag in ops + [op_out]), threads=threads)
    return out, lse


def _grad_bias(score):
    """The torch tensor behind the score's dense bias stage, if one was made from a torch tensor (else None)."""
    parts = getattr(score, "parts", [score])
    found = [p.source for p in parts if getattr(p, "source", None) is not None and p.source.requires_grad]
    return found[0] if found else None


_FUNCTION = []


def _function():
    """The torch.autograd.Function of attention(), made on first use (torch is optional)."""
    if _FUNCTION:
        return _FUNCTION[0]
    torch = torch_module()
    from torch.autograd.function import once_differentiable

    class AttentionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, kw, q, k, v, sinks, bias):
            # bf16 / f16 inputs: out is kept in float32 for the backward's D = rowsum(d_out * out) and rounded
            # (nearest even, as the library's store) for the caller.
            wide = q.dtype in (torch.bfloat16, torch.float16)
            out = torch.empty(tuple(q.shape[:-1]) + (v.shape[-1],), dtype=torch.float32 if wide else q.dtype)
            args = dict(kw, sink_logits=kw["sink_logits"] if sinks is None else sinks)
            call = _Call(q, k, v, out=out, return_lse=True, **args)
            call.run()
            ctx.kw = kw
            ctx.save_for_backward(q, k, v, out, call.lse, sinks, bias)
            ctx.mark_non_differentiable(call.lse)
            return (out.to(q.dtype) if wide else out), call.lse

        @staticmethod
        @once_differentiable
        def backward(ctx, d_out, d_lse):
            q, k, v, out, lse, sinks, bias = ctx.saved_tensors
            need = ctx.needs_input_grad  # kw, q, k, v, sinks, bias
            want_sink, want_bias = sinks is not None and need[4], bias is not None and need[5]
            args = dict(ctx.kw, sink_logits=ctx.kw["sink_logits"] if sinks is None else sinks)
            grads = list(attention_backward(q, k, v, out, lse, d_out, return_d_sink=want_sink,
                                            return_d_bias=want_bias, **args))
            dq, dk, dv = grads[:3]
            extra = grads[3:]
            d_sink = extra.pop(0).reshape(sinks.shape).to(sinks.dtype) if want_sink else None
            d_bias = extra.pop(0).reshape(bias.shape).to(bias.dtype) if want_bias else None
            return None, dq, dk, dv, d_sink, d_bias

    _FUNCTION.append(AttentionFunction)
    return AttentionFunction


def _recorded_attention(q, k, v, out, return_lse, sinks, bias, kw):
    if out is not None:
        _Call(q, k, v, out=out, lower=False, **kw)  # the C++ rules for out (shape, dtype, overlap), before torch copies
    result, lse = _function().apply(kw, q, k, v, sinks, bias)
    if out is not None:
        result = out.copy_(result)
    return (result, lse) if return_lse else result


def reference_attention(q, k, v, **kwargs):
    """attention(..., backend="reference"): the float64 plain-loop oracle, for checking."""
    kwargs["backend"] = "reference"
    return attention(q, k, v, **kwargs)


def explain(q, k, v, *, backward=False, return_d_bias=False, **kwargs):
    """Which kernel attention(q, k, v, **kwargs) would run and why (or why none fits): omniattn::select()'s reasons,
    one per line. Takes the same arguments as attention(); runs nothing. backward=True: the same for
    attention_backward on these inputs (omniattn::select_backward; return_d_bias as there)."""
    grad = None
    if backward:
        shape = tuple(q.shape[:-1]) + (v.shape[-1],)
        d_out = _empty(q, shape)
        # The forward's out and lse buffers (never written: explain runs nothing) and a d_out.
        probe = _Call(q, k, v, return_lse=True, lower=False, **kwargs)
        grad = dict(lse=probe.lse, d_out=d_out, d_bias=return_d_bias)
        kwargs = dict(kwargs, out=probe.out)
    return _explained(_Call(q, k, v, grad=grad, **kwargs).explain(), kwargs.get("backend", "auto"))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention's signature and layout on omniattn (differentiable on
    tensors that require grad, like attention()).

    query [..., Hq, L, E], key [..., Hkv, S, E], value [..., Hkv, S, Ev] (4-d [N, H, L, E], or 3-d [N, L, E]).
    attn_mask: boolean (True = attend) or float (added to the scaled logits), broadcastable to [N, Hq, L, S].
    is_causal: top-left aligned, as in PyTorch. dropout_p must be 0. enable_gqa: allow Hq to be a multiple of Hkv
    (PyTorch 2.5); without it Hq != Hkv is an error. Fully masked rows give 0 here where PyTorch gives NaN.
    """
    if dropout_p != 0.0:
        raise ValueError(f"omniattn: dropout_p must be 0 (omniattn has no dropout), got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("omniattn: pass either attn_mask or is_causal=True, not both (as in PyTorch)")
    tensors = (query, key, value)
    for name, t in zip(("query", "key", "value"), tensors):
        if not (isinstance(t, np.ndarray) or is_torch(t)):
            raise TypeError(f"omniattn: {name} must be a numpy array or a torch tensor, not {type(t).__name__}")
        if t.ndim not in (3, 4):
            raise ValueError(f"omniattn: {name} must be 4-d [N, H, L, E] or 3-d [N, L, E], got shape {tuple(t.shape)}")
    if len({t.ndim for t in tensors}) != 1:
        raise ValueError("omniattn: query, key and value must have the same number of dimensions")
    three_d = query.ndim == 3
    if three_d:  # [N, L, E] -> [N, 1, L, E] views
        query, key, value = (t.unsqueeze(1) if is_torch(t) else t[:, None] for t in tensors)
        if attn_mask is not None and attn_mask.ndim == 3:
            attn_mask = attn_mask.unsqueeze(1) if is_torch(attn_mask) else attn_mask[:, None]
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError(f"omniattn: query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True "
                         "for grouped-query attention")
    mask = score = None
    if attn_mask is not None:
        m = to_numpy(attn_mask, "attn_mask")
        if m.dtype == np.bool_:
            mask = attn_mask
        elif m.dtype.kind == "f":
            score = attn_mask
        else:
            raise TypeError(f"omniattn: attn_mask must be boolean or floating point, got {m.dtype}")
    out = attention(query, key, value, scale=scale, causal="top_left" if is_causal else False, mask=mask, score=score,
                    layout="bhsd")
    return out[:, 0] if three_d else out


# ---------------------------------------------------------------------------------------------------------------------
# Block masks


class BlockMask:
    """The tile structure of a mask, FlexAttention-style: for each (batch, head, q tile, kv tile) whether the tile is
    EMPTY (skipped), PARTIAL (the mask is evaluated per element) or FULL (computed without the mask).

    Build it once with build_block_mask() and pass it as attention(..., block_mask=bm) to every call of that shape;
    it keeps the mask (and any table the mask needed), so those calls neither re-evaluate nor re-classify it.
    ``kinds`` is a uint8 array [batch or 1, heads or 1, q_tiles, kv_tiles] of EMPTY / PARTIAL / FULL.
    """

    EMPTY, PARTIAL, FULL = 0, 1, 2

    def __init__(self, cxx, mask=None, cmask=None, shape=None, cu_seqlens=None):
        self._cxx, self.mask, self._cmask, self.shape, self._cu = cxx, mask, cmask, shape, cu_seqlens

    @classmethod
    def from_kinds(cls, kinds, q_tile, kv_tile, mask=None):
        """A user-made block mask: kinds [batch or 1, heads or 1, q_tiles, kv_tiles] of EMPTY / PARTIAL / FULL.
        PARTIAL tiles evaluate `mask` (an omniattn.masks mask; None allows every element) - only built-in patterns
        here, since a table mask needs the call's shape: use build_block_mask for those."""
        kinds = np.asarray(to_numpy(kinds, "kinds"))
        if kinds.ndim != 4:
            raise ValueError(f"omniattn: kinds must be 4-d [batch, heads, q_tiles, kv_tiles], got shape {kinds.shape}")
        if kinds.size and (kinds.min() < 0 or kinds.max() > 2):
            raise ValueError("omniattn: kinds holds values other than EMPTY (0), PARTIAL (1), FULL (2)")
        cmask = None
        if mask is not None:
            mask = as_mask(mask)
            if not mask.is_native():
                raise ValueError("omniattn: BlockMask.from_kinds takes built-in mask patterns only (a table mask "
                                 "needs the call's shape: use build_block_mask)")
            cmask = _C.Mask(mask.lower(None))
        return cls(_C.BlockMask(kinds.astype(np.uint8), int(q_tile), int(kv_tile)), mask, cmask)

    @property
    def kinds(self):
        return self._cxx.kinds

    @property
    def q_tile(self):
        return self._cxx.q_tile

    @property
    def kv_tile(self):
        return self._cxx.kv_tile

    def counts(self):
        """Number of EMPTY, PARTIAL and FULL tiles (over the stored, possibly broadcast, batch and heads)."""
        k = self.kinds
        return {"empty": int((k == 0).sum()), "partial": int((k == 1).sum()), "full": int((k == 2).sum())}

    @property
    def sparsity(self):
        """Fraction of EMPTY tiles."""
        k = self.kinds
        return float((k == 0).mean()) if k.size else 0.0

    def _check_call(self, grid, cu_q, cu_k):
        if self.shape is None:
            return
        b, h, lq, lk = self.shape
        if (lq, lk) != grid.shape[2:] or b not in (1, grid.shape[0]) or h not in (1, grid.shape[1]):
            raise ValueError(f"omniattn: block_mask was built for [batch, heads, seq_q, seq_k] = {self.shape}, "
                             f"the call is {grid.shape}")
        if self._cu is not None:
            if cu_q is None or not (np.array_equal(self._cu[0], cu_q) and np.array_equal(self._cu[1], cu_k)):
                raise ValueError("omniattn: block_mask was built for other cu_seqlens than the call's")

    def __repr__(self):
        c = self.counts()
        return (f"BlockMask(kinds={tuple(self.kinds.shape)}, tiles={self.q_tile}x{self.kv_tile}, "
                f"empty={c['empty']}, partial={c['partial']}, full={c['full']}, mask={self.mask!r})")


def build_block_mask(mask, B, H, Lq, Lk, q_tile=64, kv_tile=64, *, cu_seqlens_q=None, cu_seqlens_k=None):
    """Classify `mask` (anything attention's mask= takes; None = every pair) into q_tile x kv_tile tiles for
    problems of shape [B, H, Lq, Lk] (for varlen: B sequences given by cu_seqlens, Lq / Lk the longest).
    Built-in patterns classify in closed form; table masks are evaluated once, here, and kept in the BlockMask."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("omniattn: pass both cu_seqlens_q and cu_seqlens_k, or neither")
    cu_q, cu_k = _int64_vector(cu_seqlens_q, "cu_seqlens_q"), _int64_vector(cu_seqlens_k, "cu_seqlens_k")
    lens_q = lens_k = None
    if cu_q is not None:
        if len(cu_q) < 2 or len(cu_q) != len(cu_k):
            raise ValueError("omniattn: cu_seqlens_q and cu_seqlens_k must both have num_seqs + 1 >= 2 entries")
        lens_q, lens_k = np.diff(cu_q), np.diff(cu_k)
        want = (len(cu_q) - 1, int(lens_q.max()), int(lens_k.max()))
        if (B, Lq, Lk) != want:
            raise ValueError(f"omniattn: with cu_seqlens, (B, Lq, Lk) must be (num_seqs, longest q, longest k) = {want}, "
                             f"got {(B, Lq, Lk)}")
    for name, value in (("B", B), ("H", H), ("Lq", Lq), ("Lk", Lk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"omniattn: {name} must be an int >= 0, got {value!r}")
    m = as_mask(mask) if mask is not None else None
    cmask = None
    if m is not None:
        cmask = _C.Mask(m.lower(Grid(B, H, Lq, Lk, lens_q, lens_k)))
    cxx = _C.build_block_mask(cmask, "none", int(B), int(H), int(Lq), int(Lk), int(q_tile), int(kv_tile), cu_q, cu_k)
    return BlockMask(cxx, m, cmask, (int(B), int(H), int(Lq), int(Lk)),
                     None if cu_q is None else (cu_q.copy(), cu_k.copy()))


# ---------------------------------------------------------------------------------------------------------------------
# bf16 storage helpers for numpy (which has no bfloat16)


def to_bf16(x):
    """float array -> uint16 array of bf16 bits (round to nearest even), for numpy bf16 inputs with dtype='bf16'."""
    return _C.f32_to_bf16(np.asarray(x, dtype=np.float32))


def from_bf16(bits):
    """uint16 array of bf16 bits -> float32 array."""
    return _C.bf16_to_f32(np.asarray(bits, dtype=np.uint16))
