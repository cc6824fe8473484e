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
//   then(a, b)             b(a(s, ...), ...)                   (composition: apply a, then b)
// Modifiers run in the oracle in double and in the kernels per element of the allowed pairs. Per-head vectors hold
// one value per head, or one value for all heads (indices wrap). Invalid parameters (an empty vector, a cap <= 0)
// throw std::invalid_argument naming the modifier, at construction rather than inside a kernel.
#pragma once

#include <cstdint>
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

}  // namespace omniattn::scores
