// The fp64 oracle (backend::reference) against hand-computed values, closed forms, an independent double-precision
// evaluation written in this file, and metamorphic identities (GQA, varlen, layouts, masks, block masks).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "core/problem.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

using test::oracle_near;
constexpr double k_ninf = -std::numeric_limits<double>::infinity();

// Dense f32 BSHD operands with explicit shapes.
struct dense {
  std::int64_t B = 1, Lq = 1, Lk = 1, Hq = 1, Hkv = 1, D = 1, Dv = 1;
  std::vector<float> q, k, v;

  dense(std::int64_t b, std::int64_t lq, std::int64_t lk, std::int64_t hq, std::int64_t hkv, std::int64_t d,
        std::int64_t dv)
      : B(b), Lq(lq), Lk(lk), Hq(hq), Hkv(hkv), D(d), Dv(dv),
        q(static_cast<std::size_t>(b * lq * hq * d)), k(static_cast<std::size_t>(b * lk * hkv * d)),
        v(static_cast<std::size_t>(b * lk * hkv * dv)) {}

  void randomize(std::uint64_t seed, float range = 1.0f) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(-range, range);
    for (float& x : q) x = u(rng);
    for (float& x : k) x = u(rng);
    for (float& x : v) x = u(rng);
  }
  float& Q(std::int64_t b, std::int64_t i, std::int64_t h, std::int64_t d) { return q[((b * Lq + i) * Hq + h) * D + d]; }
  float& K(std::int64_t b, std::int64_t j, std::int64_t h, std::int64_t d) { return k[((b * Lk + j) * Hkv + h) * D + d]; }
  float& V(std::int64_t b, std::int64_t j, std::int64_t h, std::int64_t d) { return v[((b * Lk + j) * Hkv + h) * Dv + d]; }
  float Q(std::int64_t b, std::int64_t i, std::int64_t h, std::int64_t d) const { return q[((b * Lq + i) * Hq + h) * D + d]; }
  float K(std::int64_t b, std::int64_t j, std::int64_t h, std::int64_t d) const { return k[((b * Lk + j) * Hkv + h) * D + d]; }
  float V(std::int64_t b, std::int64_t j, std::int64_t h, std::int64_t d) const { return v[((b * Lk + j) * Hkv + h) * Dv + d]; }
  tensor qt() const { return make_bshd(const_cast<float*>(q.data()), dtype::f32, B, Lq, Hq, D); }
  tensor kt() const { return make_bshd(const_cast<float*>(k.data()), dtype::f32, B, Lk, Hkv, D); }
  tensor vt() const { return make_bshd(const_cast<float*>(v.data()), dtype::f32, B, Lk, Hkv, Dv); }
  double vmax() const {
    double m = 0;
    for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
    return m;
  }
};

struct result {
  status st;
  std::vector<float> out, lse;  // out [B, Lq, Hq, Dv] contiguous, lse [B, Hq, Lq]
  float O(const dense& d, std::int64_t b, std::int64_t i, std::int64_t h, std::int64_t c) const {
    return out[static_cast<std::size_t>(((b * d.Lq + i) * d.Hq + h) * d.Dv + c)];
  }
  float L(const dense& d, std::int64_t b, std::int64_t h, std::int64_t i) const {
    return lse[static_cast<std::size_t>((b * d.Hq + h) * d.Lq + i)];
  }
};

result run(const dense& d, const spec& s, backend be = backend::reference) {
  result r;
  r.out.assign(static_cast<std::size_t>(d.B * d.Lq * d.Hq * d.Dv), std::numeric_limits<float>::quiet_NaN());
  r.lse.assign(static_cast<std::size_t>(d.B * d.Hq * d.Lq), std::numeric_limits<float>::quiet_NaN());
  const lse_tensor l = make_lse(r.lse.data(), d.Hq, d.Lq);
  options o;
  o.use = be;
  o.threads = 1;
  o.lse = &l;
  r.st = attention(d.qt(), d.kt(), d.vt(), make_bshd(r.out.data(), dtype::f32, d.B, d.Lq, d.Hq, d.Dv), s, o);
  return r;
}

// Independent double evaluation of the spec's math (written without the library's helpers): allowed(b, h, i, j)
// says which pairs take part; score maps the scaled logit.
using allowed_fn = std::function<bool(std::int64_t, std::int64_t, std::int64_t, std::int64_t)>;
struct expected {
  std::vector<double> out, lse;
  double O(const dense& d, std::int64_t b, std::int64_t i, std::int64_t h, std::int64_t c) const {
    return out[static_cast<std::size_t>(((b * d.Lq + i) * d.Hq + h) * d.Dv + c)];
  }
  double L(const dense& d, std::int64_t b, std::int64_t h, std::int64_t i) const {
    return lse[static_cast<std::size_t>((b * d.Hq + h) * d.Lq + i)];
  }
};

expected compute_expected(const dense& d, double scale, const allowed_fn& allowed, const score_fn& score = {}) {
  expected e;
  e.out.assign(static_cast<std::size_t>(d.B * d.Lq * d.Hq * d.Dv), 0.0);
  e.lse.assign(static_cast<std::size_t>(d.B * d.Hq * d.Lq), k_ninf);
  const std::int64_t group = d.Hq / d.Hkv;
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < d.Lq; ++i) {
        std::vector<std::pair<std::int64_t, double>> s;
        for (std::int64_t j = 0; j < d.Lk; ++j) {
          if (allowed && !allowed(b, h, i, j)) continue;
          double dot = 0;
          for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(d.Q(b, i, h, c)) * d.K(b, j, h / group, c);
          double x = scale * dot;
          if (score) x = score(x, b, h, i, j);
          if (x == k_ninf) continue;
          s.emplace_back(j, x);
        }
        if (s.empty()) continue;
        double m = k_ninf;
        for (auto& [j, x] : s) m = std::max(m, x);
        double sum = 0;
        for (auto& [j, x] : s) sum += std::exp(x - m);
        e.lse[static_cast<std::size_t>((b * d.Hq + h) * d.Lq + i)] = m + std::log(sum);
        for (std::int64_t c = 0; c < d.Dv; ++c) {
          double acc = 0;
          for (auto& [j, x] : s) acc += std::exp(x - m) / sum * d.V(b, j, h / group, c);
          e.out[static_cast<std::size_t>(((b * d.Lq + i) * d.Hq + h) * d.Dv + c)] = acc;
        }
      }
  return e;
}

// Every output and LSE of r matches e within the closed-form bound of tolerance.h.
void expect_matches(const dense& d, const result& r, const expected& e, double score_magnitude = 16.0) {
  ASSERT_TRUE(r.st.ok()) << r.st.error;
  const double vm = d.vmax();
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t i = 0; i < d.Lq; ++i)
      for (std::int64_t h = 0; h < d.Hq; ++h) {
        for (std::int64_t c = 0; c < d.Dv; ++c)
          ASSERT_TRUE(oracle_near(r.O(d, b, i, h, c), e.O(d, b, i, h, c), vm))
              << "out b=" << b << " i=" << i << " h=" << h << " c=" << c;
        ASSERT_TRUE(oracle_near(r.L(d, b, h, i), e.L(d, b, h, i), score_magnitude)) << "lse b=" << b << " h=" << h << " i=" << i;
      }
}

// Two oracle results that must agree (metamorphic identities).
void expect_same(const std::vector<float>& a, const std::vector<float>& b, double magnitude, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (std::size_t n = 0; n < a.size(); ++n)
    ASSERT_TRUE(oracle_near(a[n], b[n], magnitude)) << what << "[" << n << "]";
}

// ------------------------------------------------------------------------------------------------------------------
// Hand-computed cases.

TEST(Oracle, HandComputedOneQueryTwoKeys) {
  dense d(1, 1, 2, 1, 1, 2, 2);
  d.q = {1, 0};
  d.k = {1, 0, 0, 1};
  d.v = {1, 2, 3, 4};
  spec s;
  s.scale = 1.0;
  // scores (1, 0): weights e/(e+1), 1/(e+1); out = (e*v0 + v1)/(e+1); lse = log(e + 1).
  const result r = run(d, s);
  ASSERT_TRUE(r.st.ok()) << r.st.error;
  EXPECT_TRUE(oracle_near(r.out[0], 1.5378828427399902, 4));
  EXPECT_TRUE(oracle_near(r.out[1], 2.53788284273999, 4));
  EXPECT_TRUE(oracle_near(r.lse[0], 1.3132616875182228, 1));
}

TEST(Oracle, HandComputedDefaultScaleIsInverseSqrtDim) {
  dense d(1, 1, 2, 1, 1, 2, 2);
  d.q = {1, 0};
  d.k = {1, 0, 0, 1};
  d.v = {1, 2, 3, 4};
  // scale 1/sqrt(2): scores (0.70710678, 0); w0 = e^s/(e^s + 1).
  const result r = run(d, spec{});
  ASSERT_TRUE(r.st.ok()) << r.st.error;
  EXPECT_TRUE(oracle_near(r.out[0], 1.6604769013466862, 4));
  EXPECT_TRUE(oracle_near(r.out[1], 2.6604769013466862, 4));
  EXPECT_TRUE(oracle_near(r.lse[0], 1.1079403076572498, 1));
}

TEST(Oracle, HandComputedCausalTwoQueries) {
  dense d(1, 2, 2, 1, 1, 2, 2);
  d.q = {1, 0, 0, 1};
  d.k = {1, 0, 0, 1};
  d.v = {1, 2, 3, 4};
  spec s;
  s.scale = 1.0;
  s.causal = causal_mode::top_left;
  const result r = run(d, s);
  ASSERT_TRUE(r.st.ok()) << r.st.error;
  // Row 0 sees key 0 only: out = v0, lse = score = 1.
  EXPECT_EQ(r.out[0], 1.0f);
  EXPECT_EQ(r.out[1], 2.0f);
  EXPECT_TRUE(oracle_near(r.lse[0], 1.0, 1));
  // Row 1: scores (0, 1): out = (v0 + e v1)/(1 + e), lse = log(1 + e).
  EXPECT_TRUE(oracle_near(r.out[2], 2.46211715726001, 4));
  EXPECT_TRUE(oracle_near(r.out[3], 3.4621171572600096, 4));
  EXPECT_TRUE(oracle_near(r.lse[1], 1.3132616875182228, 1));
}

// ------------------------------------------------------------------------------------------------------------------
// Closed forms.

TEST(Oracle, UniformScoresGiveMeanOfValues) {
  dense d(2, 5, 37, 4, 2, 8, 12);
  d.randomize(11);
  std::fill(d.q.begin(), d.q.end(), 0.0f);
  for (causal_mode c : {causal_mode::none, causal_mode::top_left}) {
    spec s;
    s.causal = c;
    const result r = run(d, s);
    ASSERT_TRUE(r.st.ok()) << r.st.error;
    for (std::int64_t b = 0; b < d.B; ++b)
      for (std::int64_t h = 0; h < d.Hq; ++h)
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          const std::int64_t n = c == causal_mode::none ? d.Lk : i + 1;
          EXPECT_TRUE(oracle_near(r.L(d, b, h, i), std::log(static_cast<double>(n)), 1)) << test::causal_name(c);
          for (std::int64_t x = 0; x < d.Dv; ++x) {
            double mean = 0;
            for (std::int64_t j = 0; j < n; ++j) mean += d.V(b, j, h / 2, x);
            mean /= static_cast<double>(n);
            EXPECT_TRUE(oracle_near(r.O(d, b, i, h, x), mean, 1)) << test::causal_name(c) << " b=" << b << " h=" << h << " i=" << i;
          }
        }
  }
}

TEST(Oracle, OneHotScoresSelectOneValueRow) {
  dense d(2, 3, 9, 2, 2, 4, 5);
  d.randomize(12, 0.5f);
  // Every query is e0; key j* of (b, h) is e0 too, every other key has |k[0]| <= 0.5: with scale 1000 the others'
  // weights are below exp(-500) and the output is exactly v[j*] after rounding to f32.
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t i = 0; i < d.Lq; ++i)
      for (std::int64_t h = 0; h < d.Hq; ++h)
        for (std::int64_t c = 0; c < d.D; ++c) d.Q(b, i, h, c) = c == 0 ? 1.0f : 0.0f;
  auto hot = [](std::int64_t b, std::int64_t h) { return (3 * b + 5 * h + 1) % 9; };
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t c = 0; c < d.D; ++c) d.K(b, hot(b, h), h, c) = c == 0 ? 1.0f : 0.0f;
  spec s;
  s.scale = 1000.0;
  const result r = run(d, s);
  ASSERT_TRUE(r.st.ok()) << r.st.error;
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < d.Lq; ++i) {
        EXPECT_EQ(r.L(d, b, h, i), 1000.0f);
        for (std::int64_t c = 0; c < d.Dv; ++c) EXPECT_EQ(r.O(d, b, i, h, c), d.V(b, hot(b, h), h, c)) << b << " " << h << " " << i;
      }
}

TEST(Oracle, SoftmaxShiftInvariance) {
  dense d(1, 7, 11, 2, 1, 16, 16);
  d.randomize(13);
  const result base = run(d, spec{});
  ASSERT_TRUE(base.st.ok()) << base.st.error;
  for (double shift : {-50.0, 3.25, 1000.0}) {
    spec s;
    s.score = [shift](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return x + shift; };
    const result r = run(d, s);
    ASSERT_TRUE(r.st.ok()) << r.st.error;
    expect_same(r.out, base.out, d.vmax(), "out");
    for (std::size_t n = 0; n < base.lse.size(); ++n)
      EXPECT_TRUE(oracle_near(r.lse[n], static_cast<double>(base.lse[n]) + shift, std::fabs(shift) + 8)) << "shift " << shift;
  }
}

TEST(Oracle, LseIsLogSumExpOfScaledScores) {
  dense d(2, 6, 13, 3, 3, 24, 8);
  d.randomize(14, 2.0f);
  spec s;
  s.scale = 0.37;
  const result r = run(d, s);
  ASSERT_TRUE(r.st.ok()) << r.st.error;
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < d.Lq; ++i) {
        long double sum = 0;
        for (std::int64_t j = 0; j < d.Lk; ++j) {
          long double dot = 0;
          for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<long double>(d.Q(b, i, h, c)) * d.K(b, j, h, c);
          sum += std::exp(0.37L * dot);
        }
        EXPECT_TRUE(oracle_near(r.L(d, b, h, i), static_cast<double>(std::log(sum)), 64)) << b << " " << h << " " << i;
      }
}

// ------------------------------------------------------------------------------------------------------------------
// Causal semantics.

TEST(Oracle, CausalTopLeftVersusBottomRight) {
  for (auto [lq, lk] : {std::pair<std::int64_t, std::int64_t>{5, 3}, {3, 5}, {4, 4}, {1, 6}, {6, 1}}) {
    dense d(2, lq, lk, 2, 1, 8, 3);
    d.randomize(15 + static_cast<std::uint64_t>(lq * 10 + lk));
    for (causal_mode c : {causal_mode::top_left, causal_mode::bottom_right}) {
      spec s;
      s.causal = c;
      const std::int64_t offset = c == causal_mode::bottom_right ? lk - lq : 0;
      const result r = run(d, s);
      const expected e = compute_expected(d, 1.0 / std::sqrt(8.0), [offset](std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) {
        return j <= i + offset;
      });
      SCOPED_TRACE(testing::Message() << "lq=" << lq << " lk=" << lk << " " << test::causal_name(c));
      expect_matches(d, r, e);
      // Fully masked rows (i + offset < 0): exactly 0 and -inf, never NaN.
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h)
          for (std::int64_t i = 0; i < lq; ++i) {
            if (i + offset >= 0) {
              EXPECT_TRUE(std::isfinite(r.L(d, b, h, i)));
              continue;
            }
            EXPECT_EQ(r.L(d, b, h, i), -std::numeric_limits<float>::infinity());
            for (std::int64_t x = 0; x < d.Dv; ++x) EXPECT_EQ(r.O(d, b, i, h, x), 0.0f);
          }
    }
  }
}

TEST(Oracle, CausalModesCoincideForSquareProblems) {
  dense d(1, 9, 9, 2, 2, 4, 4);
  d.randomize(16);
  spec tl, br;
  tl.causal = causal_mode::top_left;
  br.causal = causal_mode::bottom_right;
  const result a = run(d, tl), b = run(d, br), none = run(d, spec{});
  ASSERT_TRUE(a.st.ok() && b.st.ok() && none.st.ok());
  EXPECT_TRUE(test::bytes_equal(a.out, b.out));
  EXPECT_TRUE(test::bytes_equal(a.lse, b.lse));
  // and the mask actually does something: the first row differs from the unmasked result.
  EXPECT_NE(a.out[0], none.out[0]);
}

TEST(Oracle, BottomRightWithMoreQueriesThanKeysMasksLeadingRows) {
  // Lq = 7 > Lk = 3: rows 0..3 see nothing (0, -inf); row 4 sees key 0; row 6 sees all keys.
  dense d(1, 7, 3, 1, 1, 2, 2);
  d.randomize(17);
  spec s;
  s.causal = causal_mode::bottom_right;
  const result r = run(d, s);
  ASSERT_TRUE(r.st.ok()) << r.st.error;
  for (std::int64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(r.L(d, 0, 0, i), -std::numeric_limits<float>::infinity()) << i;
    EXPECT_EQ(r.O(d, 0, i, 0, 0), 0.0f);
    EXPECT_EQ(r.O(d, 0, i, 0, 1), 0.0f);
  }
  EXPECT_EQ(r.O(d, 0, 4, 0, 0), d.V(0, 0, 0, 0));
  EXPECT_EQ(r.O(d, 0, 4, 0, 1), d.V(0, 0, 0, 1));
  const double s40 = (static_cast<double>(d.Q(0, 4, 0, 0)) * d.K(0, 0, 0, 0) + static_cast<double>(d.Q(0, 4, 0, 1)) * d.K(0, 0, 0, 1)) /
                     std::sqrt(2.0);
  EXPECT_TRUE(oracle_near(r.L(d, 0, 0, 4), s40, 1));
}

// ------------------------------------------------------------------------------------------------------------------
// Metamorphic identities.

TEST(Oracle, GqaEqualsMhaWithRepeatedKvHeads) {
  for (std::int64_t hkv : {1, 2, 3}) {  // 6 query heads: MQA, GQA 3, GQA 2
    dense g(2, 5, 7, 6, hkv, 8, 6);
    g.randomize(18 + static_cast<std::uint64_t>(hkv));
    dense m(2, 5, 7, 6, 6, 8, 6);
    m.q = g.q;
    for (std::int64_t b = 0; b < 2; ++b)
      for (std::int64_t j = 0; j < 7; ++j)
        for (std::int64_t h = 0; h < 6; ++h) {
          for (std::int64_t c = 0; c < 8; ++c) m.K(b, j, h, c) = g.K(b, j, h / (6 / hkv), c);
          for (std::int64_t c = 0; c < 6; ++c) m.V(b, j, h, c) = g.V(b, j, h / (6 / hkv), c);
        }
    spec s;
    s.causal = causal_mode::bottom_right;
    const result rg = run(g, s), rm = run(m, s);
    ASSERT_TRUE(rg.st.ok() && rm.st.ok());
    expect_same(rg.out, rm.out, g.vmax(), "out");
    expect_same(rg.lse, rm.lse, 8, "lse");
  }
}

TEST(Oracle, VarlenEqualsEachSequenceSeparately) {
  const std::vector<std::int64_t> lq = {3, 0, 6, 7, 2}, lk = {5, 4, 0, 7, 9};
  problem p;
  p.seqlens_q = lq;
  p.seqlens_k = lk;
  p.batch = static_cast<std::int64_t>(lq.size());
  p.heads_q = 4;
  p.heads_kv = 2;
  p.dim_qk = 6;
  p.dim_v = 5;
  p.seed = 19;
  for (causal_mode c : {causal_mode::none, causal_mode::top_left, causal_mode::bottom_right}) {
    p.causal = c;
    problem_data packed(p);
    spec s;
    s.causal = c;
    ASSERT_TRUE(run_problem(packed, s, backend::reference, 1).ok());
    for (std::size_t n = 0; n < lq.size(); ++n) {
      if (lq[n] == 0) continue;
      // The sequence alone, with an explicit K/V of at least one row (masked out entirely when lk == 0 is impossible
      // for a fixed-length problem, so check that case against the spec directly).
      if (lk[n] == 0) {
        for (std::int64_t i = 0; i < lq[n]; ++i)
          for (std::int64_t h = 0; h < p.heads_q; ++h) {
            const std::int64_t row = packed.cu_q[n] + i;
            EXPECT_EQ(packed.lse[static_cast<std::size_t>(h * packed.cu_q.back() + row)], -std::numeric_limits<float>::infinity());
            for (std::int64_t x = 0; x < p.dim_v; ++x) EXPECT_EQ(packed.out_at(0, row, h, x), 0.0);
          }
        continue;
      }
      dense d(1, lq[n], lk[n], p.heads_q, p.heads_kv, p.dim_qk, p.dim_v);
      const float* qsrc = reinterpret_cast<const float*>(packed.q.data()) + packed.cu_q[n] * p.heads_q * p.dim_qk;
      const float* ksrc = reinterpret_cast<const float*>(packed.k.data()) + packed.cu_k[n] * p.heads_kv * p.dim_qk;
      const float* vsrc = reinterpret_cast<const float*>(packed.v.data()) + packed.cu_k[n] * p.heads_kv * p.dim_v;
      std::copy(qsrc, qsrc + d.q.size(), d.q.begin());
      std::copy(ksrc, ksrc + d.k.size(), d.k.begin());
      std::copy(vsrc, vsrc + d.v.size(), d.v.begin());
      const result r = run(d, s);
      ASSERT_TRUE(r.st.ok()) << r.st.error;
      for (std::int64_t i = 0; i < lq[n]; ++i)
        for (std::int64_t h = 0; h < p.heads_q; ++h) {
          const std::int64_t row = packed.cu_q[n] + i;
          EXPECT_TRUE(oracle_near(packed.lse[static_cast<std::size_t>(h * packed.cu_q.back() + row)], r.L(d, 0, h, i), 8))
              << "seq " << n << " i=" << i << " h=" << h << " " << test::causal_name(c);
          for (std::int64_t x = 0; x < p.dim_v; ++x)
            EXPECT_TRUE(oracle_near(packed.out_at(0, row, h, x), r.O(d, 0, i, h, x), 1)) << "seq " << n << " i=" << i;
        }
    }
  }
}

TEST(Oracle, BhsdLayoutEqualsBshd) {
  problem p;
  p.batch = 2;
  p.seq_q = 9;
  p.seq_k = 14;
  p.heads_q = 4;
  p.heads_kv = 2;
  p.dim_qk = 5;
  p.dim_v = 7;
  p.seed = 20;
  p.causal = causal_mode::bottom_right;
  problem_data a(p);
  // Same logical tensors in BHSD memory order.
  problem pb = p;
  pb.lay = layout::bhsd;
  problem_data b(pb);
  auto permute = [](const tensor& s, const tensor& d) {
    for (std::int64_t x = 0; x < s.batch; ++x)
      for (std::int64_t i = 0; i < s.seq; ++i)
        for (std::int64_t h = 0; h < s.heads; ++h)
          for (std::int64_t c = 0; c < s.dim; ++c)
            static_cast<float*>(d.data)[x * d.stride_batch + i * d.stride_seq + h * d.stride_head + c * d.stride_dim] =
                static_cast<const float*>(s.data)[x * s.stride_batch + i * s.stride_seq + h * s.stride_head + c * s.stride_dim];
  };
  permute(a.q_view(), b.q_view());
  permute(a.k_view(), b.k_view());
  permute(a.v_view(), b.v_view());
  spec s;
  s.causal = p.causal;
  ASSERT_TRUE(run_problem(a, s, backend::reference, 1).ok());
  ASSERT_TRUE(run_problem(b, s, backend::reference, 1).ok());
  ASSERT_NE(a.out, b.out);  // different memory order...
  for (std::int64_t x = 0; x < 2; ++x)
    for (std::int64_t i = 0; i < 9; ++i)
      for (std::int64_t h = 0; h < 4; ++h)
        for (std::int64_t c = 0; c < 7; ++c) EXPECT_TRUE(oracle_near(b.out_at(x, i, h, c), a.out_at(x, i, h, c), 1));  // ...same values
  expect_same(a.lse, b.lse, 8, "lse");
}

TEST(Oracle, MaskFunctorEqualsRemovingMaskedKeys) {
  dense d(1, 6, 11, 2, 1, 8, 4);
  d.randomize(21);
  dense even(1, 6, 6, 2, 1, 8, 4);  // keys 0, 2, ..., 10
  even.q = d.q;
  for (std::int64_t j = 0; j < 6; ++j) {
    for (std::int64_t c = 0; c < 8; ++c) even.K(0, j, 0, c) = d.K(0, 2 * j, 0, c);
    for (std::int64_t c = 0; c < 4; ++c) even.V(0, j, 0, c) = d.V(0, 2 * j, 0, c);
  }
  spec s;
  s.mask = [](std::int64_t, std::int64_t, std::int64_t, std::int64_t j) { return j % 2 == 0; };
  const result masked = run(d, s), sub = run(even, spec{}), plain = run(d, spec{});
  ASSERT_TRUE(masked.st.ok() && sub.st.ok() && plain.st.ok());
  expect_same(masked.out, sub.out, d.vmax(), "out");
  expect_same(masked.lse, sub.lse, 8, "lse");
  EXPECT_NE(masked.out, plain.out);
}

TEST(Oracle, MaskFunctorSeesSequencePositionsAndHeads) {
  dense d(2, 5, 8, 3, 3, 4, 4);
  d.randomize(22);
  spec s;
  // Sliding window of 2 around the diagonal, head 2 of batch 1 fully masked.
  const allowed_fn window = [](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
    return !(b == 1 && h == 2) && j >= i - 2 && j <= i + 2;
  };
  s.mask = window;
  const result r = run(d, s);
  const expected e = compute_expected(d, 0.5, window);
  expect_matches(d, r, e);
  for (std::int64_t i = 0; i < d.Lq; ++i) EXPECT_EQ(r.L(d, 1, 2, i), -std::numeric_limits<float>::infinity());
}

TEST(Oracle, ScoreFunctorSoftcapAndAlibi) {
  dense d(1, 6, 9, 4, 2, 8, 8);
  d.randomize(23, 3.0f);
  spec s;
  s.score = [](double x, std::int64_t, std::int64_t h, std::int64_t i, std::int64_t j) {
    return 2.0 * std::tanh(x / 2.0) - 0.25 * static_cast<double>(h + 1) * std::fabs(static_cast<double>(i - j));
  };
  const result r = run(d, s);
  const expected e = compute_expected(d, 1.0 / std::sqrt(8.0), {}, s.score);
  expect_matches(d, r, e);
  const result plain = run(d, spec{});
  EXPECT_NE(r.out, plain.out);
}

TEST(Oracle, ScoreOfMinusInfinityMasksThePair) {
  dense d(1, 8, 8, 2, 2, 4, 4);
  d.randomize(24);
  spec by_score, by_causal;
  by_score.score = [](double x, std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) {
    return j > i ? -std::numeric_limits<double>::infinity() : x;
  };
  by_causal.causal = causal_mode::top_left;
  const result a = run(d, by_score), b = run(d, by_causal);
  ASSERT_TRUE(a.st.ok() && b.st.ok());
  expect_same(a.out, b.out, d.vmax(), "out");
  expect_same(a.lse, b.lse, 8, "lse");
  // A score that masks every pair of a row gives that row 0 / -inf.
  spec all;
  all.score = [](double x, std::int64_t, std::int64_t, std::int64_t i, std::int64_t) {
    return i == 3 ? -std::numeric_limits<double>::infinity() : x;
  };
  const result c = run(d, all);
  ASSERT_TRUE(c.st.ok());
  for (std::int64_t h = 0; h < 2; ++h) {
    EXPECT_EQ(c.L(d, 0, h, 3), -std::numeric_limits<float>::infinity());
    for (std::int64_t x = 0; x < 4; ++x) EXPECT_EQ(c.O(d, 0, 3, h, x), 0.0f);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Block masks: EMPTY masked, FULL allowed without evaluating the mask, PARTIAL evaluates the mask.

TEST(Oracle, BlockMaskSemantics) {
  dense d(1, 6, 6, 2, 2, 4, 4);
  d.randomize(25);
  block_mask bm;
  bm.q_tile = 2;
  bm.kv_tile = 3;
  bm.batch = 1;
  bm.heads = 2;
  bm.q_tiles = 3;
  bm.kv_tiles = 2;
  using tk = tile_kind;
  // head 0: row tile 0: [EMPTY, EMPTY] (fully masked rows), row tile 1: [FULL, PARTIAL], row tile 2: [PARTIAL, FULL]
  // head 1: everything PARTIAL.
  bm.kinds = {tk::empty, tk::empty, tk::full, tk::partial, tk::partial, tk::full,
              tk::partial, tk::partial, tk::partial, tk::partial, tk::partial, tk::partial};
  std::set<std::tuple<std::int64_t, std::int64_t, std::int64_t>> evaluated;
  spec s;
  s.blocks = &bm;
  // The mask rejects odd (i + j) and would allow everything in the EMPTY tiles.
  s.mask = [&evaluated](std::int64_t, std::int64_t h, std::int64_t i, std::int64_t j) {
    evaluated.insert({h, i, j});
    return (i + j) % 2 == 0;
  };
  const result r = run(d, s);
  ASSERT_TRUE(r.st.ok()) << r.st.error;
  auto kind = [&](std::int64_t h, std::int64_t i, std::int64_t j) { return bm.kinds[static_cast<std::size_t>((h * 3 + i / 2) * 2 + j / 3)]; };
  const expected e = compute_expected(d, 0.5, [&](std::int64_t, std::int64_t h, std::int64_t i, std::int64_t j) {
    const tk t = kind(h, i, j);
    return t == tk::full || (t == tk::partial && (i + j) % 2 == 0);
  });
  expect_matches(d, r, e);
  for (const auto& [h, i, j] : evaluated)
    EXPECT_EQ(kind(h, i, j), tk::partial) << "mask evaluated on a non-PARTIAL tile at h=" << h << " i=" << i << " j=" << j;
  EXPECT_FALSE(evaluated.empty());
  // Rows 0 and 1 of head 0 see only EMPTY tiles.
  for (std::int64_t i = 0; i < 2; ++i) {
    EXPECT_EQ(r.L(d, 0, 0, i), -std::numeric_limits<float>::infinity());
    for (std::int64_t x = 0; x < 4; ++x) EXPECT_EQ(r.O(d, 0, i, 0, x), 0.0f);
  }
}

TEST(Oracle, BlockMaskCombinesWithCausal) {
  dense d(1, 7, 5, 1, 1, 4, 4);
  d.randomize(26);
  block_mask bm;
  bm.q_tile = 4;
  bm.kv_tile = 4;
  bm.batch = bm.heads = 1;
  bm.q_tiles = 2;
  bm.kv_tiles = 2;
  bm.kinds = {tile_kind::full, tile_kind::full, tile_kind::full, tile_kind::empty};
  spec s;
  s.blocks = &bm;
  s.causal = causal_mode::bottom_right;  // FULL does not override causal
  const result r = run(d, s);
  const expected e = compute_expected(d, 0.5, [](std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) {
    return j <= i - 2 && !(i >= 4 && j >= 4);
  });
  expect_matches(d, r, e);
}

// ------------------------------------------------------------------------------------------------------------------
// Output dtypes.

TEST(Oracle, F32OutputWithBf16Inputs) {
  for (dtype t : {dtype::bf16, dtype::f16}) {
    problem p;
    p.batch = 1;
    p.seq_q = 5;
    p.seq_k = 9;
    p.heads_q = p.heads_kv = 2;
    p.dim_qk = 16;
    p.dim_v = 8;
    p.type = t;
    p.seed = 27;
    problem pf = p;
    pf.out_f32 = true;
    problem_data low(p), wide(pf);
    ASSERT_TRUE(run_problem(low, spec{}, backend::reference, 1).ok());
    ASSERT_TRUE(run_problem(wide, spec{}, backend::reference, 1).ok());
    // Independent evaluation from the decoded storage values.
    dense d(1, 5, 9, 2, 2, 16, 8);
    auto decode = [t](const std::vector<std::uint8_t>& src, std::vector<float>& dst) {
      const auto* u = reinterpret_cast<const std::uint16_t*>(src.data());
      for (std::size_t n = 0; n < dst.size(); ++n) dst[n] = t == dtype::bf16 ? bf16_to_f32(u[n]) : f16_to_f32(u[n]);
    };
    decode(wide.q, d.q);
    decode(wide.k, d.k);
    decode(wide.v, d.v);
    const expected e = compute_expected(d, 0.25, {});
    for (std::int64_t i = 0; i < 5; ++i)
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t c = 0; c < 8; ++c) {
          ASSERT_TRUE(oracle_near(wide.out_at(0, i, h, c), e.O(d, 0, i, h, c), 1, dtype::f32)) << dtype_name(t);
          // The low-precision output is the f32 result rounded once more (store goes double -> float -> dtype).
          const auto* u = reinterpret_cast<const std::uint16_t*>(low.out.data());
          const float f = static_cast<float>(wide.out_at(0, i, h, c));
          EXPECT_EQ(u[(i * 2 + h) * 8 + c], t == dtype::bf16 ? f32_to_bf16(f) : f32_to_f16(f));
        }
    EXPECT_TRUE(test::bytes_equal(low.lse, wide.lse));
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Strides: broadcast inputs and a non-contiguous LSE.

TEST(Oracle, BroadcastKvAndStridedLse) {
  dense d(3, 4, 6, 2, 1, 4, 3);
  d.randomize(28);
  // Batches 1 and 2 of K/V are copies of batch 0; a stride-0 view of batch 0 must give the same result.
  for (std::int64_t b = 1; b < 3; ++b)
    for (std::int64_t j = 0; j < 6; ++j) {
      for (std::int64_t c = 0; c < 4; ++c) d.K(b, j, 0, c) = d.K(0, j, 0, c);
      for (std::int64_t c = 0; c < 3; ++c) d.V(b, j, 0, c) = d.V(0, j, 0, c);
    }
  const result full = run(d, spec{});
  ASSERT_TRUE(full.st.ok());
  tensor kb = d.kt(), vb = d.vt();
  kb.stride_batch = 0;
  vb.stride_batch = 0;
  std::vector<float> out(full.out.size()), lse(3 * 4 * 2 * 2, 7.0f);
  // LSE stored [batch][seq][head] with every other float left as a gap: strides batch 16, head 2, seq 4.
  lse_tensor l{lse.data(), 16, 2, 4};  // batch, head, seq
  options o;
  o.use = backend::reference;
  o.lse = &l;
  const status st = attention(d.qt(), kb, vb, make_bshd(out.data(), dtype::f32, 3, 4, 2, 3), spec{}, o);
  ASSERT_TRUE(st.ok()) << st.error;
  expect_same(out, full.out, d.vmax(), "out");
  for (std::int64_t b = 0; b < 3; ++b)
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t i = 0; i < 4; ++i) {
        EXPECT_EQ(lse[static_cast<std::size_t>(b * 16 + h * 2 + i * 4)], full.L(d, b, h, i));
        EXPECT_EQ(lse[static_cast<std::size_t>(b * 16 + h * 2 + i * 4 + 1)], 7.0f);  // gaps untouched
      }
}

}  // namespace
}  // namespace omniattn
