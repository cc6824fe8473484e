// The benchmark's own SIMD code, on the best ISA this CPU has (Highway dispatch): the ISA name and the vectorized
// softmax row of the unfused OpenBLAS baseline, the streaming read of the bandwidth probe.
#include <algorithm>
#include <cmath>
#include <limits>

#include "bench/bench.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/simd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::bench::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

const char* target_name() { return hwy::TargetName(HWY_TARGET); }

// row[0..allowed) = softmax(row[0..allowed)), row[allowed..n) = 0; -inf entries give 0 (Exp(-inf) is 0).
void softmax_row(float* HWY_RESTRICT row, std::int64_t allowed, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  float mx = -std::numeric_limits<float>::infinity();
  for (std::int64_t j = 0; j < allowed; ++j) mx = std::max(mx, row[j]);
  if (mx == -std::numeric_limits<float>::infinity()) allowed = 0;  // no allowed key: -inf - -inf would be NaN
  const auto vm = hn::Set(d, mx);
  auto vsum = hn::Zero(d);
  std::int64_t j = 0;
  for (; j + L <= allowed; j += L) {
    const auto e = hn::Exp(d, hn::Sub(hn::LoadU(d, row + j), vm));
    hn::StoreU(e, d, row + j);
    vsum = hn::Add(vsum, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(d, vsum));
  for (; j < allowed; ++j) {
    row[j] = std::exp(row[j] - mx);
    sum += row[j];
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  const auto vi = hn::Set(d, inv);
  for (j = 0; j + L <= allowed; j += L) hn::StoreU(hn::Mul(hn::LoadU(d, row + j), vi), d, row + j);
  for (; j < allowed; ++j) row[j] *= inv;
  for (j = allowed; j < n; ++j) row[j] = 0.0f;
}

// Sum of n floats (n a multiple of 4 vectors), four independent vector accumulators: a streaming read at the widest
// vector loads, for the bandwidth probe of `bench --decode`.
float read_sum(const float* HWY_RESTRICT x, std::size_t n) {
  const hn::ScalableTag<float> d;
  const std::size_t L = hn::Lanes(d);
  auto a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
  for (std::size_t i = 0; i + 4 * L <= n; i += 4 * L) {
    a0 = hn::Add(a0, hn::LoadU(d, x + i));
    a1 = hn::Add(a1, hn::LoadU(d, x + i + L));
    a2 = hn::Add(a2, hn::LoadU(d, x + i + 2 * L));
    a3 = hn::Add(a3, hn::LoadU(d, x + i + 3 * L));
  }
  return hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
}

}  // namespace omniattn::bench::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::bench {

HWY_EXPORT(target_name);
HWY_EXPORT(softmax_row);
HWY_EXPORT(read_sum);

float read_sum(const float* x, std::size_t n) { return HWY_DYNAMIC_DISPATCH(read_sum)(x, n); }

void softmax_row(float* row, std::int64_t allowed, std::int64_t n) { HWY_DYNAMIC_DISPATCH(softmax_row)(row, allowed, n); }

const char* isa_name() { return HWY_DYNAMIC_DISPATCH(target_name)(); }

}  // namespace omniattn::bench
#endif
