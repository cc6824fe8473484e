"""Mask objects: the numpy formulas agree with the C++ closed forms element by element; block masks classify tiles
exactly and are reusable across calls."""

import numpy as np
import pytest

import omniattn
from omniattn import _omniattn as C
from omniattn import masks
from omniattn.masks import Grid

from _helpers import qkv, ref_attention

PATTERNS = [
    masks.full(),
    masks.causal(),
    masks.causal("top_left"),
    masks.sliding_window(3),
    masks.sliding_window(2, 4, "top_left"),
    masks.sliding_window(None, 1),
    masks.sliding_window(-1, -1),
    masks.sinks(3),
    masks.prefix_lm(5),
    masks.prefix_lm(2, "top_left"),
    masks.document([0, 4, 4, 9, 12]),
    masks.block_causal(3),
    masks.dilated(2),
    masks.segments([1, 1, 2, 2, 2, 1, 3, 3, 3, 3]),
    (masks.sliding_window(2) | masks.sinks(1)) & ~masks.dilated(3),
]


@pytest.mark.parametrize("mask", PATTERNS, ids=repr)
@pytest.mark.parametrize("lq,lk", [(7, 11), (11, 7), (10, 10)])
def test_numpy_formula_matches_cxx(mask, lq, lk):
    dense = mask.to_dense(1, 1, lq, lk)[0, 0]
    cxx = C.Mask(mask.lower(Grid(1, 1, lq, lk)))
    got = np.array([[cxx.allows(0, 0, i, j, lq, lk) for j in range(lk)] for i in range(lq)])
    np.testing.assert_array_equal(got, dense)


def test_semantics_spelled_out():
    i, j = np.arange(4)[:, None], np.arange(6)[None, :]
    np.testing.assert_array_equal(masks.causal().to_dense(1, 1, 4, 6)[0, 0], j <= i + 2)
    np.testing.assert_array_equal(masks.causal("top_left").to_dense(1, 1, 4, 6)[0, 0], j <= i)
    # FlashAttention window_size=(1, 0), bottom-right aligned: i + (Lk - Lq) - 1 <= j <= i + (Lk - Lq)
    np.testing.assert_array_equal(masks.sliding_window(1).to_dense(1, 1, 4, 6)[0, 0], (j >= i + 1) & (j <= i + 2))
    doc = masks.document([0, 2, 6]).to_dense(1, 1, 6, 6)[0, 0]
    assert doc[1, 1] and not doc[1, 2] and doc[5, 2] and not doc[2, 1]
    pre = masks.prefix_lm(3).to_dense(1, 1, 6, 6)[0, 0]
    assert pre[0, 2] and not pre[0, 3] and pre[4, 4] and not pre[4, 5]


def test_composition_with_functions_and_arrays():
    arr = np.zeros((5, 5), dtype=bool)
    arr[:, 0] = True
    m = (masks.causal() & (lambda b, h, q, k: k != 1)) | arr
    i, j = np.arange(5)[:, None], np.arange(5)[None, :]
    np.testing.assert_array_equal(m.to_dense(1, 1, 5, 5)[0, 0], ((j <= i) & (j != 1)) | (j == 0))
    tree = m.lower(Grid(1, 1, 5, 5))
    assert tree[0] == "or" and tree[1][0] == "and" and tree[1][1] == ("causal", "bottom_right")
    assert tree[1][2][0] == "table" and tree[2][0] == "table"
    assert not m.is_native() and (masks.causal() | masks.sinks(2)).is_native()


def test_table_only_subtrees_become_one_table():
    m = (lambda b, h, q, k: q > 0) & masks.predicate(lambda b, h, q, k: k > 0, "kpos")
    tree = m.lower(Grid(1, 1, 3, 3))
    assert tree[0] == "table" and tree[1].shape == (1, 1, 3, 3)


def test_table_memory_follows_dependencies():
    tree = masks.predicate(lambda b, h, q, k: q >= k).lower(Grid(8, 16, 32, 32))
    table = tree[1]
    assert table.shape == (8, 16, 32, 32) and table.strides[:2] == (0, 0)  # stored once: Lq * Lk bools


# --- block masks -----------------------------------------------------------------------------------------------------


def dense_kinds(allowed, qt, kt):
    """EMPTY / PARTIAL / FULL per tile, counted in numpy."""
    b, h, lq, lk = allowed.shape
    kinds = np.zeros((b, h, -(-lq // qt), -(-lk // kt)), dtype=np.uint8)
    for x in range(kinds.shape[2]):
        for y in range(kinds.shape[3]):
            tile = allowed[:, :, x * qt:(x + 1) * qt, y * kt:(y + 1) * kt]
            kinds[:, :, x, y] = np.where(tile.all(axis=(2, 3)), 2, np.where(tile.any(axis=(2, 3)), 1, 0))
    return kinds


@pytest.mark.parametrize("mask", [
    masks.causal(),
    masks.sliding_window(5) | masks.sinks(2),
    masks.document([0, 10, 30, 45]),
    lambda b, h, q, k: (q // 8 + k // 8 + h) % 3 == 0,
])
def test_block_kinds_match_dense_counts(mask, rng):
    bm = omniattn.build_block_mask(mask, 2, 3, 45, 45, q_tile=8, kv_tile=16)
    dense = masks.as_mask(mask).to_dense(2, 3, 45, 45)
    want = dense_kinds(dense, 8, 16)
    np.testing.assert_array_equal(np.broadcast_to(bm.kinds, want.shape), want)
    c = bm.counts()
    assert c["empty"] + c["partial"] + c["full"] == bm.kinds.size
    # attention with the block mask = attention with the mask
    q, k, v = qkv(rng, b=2, lq=45, lk=45, hq=3, hkv=3)
    want_out = ref_attention(q, k, v, allowed=dense)
    for backend in ("cpu", "reference"):
        np.testing.assert_allclose(omniattn.attention(q, k, v, block_mask=bm, backend=backend), want_out, atol=3e-5)


def test_block_mask_reused_without_reevaluation(rng):
    calls = []

    def banded(b, h, q, k):
        calls.append(1)
        return np.abs(q - k) <= 3

    bm = omniattn.build_block_mask(banded, 1, 1, 40, 40, q_tile=8, kv_tile=8)
    assert len(calls) == 1 and bm.sparsity > 0.4
    q, k, v = qkv(rng, b=2, lq=40, lk=40, hq=4, hkv=4)
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    for _ in range(3):
        out = omniattn.attention(q, k, v, block_mask=bm)
        np.testing.assert_allclose(out, ref_attention(q, k, v, allowed=np.abs(i - j) <= 3), atol=3e-5)
    assert len(calls) == 1  # evaluated once, at build time


def test_block_mask_with_causal_flag(rng):
    bm = omniattn.build_block_mask(masks.sliding_window(None, 0, "top_left") | masks.sinks(4), 1, 1, 33, 33,
                                   q_tile=16, kv_tile=16)
    q, k, v = qkv(rng, lq=33, lk=33)
    allowed = (masks.sliding_window(None, 0, "top_left") | masks.sinks(4)).to_dense(1, 1, 33, 33)
    np.testing.assert_allclose(omniattn.attention(q, k, v, block_mask=bm, causal="top_left"),
                               ref_attention(q, k, v, allowed=allowed, causal="top_left"), atol=3e-5)


def test_block_mask_from_kinds(rng):
    kinds = np.array([[[[2, 0], [0, 1]]]], dtype=np.uint8)  # FULL, EMPTY / EMPTY, PARTIAL (with the mask)
    bm = omniattn.BlockMask.from_kinds(kinds, 8, 8, mask=masks.causal("top_left"))
    q, k, v = qkv(rng, lq=16, lk=16)
    i, j = np.arange(16)[:, None], np.arange(16)[None, :]
    allowed = ((i < 8) & (j < 8)) | ((i >= 8) & (j >= 8) & (j <= i))
    np.testing.assert_allclose(omniattn.attention(q, k, v, block_mask=bm), ref_attention(q, k, v, allowed=allowed),
                               atol=3e-5)
    with pytest.raises(ValueError, match="built-in mask patterns only"):
        omniattn.BlockMask.from_kinds(kinds, 8, 8, mask=lambda b, h, q, k: q > k)


def test_block_mask_varlen(rng):
    cu = np.array([0, 20, 27, 60])
    m = masks.causal() & (lambda b, h, q, k: (q + k + b) % 5 != 0)
    bm = omniattn.build_block_mask(m, 3, 2, 33, 33, q_tile=8, kv_tile=8, cu_seqlens_q=cu, cu_seqlens_k=cu)
    q, k, v = (rng.standard_normal((60, 2, 16)).astype(np.float32) for _ in range(3))
    out = omniattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, block_mask=bm)
    np.testing.assert_allclose(out, omniattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, mask=m,
                                                       backend="reference"), atol=3e-5)
    with pytest.raises(ValueError, match="other cu_seqlens"):
        omniattn.attention(q, k, v, cu_seqlens_q=[0, 33, 40, 60], cu_seqlens_k=[0, 33, 40, 60], block_mask=bm)


def test_spec_string_masks_match_built_in_patterns():
    import omniattn
    from omniattn import masks
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 150, 4, 32), dtype=np.float32)
    k = rng.standard_normal((1, 150, 2, 32), dtype=np.float32)
    v = rng.standard_normal((1, 150, 2, 32), dtype=np.float32)
    built = masks.causal() & masks.sliding_window(40) | masks.sinks(3)
    text = "causal & window(40, 0) | sinks(3)"
    want = omniattn.reference_attention(q, k, v, mask=built)
    np.testing.assert_allclose(omniattn.attention(q, k, v, mask=text), want, atol=2e-6)
    np.testing.assert_allclose(omniattn.attention(q, k, v, mask=masks.parse(text)), want, atol=2e-6)
    # A string mask composes with a Python predicate (then it is evaluated into a table).
    mixed = masks.parse("block_causal(16)") & (lambda b, h, i, j: (i + j) % 3 != 0)
    np.testing.assert_allclose(omniattn.attention(q, k, v, mask=mixed),
                               omniattn.reference_attention(q, k, v, mask=mixed), atol=2e-6)


def test_spec_string_errors_survive_non_ascii_text():
    # The message used to quote the first byte of a multi-byte character, which is not UTF-8: pybind11 could not
    # decode it and raised a ValueError with no message at all. Positions and the caret count characters.
    with pytest.raises(ValueError) as e:
        masks.parse("causal & é")
    assert str(e.value) == ("[spec] at 9: unexpected 'é' (expected a pattern name, '~' or '(')\n"
                            "  causal & é\n"
                            "           ^")
    with pytest.raises(ValueError) as e:
        masks.parse("window(1) ∧ sinks(2)")
    assert str(e.value).startswith("[spec] at 10: unexpected '∧' (expected '&', '|' or the end)")
    assert str(e.value).splitlines()[2].index("^") == 2 + "window(1) ∧ sinks(2)".index("∧")
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match=r"^\[spec\] at 6: unexpected '😀' \(expected '\+' or the end\)"):
        omniattn.attention(q, k, v, score="alibi 😀")
    with pytest.raises(ValueError, match=r"^\[spec\] at 13: unexpected 'ü' \(names are ASCII letters, digits and '_'\)"):
        omniattn.attention(q, k, v, mask="sinks(2) | glüh")


def test_spec_string_errors_point_at_the_character():
    from omniattn import masks
    with pytest.raises(ValueError, match=r"\[spec\] at 7"):
        masks.parse("window(")
    with pytest.raises(ValueError, match="unknown pattern 'nope'"):
        masks.parse("causal & nope")
