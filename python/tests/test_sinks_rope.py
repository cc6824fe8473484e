"""Sink logits and RoPE through the binding: against a float64 numpy implementation and against the oracle."""

import numpy as np
import pytest

import omniattn


def _rope_np(x, pos, theta=10000.0):
    # x [batch, seq, heads, dim] float64, NeoX halves; pos [seq]
    d = x.shape[-1]
    half = d // 2
    freq = theta ** (-2.0 * np.arange(half) / d)
    ang = pos[:, None] * freq[None, :]                      # [seq, half]
    c, s = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def _attention_np(q, k, v, sink=None):
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if sink is not None:
        s = np.concatenate([s, np.broadcast_to(sink[None, :, None, None], s.shape[:3] + (1,))], axis=-1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sink is not None:
        p = p[..., :-1]
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.fixture
def qkv():
    rng = np.random.default_rng(5)
    return [rng.standard_normal((2, 37, 3, 16)).astype(np.float32) for _ in range(3)]


def test_sink_logits_match_numpy(qkv):
    q, k, v = qkv
    sinks = np.array([0.5, -1.0, 3.0], dtype=np.float32)
    want = _attention_np(*(x.astype(np.float64) for x in (q, k, v)), sink=sinks.astype(np.float64))
    for backend in ("cpu", "reference"):
        np.testing.assert_allclose(omniattn.attention(q, k, v, sink_logits=sinks, backend=backend), want, atol=2e-6)


def test_rope_matches_numpy(qkv):
    q, k, v = qkv
    pos = np.arange(37, dtype=np.float64) * 3 + 5
    ids = np.tile(pos.astype(np.int64), 2)  # [batch, seq]
    want = _attention_np(_rope_np(q.astype(np.float64), pos), _rope_np(k.astype(np.float64), pos), v.astype(np.float64))
    got = omniattn.attention(q, k, v, rope={"pos_q": ids, "pos_k": ids})
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(omniattn.attention(q, k, v, rope=True),
                               omniattn.reference_attention(q, k, v, rope=True), atol=2e-6)


def test_rope_and_sink_errors(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="one logit per query head"):
        omniattn.attention(q, k, v, sink_logits=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[attention\] spec.sink_logits\[1\]"):
        omniattn.attention(q, k, v, sink_logits=[0.0, np.inf, 0.0])
    with pytest.raises(ValueError, match=r"\[attention\] spec.rope.rotary_dim 7"):
        omniattn.attention(q, k, v, rope={"rotary_dim": 7})
    with pytest.raises(ValueError, match="rope pos_q has 3 ids"):
        omniattn.attention(q, k, v, rope={"pos_q": [1, 2, 3], "pos_k": np.zeros(74, dtype=np.int64)})
    with pytest.raises(ValueError, match="unknown rope keys"):
        omniattn.attention(q, k, v, rope={"base": 5})
