"""omniattn.linear_attention_backward and the torch autograd of linear_attention, against torch autograd through a
plain torch recurrence of fla's formula written here (float64), and against the library's fp64 oracle; errors."""

import numpy as np
import pytest

import omniattn

torch = pytest.importorskip("torch")

B, T, H, K, V = 2, 23, 3, 6, 5


def torch_recurrence(q, k, v, g=None, head_log_decay=None, s0=None, feature_map="identity", normalize=False):
    """o_t = scale phi(q_t) S_t / (normalize: scale phi(q_t) . z_t), S_t = diag(exp(g_t)) S_{t-1} + phi(k_t)^T v_t."""
    phi = {"identity": lambda x: x, "elu_plus_one": lambda x: torch.nn.functional.elu(x) + 1,
           "relu": torch.relu, "softmax": lambda x: torch.softmax(x, -1)}[feature_map]
    q, k = phi(q) * K ** -0.5, phi(k)
    outs, finals = [], []
    for b in range(B):
        row, fin = [], []
        for h in range(H):
            S = torch.zeros(K, V, dtype=torch.float64) if s0 is None else s0[b, h]
            z = torch.zeros(K, dtype=torch.float64)
            o = []
            for t in range(T):
                if head_log_decay is not None:
                    a = torch.exp(head_log_decay[h]).expand(K)
                elif g is None:
                    a = torch.ones(K, dtype=torch.float64)
                elif g.dim() == 3:
                    a = torch.exp(g[b, t, h]).expand(K)
                else:
                    a = torch.exp(g[b, t, h])
                S = a[:, None] * S + torch.outer(k[b, t, h], v[b, t, h])
                z = a * z + k[b, t, h]
                num = q[b, t, h] @ S
                o.append(num / (q[b, t, h] @ z) if normalize else num)
            row.append(torch.stack(o))
            fin.append(S)
        outs.append(torch.stack(row, 1))
        finals.append(torch.stack(fin))
    return torch.stack(outs), torch.stack(finals)


def leaves(seed, decay):
    gen = torch.Generator().manual_seed(seed)
    u = lambda *shape, lo=-1.0, hi=1.0: (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)
    x = dict(q=u(B, T, H, K), k=u(B, T, H, K), v=u(B, T, H, V), s0=u(B, H, K, V))
    if decay == "scalar":
        x["g"] = u(B, T, H, lo=-0.5, hi=0.0)
    elif decay == "channel":
        x["g"] = u(B, T, H, K, lo=-0.5, hi=0.0)
    elif decay == "fixed":
        x["head_log_decay"] = torch.log(1 - 2.0 ** (-2 - torch.arange(H, dtype=torch.float64)))
    return x


@pytest.mark.parametrize("decay", [None, "fixed", "scalar", "channel"])
@pytest.mark.parametrize("feature_map", ["identity", "elu_plus_one"])
def test_autograd_matches_torch_through_a_recurrence(decay, feature_map):
    x = leaves(3, decay)
    ours = {n: t.float().requires_grad_() for n, t in x.items()}
    theirs = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, final = omniattn.linear_attention(ours["q"], ours["k"], ours["v"], g=ours.get("g"),
                                         head_log_decay=ours.get("head_log_decay"), initial_state=ours["s0"],
                                         feature_map=feature_map, output_final_state=True, chunk_size=8)
    wo, wf = torch_recurrence(theirs["q"], theirs["k"], theirs["v"], theirs.get("g"), theirs.get("head_log_decay"),
                              theirs["s0"], feature_map)
    gen = torch.Generator().manual_seed(5)
    do, dfin = torch.rand(o.shape, generator=gen) - 0.5, torch.rand(final.shape, generator=gen) - 0.5
    ((o * do).sum() + (final * dfin).sum()).backward()
    ((wo * do.double()).sum() + (wf * dfin.double()).sum()).backward()
    np.testing.assert_allclose(o.detach().numpy(), wo.detach().numpy(), atol=3e-5, rtol=0)
    for n in x:
        got, want = ours[n].grad, theirs[n].grad
        assert got is not None, n
        scale = max(1.0, float(want.abs().max()))
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * scale, rtol=0, err_msg=n)


def test_normalize_and_prefix_gradients():
    x = leaves(7, None)
    for kw in (dict(feature_map="softmax", normalize=True), dict(prefix=9), dict(causal=False, feature_map="relu")):
        q, k, v = (x[n].float().requires_grad_() for n in "qkv")
        o, _ = omniattn.linear_attention(q, k, v, **kw)
        o.square().sum().backward()
        d_out = 2 * o.detach()
        want = omniattn.linear_attention_backward(q.detach(), k.detach(), v.detach(), d_out, backend="reference", **kw)
        for got, ref in zip((q.grad, k.grad, v.grad), want[:3]):
            np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=2e-5 * max(1.0, float(ref.abs().max())), rtol=0)
    # normalize against the torch recurrence (softmax features keep q . z away from 0)
    q, k, v = (x[n].float().requires_grad_() for n in "qkv")
    o, _ = omniattn.linear_attention(q, k, v, feature_map="softmax", normalize=True)
    tq, tk, tv = (x[n].clone().requires_grad_() for n in "qkv")
    wo, _ = torch_recurrence(tq, tk, tv, feature_map="softmax", normalize=True)
    o.sum().backward()
    wo.sum().backward()
    for got, want in ((q.grad, tq.grad), (k.grad, tk.grad), (v.grad, tv.grad)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * max(1.0, float(want.abs().max())), rtol=0)


def test_numpy_backward_and_bf16():
    x = leaves(9, "scalar")
    q, k, v, g = (x[n].float().numpy() for n in ("q", "k", "v", "g"))
    d_out = np.random.default_rng(1).uniform(-1, 1, (B, T, H, V)).astype(np.float32)
    got = omniattn.linear_attention_backward(q, k, v, d_out, g=g)
    ref = omniattn.linear_attention_backward(q, k, v, d_out, g=g, backend="reference")
    assert got[3].shape == (B, T, H) and got[4] is None and got[5] is None
    for a, b in zip(got[:4], ref[:4]):
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, float(np.abs(b).max())), rtol=0)
    qb, kb, vb = (torch.from_numpy(a).bfloat16().requires_grad_() for a in (q, k, v))
    o, _ = omniattn.linear_attention(qb, kb, vb, g=torch.from_numpy(g))
    o.float().sum().backward()
    assert qb.grad.dtype == torch.bfloat16
    # the same bf16 inputs read in float32: the gradients are those rounded to bf16
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (qb, kb, vb))
    o32, _ = omniattn.linear_attention(q32, k32, v32, g=torch.from_numpy(g))
    o32.sum().backward()
    for got, want in ((qb.grad, q32.grad), (kb.grad, k32.grad), (vb.grad, v32.grad)):
        np.testing.assert_allclose(got.float().numpy(), want.numpy(), atol=1e-2 * float(want.abs().max()), rtol=0)


def test_constant_decays_and_initial_state_from_numpy():
    """Only q, k, v require grad; the decay and the state are numpy constants (no gradient, no error)."""
    x = leaves(4, "fixed")
    q, k, v = (x[n].float().requires_grad_() for n in "qkv")
    hd, s0 = x["head_log_decay"].float().numpy(), x["s0"].float().numpy()
    o, final = omniattn.linear_attention(q, k, v, head_log_decay=hd, initial_state=s0, output_final_state=True)
    (o.sum() + final.sum()).backward()
    tq, tk, tv = (x[n].clone().requires_grad_() for n in "qkv")
    wo, wf = torch_recurrence(tq, tk, tv, head_log_decay=x["head_log_decay"], s0=x["s0"])
    (wo.sum() + wf.sum()).backward()
    for got, want in ((q.grad, tq.grad), (k.grad, tk.grad), (v.grad, tv.grad)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * max(1.0, float(want.abs().max())), rtol=0)
    # a learnable head_log_decay under no_grad (eval) is read as a constant
    p = torch.nn.Parameter(x["head_log_decay"].float())
    with torch.no_grad():
        o2, _ = omniattn.linear_attention(q, k, v, head_log_decay=p, initial_state=s0)
    np.testing.assert_allclose(o2.numpy(), o.detach().numpy(), atol=1e-6, rtol=0)


def test_errors():
    x = leaves(1, None)
    q, k, v = (x[n].float().numpy() for n in "qkv")
    with pytest.raises(ValueError, match=r"\[linear_attention_backward\] d_out.dim 4 != v.dim 5"):
        omniattn.linear_attention_backward(q, k, v, np.zeros((B, T, H, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[linear_attention_backward\] grads\.d_final_state is \[2, 3, 6, 2\]"):
        omniattn.linear_attention_backward(q, k, v, np.zeros((B, T, H, V), np.float32),
                                           d_final_state=np.zeros((B, H, K, 2), np.float32))


def test_varlen_matches_separate_calls_forward_and_backward():
    """cu_seqlens (fla's varlen): packed sequences, each with its own state, equal one call per sequence."""
    lens = [5, 0, 17, 1, 9]
    cu = np.cumsum([0] + lens)
    total, N = int(cu[-1]), len(lens)
    gen = torch.Generator().manual_seed(8)
    q, k = (torch.rand(1, total, H, K, generator=gen) - 0.5 for _ in range(2))
    v = torch.rand(1, total, H, V, generator=gen) - 0.5
    g = -torch.rand(1, total, H, generator=gen) * 0.3
    s0 = torch.rand(N, H, K, V, generator=gen) - 0.5
    leaves_packed = [x.clone().requires_grad_() for x in (q, k, v, g, s0)]
    o, final = omniattn.linear_attention(*leaves_packed[:3], g=leaves_packed[3], initial_state=leaves_packed[4],
                                         output_final_state=True, cu_seqlens=cu, chunk_size=4)
    assert o.shape == (1, total, H, V) and final.shape == (N, H, K, V)
    (o.square().sum() + final.sum()).backward()
    for s in range(N):
        a, b = int(cu[s]), int(cu[s + 1])
        parts = [x[:, a:b].clone().requires_grad_() for x in (q, k, v, g)] + [s0[s:s + 1].clone().requires_grad_()]
        o1, f1 = omniattn.linear_attention(*parts[:3], g=parts[3], initial_state=parts[4], output_final_state=True,
                                           chunk_size=4)
        np.testing.assert_array_equal(o1.detach().numpy(), o.detach()[:, a:b].numpy())
        np.testing.assert_array_equal(f1.detach().numpy(), final.detach()[s:s + 1].numpy())
        if b > a:
            (o1.square().sum() + f1.sum()).backward()
            for got, one in zip(leaves_packed[:4], parts[:4]):
                np.testing.assert_array_equal(got.grad[:, a:b].numpy(), one.grad.numpy())
            np.testing.assert_array_equal(leaves_packed[4].grad[s:s + 1].numpy(), parts[4].grad.numpy())
    with pytest.raises(TypeError, match="cumulative sequence lengths must be integers"):
        omniattn.linear_attention(q, k, v, cu_seqlens=np.array([0.0, 2.5, float(total)]))
    with pytest.raises(ValueError, match=r"\[linear_attention\] options.cu_seqlens ends at 3, expected q.seq"):
        omniattn.linear_attention(q, k, v, cu_seqlens=[0, 3])
