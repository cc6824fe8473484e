"""The paged KV cache and attention of new queries against it (include/omniattn/kv_cache.h): KVCache binds
omniattn::kv_cache, decode() binds omniattn::attention_decode. As everywhere in the package, Python only translates:
the rules, their messages and the kernel selection are the library's."""

import numpy as np

from . import _omniattn as _C
from ._arrays import is_torch, to_numpy, torch_module
from ._core import (_check_run_options, _empty, _explained, _ids, _lowered, _operand, _operand_lse, _rope_dict,
                    _spec_values)
from .masks import Grid

__all__ = ["KVCache", "decode", "prefill"]

_STORAGE = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16",
            "f64": "f64", "float64": "f64"}


def _storage_name(dtype):
    """'f32' / 'bf16' / 'f16' from a name, a numpy dtype or a torch dtype (other names reach the binding's message)."""
    if isinstance(dtype, str):
        name = dtype
    elif torch_module() is not None and isinstance(dtype, torch_module().dtype):
        name = str(dtype).replace("torch.", "")
    else:
        name = np.dtype(dtype).name
    return _STORAGE.get(name, name)


def _tokens(name, x):
    """k or v of an append: [n, heads_kv, dim] or [1, n, heads_kv, dim], as the binding reads it."""
    if (isinstance(x, np.ndarray) or is_torch(x)) and x.ndim not in (3, 4):
        raise ValueError(f"omniattn: {name} must be [n, heads_kv, dim] or [1, n, heads_kv, dim], got shape {tuple(x.shape)}")
    return _operand(name, x, False)


class KVCache:
    """A paged KV cache (omniattn::kv_cache): pages of page_size tokens per (sequence, kv head), stored in dtype
    ("f32", "bf16", "f16", or the numpy / torch dtypes), shared between forks copy-on-write.

    rope: None, True or a dict (theta, rotary_dim, interleaved, sections), as attention(..., rope=...) takes it:
    keys are rotated on append, at their token index or the positions given there; decode() then needs the same
    rope. Sequence ids are ints; token indices never change, also when earlier tokens are evicted.
    Not thread-safe for changes; decode calls on an unchanging cache may run concurrently (a change waits for them).
    """

    def __init__(self, heads_kv, head_dim, *, head_dim_v=None, page_size=16, dtype="f32", rope=None):
        self._c = _C.KVCache(heads_kv, head_dim, 0 if head_dim_v is None else head_dim_v, page_size,
                             _storage_name(dtype), _rope_dict(rope))
        cfg = self._c.config
        self.heads_kv, self.head_dim, self.head_dim_v = cfg["heads_kv"], cfg["head_dim"], cfg["head_dim_v"]
        self.page_size, self.dtype, self.rope = cfg["page_size"], cfg["dtype"], cfg["rope"]

    def add_sequence(self):
        """A new, empty sequence; returns its id."""
        return self._c.add_sequence()

    def fork(self, seq):
        """A new sequence sharing every page of seq (copied on its first change); returns its id."""
        return self._c.fork(seq)

    def free(self, seq):
        """Frees seq; its unshared pages return to the free list."""
        self._c.free(seq)

    def append(self, seq, k, v, positions=None):
        """Appends n tokens, indices length(seq) .. + n - 1: k [n, heads_kv, head_dim], v [n, heads_kv, head_dim_v]
        (or with a leading 1), numpy or torch, float32 / bfloat16 / float16, any strides; k unrotated (the cache
        rotates it with its rope). positions: n RoPE ids ([axes, n] with sections), default the token indices."""
        (ck, _), (cv, _) = _tokens("k", k), _tokens("v", v)
        self._c.append(seq, ck, cv, _ids(positions), False)

    def truncate(self, seq, length):
        """Drops the tokens of index >= length (rollback)."""
        self._c.truncate(seq, length)

    def set_eviction(self, sinks=0, window=-1, kv_head=-1):
        """Before each append, keep only tokens < sinks and the last `window` (window < 0: everything), of one kv
        head or of all (kv_head=-1): StreamingLLM; per head, DuoAttention."""
        self._c.set_eviction(kv_head, sinks, window)

    def keep_top_k(self, seq, kv_head, mass, k):
        """Keeps the k cached keys of (seq, kv_head) with the largest mass: one float per cached slot, e.g.
        decode(..., return_key_mass=True)'s key_mass[b, kv_head, :cached(seq, kv_head)]."""
        self._c.keep_top_k(seq, kv_head, to_numpy(mass, "mass"), k)

    def shrink(self):
        """Releases the free pages to the system."""
        self._c.shrink()

    def sequences(self):
        """How many sequence ids were handed out (freed ones included)."""
        return self._c.sequences()

    def alive(self, seq):
        return self._c.alive(seq)

    def length(self, seq):
        """Tokens appended to seq (the next token index); -1 for an id that is not a sequence."""
        return self._c.length(seq)

    def cached(self, seq, kv_head):
        """Slots of (seq, kv_head) holding a token; -1 for bad ids."""
        return self._c.cached(seq, kv_head)

    def cached_tokens(self, seq, kv_head):
        """The token indices of the cached slots, in slot order (what key_mass entries refer to): int64 array."""
        return self._c.cached_tokens(seq, kv_head)

    def read(self, seq, kv_head):
        """(k, v): the cached rows as stored (k rotated with rope), float32 [cached, head_dim] / [cached, head_dim_v]."""
        return self._c.read(seq, kv_head)

    def memory(self):
        """dict: pages_in_use, pages_free, page_bytes, data_bytes, metadata_bytes, tokens (cached slots)."""
        return self._c.memory()

    def explain(self, q, seqs, **kwargs):
        """Which kernel decode(q, self, seqs, **kwargs) would run and why (omniattn::select_decode); runs nothing."""
        return _explained(_Decode(q, self, seqs, **kwargs).call("explain"), kwargs.get("backend", "auto"))

    def __repr__(self):
        return (f"KVCache(heads_kv={self.heads_kv}, head_dim={self.head_dim}, head_dim_v={self.head_dim_v}, "
                f"page_size={self.page_size}, dtype={self.dtype!r}, rope={self.rope}, sequences={self.sequences()})")


class _Decode:
    """One prepared decode call: operands, output buffers, the lowered mask and score."""

    def __init__(self, q, cache, seqs, *, scale=None, causal=False, mask=None, score=None, sink_logits=None, rope=None,
                 return_lse=False, return_key_mass=False, threads=0, backend="auto", cu_seqlens_q=None):
        if not isinstance(cache, KVCache):
            raise TypeError(f"omniattn: cache must be an omniattn.KVCache, not {type(cache).__name__}")
        _check_run_options(backend, threads)
        if not (isinstance(q, np.ndarray) or is_torch(q)) or q.ndim not in (3, 4):
            raise ValueError("omniattn: q must be a numpy array or torch tensor, [batch, Lq, heads_q, dim] or "
                             f"[batch, heads_q, dim] (Lq = 1), got {getattr(q, 'shape', type(q).__name__)}")
        # 3-d q: [batch, heads, dim] (one query per sequence), or [total, heads, dim] packed for a ragged batch.
        self.single = q.ndim == 3
        self.ragged = cu_seqlens_q is not None
        if self.single:
            axis = 0 if self.ragged else 1
            q = q.unsqueeze(axis) if is_torch(q) else np.expand_dims(q, axis)
        ids = np.atleast_1d(to_numpy(seqs, "seqs") if is_torch(seqs) else np.asarray(seqs))
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise TypeError(f"omniattn: seqs must be a sequence id or a 1-d list of them (ints), got {seqs!r}")
        self.cache = cache
        self.out = _empty(q, tuple(q.shape[:-1]) + (cache.head_dim_v,))
        self.lse = _empty(q, (q.shape[0], q.shape[2], q.shape[1]), "float32") if return_lse else None
        (op_q, bf_q), (op_out, bf_out) = _operand("q", q, False), _operand("out", self.out, False)
        self.kw = dict(q=op_q, out=op_out, seqs=[int(s) for s in ids], as_bf16=bf_q or bf_out,
                       lse=None if self.lse is None else _operand_lse(self.lse), backend=backend, threads=int(threads),
                       **_spec_values(scale, causal, sink_logits, rope))
        if self.ragged:
            self.kw["cu_seqlens_q"] = to_numpy(cu_seqlens_q, "cu_seqlens_q") if is_torch(cu_seqlens_q) else cu_seqlens_q
        d = self.call("validate")  # the C++ rules first, with their messages
        self.key_mass = None
        if return_key_mass:
            self.key_mass = _empty(q, (d["batch"], d["heads_kv"], d["key_mass_slots"]), "float32")
            self.kw["key_mass"] = _operand_lse(self.key_mass)
        if mask is not None or score is not None:  # tables index absolute positions: [batch, heads_q, longest, longest]
            lengths = np.asarray(d["lengths"], dtype=np.int64)
            self.kw.update(_lowered(mask, score, Grid(d["batch"], d["heads_q"], d["seq_k"], d["seq_k"], lengths, lengths)))

    def call(self, mode):
        return _C.decode(mode, self.cache._c, **self.kw)

    def result(self):
        out, lse = self.out, self.lse
        if self.single and self.ragged:
            out, lse = out[0], None if lse is None else lse[0]
        elif self.single:
            out, lse = out[:, 0], None if lse is None else lse[:, :, 0]
        extra = tuple(x for x in (lse, self.key_mass) if x is not None)
        return (out,) + extra if extra else out


def decode(q, cache, seqs, *, scale=None, causal=False, mask=None, score=None, sink_logits=None, rope=None,
           return_lse=False, return_key_mass=False, threads=0, backend="auto", cu_seqlens_q=None):
    """Attention of new queries against a KVCache (omniattn::attention_decode): decoding, chunked prefill, block
    decoding, FlashInfer's BatchDecode / BatchPrefill on a paged cache.

    q [batch, Lq, heads_q, head_dim] (or [batch, heads_q, head_dim] for Lq = 1), numpy or torch; row b belongs to
    cache sequence seqs[b] (distinct ids) and its Lq queries are that sequence's LAST Lq tokens: append their K / V
    first. Query i is token L_b - Lq + i, so the result is exactly attention(...) on the full sequence (Lq = Lk = L_b)
    at those rows, except that keys no longer cached (evicted, truncated) are masked. heads_q % heads_kv == 0 (GQA).

    The spec keywords are attention()'s: causal=True is bottom-right (query i sees tokens <= L_b - Lq + i; needed
    for a prefill chunk, a no-op for Lq = 1); mask / score (tables and functions are evaluated over absolute token
    positions, [batch, heads_q, longest, longest]); sink_logits; rope must be the cache's (queries are rotated at
    their token indices, or rope["pos_q"]).

    Returns out in q's framework and dtype, [batch, Lq, heads_q, head_dim_v] ([batch, heads_q, head_dim_v] for 3-d q),
    then lse float32 [batch, heads_q, Lq] ([batch, heads_q]) with return_lse, then key_mass float32
    [batch, heads_kv, slots] with return_key_mass: per cached slot (cache.cached_tokens order) the attention it got,
    summed over the call's queries of the kv head's group (entries past a head's cached slots are 0). Not recorded by
    torch autograd. Errors come from the library, e.g. "[attention_decode] q.seq 3 > length 2 of sequence 0 ...".
    prefill is the same function: a chunk of new queries after appending their K / V, with causal=True.

    Ragged batches (continuous batching, FlashInfer's qo_indptr): cu_seqlens_q = len(seqs) + 1 offsets, q packed as
    [total, heads_q, dim] (or [1, total, heads_q, dim]); sequence seqs[b] owns rows cu_seqlens_q[b] ..
    cu_seqlens_q[b + 1] - 1, its last (possibly zero) tokens. out is then [total, heads_q, head_dim_v] (or [1, ...]),
    lse [heads_q, total] (or [1, heads_q, total]).
    """
    call = _Decode(q, cache, seqs, scale=scale, causal=causal, mask=mask, score=score, sink_logits=sink_logits,
                   rope=rope, return_lse=return_lse, return_key_mass=return_key_mass, threads=threads, backend=backend,
                   cu_seqlens_q=cu_seqlens_q)
    call.call("run")
    return call.result()


prefill = decode
