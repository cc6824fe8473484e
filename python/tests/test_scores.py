"""Score spec strings, reweighting and the dense bias tensor from Python: the fused CPU kernel and the float64 oracle
against independent float64 numpy / torch math."""

import numpy as np
import pytest

import omniattn
from omniattn import masks, scores

from _helpers import causal_allowed, qkv, ref_attention, torch_ref

ATOL = 3e-5


def logits_of(q, k, scale=None):
    """scale * q k^T in float64, [B, H, Lq, Lk], from bshd q / k (GQA heads repeated)."""
    group = q.shape[2] // k.shape[2]
    kk = np.repeat(k, group, axis=2).astype(np.float64)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), kk) * scale


def alibi_slopes_paper(n):
    return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)


def both_backends(q, k, v, want, atol=ATOL, **kwargs):
    for backend, tol in (("cpu", atol), ("reference", 1e-6)):
        got = omniattn.attention(q, k, v, backend=backend, **kwargs)
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=backend)


@pytest.mark.parametrize("lq,lk", [(9, 13), (65, 63), (1, 70)])
def test_spec_string_alibi_softcap(rng, lq, lk):
    q, k, v = qkv(rng, lq=lq, lk=lk)
    q *= 4  # large logits, so the cap matters
    s = logits_of(q, k)
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    new = 3.0 * np.tanh((s + alibi_slopes_paper(4)[None, :, None, None] * (j - i)) / 3.0)
    want = ref_attention(q, k, v, bias=new - s)
    both_backends(q, k, v, want, score="alibi + softcap(3)", atol=5e-5)
    both_backends(q, k, v, want, score=scores.parse("alibi+softcap(3.0)"), atol=5e-5)


def test_spec_string_numbers_and_terms(rng):
    q, k, v = qkv(rng, lq=30, lk=40)
    s = logits_of(q, k)
    i = np.arange(30)[:, None]
    j = np.arange(40)[None, :]
    new = (s / 0.5) * np.maximum(1.0, np.log(i + 1) / np.log(4.0)) + 0.25 * (j - i + 2)
    want = ref_attention(q, k, v, bias=new - s, causal="bottom_right")
    both_backends(q, k, v, want, score="temperature(5e-1) + logn(4) + alibi_slope(0.25, 2)", causal="bottom_right",
                  atol=1e-4)
    # The numpy evaluation of a spec string is the C++ formula.
    np.testing.assert_allclose(scores.parse("temperature(5e-1) + logn(4) + alibi_slope(0.25, 2)").apply(s), new,
                               rtol=1e-12)


def test_spec_string_errors_carry_the_caret():
    with pytest.raises(ValueError) as e:
        scores.parse("alibi + softcap(0)")
    assert str(e.value) == ("[spec] at 16: [scores::softcap] cap must be finite and > 0\n"
                            "  alibi + softcap(0)\n"
                            "                  ^")
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match=r"\[spec\] at 6: unknown score modifier 'sofcap'"):
        omniattn.attention(q, k, v, score="alibi+sofcap(3)")
    with pytest.raises(TypeError, match="a score spec must be a str"):
        scores.parse(3)


def test_spec_string_composes_with_python_scores(rng):
    q, k, v = qkv(rng)
    kb = rng.standard_normal(13)
    s = logits_of(q, k)
    want = ref_attention(q, k, v, bias=2.0 * np.tanh((s + kb) / 2.0) - s)
    both_backends(q, k, v, want, score=scores.key_bias(kb) >> "softcap(2)")


@pytest.mark.parametrize("lq,lk,causal", [(9, 13, None), (17, 64, "top_left"), (70, 33, "bottom_right")])
def test_reweight_is_renormalised_post_softmax(rng, lq, lk, causal):
    q, k, v = qkv(rng, lq=lq, lk=lk)
    w = rng.uniform(0.1, 3.0, lk)
    w[3] = 0.0  # removes key 3
    s = logits_of(q, k)
    ok = np.ones(s.shape, dtype=bool) if causal is None else np.broadcast_to(causal_allowed(lq, lk, causal), s.shape)
    # Explicit post-softmax renormalisation, independent of the log-weight identity.
    p = np.where(ok, np.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
    p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    pw = p * w
    denom = pw.sum(axis=-1, keepdims=True)
    pw = np.where(denom > 0, pw / np.where(denom > 0, denom, 1.0), 0.0)
    group = q.shape[2] // k.shape[2]
    want = np.einsum("bhqk,bkhd->bqhd", pw, np.repeat(v, group, axis=2).astype(np.float64))
    kwargs = dict(score=scores.reweight(w), causal=causal or False)
    both_backends(q, k, v, want, **kwargs)
    # The LSE is that of the reweighted logits: log sum_j w_j exp(s_j).
    with np.errstate(divide="ignore"):
        want_lse = np.log((np.where(ok, np.exp(s), 0.0) * w).sum(-1))
    for backend in ("cpu", "reference"):
        _, lse = omniattn.attention(q, k, v, backend=backend, return_lse=True, **kwargs)
        np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=0, err_msg=backend)


def test_reweight_per_head_rows_and_removed_head(rng):
    q, k, v = qkv(rng, lq=9, lk=13, hq=4, hkv=2)
    w = rng.uniform(0.5, 2.0, (4, 16))  # rows of 16 >= 13 keys, one per query head
    w[2] = 0.0  # head 2 sees no key at all: out 0, lse -inf
    s = logits_of(q, k)
    with np.errstate(divide="ignore"):
        bias = np.log(w[:, :13])[None, :, None, :]
    want = ref_attention(q, k, v, bias=bias)
    both_backends(q, k, v, want, score=scores.reweight(w.reshape(-1), keys_per_head=16))
    out, lse = omniattn.attention(q, k, v, score=scores.reweight(w.reshape(-1), 16), return_lse=True)
    assert np.all(out[:, :, 2] == 0) and np.all(lse[:, 2] == -np.inf) and np.all(np.isfinite(lse[:, [0, 1, 3]]))
    np.testing.assert_allclose(scores.reweight(w.reshape(-1), 16).apply(s), s + bias)


def test_reweight_errors():
    for bad, what in ((([1.0, -1.0],), "weights must be finite and >= 0"),
                      (([1.0, np.nan],), "weights must be finite and >= 0"),
                      (([],), "weights is empty"),
                      (([1.0, 2.0, 3.0], 2), "weights must hold a whole number of rows")):
        with pytest.raises(ValueError, match=r"\[scores::reweight\] " + what):
            scores.reweight(*bad)
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng)  # seq_k 13
    with pytest.raises(ValueError, match=r"\[attention\] spec.score reweight has 5 weights per head row, fewer than "
                                         r"seq_k 13"):
        omniattn.attention(q, k, v, score=scores.reweight(np.ones(5)))


@pytest.mark.parametrize("shape", [(2, 4, 9, 13), (4, 1, 13), (9, 13), (13,), (2, 1, 9, 1)])
def test_bias_broadcasting_numpy(rng, shape):
    q, k, v = qkv(rng)
    bias = rng.standard_normal(shape)
    bias.reshape(-1)[::7] = -np.inf
    b32 = bias.astype(np.float32)
    want = ref_attention(q, k, v, bias=b32.astype(np.float64))
    both_backends(q, k, v, want, score=scores.bias(bias))
    assert scores.bias(bias).lower(masks.Grid(2, 4, 9, 13))[0][0] == "bias"  # native: the array itself, no table


def test_bias_strided_view_is_read_in_place(rng):
    q, k, v = qkv(rng)
    big = rng.standard_normal((2, 4, 9, 39)).astype(np.float32)
    view = big[..., ::3]  # key stride 3: the gathered (non-contiguous) path
    s = scores.bias(view)
    assert s.array is view  # float32 with non-negative strides: borrowed, not copied
    both_backends(q, k, v, ref_attention(q, k, v, bias=view.astype(np.float64)), score=s)
    flipped = big[..., ::-3]  # negative strides: copied once
    both_backends(q, k, v, ref_attention(q, k, v, bias=flipped.astype(np.float64)), score=scores.bias(flipped))


def test_bias_shape_error():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match=r"score bias\(array\(3, 9, 13\)\) of shape \(1, 3, 9, 13\) does not broadcast "
                                         r"to \[batch, heads, seq_q, seq_k\] = \(2, 4, 9, 13\)"):
        omniattn.attention(q, k, v, score=scores.bias(np.zeros((3, 9, 13))))
    with pytest.raises(ValueError, match="5 dimensions"):
        scores.bias(np.zeros((1, 1, 1, 9, 13)))


def test_bias_torch_against_torch_math():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 33, 16, generator=g)
    k = torch.randn(2, 2, 47, 16, generator=g)
    v = torch.randn(2, 2, 47, 8, generator=g)
    bias = torch.randn(4, 33, 47, generator=g)  # broadcast over batch
    bias[:, :, 5] = float("-inf")
    want = torch_ref(q, k, v, bias=bias, causal="bottom_right").numpy()
    for backend in ("cpu", "reference"):
        got = omniattn.attention(q, k, v, layout="bhsd", causal="bottom_right", score=scores.bias(bias), backend=backend)
        np.testing.assert_allclose(got.numpy(), want, atol=ATOL if backend == "cpu" else 1e-6, rtol=0)
    # A spec string on torch tensors, against torch float64 math.
    s = torch.matmul(q.double(), k.double().repeat_interleave(2, dim=1).transpose(-1, -2)) / 4.0
    new = 30.0 * torch.tanh((s + torch.tensor(alibi_slopes_paper(4))[None, :, None, None]
                             * (torch.arange(47)[None, :] - torch.arange(33)[:, None])) / 30.0)
    want = torch_ref(q, k, v, bias=new - s).numpy()
    got = omniattn.attention(q, k, v, layout="bhsd", score="alibi + softcap(30)")
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)
