"""Nothing is copied: the binding sees the caller's pointers and strides, and writes `out` in place."""

import numpy as np
import pytest

import omniattn
from omniattn import _omniattn as C

from _helpers import qkv, ref_attention, torch_or_skip


def test_binding_sees_numpy_strides_in_elements():
    base = np.zeros((2, 4, 6, 8), dtype=np.float32)  # bhsd memory
    view = base.transpose(0, 2, 1, 3)  # as bshd, non-contiguous
    d = C.describe(view)
    assert d["data"] == base.ctypes.data
    assert d["dtype"] == "float32"
    assert d["shape"] == [2, 6, 4, 8]
    assert d["strides"] == [4 * 6 * 8, 8, 6 * 8, 1]
    sub = base[1, ::2, 3:, 1::3]
    d = C.describe(sub)
    assert d["data"] == sub.ctypes.data
    assert d["strides"] == [2 * 6 * 8, 8, 3]
    bcast = np.broadcast_to(base[:1], (5, 4, 6, 8))
    assert C.describe(bcast)["strides"][0] == 0


def test_transposed_inputs_read_in_place(rng):
    q, k, v = qkv(rng, layout="bhsd")
    views = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]  # bshd views of bhsd memory
    assert not any(x.flags.c_contiguous for x in views)
    for x, base in zip(views, (q, k, v)):
        assert C.describe(x)["data"] == base.ctypes.data
    out = omniattn.attention(*views, causal=True)
    np.testing.assert_allclose(out, ref_attention(q, k, v, layout="bhsd", causal="bottom_right").transpose(0, 2, 1, 3),
                               atol=3e-5)


def test_packed_qkv_buffer(rng):
    b, s, h, d = 2, 11, 4, 16
    qkv_buf = rng.standard_normal((b, s, 3, h, d)).astype(np.float32)  # one projection output
    q, k, v = qkv_buf[:, :, 0], qkv_buf[:, :, 1], qkv_buf[:, :, 2]
    assert C.describe(k)["data"] == qkv_buf.ctypes.data + h * d * 4
    np.testing.assert_allclose(omniattn.attention(q, k, v), ref_attention(q, k, v), atol=3e-5)


def test_broadcast_kv_stride_zero(rng):
    q, k, v = qkv(rng)
    k0 = np.broadcast_to(k[:1], k.shape)  # one K/V for every batch, stride 0, read-only
    v0 = np.broadcast_to(v[:1], v.shape)
    np.testing.assert_allclose(omniattn.attention(q, k0, v0), ref_attention(q, k0, v0), atol=3e-5)


def test_out_strided_view_written_in_place(rng):
    q, k, v = qkv(rng)  # out [2, 9, 4, 8]
    big = np.full((2, 4, 9, 16), 7.0, dtype=np.float32)  # bhsd memory with room for two outputs
    out = big.transpose(0, 2, 1, 3)[..., ::2]  # bshd view, every other element
    result = omniattn.attention(q, k, v, out=out)
    assert result is out
    np.testing.assert_allclose(big.transpose(0, 2, 1, 3)[..., ::2], ref_attention(q, k, v), atol=3e-5)
    assert np.all(big[..., 1::2] == 7.0)  # the gaps are untouched


def test_out_float32_for_float16_inputs(rng):
    q, k, v = qkv(rng, dtype=np.float16)
    out = np.zeros((2, 9, 4, 8), dtype=np.float32)
    assert omniattn.attention(q, k, v, out=out) is out
    np.testing.assert_allclose(out, ref_attention(q, k, v), atol=1e-5)


def test_errors_leave_out_untouched(rng):
    q, k, v = qkv(rng)
    out = np.full((2, 9, 4, 8), 3.0, dtype=np.float32)
    with pytest.raises(ValueError):
        omniattn.attention(q, k[..., :8], v, out=out)
    assert np.all(out == 3.0)


def test_torch_views_zero_copy(rng):
    torch = torch_or_skip()
    q, k, v = (torch.from_numpy(x) for x in qkv(rng, layout="bhsd"))
    qv, kv, vv = (x.transpose(1, 2) for x in (q, k, v))  # bshd views
    assert qv.data_ptr() == q.data_ptr() and not qv.is_contiguous()
    big = torch.full((2, 9, 4, 16), 5.0)
    out = big[..., 3:11]  # strided torch out
    with torch.no_grad():
        result = omniattn.attention(qv, kv, vv, out=out, causal="top_left")
    assert result is out
    want = ref_attention(q.numpy(), k.numpy(), v.numpy(), layout="bhsd", causal="top_left").transpose(0, 2, 1, 3)
    np.testing.assert_allclose(big[..., 3:11].numpy(), want, atol=3e-5)
    assert torch.all(big[..., :3] == 5.0) and torch.all(big[..., 11:] == 5.0)


def test_torch_storage_offset(rng):
    torch = torch_or_skip()
    q, k, v = (torch.from_numpy(x) for x in qkv(rng, b=3))
    with torch.no_grad():
        got = omniattn.attention(q[1:], k[1:], v[1:])
    np.testing.assert_allclose(got.numpy(), ref_attention(q[1:].numpy(), k[1:].numpy(), v[1:].numpy()), atol=3e-5)
