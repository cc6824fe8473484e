// dtype::f64: a storage dtype the fp64 reference backend serves (forward and backward) and the CPU kernels refuse with
// a reason, so backend::automatic falls back to the oracle. f64 loads and stores are exact: an f64 call on values that
// f32 holds exactly computes the same doubles as the f32 call and stores them unrounded.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "omniattn/omniattn.h"

namespace omniattn::test {
namespace {

constexpr std::int64_t B = 2, LQ = 5, LK = 7, HQ = 4, HKV = 2, D = 8, DV = 6;
const char* const k_reason = "f64 inputs run on the reference backend only";

bool has_reason(const std::vector<std::string>& reasons, const std::string& what) {
  for (const std::string& r : reasons)
    if (r.find(what) != std::string::npos) return true;
  return false;
}

// The CPU backend's selection refuses f64 with the reason; automatic falls back to the oracle and says why.
template <class Selection>
void expect_reference_only(const Selection& cpu, const Selection& automatic) {
  EXPECT_FALSE(cpu.ok());
  EXPECT_TRUE(has_reason(cpu.reasons, k_reason));
  EXPECT_EQ(automatic.name, "reference");
  EXPECT_TRUE(has_reason(automatic.reasons, k_reason));
  EXPECT_TRUE(has_reason(automatic.reasons, "chosen as fallback"));
}

// One problem stored twice: as f64 and as f32 (the same values, all exactly representable in f32).
struct twin {
  std::vector<double> q64, k64, v64, o64, do64, dq64, dk64, dv64;
  std::vector<float> q32, k32, v32, o32, do32, dq32, dk32, dv32, lse64, lse32;
  std::vector<float> sinks{0.25f, -0.5f, 1.0f, 0.0f};
  spec s;
  rope_spec rope;

  twin() {
    std::mt19937_64 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const auto fill = [&](std::vector<float>& f, std::vector<double>& d, std::int64_t n) {
      f.resize(static_cast<std::size_t>(n));
      for (float& x : f) x = u(rng);
      d.assign(f.begin(), f.end());
    };
    fill(q32, q64, B * LQ * HQ * D);
    fill(k32, k64, B * LK * HKV * D);
    fill(v32, v64, B * LK * HKV * DV);
    fill(do32, do64, B * LQ * HQ * DV);
    o32.assign(do32.size(), 0.0f);
    o64.assign(do32.size(), 0.0);
    dq32.assign(q32.size(), 0.0f), dq64.assign(q32.size(), 0.0);
    dk32.assign(k32.size(), 0.0f), dk64.assign(k32.size(), 0.0);
    dv32.assign(v32.size(), 0.0f), dv64.assign(v32.size(), 0.0);
    lse32.assign(static_cast<std::size_t>(B * HQ * LQ), 0.0f);
    lse64 = lse32;
    s.causal = causal_mode::bottom_right;
    s.score = scores::softcap(2.0);
    s.sink_logits = sinks.data();
    s.rope = &rope;
  }
  tensor t(std::vector<double>& x, std::int64_t l, std::int64_t h, std::int64_t d) { return make_bshd(x.data(), dtype::f64, B, l, h, d); }
  tensor t(std::vector<float>& x, std::int64_t l, std::int64_t h, std::int64_t d) { return make_bshd(x.data(), dtype::f32, B, l, h, d); }
};

TEST(F64, DtypeTraits) {
  EXPECT_STREQ(dtype_name(dtype::f64), "f64");
  EXPECT_EQ(dtype_size(dtype::f64), 8);
  EXPECT_EQ(dtype_epsilon(dtype::f64), std::ldexp(1.0, -52));
}

TEST(F64, ForwardRunsOnTheReferenceAndStoresUnrounded) {
  twin w;
  options o;  // backend::automatic
  lse_tensor l64 = make_lse(w.lse64.data(), HQ, LQ), l32 = make_lse(w.lse32.data(), HQ, LQ);
  o.lse = &l64;
  ASSERT_TRUE(attention(w.t(w.q64, LQ, HQ, D), w.t(w.k64, LK, HKV, D), w.t(w.v64, LK, HKV, DV), w.t(w.o64, LQ, HQ, DV), w.s, o).ok());
  options r;
  r.use = backend::reference;
  r.lse = &l32;
  ASSERT_TRUE(attention(w.t(w.q32, LQ, HQ, D), w.t(w.k32, LK, HKV, D), w.t(w.v32, LK, HKV, DV), w.t(w.o32, LQ, HQ, DV), w.s, r).ok());
  std::size_t unrounded = 0;
  for (std::size_t n = 0; n < w.o64.size(); ++n) {
    EXPECT_EQ(static_cast<float>(w.o64[n]), w.o32[n]) << n;  // the same doubles, rounded only by the f32 store
    unrounded += static_cast<double>(static_cast<float>(w.o64[n])) != w.o64[n];
  }
  EXPECT_GT(unrounded, w.o64.size() / 2);  // f64 keeps the bits f32 drops
  for (std::size_t n = 0; n < w.lse64.size(); ++n) EXPECT_EQ(w.lse64[n], w.lse32[n]) << n;

  // An f64 input bit below f32's precision reaches the output: nothing is rounded to f32 on the way in.
  std::vector<double> before = w.o64;
  w.q64[0] += std::ldexp(1.0, -40);
  ASSERT_TRUE(attention(w.t(w.q64, LQ, HQ, D), w.t(w.k64, LK, HKV, D), w.t(w.v64, LK, HKV, DV), w.t(w.o64, LQ, HQ, DV), w.s, o).ok());
  EXPECT_NE(before, w.o64);
}

TEST(F64, CpuKernelsRejectItWithTheReason) {
  twin w;
  const tensor q = w.t(w.q64, LQ, HQ, D), k = w.t(w.k64, LK, HKV, D), v = w.t(w.v64, LK, HKV, DV), out = w.t(w.o64, LQ, HQ, DV);
  attn_params p;
  ASSERT_TRUE(make_params(q, k, v, out, w.s, {}, p).ok());
  expect_reference_only(select(p, backend::cpu), select(p, backend::automatic));
  options c;
  c.use = backend::cpu;
  const status st = attention(q, k, v, out, w.s, c);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.error.find("[attention] no cpu kernel fits"), std::string::npos) << st.error;
  EXPECT_NE(st.error.find(k_reason), std::string::npos) << st.error;
  options strict;
  strict.allow_fallback = false;
  EXPECT_NE(attention(q, k, v, out, w.s, strict).error.find(k_reason), std::string::npos);
  // f64 into an f32 output is still f64 work.
  attn_params p32;
  ASSERT_TRUE(make_params(q, k, v, w.t(w.o32, LQ, HQ, DV), w.s, {}, p32).ok());
  EXPECT_TRUE(has_reason(select(p32, backend::cpu).reasons, k_reason));
}

TEST(F64, BackwardRunsOnTheReferenceAndMatchesTheF32Call) {
  twin w;
  lse_tensor l64 = make_lse(w.lse64.data(), HQ, LQ), l32 = make_lse(w.lse32.data(), HQ, LQ);
  options fo;
  fo.lse = &l64;
  const tensor q = w.t(w.q64, LQ, HQ, D), k = w.t(w.k64, LK, HKV, D), v = w.t(w.v64, LK, HKV, DV), out = w.t(w.o64, LQ, HQ, DV);
  ASSERT_TRUE(attention(q, k, v, out, w.s, fo).ok());
  std::vector<float> ds64(HQ), ds32(HQ);
  gradients g64{w.t(w.dq64, LQ, HQ, D), w.t(w.dk64, LK, HKV, D), w.t(w.dv64, LK, HKV, DV), ds64.data(), nullptr};
  const tensor d_out = w.t(w.do64, LQ, HQ, DV);

  attn_bwd_params bp;
  ASSERT_TRUE(make_backward_params(q, k, v, out, l64, d_out, g64, w.s, {}, bp).ok());
  expect_reference_only(select_backward(bp, backend::cpu), select_backward(bp, backend::automatic));
  options c;
  c.use = backend::cpu;
  const status st = attention_backward(q, k, v, out, l64, d_out, g64, w.s, c);
  EXPECT_NE(st.error.find("[attention_backward] no cpu kernel fits"), std::string::npos) << st.error;
  EXPECT_NE(st.error.find(k_reason), std::string::npos) << st.error;

  ASSERT_TRUE(attention_backward(q, k, v, out, l64, d_out, g64, w.s, {}).ok());
  // The same problem in f32 storage on the oracle: the same doubles, rounded by the f32 stores only.
  options r;
  r.use = backend::reference;
  r.lse = &l32;
  const tensor q32 = w.t(w.q32, LQ, HQ, D), k32 = w.t(w.k32, LK, HKV, D), v32 = w.t(w.v32, LK, HKV, DV), o32 = w.t(w.o32, LQ, HQ, DV);
  ASSERT_TRUE(attention(q32, k32, v32, o32, w.s, r).ok());
  gradients g32{w.t(w.dq32, LQ, HQ, D), w.t(w.dk32, LK, HKV, D), w.t(w.dv32, LK, HKV, DV), ds32.data(), nullptr};
  ASSERT_TRUE(attention_backward(q32, k32, v32, o32, l32, w.t(w.do32, LQ, HQ, DV), g32, w.s, r).ok());
  const auto same = [](const std::vector<double>& a, const std::vector<float>& b, const char* what) {
    ASSERT_EQ(a.size(), b.size());
    double largest = 0.0;
    for (std::size_t n = 0; n < a.size(); ++n) {
      EXPECT_EQ(static_cast<float>(a[n]), b[n]) << what << " " << n;
      largest = std::max(largest, std::fabs(a[n]));
    }
    EXPECT_GT(largest, 1e-3) << what;  // a real gradient, not zeros
  };
  same(w.dq64, w.dq32, "dq");
  same(w.dk64, w.dk32, "dk");
  same(w.dv64, w.dv32, "dv");
  for (std::int64_t h = 0; h < HQ; ++h) EXPECT_EQ(ds64[static_cast<std::size_t>(h)], ds32[static_cast<std::size_t>(h)]);
}

TEST(F64, Validation) {
  twin w;
  const tensor q = w.t(w.q64, LQ, HQ, D), k = w.t(w.k64, LK, HKV, D), v = w.t(w.v64, LK, HKV, DV), out = w.t(w.o64, LQ, HQ, DV);
  attn_params p;
  tensor misaligned = q;
  misaligned.data = reinterpret_cast<char*>(w.q64.data()) + 4;  // 4-byte aligned, not 8
  misaligned.seq = LQ - 1;  // stays inside the buffer
  tensor o_short = out;
  o_short.seq = LQ - 1;
  EXPECT_NE(make_params(misaligned, k, v, o_short, {}, {}, p).error.find("q.data"), std::string::npos);
  EXPECT_NE(make_params(misaligned, k, v, o_short, {}, {}, p).error.find("is not aligned to its 8-byte f64 elements"),
            std::string::npos);
  EXPECT_EQ(make_params(q, w.t(w.k32, LK, HKV, D), v, out, {}, {}, p).error, "[attention] k.type f32 != q.type f64");
  // out: q's dtype or f32; an f64 output of f32 inputs is neither.
  EXPECT_EQ(make_params(w.t(w.q32, LQ, HQ, D), w.t(w.k32, LK, HKV, D), w.t(w.v32, LK, HKV, DV), out, {}, {}, p).error,
            "[attention] out.type f64 must be q.type f32 or f32");
  EXPECT_TRUE(make_params(q, k, v, w.t(w.o32, LQ, HQ, DV), {}, {}, p).ok());
}

}  // namespace
}  // namespace omniattn::test
