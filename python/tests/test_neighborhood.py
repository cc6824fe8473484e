"""Neighborhood (NATTEN) and halo (HaloNet) attention from Python: the mask patterns against rules written out here,
na1d / na2d / na3d / halo*d against a float64 reference on heads-last tensors, errors from the C++ checks, and
boolean array masks read in place as dense masks."""

import numpy as np
import pytest

import omniattn
from omniattn import _omniattn as C
from omniattn import masks
from omniattn.masks import Grid

from _helpers import ref_attention


def natten_axis(x, y, n, w, d, s, causal):
    """NATTEN's flex-attention form of the rule (window centre clamped), independent of masks.py's start clamp."""
    if x % d != y % d:
        return False
    group = x % d
    length = n // d + (1 if group < n % d else 0)
    q, k = x // d, y // d
    if causal:
        leader = min(q // s * s + s - 1, length - 1)
        return k <= q and leader - k < w
    left, right = w // 2, w // 2 + w % 2 - 1
    leader = min(q // s * s + s // 2, length - 1)
    centre = max(left, min(leader, length - 1 - right))
    return (k <= centre and centre - k <= left) or (k >= centre and k - centre <= right)


def halo_axis(x, y, n, block, halo):
    b0 = x // block * block
    b1 = min(b0 + block, n) - 1
    return abs(y - min(max(y, b0), b1)) <= halo


def allowed_grid(grid, rule):
    """[tokens, tokens] boolean matrix from a per-axis rule(axis, x, y)."""
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=1)
    n = len(coords)
    out = np.ones((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = all(rule(a, coords[i][a], coords[j][a]) for a in range(len(grid)))
    return out


NA_CASES = [
    # grid, kernel, dilation, stride, causal
    ((13,), (5,), (1,), (1,), (False,)),
    ((17,), (5,), (1,), (3,), (False,)),
    ((11,), (3,), (2,), (2,), (True,)),
    ((6, 7), (3, 5), (1, 1), (2, 1), (False, True)),
    ((5, 8), (5, 4), (1, 2), (5, 2), (False, False)),
    ((3, 4, 5), (2, 3, 3), (1, 1, 1), (1, 3, 2), (True, False, False)),
]


def na_allowed(grid, kernel, dilation, stride, causal):
    return allowed_grid(grid, lambda a, x, y: natten_axis(x, y, grid[a], kernel[a], dilation[a], stride[a], causal[a]))


@pytest.mark.parametrize("grid,kernel,dilation,stride,causal", NA_CASES)
def test_neighborhood_mask_numpy_and_cxx_match_nattens_rule(grid, kernel, dilation, stride, causal):
    want = na_allowed(grid, kernel, dilation, stride, causal)
    n = len(want)
    m = masks.neighborhood(grid, kernel, dilation=dilation, stride=stride, is_causal=causal)
    np.testing.assert_array_equal(m.to_dense(1, 1, n, n)[0, 0], want)
    cxx = C.Mask(m.lower(Grid(1, 1, n, n)))
    got = np.array([[cxx.allows(0, 0, i, j, n, n) for j in range(n)] for i in range(n)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("grid,block,halo", [((20,), (8,), (3,)), ((7, 9), (3, 4), (1, 0)), ((3, 4, 5), (2, 2, 3), (0, 1, 1))])
def test_halo_mask_numpy_and_cxx_match_the_definition(grid, block, halo):
    want = allowed_grid(grid, lambda a, x, y: halo_axis(x, y, grid[a], block[a], halo[a]))
    n = len(want)
    m = masks.halo(grid, block, halo)
    np.testing.assert_array_equal(m.to_dense(1, 1, n, n)[0, 0], want)
    cxx = C.Mask(m.lower(Grid(1, 1, n, n)))
    got = np.array([[cxx.allows(0, 0, i, j, n, n) for j in range(n)] for i in range(n)])
    np.testing.assert_array_equal(got, want)


def heads_last(rng, batch, grid, heads, dim):
    return rng.standard_normal((batch,) + tuple(grid) + (heads, dim)).astype(np.float32)


def reference_heads_last(q, k, v, allowed, rank):
    """ref_attention on the flattened tensors, reshaped back to heads-last (out) and [B, *spatial, H] (lse)."""
    b, h = q.shape[0], q.shape[-2]
    spatial = q.shape[1:1 + rank]
    flat = [x.reshape(b, -1, x.shape[-2], x.shape[-1]) for x in (q, k, v)]
    out, lse = ref_attention(*flat, allowed=allowed, lse=True)
    lse = np.moveaxis(lse.reshape((b, h) + tuple(spatial)), 1, -1)
    return out.reshape(q.shape[:-1] + (v.shape[-1],)), lse


@pytest.mark.parametrize("grid,kernel,dilation,stride,causal", NA_CASES)
def test_na_functions_against_the_reference(rng, grid, kernel, dilation, stride, causal):
    rank = len(grid)
    q = heads_last(rng, 2, grid, 4, 16)
    k, v = heads_last(rng, 2, grid, 2, 16), heads_last(rng, 2, grid, 2, 8)  # GQA, a different value dim
    fn = {1: omniattn.na1d, 2: omniattn.na2d, 3: omniattn.na3d}[rank]
    out, lse = fn(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal, return_lse=True)
    want_out, want_lse = reference_heads_last(q, k, v, na_allowed(grid, kernel, dilation, stride, causal), rank)
    assert out.shape == q.shape[:-1] + (8,)
    assert lse.shape == (2,) + tuple(grid) + (4,)
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5)
    plain = fn(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal, backend="reference")
    np.testing.assert_allclose(plain, want_out, atol=2e-6, rtol=1e-5)


def test_scalar_parameters_apply_to_every_axis(rng):
    q = heads_last(rng, 1, (6, 7), 2, 8)
    a = omniattn.na2d(q, q, q, 3, stride=2, dilation=2, is_causal=True)
    b = omniattn.na2d(q, q, q, (3, 3), stride=(2, 2), dilation=(2, 2), is_causal=(True, True))
    np.testing.assert_array_equal(a, b)


def test_halo_functions_against_the_reference(rng):
    grid, block, halo = (9, 10), (4, 3), (2, 1)
    q, k, v = (heads_last(rng, 1, grid, 2, 8) for _ in range(3))
    out = omniattn.halo2d(q, k, v, block=block, halo=halo)
    want, _ = reference_heads_last(q, k, v, allowed_grid(grid, lambda a, x, y: halo_axis(x, y, grid[a], block[a], halo[a])), 2)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)
    q1 = heads_last(rng, 2, (21,), 2, 8)
    out1 = omniattn.halo1d(q1, q1, q1, block=8, halo=2)
    want1, _ = reference_heads_last(q1, q1, q1, allowed_grid((21,), lambda a, x, y: halo_axis(x, y, 21, 8, 2)), 1)
    np.testing.assert_allclose(out1, want1, atol=2e-5, rtol=1e-4)


def test_torch_heads_last_tensors(rng):
    torch = pytest.importorskip("torch")
    q = torch.from_numpy(heads_last(rng, 1, (5, 6), 2, 8))
    with torch.no_grad():
        out, lse = omniattn.na2d(q, q, q, (3, 3), stride=(1, 2), return_lse=True)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 6, 2, 8) and lse.shape == (1, 5, 6, 2)
    want, want_lse = reference_heads_last(q.numpy(), q.numpy(), q.numpy(), na_allowed((5, 6), (3, 3), (1, 1), (1, 2), (False, False)), 2)
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda q: omniattn.na2d(q, q, q, 9), "neighborhood: kernel 9 x dilation 1 must be in 1..grid 6 (axis 0)"),
    (lambda q: omniattn.na2d(q, q, q, 3, stride=4), "neighborhood: stride 4 must be in 1..kernel 3 (axis 0)"),
    (lambda q: omniattn.na2d(q, q, q, 3, dilation=(1, 3)), "neighborhood: kernel 3 x dilation 3 must be in 1..grid 7 (axis 1)"),
    (lambda q: omniattn.na2d(q, q, q, (3, 3, 3)), "neighborhood: kernel has 3 values for a rank-2 grid"),
    (lambda q: omniattn.halo2d(q, q, q, block=0, halo=1), "halo: block 0 must be in 1..grid 6 (axis 0)"),
    (lambda q: omniattn.na1d(q, q, q, 3), "na1d takes 4-d [batch, 1 spatial axes, heads, dim] tensors"),
    (lambda q: omniattn.na2d(q, q[:, :, :6], q, 3), "k has spatial shape (6, 6), q has (6, 7)"),
])
def test_errors_name_the_rule(rng, call, message):
    q = heads_last(rng, 1, (6, 7), 2, 8)
    with pytest.raises(ValueError) as info:
        call(q)
    assert message in str(info.value)


def test_spec_strings_for_grid_patterns(rng):
    q = heads_last(rng, 1, (6, 7), 2, 8).reshape(1, 42, 2, 8)
    a = omniattn.attention(q, q, q, mask="neighborhood(grid=6x7, kernel=3x5, stride=1x5, causal=1x0)")
    b = omniattn.attention(q, q, q, mask=masks.neighborhood((6, 7), (3, 5), stride=(1, 5), is_causal=(True, False)))
    np.testing.assert_array_equal(a, b)
    assert str(masks.parse("halo(6x7, 2, 1)")) == "halo(grid=6x7,block=2x2,halo=1x1)"


def test_bool_array_masks_are_read_in_place_with_broadcasting(rng):
    b, h, lq, lk = 2, 4, 9, 70
    q = rng.standard_normal((b, lq, h, 16)).astype(np.float32)
    k = rng.standard_normal((b, lk, 2, 16)).astype(np.float32)
    v = rng.standard_normal((b, lk, 2, 16)).astype(np.float32)
    per_head = rng.random((1, h, lq, lk)) < 0.4   # broadcast over batch
    per_head[0, 1, 3, :] = False                   # a fully masked row in head 1 (every batch entry)
    out, lse = omniattn.attention(q, k, v, mask=per_head, return_lse=True)
    want, want_lse = ref_attention(q, k, v, allowed=per_head, lse=True)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)
    assert np.all(out[:, 3, 1, :] == 0) and np.all(np.isneginf(lse[:, 1, 3]))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)], atol=2e-5, rtol=1e-5)
    # Key-axis broadcast ([lq, 1]) and a transposed (non-contiguous) table.
    rows = rng.random((lq, 1)) < 0.5
    out2 = omniattn.attention(q, k, v, mask=rows)
    np.testing.assert_allclose(out2, ref_attention(q, k, v, allowed=rows), atol=2e-5, rtol=1e-4)
    transposed = (rng.random((lk, lq)) < 0.5).T
    out3 = omniattn.attention(q, k, v, mask=transposed)
    np.testing.assert_allclose(out3, ref_attention(q, k, v, allowed=transposed), atol=2e-5, rtol=1e-4)
    # In place: the C++ mask reads the array's memory, so a later write shows through (no copy was taken).
    table = np.zeros((lq, lk), dtype=bool)
    cmask = C.Mask(masks.as_mask(table).lower(Grid(b, h, lq, lk)))
    assert not cmask.allows(0, 0, 2, 5, lq, lk)
    table[2, 5] = True
    assert cmask.allows(0, 0, 2, 5, lq, lk)


def test_additional_keys_are_seen_by_every_query(rng):
    # NATTEN's additional KV: [batch, extra, heads_kv, dim] keys every query attends to besides its neighborhood.
    grid, kernel = (6, 7), (3, 5)
    q = heads_last(rng, 2, grid, 4, 16)
    k, v = heads_last(rng, 2, grid, 2, 16), heads_last(rng, 2, grid, 2, 8)
    extra_k = rng.standard_normal((2, 5, 2, 16)).astype(np.float32)
    extra_v = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    out, lse = omniattn.na2d(q, k, v, kernel, return_lse=True, additional_keys=extra_k, additional_values=extra_v)
    n = int(np.prod(grid))
    allowed = np.concatenate([na_allowed(grid, kernel, (1, 1), (1, 1), (False, False)), np.ones((n, 5), dtype=bool)], axis=1)
    flat = [x.reshape(2, -1, x.shape[-2], x.shape[-1]) for x in (q, k, v)]
    want_out, want_lse = ref_attention(flat[0], np.concatenate([flat[1], extra_k], axis=1),
                                       np.concatenate([flat[2], extra_v], axis=1), allowed=allowed, lse=True)
    np.testing.assert_allclose(out.reshape(2, n, 4, 8), want_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.moveaxis(lse.reshape(2, n, 4), 1, 2), want_lse, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="go together"):
        omniattn.na2d(q, k, v, kernel, additional_keys=extra_k)
