// bf16 / f16 storage conversions against independent computations: field-wise decoding with ldexp, round to nearest
// even decided by exact distances in double, exhaustive over all 16-bit patterns, sampled (quick) or dense (full) over
// f32 bit patterns, and, where GCC provides it, the compiler's own _Float16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "omniattn/omniattn.h"
#include "test_common.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__FLT16_MANT_DIG__) && (defined(__x86_64__) || defined(__aarch64__))
#define OMNIATTN_TEST_HAVE_FLOAT16 1
#endif

namespace omniattn {
namespace {

float float_of(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
std::uint32_t bits_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// ------------------------------------------------------------------------------------------------------------------
// Independent references.

double ref_bf16_value(std::uint16_t h) {  // sign, 8-bit exponent (bias 127), 7-bit mantissa
  const int sign = h >> 15, exp = (h >> 7) & 0xff, mant = h & 0x7f;
  double v;
  if (exp == 0xff) v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exp == 0) v = std::ldexp(static_cast<double>(mant), -133);  // subnormal: mant * 2^(1 - 127 - 7)
  else v = std::ldexp(static_cast<double>(128 + mant), exp - 134);
  return sign ? -v : v;
}

double ref_f16_value(std::uint16_t h) {  // sign, 5-bit exponent (bias 15), 10-bit mantissa
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0x1f) v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exp == 0) v = std::ldexp(static_cast<double>(mant), -24);
  else v = std::ldexp(static_cast<double>(1024 + mant), exp - 25);
  return sign ? -v : v;
}

bool is_bf16_nan(std::uint16_t h) { return (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0; }
bool is_f16_nan(std::uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }

// Round |x| to the nearest of the non-negative finite values `mags` (sorted, index = bit pattern), ties to the even
// pattern; `overflow` is the first magnitude that rounds to infinity (half way between the largest finite value and
// the next power of two, which ties to the "even" infinity). Returns the magnitude bits or `inf_bits`.
std::uint16_t ref_round(float x, const std::vector<double>& mags, double overflow, std::uint16_t inf_bits, std::uint16_t sign_bit) {
  const double a = std::fabs(static_cast<double>(x));
  const std::uint16_t sign = std::signbit(x) ? sign_bit : 0;
  if (a >= overflow) return static_cast<std::uint16_t>(sign | inf_bits);
  const auto it = std::upper_bound(mags.begin(), mags.end(), a);  // first > a
  const std::size_t hi = static_cast<std::size_t>(it - mags.begin());
  const std::size_t lo = hi - 1;  // mags[0] == 0 <= a
  std::size_t pick = lo;
  if (hi < mags.size()) {
    const double dl = a - mags[lo], dh = mags[hi] - a;
    if (dh < dl || (dh == dl && (hi & 1) == 0)) pick = hi;
  } else if (a > mags[lo]) {
    // Between the largest finite value and the overflow threshold: below half way, rounds down.
    pick = lo;
  }
  return static_cast<std::uint16_t>(sign | pick);
}

const std::vector<double>& bf16_magnitudes() {
  static const std::vector<double> m = [] {
    std::vector<double> v;
    for (std::uint32_t h = 0; h <= 0x7f7f; ++h) v.push_back(ref_bf16_value(static_cast<std::uint16_t>(h)));
    return v;
  }();
  return m;
}

const std::vector<double>& f16_magnitudes() {
  static const std::vector<double> m = [] {
    std::vector<double> v;
    for (std::uint32_t h = 0; h <= 0x7bff; ++h) v.push_back(ref_f16_value(static_cast<std::uint16_t>(h)));
    return v;
  }();
  return m;
}

// max bf16 = (2 - 2^-7) 2^127; half way to 2^128: (2 - 2^-8) 2^127.
const double k_bf16_overflow = std::ldexp(2.0 - std::ldexp(1.0, -8), 127);
// max f16 = 65504; half way to 65536: 65520.
const double k_f16_overflow = 65520.0;

std::uint16_t ref_f32_to_bf16(float x) { return ref_round(x, bf16_magnitudes(), k_bf16_overflow, 0x7f80, 0x8000); }
std::uint16_t ref_f32_to_f16(float x) { return ref_round(x, f16_magnitudes(), k_f16_overflow, 0x7c00, 0x8000); }

// The f32 bit patterns a conversion test visits: a strided pass over all 2^32 (denser when full), plus, around random
// and boundary 16-bit values, the exact ties, one ulp either side of them and the values themselves.
std::vector<std::uint32_t> f32_samples(int shift /* 16 for bf16, 13 for f16 */, std::uint32_t lo_exp_bits, std::uint32_t hi_exp_bits) {
  std::vector<std::uint32_t> s;
  const std::uint64_t stride = test::full_intensity() ? 251 : 4093;
  for (std::uint64_t u = 0; u <= 0xffffffffull; u += stride) s.push_back(static_cast<std::uint32_t>(u));
  std::mt19937_64 rng(31);
  const std::uint32_t half = 1u << (shift - 1);
  const int n = test::full_intensity() ? 400000 : 40000;
  for (int i = 0; i < n; ++i) {
    const std::uint32_t sign = (rng() & 1) ? 0x80000000u : 0;
    const std::uint32_t body = lo_exp_bits + static_cast<std::uint32_t>(rng() % (hi_exp_bits - lo_exp_bits));
    const std::uint32_t base = body & ~((1u << shift) - 1);  // a value with only the kept bits
    for (std::uint32_t d : {0u, half - 1, half, half + 1, (1u << shift) - 1}) s.push_back(sign | (base + d));
  }
  for (std::uint32_t special : {0x00000000u, 0x80000000u, 0x00000001u, 0x007fffffu, 0x00800000u, 0x7f7fffffu, 0x7f800000u,
                                0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffc00001u, 0x3f800000u, 0x477fe000u, 0x477fefffu,
                                0x477ff000u, 0x477ff001u, 0x33000000u, 0x33000001u, 0x387fe000u, 0x387ff000u, 0x38800000u})
    s.push_back(special);
  return s;
}

// ------------------------------------------------------------------------------------------------------------------
// bf16.

TEST(Dtype, Bf16ToF32IsExactForEveryPattern) {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = bf16_to_f32(static_cast<std::uint16_t>(h));
    const double want = ref_bf16_value(static_cast<std::uint16_t>(h));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
    } else {
      ASSERT_EQ(static_cast<double>(f), want) << std::hex << h;
      ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;  // -0 stays -0
    }
  }
}

TEST(Dtype, Bf16RoundTripIsExactAndNanStaysNan) {
  int nans = 0;
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    const std::uint16_t back = f32_to_bf16(bf16_to_f32(b));
    if (is_bf16_nan(b)) {
      ASSERT_TRUE(is_bf16_nan(back)) << std::hex << h << " -> " << back;
      ASSERT_EQ(back & 0x8000, b & 0x8000) << std::hex << h;
      ++nans;
    } else {
      ASSERT_EQ(back, b) << std::hex << h;
    }
  }
  EXPECT_EQ(nans, 2 * 127);
}

TEST(Dtype, F32ToBf16RoundsToNearestEven) {
  // Hand-picked cases.
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(float_of(0x3f808000u)), 0x3f80);  // 1 + 2^-8: tie between 0x3f80 (even) and 0x3f81
  EXPECT_EQ(f32_to_bf16(float_of(0x3f818000u)), 0x3f82);  // 1 + 3 * 2^-8: tie between 0x3f81 and 0x3f82 (even)
  EXPECT_EQ(f32_to_bf16(float_of(0x3f808001u)), 0x3f81);  // just above the tie
  EXPECT_EQ(f32_to_bf16(float_of(0x3f807fffu)), 0x3f80);  // just below
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // overflows to inf under RNE
  EXPECT_EQ(f32_to_bf16(float_of(0x7f7f7fffu)), 0x7f7f);              // below half way: largest finite
  EXPECT_EQ(f32_to_bf16(float_of(0x00010000u)), 0x0001);              // f32 subnormal that is a bf16 subnormal
  EXPECT_TRUE(is_bf16_nan(f32_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(is_bf16_nan(f32_to_bf16(float_of(0x7f800001u))));  // signalling NaN, payload only in the low bits
  EXPECT_TRUE(is_bf16_nan(f32_to_bf16(float_of(0xff800001u))));
  // Sweep against the distance-based reference.
  std::int64_t checked = 0;
  for (std::uint32_t u : f32_samples(16, 0x00000000u, 0x7f800000u)) {
    const float x = float_of(u);
    const std::uint16_t got = f32_to_bf16(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(is_bf16_nan(got)) << std::hex << u;
      continue;
    }
    ASSERT_EQ(got, ref_f32_to_bf16(x)) << std::hex << "f32 bits " << u << " (" << x << ")";
    ++checked;
  }
  EXPECT_GT(checked, 1000000);
}

// ------------------------------------------------------------------------------------------------------------------
// f16.

TEST(Dtype, F16ToF32IsExactForEveryPattern) {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = f16_to_f32(static_cast<std::uint16_t>(h));
    const double want = ref_f16_value(static_cast<std::uint16_t>(h));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
    } else {
      ASSERT_EQ(static_cast<double>(f), want) << std::hex << h;
      ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;
    }
  }
  // Subnormals by hand: smallest 2^-24, largest 1023 * 2^-24, smallest normal 2^-14.
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(f16_to_f32(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
}

TEST(Dtype, F16RoundTripIsExactForAllPatterns) {
  int nans = 0;
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    const std::uint16_t back = f32_to_f16(f16_to_f32(b));
    if (is_f16_nan(b)) {
      ASSERT_TRUE(is_f16_nan(back)) << std::hex << h << " -> " << back;
      ASSERT_EQ(back & 0x8000, b & 0x8000) << std::hex << h;
      ++nans;
    } else {
      ASSERT_EQ(back, b) << std::hex << h;
    }
  }
  EXPECT_EQ(nans, 2 * 1023);
}

TEST(Dtype, F32ToF16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)), 0x7bff);  // just below half way to 65536
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);                         // the tie goes to the even pattern: inf
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e30f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie: 1 (even) vs 1 + 2^-10
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie: 0x3c01 vs 0x3c02 (even)
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);             // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);             // tie: 0 (even) vs 2^-24
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 0x0001);             // above the tie
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);             // tie: 1 vs 2 (even)
  EXPECT_EQ(f32_to_f16(std::ldexp(1023.5f, -24)), 0x0400);          // tie at the subnormal/normal boundary: 1024
  EXPECT_EQ(f32_to_f16(std::ldexp(1022.5f, -24)), 0x03fe);
  EXPECT_EQ(f32_to_f16(-std::ldexp(5.0f, -24)), 0x8005);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::denorm_min()), 0x8000);
  EXPECT_TRUE(is_f16_nan(f32_to_f16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(is_f16_nan(f32_to_f16(float_of(0x7f800001u))));  // payload that would vanish in a plain shift
  EXPECT_TRUE(is_f16_nan(f32_to_f16(float_of(0xff800001u))));
  std::int64_t checked = 0;
  for (std::uint32_t u : f32_samples(13, 0x33000000u /* 2^-25 */, 0x47800000u /* 65536 */)) {
    const float x = float_of(u);
    const std::uint16_t got = f32_to_f16(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(is_f16_nan(got)) << std::hex << u;
      continue;
    }
    ASSERT_EQ(got, ref_f32_to_f16(x)) << std::hex << "f32 bits " << u << " (" << x << ")";
    ++checked;
  }
  EXPECT_GT(checked, 1000000);
}

TEST(Dtype, F32ToF16SubnormalRangeExhaustive) {
  // Every f32 between 2^-26 and the smallest normal f16 (2^-14) whose low bits are not all dropped: the subnormal
  // path is a separate branch of f32_to_f16, checked here on every 16th pattern (every pattern when full).
  const std::uint32_t step = test::full_intensity() ? 1 : 16;
  for (std::uint32_t u = 0x32800000u; u <= 0x38800000u; u += step) {
    const float x = float_of(u);
    ASSERT_EQ(f32_to_f16(x), ref_f32_to_f16(x)) << std::hex << u;
    ASSERT_EQ(f32_to_f16(-x), ref_f32_to_f16(-x)) << std::hex << u;
  }
}

#ifdef OMNIATTN_TEST_HAVE_FLOAT16
TEST(Dtype, F16MatchesCompilerFloat16) {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    _Float16 c;
    const auto b = static_cast<std::uint16_t>(h);
    std::memcpy(&c, &b, 2);
    const float want = static_cast<float>(c);
    const float got = f16_to_f32(b);
    if (std::isnan(want)) ASSERT_TRUE(std::isnan(got)) << std::hex << h;
    else ASSERT_EQ(bits_of(got), bits_of(want)) << std::hex << h;
  }
  for (std::uint32_t u : f32_samples(13, 0x33000000u, 0x47800000u)) {
    const float x = float_of(u);
    const _Float16 c = static_cast<_Float16>(x);
    std::uint16_t want;
    std::memcpy(&want, &c, 2);
    const std::uint16_t got = f32_to_f16(x);
    if (std::isnan(x)) ASSERT_TRUE(is_f16_nan(got) && is_f16_nan(want)) << std::hex << u;
    else ASSERT_EQ(got, want) << std::hex << "f32 bits " << u;
  }
}
#endif

}  // namespace
}  // namespace omniattn
