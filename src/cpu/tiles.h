// Tile geometry and row loading shared by the CPU kernel families (forward, backward); no per-ISA code.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "core/storage.h"
#include "omniattn/tensor.h"

namespace omniattn::cpu {
// Tile sizes are the same on every ISA so the block structure (and the rounding order) does not depend on the target.
constexpr std::int64_t k_bq = 64;  // query rows per tile
constexpr std::int64_t k_bk = 64;  // keys per tile
// Register-block rows the grid plan's cost model assumes on every ISA (AVX-512's; 16-register ISAs use 4): the plan,
// and with it the summation order, then does not depend on the CPU.
constexpr std::int64_t k_plan_row_block = 6;

// The Highway target dynamic dispatch runs on this CPU ("ISA AVX3"), for select()'s reasons.
std::string dispatch_isa();

// Converts one strided row of a storage dtype into contiguous floats.
inline void load_row(const void* base, dtype t, std::int64_t offset, std::int64_t stride, std::int64_t n, float* dst) {
  if (t == dtype::f32 && stride == 1) {
    std::memcpy(dst, static_cast<const float*>(base) + offset, static_cast<std::size_t>(n) * 4);
    return;
  }
  for (std::int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(detail::load_element(base, t, offset + d * stride));
}

// Writes n contiguous floats into one strided row of a storage dtype (load_row's inverse).
inline void store_row(void* base, dtype t, std::int64_t offset, std::int64_t stride, std::int64_t n, const float* src) {
  if (t == dtype::f32 && (stride == 1 || n == 1)) {
    std::memcpy(static_cast<float*>(base) + offset, src, static_cast<std::size_t>(n) * 4);
    return;
  }
  for (std::int64_t d = 0; d < n; ++d) detail::store_element(base, t, offset + d * stride, static_cast<double>(src[d]));
}
}  // namespace omniattn::cpu
