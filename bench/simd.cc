// The benchmark's own SIMD code, on the best ISA this CPU has (Highway dispatch): the machine peak probe (fp32 FMA
// throughput; twelve independent chains per thread cover FMA latency x throughput, 4 cycles x 2 ports + margin) and
// the vectorized softmax row of the unfused OpenBLAS baseline.
#include <omp.h>

#include <algorithm>
#include <chrono>
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

// Returns FLOPs done; `seed` keeps the compiler from folding the chains.
double fma_chains(std::int64_t iters, float seed) {
  const hn::ScalableTag<float> d;
  constexpr int k_chains = 12;
  hn::Vec<decltype(d)> acc[k_chains];
  HWY_UNROLL(12)
  for (int c = 0; c < k_chains; ++c) acc[c] = hn::Set(d, seed * static_cast<float>(c));
  const auto mul = hn::Set(d, 0.999999f), add = hn::Set(d, 1e-6f);
  for (std::int64_t i = 0; i < iters; ++i) {
    HWY_UNROLL(12)
    for (int c = 0; c < k_chains; ++c) acc[c] = hn::MulAdd(acc[c], mul, add);
  }
  auto sum = acc[0];
  for (int c = 1; c < k_chains; ++c) sum = hn::Add(sum, acc[c]);
  volatile float sink = hn::GetLane(sum);
  (void)sink;
  return 2.0 * k_chains * static_cast<double>(hn::Lanes(d)) * static_cast<double>(iters);
}

const char* target_name() { return hwy::TargetName(HWY_TARGET); }

// row[0..allowed) = softmax(row[0..allowed)), row[allowed..n) = 0.
void softmax_row(float* HWY_RESTRICT row, std::int64_t allowed, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  float mx = -std::numeric_limits<float>::infinity();
  for (std::int64_t j = 0; j < allowed; ++j) mx = std::max(mx, row[j]);
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

}  // namespace omniattn::bench::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::bench {

HWY_EXPORT(fma_chains);
HWY_EXPORT(target_name);
HWY_EXPORT(softmax_row);

void softmax_row(float* row, std::int64_t allowed, std::int64_t n) { HWY_DYNAMIC_DISPATCH(softmax_row)(row, allowed, n); }

const char* isa_name() { return HWY_DYNAMIC_DISPATCH(target_name)(); }

double measure_peak_gflops(int threads) {
  // Best of a few short bursts: a shared or frequency-scaling machine rarely shows its peak in every burst.
  const std::int64_t iters = 20'000'000;
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    double flops = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    flops += HWY_DYNAMIC_DISPATCH(fma_chains)(iters, 1e-3f * static_cast<float>(omp_get_thread_num() + 1));
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, flops / sec * 1e-9);
  }
  return best;
}

}  // namespace omniattn::bench
#endif
