// Element load/store for the storage dtypes, shared by the oracle and the CPU backend's scalar paths.
#pragma once

#include <cstdint>

#include "omniattn/tensor.h"

namespace omniattn::detail {

inline double load_element(const void* base, dtype t, std::int64_t offset) {
  switch (t) {
    case dtype::f32: return static_cast<const float*>(base)[offset];
    case dtype::bf16: return bf16_to_f32(static_cast<const std::uint16_t*>(base)[offset]);
    case dtype::f16: return f16_to_f32(static_cast<const std::uint16_t*>(base)[offset]);
  }
  return 0.0;
}

inline void store_element(void* base, dtype t, std::int64_t offset, double x) {
  const float f = static_cast<float>(x);
  switch (t) {
    case dtype::f32: static_cast<float*>(base)[offset] = f; break;
    case dtype::bf16: static_cast<std::uint16_t*>(base)[offset] = f32_to_bf16(f); break;
    case dtype::f16: static_cast<std::uint16_t*>(base)[offset] = f32_to_f16(f); break;
  }
}

}  // namespace omniattn::detail
