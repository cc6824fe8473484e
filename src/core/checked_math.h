// Overflow-safe integer helpers for validation and size computations: a user-supplied size, tile or offset can be
// anywhere in int64, so sums and products of them are computed with an overflow flag instead of wrapping (UB).
#pragma once

#include <cstdint>
#include <initializer_list>

namespace omniattn::detail {

// ceil(n / d) for n >= 0, d > 0, without forming n + d - 1 (which overflows for d near INT64_MAX).
constexpr std::int64_t ceil_div(std::int64_t n, std::int64_t d) { return n == 0 ? 0 : 1 + (n - 1) / d; }

// a * b and a + b; false (and *r unspecified) when the exact result does not fit in int64.
inline bool mul_fits(std::int64_t a, std::int64_t b, std::int64_t* r) { return !__builtin_mul_overflow(a, b, r); }
inline bool add_fits(std::int64_t a, std::int64_t b, std::int64_t* r) { return !__builtin_add_overflow(a, b, r); }

// The product of all factors (e.g. batch * heads * q_tiles * kv_tiles); false when it leaves int64.
inline bool product_fits(std::initializer_list<std::int64_t> factors, std::int64_t* r) {
  *r = 1;
  for (std::int64_t f : factors)
    if (!mul_fits(*r, f, r)) return false;
  return true;
}

}  // namespace omniattn::detail
