// Concurrent callers: several std::threads call attention() at once, each with options.threads = 2, on a mix of
// masks. The CPU kernel keeps per-calling-thread state (the packed K/V leases of flash_fwd.cc) and a process-wide
// cache of grid plans (core/grid_tiles.cc, four entries, so six grid masks evict entries other threads still use);
// both must stay private to, or safely shared between, callers. Every result is checked against the fp64 oracle.
// Under the tsan preset this test is what exercises those paths from more than one OpenMP team at a time.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "core/problem.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

struct concurrent_case {
  problem prob;
  spec s;
  bool grid = false;  // must run on the grid path (and so go through the plan cache)
};

problem shaped(std::int64_t lq, std::int64_t lk, std::int64_t hq, std::int64_t hkv, std::int64_t d, dtype t,
               causal_mode c, std::uint64_t seed) {
  return test::small_problem(lq, lk, hq, hkv, d, t, c, seed);
}

std::vector<concurrent_case> make_cases() {
  std::vector<concurrent_case> cases;
  auto add = [&](problem p, spec s, bool grid = false) { cases.push_back({std::move(p), std::move(s), grid}); };
  {  // causal GQA on the raster path
    spec s;
    s.causal = causal_mode::bottom_right;
    add(shaped(150, 170, 4, 2, 64, dtype::f32, causal_mode::bottom_right, 31), s);
  }
  {  // sliding window with attention sinks, bf16
    spec s;
    s.mask = mask_expr::window(32, 0, causal_mode::bottom_right) | mask_expr::sinks(4);
    add(shaped(130, 130, 2, 1, 32, dtype::bf16, causal_mode::none, 32), s);
  }
  {  // a user predicate and a score functor: the staged-output path, run from several OpenMP teams at once
    spec s;
    s.mask = mask_expr::inlined([](auto, auto h, auto q, auto k) { return (q + 2 * k + h) % 5 != 1; }, "mod5");
    s.score = [](double x, std::int64_t, std::int64_t h, std::int64_t q, std::int64_t k) {
      return x - 0.01 * static_cast<double>(h + 1) * static_cast<double>(q > k ? q - k : k - q);
    };
    add(shaped(90, 110, 2, 2, 17, dtype::f16, causal_mode::none, 33), s);
  }
  {  // varlen with an empty sequence, documents inside the sequences
    problem p = shaped(0, 0, 4, 1, 40, dtype::f32, causal_mode::top_left, 34);
    p.seqlens_q = {70, 0, 45};
    p.seqlens_k = {80, 5, 45};
    p.batch = 3;
    spec s;
    s.causal = causal_mode::top_left;
    s.mask = mask_expr::document({0, 20, 45, 80});
    add(p, s);
  }
  {  // BHSD layout, f32 output of bf16 inputs
    problem p = shaped(100, 64, 3, 3, 96, dtype::bf16, causal_mode::none, 35);
    p.lay = layout::bhsd;
    p.out_f32 = true;
    add(p, spec{});
  }
  // Six grid masks (the grid path, cpu.flash_fwd_grid) against a plan cache of four: callers race on lookups,
  // insertions and evictions of plans that other callers are still running on.
  struct grid_mask {
    mask_expr m;
    std::int64_t tokens;  // the grid's token count: seq_q = seq_k of the problem
  };
  const std::vector<grid_mask> grids = {
      {mask_expr::neighborhood({12, 12}, {5, 5}), 144},
      {mask_expr::neighborhood({97}, {13}), 97},
      {mask_expr::neighborhood({4, 6, 5}, {3, 3, 3}, {1, 1, 1}, {true, false, false}), 120},
      {mask_expr::neighborhood({23, 18}, {7, 5}, {1, 2}, {false, false}, {3, 5}), 414},
      {mask_expr::halo({16, 16}, {8, 8}, {2, 2}), 256},
      {mask_expr::neighborhood({9, 10}, {3, 5}, {2, 1}), 90},
  };
  std::uint64_t seed = 40;
  for (const grid_mask& g : grids) {
    spec s;
    s.mask = g.m;
    add(shaped(g.tokens, g.tokens, 2, 1, 32, dtype::f32, causal_mode::none, seed++), s, true);
  }
  return cases;
}

std::string selected_kernel(const concurrent_case& c) {
  const problem_data d(c.prob);
  attn_params ap;
  if (!make_params(d.q_view(), d.k_view(), d.v_view(), d.out_view(), c.s, d.make_options(backend::cpu, 2), ap).ok())
    return "(invalid)";
  return select(ap, backend::cpu).name;
}

// Runs one case on the CPU kernel with poisoned outputs (a row it forgets to write cannot pass by accident) and
// checks it against the precomputed references. Touches no gtest state, so it is safe to call from any thread.
std::string run_and_check(const concurrent_case& c, const test::references& r) {
  problem pl = c.prob;
  pl.lse = true;
  problem_data got(pl);
  std::fill(got.out.begin(), got.out.end(), std::uint8_t{0x7f});
  std::fill(got.lse.begin(), got.lse.end(), std::numeric_limits<float>::quiet_NaN());
  // LSE entries that do not exist (past the total query rows) keep the poison in both; compare only what exists.
  std::int64_t tq = pl.seq_q;
  if (pl.is_varlen()) {
    tq = 0;
    for (std::int64_t l : pl.seqlens_q) tq += l;
  }
  const std::size_t rows = static_cast<std::size_t>((pl.is_varlen() ? 1 : pl.batch) * pl.heads_q * tq);
  const status st = run_problem(got, c.s, backend::cpu, 2);
  if (!st.ok()) return pl.describe() + ": " + st.error;
  if (rows < got.lse.size()) std::fill(got.lse.begin() + static_cast<std::ptrdiff_t>(rows), got.lse.end(), r.oracle.lse[rows]);
  const ::testing::AssertionResult ok = test::within_tolerance(got, r);
  return ok ? std::string() : std::string(ok.message());
}

TEST(Concurrency, ThreadsCallingAttentionAtOnceMatchTheOracle) {
  const std::vector<concurrent_case> cases = make_cases();
  // The oracle runs once per case, before the threads start: the threads then only run the kernel.
  std::vector<test::references> refs;
  refs.reserve(cases.size());
  for (const concurrent_case& c : cases) {
    refs.push_back(test::make_references(c.prob, c.s));
    const std::string kernel = selected_kernel(c);
    if (c.grid) EXPECT_EQ(kernel.rfind("cpu.flash_fwd_grid", 0), 0u) << c.s.mask.str() << " runs on " << kernel;
    else EXPECT_EQ(kernel.rfind("cpu.flash_fwd", 0), 0u) << c.prob.describe() << " runs on " << kernel;
  }
  ASSERT_FALSE(testing::Test::HasFailure());

  constexpr int k_callers = 4;
  const int rounds = test::full_intensity() ? 6 : 2;
  std::vector<std::vector<std::string>> failures(k_callers);
  std::vector<std::thread> callers;
  for (int t = 0; t < k_callers; ++t) {
    callers.emplace_back([&, t] {
      // Each caller walks the cases from its own starting point, so different masks (and different grid plans) run
      // at the same time, and every case also runs on several callers at once across the rounds.
      for (int round = 0; round < rounds; ++round)
        for (std::size_t i = 0; i < cases.size(); ++i) {
          const std::size_t c = (i + static_cast<std::size_t>(t) * 3) % cases.size();
          const std::string error = run_and_check(cases[c], refs[c]);
          if (!error.empty()) failures[static_cast<std::size_t>(t)].push_back(cases[c].s.mask.str() + ": " + error);
        }
    });
  }
  for (std::thread& c : callers) c.join();
  for (int t = 0; t < k_callers; ++t)
    for (const std::string& f : failures[static_cast<std::size_t>(t)]) ADD_FAILURE() << "caller " << t << ": " << f;
}

}  // namespace
}  // namespace omniattn
