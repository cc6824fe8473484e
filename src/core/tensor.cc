// Tensor view constructors and storage-type conversions.
#include <cstring>

#include "omniattn/spec.h"
#include "omniattn/tensor.h"

namespace omniattn {

const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::bf16: return "bf16";
    case dtype::f16: return "f16";
    case dtype::f64: return "f64";
  }
  return "?";
}

int dtype_size(dtype t) {
  switch (t) {
    case dtype::f32: return 4;
    case dtype::bf16:
    case dtype::f16: return 2;
    case dtype::f64: return 8;
  }
  return 0;
}

double dtype_epsilon(dtype t) {
  switch (t) {
    case dtype::f32: return 0x1p-23;
    case dtype::bf16: return 0x1p-8;
    case dtype::f16: return 0x1p-11;
    case dtype::f64: return 0x1p-52;
  }
  return 1.0;
}

const char* backend_name(backend b) {
  switch (b) {
    case backend::automatic: return "auto";
    case backend::reference: return "reference";
    case backend::cpu: return "cpu";
  }
  return "?";
}

tensor make_bshd(void* data, dtype type, std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t dim) {
  return {data, type, batch, seq, heads, dim, seq * heads * dim, heads * dim, dim, 1};
}

tensor make_bhsd(void* data, dtype type, std::int64_t batch, std::int64_t heads, std::int64_t seq, std::int64_t dim) {
  return {data, type, batch, seq, heads, dim, heads * seq * dim, dim, seq * dim, 1};
}

lse_tensor make_lse(float* data, std::int64_t heads, std::int64_t seq_q) { return {data, heads * seq_q, seq_q, 1}; }

static std::uint32_t bits_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

static float float_of(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

float bf16_to_f32(std::uint16_t bits) { return float_of(static_cast<std::uint32_t>(bits) << 16); }

std::uint16_t f32_to_bf16(float x) {
  const std::uint32_t u = bits_of(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // keep NaN a NaN
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}

float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return float_of(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return float_of(sign);
    // Subnormal half: value = mant * 2^-24, exactly representable in float.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
}

std::uint16_t f32_to_f16(float x) {
  const std::uint32_t u = bits_of(x);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero) in half: round |x| / 2^-24 to nearest even integer. Exact in float arithmetic
    // because the scaling is by a power of two and the float has enough mantissa.
    const float scaled = float_of(a) * 16777216.0f;
    std::uint32_t m = static_cast<std::uint32_t>(scaled);
    const float frac = scaled - static_cast<float>(m);
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++m;
    return static_cast<std::uint16_t>(sign | m);
  }
  // Normal: rebias exponent (127 -> 15) and round the 23-bit mantissa to 10 bits, ties to even; a carry into the
  // exponent is the correct result.
  const std::uint32_t rebased = a - (112u << 23);
  const std::uint32_t rounding = 0xfffu + ((rebased >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | ((rebased + rounding) >> 13));
}

}  // namespace omniattn
