"""torch in, torch out: against PyTorch math in float64 (1.13 has no F.scaled_dot_product_attention, so the reference
is softmax(q @ k^T * scale + mask) @ v computed with plain torch ops), dtype round trips, and the SDPA wrapper."""

import numpy as np
import pytest

import omniattn
from omniattn import masks

from _helpers import torch_ref

torch = pytest.importorskip("torch")

TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make(gen, b=2, hq=4, hkv=2, lq=9, lk=13, d=16, dv=8, dtype=torch.float32):
    """bhsd tensors."""
    return (torch.randn(b, hq, lq, d, generator=gen).to(dtype), torch.randn(b, hkv, lk, d, generator=gen).to(dtype),
            torch.randn(b, hkv, lk, dv, generator=gen).to(dtype))


@pytest.fixture
def gen(request):
    g = torch.Generator()
    g.manual_seed(sum(map(ord, request.node.name)))
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dtype_round_trip(gen, dtype, backend):
    q, k, v = make(gen, dtype=dtype)
    with torch.no_grad():
        out = omniattn.attention(q, k, v, layout="bhsd", backend=backend)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (2, 4, 9, 8)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk", [(9, 13), (13, 9), (65, 65)])
def test_causal(gen, align, lq, lk):
    q, k, v = make(gen, lq=lq, lk=lk)
    out = omniattn.attention(q, k, v, layout="bhsd", causal=align)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v, causal=align), atol=3e-5, rtol=0)


def test_bshd_layout(gen):
    q, k, v = (x.transpose(1, 2).contiguous() for x in make(gen))
    out = omniattn.attention(q, k, v, causal=True)
    assert out.shape == (2, 9, 4, 8)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v, causal="bottom_right", layout="bshd"), atol=3e-5, rtol=0)


def test_bool_mask_and_bias_tensors(gen):
    q, k, v = make(gen)
    allowed = torch.rand(2, 1, 9, 13, generator=gen) < 0.7
    bias = torch.randn(1, 4, 9, 13, generator=gen)
    out = omniattn.attention(q, k, v, layout="bhsd", mask=allowed, score=bias)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v, allowed=allowed, bias=bias), atol=3e-5, rtol=0)


def test_mask_pattern_on_torch(gen):
    q, k, v = make(gen, lq=20, lk=20)
    m = masks.sliding_window(5) | masks.sinks(2)
    out = omniattn.attention(q, k, v, layout="bhsd", mask=m)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v, allowed=torch.from_numpy(m.to_dense(1, 1, 20, 20))),
                               atol=3e-5, rtol=0)


def test_lse_is_torch(gen):
    q, k, v = make(gen)
    out, lse = omniattn.attention(q, k, v, layout="bhsd", return_lse=True)
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32 and lse.shape == (2, 4, 9)
    s = torch.matmul(q.double(), k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=0)


def test_inference_mode_tensors(gen):
    q, k, v = make(gen)
    with torch.inference_mode():
        out = omniattn.attention(q, k, v, layout="bhsd")
    torch.testing.assert_close(out.double(), torch_ref(q, k, v), atol=3e-5, rtol=0)


def test_requires_grad_records_the_call(gen):
    q, k, v = make(gen)
    q.requires_grad_(True)
    out = omniattn.attention(q, k, v, layout="bhsd")
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "AttentionFunctionBackward"
    with torch.no_grad():
        assert omniattn.attention(q, k, v, layout="bhsd").grad_fn is None  # nothing recorded without autograd
    torch.testing.assert_close(out.detach().double(), torch_ref(q, k, v), atol=3e-5, rtol=0)


def test_float64_runs_on_the_reference(gen):
    q, k, v = (x.double() for x in make(gen))
    out = omniattn.attention(q, k, v, layout="bhsd")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch_ref(q, k, v), atol=1e-13, rtol=0)
    with pytest.raises(ValueError, match="f64 inputs run on the reference backend only"):
        omniattn.attention(q, k, v, layout="bhsd", backend="cpu")


# --- scaled_dot_product_attention ----------------------------------------------------------------------------------


def test_sdpa_dense_and_scale(gen):
    q, k, v = make(gen, hkv=4)
    torch.testing.assert_close(omniattn.scaled_dot_product_attention(q, k, v).double(), torch_ref(q, k, v),
                               atol=3e-5, rtol=0)
    torch.testing.assert_close(omniattn.scaled_dot_product_attention(q, k, v, scale=0.7).double(),
                               torch_ref(q, k, v, scale=0.7), atol=3e-5, rtol=0)


def test_sdpa_is_causal_is_top_left(gen):
    q, k, v = make(gen, hkv=4, lq=5, lk=11)
    out = omniattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v, causal="top_left"), atol=3e-5, rtol=0)


def test_sdpa_bool_and_float_masks(gen):
    q, k, v = make(gen, hkv=4)
    keep = torch.rand(9, 13, generator=gen) < 0.6
    keep[:, 0] = True
    out = omniattn.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v, allowed=keep), atol=3e-5, rtol=0)
    additive = torch.randn(2, 4, 9, 13, generator=gen)
    out = omniattn.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v, bias=additive), atol=3e-5, rtol=0)


def test_sdpa_gqa(gen):
    q, k, v = make(gen, hq=8, hkv=2)
    out = omniattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out.double(), torch_ref(q, k, v), atol=3e-5, rtol=0)
    with pytest.raises(ValueError, match="enable_gqa"):
        omniattn.scaled_dot_product_attention(q, k, v)


def test_sdpa_three_d(gen):
    q, k, v = (x[:, 0] for x in make(gen, hkv=4))  # [N, L, E]
    out = omniattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (2, 9, 8)
    torch.testing.assert_close(out.double(), torch_ref(q[:, None], k[:, None], v[:, None], causal="top_left")[:, 0],
                               atol=3e-5, rtol=0)


def test_sdpa_numpy(gen):
    q, k, v = (x.numpy() for x in make(gen, hkv=4))
    out = omniattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, torch_ref(*(torch.from_numpy(x) for x in (q, k, v)), causal="top_left").numpy(),
                               atol=3e-5)


def test_sdpa_errors(gen):
    q, k, v = make(gen, hkv=4)
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        omniattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="not both"):
        omniattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(9, 13, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="boolean or floating"):
        omniattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(9, 13, dtype=torch.int32))
