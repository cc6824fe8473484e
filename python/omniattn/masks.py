"""Attention masks: composable predicates "may query q of head h in batch b attend to key k?".

Built-in patterns (positions are 0-based inside the sequence, also for varlen; Lq, Lk are the sequence lengths and
``offset = Lk - Lq`` for ``align="bottom_right"``, 0 for ``align="top_left"``)::

    causal(align)                    k <= q + offset
    sliding_window(left, right=0)    q + offset - left <= k <= q + offset + right   (FlashAttention's window_size;
                                     None or a negative value leaves that side unbounded)
    sinks(n)                         k < n                 (attention sinks; combine: sliding_window(...) | sinks(4))
    prefix_lm(prefix_len)            k < prefix_len or k <= q + offset
    document(offsets)                q and k in the same document; offsets are cumulative lengths [0, ..., L]
    block_causal(block)              k // block <= q // block
    dilated(dilation)                (k - q) % dilation == 0
    segments(ids)                    ids[q] == ids[k]
    neighborhood(grid, kernel_size, dilation=1, stride=1, is_causal=False)
                                     NATTEN's neighborhood attention over a row-major token grid of rank 1..3 (q, k are
                                     raster indices); the exact per-axis rule is in include/omniattn/masks.h
    halo(grid, block, halo)          HaloNet's blocked local attention: query blocks see their block widened by `halo`
    full()                           every pair

``&``, ``|`` and ``~`` compose masks (and plain functions or boolean arrays, which are wrapped on the fly). Built-in
patterns and their compositions run in closed form inside the C++ kernels, per tile and per row: no memory, exact
tile classification.

A string such as ``"causal & window(256, 0) | sinks(4)"`` is parsed by the C++ library (grammar in the top-level
README); :func:`parse` does it explicitly, and ``mask="..."`` is accepted wherever a mask is.

Anything else is a *table* mask: a Python function ``fn(b, h, q, k) -> bool`` or a boolean array broadcastable to
``[batch, heads, seq_q, seq_k]`` (True = may attend, like SDPA's boolean attn_mask). A boolean array is read in place
by the C++ library (a dense mask over a broadcast view, no copy); a size-1 batch / head axis broadcasts. A function is called ONCE per
attention call with broadcastable int64 numpy index grids ``b[:, None, None, None]``, ``h[None, :, None, None]``,
``q[None, None, :, None]``, ``k[None, None, None, :]`` and must compute with numpy operations; the result is kept as a
boolean table that the kernels read. Its cost is the size of that result: ``Lq * Lk`` bytes for a function of q and k,
up to ``B * H * Lq * Lk`` bytes (and as many evaluations) for one that also depends on b and h. For varlen calls the
grids cover the longest sequence and ``b`` is the sequence index. Build a :class:`omniattn.BlockMask` to pay this once
for many calls.
"""

import numpy as np

from ._arrays import broadcast_table, is_array, to_numpy

__all__ = ["Mask", "Grid", "as_mask", "parse", "predicate", "full", "causal", "sliding_window", "sinks", "prefix_lm", "document",
           "block_causal", "dilated", "segments", "neighborhood", "halo"]

ALIGNS = ("bottom_right", "top_left")


class Grid:
    """The index grids of one problem: ``b, h, q, k`` broadcast to ``shape = (batch, heads, seq_q, seq_k)``, and the
    sequence lengths ``lq, lk`` (ints, or ``[batch, 1, 1, 1]`` arrays for varlen batches)."""

    def __init__(self, batch, heads, seq_q, seq_k, lens_q=None, lens_k=None):
        self.shape = (int(batch), int(heads), int(seq_q), int(seq_k))
        self.b = np.arange(self.shape[0], dtype=np.int64).reshape(-1, 1, 1, 1)
        self.h = np.arange(self.shape[1], dtype=np.int64).reshape(1, -1, 1, 1)
        self.q = np.arange(self.shape[2], dtype=np.int64).reshape(1, 1, -1, 1)
        self.k = np.arange(self.shape[3], dtype=np.int64).reshape(1, 1, 1, -1)
        if lens_q is None:
            self.lq, self.lk = self.shape[2], self.shape[3]
        else:
            self.lq = np.asarray(lens_q, dtype=np.int64).reshape(-1, 1, 1, 1)
            self.lk = np.asarray(lens_k, dtype=np.int64).reshape(-1, 1, 1, 1)

    def offset(self, align):
        return self.lk - self.lq if align == "bottom_right" else 0


def _check_align(align):
    if align not in ALIGNS:
        raise ValueError(f"omniattn: align must be 'bottom_right' or 'top_left', got {align!r}")
    return align


def _as_int(value, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"omniattn: {what} must be an int, got {type(value).__name__}")
    return int(value)


class Mask:
    """Base class. Subclasses define ``evaluate(grid)`` (numpy, vectorized) and, for patterns the kernels know,
    ``_native(grid)`` returning the expression node handed to C++."""

    def evaluate(self, grid):
        raise NotImplementedError

    def _native(self, grid):
        return None  # not a built-in pattern: becomes a table

    def is_native(self):
        """True when the whole expression is built-in patterns: no table, closed form in the kernels."""
        return False

    def lower(self, grid):
        """The expression tree the C++ binding builds an omniattn::mask_expr from."""
        node = self._native(grid)
        return node if node is not None else ("table", self.table(grid), self._name())

    def table(self, grid):
        """This mask as a boolean [batch, heads, seq_q, seq_k] array (a broadcast view where it allows)."""
        result = np.asarray(self.evaluate(grid))
        if result.dtype != np.bool_:
            raise TypeError(f"omniattn: mask {self._name()} gave {result.dtype} values, expected bool "
                            "(pass an additive float bias as score=, not mask=)")
        return broadcast_table(result, grid.shape, f"mask {self._name()}")

    def to_dense(self, batch, heads, seq_q, seq_k):
        """Evaluate in numpy: a contiguous boolean array [batch, heads, seq_q, seq_k] (True = may attend)."""
        return np.array(self.table(Grid(batch, heads, seq_q, seq_k)), dtype=bool, order="C")

    def _name(self):
        return repr(self)

    def __and__(self, other):
        return _Combine("and", self, as_mask(other))

    def __rand__(self, other):
        return _Combine("and", as_mask(other), self)

    def __or__(self, other):
        return _Combine("or", self, as_mask(other))

    def __ror__(self, other):
        return _Combine("or", as_mask(other), self)

    def __invert__(self):
        return _Not(self)


class _Pattern(Mask):
    """A built-in pattern: a closed form in C++, the same formula here in numpy."""

    def __init__(self, node, text, fn):
        self._node, self._text, self._fn = node, text, fn

    def evaluate(self, grid):
        return self._fn(grid)

    def _native(self, grid):
        return self._node

    def is_native(self):
        return True

    def __repr__(self):
        return self._text


class _Combine(Mask):
    def __init__(self, op, a, b):
        self.op, self.a, self.b = op, a, b

    def evaluate(self, grid):
        x, y = self.a.evaluate(grid), self.b.evaluate(grid)
        return (x & y) if self.op == "and" else (x | y)

    def _native(self, grid):
        a, b = self.a._native(grid), self.b._native(grid)
        if a is None and b is None:
            return None  # all tables: one table for the whole subtree
        return (self.op, a if a is not None else self.a.lower(grid), b if b is not None else self.b.lower(grid))

    def is_native(self):
        return self.a.is_native() and self.b.is_native()

    def __repr__(self):
        return f"({self.a!r} {'&' if self.op == 'and' else '|'} {self.b!r})"


class _Not(Mask):
    def __init__(self, a):
        self.a = a

    def evaluate(self, grid):
        return ~np.asarray(self.a.evaluate(grid), dtype=bool)

    def _native(self, grid):
        a = self.a._native(grid)
        return None if a is None else ("not", a)

    def is_native(self):
        return self.a.is_native()

    def __repr__(self):
        return f"~{self.a!r}"


class _Function(Mask):
    def __init__(self, fn, name=None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    def evaluate(self, grid):
        return np.asarray(self.fn(grid.b, grid.h, grid.q, grid.k))

    def __repr__(self):
        return self.name


class _Array(Mask):
    def __init__(self, values):
        values = to_numpy(values, "mask")
        if values.dtype != np.bool_:
            raise TypeError(f"omniattn: a mask array must be boolean (True = may attend), got {values.dtype}; "
                            "pass an additive float bias as score=")
        self.values = values

    def evaluate(self, grid):
        return self.values

    def __repr__(self):
        return f"array{tuple(self.values.shape)}"


class _Spec(Mask):
    """A mask spec string, parsed and evaluated by the C++ library (closed forms, like the built-in patterns)."""

    def __init__(self, text):
        from . import _omniattn  # the extension validates the string now, so errors surface at parse time
        self._text = text
        self._native_mask = _omniattn.Mask(("spec", text))

    def evaluate(self, grid):
        allows = np.vectorize(self._native_mask.allows, otypes=[bool])
        return allows(grid.b, grid.h, grid.q, grid.k, grid.lq, grid.lk)

    def _native(self, grid):
        return ("spec", self._text)

    def is_native(self):
        return True

    def __repr__(self):
        return str(self._native_mask)


def parse(text):
    """A Mask from a spec string, e.g. ``parse("causal & window(256, 0) | sinks(4)")``; ValueError on bad input."""
    if not isinstance(text, str):
        raise TypeError(f"omniattn: a mask spec must be a str, got {type(text).__name__}")
    return _Spec(text)


def as_mask(x):
    """A Mask from a Mask, a spec string, a function fn(b, h, q, k) -> bool, or a boolean numpy array / torch tensor."""
    if isinstance(x, Mask):
        return x
    if isinstance(x, str):
        return _Spec(x)
    if is_array(x):
        return _Array(x)
    if callable(x):
        return _Function(x)
    raise TypeError(f"omniattn: a mask must be an omniattn.masks.Mask, a function (b, h, q, k) -> bool or a boolean "
                    f"array, not {type(x).__name__}")


def predicate(fn, name=None):
    """Wrap a vectorized function ``fn(b, h, q, k) -> bool`` (a table mask), optionally naming it for explain()."""
    return _Function(fn, name)


def full():
    return _Pattern(("full",), "full()", lambda g: np.ones((1, 1, 1, 1), dtype=bool))


def causal(align="bottom_right"):
    """k <= q + offset: bottom_right (FlashAttention >= 2.1, the last query sees the last key) or top_left
    (PyTorch is_causal)."""
    _check_align(align)
    return _Pattern(("causal", align), f"causal({align!r})", lambda g: g.k <= g.q + g.offset(align))


def _bound(value, what):
    if value is None:
        return -1
    return _as_int(value, what)


def sliding_window(left, right=0, align="bottom_right"):
    """FlashAttention's window_size=(left, right): q + offset - left <= k <= q + offset + right.
    None (or a negative value) leaves a side unbounded; sliding_window(w) is a causal window of w keys before q."""
    lo, hi = _bound(left, "left"), _bound(right, "right")
    _check_align(align)

    def fn(g):
        centre = g.q + g.offset(align)
        ok = np.ones(np.broadcast_shapes(np.shape(centre), g.k.shape), dtype=bool)
        if lo >= 0:
            ok &= g.k >= centre - lo
        if hi >= 0:
            ok &= g.k <= centre + hi
        return ok

    return _Pattern(("window", lo, hi, align), f"sliding_window({left}, {right}, {align!r})", fn)


def sinks(n):
    """k < n: the first n keys are always visible (StreamingLLM); use as sliding_window(...) | sinks(n)."""
    n = _as_int(n, "n")
    return _Pattern(("sinks", n), f"sinks({n})", lambda g: g.k < n)


def prefix_lm(prefix_len, align="bottom_right"):
    """Bidirectional over the first prefix_len keys, causal after them: k < prefix_len or k <= q + offset."""
    n = _as_int(prefix_len, "prefix_len")
    _check_align(align)
    return _Pattern(("prefix_lm", n, align), f"prefix_lm({n}, {align!r})",
                    lambda g: (g.k < n) | (g.k <= g.q + g.offset(align)))


def document(offsets):
    """Block-diagonal over packed documents: q and k attend iff both lie in [offsets[d], offsets[d + 1]) for one d.
    offsets are cumulative lengths starting at 0, e.g. [0, 3, 7, 10]; positions past the last offset see nothing."""
    offs = [_as_int(o, "offsets[i]") for o in np.asarray(offsets).tolist()]
    table = np.asarray(offs, dtype=np.int64)

    def fn(g):
        if len(table) < 2:
            return np.zeros((1, 1, 1, 1), dtype=bool)
        doc = np.searchsorted(table, g.q, side="right")
        inside = doc < len(table)
        doc = np.clip(doc, 1, len(table) - 1)
        return inside & (g.k >= table[doc - 1]) & (g.k < table[doc])

    return _Pattern(("document", offs), f"document({offs})", fn)


def block_causal(block):
    """Causal between blocks of `block` tokens, bidirectional inside them: k // block <= q // block."""
    n = _as_int(block, "block")
    return _Pattern(("block_causal", n), f"block_causal({n})", lambda g: g.k // n <= g.q // n)


def dilated(dilation):
    """(k - q) % dilation == 0."""
    n = _as_int(dilation, "dilation")
    return _Pattern(("dilated", n), f"dilated({n})", lambda g: (g.k - g.q) % n == 0)


def segments(ids):
    """ids[q] == ids[k]: attention inside segments given by a per-position id (positions past len(ids) see nothing)."""
    ids = [_as_int(i, "ids[i]") for i in np.asarray(ids).tolist()]
    table = np.asarray(ids, dtype=np.int64)

    def fn(g):
        n = len(table)
        if n == 0:
            return np.zeros((1, 1, 1, 1), dtype=bool)
        iq, ik = np.clip(g.q, 0, n - 1), np.clip(g.k, 0, n - 1)
        return (g.q < n) & (g.k < n) & (table[iq] == table[ik])

    return _Pattern(("segments", ids), f"segments(<{len(ids)} ids>)", fn)


def _per_axis(value, what):
    """An int or a sequence of ints (or bools) as a list; the C++ library checks counts and ranges."""
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return [int(value)]
    try:
        return [int(x) for x in value]
    except TypeError:
        raise TypeError(f"omniattn: {what} must be an int or a sequence of ints, got {type(value).__name__}") from None


def _grid_coords(index, grid):
    """Row-major coordinates of raster indices (numpy arrays), last axis fastest."""
    coords = []
    for n in reversed(grid):
        coords.append(index % n)
        index = index // n
    return coords[::-1]


def _broadcast_axes(values, rank):
    return values * rank if len(values) == 1 else values


def _natten_axis(x, y, n, w, d, s, causal):
    """NATTEN's rule on one axis (masks.h), vectorized."""
    group = x % d
    length = n // d + (group < n % d)
    q, k = x // d, y // d
    if causal:
        leader = np.minimum(q // s * s + s - 1, length - 1)
        ok = (k <= q) & (leader - k < w)
    else:
        leader = np.minimum(q // s * s + s // 2, length - 1)
        start = np.clip(leader - w // 2, 0, np.maximum(length - w, 0))
        ok = (k >= start) & (k < start + w)
    return ok & (group == y % d)


def neighborhood(grid, kernel_size, dilation=1, stride=1, is_causal=False):
    """NATTEN's neighborhood attention over a row-major grid of tokens (rank 1..3): per axis a kernel_size window
    around the query (shifted, not clipped, at borders), dilation, stride (queries in groups of `stride` share their
    leader's window) and causality, exactly NATTEN's semantics. Each parameter is an int (every axis) or one value per
    axis; the C++ library validates them (kernel * dilation <= grid, 1 <= stride <= kernel)."""
    g, k, d = _per_axis(grid, "grid"), _per_axis(kernel_size, "kernel_size"), _per_axis(dilation, "dilation")
    s, c = _per_axis(stride, "stride"), [bool(x) for x in _per_axis(is_causal, "is_causal")]
    node = ("neighborhood", g, k, d, s, c)

    def fn(gr):
        rank, tokens = len(g), int(np.prod(g))
        kk, dd, ss, cc = (_broadcast_axes(v, rank) for v in (k, d, s, c))
        qc, kc = _grid_coords(gr.q, g), _grid_coords(gr.k, g)
        ok = (gr.q < tokens) & (gr.k < tokens)
        for a in range(rank):
            ok = ok & _natten_axis(qc[a], kc[a], g[a], kk[a], dd[a], ss[a], cc[a])
        return ok

    text = f"neighborhood({g}, kernel_size={k}, dilation={d}, stride={s}, is_causal={c})"
    return _Pattern(node, text, fn)


def halo(grid, block, halo):
    """HaloNet's blocked local attention over a row-major grid (rank 1..3): queries in blocks of `block` tokens per
    axis see their block widened by `halo` on each side, clipped at the grid border."""
    g, b, h = _per_axis(grid, "grid"), _per_axis(block, "block"), _per_axis(halo, "halo")
    node = ("halo", g, b, h)

    def fn(gr):
        rank, tokens = len(g), int(np.prod(g))
        bb, hh = _broadcast_axes(b, rank), _broadcast_axes(h, rank)
        qc, kc = _grid_coords(gr.q, g), _grid_coords(gr.k, g)
        ok = (gr.q < tokens) & (gr.k < tokens)
        for a in range(rank):
            lo = qc[a] // bb[a] * bb[a]
            ok = ok & (kc[a] >= lo - hh[a]) & (kc[a] < lo + bb[a] + hh[a])
        return ok

    return _Pattern(node, f"halo({g}, block={b}, halo={h})", fn)
