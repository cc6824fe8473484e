"""A Python mask or score callable that raises: the exception reaches the caller and `out` is left untouched.
(Python callables are evaluated in Python before the C++ call; C++ callbacks raising inside the kernels are tested
in tests/test_failures.cc.)"""
import numpy as np
import pytest

import omniattn


def _qkv(rng, n=130):
    q = rng.standard_normal((1, n, 2, 16), dtype=np.float32)
    return q, q[:, ::-1].copy(), q * 0.5


def _raising_mask(b, h, q, k):
    if np.any(q == 129):
        raise RuntimeError("mask says no")
    return k <= q


def _raising_score(s, b, h, q, k):
    raise KeyError("score table missing")


@pytest.mark.parametrize("kw, err, text", [
    (dict(mask=_raising_mask), RuntimeError, "mask says no"),
    (dict(score=_raising_score), KeyError, "score table missing"),
])
def test_raising_callable_leaves_out_untouched(kw, err, text):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng)
    out = np.full_like(q, 7.0)
    with pytest.raises(err, match=text):
        omniattn.attention(q, k, v, out=out, **kw)
    assert np.all(out == 7.0)
