"""omniattn.linear_attention with projected feature maps (Hedgehog's learned maps, Performer's random features):
forward and autograd (q, k, v, g, the projection's weight and bias) against torch autograd through the quadratic
form written here (float64), Performer against softmax attention, a Hedgehog map trained to mimic softmax, errors."""

import numpy as np
import pytest

import omniattn

torch = pytest.importorskip("torch")

B, T, H, K, V = 2, 19, 3, 6, 4


def torch_projected(q, k, v, W, bias, feature_map, scale, normalize=False, g=None):
    """o_i = sum_{j <= i} (scale phi(P q_i) . exp(G_i - G_j) phi(P k_j)) v_j (normalize: over the same sum of weights),
    P x = x W_h + b_h (W [H, K, F] or [K, F]), G the running sum of a per-token log decay g [B, T, H]."""
    Wh = W if W.dim() == 3 else W.expand(H, *W.shape)
    F = Wh.shape[-1]
    bh = torch.zeros(H, F, dtype=W.dtype) if bias is None else (bias if bias.dim() == 2 else bias.expand(H, F))

    def phi(x):
        u = torch.einsum("bthk,hkf->bthf", x, Wh) + bh
        if feature_map == "performer":
            return torch.exp(u - (x * x).sum(-1, keepdim=True) / 2) / F ** 0.5
        return {"exp": torch.exp, "softmax": lambda y: torch.softmax(y, -1), "identity": lambda y: y}[feature_map](u)

    qf, kf = phi(q) * scale, phi(k)
    a = torch.einsum("bihf,bjhf->bhij", qf, kf)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if g is not None:
        G = torch.cumsum(g, 1).permute(0, 2, 1)  # [B, H, T]
        a = a * torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~mask, 0.0))
    a = a.masked_fill(~mask, 0.0)
    o = torch.einsum("bhij,bjhv->bihv", a, v)
    return o / a.sum(-1).permute(0, 2, 1)[..., None] if normalize else o


def leaves(seed, F, shared, feature_map, with_bias, decay):
    gen = torch.Generator().manual_seed(seed)
    u = lambda *shape, lo=-1.0, hi=1.0: torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    x = dict(q=u(B, T, H, K), k=u(B, T, H, K), v=u(B, T, H, V))
    wshape = (K, F) if shared else (H, K, F)
    if feature_map == "performer":
        x["projection"] = torch.from_numpy(omniattn.performer_projection(1 if shared else H, K, F, seed=seed)).double()
        x["projection"] = x["projection"].reshape(wshape)
    else:
        x["projection"] = u(*wshape) * (3.0 / K) ** 0.5
    if with_bias:
        x["projection_bias"] = u(*((F,) if shared else (H, F)), lo=-0.5, hi=0.5)
    if decay:
        x["g"] = u(B, T, H, lo=-0.5, hi=0.0)
    return x


@pytest.mark.parametrize("feature_map,F,shared,with_bias,normalize,decay", [
    ("exp", 8, False, True, False, False),        # Hedgehog: learned projection, then exp
    ("softmax", 5, True, True, True, True),       # Hedgehog's softmax form, shared by the heads, decayed
    ("performer", 16, False, False, True, False),  # Performer: random features, normalised
    ("identity", 7, True, False, False, True),    # a plain learned projection
])
def test_autograd_matches_torch(feature_map, F, shared, with_bias, normalize, decay):
    x = leaves(3, F, shared, feature_map, with_bias, decay)
    ours = {n: t.float().requires_grad_() for n, t in x.items()}
    theirs = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, _ = omniattn.linear_attention(ours["q"], ours["k"], ours["v"], g=ours.get("g"), feature_map=feature_map,
                                     projection=ours["projection"], projection_bias=ours.get("projection_bias"),
                                     normalize=normalize, chunk_size=8)
    want = torch_projected(theirs["q"], theirs["k"], theirs["v"], theirs["projection"], theirs.get("projection_bias"),
                           feature_map, K ** -0.5, normalize, theirs.get("g"))
    scale = max(1.0, float(want.abs().max()))
    np.testing.assert_allclose(o.detach().numpy(), want.detach().numpy(), atol=3e-5 * scale, rtol=0)
    do = torch.rand(o.shape, generator=torch.Generator().manual_seed(5)) - 0.5
    (o * do).sum().backward()
    (want * do.double()).sum().backward()
    for n in x:
        got, ref = ours[n].grad, theirs[n].grad
        assert got is not None, n
        assert got.shape == ours[n].shape, n
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4 * max(1.0, float(ref.abs().max())), rtol=0,
                                   err_msg=n)


def test_backward_returns_the_projection_gradients_and_states_over_f():
    x = leaves(4, 9, False, "exp", True, False)
    q, k, v, W, b = (x[n].float().numpy() for n in ("q", "k", "v", "projection", "projection_bias"))
    o, final = omniattn.linear_attention(q, k, v, feature_map="exp", projection=W, projection_bias=b,
                                         output_final_state=True)
    assert final.shape == (B, H, 9, V)
    d_out = np.random.default_rng(1).uniform(-1, 1, o.shape).astype(np.float32)
    got = omniattn.linear_attention_backward(q, k, v, d_out, feature_map="exp", projection=W, projection_bias=b)
    ref = omniattn.linear_attention_backward(q, k, v, d_out, feature_map="exp", projection=W, projection_bias=b,
                                             backend="reference")
    assert got[0].shape == q.shape and got[6].shape == W.shape and got[7].shape == b.shape
    for a, r in zip(got, ref):
        if r is None:
            assert a is None
            continue
        np.testing.assert_allclose(a, r, atol=5e-5 * max(1.0, float(np.abs(r).max())), rtol=0)


def test_performer_approaches_softmax_attention():
    rng = np.random.default_rng(2)
    q, k = (rng.uniform(-0.5, 0.5, (1, 40, 2, 4)).astype(np.float32) for _ in range(2))
    v = rng.uniform(-1, 1, (1, 40, 2, 3)).astype(np.float32)
    s = np.einsum("bihk,bjhk->bhij", q.astype(np.float64), k.astype(np.float64))
    p = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    want = np.einsum("bhij,bjhv->bihv", p, v)
    errors = []
    for F in (16, 4096):
        W = omniattn.performer_projection(2, 4, F, seed=1)
        o, _ = omniattn.linear_attention(q, k, v, feature_map="performer", projection=W, scale=1.0, causal=False,
                                         normalize=True)
        errors.append(float(np.abs(o - want).max()))
    assert errors[1] < 0.03 and errors[1] < errors[0] / 3, errors


def test_a_hedgehog_map_learns_to_mimic_softmax():
    """Hedgehog's distillation in a few steps: train W (then softmax over features) so that normalised linear
    attention approaches softmax attention on the same q, k, v; the gradients come through the library's backward."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.rand(1, 32, 1, 8, generator=gen) * 2 - 1 for _ in range(2))
    v = torch.rand(1, 32, 1, 4, generator=gen) * 2 - 1
    p = torch.softmax(torch.einsum("bihk,bjhk->bhij", q, k) * 8 ** -0.5 * 4, -1)
    target = torch.einsum("bhij,bjhv->bihv", p, v)
    W = (torch.randn(8, 16, generator=gen) * 0.1).requires_grad_()
    opt = torch.optim.Adam([W], lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        o, _ = omniattn.linear_attention(q, k, v, feature_map="softmax", projection=W, causal=False, normalize=True)
        loss = ((o - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_errors_are_the_librarys():
    x = leaves(5, 4, False, "exp", False, False)
    q, k, v, W = (x[n].float().numpy() for n in ("q", "k", "v", "projection"))
    with pytest.raises(ValueError, match=r"spec.projection.weight has 72 values, expected heads x K x F = 3 x 6 x 6"):
        omniattn.linear_attention(q, k, v, projection=np.zeros((H, 4, 6), np.float32))
    with pytest.raises(ValueError, match=r"spec.phi performer needs spec.projection"):
        omniattn.linear_attention(q, k, v, feature_map="performer")
    with pytest.raises(ValueError, match=r"projection_bias without projection"):
        omniattn.linear_attention(q, k, v, projection_bias=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"'identity', 'elu_plus_one', 'relu', 'softmax', 'exp', 'performer', 'sigmoid', not 'tanh'"):
        omniattn.linear_attention(q, k, v, feature_map="tanh")
    with pytest.raises(ValueError, match=r"options.initial_state is \[2, 3, 6, 4\], expected \[2, 3, 4, 4\]"):
        omniattn.linear_attention(q, k, v, projection=W, initial_state=np.zeros((B, H, K, V), np.float32))
