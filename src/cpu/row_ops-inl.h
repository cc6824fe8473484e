// Row operations on float vectors (Highway -inl.h: included once per target by each kernel family), for the kernels
// whose inner loops are rows of a state or of one token (the linear-attention family): y += a x, y *= a, a . b.
#if defined(OMNIATTN_CPU_ROW_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef OMNIATTN_CPU_ROW_OPS_INL_H_
#undef OMNIATTN_CPU_ROW_OPS_INL_H_
#else
#define OMNIATTN_CPU_ROW_OPS_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "omniattn/linear.h"

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// y += a x over n floats.
HWY_INLINE void axpy(float a, const float* HWY_RESTRICT x, float* HWY_RESTRICT y, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const auto va = hn::Set(d, a);
  std::int64_t i = 0;
  for (; i + L <= n; i += L) hn::StoreU(hn::MulAdd(va, hn::LoadU(d, x + i), hn::LoadU(d, y + i)), d, y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

// y *= a over n floats.
HWY_INLINE void scale_row(float a, float* HWY_RESTRICT y, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const auto va = hn::Set(d, a);
  std::int64_t i = 0;
  for (; i + L <= n; i += L) hn::StoreU(hn::Mul(va, hn::LoadU(d, y + i)), d, y + i);
  for (; i < n; ++i) y[i] *= a;
}

// sum a[i] b[i] over n floats.
HWY_INLINE float dot(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  auto acc = hn::Zero(d);
  std::int64_t i = 0;
  for (; i + L <= n; i += L) acc = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), acc);
  float sum = hn::GetLane(hn::SumOfLanes(d, acc));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// exp on whole vectors with std::exp's edges: Highway's Exp holds for x in [-104, 88.7] only (beyond, garbage), so
// above that range the result is inf, below it 0, and a NaN stays NaN (the map must not hide one).
template <class D, class V>
HWY_INLINE V exp_edges(D d, V x) {
  const auto hi = hn::Set(d, 88.72f), lo = hn::Set(d, -103.9f);
  auto e = hn::Exp(d, hn::Min(hn::Max(x, lo), hi));
  e = hn::IfThenElse(hn::Gt(x, hi), hn::Set(d, std::numeric_limits<float>::infinity()), e);
  e = hn::IfThenElse(hn::Lt(x, lo), hn::Zero(d), e);
  return hn::IfThenElse(hn::IsNaN(x), x, e);
}

// phi over one token's n features in place, on whole vectors (the scalar detail::apply_feature_map is the contract and
// the oracle's; this is the same map with Highway's exp, within a few units of float of it). The kernels' map on load.
HWY_INLINE void map_features(feature_map phi, float* HWY_RESTRICT x, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const auto zero = hn::Zero(d), one = hn::Set(d, 1.0f);
  const auto each = [&](auto&& f, auto&& tail) {
    std::int64_t i = 0;
    for (; i + L <= n; i += L) hn::StoreU(f(hn::LoadU(d, x + i)), d, x + i);
    for (; i < n; ++i) x[i] = tail(x[i]);
  };
  switch (phi) {
    case feature_map::identity: return;
    case feature_map::relu:
      each([&](auto v) { return hn::Max(v, zero); }, [](float v) { return std::max(v, 0.0f); });
      return;
    case feature_map::elu_plus_one:
      each([&](auto v) { return hn::IfThenElse(hn::Gt(v, zero), hn::Add(v, one), exp_edges(d, v)); },
           [](float v) { return v > 0.0f ? v + 1.0f : std::exp(v); });
      return;
    case feature_map::exp:
      each([&](auto v) { return exp_edges(d, v); }, [](float v) { return std::exp(v); });
      return;
    case feature_map::sigmoid:
      each([&](auto v) { return hn::Div(one, hn::Add(one, exp_edges(d, hn::Neg(v)))); }, [](float v) { return 1.0f / (1.0f + std::exp(-v)); });
      return;
    case feature_map::performer: {
      const float norm = 1.0f / std::sqrt(static_cast<float>(n));
      const auto vn = hn::Set(d, norm);
      each([&](auto v) { return hn::Mul(exp_edges(d, v), vn); }, [&](float v) { return std::exp(v) * norm; });
      return;
    }
    case feature_map::softmax: {  // the max subtracted first so exp cannot overflow
      float m = x[0];
      for (std::int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
      const auto vm = hn::Set(d, m);
      each([&](auto v) { return exp_edges(d, hn::Sub(v, vm)); }, [&](float v) { return std::exp(v - m); });
      float sum = 0.0f;
      for (std::int64_t i = 0; i < n; ++i) sum += x[i];
      scale_row(1.0f / sum, x, n);
      return;
    }
  }
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard
