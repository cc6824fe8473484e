// The grid path of the CPU kernel (query boxes with gathered key boxes, core/grid_tiles.h, cpu.flash_fwd_grid):
// the plan against the mask predicate pair by pair, the kernel against the oracle, and when the path is (not) taken.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "hwy/targets.h"

#include "core/grid_tiles.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

struct grid_case {
  std::vector<std::int64_t> grid, kernel, dilation;
  std::vector<bool> causal;
  std::vector<std::int64_t> stride = {};
};

// Awkward grids: odd and prime sizes, kernels up to the grid, dilations that do not divide it, causal axes.
const grid_case k_cases[] = {
    {{97}, {13}, {1}, {false}},
    {{101}, {7}, {3}, {true}},
    {{130}, {127}, {1}, {false}},
    {{13, 11}, {5, 3}, {1, 2}, {false, false}},
    {{17, 19}, {7, 7}, {2, 1}, {false, true}},
    {{9, 10}, {9, 10}, {1, 1}, {false, false}},
    {{4, 6, 5}, {3, 3, 3}, {1, 1, 1}, {true, false, false}},
    {{5, 7, 6}, {3, 5, 3}, {1, 1, 2}, {false, false, false}},
    {{23, 18}, {7, 5}, {1, 2}, {false, false}, {3, 5}},           // NATTEN strided windows
    {{31}, {9}, {1}, {true}, {4}},                               // strided and causal
    {{12, 12}, {4, 4}, {1, 1}, {false, false}, {4, 4}},           // stride = kernel: blocked (Swin) windows
    {{1}, {1}, {1}, {false}},                                    // one token
    {{7}, {2}, {3}, {true}},                                     // dilation not dividing a short last axis
    {{1, 100}, {1, 33}, {1, 3}, {false, false}},                 // degenerate axes
    {{100, 1}, {33, 1}, {3, 1}, {false, false}},
};

// HaloNet blocks (the grid path's FULL boxes), including blocks that do not divide the grid.
const mask_expr k_halos[] = {
    mask_expr::halo({16, 16}, {8, 8}, {2, 2}),
    mask_expr::halo({13, 17}, {4, 5}, {1, 2}),
    mask_expr::halo({40}, {8}, {3}),
    mask_expr::halo({6, 8, 8}, {2, 4, 4}, {1, 1, 1}),
};

mask_expr mask_of(const grid_case& c) { return mask_expr::neighborhood(c.grid, c.kernel, c.dilation, c.causal, c.stride); }

std::int64_t tokens_of(const grid_case& c) {
  std::int64_t n = 1;
  for (std::int64_t x : c.grid) n *= x;
  return n;
}

// Every query is in exactly one box; the keys behind its set bits (slot 16 s + lane is packed key segments[s] + lane)
// are exactly the keys the mask allows it, each once, so nothing allowed is left outside its box.
void expect_plan_exact(const mask_expr& m, std::int64_t n) {
  const std::optional<detail::grid_local> g = detail::as_grid_local(m);
  ASSERT_TRUE(g.has_value()) << m.str();
  const detail::grid_plan plan = detail::plan_grid_tiles(*g, 64, 6);
  ASSERT_EQ(static_cast<std::int64_t>(plan.packed_token.size()), n);
  std::vector<int> seen(static_cast<std::size_t>(n), 0);
  for (std::int64_t t : plan.packed_token) ++seen[static_cast<std::size_t>(t)];
  // A segment reads 16 packed keys from its start; the kernel pads 16 past the sequence, so every start must be a key.
  for (std::int64_t start : plan.segments) ASSERT_LT(start, n) << m.str();
  for (std::int64_t t = 0; t < n; ++t) ASSERT_EQ(seen[static_cast<std::size_t>(t)], 1) << m.str() << " packed order, token " << t;
  std::fill(seen.begin(), seen.end(), 0);
  std::int64_t area = 0;
  for (const detail::grid_tile& t : plan.tiles) {
    ASSERT_LE(t.q_count, 64);
    const std::int64_t words = detail::grid_plan::words(t);
    for (std::int64_t i = 0; i < t.q_count; ++i) {
      const std::int64_t q = plan.q_tokens[static_cast<std::size_t>(t.q_begin + i)];
      ++seen[static_cast<std::size_t>(q)];
      std::vector<int> hit(static_cast<std::size_t>(n), 0);
      for (std::int64_t slot = 0; slot < t.seg_count * detail::k_segment; ++slot) {
        const bool bit = t.full || ((plan.bits[static_cast<std::size_t>(t.bits_begin + i * words + slot / 64)] >> (slot % 64)) & 1);
        if (!bit) continue;
        const std::int64_t packed = plan.segments[static_cast<std::size_t>(t.seg_begin + slot / detail::k_segment)] + slot % detail::k_segment;
        ASSERT_LT(packed, n) << m.str() << " q " << q << " slot " << slot << " past the sequence";
        const std::int64_t k = plan.packed_token[static_cast<std::size_t>(packed)];
        ASSERT_TRUE(m.allows(0, 0, q, k, n, n)) << m.str() << " q " << q << " k " << k;
        ASSERT_EQ(hit[static_cast<std::size_t>(k)]++, 0) << m.str() << " q " << q << " k " << k << " in two slots";
      }
      for (std::int64_t k = 0; k < n; ++k) {
        const bool allowed = m.allows(0, 0, q, k, n, n);
        ASSERT_EQ(hit[static_cast<std::size_t>(k)] == 1, allowed) << m.str() << " q " << q << " k " << k << " outside its box";
        area += allowed;
      }
    }
  }
  for (std::int64_t q = 0; q < n; ++q) ASSERT_EQ(seen[static_cast<std::size_t>(q)], 1) << m.str() << " query " << q;
  EXPECT_EQ(plan.pairs_allowed, area);
  EXPECT_GE(plan.pairs_computed, area);
}

TEST(GridPlan, BitsAreTheMaskPredicate) {
  for (const grid_case& c : k_cases) expect_plan_exact(mask_of(c), tokens_of(c));
  for (const mask_expr& m : k_halos) expect_plan_exact(m, detail::as_grid_local(m)->tokens());
}

TEST(GridPlan, PicksBoxesNotRasterRows) {
  // 64x64 image, 7x7 window: a box of queries needs far fewer keys than a 64-token raster strip (7 x 64 = 448).
  const mask_expr m = mask_expr::neighborhood({64, 64}, {7, 7});
  const detail::grid_plan plan = detail::plan_grid_tiles(*detail::as_grid_local(m), 64, 6);
  EXPECT_GT(plan.patch[0], 1);
  EXPECT_LE(plan.max_segments * detail::k_segment, 256);
  EXPECT_GT(static_cast<double>(plan.pairs_allowed) / static_cast<double>(plan.pairs_computed), 0.25) << plan.describe();
}

selection selected(const problem& p, const spec& s) {
  problem_data d(p);
  attn_params ap;
  EXPECT_TRUE(make_params(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, d.make_options(backend::cpu, 2), ap).ok());
  return select(ap, backend::cpu);
}

std::string selected_name(const problem& p, const spec& s) { return selected(p, s).name; }

TEST(GridKernel, NeighborhoodsAgainstTheOracle) {
  std::uint64_t seed = 900;
  for (const grid_case& c : k_cases) {
    problem p = test::small_problem(tokens_of(c), tokens_of(c), 4, 2, 24, dtype::f32, causal_mode::none, seed++);
    p.batch = 2;
    spec s;
    s.mask = mask_of(c);
    ASSERT_EQ(selected_name(p, s), "cpu.flash_fwd_grid<f32>") << s.mask.str();
    EXPECT_TRUE(test::check_backend(p, s, backend::cpu, 2)) << s.mask.str();
    problem pb = p;
    pb.type = dtype::bf16;
    pb.dim_qk = pb.dim_v = 17;  // not a multiple of the vector width
    EXPECT_TRUE(test::check_backend(pb, s, backend::cpu, 1)) << s.mask.str() << " bf16";
  }
}

TEST(GridKernel, EveryCompiledTargetAgainstTheOracle) {
  // The register blocking and segment pointers differ per ISA (16 / 8 / 4 / 1 lanes): run each compiled target.
  const grid_case cases[] = {{{7}, {2}, {3}, {false}}, {{9, 13}, {3, 5}, {1, 2}, {true, false}, {1, 2}}, {{3, 4, 37}, {3, 3, 11}, {1, 1, 3}, {false, false, false}}};
  for (const std::int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    std::uint64_t seed = 970;
    for (const grid_case& c : cases) {
      problem p = test::small_problem(tokens_of(c), tokens_of(c), 4, 2, 20, dtype::f32, causal_mode::none, seed++);
      p.dim_v = 73;  // several PV column blocks and a ragged one
      spec s;
      s.mask = mask_of(c);
      ASSERT_EQ(selected_name(p, s), "cpu.flash_fwd_grid<f32>");
      EXPECT_TRUE(test::check_backend(p, s, backend::cpu, 2)) << s.mask.str() << " on " << hwy::TargetName(target);
    }
  }
  hwy::SetSupportedTargetsForTest(0);
}

TEST(GridKernel, NestedCallFromAFunctorLeavesTheOuterCallIntact) {
  // A user score functor that itself calls attention (on the same thread, inside the outer call) must not disturb the
  // outer call's packed K/V, which live in a per-thread reusable buffer.
  problem outer = test::small_problem(300, 300, 2, 2, 32, dtype::f32, causal_mode::bottom_right, 21);
  problem inner = test::small_problem(2048, 2048, 2, 1, 64, dtype::f32, causal_mode::none, 22);
  problem_data inner_data(inner);
  std::atomic<int> nested_calls{0};
  bool nest = true;
  spec s;
  s.score = [&](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t) {
    if (nest && nested_calls.fetch_add(1) == 0) EXPECT_TRUE(run_problem(inner_data, spec{}, backend::cpu, 1).ok());
    return x;
  };
  problem_data with_nested(outer), plain(outer);
  ASSERT_TRUE(run_problem(with_nested, s, backend::cpu, 2).ok());
  EXPECT_EQ(nested_calls.load() > 0, true);
  nest = false;
  ASSERT_TRUE(run_problem(plain, s, backend::cpu, 2).ok());
  EXPECT_TRUE(test::bytes_equal(with_nested.out, plain.out));
}

TEST(GridKernel, AdditionalKeysEveryQuerySees) {
  // NATTEN's additional KV: keys past the grid's tokens that every query attends to, written grid | ~sinks(tokens).
  std::uint64_t seed = 990;
  for (const grid_case& c : {grid_case{{9, 11}, {3, 5}, {1, 2}, {false, false}}, grid_case{{40}, {7}, {1}, {true}}}) {
    const std::int64_t n = tokens_of(c);
    for (const std::int64_t extra : {1, 16, 37}) {
      problem p = test::small_problem(n, n + extra, 4, 2, 24, dtype::f32, causal_mode::none, seed++);
      spec s;
      s.mask = mask_of(c) | ~mask_expr::sinks(n);
      ASSERT_EQ(selected_name(p, s), "cpu.flash_fwd_grid<f32>") << s.mask.str();
      EXPECT_TRUE(test::check_backend(p, s, backend::cpu, 2)) << s.mask.str() << " + " << extra;
      const detail::grid_plan plan = detail::plan_grid_tiles(*detail::as_grid_local(s.mask), 64, 6, extra);
      std::int64_t area = 0;
      for (std::int64_t q = 0; q < n; ++q)
        for (std::int64_t k = 0; k < n + extra; ++k) area += s.mask.allows(0, 0, q, k, n, n + extra);
      EXPECT_EQ(plan.pairs_allowed, area);
    }
  }
  // Global keys inside the grid are not additional keys: the raster path runs them.
  const grid_case c{{8, 8}, {3, 3}, {1, 1}, {false, false}};
  spec s;
  s.mask = mask_of(c) | ~mask_expr::sinks(10);
  problem p = test::small_problem(64, 64, 2, 2, 16, dtype::f32, causal_mode::none, 9);
  EXPECT_EQ(selected_name(p, s), "cpu.flash_fwd<f32>");
  EXPECT_TRUE(test::check_backend(p, s, backend::cpu, 2));
}

TEST(GridKernel, HaloBlocksAgainstTheOracle) {
  std::uint64_t seed = 950;
  for (const mask_expr& m : k_halos) {
    const std::int64_t n = detail::as_grid_local(m)->tokens();
    problem p = test::small_problem(n, n, 4, 1, 20, dtype::f32, causal_mode::none, seed++);
    spec s;
    s.mask = m;
    ASSERT_EQ(selected_name(p, s), "cpu.flash_fwd_grid<f32>") << m.str();
    EXPECT_TRUE(test::check_backend(p, s, backend::cpu, 2)) << m.str();
  }
  // Aligned 8x8 blocks with halo 0 are Swin's window attention: each query's 64 keys are 8 lines of 8, half of the
  // 16-key segments they occupy, so at best half of the computed pairs are allowed; the plan must reach that.
  const mask_expr blocks = mask_expr::halo({16, 16}, {8, 8}, {0, 0});
  const detail::grid_plan plan = detail::plan_grid_tiles(*detail::as_grid_local(blocks), 64, 6);
  EXPECT_EQ(plan.pairs_allowed * 2, plan.pairs_computed) << plan.describe();
}

TEST(GridKernel, SinksRopeGqaAndLayouts) {
  const grid_case c{{12, 15}, {5, 7}, {1, 2}, {false, false}};
  problem p = test::small_problem(180, 180, 6, 2, 32, dtype::f32, causal_mode::none, 77);
  p.lay = layout::bhsd;
  spec s;
  s.mask = mask_of(c);
  const std::vector<float> sinks = {0.5f, -1.0f, 2.0f, 0.0f, 1.0f, -0.5f};
  s.sink_logits = sinks.data();
  rope_spec r;
  s.rope = &r;
  ASSERT_EQ(selected_name(p, s), "cpu.flash_fwd_grid<f32>");
  EXPECT_TRUE(test::check_backend(p, s, backend::cpu, 2));
}

TEST(GridKernel, SameResultAsTheRasterPath) {
  const grid_case c{{20, 21}, {7, 7}, {1, 1}, {false, false}};
  problem p = test::small_problem(420, 420, 2, 2, 64, dtype::f32, causal_mode::none, 5);
  spec s;
  s.mask = mask_of(c);
  problem_data grid(p), raster(p);
  ASSERT_TRUE(run_problem(grid, s, backend::cpu, 2).ok());
  {
    const test::scoped_env off("OMNIATTN_GRID", "0");
    EXPECT_EQ(selected_name(p, s), "cpu.flash_fwd<f32>");
    ASSERT_TRUE(run_problem(raster, s, backend::cpu, 2).ok());
  }
  const test::error_stats e = test::out_error(grid, raster);
  EXPECT_LT(e.max_abs, 1e-5);
}

TEST(GridKernel, FallsBackWithReasons) {
  const grid_case c{{8, 8}, {3, 3}, {1, 1}, {false, false}};
  spec s;
  s.mask = mask_of(c);
  // Cross attention to a different length: not the grid's token count.
  problem cross = test::small_problem(64, 70, 2, 2, 16, dtype::f32, causal_mode::none, 1);
  EXPECT_EQ(selected_name(cross, s), "cpu.flash_fwd<f32>");
  EXPECT_TRUE(test::check_backend(cross, s, backend::cpu, 2));
  // A score modifier sees raster positions: raster path, still exact.
  problem p = test::small_problem(64, 64, 2, 2, 16, dtype::f32, causal_mode::none, 2);
  s.score = scores::softcap(5.0);
  EXPECT_EQ(selected_name(p, s), "cpu.flash_fwd<f32>");
  const selection sel = selected(p, s);
  EXPECT_TRUE(std::any_of(sel.reasons.begin(), sel.reasons.end(),
                          [](const std::string& r) { return r.find("cpu.flash_fwd_grid<f32>: not used: a score modifier") != std::string::npos; }));
  EXPECT_TRUE(test::check_backend(p, s, backend::cpu, 2));
  // spec.causal on top of a neighborhood, and varlen batches of grids: the raster path, still exact.
  s.score = nullptr;
  problem causal = test::small_problem(64, 64, 2, 2, 16, dtype::f32, causal_mode::top_left, 6);
  spec with_causal = s;
  with_causal.causal = causal_mode::top_left;
  EXPECT_EQ(selected_name(causal, with_causal), "cpu.flash_fwd<f32>");
  EXPECT_TRUE(test::check_backend(causal, with_causal, backend::cpu, 2));
  problem packed = test::small_problem(64, 64, 2, 1, 16, dtype::f32, causal_mode::none, 7);
  packed.seqlens_q = packed.seqlens_k = {64, 64};
  packed.batch = 2;
  EXPECT_EQ(selected_name(packed, s), "cpu.flash_fwd<f32>");
  EXPECT_TRUE(test::check_backend(packed, s, backend::cpu, 2));
}

// The run_stats of one CPU call of a grid case.
run_stats stats_of(const grid_case& c, const problem& p, int threads) {
  problem_data d(p);
  spec s;
  s.mask = mask_of(c);
  run_stats st;
  options o = d.make_options(backend::cpu, threads);
  o.stats = &st;
  EXPECT_TRUE(attention(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, o).ok());
  return st;
}

TEST(GridKernel, StatsCountComputedPairsInTileUnits) {
  // kernel = grid: every box computes every key, nothing is skipped and every box is FULL (16 keys a line).
  const run_stats dense = stats_of({{16, 16}, {16, 16}, {1, 1}, {false, false}},
                                   test::small_problem(256, 256, 1, 1, 16, dtype::f32, causal_mode::none, 3), 1);
  EXPECT_EQ(dense.tiles_full, 16);  // (256 / 64)^2 tiles' worth of pairs
  EXPECT_EQ(dense.tiles_partial, 0);
  EXPECT_EQ(dense.tiles_skipped, 0);
  // A 3x3 neighborhood on 32x32: most of the dense problem is skipped, and what is computed matches the plan.
  const grid_case c{{32, 32}, {3, 3}, {1, 1}, {false, false}};
  const run_stats st = stats_of(c, test::small_problem(1024, 1024, 2, 1, 16, dtype::f32, causal_mode::none, 4), 2);
  const detail::grid_plan plan = detail::plan_grid_tiles(*detail::as_grid_local(mask_of(c)), 64, 6);
  EXPECT_EQ(st.tiles_full + st.tiles_partial, (2 * plan.pairs_computed + 4095) / 4096);
  EXPECT_EQ(st.tiles_full + st.tiles_partial + st.tiles_skipped, 2 * 16 * 16);
  EXPECT_GT(st.tiles_skipped, 2 * 16 * 16 * 8 / 10);
}

}  // namespace
}  // namespace omniattn
