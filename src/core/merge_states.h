// The LSE merge of partial attention results over disjoint key sets (split-K, cascade, context parallelism):
//   m = max_i lse_i,  w_i = exp(lse_i - m),  out = sum_i w_i out_i / sum_i w_i,  lse = m + log(sum_i w_i)
// in fp32, parts in the given order (so the result depends only on the parts, never on threads). A part with
// lse = -inf (no allowed key) has weight 0; all parts -inf gives out = 0, lse = -inf. A NaN lse makes the row NaN.
// A sink logit is a part with lse = sink and out = 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace omniattn::detail {

// Merges n parts of one row: part i's dim values at parts[i] (stride 1), its natural-log LSE at lses[i].
// Writes dim floats at out (may alias parts[0]) and returns the merged LSE.
inline float merge_state_row(const float* const* parts, const float* lses, std::int64_t n, std::int64_t dim, float* out) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf;
  bool nan = false;
  for (std::int64_t i = 0; i < n; ++i) {
    if (std::isnan(lses[i])) nan = true;
    if (lses[i] > m) m = lses[i];
  }
  if (nan) {
    for (std::int64_t d = 0; d < dim; ++d) out[d] = std::numeric_limits<float>::quiet_NaN();
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (m == neg_inf) {
    for (std::int64_t d = 0; d < dim; ++d) out[d] = 0.0f;
    return neg_inf;
  }
  float total = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) total += lses[i] == neg_inf ? 0.0f : std::exp(lses[i] - m);
  const float inv = 1.0f / total;
  // One pass per part, in order: the first writes out (it may alias parts[0], read before it is overwritten), the
  // rest accumulate into it.
  bool first = true;
  for (std::int64_t i = 0; i < n; ++i) {
    if (lses[i] == neg_inf) continue;
    const float w = std::exp(lses[i] - m) * inv;
    const float* src = parts[i];
    if (first) {
      for (std::int64_t d = 0; d < dim; ++d) out[d] = w * src[d];
      first = false;
    } else {
      for (std::int64_t d = 0; d < dim; ++d) out[d] += w * src[d];
    }
  }
  return m + std::log(total);
}

}  // namespace omniattn::detail
