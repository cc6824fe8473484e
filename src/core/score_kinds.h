// The built-in score modifiers as named function objects, so a kernel can recognise them inside a score_fn
// (std::function::target) and run them vectorized instead of calling the type-erased function per element.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "omniattn/spec.h"

namespace omniattn::detail {

struct alibi_score {
  std::shared_ptr<const std::vector<double>> slopes;
  std::int64_t offset = 0;
  double slope(std::int64_t h) const { return (*slopes)[static_cast<std::size_t>(h) % slopes->size()]; }
  double operator()(double x, std::int64_t, std::int64_t h, std::int64_t q, std::int64_t k) const {
    return x + slope(h) * static_cast<double>(k - q + offset);
  }
};

struct softcap_score {
  double cap = 1.0;
  double operator()(double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t) const { return cap * std::tanh(x / cap); }
};

struct chained_score {
  score_fn first, second;
  double operator()(double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) const {
    return second(first(x, b, h, q, k), b, h, q, k);
  }
};

// A score_fn flattened into built-in steps, when it is made only of them.
struct score_step {
  enum class kind : std::uint8_t { alibi, softcap } op;
  const alibi_score* alibi = nullptr;
  double cap = 0.0;
};

inline bool lower_score(const score_fn& f, std::vector<score_step>& out) {
  if (const auto* a = f.target<alibi_score>()) {
    out.push_back({score_step::kind::alibi, a, 0.0});
    return true;
  }
  if (const auto* c = f.target<softcap_score>()) {
    out.push_back({score_step::kind::softcap, nullptr, c->cap});
    return true;
  }
  if (const auto* t = f.target<chained_score>()) return lower_score(t->first, out) && lower_score(t->second, out);
  return false;
}

}  // namespace omniattn::detail
