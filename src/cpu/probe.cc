// Peak throughput probes: fp32 FMA (Highway, best ISA) and the AVX512-BF16 dot product, per thread count.
// Twelve independent accumulator chains per thread cover latency x throughput (4-5 cycles x 2 ports + margin).
// The benchmark reports % of these peaks; the CPU backend compares them to decide whether the bf16 dot product pays.
#include "cpu/probe.h"

#include <omp.h>

#include <algorithm>
#include <chrono>

#include "cpu/bf16_dot.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/probe.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
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

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::cpu {

HWY_EXPORT(fma_chains);

namespace {

// Best of a few short bursts: a shared or frequency-scaling machine rarely shows its peak in every burst.
template <class Fn>
double best_gflops(int threads, Fn&& chains) {
  const std::int64_t iters = 1'000'000;  // ~5 ms per burst
  double best = 0.0;
  for (int rep = 0; rep < 8; ++rep) {
    double flops = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    flops += chains(iters, 1e-3f * static_cast<float>(omp_get_thread_num() + 1));
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, flops / sec * 1e-9);
  }
  return best;
}

}  // namespace

double measure_fp32_peak(int threads) {
  return best_gflops(threads, [](std::int64_t n, float seed) { return HWY_DYNAMIC_DISPATCH(fma_chains)(n, seed); });
}

double measure_bf16_dot_peak(int threads) {
  if (!has_bf16_dot()) return 0.0;
  return best_gflops(threads, [](std::int64_t n, float seed) { return bf16_dot_chains(n, seed); });
}

}  // namespace omniattn::cpu
#endif
