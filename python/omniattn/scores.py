"""Score modifiers: score(s, b, h, q, k) -> new logit, where s is the already scaled logit scale * <q_i, k_j>.

Built in (run natively in the kernels, no memory; the same formulas as the C++ omniattn::scores):

    alibi(slopes, align)   s + slopes[h] * (k - q + offset)   offset = Lq - Lk for align="bottom_right" (the default:
                           0 on the diagonal that bottom-right causal keeps, negative for past keys), 0 for "top_left".
                           With a causal mask this is FlashAttention's alibi_slopes; without one, keys after the
                           diagonal get a positive bias (no absolute value). alibi_slopes(heads) gives the paper's.
    softcap(cap)           cap * tanh(s / cap)                 (Gemma 2 / Grok logit soft-capping)
    temperature(t)         s / t[h]                            (one temperature, or one per query head)
    key_bias(bias)         s + bias[k]                         (per-key bias; 0 past the end of `bias`)

    reweight(w, keys_per_head=0)
                           post-softmax per-key reweighting with renormalisation, p'_j = w_j p_j / sum w_j' p_j',
                           computed exactly as s + log(w_j) (the LSE is then that of the reweighted logits); w_j = 0
                           removes key j. w: one weight per key (>= seq_k values), or rows of keys_per_head weights,
                           one per query head ([h * keys_per_head + k]). Weights must be finite and >= 0.
    bias(array)            s + array[b, h, q, k]: a dense additive float tensor broadcastable to [B, H, Lq, Lk]
                           (numpy or CPU torch; FlexAttention / xFormers attn_bias, SDPA's float attn_mask). Read in
                           place as float32 (other dtypes are converted once) by the vectorized kernels; the Score
                           keeps the array alive.
    parse(text) / "..."    a score spec string parsed by the C++ library, e.g. "alibi + softcap(30)" (README grammar):
                           terms applied left to right; `attention(score="...")` accepts the string directly.

Tables (evaluated once per call over numpy index grids, kept as float64 [B, H, Lq, Lk] tables that the kernels read;
memory and time in the size of the result, up to B * H * Lq * Lk values):

    bias(fn)               s + fn(b, h, q, k)       (a function evaluated over numpy index grids)
    function(fn) / any fn(s, b, h, q, k)     must be affine in s: omniattn probes it at a few values of s and keeps
                           a[b, h, q, k] * s + c[b, h, q, k]; anything else raises ValueError (build it from the
                           built-ins instead)

Composition: ``a >> b`` applies a, then b (e.g. ``alibi(slopes) >> softcap(50.0)``); ``a + b`` adds two additive
modifiers (alibi, key_bias, bias), which is the same as chaining them. A score of -inf masks the pair. The kernels
evaluate scores in float32, the reference backend in float64.
"""

import numpy as np

from . import _omniattn as _C
from ._arrays import broadcast_table, is_array, is_torch, to_numpy
from .masks import ALIGNS, Grid

__all__ = ["Score", "as_score", "alibi", "alibi_slopes", "softcap", "temperature", "key_bias", "bias", "reweight", "parse",
           "function"]


class Score:
    """Base class: ``evaluate(s, grid)`` in numpy (the reference formula), ``lower(grid)`` to the C++ stages."""

    additive = False  # s + something(b, h, q, k): sums with other additive modifiers

    def evaluate(self, s, grid):
        raise NotImplementedError

    def lower(self, grid):
        raise NotImplementedError

    def apply(self, s, lens_q=None, lens_k=None):
        """Apply to a dense float array of scaled logits [batch, heads, seq_q, seq_k] in numpy (a reference)."""
        s = np.asarray(s, dtype=np.float64)
        return np.broadcast_to(self.evaluate(s, Grid(*s.shape, lens_q, lens_k)), s.shape)

    def __rshift__(self, other):
        return _Chain([self, as_score(other)])

    def __rrshift__(self, other):
        return _Chain([as_score(other), self])

    def __add__(self, other):
        other = as_score(other)
        if self.additive and other.additive:
            return _Chain([self, other], additive=True)
        raise TypeError("omniattn: only additive score modifiers add (alibi, key_bias, bias); chain others with >>")

    def __radd__(self, other):
        return as_score(other).__add__(self)


def _per_head(values, what, positive=False):
    v = np.asarray(to_numpy(values, what) if is_array(values) else values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"omniattn: {what} is empty")
    if not np.all(np.isfinite(v)) or (positive and not np.all(v > 0)):
        raise ValueError(f"omniattn: {what} must be finite{' and > 0' if positive else ''}")
    return v


def _check_heads(v, grid, what):
    if len(v) != 1 and len(v) != grid.shape[1]:
        raise ValueError(f"omniattn: {what} has {len(v)} values for {grid.shape[1]} query heads (give 1 or one per head)")


class _Alibi(Score):
    additive = True

    def __init__(self, slopes, align):
        if align not in ALIGNS:
            raise ValueError(f"omniattn: align must be 'bottom_right' or 'top_left', got {align!r}")
        self.slopes, self.align = _per_head(slopes, "alibi slopes"), align

    def _bias(self, grid):
        _check_heads(self.slopes, grid, "alibi slopes")
        slope = np.broadcast_to(self.slopes, (grid.shape[1],)).reshape(1, -1, 1, 1)
        offset = grid.lq - grid.lk if self.align == "bottom_right" else 0
        return slope * (grid.k - grid.q + offset)

    def evaluate(self, s, grid):
        return s + self._bias(grid)

    def lower(self, grid):
        _check_heads(self.slopes, grid, "alibi slopes")
        if self.align == "bottom_right" and not isinstance(grid.lq, int):
            # varlen: the bottom-right offset differs per sequence, which one native offset cannot express
            return [("affine", None, broadcast_table(self._bias(grid), grid.shape, "alibi"))]
        offset = grid.lq - grid.lk if self.align == "bottom_right" else 0
        return [("alibi", self.slopes.tolist(), int(offset))]

    def __repr__(self):
        return f"alibi(<{len(self.slopes)} slopes>, {self.align!r})"


class _Softcap(Score):
    def __init__(self, cap):
        self.cap = float(cap)
        if not (np.isfinite(self.cap) and self.cap > 0):
            raise ValueError(f"omniattn: softcap cap must be a finite number > 0, got {cap!r}")

    def evaluate(self, s, grid):
        return self.cap * np.tanh(s / self.cap)

    def lower(self, grid):
        return [("softcap", self.cap)]

    def __repr__(self):
        return f"softcap({self.cap})"


class _Temperature(Score):
    def __init__(self, t):
        self.t = _per_head(t, "temperature", positive=True)

    def evaluate(self, s, grid):
        _check_heads(self.t, grid, "temperature")
        return s / np.broadcast_to(self.t, (grid.shape[1],)).reshape(1, -1, 1, 1)

    def lower(self, grid):
        _check_heads(self.t, grid, "temperature")
        return [("temperature", self.t.tolist())]

    def __repr__(self):
        return f"temperature(<{len(self.t)} values>)"


class _KeyBias(Score):
    additive = True

    def __init__(self, values):
        v = np.asarray(to_numpy(values, "key_bias") if is_array(values) else values, dtype=np.float64).reshape(-1)
        if np.isnan(v).any() or np.isposinf(v).any():
            raise ValueError("omniattn: key_bias values must not be NaN or +inf")
        self.values = v

    def evaluate(self, s, grid):
        k = grid.k
        padded = np.concatenate([self.values, [0.0]])
        return s + padded[np.minimum(k, len(self.values))]

    def lower(self, grid):
        return [("key_bias", self.values.tolist())]

    def __repr__(self):
        return f"key_bias(<{len(self.values)} values>)"


class _Bias(Score):
    additive = True

    def __init__(self, values, text):
        self.values, self._text = values, text  # values(grid) -> float array broadcastable to grid.shape

    def evaluate(self, s, grid):
        return s + self.values(grid)

    def lower(self, grid):
        c = np.asarray(self.values(grid), dtype=np.float64)
        return [("affine", None, broadcast_table(c, grid.shape, f"score {self._text}"))]

    def __repr__(self):
        return self._text


class _BiasArray(Score):
    """s + array[b, h, q, k], lowered to omniattn::scores::bias over the (float32) array itself."""

    additive = True

    def __init__(self, arr, text, source=None):
        if arr.ndim > 4:
            raise ValueError(f"omniattn: a score bias has {arr.ndim} dimensions; it must broadcast to "
                             "[batch, heads, seq_q, seq_k]")
        if arr.dtype != np.float32 or any(st < 0 for st in arr.strides):
            arr = np.ascontiguousarray(arr, dtype=np.float32)  # the kernels read float32 with non-negative strides
        self.array = arr  # kept alive as long as this Score: the C++ side borrows it during each call
        self._text = text
        self.source = source  # the torch tensor it was made from: attention() returns its gradient when it requires grad

    def _view4(self):
        return self.array[(None,) * (4 - self.array.ndim)]  # leading broadcast dims, a view (no copy)

    def evaluate(self, s, grid):
        return s + self._view4().astype(np.float64)

    def lower(self, grid):
        broadcast_table(self._view4(), grid.shape, f"score {self._text}")  # the shape rule, checked here (a view)
        return [("bias", self._view4())]

    def __repr__(self):
        return self._text


class _Reweight(Score):
    def __init__(self, weights, keys_per_head):
        w = np.asarray(to_numpy(weights, "reweight weights") if is_array(weights) else weights, dtype=np.float64).reshape(-1)
        if w.size == 0:
            raise ValueError("[scores::reweight] weights is empty (one weight per key, or per head and key)")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("[scores::reweight] weights must be finite and >= 0 (0 removes a key)")
        kph = int(keys_per_head)
        if kph < 0:
            raise ValueError("[scores::reweight] keys_per_head must be >= 0 (0: one row of weights for all heads)")
        if kph and w.size % kph:
            raise ValueError("[scores::reweight] weights must hold a whole number of rows of keys_per_head values")
        self.weights, self.keys_per_head = w, kph

    def evaluate(self, s, grid):
        row = self.keys_per_head or self.weights.size
        table = self.weights.reshape(-1, row)
        rows, heads, keys = table.shape[0], grid.shape[1], grid.shape[3]
        if row < keys:
            raise ValueError(f"omniattn: reweight has {row} weights per head row, fewer than seq_k {keys}")
        if rows != 1 and rows != heads:
            raise ValueError(f"omniattn: reweight has {rows} rows of {row} weights, expected 1 or heads_q {heads}")
        with np.errstate(divide="ignore"):
            logw = np.log(table)  # log 0 = -inf: the key is removed
        return s + logw[grid.h if rows > 1 else np.zeros_like(grid.h), grid.k]

    def lower(self, grid):
        return [("reweight", self.weights.tolist(), self.keys_per_head)]

    def __repr__(self):
        return f"reweight(<{self.weights.size} weights>)"


class _Spec(Score):
    """A score spec string, parsed (and, for the kernels, run natively) by the C++ library."""

    def __init__(self, text):
        self.text = text
        _C.score_eval(text, 1, np.zeros(1), *([np.zeros(1, dtype=np.int64)] * 4))  # ValueError with the caret now

    def evaluate(self, s, grid):
        arrays = np.broadcast_arrays(np.asarray(s, dtype=np.float64), grid.b, grid.h, grid.q, grid.k)
        flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
        return _C.score_eval(self.text, grid.shape[1], *flat).reshape(arrays[0].shape)

    def lower(self, grid):
        return [("spec", self.text)]

    def __repr__(self):
        return repr(self.text)


class _Chain(Score):
    def __init__(self, parts, additive=False):
        self.parts = []
        for p in parts:
            self.parts.extend(p.parts if isinstance(p, _Chain) else [p])
        self.additive = additive

    def evaluate(self, s, grid):
        for p in self.parts:
            s = p.evaluate(s, grid)
        return s

    def lower(self, grid):
        return [stage for p in self.parts for stage in p.lower(grid)]

    def __repr__(self):
        return (" + " if self.additive else " >> ").join(repr(p) for p in self.parts)


class _Function(Score):
    """A Python fn(s, b, h, q, k), tabulated as a * s + c."""

    PROBES = (-2.75, 0.5, 3.25)

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__name__", None) or type(fn).__name__

    def evaluate(self, s, grid):
        return np.asarray(self.fn(s, grid.b, grid.h, grid.q, grid.k), dtype=np.float64)

    def lower(self, grid):
        def at(x):
            return np.broadcast_to(self.evaluate(np.float64(x), grid), grid.shape)

        try:
            c, one = at(0.0), at(1.0)
        except ValueError:
            raise ValueError(f"omniattn: score function {self.name} does not broadcast to [batch, heads, seq_q, seq_k] "
                             f"= {grid.shape}") from None
        masked = np.isneginf(c)
        with np.errstate(invalid="ignore"):
            a = np.where(masked, 0.0, one - c)
        for x in self.PROBES:
            got, want = at(x), np.where(masked, -np.inf, a * x + c)
            same = np.isclose(got, want, rtol=1e-6, atol=1e-9) | (np.isneginf(got) & np.isneginf(want))
            if not same.all():
                raise ValueError(f"omniattn: score function {self.name} is not affine in s, so it cannot be tabulated "
                                 "(omniattn evaluates Python score functions once, as a[b,h,q,k] * s + c[b,h,q,k]); "
                                 "build it from the omniattn.scores built-ins (softcap, temperature, ...) instead")
        a_table = None if np.all(a == 1.0) else np.ascontiguousarray(a)
        c_table = None if np.all(c == 0.0) else np.ascontiguousarray(c)
        return [("affine", a_table, c_table)]

    def __repr__(self):
        return self.name


def alibi(slopes, align="bottom_right"):
    """ALiBi: s + slopes[h] * (k - q + offset), offset = Lq - Lk (bottom_right) or 0 (top_left); one slope, or one per
    query head. Use with a causal mask (then it equals FlashAttention's alibi_slopes)."""
    return _Alibi(slopes, align)


def alibi_slopes(heads):
    """The ALiBi paper's slopes for `heads` heads (2^(-8 i / n); the paper's interleave when n is not a power of 2)."""
    return np.asarray(_C.alibi_slopes(int(heads)), dtype=np.float64)


def softcap(cap):
    """cap * tanh(s / cap)."""
    return _Softcap(cap)


def temperature(t):
    """s / t[h]: one temperature (> 0) for every head, or one per query head."""
    return _Temperature(t)


def key_bias(values):
    """s + values[k], a per-key bias (keys past the end of `values` get 0)."""
    return _KeyBias(values)


def bias(values, name=None):
    """Additive bias: s + values[b, h, q, k]. values: a float array broadcastable to [batch, heads, seq_q, seq_k]
    (numpy or CPU torch; read in place as float32 by the vectorized kernels, other dtypes converted once), or a
    function (b, h, q, k) -> float evaluated over numpy index grids."""
    if is_array(values):
        arr = to_numpy(values, "score bias")
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"omniattn: a score bias must be a float array, got {arr.dtype}")
        return _BiasArray(arr, name or f"bias(array{tuple(arr.shape)})", values if is_torch(values) else None)
    if callable(values):
        fn_name = name or getattr(values, "__name__", "bias")
        return _Bias(lambda g: values(g.b, g.h, g.q, g.k), fn_name)
    raise TypeError(f"omniattn: bias() takes a float array or a function (b, h, q, k), not {type(values).__name__}")


def reweight(weights, keys_per_head=0):
    """Post-softmax per-key reweighting with renormalisation: p'_j = w_j p_j / sum_j' w_j' p_j', computed as
    s + log(w_j) (identical; the LSE is that of the reweighted logits). weights: one per key (keys_per_head=0, at
    least seq_k of them), or rows of keys_per_head weights, one row for all heads or one per query head. Finite and
    >= 0; a weight of 0 removes the key. Apply it last when chaining."""
    return _Reweight(weights, keys_per_head)


def parse(text):
    """A Score from a spec string, e.g. ``parse("alibi + softcap(30)")`` (README grammar); ValueError with the
    position and a caret on bad input."""
    if not isinstance(text, str):
        raise TypeError(f"omniattn: a score spec must be a str, got {type(text).__name__}")
    return _Spec(text)


def function(fn):
    """A vectorized fn(s, b, h, q, k) -> float that is affine in s (see the module doc)."""
    return _Function(fn)


def as_score(x):
    """A Score from a Score, a spec string, a function fn(s, b, h, q, k), or a float array (an additive bias)."""
    if isinstance(x, Score):
        return x
    if isinstance(x, str):
        return parse(x)
    if is_array(x):
        return bias(x)
    if callable(x):
        return _Function(x)
    raise TypeError(f"omniattn: a score must be an omniattn.scores.Score, a spec string, a function (s, b, h, q, k) or "
                    f"a float array, not {type(x).__name__}")
