"""numpy in, numpy out: the fused CPU kernels against the float64 oracle (both through the binding) and against an
independent numpy float64 reference."""

import numpy as np
import pytest

import omniattn
from omniattn import masks, scores

from _helpers import causal_allowed, qkv, ref_attention

ATOL = 3e-5  # float32 kernel vs float64 math, unit-normal inputs, short rows


def check(rng, *, layout="bshd", ref_kwargs=None, shape=None, **kwargs):
    q, k, v = qkv(rng, layout=layout, **(shape or {}))
    want = ref_attention(q, k, v, layout=layout, **(ref_kwargs or {}))
    got_cpu = omniattn.attention(q, k, v, layout=layout, backend="cpu", **kwargs)
    got_ref = omniattn.attention(q, k, v, layout=layout, backend="reference", **kwargs)
    assert isinstance(got_cpu, np.ndarray) and got_cpu.dtype == np.float32 and got_cpu.shape == want.shape
    np.testing.assert_allclose(got_ref, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_cpu, want, atol=ATOL, rtol=0)
    return q, k, v, got_cpu


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_dense(rng, layout, hq, hkv):
    check(rng, layout=layout, shape=dict(hq=hq, hkv=hkv))


@pytest.mark.parametrize("lq,lk", [(9, 13), (13, 9), (70, 70), (1, 77)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal(rng, lq, lk, align):
    check(rng, shape=dict(lq=lq, lk=lk), causal=align, ref_kwargs=dict(causal=align))


def test_causal_true_is_bottom_right(rng):
    q, k, v = qkv(rng, lq=5, lk=12)
    np.testing.assert_array_equal(omniattn.attention(q, k, v, causal=True),
                                  omniattn.attention(q, k, v, causal="bottom_right"))
    assert not np.allclose(omniattn.attention(q, k, v, causal=True), omniattn.attention(q, k, v, causal="top_left"))


def test_cross_attention_dims(rng):
    check(rng, shape=dict(b=1, lq=3, lk=40, hq=2, hkv=2, d=32, dv=24))


def test_scale(rng):
    check(rng, scale=0.3, ref_kwargs=dict(scale=0.3))


def test_bool_mask_array(rng):
    allowed = rng.random((2, 1, 9, 13)) < 0.6  # broadcast over heads
    check(rng, mask=allowed, ref_kwargs=dict(allowed=allowed))


def test_bool_mask_with_fully_masked_rows(rng):
    allowed = np.ones((9, 13), dtype=bool)
    allowed[3] = False
    _, _, _, out = check(rng, mask=allowed, ref_kwargs=dict(allowed=allowed))
    assert np.all(out[:, 3] == 0)


def test_mask_function_evaluated_once_vectorized(rng):
    calls = []

    def parity(b, h, q, k):
        calls.append((b.shape, h.shape, q.shape, k.shape))
        return ((q + k + h) % 3 != 0) | (b == 1)

    b_, h_, q_, k_ = np.ogrid[:2, :4, :9, :13]
    check(rng, mask=parity, ref_kwargs=dict(allowed=((q_ + k_ + h_) % 3 != 0) | (b_ == 1)))
    assert calls[0] == ((2, 1, 1, 1), (1, 4, 1, 1), (1, 1, 9, 1), (1, 1, 1, 13))
    assert len(calls) == 2  # once per attention() call (cpu, reference)


@pytest.mark.parametrize("make", [
    lambda: masks.causal("top_left"),
    lambda: masks.sliding_window(3),
    lambda: masks.sliding_window(2, 1, align="top_left"),
    lambda: masks.sliding_window(None, 0),
    lambda: masks.sliding_window(4) | masks.sinks(2),
    lambda: masks.prefix_lm(4),
    lambda: masks.document([0, 3, 7, 13]),
    lambda: masks.block_causal(4),
    lambda: masks.dilated(3),
    lambda: masks.segments([0, 0, 1, 1, 1, 2, 2, 0, 0, 1, 1, 1, 1]),
    lambda: ~masks.causal() & masks.sliding_window(None, 3),
    lambda: masks.causal() & (lambda b, h, q, k: (q * k + h) % 4 != 1),
    lambda: masks.predicate(lambda b, h, q, k: k != q, "not_self") | masks.sinks(1),
])
def test_mask_patterns(rng, make):
    m = make()
    allowed = m.to_dense(2, 4, 9, 13)
    check(rng, mask=m, ref_kwargs=dict(allowed=allowed))


def test_mask_and_causal_together(rng):
    m = masks.sliding_window(None, 2)
    check(rng, shape=dict(lq=13, lk=13), causal=True, mask=m,
          ref_kwargs=dict(causal="bottom_right", allowed=m.to_dense(1, 1, 13, 13)))


def test_additive_bias_array(rng):
    bias = rng.standard_normal((1, 4, 9, 13))
    bias[..., 0, 2] = -np.inf
    check(rng, score=bias, ref_kwargs=dict(bias=bias))


def test_bias_float32_and_torch_like_broadcast(rng):
    bias = rng.standard_normal((9, 13)).astype(np.float32)
    check(rng, score=bias, ref_kwargs=dict(bias=bias.astype(np.float64)))


def alibi_bias(slopes, lq, lk, offset):
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    return np.asarray(slopes, dtype=np.float64)[None, :, None, None] * (j - i + offset)


@pytest.mark.parametrize("align,offset", [("bottom_right", 9 - 13), ("top_left", 0)])
def test_alibi(rng, align, offset):
    slopes = scores.alibi_slopes(4)
    np.testing.assert_allclose(slopes, 2.0 ** (-8.0 * np.arange(1, 5) / 4))
    s = scores.alibi(slopes, align)
    assert s.lower(masks.Grid(2, 4, 9, 13)) == [("alibi", slopes.tolist(), offset)]  # native: no table
    check(rng, score=s, causal=align, ref_kwargs=dict(bias=alibi_bias(slopes, 9, 13, offset), causal=align))


def test_alibi_varlen_is_aligned_per_sequence(rng):
    cu_q, cu_k = np.array([0, 3, 8]), np.array([0, 7, 13])
    q = rng.standard_normal((8, 2, 16)).astype(np.float32)
    k, v = (rng.standard_normal((13, 2, 16)).astype(np.float32) for _ in range(2))
    slopes = [0.5, 0.25]
    out = omniattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, score=scores.alibi(slopes))
    for s in range(2):
        lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        qs, ks, vs = q[cu_q[s]:cu_q[s + 1]][None], k[cu_k[s]:cu_k[s + 1]][None], v[cu_k[s]:cu_k[s + 1]][None]
        want = ref_attention(qs, ks, vs, causal="bottom_right", bias=alibi_bias(slopes, lq, lk, lq - lk))
        np.testing.assert_allclose(out[cu_q[s]:cu_q[s + 1]], want[0], atol=ATOL)


def test_temperature_and_key_bias(rng):
    t = [0.5, 1.0, 2.0, 4.0]
    kb = rng.standard_normal(10)  # shorter than Lk = 13: the last keys get 0
    s = scores.temperature(t) >> scores.key_bias(kb)
    q, k, v = qkv(rng)
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), np.repeat(k, 2, axis=2).astype(np.float64)) / 4.0
    want_logits = logits / np.asarray(t)[None, :, None, None] + np.concatenate([kb, [0, 0, 0]])
    np.testing.assert_allclose(s.apply(logits), want_logits)
    for backend in ("cpu", "reference"):
        np.testing.assert_allclose(omniattn.attention(q, k, v, score=s, backend=backend),
                                   ref_attention(q, k, v, bias=want_logits - logits), atol=ATOL)


def test_softcap_and_chain(rng):
    q, k, v = qkv(rng)
    q *= 4  # large logits, so the cap matters
    chain = scores.alibi([0.5, 0.25, 0.125, 0.0625]) >> scores.softcap(2.0)
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), np.repeat(k, 2, axis=2).astype(np.float64)) / 4.0
    want = ref_attention(q, k, v, bias=chain.apply(logits) - logits)
    np.testing.assert_allclose(chain.apply(logits), 2.0 * np.tanh((logits + alibi_bias(
        [0.5, 0.25, 0.125, 0.0625], 9, 13, -4)) / 2.0))
    for backend in ("cpu", "reference"):
        np.testing.assert_allclose(omniattn.attention(q, k, v, score=chain, backend=backend), want, atol=5e-5)


def test_score_function_affine(rng):
    def temperature_and_distance(s, b, h, q, k):
        return s * (1.0 + 0.5 * h) - 0.1 * np.abs(q - k) + np.where(k == 0, -np.inf, 0.0)

    q, k, v = qkv(rng)
    h = np.arange(4)[None, :, None, None]
    i, j = np.arange(9)[:, None], np.arange(13)[None, :]
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), np.repeat(k, 2, axis=2).astype(np.float64)) / 4.0
    s_new = temperature_and_distance(logits, 0, h, i, j)
    want = ref_attention(q, k, v, bias=s_new - np.where(np.isfinite(s_new), logits, 0))
    np.testing.assert_allclose(omniattn.attention(q, k, v, score=temperature_and_distance), want, atol=ATOL)


def test_additive_sum(rng):
    b1 = rng.standard_normal((9, 13))
    s = scores.bias(b1) + scores.alibi([0.1] * 4) + scores.key_bias([1.0, -1.0])
    kb = np.zeros(13)
    kb[:2] = [1.0, -1.0]
    check(rng, score=s, ref_kwargs=dict(bias=b1 + alibi_bias([0.1] * 4, 9, 13, -4) + kb))


def test_mask_and_score_together(rng):
    allowed = causal_allowed(9, 13, "bottom_right")
    bias = rng.standard_normal((2, 4, 9, 13))
    check(rng, mask=masks.causal(), score=bias, ref_kwargs=dict(allowed=allowed, bias=bias))


def test_lse(rng):
    q, k, v = qkv(rng)
    want, want_lse = ref_attention(q, k, v, causal="top_left", lse=True)
    for backend in ("cpu", "reference"):
        out, lse = omniattn.attention(q, k, v, causal="top_left", return_lse=True, backend=backend)
        assert lse.shape == (2, 4, 9) and lse.dtype == np.float32
        np.testing.assert_allclose(out, want, atol=ATOL)
        np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_lse_fully_masked_row_is_minus_inf(rng):
    q, k, v = qkv(rng)
    allowed = np.ones((9, 13), dtype=bool)
    allowed[0] = False
    out, lse = omniattn.attention(q, k, v, mask=allowed, return_lse=True)
    assert np.all(np.isneginf(lse[:, :, 0])) and np.all(np.isfinite(lse[:, :, 1:]))
    assert np.all(out[:, 0] == 0)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_varlen_matches_per_sequence(rng, layout):
    lens_q, lens_k = [3, 7, 1], [5, 7, 9]
    cu_q, cu_k = np.concatenate([[0], np.cumsum(lens_q)]), np.concatenate([[0], np.cumsum(lens_k)])
    hq, hkv, d = 4, 2, 16
    tq, tk = cu_q[-1], cu_k[-1]
    shapes = [(tq, hq, d), (tk, hkv, d), (tk, hkv, d)]
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    win = masks.sliding_window(2) | masks.sinks(1)
    qa, ka, va = (x.transpose(1, 0, 2).copy() if layout == "bhsd" else x for x in (q, k, v))
    out, lse = omniattn.attention(qa, ka, va, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, mask=win, return_lse=True,
                                  layout=layout)
    assert lse.shape == (hq, tq)
    if layout == "bhsd":
        out = out.transpose(1, 0, 2)
    for s in range(3):
        qs, ks, vs = q[cu_q[s]:cu_q[s + 1]][None], k[cu_k[s]:cu_k[s + 1]][None], v[cu_k[s]:cu_k[s + 1]][None]
        want, want_lse = ref_attention(qs, ks, vs, allowed=win.to_dense(1, 1, lens_q[s], lens_k[s]), lse=True)
        np.testing.assert_allclose(out[cu_q[s]:cu_q[s + 1]], want[0], atol=ATOL)
        np.testing.assert_allclose(lse[:, cu_q[s]:cu_q[s + 1]], want_lse[0], atol=1e-5)


def test_varlen_table_mask_sees_positions_inside_each_sequence(rng):
    cu = np.array([0, 4, 10])
    q, k, v = (rng.standard_normal((10, 2, 8)).astype(np.float32) for _ in range(3))
    seen = {}

    def even_keys(b, h, qq, kk):
        seen["shape"] = np.broadcast_shapes(b.shape, h.shape, qq.shape, kk.shape)
        return kk % 2 == 0

    out = omniattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, mask=even_keys)
    assert seen["shape"] == (2, 2, 6, 6)  # sequences x heads x longest q x longest k
    for s in range(2):
        sl = slice(cu[s], cu[s + 1])
        n = cu[s + 1] - cu[s]
        want = ref_attention(q[sl][None], k[sl][None], v[sl][None], allowed=(np.arange(n) % 2 == 0)[None, :])
        np.testing.assert_allclose(out[sl], want[0], atol=ATOL)


def test_threads(rng):
    q, k, v = qkv(rng, lq=70, lk=70)
    a = omniattn.attention(q, k, v, threads=1, causal=True)
    b = omniattn.attention(q, k, v, threads=2, causal=True)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_reference_attention_is_the_oracle(rng):
    q, k, v = qkv(rng)
    np.testing.assert_array_equal(omniattn.reference_attention(q, k, v, causal=True),
                                  omniattn.attention(q, k, v, causal=True, backend="reference"))


def test_float16_numpy(rng):
    q, k, v = qkv(rng, dtype=np.float16)
    out = omniattn.attention(q, k, v)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), ref_attention(q, k, v), atol=3e-3)


def test_bf16_numpy_bits(rng):
    q, k, v = qkv(rng)
    qb, kb, vb = (omniattn.to_bf16(x) for x in (q, k, v))
    assert qb.dtype == np.uint16
    out = omniattn.attention(qb, kb, vb, dtype="bf16")
    assert out.dtype == np.uint16
    want = ref_attention(*(omniattn.from_bf16(x) for x in (qb, kb, vb)))
    np.testing.assert_allclose(omniattn.from_bf16(out), want, atol=2e-2)
    # float32 output for bf16 inputs
    out32 = np.empty(want.shape, dtype=np.float32)
    omniattn.attention(qb, kb, vb, dtype="bf16", out=out32)
    np.testing.assert_allclose(out32, want, atol=1e-5)


def test_explain(rng):
    q, k, v = qkv(rng)
    text = omniattn.explain(q, k, v, causal=True, mask=masks.sliding_window(4) | masks.sinks(2))
    lines = text.splitlines()
    assert lines[0].startswith("kernel: cpu.")
    assert any("window(4,0,bottom_right) | sinks(2)" in line for line in lines)
    ref = omniattn.explain(q, k, v, backend="reference")
    assert ref.splitlines()[0] == "kernel: reference"


def test_large_head_dims_run_on_the_cpu_kernel(rng):
    q, k, v = qkv(rng, d=1024, dv=8)
    assert omniattn.explain(q, k, v).startswith("kernel: cpu.flash_fwd<f32>")
    np.testing.assert_allclose(omniattn.attention(q, k, v), omniattn.reference_attention(q, k, v), atol=1e-5)


def test_explain_rejection_reasons(rng):
    # K / V broadcast (stride 0) to 2^40 keys: no input memory, but the kernel would have to pack terabytes.
    q, k, v = qkv(rng)
    huge = (k.shape[0], 1 << 40) + k.shape[2:]
    kb = np.lib.stride_tricks.as_strided(k, shape=huge, strides=(k.strides[0], 0) + k.strides[2:])
    vb = np.lib.stride_tricks.as_strided(v, shape=huge, strides=(v.strides[0], 0) + v.strides[2:])
    text = omniattn.explain(q, kb, vb, backend="cpu")
    assert text.startswith("no cpu kernel fits") and "GiB of working memory" in text
    with pytest.raises(ValueError, match=r"^\[attention\] no cpu kernel fits:"):
        omniattn.attention(q, kb, vb, backend="cpu")
    assert omniattn.explain(q, kb, vb).startswith("kernel: reference")  # auto falls back to the oracle, and says so
