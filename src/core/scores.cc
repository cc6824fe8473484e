// Built-in score modifiers (see include/omniattn/scores.h).
#include "omniattn/scores.h"

#include "core/score_kinds.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>

namespace omniattn::scores {

namespace {

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

constexpr double k_float_max = std::numeric_limits<float>::max();

// A finite double that is not a finite float (the kernels compute in float): the cases a kernel would silently get
// wrong against the fp64 oracle. inf / NaN are the same in both precisions.
bool overflows_float(double x) { return std::isfinite(x) && std::fabs(x) > k_float_max; }

}  // namespace

score_fn alibi(std::vector<double> slopes, std::int64_t offset) {
  require(!slopes.empty(), "[scores::alibi] slopes is empty (one slope per head, or one for all)");
  for (double m : slopes)
    require(std::isfinite(m) && std::fabs(m) <= k_float_max, "[scores::alibi] slopes must be finite floats (|slope| <= 3.4e38)");
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
  // The kernels multiply by 1 / cap and by cap * log2(e) in float.
  require(cap * 1.4426950408889634 <= k_float_max && 1.0 / cap <= k_float_max,
          "[scores::softcap] cap must be in float range: cap * log2(e) and 1 / cap at most 3.4e38");
  return detail::softcap_score{cap};
}

score_fn temperature(std::vector<double> per_head) {
  require(!per_head.empty(), "[scores::temperature] per_head is empty (one temperature per head, or one for all)");
  for (double t : per_head) {
    require(std::isfinite(t) && t != 0.0, "[scores::temperature] temperatures must be finite and != 0");
    require(1.0 / std::fabs(t) <= k_float_max, "[scores::temperature] 1 / t must be a finite float (|t| >= 3e-39)");
  }
  return detail::temperature_score{std::make_shared<const std::vector<double>>(std::move(per_head))};
}

namespace {

detail::key_table make_table(std::vector<double> values, std::int64_t row) {
  std::vector<float> f(values.begin(), values.end());
  detail::key_table t;
  t.values = std::make_shared<const std::vector<double>>(std::move(values));
  t.values_f = std::make_shared<const std::vector<float>>(std::move(f));
  t.row = row;
  return t;
}

}  // namespace

score_fn key_bias(std::vector<double> bias) {
  if (bias.empty()) bias.push_back(0.0);  // no values: every key adds 0 (keeps the one-row table non-empty)
  for (double x : bias) require(!overflows_float(x), "[scores::key_bias] values must be floats (|x| <= 3.4e38; -inf masks)");
  const auto n = static_cast<std::int64_t>(bias.size());
  return detail::key_bias_score{make_table(std::move(bias), n)};
}

score_fn logn(double base) {
  require(std::isfinite(base) && base > 1.0, "[scores::logn] base must be finite and > 1");
  return detail::logn_score{1.0 / std::log(base)};
}

score_fn reweight(std::vector<double> weights, std::int64_t keys_per_head) {
  require(!weights.empty(), "[scores::reweight] weights is empty (one weight per key, or per head and key)");
  require(keys_per_head >= 0, "[scores::reweight] keys_per_head must be >= 0 (0: one row of weights for all heads)");
  const auto n = static_cast<std::int64_t>(weights.size());
  const std::int64_t row = keys_per_head == 0 ? n : keys_per_head;
  require(n % row == 0, "[scores::reweight] weights must hold a whole number of rows of keys_per_head values");
  for (double& w : weights) {
    require(std::isfinite(w) && w >= 0.0, "[scores::reweight] weights must be finite and >= 0 (0 removes a key)");
    w = std::log(w);  // log(0) = -inf: the key's logit becomes -inf, which every backend treats as masked
  }
  detail::reweight_score r{make_table(std::move(weights), row)};
  r.table.reweight = true;
  return r;
}

score_fn bias(const float* data, std::array<std::int64_t, 4> shape, std::array<std::int64_t, 4> strides) {
  require(data != nullptr, "[scores::bias] data is null");
  for (int d = 0; d < 4; ++d) {
    require(shape[static_cast<std::size_t>(d)] >= 0, "[scores::bias] every shape entry must be >= 0 (1 broadcasts)");
    require(strides[static_cast<std::size_t>(d)] >= 0, "[scores::bias] strides must be >= 0");
  }
  detail::bias_score b;
  b.data = data;
  b.shape = shape;
  for (std::size_t d = 0; d < 4; ++d) b.strides[d] = shape[d] == 1 ? 0 : strides[d];
  return b;
}

score_fn bias(const float* data, std::array<std::int64_t, 4> shape) {
  return bias(data, shape, {shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1});
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
  for (double x : table) require(!overflows_float(x), "[scores::relative_bias] values must be floats (|x| <= 3.4e38)");
  return detail::relative_bias_score{std::make_shared<const std::vector<double>>(std::move(table)), buckets, max_distance,
                                     bidirectional};
}

score_fn differentiable(score_fn f, score_fn df) {
  require(static_cast<bool>(f), "[scores::differentiable] f is empty");
  require(static_cast<bool>(df), "[scores::differentiable] df is empty");
  return detail::differentiable_score{std::move(f), std::move(df)};
}

score_fn then(score_fn first, score_fn second) {
  return detail::chained_score{std::move(first), std::move(second)};
}

}  // namespace omniattn::scores

namespace omniattn::detail {

std::string describe_score(const score_fn& f) {
  std::vector<score_step> steps;
  const bool no_element = lower_score(f, steps);
  std::string names;
  bool tile = false;
  for (const score_step& st : steps) {
    static const char* const k_names[] = {"alibi", "softcap", "temperature", "logn", "key table", "bias",
                                          "relative bias", "inlined", "functor"};
    names += (names.empty() ? "" : " -> ") + std::string(k_names[static_cast<int>(st.op)]);
    tile |= st.op == score_step::kind::tile;
  }
  if (!no_element)
    return "score modifier " + names + ": user score functor called per element (type-erased call, slow path; "
           "scores::inlined avoids it)";
  return "score modifier " + names + ": applied to whole score rows, vectorized" +
         (tile ? std::string(" (user code through one inlined tile function per score tile)") : std::string());
}

std::string score_derivative_missing(const score_fn& f) {
  std::vector<score_step> steps;
  lower_score(f, steps);
  for (std::size_t u = 0; u < steps.size(); ++u)
    if (!steps[u].vector() && !steps[u].derivative)
      return "step " + std::to_string(u + 1) + " of " + std::to_string(steps.size()) + " (a user " +
             (steps[u].op == score_step::kind::tile ? "scores::inlined function" : "score functor") +
             ") has no derivative: give one with scores::inlined(f, df) or scores::differentiable(f, df)";
  return {};
}

std::string check_score(const score_fn& f, const attn_params& p) {
  std::vector<score_step> steps;
  lower_score(f, steps);
  std::ostringstream os;
  // The whole problem's lengths (options::block): the positions the tables are indexed by.
  const std::int64_t tq = total_q(p), tk = total_k(p);
  for (const score_step& st : steps) {
    if (st.op != score_step::kind::key_table || !st.table->reweight) continue;
    const key_table& t = *st.table;
    if (t.row < tk) {
      os << "reweight has " << t.row << " weights per head row, fewer than seq_k " << tk
         << " (every key needs a weight)";
      return os.str();
    }
    if (t.rows() != 1 && t.rows() != total_heads(p)) {
      os << "reweight has " << t.rows() << " rows of " << t.row << " weights, expected 1 (all heads) or heads_q "
         << total_heads(p);
      return os.str();
    }
  }
  // The kernels evaluate in float: the softmax scale, the temperature and LogN factors and log2(e) multiply each
  // logit, and an ALiBi bias is slope * (k - q + offset) with k - q + offset an int64 first.
  constexpr double k_float_max = std::numeric_limits<float>::max();
  double factor = std::fabs(p.scale) * 1.4426950408889634;
  for (const score_step& st : steps) {
    if (st.op == score_step::kind::temperature) {
      double most = 0.0;
      for (double t : *st.temperature->per_head) most = std::max(most, 1.0 / std::fabs(t));
      factor *= most;
    } else if (st.op == score_step::kind::logn) {
      factor *= st.logn->factor(std::max<std::int64_t>(tq - 1, 0));
    } else if (st.op == score_step::kind::alibi && tq > 0 && tk > 0) {
      const std::int64_t offset = st.alibi->offset;
      std::int64_t hi = 0, lo = 0;
      if (__builtin_add_overflow(offset, tk - 1, &hi) || __builtin_sub_overflow(offset, tq - 1, &lo)) {
        os << "alibi offset " << offset << ": k - q + offset leaves int64 for seq_q " << tq << ", seq_k " << tk;
        return os.str();
      }
      double slope = 0.0;
      for (double m : *st.alibi->slopes) slope = std::max(slope, std::fabs(m));
      const double reach = slope * std::max(std::fabs(static_cast<double>(hi)), std::fabs(static_cast<double>(lo)));
      if (reach > k_float_max) {
        os << "alibi bias reaches " << reach << " (slope " << slope << " times k - q + offset up to "
           << std::max(std::fabs(static_cast<double>(hi)), std::fabs(static_cast<double>(lo)))
           << "), beyond float range 3.40282e+38";
        return os.str();
      }
    }
  }
  if (factor > k_float_max) {
    os << "the softmax scale " << p.scale << " times the temperature / logn factors and log2(e) is " << factor
       << ", beyond float range 3.40282e+38";
    return os.str();
  }
  for (const score_step& st : steps) {
    if (st.op == score_step::kind::bias) {
      static const char* const k_dims[] = {"batch", "heads_q", "seq_q", "seq_k"};
      const std::int64_t want[4] = {p.batch, total_heads(p), tq, tk};
      for (std::size_t d = 0; d < 4; ++d) {
        const std::int64_t got = st.bias->shape[d];
        if (got != 1 && got != want[d]) {
          os << "bias shape [" << st.bias->shape[0] << ", " << st.bias->shape[1] << ", " << st.bias->shape[2] << ", "
             << st.bias->shape[3] << "] does not broadcast to [batch, heads_q, seq_q, seq_k] = [" << want[0] << ", "
             << want[1] << ", " << want[2] << ", " << want[3] << "]: dim " << d << " (" << k_dims[d] << ") is " << got
             << ", must be 1 or " << want[d];
          return os.str();
        }
      }
    }
  }
  return {};
}

}  // namespace omniattn::detail
