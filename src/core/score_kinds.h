// The built-in score modifiers as named function objects, so a kernel can recognise them inside a score_fn
// (std::function::target) and run them vectorized instead of calling the type-erased function per element.
// Each functor's operator() is the oracle's definition (double); the kernels use the float tables and per-row
// constants exposed next to it, which must give the same value up to float rounding.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "omniattn/params.h"
#include "omniattn/scores.h"
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

struct temperature_score {
  std::shared_ptr<const std::vector<double>> per_head;
  double t(std::int64_t h) const { return (*per_head)[static_cast<std::size_t>(h) % per_head->size()]; }
  double operator()(double x, std::int64_t, std::int64_t h, std::int64_t, std::int64_t) const { return x / t(h); }
};

struct logn_score {
  double inv_log_base = 1.0;
  double factor(std::int64_t q) const { return std::max(1.0, std::log(static_cast<double>(q + 1)) * inv_log_base); }
  double operator()(double x, std::int64_t, std::int64_t, std::int64_t q, std::int64_t) const { return x * factor(q); }
};

// A per-key table added to the logit: key_bias (keys past the end add 0) and reweight (log weights, per head rows).
struct key_table {
  std::shared_ptr<const std::vector<double>> values;  // the oracle's values
  std::shared_ptr<const std::vector<float>> values_f;  // the same rounded to float, for vector loads in the kernel
  std::int64_t row = 0;  // values per head row; the table has values->size() / row rows (1 = shared by all heads)
  bool reweight = false;  // reweight tables must cover every key and have 1 or heads_q rows (checked per call)
  std::int64_t rows() const { return static_cast<std::int64_t>(values->size()) / row; }
  std::int64_t row_begin(std::int64_t h) const { return h % rows() * row; }
  double at(std::int64_t h, std::int64_t k) const {
    return k < row ? (*values)[static_cast<std::size_t>(row_begin(h) + k)] : 0.0;
  }
};

struct key_bias_score {
  key_table table;  // row = size: one row for all heads
  double operator()(double x, std::int64_t, std::int64_t h, std::int64_t, std::int64_t k) const { return x + table.at(h, k); }
};

struct reweight_score {
  key_table table;  // log(w), -inf where w = 0
  double operator()(double x, std::int64_t, std::int64_t h, std::int64_t, std::int64_t k) const { return x + table.at(h, k); }
};

struct bias_score {
  const float* data = nullptr;
  std::array<std::int64_t, 4> shape{}, strides{};  // strides of broadcast (size 1) dims are set to 0
  const float* row(std::int64_t b, std::int64_t h, std::int64_t q) const {
    return data + b * strides[0] + h * strides[1] + q * strides[2];
  }
  double operator()(double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) const {
    return x + static_cast<double>(row(b, h, q)[k * strides[3]]);
  }
};

struct chained_score {
  score_fn first, second;
  double operator()(double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) const {
    return second(first(x, b, h, q, k), b, h, q, k);
  }
};

// One step of a score_fn flattened into its parts: a vectorizable built-in, a user tile function (scores::inlined), or
// any other callable (called per element).
struct score_step {
  enum class kind : std::uint8_t { alibi, softcap, temperature, logn, key_table, bias, tile, element } op;
  const alibi_score* alibi = nullptr;
  double cap = 0.0;
  const temperature_score* temperature = nullptr;
  const logn_score* logn = nullptr;
  const key_table* table = nullptr;
  const bias_score* bias = nullptr;
  const scores::tile_score* tile = nullptr;
  const score_fn* element = nullptr;
  bool vector() const { return op != kind::tile && op != kind::element; }
};

// Flattens f into steps (pointers into f's targets: valid while f lives). Returns true when no step is a per-element
// call, i.e. the whole chain runs on vectors or tile functions.
inline bool lower_score(const score_fn& f, std::vector<score_step>& out) {
  using k = score_step::kind;
  score_step st{};
  if (const auto* t = f.target<chained_score>()) {
    const bool a = lower_score(t->first, out);
    return lower_score(t->second, out) && a;
  }
  if (const auto* a = f.target<alibi_score>()) {
    st.op = k::alibi, st.alibi = a;
  } else if (const auto* c = f.target<softcap_score>()) {
    st.op = k::softcap, st.cap = c->cap;
  } else if (const auto* t = f.target<temperature_score>()) {
    st.op = k::temperature, st.temperature = t;
  } else if (const auto* l = f.target<logn_score>()) {
    st.op = k::logn, st.logn = l;
  } else if (const auto* kb = f.target<key_bias_score>()) {
    st.op = k::key_table, st.table = &kb->table;
  } else if (const auto* rw = f.target<reweight_score>()) {
    st.op = k::key_table, st.table = &rw->table;
  } else if (const auto* bs = f.target<bias_score>()) {
    st.op = k::bias, st.bias = bs;
  } else if (const auto* ts = f.target<scores::tile_score>()) {
    st.op = k::tile, st.tile = ts;
  } else {
    st.op = k::element, st.element = &f;
  }
  out.push_back(st);
  return st.op != k::element;
}

// Whether any step is user code (a tile function or a per-element functor), which can throw.
inline bool score_has_user_code(const score_fn& f) {
  std::vector<score_step> steps;
  lower_score(f, steps);
  return std::any_of(steps.begin(), steps.end(), [](const score_step& st) { return !st.vector(); });
}

// One line for select()'s reasons: how the kernel runs the modifier.
std::string describe_score(const score_fn& f);

// Checks the parts of a score modifier that depend on the call's sizes (p's batch, heads_q, seq_q, seq_k): returns
// "" or the rule broken, e.g. "reweight has 100 weights per head, fewer than seq_k 128". Called by validation.
std::string check_score(const score_fn& f, const attn_params& p);

}  // namespace omniattn::detail
