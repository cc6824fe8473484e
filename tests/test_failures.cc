// Every failure is a status: user callbacks that throw (inside the kernels' parallel regions too), allocations that
// cannot be served, and head dims past the register plan. A failing call leaves out and lse byte for byte as they were.
#include <gtest/gtest.h>

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

using test::small_problem;

// Runs p with spec s on backend b and expects a failure containing `what`, with out and lse untouched.
void expect_fails_untouched(const problem& p, const spec& s, backend b, int threads, const std::string& what) {
  problem_data d(p);
  std::fill(d.out.begin(), d.out.end(), std::uint8_t{0x5a});
  std::fill(d.lse.begin(), d.lse.end(), 12.5f);
  const std::vector<std::uint8_t> out_before = d.out;
  const std::vector<float> lse_before = d.lse;
  const status st = run_problem(d, s, b, threads);
  ASSERT_FALSE(st.ok()) << p.describe() << " on " << backend_name(b);
  EXPECT_NE(st.error.find(what), std::string::npos) << st.error;
  EXPECT_EQ(st.error.rfind("[attention]", 0), 0u) << st.error;
  EXPECT_TRUE(test::bytes_equal(d.out, out_before)) << "out was written by a failing call";
  EXPECT_TRUE(test::bytes_equal(d.lse, lse_before)) << "lse was written by a failing call";
}

const backend k_backends[] = {backend::cpu, backend::reference};

TEST(Failures, ThrowingMaskPredicateIsAStatus) {
  // Throws on one key of a PARTIAL tile only, late in the call, so the kernel has written other rows by then.
  spec s;
  s.mask = mask_expr::predicate(
      [](std::int64_t, std::int64_t h, std::int64_t q, std::int64_t k) {
        if (h == 1 && q == 130 && k == 7) throw std::runtime_error("boom at (1, 130, 7)");
        return (q + k) % 5 != 0;
      },
      "every_fifth");
  for (backend b : k_backends)
    for (int threads : {1, 2})
      expect_fails_untouched(small_problem(150, 97, 2, 1, 24, dtype::f32, causal_mode::none, 3), s, b, threads,
                             "spec.mask predicate 'every_fifth' threw: boom at (1, 130, 7)");
}

TEST(Failures, ThrowingInlinedMaskIsAStatus) {
  spec s;
  s.mask = mask_expr::inlined(
      [](auto, auto, auto q, auto k) {
        if (q == 70 && k == 3) throw std::invalid_argument("bad row");
        return k <= q;
      },
      "tril_or_throw");
  for (backend b : k_backends)
    expect_fails_untouched(small_problem(100, 100, 2, 2, 16, dtype::bf16, causal_mode::none, 4), s, b, 2,
                           "spec.mask predicate 'tril_or_throw' threw: bad row");
}

TEST(Failures, ThrowingScoreFunctorsAreAStatus) {
  const auto thrower = [](auto x, auto, auto, auto q, auto) {
    if (q == 90) throw std::out_of_range("score at 90");
    return x;
  };
  spec plain;
  plain.score = [thrower](double x, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) {
    return thrower(x, b, h, q, k);
  };
  spec inl;
  inl.score = scores::inlined(thrower);
  for (backend b : k_backends) {
    expect_fails_untouched(small_problem(130, 70, 2, 1, 32, dtype::f32, causal_mode::top_left, 5), plain, b, 2,
                           "spec.score functor 'score_fn' threw: score at 90");
    // The oracle evaluates an inlined functor through its per-element form.
    expect_fails_untouched(small_problem(130, 70, 2, 1, 32, dtype::f32, causal_mode::top_left, 6), inl, b, 2,
                           b == backend::cpu ? "spec.score functor 'inlined' threw: score at 90" : "threw: score at 90");
  }
}

TEST(Failures, NonStandardExceptionIsAStatus) {
  spec s;
  s.mask = mask_expr::predicate([](std::int64_t, std::int64_t, std::int64_t q, std::int64_t) -> bool {
    if (q == 3) throw 42;
    return true;
  });
  expect_fails_untouched(small_problem(8, 8, 1, 1, 8, dtype::f32, causal_mode::none, 7), s, backend::cpu, 1,
                         "not a std::exception");
}

// A call with user code writes through the staging buffers: strided outputs (BHSD), varlen sequences and LSE still
// land where they belong.
TEST(Failures, StagedOutputsMatchTheOracle) {
  spec s;
  s.mask = mask_expr::predicate([](std::int64_t, std::int64_t h, std::int64_t q, std::int64_t k) { return (q ^ k ^ h) % 3 != 0; });
  s.score = scores::inlined([](auto x, auto, auto, auto, auto) { return x * 0.5f; });
  problem bhsd = small_problem(77, 65, 4, 2, 40, dtype::bf16, causal_mode::bottom_right, 8);
  bhsd.lay = layout::bhsd;
  bhsd.batch = 2;
  EXPECT_TRUE(test::check_backend(bhsd, s, backend::cpu, 2));
  problem var = small_problem(0, 0, 2, 1, 16, dtype::f32, causal_mode::none, 9);
  var.seqlens_q = {5, 64, 1};
  var.seqlens_k = {70, 3, 9};
  var.batch = 3;
  EXPECT_TRUE(test::check_backend(var, s, backend::cpu, 2));
}

}  // namespace
}  // namespace omniattn
