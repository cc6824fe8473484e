"""omniattn.KVCache and omniattn.decode: cache operations (append / read over page sizes, fork copy-on-write,
eviction, truncate, top-K, memory), decode against omniattn.attention on the full sequence (rows L - Lq .. L - 1,
causal bottom-right; RoPE, GQA, masks, scores, sinks, bf16 storage, batches of unequal lengths, torch), key mass,
explain, and the library's errors."""

import numpy as np
import pytest

import omniattn
from omniattn import masks, scores

TOL = dict(atol=2e-5, rtol=0)


def tokens(rng, n, heads, dim):
    return rng.standard_normal((n, heads, dim), dtype=np.float32)


def filled(rng, length, *, heads_kv=2, dim=8, dim_v=None, chunk=5, **config):
    """A cache with one sequence of `length` tokens appended in chunks; returns (cache, seq, k, v) with k / v the
    appended [length, heads_kv, dim] rows."""
    dim_v = dim if dim_v is None else dim_v
    cache = omniattn.KVCache(heads_kv, dim, head_dim_v=dim_v, **config)
    seq = cache.add_sequence()
    k, v = tokens(rng, length, heads_kv, dim), tokens(rng, length, heads_kv, dim_v)
    for t in range(0, length, chunk):
        cache.append(seq, k[t:t + chunk], v[t:t + chunk])
    return cache, seq, k, v


def full_rows(q_rows, k, v, lq, rng, **spec):
    """attention() on the whole sequence (Lq = Lk = L), rows L - lq .. L - 1: q_rows [1, lq, hq, d] replace the last
    rows of a random q."""
    L, hq = k.shape[0], q_rows.shape[2]
    q = rng.standard_normal((1, L, hq, k.shape[2]), dtype=np.float32)
    q[:, L - lq:] = q_rows
    out, lse = omniattn.attention(q, k[None], v[None], return_lse=True, **spec)
    return out[:, L - lq:], lse[:, :, L - lq:]


@pytest.mark.parametrize("page_size", [1, 7, 16])
def test_append_read_roundtrip(rng, page_size):
    cache, seq, k, v = filled(rng, 37, dim=6, dim_v=5, page_size=page_size)
    assert cache.length(seq) == 37 and cache.page_size == page_size
    k4, v4 = tokens(rng, 3, 2, 6)[None], tokens(rng, 3, 2, 5)[None]  # [1, n, heads_kv, dim] and strided views
    cache.append(seq, k4[:, :, ::-1].copy()[:, :, ::-1], v4)
    k, v = np.concatenate([k, k4[0]]), np.concatenate([v, v4[0]])
    for h in range(2):
        assert cache.cached(seq, h) == 40
        np.testing.assert_array_equal(cache.cached_tokens(seq, h), np.arange(40))
        got_k, got_v = cache.read(seq, h)
        assert got_k.dtype == np.float32 and got_k.shape == (40, 6) and got_v.shape == (40, 5)
        np.testing.assert_array_equal(got_k, k[:, h])
        np.testing.assert_array_equal(got_v, v[:, h])


def test_torch_append_and_bf16_storage(rng):
    torch = pytest.importorskip("torch")
    for dtype in ("bf16", torch.bfloat16, np.float16, "f16"):
        cache = omniattn.KVCache(2, 8, dtype=dtype, page_size=4)
        assert cache.dtype in ("bf16", "f16")
    cache = omniattn.KVCache(2, 8, dtype=torch.bfloat16, page_size=4)
    seq = cache.add_sequence()
    k = torch.randn(9, 2, 8, dtype=torch.bfloat16)
    v = torch.randn(9, 2, 8)
    cache.append(seq, k, v)
    got_k, got_v = cache.read(seq, 1)
    np.testing.assert_array_equal(got_k, k[:, 1].float().numpy())  # bf16 in, bf16 stored: exact
    np.testing.assert_array_equal(got_v, v[:, 1].bfloat16().float().numpy())  # f32 rounded to bf16 on append


def test_fork_is_copy_on_write(rng):
    cache, root, k, v = filled(rng, 32, page_size=16)
    before = cache.memory()
    child = cache.fork(root)
    assert cache.memory()["pages_in_use"] == before["pages_in_use"]  # shared, not copied
    k2, v2 = tokens(rng, 3, 2, 8), tokens(rng, 3, 2, 8)
    cache.append(child, k2, v2)
    assert cache.length(child) == 35 and cache.length(root) == 32
    np.testing.assert_array_equal(cache.read(root, 0)[0], k[:, 0])
    np.testing.assert_array_equal(cache.read(child, 0)[0], np.concatenate([k, k2])[:, 0])
    cache.truncate(child, 20)  # changes a shared page: copied, the root keeps its tokens
    np.testing.assert_array_equal(cache.read(root, 1)[1], v[:, 1])
    np.testing.assert_array_equal(cache.cached_tokens(child, 1), np.arange(20))
    cache.free(child)
    assert not cache.alive(child) and cache.alive(root)


def test_eviction_keeps_sinks_and_window(rng):
    cache = omniattn.KVCache(2, 4, page_size=3)
    seq = cache.add_sequence()
    cache.set_eviction(sinks=2, window=6, kv_head=0)  # head 1 keeps everything (DuoAttention's retrieval heads)
    for _ in range(20):
        cache.append(seq, tokens(rng, 1, 2, 4), tokens(rng, 1, 2, 4))
    # before the last append (length 19) head 0 kept the tokens a query at index >= 19 may see: < 2 and > 19 - 6
    np.testing.assert_array_equal(cache.cached_tokens(seq, 0), [0, 1, 14, 15, 16, 17, 18, 19])
    np.testing.assert_array_equal(cache.cached_tokens(seq, 1), np.arange(20))
    assert cache.length(seq) == 20 and cache.cached(seq, 0) == 8


def test_evicted_decode_matches_windowed_attention(rng):
    cache = omniattn.KVCache(2, 8, page_size=5)
    seq = cache.add_sequence()
    cache.set_eviction(sinks=3, window=8)
    k, v = tokens(rng, 30, 2, 8), tokens(rng, 30, 2, 8)
    for t in range(30):
        cache.append(seq, k[t:t + 1], v[t:t + 1])
    q = rng.standard_normal((1, 1, 4, 8), dtype=np.float32)
    out = omniattn.decode(q, cache, [seq])
    want, _ = full_rows(q, k, v, 1, rng, mask=masks.sinks(3) | masks.sliding_window(7))
    np.testing.assert_allclose(out, want, **TOL)


def test_memory_and_shrink(rng):
    cache, seq, _, _ = filled(rng, 40, page_size=16)
    m = cache.memory()
    assert set(m) == {"pages_in_use", "pages_free", "page_bytes", "data_bytes", "metadata_bytes", "tokens"}
    assert m["pages_in_use"] == 2 * 3 and m["data_bytes"] == m["pages_in_use"] * m["page_bytes"]
    assert m["tokens"] == 2 * 40 and m["page_bytes"] >= 16 * (8 + 16) * 4
    cache.free(seq)
    assert cache.memory()["pages_in_use"] == 0 and cache.memory()["pages_free"] == 6
    cache.shrink()
    assert cache.memory()["pages_free"] == 0


@pytest.mark.parametrize("lq", [1, 6])
@pytest.mark.parametrize("rope", [None, {"theta": 500.0}, {"rotary_dim": 4, "interleaved": True}])
@pytest.mark.parametrize("page_size", [1, 7, 16])
def test_decode_matches_attention_on_the_full_sequence(rng, lq, rope, page_size):
    # GQA 6 / 2; the cache's keys are the unrotated input: it rotates them on append, as attention(rope=) does
    cache, seq, k, v = filled(rng, 29, dim=8, dim_v=5, page_size=page_size, rope=rope)
    q = rng.standard_normal((1, lq, 6, 8), dtype=np.float32)
    out, lse = omniattn.decode(q, cache, [seq], causal=True, rope=rope, return_lse=True)
    want, want_lse = full_rows(q, k, v, lq, rng, causal=True, rope=rope)
    assert out.shape == (1, lq, 6, 5) and lse.shape == (1, 6, lq)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(lse, want_lse, **TOL)


def test_append_positions_and_rope_pos_q(rng):
    # caller positions (re-aligned ids): keys rotated at them on append, queries at rope["pos_q"]
    cache = omniattn.KVCache(2, 8, page_size=7, rope=True)
    seq = cache.add_sequence()
    k, v = tokens(rng, 21, 2, 8), tokens(rng, 21, 2, 8)
    pos = np.arange(21) + 40
    cache.append(seq, k[:15], v[:15], positions=pos[:15])
    cache.append(seq, k[15:], v[15:], positions=pos[15:])
    q = rng.standard_normal((1, 2, 4, 8), dtype=np.float32)
    out = omniattn.decode(q, cache, [seq], causal=True, rope={"pos_q": pos[-2:]})
    want, _ = full_rows(q, k, v, 2, rng, causal=True, rope={"pos_q": pos, "pos_k": pos})
    np.testing.assert_allclose(out, want, **TOL)
    with pytest.raises(ValueError, match="positions has 2 ids, expected 1"):
        cache.append(seq, k[:1], v[:1], positions=[1, 2])


def test_batch_of_unequal_sequences_and_flashinfer_shape(rng):
    cache = omniattn.KVCache(2, 8, page_size=4)
    lengths = [9, 20, 1]
    seqs, kv = [], []
    for n in lengths:
        seqs.append(cache.add_sequence())
        kv.append((tokens(rng, n, 2, 8), tokens(rng, n, 2, 8)))
        cache.append(seqs[-1], *kv[-1])
    q = rng.standard_normal((3, 4, 8), dtype=np.float32)  # [batch, heads_q, dim]: FlashInfer's BatchDecode
    out, lse = omniattn.decode(q, cache, seqs[::-1], return_lse=True, scale=0.3)
    assert out.shape == (3, 4, 8) and lse.shape == (3, 4)
    for b, (k, v) in enumerate(kv[::-1]):
        want, want_lse = full_rows(q[b:b + 1, None], k, v, 1, rng, scale=0.3)
        np.testing.assert_allclose(out[b], want[0, 0], **TOL)
        np.testing.assert_allclose(lse[b], want_lse[0, :, 0], **TOL)


def test_ragged_batch_mixes_prefill_chunks_and_decode_tokens(rng):
    # Continuous batching: new queries per sequence 5, 1, 0 and 3 in one call (FlashInfer's qo_indptr).
    cache = omniattn.KVCache(2, 8, page_size=4)
    lengths, news = [9, 20, 4, 3], [5, 1, 0, 3]
    seqs, kv = [], []
    for n in lengths:
        seqs.append(cache.add_sequence())
        kv.append((tokens(rng, n, 2, 8), tokens(rng, n, 2, 8)))
        cache.append(seqs[-1], *kv[-1])
    cu = np.concatenate([[0], np.cumsum(news)]).astype(np.int64)
    q = rng.standard_normal((int(cu[-1]), 4, 8), dtype=np.float32)  # [total, heads_q, dim]
    out, lse = omniattn.decode(q, cache, seqs, cu_seqlens_q=cu, causal=True, return_lse=True)
    assert out.shape == (cu[-1], 4, 8) and lse.shape == (4, cu[-1])
    for b, (k, v) in enumerate(kv):
        if news[b] == 0:
            continue
        rows = slice(cu[b], cu[b + 1])
        want, want_lse = full_rows(q[None, rows], k, v, news[b], rng, causal=True)
        np.testing.assert_allclose(out[rows], want[0], **TOL)
        np.testing.assert_allclose(lse[:, rows], want_lse[0], **TOL)
    with pytest.raises(ValueError, match=r"\[attention_decode\] options.cu_seqlens_q\[4\] 8 != q.seq 9"):
        omniattn.decode(q, cache, seqs, cu_seqlens_q=np.array([0, 5, 6, 6, 8]))


@pytest.mark.parametrize("case", ["builtin", "function", "table", "score_fn", "sinks"])
def test_masks_scores_and_sinks_as_attention(rng, case):
    cache, seq, k, v = filled(rng, 23, page_size=7)
    spec = {
        "builtin": dict(causal=True, mask=masks.sliding_window(5) | masks.sinks(2), score=scores.softcap(3.0)),
        "function": dict(causal=True, mask=lambda b, h, i, j: (i + j + h) % 3 != 0),
        "table": dict(mask=rng.random((1, 4, 23, 23)) > 0.3, score=rng.standard_normal((23, 23)).astype(np.float32)),
        "score_fn": dict(causal=True, score=lambda s, b, h, i, j: s - 0.1 * (i - j)),
        "sinks": dict(causal=True, sink_logits=np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32)),
    }[case]
    q = rng.standard_normal((1, 4, 4, 8), dtype=np.float32)
    out, lse = omniattn.decode(q, cache, seq, return_lse=True, **spec)
    want, want_lse = full_rows(q, k, v, 4, rng, **spec)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(lse, want_lse, **TOL)


def test_bf16_cache_and_torch_queries(rng):
    # bf16 K / V are stored exactly (without RoPE: rotated keys are rounded to bf16 after the rotation)
    torch = pytest.importorskip("torch")
    k = torch.randn(17, 2, 8).bfloat16()
    v = torch.randn(17, 2, 8).bfloat16()
    cache = omniattn.KVCache(2, 8, dtype="bf16", page_size=16)
    seq = cache.add_sequence()
    cache.append(seq, k, v)
    q = torch.randn(1, 3, 4, 8)
    out = omniattn.decode(q, cache, [seq], causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    want, _ = full_rows(q.numpy(), k.float().numpy(), v.float().numpy(), 3, rng, causal=True)
    np.testing.assert_allclose(out.numpy(), want, **TOL)
    out16 = omniattn.decode(q.bfloat16(), cache, [seq], causal=True)
    assert out16.dtype == torch.bfloat16 and out16.shape == (1, 3, 4, 8)
    np.testing.assert_allclose(out16.float().numpy(), want, atol=3e-2)


@pytest.mark.parametrize("lq", [1, 5])
def test_key_mass_and_keep_top_k(rng, lq):
    cache, seq, k, v = filled(rng, 40, page_size=16)
    q = rng.standard_normal((1, lq, 6, 8), dtype=np.float32)  # groups of 3 query heads per kv head
    out, mass = omniattn.decode(q, cache, [seq], causal=True, return_key_mass=True)
    assert mass.shape == (1, 2, 40) and mass.dtype == np.float32
    np.testing.assert_allclose(mass.sum(axis=-1), lq * 3, rtol=1e-5)  # each row's probabilities sum to 1
    cache.keep_top_k(seq, 1, mass[0, 1, :cache.cached(seq, 1)], 10)
    top = np.sort(np.argsort(-mass[0, 1], kind="stable")[:10])
    np.testing.assert_array_equal(cache.cached_tokens(seq, 1), top)
    assert cache.cached(seq, 0) == 40


def test_prefill_alias_and_explain(rng):
    assert omniattn.prefill is omniattn.decode
    cache, seq, _, _ = filled(rng, 12)
    q = rng.standard_normal((1, 12, 2, 8), dtype=np.float32)
    text = cache.explain(q, [seq], causal=True)
    assert text.startswith("kernel: ") or text.startswith("no auto kernel")
    assert cache.explain(q, [seq], backend="reference").startswith("kernel: ")
    np.testing.assert_allclose(omniattn.prefill(q, cache, [seq], causal=True, backend="reference"),
                               omniattn.decode(q, cache, [seq], causal=True), **TOL)


def test_errors_come_from_the_library(rng):
    cache, seq, _, _ = filled(rng, 2)
    q = rng.standard_normal((1, 3, 4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"\[attention_decode\] q.seq 3 > length 2 of sequence 0"):
        omniattn.decode(q, cache, [seq])
    with pytest.raises(ValueError, match=r"q.heads 3 is not a multiple of the cache's heads_kv 2"):
        omniattn.decode(q[:, :1, :3], cache, [seq])
    with pytest.raises(ValueError, match="must be distinct"):
        omniattn.decode(np.concatenate([q, q])[:, :1], cache, [seq, seq])
    with pytest.raises(ValueError, match="keys without RoPE"):
        omniattn.decode(q[:, :1], cache, [seq], rope=True)
    with pytest.raises(ValueError, match="k.heads 3 != cache heads_kv 2"):
        cache.append(seq, tokens(rng, 2, 3, 8), tokens(rng, 2, 3, 8))
    with pytest.raises(ValueError, match="sequence 7 does not exist"):
        cache.append(7, tokens(rng, 2, 2, 8), tokens(rng, 2, 2, 8))
    with pytest.raises(ValueError, match="kv_head 2"):
        cache.set_eviction(kv_head=2)
    with pytest.raises(ValueError, match="mass has 3 entries != cached slots 2"):
        cache.keep_top_k(seq, 0, np.ones(3, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="storage f64"):
        omniattn.KVCache(2, 8, dtype="float64")
    with pytest.raises(ValueError, match="page_size 0"):
        omniattn.KVCache(2, 8, page_size=0)
    roped = omniattn.KVCache(2, 8, rope=True)
    roped.append(roped.add_sequence(), tokens(rng, 2, 2, 8), tokens(rng, 2, 2, 8))
    with pytest.raises(ValueError, match="spec.rope is null"):
        omniattn.decode(q[:, :1], roped, [0])
    with pytest.raises(ValueError, match="differs from the cache's"):
        omniattn.decode(q[:, :1], roped, [0], rope={"theta": 99.0})
    with pytest.raises(TypeError, match="omniattn.KVCache"):
        omniattn.decode(q, object(), [seq])
