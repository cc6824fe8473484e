"""omniattn.nn.MultiheadAttention against torch.nn.MultiheadAttention in eval mode, with the same weights."""

import pytest

torch = pytest.importorskip("torch")

import omniattn  # noqa: E402
from omniattn.nn import MultiheadAttention  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-5)


def pair(seed, embed_dim=32, num_heads=4, **kwargs):
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(embed_dim, num_heads, **kwargs).eval()
    with torch.no_grad():  # non-zero biases, so they are exercised
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = MultiheadAttention(embed_dim, num_heads, **kwargs).eval()
    ours.load_state_dict(ref.state_dict())  # strict: the same parameter names and shapes
    return ref, ours


def inputs(gen, n, lq, lk, e, batch_first, kdim=None, vdim=None):
    def t(length, dim):
        shape = (n, length, dim) if batch_first else (length, n, dim)
        return torch.randn(*shape, generator=gen)
    return t(lq, e), t(lk, kdim or e), t(lk, vdim or e)


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(7)
    return g


def test_state_dict_names_match_torch():
    ref, ours = pair(0)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref, ours = pair(0, kdim=12, vdim=20)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert isinstance(omniattn.nn.MultiheadAttention(8, 2), torch.nn.Module)


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention(gen, batch_first):
    ref, ours = pair(1, batch_first=batch_first)
    x, _, _ = inputs(gen, 3, 10, 10, 32, batch_first)
    with torch.no_grad():
        want, _ = ref(x, x, x, need_weights=False)
        got, weights = ours(x, x, x)
    assert weights is None
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("batch_first", [False, True])
def test_cross_attention_kdim_vdim(gen, batch_first):
    ref, ours = pair(2, kdim=12, vdim=20, batch_first=batch_first)
    q, k, v = inputs(gen, 2, 5, 9, 32, batch_first, kdim=12, vdim=20)
    with torch.no_grad():
        want, _ = ref(q, k, v, need_weights=False)
        got, _ = ours(q, k, v)
    torch.testing.assert_close(got, want, **TOL)


def test_masks(gen):
    ref, ours = pair(3)
    q, k, v = inputs(gen, 2, 6, 8, 32, False)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 5:] = True
    padding[1, 0] = True
    blocked = torch.rand(6, 8, generator=gen) < 0.3
    blocked[:, 1:4] = False  # keep at least some keys for every row
    additive = torch.randn(2 * 4, 6, 8, generator=gen)
    with torch.no_grad():
        for kw in (dict(key_padding_mask=padding), dict(attn_mask=blocked), dict(attn_mask=additive),
                   dict(attn_mask=blocked, key_padding_mask=padding),
                   dict(attn_mask=additive, key_padding_mask=padding),
                   dict(key_padding_mask=torch.where(padding, -1e9, 0.0))):
            want, _ = ref(q, k, v, need_weights=False, **kw)
            got, _ = ours(q, k, v, **kw)
            torch.testing.assert_close(got, want, **TOL)


def test_is_causal_is_top_left(gen):
    ref, ours = pair(4, batch_first=True)
    x, _, _ = inputs(gen, 2, 7, 7, 32, True)
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        want, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
        got, _ = ours(x, x, x, is_causal=True)
    torch.testing.assert_close(got, want, **TOL)


def test_unbatched(gen):
    ref, ours = pair(5)
    x = torch.randn(6, 32, generator=gen)
    with torch.no_grad():
        want, _ = ref(x, x, x, need_weights=False)
        got, _ = ours(x, x, x)
    assert got.shape == (6, 32)
    torch.testing.assert_close(got, want, **TOL)


def test_no_bias(gen):
    ref, ours = pair(6, bias=False)
    x, _, _ = inputs(gen, 2, 5, 5, 32, False)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, x, x)[0], ref(x, x, x, need_weights=False)[0], **TOL)


def test_bfloat16_module(gen):
    ref, ours = pair(7)
    ours = ours.to(torch.bfloat16)
    x, _, _ = inputs(gen, 2, 5, 5, 32, False)
    with torch.no_grad():
        got, _ = ours(x.bfloat16(), x.bfloat16(), x.bfloat16())
        want, _ = ref(x, x, x, need_weights=False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_unsupported(gen):
    _, ours = pair(8)
    x, _, _ = inputs(gen, 2, 5, 5, 32, False)
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="need_weights"):
            ours(x, x, x, need_weights=True)
        ours.train()
        ours.dropout = 0.1
        with pytest.raises(NotImplementedError, match="dropout"):
            ours(x, x, x)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        MultiheadAttention(32, 4, add_bias_kv=True)


@pytest.mark.parametrize("batch_first", [False, True])
def test_gradients_match_torch(gen, batch_first):
    """Autograd on (the parameters require grad): the input and parameter gradients are torch's."""
    ref, ours = pair(9, batch_first=batch_first)
    x, _, _ = inputs(gen, 3, 6, 6, 32, batch_first)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True  # key padding
    grads = []
    for module, kw in ((ref, dict(need_weights=False)), (ours, {})):
        xi = x.clone().requires_grad_()
        y, _ = module(xi, xi, xi, key_padding_mask=pad, **kw)
        (y * y).sum().backward()
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
