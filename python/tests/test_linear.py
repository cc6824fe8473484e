"""omniattn.linear_attention against a plain numpy recurrence of fla's formula (written here, independent of the
library) and against the library's own fp64 oracle; torch tensors, bf16, states, decays, errors."""

import numpy as np
import pytest

import omniattn

B, T, H, K, V = 2, 37, 3, 6, 5


def inputs(seed, decay=None):
    rng = np.random.default_rng(seed)
    q, k = (rng.uniform(-1, 1, (B, T, H, K)).astype(np.float32) for _ in range(2))
    v = rng.uniform(-1, 1, (B, T, H, V)).astype(np.float32)
    g = None
    if decay == "scalar":
        g = rng.uniform(-0.5, 0, (B, T, H)).astype(np.float32)
    elif decay == "channel":
        g = rng.uniform(-0.5, 0, (B, T, H, K)).astype(np.float32)
    return q, k, v, g


def recurrence(q, k, v, g=None, head_log_decay=None, s0=None, scale=None):
    """fla's recurrent form: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = (scale q_t) S_t."""
    scale = K ** -0.5 if scale is None else scale
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    final = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            S = np.zeros((K, V)) if s0 is None else s0[b, h].astype(np.float64)
            for t in range(T):
                if head_log_decay is not None:
                    a = np.full(K, np.exp(head_log_decay[h]))
                elif g is None:
                    a = np.ones(K)
                elif g.ndim == 3:
                    a = np.full(K, np.exp(g[b, t, h]))
                else:
                    a = np.exp(g[b, t, h].astype(np.float64))
                S = a[:, None] * S + np.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] = scale * q[b, t, h] @ S
            final[b, h] = S
    return out, final


@pytest.mark.parametrize("decay", [None, "fixed", "scalar", "channel"])
def test_matches_a_plain_recurrence(decay):
    q, k, v, g = inputs(1, decay)
    s0 = np.random.default_rng(2).uniform(-1, 1, (B, H, K, V)).astype(np.float32)
    hd = np.log(1 - 2.0 ** (-5 - np.arange(H))).astype(np.float32) if decay == "fixed" else None
    o, final = omniattn.linear_attention(q, k, v, g=g, head_log_decay=hd, initial_state=s0, output_final_state=True,
                                         chunk_size=16)
    want, want_final = recurrence(q, k, v, g, hd, s0)
    assert o.dtype == np.float32 and o.shape == (B, T, H, V) and final.shape == (B, H, K, V)
    np.testing.assert_allclose(o, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(final, want_final, atol=2e-5, rtol=0)
    o_ref, _ = omniattn.linear_attention(q, k, v, g=g, head_log_decay=hd, initial_state=s0, backend="reference")
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=0)


def test_prefill_then_continue_with_the_state():
    q, k, v, g = inputs(3, "channel")
    whole, _ = omniattn.linear_attention(q, k, v, g=g)
    a, state = omniattn.linear_attention(q[:, :20], k[:, :20], v[:, :20], g=g[:, :20], output_final_state=True)
    b, _ = omniattn.linear_attention(q[:, 20:], k[:, 20:], v[:, 20:], g=g[:, 20:], initial_state=state)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), whole, atol=2e-5, rtol=0)


def test_feature_maps_normalisation_and_non_causal():
    q, k, v, _ = inputs(4)
    for fm in ("identity", "elu_plus_one", "relu", "softmax"):
        for causal in (True, False):
            normalize = fm in ("elu_plus_one", "softmax")
            o, _ = omniattn.linear_attention(q, k, v, feature_map=fm, normalize=normalize, causal=causal)
            ref, _ = omniattn.linear_attention(q, k, v, feature_map=fm, normalize=normalize, causal=causal,
                                               backend="reference")
            np.testing.assert_allclose(o, ref, atol=3e-5, rtol=0, err_msg=f"{fm} causal={causal}")
    # elu + 1, normalised and non-causal: every row is a convex mix of v's rows.
    o, _ = omniattn.linear_attention(q, k, v, feature_map="elu_plus_one", normalize=True, causal=False)
    assert (o <= v.max(axis=1, keepdims=True) + 1e-5).all() and (o >= v.min(axis=1, keepdims=True) - 1e-5).all()


def test_torch_tensors_and_bf16():
    torch = pytest.importorskip("torch")
    q, k, v, g = inputs(5, "scalar")
    tq, tk, tv, tg = (torch.from_numpy(x) for x in (q, k, v, g))
    o, final = omniattn.linear_attention(tq, tk, tv, g=tg, output_final_state=True)
    assert isinstance(o, torch.Tensor) and isinstance(final, torch.Tensor) and final.dtype == torch.float32
    np.testing.assert_allclose(o.numpy(), recurrence(q, k, v, g)[0], atol=2e-5, rtol=0)
    ob, _ = omniattn.linear_attention(tq.bfloat16(), tk.bfloat16(), tv.bfloat16(), g=tg)
    assert ob.dtype == torch.bfloat16
    want = recurrence(*(x.bfloat16().float().numpy() for x in (tq, tk, tv)), g)[0]
    np.testing.assert_allclose(ob.float().numpy(), want, atol=3e-2, rtol=0)


def test_errors_are_the_library_messages():
    q, k, v, g = inputs(6, "channel")
    with pytest.raises(ValueError, match=r"\[linear_attention\] k.dim 5 != q.dim 6"):
        omniattn.linear_attention(q, k[..., :5], v)
    with pytest.raises(ValueError, match=r"must be finite and <= 0"):
        omniattn.linear_attention(q, k, v, g=np.abs(g) + 0.1)
    with pytest.raises(ValueError, match=r"options.initial_state with the bidirectional form"):
        omniattn.linear_attention(q, k, v, g=g, causal=False, initial_state=np.zeros((B, H, 6, V), np.float32))
    with pytest.raises(ValueError, match="feature_map must be"):
        omniattn.linear_attention(q, k, v, feature_map="cosine")
    with pytest.raises(ValueError, match="one log decay per head"):
        omniattn.linear_attention(q, k, v, head_log_decay=np.zeros(H + 1, np.float32))
    with pytest.raises(TypeError, match=r"\[linear_attention\] k.type"):
        omniattn.linear_attention(q, k.astype(np.float16), v)


def test_strided_and_reversed_views_are_read_in_place():
    rng = np.random.default_rng(7)
    big_q = rng.uniform(-1, 1, (B, T, H, 2 * K)).astype(np.float32)
    k_rev = rng.uniform(-1, 1, (B, T, H, K)).astype(np.float32)[:, ::-1]      # negative stride along the sequence
    v = np.asfortranarray(rng.uniform(-1, 1, (B, T, H, V)).astype(np.float32))  # every stride non-unit but one
    g = rng.uniform(-0.5, 0, (B, T, H, 2)).astype(np.float32)[..., 0]          # a [B, T, H] view with a stride
    q = big_q[..., ::2]
    o, final = omniattn.linear_attention(q, k_rev, v, g=g, output_final_state=True, chunk_size=8)
    want, want_final = recurrence(*(np.ascontiguousarray(x) for x in (q, k_rev, v)), np.ascontiguousarray(g))
    np.testing.assert_allclose(o, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(final, want_final, atol=2e-5, rtol=0)


def test_normalize_does_not_take_a_state_and_other_rules():
    q, k, v, _ = inputs(8)
    s0 = np.zeros((B, H, K, V), np.float32)
    with pytest.raises(ValueError, match="spec.normalize with options.initial_state"):
        omniattn.linear_attention(q, k, v, normalize=True, feature_map="elu_plus_one", initial_state=s0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        omniattn.linear_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, K\]"):
        omniattn.linear_attention(q[0], k[0], v[0])


def test_prefix_form():
    q, k, v, _ = inputs(9)
    P = 12
    o, _ = omniattn.linear_attention(q, k, v, prefix=P)
    scale = K ** -0.5
    prefix_state = np.einsum("bthk,bthv->bhkv", k[:, :P].astype(np.float64), v[:, :P])
    want_prefix = scale * np.einsum("bthk,bhkv->bthv", q[:, :P], prefix_state)   # rows of the prefix see all of it
    np.testing.assert_allclose(o[:, :P], want_prefix, atol=2e-5, rtol=0)
    causal, _ = omniattn.linear_attention(q, k, v)
    np.testing.assert_allclose(o[:, P:], causal[:, P:], atol=2e-5, rtol=0)  # later rows: causal over everything
