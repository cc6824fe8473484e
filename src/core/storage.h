// Element load/store for the storage dtypes, shared by the oracle and the CPU backend's scalar paths.
// 2-byte elements may sit at any address (an odd one too: numpy views into byte buffers, packed records), so they are
// read and written with memcpy, never through a misaligned uint16_t pointer. f32 data is 4-byte aligned, f64 data 8-byte
// aligned (validated); f64 is stored from the double unrounded (the reference backend's only storage-exact dtype).
#pragma once

#include <cstdint>
#include <cstring>

#include "omniattn/tensor.h"

namespace omniattn::detail {

inline std::uint16_t load_bits16(const void* base, std::int64_t offset) {
  std::uint16_t x;
  std::memcpy(&x, static_cast<const unsigned char*>(base) + offset * 2, 2);
  return x;
}

inline void store_bits16(void* base, std::int64_t offset, std::uint16_t x) {
  std::memcpy(static_cast<unsigned char*>(base) + offset * 2, &x, 2);
}

inline double load_element(const void* base, dtype t, std::int64_t offset) {
  switch (t) {
    case dtype::f32: return static_cast<const float*>(base)[offset];
    case dtype::bf16: return bf16_to_f32(load_bits16(base, offset));
    case dtype::f16: return f16_to_f32(load_bits16(base, offset));
    case dtype::f64: return static_cast<const double*>(base)[offset];
  }
  return 0.0;
}

inline void store_element(void* base, dtype t, std::int64_t offset, double x) {
  const float f = static_cast<float>(x);
  switch (t) {
    case dtype::f32: static_cast<float*>(base)[offset] = f; break;
    case dtype::bf16: store_bits16(base, offset, f32_to_bf16(f)); break;
    case dtype::f16: store_bits16(base, offset, f32_to_f16(f)); break;
    case dtype::f64: static_cast<double*>(base)[offset] = x; break;
  }
}

}  // namespace omniattn::detail
