// Score modifiers: spec strings (parse_score), post-softmax reweighting, the dense bias tensor, user functors through
// scores::inlined, and every built-in on the vectorized CPU path, each checked against the fp64 oracle under the
// tolerance policy (tolerance.h) on awkward sizes, plus their error messages.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/problem.h"
#include "core/score_kinds.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

using test::check_backend;
using test::small_problem;

constexpr double k_inf = std::numeric_limits<double>::infinity();

spec spec_of(const problem& p, score_fn score) {
  spec s;
  s.causal = p.causal;
  s.scale = p.scale;
  s.score = std::move(score);
  return s;
}

// The awkward shapes every modifier runs on: Lq != Lk, length 1, primes, 63 / 65 around the 64-wide tiles,
// head_dim 1 and 17, GQA, and bottom-right causal with Lq > Lk (its first rows see no key: fully masked).
std::vector<problem> awkward_problems() {
  std::vector<problem> out = {
      small_problem(1, 1, 1, 1, 1, dtype::f32, causal_mode::none, 11),
      small_problem(63, 65, 4, 2, 17, dtype::f32, causal_mode::none, 12),
      small_problem(65, 63, 2, 1, 64, dtype::f32, causal_mode::top_left, 13),
      small_problem(97, 131, 3, 3, 1, dtype::f32, causal_mode::bottom_right, 14),
      small_problem(130, 61, 2, 2, 32, dtype::f32, causal_mode::bottom_right, 15),
      small_problem(1, 200, 4, 1, 128, dtype::bf16, causal_mode::none, 16),
  };
  problem batched = small_problem(37, 70, 2, 2, 16, dtype::f32, causal_mode::none, 17);
  batched.batch = 2;
  out.push_back(batched);
  return out;
}

// ------------------------------------------------------------------------------------------------------------------
// Spec strings

double eval(const score_fn& f, double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) {
  return f(x, b, h, q, k);
}

TEST(ScoreSpec, ParsesTermsAppliedLeftToRight) {
  score_fn parsed;
  ASSERT_EQ(parse_score("alibi + softcap(30)", 8, parsed), "");
  const score_fn built = scores::then(scores::alibi(scores::alibi_slopes(8)), scores::softcap(30.0));
  for (std::int64_t h = 0; h < 8; ++h)
    for (double x : {-40.0, -1.5, 0.0, 2.25, 75.0})
      EXPECT_DOUBLE_EQ(eval(parsed, x, 0, h, 9, 3), eval(built, x, 0, h, 9, 3)) << "h=" << h << " x=" << x;
  // Order matters: softcap then alibi is a different function.
  ASSERT_EQ(parse_score("softcap(30) + alibi", 8, parsed), "");
  EXPECT_DOUBLE_EQ(eval(parsed, 75.0, 0, 0, 9, 3), 30.0 * std::tanh(2.5) + scores::alibi_slopes(8)[0] * (3 - 9));
}

TEST(ScoreSpec, NumbersAndEveryBuiltIn) {
  score_fn f;
  ASSERT_EQ(parse_score("softcap(30)", 1, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 12.0, 0, 0, 0, 0), 30.0 * std::tanh(0.4));
  ASSERT_EQ(parse_score("temperature(0.5)", 1, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 3.0, 0, 0, 0, 0), 6.0);
  ASSERT_EQ(parse_score("  temperature( 1e-2 ) ", 1, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 3.0, 0, 0, 0, 0), 300.0);
  ASSERT_EQ(parse_score("temperature(-.25)", 1, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 3.0, 0, 0, 0, 0), -12.0);
  ASSERT_EQ(parse_score("logn(512)", 1, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 2.0, 0, 0, 4095, 0), 2.0 * std::log(4096.0) / std::log(512.0));
  EXPECT_DOUBLE_EQ(eval(f, 2.0, 0, 0, 10, 0), 2.0);  // the factor never drops below 1
  ASSERT_EQ(parse_score("alibi(-3)", 4, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 1.0, 0, 1, 10, 4), 1.0 + scores::alibi_slopes(4)[1] * (4 - 10 - 3));
  ASSERT_EQ(parse_score("alibi_slope(0.25, 2)", 4, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 1.0, 0, 3, 10, 4), 1.0 + 0.25 * (4 - 10 + 2));
  ASSERT_EQ(parse_score("alibi_slope(0.125)", 4, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 1.0, 0, 3, 10, 4), 1.0 + 0.125 * (4 - 10));
  f = scores::softcap(1.0);
  ASSERT_EQ(parse_score("none", 4, f), "");
  EXPECT_FALSE(f);  // no modifier at all
  ASSERT_EQ(parse_score("none + softcap(2)", 4, f), "");
  EXPECT_DOUBLE_EQ(eval(f, 1.0, 0, 0, 0, 0), 2.0 * std::tanh(0.5));
}

// Every error is "[spec] at N: what", then the text, then a caret under column N.
void expect_error(const std::string& text, std::size_t pos, const std::string& what, std::int64_t heads = 8) {
  score_fn f;
  const std::string err = parse_score(text, heads, f);
  const std::string head = "[spec] at " + std::to_string(pos) + ": ";
  ASSERT_EQ(err.rfind(head, 0), 0u) << text << " -> " << err;
  EXPECT_NE(err.find(what), std::string::npos) << text << " -> " << err;
  EXPECT_NE(err.find("\n  " + text + "\n  " + std::string(pos, ' ') + "^"), std::string::npos) << text << " -> " << err;
}

TEST(ScoreSpec, ErrorsPointAtTheOffendingCharacter) {
  expect_error("alibi + foo", 8, "unknown score modifier 'foo' (known: none alibi alibi_slope softcap temperature logn)");
  expect_error("softcap(", 8, "expected a number");
  expect_error("softcap(30", 10, "expected ')'");
  expect_error("softcap(inf)", 8, "expected a number");
  expect_error("softcap(-inf)", 8, "expected a number");
  expect_error("softcap(1e999)", 8, "number out of range");
  expect_error("softcap(0)", 8, "[scores::softcap] cap must be finite and > 0");
  expect_error("softcap(30, 2)", 0, "softcap takes 1 argument(s), got 2");
  expect_error("softcap", 0, "softcap takes 1 argument(s), got 0");
  expect_error("temperature(0)", 12, "[scores::temperature] temperatures must be finite and != 0");
  expect_error("logn(1)", 5, "[scores::logn] base must be finite and > 1");
  expect_error("alibi(1.5)", 6, "alibi: the offset must be an integer");
  expect_error("alibi(1099511627777)", 6, "alibi: the offset must be an integer with |offset| <= 2^40");
  expect_error("alibi", 0, "alibi: the standard slopes need the number of query heads (got 0)", 0);
  expect_error("alibi +", 7, "unexpected end (expected a score modifier name)");
  expect_error("alibi softcap(2)", 6, "unexpected 's' (expected '+' or the end)");
  expect_error("", 0, "unexpected end (expected a score modifier name)");
  expect_error("+ alibi", 0, "unexpected '+' (expected a score modifier name)");
  std::string long_chain = "softcap(5)";
  for (int i = 0; i < 64; ++i) long_chain += "+softcap(5)";
  expect_error(long_chain, long_chain.size() - 10, "more than 64 terms");
  // The whole message, once.
  score_fn f;
  EXPECT_EQ(parse_score("softcap(0)", 1, f), "[spec] at 8: [scores::softcap] cap must be finite and > 0\n  softcap(0)\n          ^");
}

TEST(ScoreSpec, ProblemStringsAndCliSpec) {
  problem p;
  ASSERT_TRUE(parse_problem("n=64,h=4,score=alibi_slope(0.5, 2) + softcap(30),seed=3", p).ok());
  ASSERT_TRUE(p.score);
  EXPECT_EQ(p.score_spec, "alibi_slope(0.5, 2) + softcap(30)");
  EXPECT_EQ(p.seed, 3u);
  EXPECT_DOUBLE_EQ(eval(p.score, 1.0, 0, 0, 5, 7), 30.0 * std::tanh((1.0 + 0.5 * (7 - 5 + 2)) / 30.0));
  EXPECT_NE(p.describe().find(",score=alibi_slope(0.5, 2) + softcap(30)"), std::string::npos) << p.describe();
  problem again;
  ASSERT_TRUE(parse_problem(p.describe(), again).ok()) << p.describe();
  EXPECT_EQ(again.score_spec, p.score_spec);
  const status bad = parse_problem("n=64,score=softcap(0)", p);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error.rfind("[problem] score=softcap(0): [spec] at 8: [scores::softcap] cap must be finite and > 0", 0), 0u)
      << bad.error;
  // The problem's score reaches the kernel: explain / check run it like any spec.
  ASSERT_TRUE(parse_problem("lq=70,lk=90,h=2,d=16,causal=br,score=alibi + softcap(5)", p).ok());
  EXPECT_TRUE(check_backend(p, spec_of(p, p.score), backend::cpu, 1));
}

// ------------------------------------------------------------------------------------------------------------------
// Built-ins on the vectorized kernel path against the oracle

TEST(ScoreKernel, BuiltInsMatchTheOracleOnAwkwardSizes) {
  for (const problem& p : awkward_problems()) {
    std::vector<double> per_head_t(static_cast<std::size_t>(p.heads_q));
    for (std::size_t h = 0; h < per_head_t.size(); ++h) per_head_t[h] = 0.5 + 0.25 * static_cast<double>(h);
    std::vector<double> kb(static_cast<std::size_t>(p.seq_k / 2 + 1));  // shorter than seq_k: later keys add 0
    for (std::size_t k = 0; k < kb.size(); ++k) kb[k] = std::sin(0.7 * static_cast<double>(k));
    const std::vector<std::pair<const char*, score_fn>> mods = {
        {"alibi", scores::alibi(scores::alibi_slopes(p.heads_q), 3)},
        {"softcap", scores::softcap(0.75)},
        {"temperature", scores::temperature(per_head_t)},
        {"logn", scores::logn(4.0)},
        {"key_bias", scores::key_bias(kb)},
        {"chain", scores::then(scores::then(scores::logn(8.0), scores::alibi({-0.1}, -2)),
                               scores::then(scores::temperature({0.7}), scores::softcap(2.0)))},
    };
    for (const auto& [name, f] : mods)
      for (int threads : {1, 2}) EXPECT_TRUE(check_backend(p, spec_of(p, f), backend::cpu, threads)) << name;
  }
}

TEST(ScoreKernel, SpecStringsRunVectorized) {
  problem p = small_problem(100, 150, 4, 2, 32, dtype::f32, causal_mode::bottom_right, 21);
  for (const char* text : {"alibi + softcap(30)", "temperature(0.5) + logn(16)", "alibi_slope(0.3, -5) + softcap(1)"}) {
    score_fn f;
    ASSERT_EQ(parse_score(text, p.heads_q, f), "");
    EXPECT_TRUE(check_backend(p, spec_of(p, f), backend::cpu, 2)) << text;
    problem_data d(p);
    const spec s = spec_of(p, f);
    attn_params ap;
    ASSERT_TRUE(make_params(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, d.make_options(backend::cpu, 1), ap).ok());
    const selection sel = select(ap, backend::cpu);
    bool vectorized = false;
    for (const std::string& r : sel.reasons) vectorized |= r.find("vectorized") != std::string::npos;
    EXPECT_TRUE(vectorized) << text;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Reweighting

std::vector<double> random_weights(std::size_t n, std::uint64_t seed, bool zeros) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.05, 3.0);
  std::vector<double> w(n);
  for (std::size_t i = 0; i < n; ++i) w[i] = zeros && i % 5 == 2 ? 0.0 : u(rng);
  return w;
}

TEST(ScoreReweight, MatchesTheOracleShared) {
  for (const problem& p : awkward_problems()) {
    const score_fn f = scores::reweight(random_weights(static_cast<std::size_t>(p.seq_k), p.seed, true));
    for (int threads : {1, 2}) EXPECT_TRUE(check_backend(p, spec_of(p, f), backend::cpu, threads));
  }
}

TEST(ScoreReweight, PerHeadRowsAndAllZeroHead) {
  // Rows longer than seq_k (keys_per_head 70 > 65), one per head; head 1's weights are all 0: every row of head 1 is
  // fully masked (out 0, lse -inf, matched exactly by the tolerance policy's hard rule).
  problem p = small_problem(63, 65, 3, 1, 17, dtype::f32, causal_mode::none, 31);
  std::vector<double> w = random_weights(3 * 70, 31, true);
  for (std::size_t k = 70; k < 140; ++k) w[k] = 0.0;
  const score_fn f = scores::reweight(w, 70);
  EXPECT_TRUE(check_backend(p, spec_of(p, f), backend::cpu, 2));
  problem_data d(p);
  ASSERT_TRUE(run_problem(d, spec_of(p, f), backend::cpu, 1).ok());
  for (std::int64_t i = 0; i < p.seq_q; ++i) EXPECT_EQ(d.lse[static_cast<std::size_t>(1 * p.seq_q + i)], -k_inf);
  EXPECT_TRUE(std::isfinite(d.lse[0]));
  // Composed after a built-in, and after a user functor.
  EXPECT_TRUE(check_backend(p, spec_of(p, scores::then(scores::softcap(3.0), f)), backend::cpu, 1));
  EXPECT_TRUE(check_backend(
      p, spec_of(p, scores::then(scores::inlined([](auto s, auto, auto, auto, auto) { return s * 0.5f; }), f)),
      backend::cpu, 1));
}

// The identity reweight relies on, checked in closed form: out = sum_j w_j p_j v_j / sum_j w_j p_j with p the plain
// softmax, and lse = log(sum_j w_j exp(s_j)).
TEST(ScoreReweight, IsPostSoftmaxRenormalisation) {
  problem p = small_problem(3, 7, 2, 2, 5, dtype::f32, causal_mode::none, 41);
  const std::vector<double> w = {0.5, 2.0, 0.0, 1.0, 3.0, 0.25, 1.5};
  problem_data d(p);
  for (backend be : {backend::reference, backend::cpu}) {
    ASSERT_TRUE(run_problem(d, spec_of(p, scores::reweight(w)), be, 1).ok());
    const auto* q = reinterpret_cast<const float*>(d.q.data());
    const auto* k = reinterpret_cast<const float*>(d.k.data());
    const auto* v = reinterpret_cast<const float*>(d.v.data());
    const double scale = 1.0 / std::sqrt(5.0);
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t i = 0; i < 3; ++i) {
        std::vector<double> prob(7);
        double z = 0.0, zw = 0.0;
        for (std::int64_t j = 0; j < 7; ++j) {
          double dot = 0.0;
          for (std::int64_t e = 0; e < 5; ++e) dot += static_cast<double>(q[(i * 2 + h) * 5 + e]) * k[(j * 2 + h) * 5 + e];
          prob[static_cast<std::size_t>(j)] = std::exp(scale * dot);
          z += prob[static_cast<std::size_t>(j)];
          zw += w[static_cast<std::size_t>(j)] * prob[static_cast<std::size_t>(j)];
        }
        for (std::int64_t e = 0; e < 5; ++e) {
          double want = 0.0;
          for (std::int64_t j = 0; j < 7; ++j)
            want += w[static_cast<std::size_t>(j)] * (prob[static_cast<std::size_t>(j)] / z) * v[(j * 2 + h) * 5 + e];
          want /= zw / z;
          const double tol = be == backend::reference ? 2e-7 : 2e-6;
          EXPECT_NEAR(d.out_at(0, i, h, e), want, tol) << backend_name(be) << " h=" << h << " i=" << i << " e=" << e;
        }
        EXPECT_NEAR(d.lse[static_cast<std::size_t>(h * 3 + i)], std::log(zw), 4e-6) << backend_name(be);
      }
  }
}

TEST(ScoreReweight, ErrorsNameTheModifierAndTheRule) {
  const auto throws_with = [](auto make, const std::string& what) {
    try {
      make();
      ADD_FAILURE() << "no exception, expected: " << what;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  throws_with([] { scores::reweight({1.0, -0.5}); }, "[scores::reweight] weights must be finite and >= 0 (0 removes a key)");
  throws_with([] { scores::reweight({1.0, std::nan("")}); }, "[scores::reweight] weights must be finite and >= 0");
  throws_with([] { scores::reweight({1.0, k_inf}); }, "[scores::reweight] weights must be finite and >= 0");
  throws_with([] { scores::reweight({}); }, "[scores::reweight] weights is empty");
  throws_with([] { scores::reweight({1, 2, 3}, 2); }, "[scores::reweight] weights must hold a whole number of rows");
  throws_with([] { scores::reweight({1, 2}, -1); }, "[scores::reweight] keys_per_head must be >= 0");

  problem p = small_problem(8, 16, 4, 2, 8, dtype::f32, causal_mode::none, 51);
  problem_data d(p);
  for (backend be : {backend::reference, backend::cpu}) {
    status st = run_problem(d, spec_of(p, scores::reweight(std::vector<double>(10, 1.0))), be, 1);
    EXPECT_EQ(st.error, "[attention] spec.score reweight has 10 weights per head row, fewer than seq_k 16 (every key needs a weight)");
    st = run_problem(d, spec_of(p, scores::then(scores::softcap(2.0), scores::reweight(std::vector<double>(3 * 16, 1.0), 16))), be, 1);
    EXPECT_EQ(st.error, "[attention] spec.score reweight has 3 rows of 16 weights, expected 1 (all heads) or heads_q 4");
  }
}

// ------------------------------------------------------------------------------------------------------------------
// The dense bias tensor

// A bias tensor for shape (1 where broadcast) in a buffer with a key stride of `key_stride` elements; a few -inf.
struct bias_buffer {
  std::vector<float> data;
  std::array<std::int64_t, 4> shape{}, strides{};
  bias_buffer(std::array<std::int64_t, 4> sh, std::int64_t key_stride, std::uint64_t seed) : shape(sh) {
    strides = {sh[1] * sh[2] * sh[3] * key_stride, sh[2] * sh[3] * key_stride, sh[3] * key_stride, key_stride};
    data.assign(static_cast<std::size_t>(sh[0] * strides[0]), std::numeric_limits<float>::quiet_NaN());
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    for (std::int64_t x = 0; x < sh[0] * sh[1] * sh[2] * sh[3]; ++x) {
      const float val = x % 11 == 4 ? -std::numeric_limits<float>::infinity() : u(rng);
      data[static_cast<std::size_t>(x * key_stride)] = val;  // the gaps between keys stay NaN: never read
    }
  }
  score_fn fn() const { return scores::bias(data.data(), shape, strides); }
};

TEST(ScoreBias, BroadcastShapesAndStridesMatchTheOracle) {
  for (const problem& p : awkward_problems()) {
    const std::int64_t B = p.batch, H = p.heads_q, Q = p.seq_q, K = p.seq_k;
    const std::vector<std::pair<std::array<std::int64_t, 4>, std::int64_t>> cases = {
        {{B, H, Q, K}, 1}, {{1, H, 1, K}, 1}, {{B, 1, Q, K}, 3}, {{1, 1, Q, 1}, 1}, {{1, H, Q, K}, 2}};
    for (const auto& [shape, key_stride] : cases) {
      const bias_buffer bb(shape, key_stride, p.seed);
      EXPECT_TRUE(check_backend(p, spec_of(p, bb.fn()), backend::cpu, 2))
          << "shape " << shape[0] << "x" << shape[1] << "x" << shape[2] << "x" << shape[3] << " key stride " << key_stride;
    }
    // Composed with built-ins on both sides.
    const bias_buffer bb({1, H, Q, K}, 1, p.seed + 1);
    EXPECT_TRUE(check_backend(
        p, spec_of(p, scores::then(scores::then(scores::alibi({0.1}), bb.fn()), scores::softcap(4.0))), backend::cpu, 1));
  }
}

TEST(ScoreBias, Errors) {
  float x = 0.0f;
  const auto throws_with = [](auto make, const std::string& what) {
    try {
      make();
      ADD_FAILURE() << "no exception, expected: " << what;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  throws_with([] { scores::bias(nullptr, {1, 1, 1, 1}); }, "[scores::bias] data is null");
  throws_with([&] { scores::bias(&x, {1, -1, 1, 1}, {0, 0, 0, 0}); }, "[scores::bias] every shape entry must be >= 0 (1 broadcasts)");
  throws_with([&] { scores::bias(&x, {1, 1, 1, 2}, {0, 0, 0, -1}); }, "[scores::bias] strides must be >= 0");

  problem p = small_problem(5, 7, 4, 2, 8, dtype::f32, causal_mode::none, 61);
  problem_data d(p);
  const bias_buffer bad({2, 3, 5, 7}, 1, 1);
  for (backend be : {backend::reference, backend::cpu}) {
    const status st = run_problem(d, spec_of(p, bad.fn()), be, 1);
    EXPECT_EQ(st.error,
              "[attention] spec.score bias shape [2, 3, 5, 7] does not broadcast to [batch, heads_q, seq_q, seq_k] = "
              "[1, 4, 5, 7]: dim 0 (batch) is 2, must be 1 or 1");
  }
  const bias_buffer short_keys({1, 1, 1, 6}, 1, 1);
  EXPECT_NE(run_problem(d, spec_of(p, short_keys.fn()), backend::cpu, 1).error.find("dim 3 (seq_k) is 6, must be 1 or 7"),
            std::string::npos);
}

TEST(ScoreBias, VarlenUsesSequenceIndexAndLocalPositions) {
  problem p = small_problem(0, 0, 2, 1, 16, dtype::f32, causal_mode::bottom_right, 71);
  p.seqlens_q = {5, 40, 1};
  p.seqlens_k = {9, 33, 70};
  p.batch = 3;
  p.seq_q = 40;  // the longest sequences: what the bias shape is checked against
  p.seq_k = 70;
  const bias_buffer bb({3, 2, 40, 70}, 1, 71);
  EXPECT_TRUE(check_backend(p, spec_of(p, bb.fn()), backend::cpu, 2));
}

// ------------------------------------------------------------------------------------------------------------------
// User functors through scores::inlined

TEST(ScoreInlined, MatchesTheOracleAloneAndInChains) {
  const auto capped = scores::inlined([](auto s, auto, auto h, auto q, auto k) {
    using T = decltype(s);
    return T(8) * std::tanh(s / T(8)) - T(0.02) * T(h + 1) * T(q > k ? q - k : k - q);
  });
  const auto masking = scores::inlined([](auto s, auto, auto, auto q, auto k) {
    return (q + k) % 29 == 11 ? -std::numeric_limits<decltype(s)>::infinity() : s;
  });
  const score_fn plain = [](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t k) { return x - 0.01 * k; };
  for (const problem& p : awkward_problems()) {
    const std::vector<std::pair<const char*, score_fn>> mods = {
        {"inlined", capped},
        {"inlined masking", masking},
        {"builtin then inlined", scores::then(scores::alibi({0.2}), capped)},
        {"inlined then builtin", scores::then(capped, scores::softcap(3.0))},
        {"inlined, plain, builtin, inlined",
         scores::then(scores::then(masking, plain), scores::then(scores::temperature({2.0}), capped))},
    };
    for (const auto& [name, f] : mods)
      for (int threads : {1, 2}) EXPECT_TRUE(check_backend(p, spec_of(p, f), backend::cpu, threads)) << name;
  }
}

TEST(ScoreInlined, SelectSaysHowTheModifierRuns) {
  problem p = small_problem(16, 16, 2, 2, 8, dtype::f32, causal_mode::none, 81);
  problem_data d(p);
  const auto reasons = [&](score_fn f) {
    const spec s = spec_of(p, std::move(f));
    attn_params ap;
    EXPECT_TRUE(make_params(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, d.make_options(backend::cpu, 1), ap).ok());
    std::string all;
    for (const std::string& r : select(ap, backend::cpu).reasons) all += r + "\n";
    return all;
  };
  const std::string inl = reasons(scores::then(scores::alibi({0.5}), scores::inlined([](auto s, auto, auto, auto, auto) { return s; })));
  EXPECT_NE(inl.find("score modifier alibi -> inlined: applied to whole score rows, vectorized (user code through one "
                     "inlined tile function per score tile)"),
            std::string::npos)
      << inl;
  const std::string plain = reasons([](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return x; });
  EXPECT_NE(plain.find("user score functor called per element"), std::string::npos) << plain;
  const std::string rw = reasons(scores::then(scores::reweight(std::vector<double>(16, 1.0)), scores::bias(&d.lse[0], {1, 1, 1, 1})));
  EXPECT_NE(rw.find("score modifier key table -> bias: applied to whole score rows, vectorized"), std::string::npos) << rw;
}

// ------------------------------------------------------------------------------------------------------------------
// Cost of a modifier (prints timings; run with --gtest_also_run_disabled_tests). Dense N=4096, D=128, H=1, fp32,
// 1 thread: no modifier, built-in softcap, the same softcap as a user lambda through scores::inlined, as a plain
// score_fn, and ALiBi. The outputs of the three softcap variants must agree.

double best_ms(problem_data& d, const spec& s, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const status st = run_problem(d, s, backend::cpu, 1);
    const auto t1 = std::chrono::steady_clock::now();
    EXPECT_TRUE(st.ok()) << st.error;
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

TEST(ScorePerf, DISABLED_ModifierOverheadDenseN4096) {
  problem p = small_problem(4096, 4096, 1, 1, 128, dtype::f32, causal_mode::none, 91);
  p.lse = false;
  if (const char* n = std::getenv("OMNIATTN_SCORE_PERF_N")) p.seq_q = p.seq_k = std::atoll(n);
  const int reps = 5;
  problem_data d(p);
  const auto lambda_cap = [](auto s, auto, auto, auto, auto) {
    using T = decltype(s);
    return T(30) * std::tanh(s / T(30));
  };
  const auto lambda_alibi = [](auto s, auto, auto, auto q, auto k) { return s + decltype(s)(0.0625) * decltype(s)(k - q); };
  const std::vector<std::pair<const char*, score_fn>> variants = {
      {"none", score_fn{}},
      {"softcap(30) built-in", scores::softcap(30.0)},
      {"softcap(30) inlined lambda", scores::inlined(lambda_cap)},
      {"softcap(30) plain score_fn", [](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return 30.0 * std::tanh(x / 30.0); }},
      {"alibi built-in", scores::alibi({0.0625})},
      {"alibi inlined lambda", scores::inlined(lambda_alibi)},
      {"alibi + softcap(30) built-in", scores::then(scores::alibi({0.0625}), scores::softcap(30.0))},
      {"reweight", scores::reweight(random_weights(static_cast<std::size_t>(p.seq_k), 3, false))},
  };
  // Rounds over all variants, best time per variant: load from other processes hits every variant alike.
  std::vector<double> best(variants.size(), 1e30);
  for (std::size_t v = 0; v < variants.size(); ++v) (void)best_ms(d, spec_of(p, variants[v].second), 1);  // warm-up
  for (int round = 0; round < reps; ++round)
    for (std::size_t v = 0; v < variants.size(); ++v)
      best[v] = std::min(best[v], best_ms(d, spec_of(p, variants[v].second), 1));
  std::vector<float> reference_out;
  for (std::size_t v = 0; v < variants.size(); ++v) {
    const std::string name = variants[v].first;
    const double ms = best[v];
    const double gflops = 4.0 * static_cast<double>(p.seq_q * p.seq_k * p.dim_qk) / (ms * 1e6);
    std::printf("%-30s %9.2f ms  %6.1f GFLOP/s  %+6.1f%% vs none\n", name.c_str(), ms, gflops, 100.0 * (ms / best[0] - 1.0));
    if (name.rfind("softcap(30)", 0) != 0) continue;
    // The three softcap variants compute the same function: their outputs agree to float rounding.
    ASSERT_TRUE(run_problem(d, spec_of(p, variants[v].second), backend::cpu, 1).ok());
    const auto* out = reinterpret_cast<const float*>(d.out.data());
    if (reference_out.empty()) reference_out.assign(out, out + d.out.size() / 4);
    double max_diff = 0.0;
    for (std::size_t x = 0; x < reference_out.size(); ++x) max_diff = std::max(max_diff, std::fabs(double(out[x]) - reference_out[x]));
    EXPECT_LT(max_diff, 1e-5) << name;
  }
}

}  // namespace
}  // namespace omniattn
