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
from ._core import _check_run_options, _empty, _lowered, _operand, _operand_lse, _spec_values
from .masks import Grid

__all__ = ["attention", "rank_chunks", "shard_rows", "available"]


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


def attention(q, k, v, comm=None, *, mechanism="auto", layout="contiguous", chunks=0, scale=None, causal=False,
              mask=None, score=None, sink_logits=None, rope=None, return_lse=False, return_report=False, threads=0):
    """omniattn::dist::attention over a communicator (default MPI.COMM_WORLD), collective.

    mechanism   "auto" (the planner: fewest bytes per rank), "ring", "token_ring", "ulysses" or "allgather"
    layout      "contiguous" or "zigzag" (load-balanced causal sharding); chunks: C (0 = P or 2P)
    scale, causal, mask, score, sink_logits, rope: attention()'s, for the GLOBAL problem (positions are global; mask
                and score tables are [batch, heads_q, N, N] with N the sum of the ranks' shard lengths)
    Returns out ([batch, local_seq, heads_q, dim_v], q's framework and dtype), then lse (float32 [batch, heads_q,
    local_seq]) with return_lse, then the report (dict: mechanism, reasons, bytes, seconds...) with return_report.
    A P-process run is bitwise identical to the same problem on one process with the same chunks and layout.
    """
    _require()
    comm = _world(comm)
    # Every rank takes the same collective steps, also when this rank's arguments are wrong: local problems are
    # agreed on first (a rank raising alone would leave the others waiting in MPI).
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
    n = comm.allreduce(seq)  # the global length the tables are lowered for
    try:
        out = _empty(q, tuple(q.shape[:-1]) + (v.shape[-1],))
        lse = _empty(q, (q.shape[0], q.shape[2], q.shape[1]), "float32") if return_lse else None
        (op_q, bf_q), (op_k, bf_k), (op_v, bf_v), (op_o, bf_o) = (_operand("q", q, False), _operand("k", k, False),
                                                                  _operand("v", v, False), _operand("out", out, False))
        kw = dict(as_bf16=bf_q or bf_k or bf_v or bf_o, lse=None if lse is None else _operand_lse(lse),
                  threads=int(threads), mechanism=mechanism, layout=layout, chunks=int(chunks), n=n,
                  **_spec_values(scale, causal, sink_logits, rope))
        if mask is not None or score is not None:
            kw.update(_lowered(mask, score, Grid(q.shape[0], q.shape[2], n, n)))
    except Exception as e:  # noqa: BLE001
        _C.dist_fail(comm.py2f(), str(e))  # the other ranks' calls fail with this message
        raise
    report = _C.dist_attention(comm.py2f(), op_q, op_k, op_v, op_o, **kw)
    result = (out,) + ((lse,) if return_lse else ()) + ((report,) if return_report else ())
    return result[0] if len(result) == 1 else result
