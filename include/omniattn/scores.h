// omniattn: built-in score modifiers, score(s, b, h, q, k) -> s' on the scaled logit s (spec.score).
//
//   alibi(slopes, offset)  s + slopes[h] * (k - q + offset)    (ALiBi: 0 on the aligned diagonal, negative for past
//                          keys; offset 0 aligns top-left, offset = Lq - Lk aligns bottom-right)
//   softcap(cap)           cap * tanh(s / cap)                 (Gemma-2 / Grok logit soft-capping)
//   temperature(t)         s / t[h]                            (per-head temperature)
//   key_bias(bias)         s + bias[k]                         (per-key logit bias, e.g. sink calibration)
//   logn(base)             s * max(1, log(q + 1) / log(base))  (LogN scaling: sharper attention past the training length)
//   relative_bias(table, buckets, max_distance, bidirectional)
//                          s + table[h * buckets + bucket(k - q)]  (T5 / Music-Transformer relative position buckets:
//                          exact buckets for small distances, log-spaced up to max_distance)
//   reweight(w, kph)       s + log(w[h * kph + k])            (post-softmax per-key reweighting, see below)
//   bias(data, shape, strides)
//                          s + data[b, h, q, k]               (a dense additive float32 bias tensor, broadcasting)
//   inlined(f)             f(s, b, h, q, k)                   (a user functor, compiled into the caller's tile loop)
//   then(a, b)             b(a(s, ...), ...)                   (composition: apply a, then b)
// Modifiers run in the oracle in double and in the kernels per element of the allowed pairs. Per-head vectors hold
// one value per head, or one value for all heads (indices wrap). Invalid parameters (an empty vector, a cap <= 0)
// throw std::invalid_argument naming the modifier, at construction rather than inside a kernel; parameters that
// depend on the call's sizes (table lengths, bias shapes) are checked by attention() and reported as
// "[attention] spec.score ...". Every built-in runs vectorized in the CPU kernel; a plain score_fn (any other
// callable) is called per element through std::function, about 2x slower: wrap user code in inlined() instead.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "omniattn/spec.h"

namespace omniattn::scores {

score_fn alibi(std::vector<double> slopes, std::int64_t offset = 0);
// The standard ALiBi slopes for n heads: 2^(-8 i / n), i = 1..n (n a power of two; otherwise the paper's interleave).
std::vector<double> alibi_slopes(std::int64_t heads);
score_fn softcap(double cap);
score_fn temperature(std::vector<double> per_head);
score_fn key_bias(std::vector<double> bias);
score_fn logn(double base);
score_fn relative_bias(std::vector<double> table, std::int64_t buckets, std::int64_t max_distance, bool bidirectional);
// T5's bucket of a relative position (k - q).
std::int64_t relative_bucket(std::int64_t relative, std::int64_t buckets, std::int64_t max_distance, bool bidirectional);
score_fn then(score_fn first, score_fn second);

// Post-softmax per-key reweighting with renormalisation (attention calibration / emphasis, e.g. PASTA, ACT):
//   p'_ij = w_j p_ij / sum_j' w_j' p_ij'
// implemented exactly as the additive log-weight s_ij + log(w_j), because
//   softmax(s + log w)_j = w_j exp(s_j) / sum_j' w_j' exp(s_j') = w_j p_j / sum_j' w_j' p_j'.
// So it costs one vector add per score, and the LSE output is the log-sum-exp of the reweighted logits,
// log(sum_j w_j exp(s_j)), not of the original ones. w_j = 0 removes key j (its logit becomes -inf, like a mask);
// a row whose allowed keys all have weight 0 is fully masked (out 0, lse -inf). Apply it last in a chain: a modifier
// after it sees s + log w (a softcap after it would turn a removed key's -inf back into -cap).
// keys_per_head = 0: `weights` is one row for every head, w_j = weights[k] (it must hold >= seq_k values).
// keys_per_head > 0: `weights` holds rows of keys_per_head values, one row for all heads or one per query head,
// w_j = weights[h * keys_per_head + k] (keys_per_head must be >= seq_k). Weights must be finite and >= 0
// (std::invalid_argument "[scores::reweight] ..." otherwise). Varlen: k is the key's position in its sequence.
score_fn reweight(std::vector<double> weights, std::int64_t keys_per_head = 0);

// Dense additive bias, FlexAttention / xFormers "attn_bias": s + data[b * st[0] + h * st[1] + q * st[2] + k * st[3]].
// shape = {B, H, Lq, Lk}: each either the call's size (batch, heads_q, seq_q, seq_k; for varlen the number of
// sequences and the longest lengths) or 1 to broadcast along it (its stride is then ignored). Strides are in
// elements and must be >= 0. A borrowed view: `data` must stay valid and unchanged until every attention() call using
// the returned score_fn has returned. The CPU kernel loads rows of keys as vectors when st[3] == 1 (contiguous key
// dim) and gathers them otherwise. -inf entries mask their pair; NaN and +inf give NaN outputs like any logit (a NaN
// at an allowed pair makes its whole row NaN, out and lse, in the oracle and the kernels alike).
score_fn bias(const float* data, std::array<std::int64_t, 4> shape, std::array<std::int64_t, 4> strides);
// The same for a contiguous row-major [B, H, Lq, Lk] (broadcast dims of size 1 included) tensor.
score_fn bias(const float* data, std::array<std::int64_t, 4> shape);

// A score modifier made of a user function object at about the cost of a built-in: the CPU kernel calls one tile
// function per 64 x 64 score tile, whose loop calls f directly (instantiated in the caller's translation unit, so
// the compiler inlines f and can vectorize the loop), instead of one type-erased call per element.
// f is called as f(x, b, h, q, k) with x a double in the fp64 oracle and a float in the kernel (q, k positions in
// the sequence, b the batch / sequence, h the query head): write it with `auto` parameters so both instantiate, e.g.
//   spec.score = scores::inlined([](auto s, auto, auto, auto, auto) { return 30 * std::tanh(s / 30); });
// It must be a pure function of its arguments (the kernel runs it on several threads at once and may evaluate keys
// that the mask later drops). Composes with then() like any score_fn.
struct tile_score {
  // s[i * ld + j] for i < rows, j < keys: scaled by `scale`, then modified in place (query q0 + i, key k0 + j).
  using tile_fn = std::function<void(float* s, std::int64_t ld, std::int64_t rows, std::int64_t keys, std::int64_t b,
                                     std::int64_t h, std::int64_t q0, std::int64_t k0, float scale)>;
  score_fn element;  // the same function per element: the oracle, the naive path and any non-tiled backend
  tile_fn tile;
  score_fn derivative;  // d element / d s, for attention_backward (empty: the modifier cannot run backward)
  double operator()(double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) const {
    return element(x, b, h, q, k);
  }
};

template <class F>
score_fn inlined(F f) {
  tile_score t;
  t.element = [f](double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) -> double {
    return static_cast<double>(f(x, b, h, q, k));
  };
  t.tile = [f](float* s, std::int64_t ld, std::int64_t rows, std::int64_t keys, std::int64_t b, std::int64_t h,
               std::int64_t q0, std::int64_t k0, float scale) {
    for (std::int64_t i = 0; i < rows; ++i) {
      float* row = s + i * ld;
      const std::int64_t q = q0 + i;
      // One straight loop over contiguous floats with f inlined: the compiler's vectorizer sees the whole body.
      for (std::int64_t j = 0; j < keys; ++j) row[j] = static_cast<float>(f(row[j] * scale, b, h, q, k0 + j));
    }
  };
  return t;
}

// inlined(f) with its derivative df(s, b, h, q, k) = d f / d s, so attention_backward can run through it (also
// `auto` parameters; the backward pass calls df per element of the allowed pairs).
template <class F, class G>
score_fn inlined(F f, G df) {
  score_fn s = inlined(std::move(f));
  s.target<tile_score>()->derivative = [df](double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) -> double {
    return static_cast<double>(df(x, b, h, q, k));
  };
  return s;
}

// Any score_fn f made differentiable: df(s, b, h, q, k) = d f / d s at s. attention_backward multiplies the incoming
// gradient of each logit by it (chain rule); a user score modifier without a derivative makes attention_backward fail
// with "[attention_backward] spec.score ... has no derivative". Forward calls run f exactly as without the wrapper.
score_fn differentiable(score_fn f, score_fn df);

}  // namespace omniattn::scores

namespace omniattn {

// Parses a score spec string (grammar in README.md, "Score modifiers as spec strings"): terms joined by '+', applied
// left to right, e.g. "alibi + softcap(30)". `heads` (query heads) sizes the standard ALiBi slopes. Returns "" and
// sets `out` (empty for "none"), or returns "[spec] at N: ..." with the text and a caret under the offending character
// (N counts characters; the message is valid UTF-8, as for parse_mask).
std::string parse_score(std::string_view text, std::int64_t heads, score_fn& out);

}  // namespace omniattn
