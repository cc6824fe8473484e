"""omniattn.attention_backward on numpy arrays: against torch's autograd of plain torch attention math (float32 CPU
kernel, float64 oracle), output buffers, explain(backward=True), and the backward's errors from the C++ checks."""

import numpy as np
import pytest

import omniattn
from omniattn import scores

from _helpers import math_attention

# float32 CPU kernel gradients against float64 torch math: unit-normal inputs, rows of <= 16 keys, gradients O(1).
GRAD_TOL = dict(atol=2e-4, rtol=1e-4)


def bhsd(x):
    """A bshd numpy array as a contiguous float64 bhsd torch leaf that requires grad."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).double().requires_grad_()


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_matches_torch_autograd(rng, layout):
    torch = pytest.importorskip("torch")
    shapes = [(2, 4, 7, 8), (2, 2, 11, 8), (2, 2, 11, 6)]  # bhsd memory
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    if layout == "bshd":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # bshd views of bhsd memory: any strides
    sinks = np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32)
    d_out = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)  # bhsd
    if layout == "bshd":
        d_out = np.ascontiguousarray(d_out.transpose(0, 2, 1, 3))
    kw = dict(causal=True, sink_logits=sinks, score=scores.softcap(3.0), layout=layout)
    out, lse = omniattn.attention(q, k, v, return_lse=True, **kw)
    dq, dk, dv, d_sink = omniattn.attention_backward(q, k, v, out, lse, d_out, return_d_sink=True, backend="cpu", **kw)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in (dq, dk, dv, d_sink))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and d_sink.shape == (4,)

    to_bhsd = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(0, 2, 1, 3))
    leaves = [torch.from_numpy(np.ascontiguousarray(to_bhsd(x))).double().requires_grad_() for x in (q, k, v)]
    ts = torch.from_numpy(sinks).double().requires_grad_()
    want_out = math_attention(*leaves, causal="bottom_right", sinks=ts, score=lambda s, h, i, j: 3.0 * torch.tanh(s / 3.0))
    (want_out * torch.from_numpy(to_bhsd(d_out).copy()).double()).sum().backward()
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(torch.from_numpy(to_bhsd(got).copy()).double(), leaf.grad, **GRAD_TOL)
        assert leaf.grad.abs().max() > 0.05  # a real gradient
    torch.testing.assert_close(torch.from_numpy(d_sink).double(), ts.grad, **GRAD_TOL)


def test_float64_reference_and_output_buffers(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (rng.standard_normal(s) for s in ((1, 5, 2, 4), (1, 6, 1, 4), (1, 6, 1, 3)))  # GQA, float64
    d_out = rng.standard_normal((1, 5, 2, 3))
    out, lse = omniattn.attention(q, k, v, return_lse=True)
    assert out.dtype == np.float64 and lse.dtype == np.float32
    dq = np.full((1, 2, 5, 4), np.nan).transpose(0, 2, 1, 3)  # written through its strides
    got = omniattn.attention_backward(q, k, v, out, lse, d_out, dq=dq)
    assert got[0] is dq and not np.isnan(dq).any() and got[1].dtype == np.float64
    leaves = [bhsd(x) for x in (q, k, v)]
    (math_attention(*leaves) * torch.from_numpy(d_out.transpose(0, 2, 1, 3))).sum().backward()
    for g, t in zip(got, leaves):  # float64 storage through the float64 oracle: round-off only
        np.testing.assert_allclose(g, t.grad.numpy().transpose(0, 2, 1, 3), atol=1e-12, rtol=1e-12)


def test_bias_gradient(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (rng.standard_normal((1, 6, 2, 4)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((1, 2, 1, 6)).astype(np.float32)  # per key and head, broadcast over queries
    d_out = rng.standard_normal((1, 6, 2, 4)).astype(np.float32)
    out, lse = omniattn.attention(q, k, v, return_lse=True, score=bias)
    dq, dk, dv, d_bias = omniattn.attention_backward(q, k, v, out, lse, d_out, score=bias, return_d_bias=True)
    assert d_bias.shape == (1, 2, 1, 6) and d_bias.dtype == np.float32
    leaves = [bhsd(x) for x in (q, k, v)]
    tb = torch.from_numpy(bias).double().requires_grad_()
    (math_attention(*leaves, score=lambda s, h, i, j: s + tb) * bhsd(d_out).detach()).sum().backward()
    torch.testing.assert_close(torch.from_numpy(d_bias).double(), tb.grad, **GRAD_TOL)  # summed over the queries
    torch.testing.assert_close(torch.from_numpy(dq.transpose(0, 2, 1, 3).copy()).double(), leaves[0].grad, **GRAD_TOL)


def test_explain_backward(rng):
    q, k, v = (rng.standard_normal((1, 4, 2, 8)).astype(np.float32) for _ in range(3))
    assert omniattn.explain(q, k, v, backward=True).startswith("kernel: cpu.flash_bwd<f32>")
    text = omniattn.explain(*(x.astype(np.float64) for x in (q, k, v)), backward=True)
    assert text.startswith("kernel: reference")
    assert "f64 inputs run on the reference backend only" in text and "chosen as fallback" in text
    bias = np.zeros((1, 2, 4, 4), np.float32)
    text = omniattn.explain(q, k, v, backward=True, score=bias, return_d_bias=True)
    assert text.startswith("kernel: cpu.flash_bwd<f32>") and "dense bias gradient" in text
    # Broadcast over the heads of 2 kv heads, each bias entry has two writers: the kernel declines, the oracle serves it.
    text = omniattn.explain(q, k, v, backward=True, score=bias[:, :1], return_d_bias=True)
    assert text.startswith("kernel: reference") and "broadcast over the heads of several kv heads" in text


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.fixture
def call():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 9, 4, 8), (2, 5, 2, 8), (2, 5, 2, 6)))
    out, lse = omniattn.attention(q, k, v, return_lse=True)
    return q, k, v, out, lse, np.ones_like(out)


def test_backward_errors_name_the_argument(call):
    q, k, v, out, lse, d_out = call
    bwd = omniattn.attention_backward
    with pytest.raises(ValueError, match=r"^\[attention_backward\] d_out.seq 5 != out.seq 9$"):
        bwd(q, k, v, out, lse, d_out[:, :5])
    with pytest.raises(ValueError, match=r"^\[attention_backward\] d_out.dim 4 != out.dim 6$"):
        bwd(q, k, v, out, lse, d_out[..., :4])
    with pytest.raises(TypeError, match=r"^\[attention_backward\] d_out.type f16 must be q.type f32 or f32$"):
        bwd(q, k, v, out, lse, d_out.astype(np.float16))
    with pytest.raises(ValueError, match=r"^\[attention_backward\] dk.heads 4 != k.heads 2$"):
        bwd(q, k, v, out, lse, d_out, dk=np.empty((2, 5, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"^omniattn: d_out must be 4-d"):
        bwd(q, k, v, out, lse, d_out[0])
    with pytest.raises(TypeError, match=r"^omniattn: lse has dtype float64, expected float32$"):
        bwd(q, k, v, out, lse.astype(np.float64), d_out)
    with pytest.raises(ValueError, match=r"^\[attention_backward\] gradients.d_sink_logits is set but spec.sink_logits is not$"):
        bwd(q, k, v, out, lse, d_out, return_d_sink=True)
    with pytest.raises(ValueError, match=r"^\[attention_backward\] gradients.d_bias is set but spec.score has no bias tensor"):
        bwd(q, k, v, out, lse, d_out, return_d_bias=True, score=scores.softcap(5.0))
    with pytest.raises(ValueError, match=r"^\[attention_backward\] no cpu kernel fits:\n  cpu.flash_bwd<f64>: not used: "
                                         r"f64 inputs run on the reference backend only"):
        q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
        o64, l64 = omniattn.attention(q64, k64, v64, return_lse=True)
        bwd(q64, k64, v64, o64, l64, d_out.astype(np.float64), backend="cpu")
    ro = out.copy()
    ro.flags.writeable = False  # out is read by the backward, not written
    assert bwd(q, k, v, ro, lse, d_out)[0].shape == q.shape
    with pytest.raises(ValueError, match="dq is read-only"):
        dq = np.empty_like(q)
        dq.flags.writeable = False
        bwd(q, k, v, out, lse, d_out, dq=dq)
