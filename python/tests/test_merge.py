"""omniattn.merge_attention_states: attention over disjoint key sets, merged, against attention over their union (the
library's and float64 numpy math); numpy and torch, both layouts, varlen, masked rows, out= buffers, thread counts,
and the library's errors."""

import numpy as np
import pytest

import omniattn

from _helpers import qkv, ref_attention

# float32 kernel results merged in float32 against the same kernel over all keys (|v| ~ 1, O(10) keys per row).
TOL = dict(atol=2e-6, rtol=0)
# against float64 numpy math: the kernel's own error (as in test_attention.py) dominates
REF_TOL = dict(atol=2e-5, rtol=0)


def key_masks(rng, lk, parts):
    """`parts` disjoint random key sets covering all lk keys, as boolean masks broadcastable to [B, H, Lq, Lk]."""
    part_of = rng.integers(0, parts, lk)
    return [(part_of == i)[None, None, None, :] for i in range(parts)]


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("parts", [2, 3, 5])
def test_disjoint_key_sets_match_attention_over_all_keys(rng, layout, parts):
    q, k, v = qkv(rng, b=2, lq=13, lk=29, hq=4, hkv=2, d=7, dv=5, layout=layout)
    results = [omniattn.attention(q, k, v, mask=m, causal=True, layout=layout, return_lse=True)
               for m in key_masks(rng, 29, parts)]
    out, lse = omniattn.merge_attention_states([o for o, _ in results], [l for _, l in results], layout=layout)
    want, want_lse = omniattn.attention(q, k, v, causal=True, layout=layout, return_lse=True)
    assert out.dtype == np.float32 and out.shape == want.shape and lse.shape == want_lse.shape == (2, 4, 13)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(lse, want_lse, atol=4e-6, rtol=0)
    ref, ref_lse = ref_attention(q, k, v, causal="bottom_right", layout=layout, lse=True)
    np.testing.assert_allclose(out, ref, **REF_TOL)
    np.testing.assert_allclose(lse, ref_lse, **REF_TOL)


def test_key_slices_and_threads(rng):
    """A shared prefix and the rest as separate k / v slices (cascade attention); 1 and 2 threads agree bitwise."""
    q, k, v = qkv(rng, b=1, lq=1, lk=40, hq=2, hkv=2, d=130, dv=130)
    prefix = omniattn.attention(q, k[:, :16], v[:, :16], return_lse=True)
    rest = omniattn.attention(q, k[:, 16:], v[:, 16:], return_lse=True)
    outs, lses = [prefix[0], rest[0]], [prefix[1], rest[1]]
    one = omniattn.merge_attention_states(outs, lses, threads=1)
    two = omniattn.merge_attention_states(outs, lses, threads=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    want, want_lse = omniattn.attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(one[0], want, **TOL)
    np.testing.assert_allclose(one[1], want_lse, atol=4e-6, rtol=0)


def test_masked_rows_and_all_masked(rng):
    q, k, v = qkv(rng, b=1, lq=13, lk=13, hq=1, hkv=1, d=7, dv=7)
    late = np.arange(13) >= 5  # with top-left causal, rows 0..4 see no late key
    a = omniattn.attention(q, k, v, mask=~late, causal="top_left", return_lse=True)
    b = omniattn.attention(q, k, v, mask=late, causal="top_left", return_lse=True)
    assert np.isneginf(b[1][0, 0, :5]).all() and np.isfinite(b[1][0, 0, 5:]).all()
    out, lse = omniattn.merge_attention_states([a[0], b[0]], [a[1], b[1]])
    want, want_lse = omniattn.attention(q, k, v, causal="top_left", return_lse=True)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(lse, want_lse, atol=4e-6, rtol=0)
    # Every part -inf: out 0 and lse -inf, never NaN, whatever the parts' out holds.
    junk = np.full((1, 13, 1, 7), np.nan, dtype=np.float32)
    neg = np.full((1, 1, 13), -np.inf, dtype=np.float32)
    out, lse = omniattn.merge_attention_states([junk, junk], [neg, neg])
    assert (out == 0).all() and np.isneginf(lse).all()


def test_varlen_parts(rng):
    """Packed sequences ([total, heads, dim], lse [heads, total]): each sequence's keys split into a first and a last
    part, attended as two varlen calls."""
    lens_q, lens_k = [3, 6], [5, 8]
    q = rng.standard_normal((9, 2, 8)).astype(np.float32)
    k = rng.standard_normal((13, 2, 8)).astype(np.float32)
    v = rng.standard_normal((13, 2, 8)).astype(np.float32)
    cu_q = np.cumsum([0] + lens_q)
    cu_k = np.cumsum([0] + lens_k)
    first = np.concatenate([np.arange(cu_k[s], cu_k[s] + 2) for s in range(2)])
    last = np.concatenate([np.arange(cu_k[s] + 2, cu_k[s + 1]) for s in range(2)])
    parts = []
    for keys, lens in ((first, [2, 2]), (last, [3, 6])):
        parts.append(omniattn.attention(q, k[keys], v[keys], cu_seqlens_q=cu_q, cu_seqlens_k=np.cumsum([0] + lens),
                                        return_lse=True))
    out, lse = omniattn.merge_attention_states([o for o, _ in parts], [l for _, l in parts])
    want, want_lse = omniattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert out.shape == (9, 2, 8) and lse.shape == (2, 9)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(lse, want_lse, atol=4e-6, rtol=0)


def test_torch_bf16_parts_into_float32_out(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x) for x in qkv(rng, b=2, lq=13, lk=20, hq=2, hkv=1, d=16, dv=16, layout="bhsd"))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.no_grad():
        parts = [omniattn.attention(q, k[:, :, s], v[:, :, s], layout="bhsd", return_lse=True)
                 for s in (slice(0, 7), slice(7, 20))]
        want = torch.empty(2, 2, 13, 16)  # float32 out of the bf16 inputs
        _, want_lse = omniattn.attention(q, k, v, layout="bhsd", out=want, return_lse=True)
    assert parts[0][0].dtype == torch.bfloat16
    # out=: a float32 bhsd view of bshd memory (any strides); the default out is the parts' dtype.
    buf = torch.empty(2, 13, 2, 16)
    out, lse = omniattn.merge_attention_states([o for o, _ in parts], [l for _, l in parts], out=buf.transpose(1, 2),
                                               layout="bhsd")
    assert out.data_ptr() == buf.data_ptr() and isinstance(lse, torch.Tensor) and lse.dtype == torch.float32
    default, _ = omniattn.merge_attention_states([o for o, _ in parts], [l for _, l in parts], layout="bhsd")
    assert default.dtype == torch.bfloat16 and torch.equal(default, out.bfloat16())
    # each bf16 part is rounded once (by at most 2^-8 of its magnitude); the merge is a convex combination of them
    bound = 2 ** -8 * max(float(o.abs().max()) for o, _ in parts)
    torch.testing.assert_close(out, want, atol=bound + 1e-5, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=4e-6, rtol=0)


def test_errors_come_from_the_library(rng):
    out = rng.standard_normal((1, 9, 2, 4)).astype(np.float32)
    lse = rng.standard_normal((1, 2, 9)).astype(np.float32)
    short = np.zeros((1, 7, 2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"^\[merge_attention_states\] outs\[1\]\.seq 7 != outs\[0\]\.seq 9$"):
        omniattn.merge_attention_states([out, short], [lse, lse])
    with pytest.raises(ValueError, match=r"^\[merge_attention_states\] outs is empty"):
        omniattn.merge_attention_states([], [])
    with pytest.raises(ValueError, match=r"^\[merge_attention_states\] lses has 1 entries, outs 2"):
        omniattn.merge_attention_states([out, out], [lse])
    with pytest.raises(ValueError, match=r"^\[merge_attention_states\] out aliases outs\[0\]"):
        omniattn.merge_attention_states([out, out], [lse, lse], out=out)
    with pytest.raises(ValueError, match=r"^\[merge_attention_states\] threads -1 must be >= 0"):
        omniattn.merge_attention_states([out], [lse], threads=-1)
    with pytest.raises(TypeError, match=r"lses\[0\] has dtype float64, expected float32"):
        omniattn.merge_attention_states([out], [lse.astype(np.float64)])
    frozen = np.zeros_like(out)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"out is read-only"):
        omniattn.merge_attention_states([out], [lse], out=frozen)
    assert (frozen == 0).all()
