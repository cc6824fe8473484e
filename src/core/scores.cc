// Built-in score modifiers (see include/omniattn/scores.h).
#include "omniattn/scores.h"

#include "core/score_kinds.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>

namespace omniattn::scores {

namespace {

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace

score_fn alibi(std::vector<double> slopes, std::int64_t offset) {
  require(!slopes.empty(), "[scores::alibi] slopes is empty (one slope per head, or one for all)");
  return detail::alibi_score{std::make_shared<const std::vector<double>>(std::move(slopes)), offset};
}

std::vector<double> alibi_slopes(std::int64_t heads) {
  // Press et al.: for n a power of two, slope_i = 2^(-8 i / n); otherwise the slopes of the next lower power of two,
  // then every other slope of the power above.
  auto pow2_slopes = [](std::int64_t n) {
    std::vector<double> out;
    for (std::int64_t i = 1; i <= n; ++i) out.push_back(std::exp2(-8.0 * static_cast<double>(i) / static_cast<double>(n)));
    return out;
  };
  std::int64_t p = 1;
  while (p * 2 <= heads) p *= 2;
  std::vector<double> out = pow2_slopes(p);
  if (p != heads) {
    const std::vector<double> more = pow2_slopes(2 * p);
    for (std::size_t i = 0; static_cast<std::int64_t>(out.size()) < heads; i += 2) out.push_back(more[i]);
  }
  return out;
}

score_fn softcap(double cap) {
  require(std::isfinite(cap) && cap > 0.0, "[scores::softcap] cap must be finite and > 0");
  return detail::softcap_score{cap};
}

score_fn temperature(std::vector<double> per_head) {
  require(!per_head.empty(), "[scores::temperature] per_head is empty (one temperature per head, or one for all)");
  for (double t : per_head) require(std::isfinite(t) && t != 0.0, "[scores::temperature] temperatures must be finite and != 0");
  auto t = std::make_shared<const std::vector<double>>(std::move(per_head));
  return [t](double x, std::int64_t, std::int64_t h, std::int64_t, std::int64_t) {
    return x / (*t)[static_cast<std::size_t>(h) % t->size()];
  };
}

score_fn key_bias(std::vector<double> bias) {
  auto b = std::make_shared<const std::vector<double>>(std::move(bias));
  return [b](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t k) {
    return x + (static_cast<std::size_t>(k) < b->size() ? (*b)[static_cast<std::size_t>(k)] : 0.0);
  };
}

score_fn logn(double base) {
  require(std::isfinite(base) && base > 1.0, "[scores::logn] base must be finite and > 1");
  const double inv_log_base = 1.0 / std::log(base);
  return [inv_log_base](double x, std::int64_t, std::int64_t, std::int64_t q, std::int64_t) {
    return x * std::max(1.0, std::log(static_cast<double>(q + 1)) * inv_log_base);
  };
}

std::int64_t relative_bucket(std::int64_t relative, std::int64_t buckets, std::int64_t max_distance, bool bidirectional) {
  std::int64_t offset = 0;
  std::int64_t n = buckets;
  if (bidirectional) {
    n /= 2;
    if (relative > 0) offset = n;
    relative = relative < 0 ? -relative : relative;
  } else {
    relative = relative < 0 ? -relative : 0;  // only the past (k < q) is distinguished
  }
  const std::int64_t exact = n / 2;
  if (relative < exact) return offset + relative;
  const double ratio = std::log(static_cast<double>(relative) / static_cast<double>(exact)) /
                       std::log(static_cast<double>(max_distance) / static_cast<double>(exact));
  const auto large = exact + static_cast<std::int64_t>(ratio * static_cast<double>(n - exact));
  return offset + std::min(large, n - 1);
}

score_fn relative_bias(std::vector<double> table, std::int64_t buckets, std::int64_t max_distance, bool bidirectional) {
  require(buckets >= (bidirectional ? 4 : 2), "[scores::relative_bias] buckets must be >= 2 (>= 4 bidirectional)");
  require(max_distance > buckets / (bidirectional ? 4 : 2), "[scores::relative_bias] max_distance must exceed the exact buckets");
  require(!table.empty() && table.size() % static_cast<std::size_t>(buckets) == 0,
          "[scores::relative_bias] table must hold heads * buckets values");
  auto t = std::make_shared<const std::vector<double>>(std::move(table));
  const auto heads = static_cast<std::int64_t>(t->size()) / buckets;
  return [t, heads, buckets, max_distance, bidirectional](double x, std::int64_t, std::int64_t h, std::int64_t q, std::int64_t k) {
    const std::int64_t bucket = relative_bucket(k - q, buckets, max_distance, bidirectional);
    return x + (*t)[static_cast<std::size_t>((h % heads) * buckets + bucket)];
  };
}

score_fn then(score_fn first, score_fn second) {
  return detail::chained_score{std::move(first), std::move(second)};
}

}  // namespace omniattn::scores
