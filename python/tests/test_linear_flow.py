"""Flowformer's flow-conservation form (omniattn.linear_attention(..., flow=True), non-causal): forward and autograd
against the flows written here in torch from Flowformer's definition (float64, its eps of 1e-6); packed sequences;
the rules."""

import numpy as np
import pytest

import omniattn

torch = pytest.importorskip("torch")

B, T, H, K, V = 2, 17, 3, 5, 4
EPS = 1e-6


def flowformer(q, k, v):
    """q, k [B, T, H, K] features (sigmoid applied), v [B, T, H, V]: incoming / outgoing flows, their conserved
    refinements, competition over the keys and allocation of the queries."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    n = q.shape[2]
    incoming = torch.einsum("bhtk,bhk->bht", q + EPS, k.sum(2) + EPS)
    outgoing = torch.einsum("bhtk,bhk->bht", k + EPS, q.sum(2) + EPS)
    conserved_sink = torch.einsum("bhtk,bhk->bht", q + EPS, (k / outgoing[..., None]).sum(2) + EPS)
    conserved_source = torch.einsum("bhtk,bhk->bht", k + EPS, (q / incoming[..., None]).sum(2) + EPS)
    competition = torch.softmax(torch.clamp(conserved_source, -1.0, 1.0), -1) * n
    allocation = torch.sigmoid(conserved_sink)
    kv = torch.einsum("bhtk,bhtv->bhkv", k, v * competition[..., None])
    o = torch.einsum("bhtk,bhkv->bhtv", q / incoming[..., None], kv) * allocation[..., None]
    return o.transpose(1, 2)


@pytest.mark.parametrize("projected", [False, True])
def test_matches_flowformer_with_autograd(projected):
    gen = torch.Generator().manual_seed(4)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64) * 2 - 1
    x = dict(q=u(B, T, H, K) * 2, k=u(B, T, H, K) * 2, v=u(B, T, H, V))
    if projected:
        x["projection"] = u(K, 6) * 0.7
    ours = {n: t.float().requires_grad_() for n, t in x.items()}
    theirs = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, final = omniattn.linear_attention(ours["q"], ours["k"], ours["v"], feature_map="sigmoid", flow=True, causal=False,
                                         scale=1.0, projection=ours.get("projection"))
    assert final is None
    phi = (lambda t: torch.sigmoid(t @ theirs["projection"])) if projected else torch.sigmoid
    want = flowformer(phi(theirs["q"]), phi(theirs["k"]), theirs["v"])
    np.testing.assert_allclose(o.detach().numpy(), want.detach().numpy(), atol=2e-5 * max(1.0, float(want.abs().max())), rtol=0)
    do = torch.rand(o.shape, generator=torch.Generator().manual_seed(6)) - 0.5
    (o * do).sum().backward()
    (want * do.double()).sum().backward()
    for n in x:
        got, ref = ours[n].grad, theirs[n].grad
        assert got is not None, n
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4 * max(1.0, float(ref.abs().max())), rtol=0, err_msg=n)


def test_packed_sequences_equal_separate_calls():
    rng = np.random.default_rng(8)
    lens = [6, 0, 11, 1]
    cu = np.cumsum([0] + lens)
    q, k = (rng.uniform(-2, 2, (1, cu[-1], H, K)).astype(np.float32) for _ in range(2))
    v = rng.uniform(-1, 1, (1, cu[-1], H, V)).astype(np.float32)
    kw = dict(feature_map="sigmoid", flow=True, causal=False, scale=1.0)
    packed, _ = omniattn.linear_attention(q, k, v, cu_seqlens=cu, **kw)
    for a, b in zip(cu[:-1], cu[1:]):
        one, _ = omniattn.linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], **kw)
        np.testing.assert_allclose(packed[:, a:b], one, atol=1e-6, rtol=0)


def test_rules_are_the_librarys():
    q = np.zeros((1, 4, 1, 2), np.float32)
    with pytest.raises(ValueError, match="Flowformer's flow form is non-causal"):
        omniattn.linear_attention(q, q, q, feature_map="sigmoid", flow=True)
    with pytest.raises(ValueError, match="the flows need positive features"):
        omniattn.linear_attention(q, q, q, flow=True, causal=False)
