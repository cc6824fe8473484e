// What the linear-attention kernels (linear_fwd.cc, linear_bwd.cc) share per ISA (Highway -inl.h): padded tile
// buffers, exp over doubles, and the range of the chunk factorisation exp(B_i - B_j) = E_i / E_j.
#if defined(OMNIATTN_CPU_LINEAR_TILES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef OMNIATTN_CPU_LINEAR_TILES_INL_H_
#undef OMNIATTN_CPU_LINEAR_TILES_INL_H_
#else
#define OMNIATTN_CPU_LINEAR_TILES_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>

#include "core/linear_params.h"
#include "hwy/aligned_allocator.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using detail::k_linear_max_span;

HWY_INLINE std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// n zeroed floats, aligned for the micro-kernels' aligned loads and stores.
inline hwy::AlignedFreeUniquePtr<float[]> aligned_zeros(std::int64_t n) {
  const auto count = static_cast<std::size_t>(std::max<std::int64_t>(n, 1));
  auto p = hwy::AllocateAligned<float>(count);
  if (!p) throw std::bad_alloc();
  std::fill(p.get(), p.get() + count, 0.0f);
  return p;
}

// y[i] = exp(x[i]) over n doubles.
HWY_INLINE void exp_doubles(const double* HWY_RESTRICT x, double* HWY_RESTRICT y, std::int64_t n) {
  const hn::ScalableTag<double> dd;
  const auto L = static_cast<std::int64_t>(hn::Lanes(dd));
  std::int64_t i = 0;
  for (; i + L <= n; i += L) hn::StoreU(hn::Exp(dd, hn::LoadU(dd, x + i)), dd, y + i);
  for (; i < n; ++i) y[i] = std::exp(x[i]);
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard toggle
