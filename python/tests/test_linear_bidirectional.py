"""ViG's bidirectional gated linear attention (omniattn.linear_attention with causal=False and a decay): the sum of a
causal scan and a scan over the reversed tokens (direction-wise gates with g_backward), forward and autograd, against
the two scans written here in torch (float64); packed sequences; the rules."""

import numpy as np
import pytest

import omniattn

torch = pytest.importorskip("torch")

B, T, H, K, V = 2, 21, 3, 5, 4


def scan(q, k, v, g):
    """Numerators and denominators of the causal scan S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t."""
    gk = g if g.dim() == 4 else g[..., None].expand(*g.shape, K)
    S = torch.zeros(B, H, K, V + 1, dtype=q.dtype)
    outs = []
    ones = torch.ones(B, H, 1, dtype=q.dtype)
    for t in range(T):
        S = torch.exp(gk[:, t])[..., None] * S + k[:, t][..., None] * torch.cat([v[:, t], ones], -1)[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1)  # [B, T, H, V + 1]


def vig(q, k, v, g, g_backward=None, normalize=False):
    q = q * K ** -0.5
    flip = lambda x: torch.flip(x, [1])
    both = scan(q, k, v, g) + flip(scan(flip(q), flip(k), flip(v), flip(g if g_backward is None else g_backward)))
    num, den = both[..., :V], both[..., V:]
    return num / den if normalize else num


@pytest.mark.parametrize("channel,own_gates,normalize", [(False, False, False), (True, True, False), (True, False, True),
                                                         (False, True, True)])
def test_matches_two_torch_scans_with_autograd(channel, own_gates, normalize):
    gen = torch.Generator().manual_seed(1)
    u = lambda *s, lo=-1.0, hi=1.0: torch.rand(*s, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    gshape = (B, T, H, K) if channel else (B, T, H)
    x = dict(q=u(B, T, H, K), k=u(B, T, H, K, lo=0.1, hi=1.0), v=u(B, T, H, V), g=u(*gshape, lo=-0.6, hi=0.0))
    if own_gates:
        x["g_backward"] = u(*gshape, lo=-0.6, hi=0.0)
    kw = dict(feature_map="elu_plus_one") if normalize else {}
    ours = {n: t.float().requires_grad_() for n, t in x.items()}
    theirs = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, final = omniattn.linear_attention(ours["q"], ours["k"], ours["v"], g=ours["g"], g_backward=ours.get("g_backward"),
                                         causal=False, normalize=normalize, chunk_size=8, **kw)
    assert final is None
    phi = (lambda t: torch.nn.functional.elu(t) + 1) if normalize else (lambda t: t)
    want = vig(phi(theirs["q"]), phi(theirs["k"]), theirs["v"], theirs["g"], theirs.get("g_backward"), normalize)
    np.testing.assert_allclose(o.detach().numpy(), want.detach().numpy(), atol=3e-5 * max(1.0, float(want.abs().max())), rtol=0)
    do = torch.rand(o.shape, generator=torch.Generator().manual_seed(2)) - 0.5
    (o * do).sum().backward()
    (want * do.double()).sum().backward()
    for n in x:
        got, ref = ours[n].grad, theirs[n].grad
        assert got is not None and got.shape == ours[n].shape, n
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4 * max(1.0, float(ref.abs().max())), rtol=0, err_msg=n)


def test_packed_sequences_equal_separate_calls():
    rng = np.random.default_rng(3)
    lens = [7, 0, 12, 1]
    cu = np.cumsum([0] + lens)
    q, k = (rng.uniform(-1, 1, (1, cu[-1], H, K)).astype(np.float32) for _ in range(2))
    v = rng.uniform(-1, 1, (1, cu[-1], H, V)).astype(np.float32)
    g = rng.uniform(-0.5, 0, (1, cu[-1], H)).astype(np.float32)
    gb = rng.uniform(-0.5, 0, (1, cu[-1], H)).astype(np.float32)
    packed, _ = omniattn.linear_attention(q, k, v, g=g, g_backward=gb, causal=False, cu_seqlens=cu)
    for a, b in zip(cu[:-1], cu[1:]):
        one, _ = omniattn.linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], g_backward=gb[:, a:b], causal=False)
        np.testing.assert_array_equal(packed[:, a:b], one)


def test_rules_are_the_librarys():
    q = np.zeros((1, 4, 1, 2), np.float32)
    g = np.zeros((1, 4, 1), np.float32)
    with pytest.raises(ValueError, match="it has no state to return"):
        omniattn.linear_attention(q, q, q, g=g, causal=False, output_final_state=True)
    with pytest.raises(ValueError, match="spec.g_backward is set but causal = true"):
        omniattn.linear_attention(q, q, q, g=g, g_backward=g)
