// The built-in score modifiers as named function objects, so a kernel can recognise them inside a score_fn
// (std::function::target) and run them vectorized instead of calling the type-erased function per element.
// Each functor's operator() is the oracle's definition (double); the kernels use the float tables and per-row
// constants exposed next to it, which must give the same value up to float rounding.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
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
  // Entries of the bias (and of its gradient, gradients.d_bias, contiguous in `shape`).
  std::int64_t elements() const { return shape[0] * shape[1] * shape[2] * shape[3]; }
};

// T5 / Music-Transformer relative position buckets: s + table[h * buckets + bucket(k - q)].
struct relative_bias_score {
  std::shared_ptr<const std::vector<double>> table;  // heads x buckets (heads may be 1: shared)
  std::int64_t buckets = 0, max_distance = 0;
  bool bidirectional = false;
  std::int64_t heads() const { return static_cast<std::int64_t>(table->size()) / buckets; }
  double at(std::int64_t h, std::int64_t relative) const {
    return (*table)[static_cast<std::size_t>((h % heads()) * buckets +
                                             scores::relative_bucket(relative, buckets, max_distance, bidirectional))];
  }
  double operator()(double x, std::int64_t, std::int64_t h, std::int64_t q, std::int64_t k) const { return x + at(h, k - q); }
};

// A user score function with its derivative d f / d s (scores::differentiable), for the backward pass.
struct differentiable_score {
  score_fn f, df;
  double operator()(double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) const { return f(x, b, h, q, k); }
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
  enum class kind : std::uint8_t { alibi, softcap, temperature, logn, key_table, bias, relative, tile, element } op;
  const alibi_score* alibi = nullptr;
  double cap = 0.0;
  const temperature_score* temperature = nullptr;
  const logn_score* logn = nullptr;
  const key_table* table = nullptr;
  const bias_score* bias = nullptr;
  const relative_bias_score* relative = nullptr;
  const scores::tile_score* tile = nullptr;
  const score_fn* element = nullptr;
  // d step / d s of a user step (tile or element), for the backward pass; null when the user gave none. Built-in
  // steps have closed-form derivatives (score_value_grad).
  const score_fn* derivative = nullptr;
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
  if (const auto* ds = f.target<differentiable_score>()) {
    const std::size_t before = out.size();
    const bool fast = lower_score(ds->f, out);
    // The derivative belongs to a single user step; a chain of built-ins has its own closed forms.
    if (out.size() == before + 1 && !out.back().vector()) out.back().derivative = &ds->df;
    return fast;
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
  } else if (const auto* rb = f.target<relative_bias_score>()) {
    st.op = k::relative, st.relative = rb;
  } else if (const auto* ts = f.target<scores::tile_score>()) {
    st.op = k::tile, st.tile = ts;
    if (ts->derivative) st.derivative = &ts->derivative;
  } else {
    st.op = k::element, st.element = &f;
  }
  out.push_back(st);
  return st.op != k::element;
}

// The index of the chain's dense bias step (scores::bias), or -1. With gradients.d_bias validation admits exactly one,
// the step every backward backend differentiates against.
inline std::ptrdiff_t dense_bias_step(const std::vector<score_step>& steps) {
  for (std::size_t u = 0; u < steps.size(); ++u)
    if (steps[u].op == score_step::kind::bias) return static_cast<std::ptrdiff_t>(u);
  return -1;
}

// Whether any step is user code (a tile function or a per-element functor), which can throw.
inline bool score_has_user_code(const score_fn& f) {
  std::vector<score_step> steps;
  lower_score(f, steps);
  return std::any_of(steps.begin(), steps.end(), [](const score_step& st) { return !st.vector(); });
}

// One step in double with its derivative: returns step(x) and sets *dx = d step / d x (the oracle's backward).
// A user step without a derivative sets *dx to NaN (validation rejects such calls first).
inline double score_step_value_grad(const score_step& st, double x, std::int64_t b, std::int64_t h, std::int64_t q,
                                    std::int64_t k, double* dx) {
  using kd = score_step::kind;
  *dx = 1.0;
  switch (st.op) {
    case kd::alibi: return (*st.alibi)(x, b, h, q, k);
    case kd::softcap: {
      const double t = std::tanh(x / st.cap);
      *dx = 1.0 - t * t;
      return st.cap * t;
    }
    case kd::temperature: *dx = 1.0 / st.temperature->t(h); return x * *dx;
    case kd::logn: *dx = st.logn->factor(q); return x * *dx;
    case kd::key_table: return x + st.table->at(h, k);
    case kd::bias: return (*st.bias)(x, b, h, q, k);
    case kd::relative: return (*st.relative)(x, b, h, q, k);
    case kd::tile:
    case kd::element: {
      *dx = st.derivative ? (*st.derivative)(x, b, h, q, k) : std::numeric_limits<double>::quiet_NaN();
      return st.op == kd::tile ? st.tile->element(x, b, h, q, k) : (*st.element)(x, b, h, q, k);
    }
  }
  return x;
}

// Whether the backward pass can differentiate f: "" or which step has no derivative.
std::string score_derivative_missing(const score_fn& f);

// One line for select()'s reasons: how the kernel runs the modifier.
std::string describe_score(const score_fn& f);

// Checks the parts of a score modifier that depend on the call's sizes (p's batch, heads_q, seq_q, seq_k): returns
// "" or the rule broken, e.g. "reweight has 100 weights per head, fewer than seq_k 128". Called by validation.
std::string check_score(const score_fn& f, const attn_params& p);

}  // namespace omniattn::detail
