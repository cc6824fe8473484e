// Score modifiers applied to one tile of raw scores, per ISA (Highway -inl.h: included once per target by
// cpu/flash_fwd.cc). On entry s[i * ld + j] holds q_i . k_j for the tile's rows x keys; on exit it holds the modified
// logit in base 2, score(scale * q.k, b, h, q0 + i, k0 + j) * log2(e), which the softmax then uses with scale 1.
//
// The score_fn is flattened once per call (score_kinds.h) into steps, applied in order as runs:
//   built-in steps (alibi, softcap, temperature, logn, key tables, bias): one pass over the tile, each score loaded
//     once into a vector register, every step of the run applied to it, stored once (the tile stays in L1);
//   a user tile function (scores::inlined): called once for the whole tile;
//   any other score_fn: called per element through std::function (the slow path).
// The softmax scale is applied by the first run and the conversion to base 2 by the last one.
#if defined(OMNIATTN_CPU_SCORE_TILE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef OMNIATTN_CPU_SCORE_TILE_INL_H_
#undef OMNIATTN_CPU_SCORE_TILE_INL_H_
#else
#define OMNIATTN_CPU_SCORE_TILE_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/parallel.h"
#include "core/score_kinds.h"
#include "cpu/math-inl.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "omniattn/params.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// A score functor lowered once per call.
struct score_plan {
  std::vector<detail::score_step> steps;
  // Per step: the LogN factor of every query position (empty for other steps), so a tile row costs no log().
  std::vector<std::vector<double>> logn_factor;
  // Per step: a relative-bias table expanded over every relative position k - q in (-seq_q, seq_k), one row per
  // table head, so a tile row's biases are consecutive floats (one vector load per key vector, no bucket math).
  std::vector<std::vector<float>> relative_row;
  std::int64_t relative_span = 0, relative_origin = 0;  // row length; index of relative position 0
  bool fast = false;  // no per-element std::function call
};

inline score_plan plan_score(const attn_params& p) {
  score_plan sp;
  if (!p.score) return sp;
  sp.fast = detail::lower_score(*p.score, sp.steps);
  sp.logn_factor.resize(sp.steps.size());
  sp.relative_row.resize(sp.steps.size());
  // Over the whole problem's positions (options::block), which the tiles' rows and keys are.
  sp.relative_origin = std::max<std::int64_t>(total_q(p) - 1, 0);
  sp.relative_span = sp.relative_origin + std::max<std::int64_t>(total_k(p), 1);
  for (std::size_t u = 0; u < sp.steps.size(); ++u) {
    const detail::score_step& st = sp.steps[u];
    if (st.op == detail::score_step::kind::logn)
      for (std::int64_t q = 0; q < total_q(p); ++q) sp.logn_factor[u].push_back(st.logn->factor(q));
    if (st.op == detail::score_step::kind::relative) {
      std::vector<float>& row = sp.relative_row[u];
      row.resize(static_cast<std::size_t>(st.relative->heads() * sp.relative_span));
      for (std::int64_t h = 0; h < st.relative->heads(); ++h)
        for (std::int64_t r = 0; r < sp.relative_span; ++r)
          row[static_cast<std::size_t>(h * sp.relative_span + r)] = static_cast<float>(st.relative->at(h, r - sp.relative_origin));
    }
  }
  return sp;
}

// What one built-in step needs for one tile row.
struct score_row_const {
  float a = 0.0f, c = 0.0f;        // slope / cap (times log2 e when folded) / 1 over temperature / LogN factor; 1 / cap
  std::int64_t rel = 0;            // alibi: k0 - q + offset, the relative position of the row's first key
  const float* table = nullptr;    // key tables and bias: the value of key k0
  std::int64_t avail = 0;          // table entries valid from `table` on (later keys read as 0)
  std::int64_t stride = 1;         // elements between consecutive keys' values (0: one value for every key)
};

// Longest run of built-in steps applied in one pass (their row constants live on the stack).
constexpr std::size_t k_max_score_run = 16;

// The multiplier of a temperature or LogN step for head h, query q (double, so several fold into one rounding).
inline double score_factor(const score_plan& sp, std::size_t u, std::int64_t h, std::int64_t q) {
  const detail::score_step& st = sp.steps[u];
  return st.op == detail::score_step::kind::temperature ? 1.0 / st.temperature->t(h)
                                                        : sp.logn_factor[u][static_cast<std::size_t>(q)];
}

inline bool multiplicative(const detail::score_step& st) {
  return st.op == detail::score_step::kind::temperature || st.op == detail::score_step::kind::logn;
}

inline score_row_const score_row(const score_plan& sp, std::size_t u, std::int64_t b, std::int64_t h, std::int64_t q,
                                 std::int64_t k0) {
  using kind = detail::score_step::kind;
  const detail::score_step& st = sp.steps[u];
  score_row_const rc;
  switch (st.op) {
    case kind::alibi:
      rc.a = static_cast<float>(st.alibi->slope(h));
      rc.rel = k0 - q + st.alibi->offset;
      break;
    case kind::softcap:
      rc.a = static_cast<float>(st.cap);
      // A multiply by 1 / cap: a divide measured no more accurate here (tanh's own error dominates) and costs more.
      rc.c = static_cast<float>(1.0 / st.cap);
      break;
    case kind::temperature:
    case kind::logn: rc.a = static_cast<float>(score_factor(sp, u, h, q)); break;
    case kind::key_table: {
      const detail::key_table& t = *st.table;
      rc.table = t.values_f->data() + t.row_begin(h) + std::min(k0, t.row);
      rc.avail = t.row - k0;  // <= 0 past the end of the row: every key reads 0 (key_bias's rule)
      break;
    }
    case kind::bias: {
      const detail::bias_score& bs = *st.bias;
      rc.stride = bs.strides[3];
      rc.table = bs.row(b, h, q) + k0 * rc.stride;
      rc.avail = bs.shape[3] == 1 ? INT64_MAX : bs.shape[3] - k0;
      break;
    }
    case kind::relative: {
      const std::int64_t at = k0 - q + sp.relative_origin;
      rc.table = sp.relative_row[u].data() + (h % st.relative->heads()) * sp.relative_span + at;
      rc.avail = sp.relative_span - at;
      break;
    }
    case kind::tile:
    case kind::element: break;
  }
  return rc;
}

// L consecutive table values from column `col` of a row: one unaligned load when they are contiguous and inside the
// table; otherwise gathered into an aligned stack buffer, with 0 past `avail` (the ragged last key tile reads no
// memory past the table; those keys are masked by the softmax anyway).
template <class D>
HWY_INLINE hn::Vec<D> score_table_vec(D d, const score_row_const& rc, std::int64_t col) {
  constexpr std::size_t max_lanes = hn::MaxLanes(D());
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  if (rc.stride == 0) return hn::Set(d, rc.table[0]);
  if (rc.stride == 1 && col + L <= rc.avail) return hn::LoadU(d, rc.table + col);
  HWY_ALIGN float buf[max_lanes];
  for (std::int64_t t = 0; t < L; ++t) buf[t] = col + t < rc.avail ? rc.table[(col + t) * rc.stride] : 0.0f;
  return hn::Load(d, buf);
}

template <class D>
HWY_INLINE hn::Vec<D> score_apply(D d, const detail::score_step& st, const score_row_const& rc, std::int64_t col,
                                  hn::Vec<D> x) {
  using kind = detail::score_step::kind;
  switch (st.op) {
    case kind::alibi: {
      // In double: col runs past the last key on a ragged tile, where an int64 rel + col could overflow for offsets
      // that validation accepts (k - q + offset fits for every real key).
      const auto rel = hn::Add(hn::Iota(d, 0.0f), hn::Set(d, static_cast<float>(static_cast<double>(rc.rel) + static_cast<double>(col))));
      return hn::MulAdd(hn::Set(d, rc.a), rel, x);
    }
    case kind::softcap: return hn::Mul(hn::Set(d, rc.a), tanh_fast(d, hn::Mul(x, hn::Set(d, rc.c))));
    case kind::temperature:
    case kind::logn: return hn::Mul(x, hn::Set(d, rc.a));
    case kind::key_table:
    case kind::bias:
    case kind::relative: return hn::Add(x, score_table_vec(d, rc, col));
    case kind::tile:
    case kind::element: break;
  }
  return x;
}

// row_width: keys per stored row (a multiple of the vector length); keys: how many of them are real.
HWY_INLINE void score_tile(const attn_params& p, const score_plan& sp, float* HWY_RESTRICT s, std::int64_t ld,
                           std::int64_t rows, std::int64_t row_width, std::int64_t keys, std::int64_t b, std::int64_t h,
                           std::int64_t q0, std::int64_t k0) {
  using kind = detail::score_step::kind;
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  constexpr float log2e = 1.4426950408889634f;
  const auto vlog2e = hn::Set(d, log2e);
  const std::size_t n = sp.steps.size();
  bool first = true;
  std::size_t u = 0;
  while (u < n) {
    const detail::score_step& st = sp.steps[u];
    if (st.op == kind::tile) {
      detail::call_user("spec.score functor", "inlined", [&] { st.tile->tile(s, ld, rows, keys, b, h, q0, k0, first ? static_cast<float>(p.scale) : 1.0f); });
      ++u;
    } else if (st.op == kind::element) {
      const double in_scale = first ? p.scale : 1.0, out_scale = u + 1 == n ? 1.4426950408889634 : 1.0;
      detail::call_user("spec.score functor", "score_fn", [&] {
        for (std::int64_t i = 0; i < rows; ++i) {
          float* srow = s + i * ld;
          for (std::int64_t j = 0; j < keys; ++j)
            srow[j] = static_cast<float>((*st.element)(static_cast<double>(srow[j]) * in_scale, b, h, q0 + i, k0 + j) * out_scale);
        }
      });
      ++u;
      if (u == n) return;  // the base-2 conversion is done
    } else {
      std::size_t end = u;
      while (end < n && end - u < k_max_score_run && sp.steps[end].vector()) ++end;
      const bool last = end == n;
      // Fewer float roundings than one per step: the softmax scale and the leading temperature / LogN factors are
      // multiplied in double and applied as one factor; on the last run the base-2 conversion joins that factor (all
      // steps multiplicative) or a final softcap's cap, and costs a separate multiply only after an additive step.
      std::size_t lead = u;
      while (lead < end && multiplicative(sp.steps[lead])) ++lead;
      const bool fold_log2e_in = last && lead == end;
      const bool fold_log2e_cap = last && !fold_log2e_in && sp.steps[end - 1].op == kind::softcap;
      const bool separate_log2e = last && !fold_log2e_in && !fold_log2e_cap;
      score_row_const rc[k_max_score_run];
      for (std::int64_t i = 0; i < rows; ++i) {
        const std::int64_t q = q0 + i;
        double in = first ? p.scale : 1.0;
        for (std::size_t w = u; w < lead; ++w) in *= score_factor(sp, w, h, q);
        if (fold_log2e_in) in *= 1.4426950408889634;
        for (std::size_t w = lead; w < end; ++w) rc[w - lead] = score_row(sp, w, b, h, q, k0);
        if (fold_log2e_cap) rc[end - 1 - lead].a = static_cast<float>(sp.steps[end - 1].cap * 1.4426950408889634);
        const auto vin = hn::Set(d, static_cast<float>(in));
        float* srow = s + i * ld;
        for (std::int64_t c = 0; c < row_width; c += L) {
          auto x = hn::Mul(hn::Load(d, srow + c), vin);
          for (std::size_t w = lead; w < end; ++w) x = score_apply(d, sp.steps[w], rc[w - lead], c, x);
          if (separate_log2e) x = hn::Mul(x, vlog2e);
          hn::Store(x, d, srow + c);
        }
      }
      u = end;
      if (last) return;
    }
    first = false;
  }
  // The last step was a tile function: one more pass to base 2 (a 64 x 64 tile in L1, negligible next to QK^T).
  for (std::int64_t i = 0; i < rows; ++i) {
    float* srow = s + i * ld;
    for (std::int64_t c = 0; c < row_width; c += L) hn::Store(hn::Mul(hn::Load(d, srow + c), vlog2e), d, srow + c);
  }
}

// The backward's score pass: the same logits as score_tile (base 2 in s) and, in g, the derivative of the natural
// logit w.r.t. the raw q.k (the softmax scale times every step's derivative, chain rule). One pass per step over the
// tile (it stays in L1): built-ins in closed form on vectors, user steps through their derivative per element.
// gb (optional, with bias_step the index of the chain's bias step): the derivative of the final logit w.r.t. the bias
// value, i.e. the product of the derivatives of the steps after it (the dense bias gradient).
HWY_INLINE void score_tile_grad(const attn_params& p, const score_plan& sp, float* HWY_RESTRICT s, float* HWY_RESTRICT g,
                                std::int64_t ld, std::int64_t rows, std::int64_t row_width, std::int64_t keys,
                                std::int64_t b, std::int64_t h, std::int64_t q0, std::int64_t k0,
                                float* HWY_RESTRICT gb = nullptr, std::size_t bias_step = 0) {
  using kind = detail::score_step::kind;
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const auto vscale = hn::Set(d, static_cast<float>(p.scale)), one = hn::Set(d, 1.0f);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t c = 0; c < row_width; c += L) {
      hn::Store(hn::Mul(hn::Load(d, s + i * ld + c), vscale), d, s + i * ld + c);
      hn::Store(vscale, d, g + i * ld + c);
      if (gb) hn::Store(one, d, gb + i * ld + c);
    }
  for (std::size_t u = 0; u < sp.steps.size(); ++u) {
    const detail::score_step& st = sp.steps[u];
    const bool after_bias = gb && u > bias_step;
    if (!st.vector()) {
      detail::call_user("spec.score functor", st.op == kind::tile ? "inlined" : "score_fn", [&] {
        for (std::int64_t i = 0; i < rows; ++i)
          for (std::int64_t j = 0; j < keys; ++j) {
            const auto dx = static_cast<float>((*st.derivative)(static_cast<double>(s[i * ld + j]), b, h, q0 + i, k0 + j));
            g[i * ld + j] *= dx;
            if (after_bias) gb[i * ld + j] *= dx;
          }
        if (st.op == kind::tile) {
          st.tile->tile(s, ld, rows, keys, b, h, q0, k0, 1.0f);
        } else {
          for (std::int64_t i = 0; i < rows; ++i)
            for (std::int64_t j = 0; j < keys; ++j)
              s[i * ld + j] = static_cast<float>((*st.element)(static_cast<double>(s[i * ld + j]), b, h, q0 + i, k0 + j));
        }
      });
      continue;
    }
    for (std::int64_t i = 0; i < rows; ++i) {
      const score_row_const rc = score_row(sp, u, b, h, q0 + i, k0);
      float* srow = s + i * ld;
      float* grow = g + i * ld;
      for (std::int64_t c = 0; c < row_width; c += L) {
        auto x = hn::Load(d, srow + c);
        auto dx = one;
        if (st.op == kind::softcap) {
          const auto t = tanh_fast(d, hn::Mul(x, hn::Set(d, rc.c)));
          x = hn::Mul(hn::Set(d, rc.a), t);
          dx = hn::NegMulAdd(t, t, one);
        } else if (multiplicative(st)) {
          x = hn::Mul(x, hn::Set(d, rc.a));
          dx = hn::Set(d, rc.a);
        } else {
          x = score_apply(d, st, rc, c, x);  // additive: derivative 1
        }
        hn::Store(x, d, srow + c);
        hn::Store(hn::Mul(hn::Load(d, grow + c), dx), d, grow + c);
        if (after_bias) hn::Store(hn::Mul(hn::Load(d, gb + i * ld + c), dx), d, gb + i * ld + c);
      }
    }
  }
  const auto vlog2e = hn::Set(d, 1.4426950408889634f);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t c = 0; c < row_width; c += L) hn::Store(hn::Mul(hn::Load(d, s + i * ld + c), vlog2e), d, s + i * ld + c);
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard toggle
