"""omniattn.dist over mpi4py: shards of a global problem against the same problem on one process (bitwise, on
MPI.COMM_SELF) and against omniattn.attention on the whole problem (close). Runs in the plain pytest run (one
process) and under `mpiexec -n 2` / `-n 4` (CTest python_dist_np*): every rank runs the same tests in the same order,
so the collective calls line up."""

import numpy as np
import pytest

import omniattn
import omniattn.dist as dist

MPI = pytest.importorskip("mpi4py.MPI")
pytestmark = pytest.mark.skipif(not dist.available(), reason="built without MPI")

N, B, HQ, HKV, D = 67, 2, 4, 2, 8
# float32 blocks merged in float32 against one kernel call over all keys (|v| <= 1)
TOL = dict(atol=2e-5, rtol=0)


def global_problem(seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.uniform(-1, 1, (B, N, h, D)).astype(np.float32) for h in (HQ, HKV, HKV))
    return q, k, v


SPECS = {
    "full": dict(),
    "causal": dict(causal=True),
    "window | sinks": dict(mask=omniattn.masks.sliding_window(9) | omniattn.masks.sinks(2)),
    "document + alibi": dict(mask=omniattn.masks.document([0, 20, 21, N]), causal=True,
                             score=omniattn.scores.alibi(omniattn.scores.alibi_slopes(HQ))),
    "function mask + sinks": dict(mask=lambda b, h, q, k: (q - 2 * k + h) % 3 != 1,
                                  sink_logits=np.array([0.5, -0.2, 0.1, 1.0], dtype=np.float32)),
}


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("mechanism", ["ring", "token_ring", "ulysses", "allgather", "hybrid", "auto"])
def test_shards_are_one_process_bits_and_close_to_one_call(spec, layout, mechanism):
    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    if mechanism == "ulysses" and (HQ % P or HKV % P):
        pytest.skip(f"ulysses needs heads divisible by {P} ranks")
    chunks = 8 if layout == "zigzag" else 4
    if chunks % (2 * P if layout == "zigzag" else P):
        pytest.skip(f"{chunks} chunks do not split over {P} ranks")
    q, k, v = global_problem(5)
    kw = SPECS[spec]
    rows = dist.shard_rows(N, layout, chunks, comm)
    out, lse, report = dist.attention(q[:, rows], k[:, rows], v[:, rows], comm, mechanism=mechanism, layout=layout,
                                      chunks=chunks, return_lse=True, return_report=True, threads=1, **kw)
    if mechanism != "auto":
        assert report["mechanism"] == mechanism
    # The same problem on one process: every chunk local, in this layout's order for one rank.
    all_rows = dist.shard_rows(N, layout, chunks, MPI.COMM_SELF)
    one, one_lse = dist.attention(q[:, all_rows], k[:, all_rows], v[:, all_rows], MPI.COMM_SELF, mechanism=mechanism,
                                  layout=layout, chunks=chunks, return_lse=True, threads=1, **kw)
    where = np.empty(N, dtype=np.int64)
    where[all_rows] = np.arange(N)
    assert np.array_equal(out.view(np.uint32), one[:, where[rows]].view(np.uint32))
    assert np.array_equal(lse.view(np.uint32), one_lse[:, :, where[rows]].view(np.uint32))
    full, full_lse = omniattn.attention(q, k, v, return_lse=True, backend="cpu", threads=1, **kw)
    np.testing.assert_allclose(out, full[:, rows], **TOL)
    np.testing.assert_allclose(lse, full_lse[:, :, rows], **TOL)
    assert rank == comm.Get_rank()


def test_bad_arguments_raise_the_library_message():
    comm = MPI.COMM_WORLD
    q, k, v = global_problem(1)
    rows = dist.shard_rows(N, "contiguous", 0, comm)
    with pytest.raises(ValueError, match="mechanism must be"):
        dist.attention(q[:, rows], k[:, rows], v[:, rows], comm, mechanism="bogus")
    with pytest.raises(ValueError, match=r"\[dist::attention\] options.chunks 3 must be a positive multiple of"):
        dist.attention(q[:, rows], k[:, rows], v[:, rows], comm, layout="zigzag", chunks=3)
    with pytest.raises(ValueError, match=r"\[dist::attention\] rank 0: spec.scale inf must be finite"):
        dist.attention(q[:, rows], k[:, rows], v[:, rows], comm, scale=float("inf"))


def test_one_rank_with_bad_arguments_fails_every_rank():
    comm = MPI.COMM_WORLD
    last = comm.Get_rank() == comm.Get_size() - 1
    q, k, v = global_problem(3)
    rows = dist.shard_rows(N, "contiguous", 0, comm)
    # Caught in Python before any MPI call of the library ...
    with pytest.raises(ValueError, match="q must be"):
        dist.attention(q[0, rows] if last else q[:, rows], k[:, rows], v[:, rows], comm)
    # ... and in the translation after it (dtype), through the library's collective agreement.
    with pytest.raises((TypeError, ValueError), match="dtype int32"):
        dist.attention(q[:, rows].astype(np.int32) if last else q[:, rows], k[:, rows], v[:, rows], comm)
    # The communicator still works afterwards.
    out = dist.attention(q[:, rows], k[:, rows], v[:, rows], comm, causal=True)
    np.testing.assert_allclose(out, omniattn.attention(q, k, v, causal=True)[:, rows], **TOL)


def test_torch_shards():
    torch = pytest.importorskip("torch")
    comm = MPI.COMM_WORLD
    q, k, v = global_problem(2)
    rows = dist.shard_rows(N, "zigzag", 0, comm)
    out = dist.attention(*(torch.from_numpy(np.ascontiguousarray(x[:, rows])) for x in (q, k, v)), comm, layout="zigzag",
                         causal=True, threads=1)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), omniattn.attention(q, k, v, causal=True)[:, rows], **TOL)


BACKWARD_SPECS = ["full", "causal", "window | sinks", "document + alibi"]


@pytest.mark.parametrize("spec", BACKWARD_SPECS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("mechanism", ["ring", "ulysses", "auto"])
def test_backward_shards_are_one_process_bits_and_close_to_one_call(spec, layout, mechanism):
    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    if mechanism == "ulysses" and (HQ % P or HKV % P):
        pytest.skip(f"ulysses needs heads divisible by {P} ranks")
    q, k, v = global_problem(7)
    d_out = np.random.default_rng(8).uniform(-1, 1, (B, N, HQ, D)).astype(np.float32)
    kw = SPECS[spec]
    full, full_lse = omniattn.attention(q, k, v, return_lse=True, backend="cpu", threads=1, **kw)
    fdq, fdk, fdv = omniattn.attention_backward(q, k, v, full, full_lse, d_out, backend="cpu", threads=1, **kw)
    grads = {}
    chunks = 2 * P if layout == "zigzag" else P  # the P-process run's default, also on one process
    for name, c in (("p", comm), ("one", MPI.COMM_SELF)):
        rows = dist.shard_rows(N, layout, chunks, c)
        out, lse = dist.attention(q[:, rows], k[:, rows], v[:, rows], c, layout=layout, chunks=chunks,
                                  return_lse=True, threads=1, **kw)
        dq, dk, dv, report = dist.attention_backward(
            q[:, rows], k[:, rows], v[:, rows], out, lse, np.ascontiguousarray(d_out[:, rows]), c,
            mechanism=mechanism if c is comm else "ring", layout=layout, chunks=chunks, return_report=True,
            threads=1, **kw)
        if c is comm and mechanism != "auto":
            assert report["mechanism"] == mechanism
        grads[name] = (rows, dq, dk, dv)
    rows, dq, dk, dv = grads["p"]
    all_rows, odq, odk, odv = grads["one"]
    where = np.empty(N, dtype=np.int64)
    where[all_rows] = np.arange(N)
    for got, one, whole in ((dq, odq, fdq), (dk, odk, fdk), (dv, odv, fdv)):
        assert np.array_equal(got.view(np.uint32), one[:, where[rows]].view(np.uint32))
        # block sums in fp32 against one backward call: a few units of the largest gradient per chunk
        np.testing.assert_allclose(got, whole[:, rows], atol=16 * 4 * P * 1.2e-7 * max(1.0, np.abs(whole).max()), rtol=0)


def test_backward_refuses_mechanisms_it_does_not_have():
    comm = MPI.COMM_WORLD
    q, k, v = global_problem(4)
    rows = dist.shard_rows(N, "contiguous", 0, comm)
    out, lse = dist.attention(q[:, rows], k[:, rows], v[:, rows], comm, return_lse=True)
    with pytest.raises(ValueError, match=r"options.use token_ring: the backward runs on the ring or Ulysses"):
        dist.attention_backward(q[:, rows], k[:, rows], v[:, rows], out, lse, out.copy(), comm, mechanism="token_ring")


def test_torch_autograd_through_the_shards():
    torch = pytest.importorskip("torch")
    comm = MPI.COMM_WORLD
    q, k, v = global_problem(9)
    rows = dist.shard_rows(N, "zigzag", 0, comm)
    weight = np.random.default_rng(10).uniform(-1, 1, (B, N, HQ, D)).astype(np.float32)
    local = [torch.tensor(np.ascontiguousarray(x[:, rows]), requires_grad=True) for x in (q, k, v)]
    out = dist.attention(*local, comm, layout="zigzag", causal=True, threads=1)
    (out * torch.from_numpy(np.ascontiguousarray(weight[:, rows]))).sum().backward()
    # The same loss on one process, through omniattn.attention's own autograd.
    whole = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    (omniattn.attention(*whole, causal=True, threads=1) * torch.from_numpy(weight)).sum().backward()
    for mine, ref in zip(local, whole):
        np.testing.assert_allclose(mine.grad.numpy(), ref.grad.numpy()[:, rows], atol=2e-5, rtol=0)


def test_hybrid_groups_and_report():
    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    q, k, v = global_problem(11)
    rows = dist.shard_rows(N, "zigzag", 0, comm)
    for degree in [u for u in range(1, P + 1) if P % u == 0 and HQ % u == 0 and HKV % u == 0]:
        out, report = dist.attention(q[:, rows], k[:, rows], v[:, rows], comm, mechanism="hybrid", layout="zigzag",
                                     causal=True, ulysses_degree=degree, return_report=True, threads=1)
        assert report["mechanism"] == "hybrid"
        assert any(f"groups of {degree} ranks" in r and f"across {P // degree} groups" in r for r in report["reasons"])
        np.testing.assert_allclose(out, omniattn.attention(q, k, v, causal=True)[:, rows], **TOL)
    with pytest.raises(ValueError, match=r"options.ulysses_degree 3 must divide the"):
        dist.attention(q[:, rows], k[:, rows], v[:, rows], comm, mechanism="hybrid", layout="zigzag", ulysses_degree=3)
