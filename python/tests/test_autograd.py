"""Gradients from Python: torch.autograd through omniattn.attention (float64 gradcheck on the reference backend; the
float32 CPU kernel against torch's own autograd of plain torch attention math), numpy attention_backward against
the same autograd, scaled_dot_product_attention and nn.MultiheadAttention training, and the backward's errors."""

import numpy as np
import pytest

import omniattn
from omniattn import masks, scores

from _helpers import math_attention

torch = pytest.importorskip("torch")

# float32 CPU kernel gradients against float64 torch math: unit-normal inputs, rows of <= 16 keys, gradients O(1).
GRAD_TOL = dict(atol=2e-4, rtol=1e-4)


def make(gen, b=2, hq=4, hkv=2, lq=7, lk=11, d=8, dv=6, dtype=torch.float32):
    """bhsd leaf tensors that require grad."""
    shapes = [(b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


@pytest.fixture
def gen(request):
    g = torch.Generator()
    g.manual_seed(sum(map(ord, request.node.name)))
    return g


SLOPES = [0.5, 0.25, 0.125, 0.0625]


def softcap_math(cap):
    return lambda s, h, i, j: cap * torch.tanh(s / cap)


def alibi_math(slopes, lq, lk):
    return lambda s, h, i, j: s + torch.tensor(slopes, dtype=s.dtype)[h] * (j - i + (lq - lk))


# Each case: omniattn keyword arguments and the matching math_attention keyword arguments, for (lq, lk) = (7, 11).
def cases():
    window = masks.sliding_window(3) | masks.sinks(1)
    allowed = torch.from_numpy(window.to_dense(1, 1, 7, 11))
    return {
        "dense": ({}, {}),
        "causal_bottom_right": (dict(causal=True), dict(causal="bottom_right")),
        "causal_top_left": (dict(causal="top_left"), dict(causal="top_left")),
        "mask_pattern": (dict(mask=window), dict(allowed=allowed)),
        "mask_function": (dict(mask=lambda b, h, i, j: (i + j) % 3 != 1), dict(allowed=(torch.arange(7)[:, None] + torch.arange(11)) % 3 != 1)),
        "softcap": (dict(score=scores.softcap(1.5), scale=1.0), dict(score=softcap_math(1.5), scale=1.0)),
        "alibi_causal": (dict(score=scores.alibi(SLOPES), causal=True), dict(score=alibi_math(SLOPES, 7, 11), causal="bottom_right")),
        "alibi_softcap_spec": (dict(score=scores.alibi(SLOPES) >> scores.softcap(2.0)),
                               dict(score=lambda s, h, i, j: softcap_math(2.0)(alibi_math(SLOPES, 7, 11)(s, h, i, j), h, i, j))),
        "python_score": (dict(score=lambda s, b, h, q, k: 0.5 * s + 0.1 * (k - q)), dict(score=lambda s, h, i, j: 0.5 * s + 0.1 * (j - i))),
        "rope": (dict(rope=True, causal=True), dict(rope=True, causal="bottom_right")),
    }


CASES = cases()


# --- float64 gradcheck through the reference backend ------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_float64(gen, name):
    kw, _ = CASES[name]
    q, k, v = make(gen, b=1, lq=7, lk=11, d=4, dv=3, dtype=torch.float64)
    assert "reference" in omniattn.explain(q, k, v, layout="bhsd", **kw).splitlines()[0]  # f64: the oracle serves it
    torch.autograd.gradcheck(lambda q, k, v: omniattn.attention(q, k, v, layout="bhsd", **kw), (q, k, v))


def test_gradcheck_float64_sinks(gen):
    # Sink logits are float32 in the library: dyadic values and a power-of-two step keep every perturbed sink exact.
    q, k, v = make(gen, b=1, lq=5, lk=6, d=4, dv=3, dtype=torch.float64)
    sinks = torch.tensor([0.25, -0.5, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v, s: omniattn.attention(q, k, v, layout="bhsd", causal=True, sink_logits=s),
                             (q, k, v, sinks), eps=2.0 ** -12, atol=1e-6)


def test_gradcheck_float64_varlen_bshd(gen):
    cu_q, cu_k = [0, 3, 7], [0, 5, 9]
    q = torch.randn(7, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(9, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v: omniattn.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
                             (q, k, v))


# --- float32 CPU kernel against torch's autograd of the math --------------------------------------------------------


def grads_of(fn, tensors, d_out):
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    (out.double() * d_out).sum().backward()
    return out, [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_gradients_match_torch_autograd(gen, name):
    kw, math_kw = CASES[name]
    q, k, v = make(gen)
    assert omniattn.explain(q, k, v, layout="bhsd", backward=True, **kw).startswith("kernel: cpu.flash_bwd<f32>")
    d_out = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    out, got = grads_of(lambda q, k, v: omniattn.attention(q, k, v, layout="bhsd", backend="cpu", **kw), (q, k, v), d_out)
    assert out.dtype == torch.float32 and out.requires_grad and all(g.dtype == torch.float32 for g in got)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out, want = grads_of(lambda q, k, v: math_attention(q, k, v, **math_kw), leaves, d_out)
    torch.testing.assert_close(out.double(), want_out, atol=3e-5, rtol=0)
    for name_, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, **GRAD_TOL, msg=lambda m: f"{name_}: {m}")
        assert w.abs().max() > 0.05  # a real gradient


def test_sinks_and_bias_gradients(gen):
    q, k, v = make(gen)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    bias = torch.randn(1, 4, 7, 11, generator=gen).requires_grad_()  # broadcast over the batch: d_bias sums it
    d_out = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    out, got = grads_of(lambda q, k, v, s, b: omniattn.attention(q, k, v, layout="bhsd", causal=True, sink_logits=s,
                                                                  score=b), (q, k, v, sinks, bias), d_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks, bias)]
    _, want = grads_of(lambda q, k, v, s, b: math_attention(q, k, v, causal="bottom_right", sinks=s,
                                                            score=lambda x, h, i, j: x + b), leaves, d_out)
    assert got[3].shape == (4,) and got[4].shape == (1, 4, 7, 11) and got[3].dtype == got[4].dtype == torch.float32
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **GRAD_TOL)


def test_gqa_dk_dv_are_group_sums(gen):
    q, k, v = make(gen, hq=6, hkv=2)
    d_out = torch.randn(2, 6, 7, 6, generator=gen, dtype=torch.float64)
    _, got = grads_of(lambda q, k, v: omniattn.attention(q, k, v, layout="bhsd"), (q, k, v), d_out)
    # The same call with K / V repeated per query head: dk, dv of the shared heads are the sums over their group.
    kr, vr = (t.detach().repeat_interleave(3, dim=1).requires_grad_() for t in (k, v))
    qr = q.detach().requires_grad_()
    _, full = grads_of(lambda q, k, v: omniattn.attention(q, k, v, layout="bhsd"), (qr, kr, vr), d_out)
    torch.testing.assert_close(got[0], full[0], atol=1e-5, rtol=0)
    for g, f in zip(got[1:], full[1:]):
        torch.testing.assert_close(g, f.unflatten(1, (2, 3)).sum(2), atol=1e-5, rtol=0)


def test_bf16_gradients(gen):
    q, k, v = make(gen, dtype=torch.bfloat16)
    d_out = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    out, got = grads_of(lambda q, k, v: omniattn.attention(q, k, v, layout="bhsd", causal=True), (q, k, v), d_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, want = grads_of(lambda q, k, v: math_attention(q, k, v, causal="bottom_right"), leaves, d_out)
    for g, w in zip(got, want):  # bf16 inputs and gradients: 8 mantissa bits
        torch.testing.assert_close(g.double(), w, atol=3e-2 * float(w.abs().max()), rtol=2e-2)


def test_only_the_inputs_that_require_grad_get_one(gen):
    q, k, v = make(gen)
    k.requires_grad_(False)
    out, lse = omniattn.attention(q, k, v, layout="bhsd", return_lse=True)
    assert out.requires_grad and not lse.requires_grad  # lse is a constant of the graph
    out.sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is not None
    with torch.no_grad():
        assert not omniattn.attention(q, k, v, layout="bhsd").requires_grad


def test_out_buffer_under_autograd(gen):
    q, k, v = make(gen)
    buf = torch.empty(2, 7, 4, 6)  # bshd memory, written through a bhsd view
    out = omniattn.attention(q, k, v, layout="bhsd", out=buf.transpose(1, 2))
    assert out.data_ptr() == buf.data_ptr() and buf.requires_grad
    buf.sum().backward()
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    omniattn.attention(q2, k2, v2, layout="bhsd").sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"^\[attention\] out.seq 6 != q.seq 7$"):
        omniattn.attention(q, k, v, layout="bhsd", out=torch.empty(2, 4, 6, 6))


def test_double_backward_is_refused(gen):
    q, k, v = make(gen)
    out = omniattn.attention(q, k, v, layout="bhsd")
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


def test_autograd_runs_attention_backward(gen):
    """loss.backward() gives what omniattn.attention_backward gives for the same call: the same C++ call, same bits."""
    q, k, v = make(gen)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    d_out = torch.randn(2, 4, 7, 6, generator=gen)
    kw = dict(layout="bhsd", causal=True, score=scores.softcap(3.0))
    (omniattn.attention(q, k, v, sink_logits=sinks, **kw) * d_out).sum().backward()
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out, lse = omniattn.attention(qd, kd, vd, sink_logits=sinks.detach(), return_lse=True, **kw)
    want = omniattn.attention_backward(qd, kd, vd, out, lse, d_out, sink_logits=sinks.detach(), return_d_sink=True, **kw)
    for t, w in zip((q, k, v, sinks), want):
        assert isinstance(w, torch.Tensor)
        torch.testing.assert_close(t.grad, w, atol=0, rtol=0)


# --- training ---------------------------------------------------------------------------------------------------------


def test_sdpa_trains(gen):
    q, k, v = make(gen, hkv=4)
    mask = torch.randn(7, 11, generator=gen).requires_grad_()  # a float attn_mask that learns
    d_out = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    _, got = grads_of(lambda q, k, v, m: omniattn.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, mask), d_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    _, want = grads_of(lambda q, k, v, m: math_attention(q, k, v, score=lambda s, h, i, j: s + m), leaves, d_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **GRAD_TOL)
    _, got = grads_of(lambda q, k, v: omniattn.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), d_out)
    _, want = grads_of(lambda q, k, v: math_attention(q, k, v, causal="top_left"), leaves[:3], d_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **GRAD_TOL)


class TinyModel(torch.nn.Module):
    """Embedding, one causal self-attention block, a linear head: next-token prediction."""

    def __init__(self, mha, vocab=13, embed=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed)
        self.attn = mha
        self.head = torch.nn.Linear(embed, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        n = tokens.shape[1 if self.attn.batch_first else 0]
        if isinstance(self.attn, omniattn.nn.MultiheadAttention):
            y, _ = self.attn(x, x, x, is_causal=True)
        else:
            y, _ = self.attn(x, x, x, attn_mask=torch.ones(n, n, dtype=torch.bool).triu(1), need_weights=False)
        return self.head(x + y)


@pytest.mark.parametrize("batch_first", [True, False])
def test_tiny_model_trains_like_torch(batch_first):
    torch.manual_seed(0)
    ref = TinyModel(torch.nn.MultiheadAttention(16, 4, batch_first=True))
    ours = TinyModel(omniattn.nn.MultiheadAttention(16, 4, batch_first=True))
    ours.load_state_dict(ref.state_dict())  # the same initial weights
    if not batch_first:  # the module's other layout, through the same weights
        ref.attn.batch_first = ours.attn.batch_first = False
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 13, (4, 12), generator=gen)
    curves = []
    for model in (ref, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            x = tokens if batch_first else tokens.t()
            logits = model(x)
            if not batch_first:
                logits = logits.transpose(0, 1)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    want, got = curves
    assert want[-1] < 0.8 * want[0]  # it learns
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")



def test_autograd_forward_errors_come_from_cpp(gen):
    q, k, v = make(gen)
    with pytest.raises(ValueError, match=r"^\[attention\] k.dim 4 != q.dim 8$"):
        omniattn.attention(q, k[..., :4], v, layout="bhsd")
    with pytest.raises(TypeError, match=r"^\[attention\] k.type f64 != q.type f32$"):
        omniattn.attention(q, k.double(), v.double(), layout="bhsd")
