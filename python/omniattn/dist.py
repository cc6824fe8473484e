"""Context-parallel attention over MPI (include/omniattn/dist.h) with mpi4py communicators.

    from mpi4py import MPI
    import omniattn.dist
    out = omniattn.dist.attention(q, k, v, MPI.COMM_WORLD, causal=True, layout="zigzag")

q, k, v are this rank's shards, [batch, local_seq, heads, dim] (numpy or CPU torch): the tokens of the chunks
shard_rows() names, in that order. As everywhere in the package, Python only translates: the layout, the mechanisms,
the rules and their messages are the library's (omniattn::dist). Needs a build with MPI (Open MPI) and mpi4py.
"""

import numpy as np

from . import _omniattn as _C
from ._arrays import is_torch, torch_module
from ._core import _check_run_options, _empty, _lowered, _operand, _operand_lse, _spec_values
from .masks import Grid

__all__ = ["attention", "attention_backward", "rank_chunks", "shard_rows", "available"]


def available():
    """Whether this build has omniattn::dist (built when CMake found MPI)."""
    return bool(_C.has_dist)


def _require():
    if not available():
        raise RuntimeError("omniattn: this build has no MPI support (install libopenmpi-dev and rebuild)")


def _world(comm):
    if comm is None:
        from mpi4py import MPI
        return MPI.COMM_WORLD
    return comm


def rank_chunks(layout, chunks, ranks, rank):
    """The chunks of the global sequence rank `rank` of `ranks` holds, in local order (contiguous or zigzag)."""
    _require()
    return list(_C.rank_chunks(layout, int(chunks), int(ranks), int(rank)))


def shard_rows(n, layout="contiguous", chunks=0, comm=None, rank=None, ranks=None):
    """The global token indices of a rank's shard of a sequence of n tokens (chunk c = [c n / C, (c + 1) n / C)):
    take q[:, shard_rows(...)] etc. from a global array. chunks 0: P (contiguous) or 2P (zigzag)."""
    comm = _world(comm) if rank is None or ranks is None else comm
    ranks = comm.Get_size() if ranks is None else ranks
    rank = comm.Get_rank() if rank is None else rank
    c = chunks or (2 * ranks if layout == "zigzag" else ranks)
    return np.concatenate([np.arange(i * n // c, (i + 1) * n // c) for i in rank_chunks(layout, c, ranks, rank)] or
                          [np.zeros(0, dtype=np.int64)])


def _agree_local(comm, q, threads):
    """Every rank takes the same collective steps, also when this rank's arguments are wrong: local problems are
    agreed on first (a rank raising alone would leave the others waiting in MPI). Returns the global length."""
    err = None
    try:
        _check_run_options("cpu", threads)
        if getattr(q, "ndim", 0) != 4:
            raise ValueError(f"omniattn: q must be [batch, local_seq, heads_q, dim], got "
                             f"{getattr(q, 'shape', type(q).__name__)}")
        seq = int(q.shape[1])
    except Exception as e:  # noqa: BLE001 (re-raised below, after the other ranks know)
        err, seq = e, 0
    for r, message in enumerate(comm.allgather(None if err is None else str(err))):
        if message is not None:
            if err is not None:
                raise err
            raise ValueError(f"[dist::attention] rank {r}: {message}")
    return comm.allreduce(seq)  # the global length the tables are lowered for


def _call(comm, q, k, v, out, lse, spec, run, grads=None):
    """One collective binding call: the operands translated (a failure here fails every rank's call with its
    message), then dist_attention (the forward, or with grads = (d_out, dq, dk, dv) the backward)."""
    n = _agree_local(comm, q, run["threads"])
    try:
        names = ("q", "k", "v", "out") + (("d_out", "dq", "dk", "dv") if grads is not None else ())
        arrays = (q, k, v, out) + (tuple(grads) if grads is not None else ())
        ops = [_operand(name, x, False) for name, x in zip(names, arrays)]
        kw = dict(as_bf16=any(flag for _, flag in ops), lse=None if lse is None else _operand_lse(lse),
                  threads=int(run["threads"]), mechanism=run["mechanism"], layout=run["layout"], chunks=int(run["chunks"]),
                  ulysses_degree=int(run.get("ulysses_degree", 0)),
                  n=n, **_spec_values(spec["scale"], spec["causal"], spec["sink_logits"], spec["rope"]))
        if spec["mask"] is not None or spec["score"] is not None:
            kw.update(_lowered(spec["mask"], spec["score"], Grid(q.shape[0], q.shape[2], n, n)))
        if grads is not None:
            kw.update(zip(("d_out", "dq", "dk", "dv"), (x for x, _ in ops[4:])))
    except Exception as e:  # noqa: BLE001
        _C.dist_fail(comm.py2f(), str(e))  # the other ranks' calls fail with this message
        raise
    return _C.dist_attention(comm.py2f(), *(x for x, _ in ops[:4]), **kw)


def attention(q, k, v, comm=None, *, mechanism="auto", layout="contiguous", chunks=0, scale=None, causal=False,
              mask=None, score=None, sink_logits=None, rope=None, return_lse=False, return_report=False, threads=0,
              ulysses_degree=0):
    """omniattn::dist::attention over a communicator (default MPI.COMM_WORLD), collective.

    mechanism   "auto" (the planner: fewest bytes per rank), "ring", "token_ring", "ulysses", "allgather" or
                "hybrid" (USP: Ulysses inside groups of ulysses_degree consecutive ranks, 0 = the largest that
                divides the ranks and both head counts, ring across the groups)
    layout      "contiguous" or "zigzag" (load-balanced causal sharding); chunks: C (0 = P or 2P)
    scale, causal, mask, score, sink_logits, rope: attention()'s, for the GLOBAL problem (positions are global; mask
                and score tables are [batch, heads_q, N, N] with N the sum of the ranks' shard lengths)
    Returns out ([batch, local_seq, heads_q, dim_v], q's framework and dtype), then lse (float32 [batch, heads_q,
    local_seq]) with return_lse, then the report (dict: mechanism, reasons, bytes, seconds...) with return_report.
    A P-process run is bitwise identical to the same problem on one process with the same chunks and layout.

    Autograd: when torch records gradients and q, k or v requires grad, the call is a torch.autograd.Function whose
    backward is attention_backward below (every rank must then run its backward: it is collective too). The
    mechanism of the backward is the planner's ("auto"), or the requested one where the backward has it (ring,
    ulysses). Sink logits, ALiBi slopes and score tables are constants.
    """
    _require()
    comm = _world(comm)
    spec = dict(scale=scale, causal=causal, mask=mask, score=score, sink_logits=sink_logits, rope=rope)
    run = dict(mechanism=mechanism, layout=layout, chunks=chunks, threads=threads, ulysses_degree=ulysses_degree)
    torch = torch_module()
    if torch is not None and torch.is_grad_enabled() and any(is_torch(t) and t.requires_grad for t in (q, k, v)):
        held = []  # the forward's report (an autograd Function returns tensors only)
        out, lse = _function().apply(comm, spec, run, held, q, k, v)
        report = held[0]
    else:
        out = _empty(q, tuple(q.shape[:-1]) + (v.shape[-1],))
        lse = _empty(q, (q.shape[0], q.shape[2], q.shape[1]), "float32") if return_lse else None
        report = _call(comm, q, k, v, out, lse, spec, run)
    result = (out,) + ((lse,) if return_lse else ()) + ((report,) if return_report else ())
    return result[0] if len(result) == 1 else result


def attention_backward(q, k, v, out, lse, d_out, comm=None, *, mechanism="auto", layout="contiguous", chunks=0,
                       scale=None, causal=False, mask=None, score=None, sink_logits=None, rope=None,
                       return_report=False, threads=0):
    """omniattn::dist::attention_backward, collective: this rank's shards (dq, dk, dv) of the gradients of a loss
    through out = attention(q, k, v, comm, ...) given d_out = dL/d out. out and lse are what attention(...,
    return_lse=True) returned on this rank; every other argument must be the forward's. mechanism: "auto" (ring or
    Ulysses, the fewest bytes per rank), "ring" or "ulysses". The gradients are new arrays of q's, k's and v's shapes
    and dtypes in their framework; with GQA, dk and dv hold the sums over each kv head's query heads. P processes
    give the bits of one (same chunks and layout). Returns (dq, dk, dv), then the report with return_report."""
    _require()
    comm = _world(comm)
    dq, dk, dv = (_empty(x, tuple(x.shape)) for x in (q, k, v))
    spec = dict(scale=scale, causal=causal, mask=mask, score=score, sink_logits=sink_logits, rope=rope)
    run = dict(mechanism=mechanism, layout=layout, chunks=chunks, threads=threads)
    report = _call(comm, q, k, v, out, lse, spec, run, grads=(d_out, dq, dk, dv))
    return (dq, dk, dv, report) if return_report else (dq, dk, dv)


_FUNCTION = []


def _function():
    """The torch.autograd.Function of dist.attention(), made on first use (torch is optional)."""
    if _FUNCTION:
        return _FUNCTION[0]
    torch = torch_module()
    from torch.autograd.function import once_differentiable

    class DistAttentionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, comm, spec, run, held, q, k, v):
            out = torch.empty(tuple(q.shape[:-1]) + (v.shape[-1],), dtype=q.dtype)
            lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
            held.append(_call(comm, q, k, v, out, lse, spec, run))
            ctx.comm, ctx.spec = comm, spec
            # The backward takes the forward's mechanism where it has it, else the planner's.
            ctx.run = {key: value for key, value in run.items() if key != "ulysses_degree"}
            ctx.run["mechanism"] = run["mechanism"] if run["mechanism"] in ("ring", "ulysses") else "auto"
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        @once_differentiable
        def backward(ctx, d_out, d_lse):
            q, k, v, out, lse = ctx.saved_tensors
            d_out = d_out.contiguous() if d_out is not None else torch.zeros_like(out)
            s = ctx.spec
            dq, dk, dv = attention_backward(q, k, v, out, lse, d_out, ctx.comm, **ctx.run, **s)
            return None, None, None, None, dq, dk, dv

    _FUNCTION.append(DistAttentionFunction)
    return DistAttentionFunction
