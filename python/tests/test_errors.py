"""Every error path: the library's own message (ValueError, TypeError for dtypes), or the binding's."""

import re

import numpy as np
import pytest

import omniattn
from omniattn import masks, scores

from _helpers import qkv


@pytest.fixture
def data(rng):
    return qkv(rng)  # q [2, 9, 4, 16], k [2, 13, 2, 16], v [2, 13, 2, 8]


def raises(exc, message, *args, **kwargs):
    """The exact message, start to end."""
    with pytest.raises(exc) as info:
        omniattn.attention(*args, **kwargs)
    assert str(info.value) == message
    return info


# --- the C++ library's validation, passed through verbatim ----------------------------------------------------------


def test_shape_mismatches(data):
    q, k, v = data
    raises(ValueError, "[attention] k.dim 8 != q.dim 16", q, k[..., :8], v)
    raises(ValueError, "[attention] k.batch 1 != q.batch 2", q, k[:1], v[:1])
    raises(ValueError, "[attention] v.seq 12 != k.seq 13", q, k, v[:, :12])
    raises(ValueError, "[attention] v.heads 1 != k.heads 2", q, k, v[:, :, :1])
    raises(ValueError, "[attention] q.heads 3 is not a multiple of k.heads 2", q[:, :, :3], k, v)
    raises(ValueError, "[attention] q.dim 0 must be > 0", q[..., :0], k[..., :0], v)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_length(data, backend):
    """Empty calls are valid, as in PyTorch SDPA and FlashAttention's varlen: no queries (or batch / heads 0) is a
    no-op; no keys gives rows with nothing to attend to: out 0, lse -inf."""
    q, k, v = data
    for qq, kk, vv, shape in ((q[:, :0], k, v, (2, 0, 4, 8)), (q[:0], k[:0], v[:0], (0, 9, 4, 8)),
                              (q[:, :, :0], k[:, :, :0], v[:, :, :0], (2, 9, 0, 8))):
        out, lse = omniattn.attention(qq, kk, vv, backend=backend, return_lse=True)
        assert out.shape == shape and lse.size == 0
    out, lse = omniattn.attention(q, k[:, :0], v[:, :0], backend=backend, return_lse=True, causal=True,
                                  mask=masks.sliding_window(3))
    assert out.shape == (2, 9, 4, 8) and not out.any() and np.all(lse == -np.inf)
    out, lse = omniattn.attention(q, k[:, :0], v[:, :0], backend=backend, return_lse=True,
                                  sink_logits=np.array([0.5, 1, 2, 3], np.float32))
    assert not out.any() and np.array_equal(lse[0, :, 0], [0.5, 1, 2, 3])
    # varlen with repeated offsets: sequence 0 has no keys, sequence 1 no queries.
    qv, kv_, vv = q[0], k[0], v[0]
    cu_q, cu_k = [0, 4, 4, 9], [0, 0, 6, 13]
    out, lse = omniattn.attention(qv, kv_, vv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend, return_lse=True)
    assert not out[:4].any() and np.all(lse[:, :4] == -np.inf)
    ref = omniattn.reference_attention(qv[None, 4:], kv_[None, 6:], vv[None, 6:])
    np.testing.assert_allclose(out[None, 4:], ref, atol=1e-5)
    bm = omniattn.build_block_mask(None, 2, 4, 9, 0)
    assert bm.kinds.shape == (1, 1, 1, 0)


def test_out_mismatches(data):
    q, k, v = data
    raises(ValueError, "[attention] out.seq 8 != q.seq 9", q, k, v, out=np.empty((2, 8, 4, 8), np.float32))
    raises(ValueError, "[attention] out.dim 16 != v.dim 8", q, k, v, out=np.empty((2, 9, 4, 16), np.float32))
    raises(TypeError, "[attention] out.type f16 must be q.type f32 or f32", q, k, v,
           out=np.empty((2, 9, 4, 8), np.float16))
    overlapping = np.lib.stride_tricks.as_strided(np.empty(64, np.float32), (2, 9, 4, 8), (0, 0, 0, 4))
    with pytest.raises(ValueError, match=r"^\[attention\] out\.stride_.* makes the output overlap itself"):
        omniattn.attention(q, k, v, out=overlapping)


def test_out_aliases_input(rng):
    buf = rng.standard_normal((2, 9, 4, 16)).astype(np.float32)
    q = buf
    k = v = buf[:, :, :2]
    raises(ValueError, "[attention] out aliases q: the output must not overlap an input", q, k, v, out=buf)


def test_out_aliases_a_spec_input(data):
    """Buffers the spec borrows without a copy (sink logits, a float32 score bias, a boolean mask table) are inputs
    too: an output over them is rejected before anything is written."""
    q, k, v = data
    out = np.zeros((2, 9, 4, 8), np.float32)
    raises(ValueError, "[attention] out aliases spec.sink_logits: the output must not overlap an input", q, k, v,
           out=out, sink_logits=out.reshape(-1)[:4])
    raises(ValueError, "[attention] out aliases spec.score bias: the output must not overlap an input", q, k, v,
           out=out, score=scores.bias(out.reshape(-1)[-13:].reshape(1, 1, 1, 13)))
    table = out.reshape(-1).view(np.bool_)[:9 * 13].reshape(1, 1, 9, 13)
    with pytest.raises(ValueError, match=r"^\[attention\] out aliases spec.mask dense '.*': the output must not "
                                         r"overlap an input$"):
        omniattn.attention(q, k, v, out=out, mask=table)
    assert not out.any()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_negative_strides(data, backend):
    """numpy views with negative strides are read (and out written) in place, zero-copy, on every axis."""
    q, k, v = data
    for index in ((slice(None, None, -1),), (slice(None), slice(None, None, -1)), (Ellipsis, slice(None, None, -1), slice(None)),
                  (Ellipsis, slice(None, None, -1))):
        qf, kf, vf = q[index], k[index], v[index]
        assert qf.strides != q.strides
        out = np.zeros_like(q[..., :8])[index]
        got, lse = omniattn.attention(qf, kf, vf, out=out, causal=True, backend=backend, return_lse=True)
        assert got is out
        want, want_lse = omniattn.reference_attention(np.ascontiguousarray(qf), np.ascontiguousarray(kf),
                                                      np.ascontiguousarray(vf), causal=True, return_lse=True)
        np.testing.assert_allclose(out, want, atol=1e-5)
        np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    described = omniattn._omniattn.describe(q[:, ::-1])
    assert described["data"] == q[:, ::-1].__array_interface__["data"][0] and described["strides"][1] == -64


def _at_offset(a, offset):
    """A copy of `a` whose data starts `offset` bytes into a fresh byte buffer (numpy allows unaligned arrays)."""
    buf = np.zeros(a.nbytes + 8, np.uint8)
    view = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)
    view[...] = a
    return view


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_unaligned_arrays(data, backend):
    """bf16 / f16 arrays at odd addresses are read in place and give the aligned result bit for bit; misaligned
    float32 is rejected with a clear error."""
    q, k, v = data
    for conv, kw in ((omniattn.to_bf16, {"dtype": "bf16"}), (lambda x: x.astype(np.float16), {})):
        qa, ka, va = conv(q), conv(k), conv(v)
        qo, ko, vo = (_at_offset(x, 1) for x in (qa, ka, va))
        assert not qo.flags.aligned and qo.__array_interface__["data"][0] % 2 == 1
        out = _at_offset(np.zeros_like(qa[..., :8]), 3)
        omniattn.attention(qo, ko, vo, out=out, backend=backend, causal=True, **kw)
        want = omniattn.attention(qa, ka, va, backend=backend, causal=True, **kw)
        assert np.array_equal(out.view(np.uint16), want.view(np.uint16))
    with pytest.raises(ValueError, match=r"^\[attention\] q.data 0x[0-9a-f]+ is not aligned to its 4-byte f32 elements$"):
        omniattn.attention(_at_offset(q, 2), k, v, backend=backend)


def test_dtype_mismatch_is_type_error(data):
    q, k, v = data
    raises(TypeError, "[attention] k.type f16 != q.type f32", q, k.astype(np.float16), v.astype(np.float16))


def test_spec_and_options(data):
    q, k, v = data
    raises(ValueError, "[attention] spec.scale inf must be finite", q, k, v, scale=float("inf"))
    raises(ValueError, "[attention] options.threads -1 must be >= 0 (0 = all cores)", q, k, v, threads=-1)
    with pytest.raises(ValueError, match=r"^\[attention\] options.threads 1024 must be <= \d+ \(4 x the \d+ processors, "
                                         r"at least 8\)$"):
        omniattn.attention(q, k, v, threads=1024)
    with pytest.raises(ValueError, match=r"^\[attention\] spec\.mask document: offsets must start at 0$"):
        omniattn.attention(q, k, v, mask=masks.document([1, 5, 13]))


def test_varlen_errors(rng):
    q, k, v = (rng.standard_normal((10, 2, 8)).astype(np.float32) for _ in range(3))
    raises(ValueError, "[attention] varlen.cu_seqlens_q[2] 9 != total tokens 10", q, k, v,
           cu_seqlens_q=[0, 4, 9], cu_seqlens_k=[0, 4, 10])
    raises(ValueError, "[attention] varlen.cu_seqlens_k[2] 3 < [1] 4: must be non-decreasing", q, k, v,
           cu_seqlens_q=[0, 4, 10], cu_seqlens_k=[0, 4, 3])
    raises(ValueError, "omniattn: pass both cu_seqlens_q and cu_seqlens_k, or neither", q, k, v, cu_seqlens_q=[0, 10])
    raises(ValueError, "omniattn: cu_seqlens_q and cu_seqlens_k must both have num_seqs + 1 >= 2 entries, got 2 and 3",
           q, k, v, cu_seqlens_q=[0, 10], cu_seqlens_k=[0, 5, 10])
    with pytest.raises(ValueError, match="must be 3-d"):
        omniattn.attention(q[None], k[None], v[None], cu_seqlens_q=[0, 10], cu_seqlens_k=[0, 10])


def test_cu_seqlens_must_be_integers(rng):
    # Floats used to be truncated: [0, 4.7, 10] ran as [0, 4, 10].
    q, k, v = (rng.standard_normal((10, 2, 8)).astype(np.float32) for _ in range(3))
    want = ("omniattn: cu_seqlens_q has dtype float64; cumulative sequence lengths must be integers "
            "(e.g. int32 or int64)")
    raises(TypeError, want, q, k, v, cu_seqlens_q=[0, 4.7, 10], cu_seqlens_k=[0, 4, 10])
    raises(TypeError, want, q, k, v, cu_seqlens_q=np.array([0.0, 4.0, 10.0]), cu_seqlens_k=[0, 4, 10])
    raises(TypeError, want.replace("_q has dtype float64", "_k has dtype float32"), q, k, v, cu_seqlens_q=[0, 4, 10],
           cu_seqlens_k=np.array([0, 4, 10], dtype=np.float32))
    raises(TypeError, want.replace("float64", "bool"), q, k, v, cu_seqlens_q=np.array([False, True]),
           cu_seqlens_k=[0, 10])
    raises(ValueError, "omniattn: cu_seqlens_q must be 1-d, got 2 dimensions", q, k, v,
           cu_seqlens_q=np.array([[0, 4, 10]]), cu_seqlens_k=[0, 4, 10])
    with pytest.raises(TypeError, match="^omniattn: cu_seqlens_k has dtype float64; cumulative"):
        omniattn.build_block_mask(None, 2, 2, 6, 6, cu_seqlens_q=[0, 4, 10], cu_seqlens_k=[0.0, 4.0, 10.0])
    # Every integer dtype is accepted, and gives the int64 result.
    for dt in (np.int32, np.int64, np.uint16, np.int8):
        cu = np.array([0, 4, 10], dtype=dt)
        np.testing.assert_array_equal(omniattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu),
                                      omniattn.attention(q, k, v, cu_seqlens_q=[0, 4, 10], cu_seqlens_k=[0, 4, 10]))


# --- dtypes -----------------------------------------------------------------------------------------------------------


def test_unsupported_numpy_dtypes(data):
    q, k, v = data
    with pytest.raises(TypeError, match="q has dtype int16; supported: float32, float16, and bfloat16"):
        omniattn.attention(q.astype(np.int16), k, v)
    with pytest.raises(TypeError, match=r"^\[attention\] k.type f32 != q.type f64$"):  # float64 is one (reference backend)
        omniattn.attention(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="k has dtype int32"):
        omniattn.attention(q, k.astype(np.int32), v)
    with pytest.raises(TypeError, match="pass dtype='bf16'"):
        omniattn.attention(*(x.view(np.uint16)[..., ::2] for x in data))
    with pytest.raises(TypeError, match="has dtype >f4"):
        omniattn.attention(q.astype(">f4"), k, v)


def test_unsupported_torch_dtypes(data):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x) for x in data)
    with pytest.raises(TypeError, match=r"q has dtype torch.int32; supported: torch.float32, torch.bfloat16"):
        omniattn.attention(q.int(), k, v)
    with pytest.raises(TypeError, match="v has dtype torch.int64"):
        omniattn.attention(q, k, v.long())
    with pytest.raises(TypeError, match=r"^\[attention\] k.type bf16 != q.type f32$"):
        omniattn.attention(q, k.bfloat16(), v.bfloat16())


def test_binding_rejects_other_formats_too(data):
    # The C++ side checks formats on its own, whatever the Python layer lets through.
    q, k, v = data
    from omniattn import _omniattn as C
    with pytest.raises(TypeError, match="q has dtype format 'h'"):
        C.call("run", q.astype(np.int16), k, v, np.empty((2, 9, 4, 8), np.float32))
    with pytest.raises(TypeError, match="must be a numpy array or a torch tensor, not int"):
        C.call("run", 3, k, v, np.empty((2, 9, 4, 8), np.float32))


def test_bad_arguments(data):
    q, k, v = data
    with pytest.raises(TypeError, match="q must be a numpy array or a torch tensor, not list"):
        omniattn.attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match=r"q must be 4-d \[batch, seq, heads, dim\] for layout='bshd'"):
        omniattn.attention(q[0], k, v)
    with pytest.raises(ValueError, match="layout must be"):
        omniattn.attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="backend must be"):
        omniattn.attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="causal must be"):
        omniattn.attention(q, k, v, causal="left")
    with pytest.raises(ValueError, match="dtype must be None or 'bf16'"):
        omniattn.attention(q, k, v, dtype="f8")
    with pytest.raises(ValueError, match="out is read-only"):
        out = np.empty((2, 9, 4, 8), np.float32)
        out.flags.writeable = False
        omniattn.attention(q, k, v, out=out)


def test_mask_errors(data):
    q, k, v = data
    with pytest.raises(ValueError, match=r"mask array\(3, 5\) of shape \(3, 5\) does not broadcast to .* \(2, 4, 9, 13\)"):
        omniattn.attention(q, k, v, mask=np.ones((3, 5), dtype=bool))
    with pytest.raises(TypeError, match="mask array must be boolean"):
        omniattn.attention(q, k, v, mask=np.ones((9, 13), dtype=np.float32))
    with pytest.raises(TypeError, match="mask <lambda> gave float64 values, expected bool"):
        omniattn.attention(q, k, v, mask=lambda b, h, i, j: (i - j) * 1.0)
    with pytest.raises(TypeError, match="a mask must be"):
        omniattn.attention(q, k, v, mask=3.5)
    with pytest.raises(ValueError, match=r"\[spec\] at 0: unknown pattern 'causl'"):
        omniattn.attention(q, k, v, mask="causl")
    with pytest.raises(ValueError, match="align must be"):
        masks.causal("left")
    with pytest.raises(TypeError, match="left must be an int"):
        masks.sliding_window(2.5)


def test_scalars_out_of_float_range(data):
    """Finite as float64 but not as float32 (the kernels' precision): rejected instead of a silent 0 / -inf."""
    q, k, v = data
    raises(ValueError, "[attention] spec.scale 1e+39 is out of float range (|scale| * log2(e) must be <= 3.40282e+38)",
           q, k, v, scale=1e39)
    for text, message in (("softcap(1e39)", "cap must be in float range"), ("temperature(1e-40)", "1 / t must be a finite float")):
        with pytest.raises(ValueError, match=r"^\[spec\] at \d+: \[scores::\w+\] " + re.escape(message)):
            omniattn.attention(q, k, v, score=text)
    with pytest.raises(ValueError, match=r"^\[scores::softcap\] cap must be in float range"):
        omniattn.attention(q, k, v, score=scores.softcap(1e39))
    with pytest.raises(ValueError, match=r"^\[attention\] spec.sink_logits\[1\] 3e\+38 must be finite"):
        omniattn.attention(q, k, v, sink_logits=np.array([0, 3e38, 0, 0], np.float32))


def test_score_errors(data):
    q, k, v = data
    with pytest.raises(ValueError, match="score function <lambda> is not affine in s"):
        omniattn.attention(q, k, v, score=lambda s, b, h, i, j: s * s)
    with pytest.raises(ValueError, match="softcap cap must be a finite number > 0"):
        scores.softcap(0)
    with pytest.raises(ValueError, match=r"alibi slopes has 3 values for 4 query heads \(give 1 or one per head\)"):
        omniattn.attention(q, k, v, score=scores.alibi([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"does not broadcast to \[batch, heads, seq_q, seq_k\]"):
        omniattn.attention(q, k, v, score=np.zeros((9, 12)))
    with pytest.raises(TypeError, match="only additive score modifiers add"):
        scores.softcap(3.0) + scores.alibi([1.0])
    with pytest.raises(ValueError, match="alibi slopes is empty"):
        scores.alibi([])
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        scores.temperature([1.0, 0.0])


def test_block_mask_errors(data):
    q, k, v = data
    bm = omniattn.build_block_mask(masks.causal(), 2, 4, 9, 14, q_tile=4, kv_tile=4)
    with pytest.raises(ValueError, match=r"block_mask was built for \[batch, heads, seq_q, seq_k\] = \(2, 4, 9, 14\)"):
        omniattn.attention(q, k, v, block_mask=bm)
    bm = omniattn.build_block_mask(masks.causal(), 2, 4, 9, 13, q_tile=8, kv_tile=8)
    with pytest.raises(ValueError, match=r"^\[attention\] spec.blocks.batch 3 must be 1 or 2$"):
        bad = omniattn.BlockMask.from_kinds(np.full((3, 1, 2, 2), 2), 8, 8)
        omniattn.attention(q, k, v, block_mask=bad)
    with pytest.raises(ValueError, match=r"^\[attention\] spec.blocks.kv_tiles 3 != ceil\(seq_k 13 / kv_tile 8\) = 2$"):
        omniattn.attention(q, k, v, block_mask=omniattn.BlockMask.from_kinds(np.full((1, 1, 2, 3), 2), 8, 8))
    with pytest.raises(TypeError, match="block_mask must be an omniattn.BlockMask"):
        omniattn.attention(q, k, v, block_mask=np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="q_tile and kv_tile must be > 0"):
        omniattn.build_block_mask(masks.causal(), 2, 4, 9, 13, q_tile=0)


def test_block_mask_huge_tiles(data):
    """ceil(seq / tile) without overflow: a tile of 2^63 - 1 tokens is one tile, never zero tiles read past the end."""
    q, k, v = data
    huge = 2**63 - 1
    empty = omniattn.BlockMask.from_kinds(np.zeros((1, 1, 0, 2), np.uint8), huge, 8)
    with pytest.raises(ValueError, match=r"^\[attention\] spec.blocks.q_tiles 0 != ceil\(seq_q 9 / q_tile "
                                         r"9223372036854775807\) = 1$"):
        omniattn.attention(q, k, v, block_mask=empty)
    one = omniattn.BlockMask.from_kinds(np.full((1, 1, 1, 1), 2, np.uint8), huge, huge)
    np.testing.assert_allclose(omniattn.attention(q, k, v, block_mask=one), omniattn.reference_attention(q, k, v),
                               atol=1e-5)
    bm = omniattn.build_block_mask(masks.causal(), 2, 4, 9, 13, q_tile=huge, kv_tile=huge)
    assert bm.kinds.shape == (1, 1, 1, 1)
