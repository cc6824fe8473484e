// Sink logits (an extra logit per head with no value) and the tile statistics that show EMPTY tiles are skipped.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "core/problem.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {


TEST(Sinks, KernelMatchesOracleIncludingFullyMaskedRows) {
  const std::vector<float> sinks = {-1.5f, 0.0f, 2.0f, 5.0f};
  const dtype types[] = {dtype::f32, dtype::bf16, dtype::f16};
  std::uint64_t seed = 1;
  for (dtype t : types)
    for (causal_mode c : {causal_mode::none, causal_mode::bottom_right})
      for (auto [lq, lk] : {std::pair<std::int64_t, std::int64_t>{97, 97}, {130, 61}, {1, 65}}) {
        const problem p = test::small_problem(lq, lk, 4, 2, 48, t, c, seed++);
        spec s;
        s.causal = c;
        s.sink_logits = sinks.data();
        EXPECT_TRUE(test::check_backend(p, s, backend::cpu)) << p.describe();
      }
}

TEST(Sinks, OracleClosedForm) {
  // q = 0: every score is 0, so with a sink z the weights are 1 / (Lk + e^z) and lse = log(Lk + e^z).
  problem p = test::small_problem(3, 5, 1, 1, 4, dtype::f32, causal_mode::none, 7);
  problem_data d(p);
  std::fill(d.q.begin(), d.q.end(), 0);
  const float sink = 1.25f;
  spec s;
  s.sink_logits = &sink;
  ASSERT_TRUE(run_problem(d, s, backend::reference, 1).ok());
  const double denom = 5.0 + std::exp(1.25);
  for (std::int64_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(d.lse[static_cast<std::size_t>(i)], std::log(denom), 1e-6);
    for (std::int64_t e = 0; e < 4; ++e) {
      double sum_v = 0.0;
      for (std::int64_t j = 0; j < 5; ++j) sum_v += reinterpret_cast<const float*>(d.v.data())[j * 4 + e];
      EXPECT_NEAR(d.out_at(0, i, 0, e), sum_v / denom, 1e-6);
    }
  }
}

TEST(Sinks, FullyMaskedRowGivesZeroAndTheSinkAsLse) {
  // Bottom-right causal with Lq > Lk masks the first Lq - Lk rows entirely.
  const problem p = test::small_problem(70, 10, 2, 2, 16, dtype::f32, causal_mode::bottom_right, 3);
  const float sinks[2] = {0.5f, -2.0f};
  for (backend b : {backend::reference, backend::cpu}) {
    problem_data d(p);
    spec s;
    s.causal = p.causal;
    s.sink_logits = sinks;
    ASSERT_TRUE(run_problem(d, s, b, 2).ok());
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t i = 0; i < 60; ++i) {
        EXPECT_FLOAT_EQ(d.lse[static_cast<std::size_t>(h * 70 + i)], sinks[h]) << backend_name(b) << " row " << i;
        for (std::int64_t e = 0; e < 16; ++e) EXPECT_EQ(d.out_at(0, i, h, e), 0.0);
      }
  }
}

TEST(Sinks, NonFiniteSinkIsRejected) {
  const problem p = test::small_problem(8, 8, 2, 2, 8, dtype::f32, causal_mode::none, 1);
  problem_data d(p);
  const float sinks[2] = {0.0f, std::numeric_limits<float>::infinity()};
  spec s;
  s.sink_logits = sinks;
  const status st = run_problem(d, s, backend::cpu, 1);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error.find("[attention] spec.sink_logits[1]"), std::string::npos) << st.error;
}

TEST(TileStats, EmptyTilesAreSkippedAndCountsMatchTheBlockMask) {
  // Sliding window on 1000 tokens: most 64x64 tiles are EMPTY; the kernel must visit exactly the non-empty ones.
  problem p = test::small_problem(1000, 1000, 2, 1, 32, dtype::f32, causal_mode::none, 5);
  problem_data d(p);
  spec s;
  s.mask = mask_expr::window(100, 0, causal_mode::bottom_right) | mask_expr::sinks(4);
  run_stats stats;
  options o = d.make_options(backend::cpu, 2);
  o.stats = &stats;
  ASSERT_TRUE(attention(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, o).ok());
  attn_params ap;
  ASSERT_TRUE(make_params(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, o, ap).ok());
  const block_mask bm = build_block_mask(ap, 64, 64);
  std::int64_t full = 0, partial = 0, empty = 0;
  for (std::int64_t h = 0; h < p.heads_q; ++h)
    for (std::int64_t qt = 0; qt < bm.q_tiles; ++qt)
      for (std::int64_t kt = 0; kt < bm.kv_tiles; ++kt) {
        const tile_kind k = bm.at(0, h, qt, kt);
        (k == tile_kind::full ? full : k == tile_kind::partial ? partial : empty) += 1;
      }
  EXPECT_EQ(stats.tiles_full, full);
  EXPECT_EQ(stats.tiles_partial, partial);
  EXPECT_EQ(stats.tiles_skipped, empty);
  EXPECT_GT(stats.tiles_skipped, 2 * (stats.tiles_full + stats.tiles_partial));  // the window really prunes
  EXPECT_TRUE(test::check_backend(p, s, backend::cpu));
}

}  // namespace
}  // namespace omniattn

namespace omniattn {
namespace {

TEST(ScoreLibrary, T5BucketsFollowTheirDefinition) {
  // Bidirectional, 32 buckets, max distance 128: 8 exact buckets per side, then log-spaced, saturating at 15 / 31.
  EXPECT_EQ(scores::relative_bucket(0, 32, 128, true), 0);
  EXPECT_EQ(scores::relative_bucket(-7, 32, 128, true), 7);
  EXPECT_EQ(scores::relative_bucket(7, 32, 128, true), 16 + 7);
  EXPECT_EQ(scores::relative_bucket(-8, 32, 128, true), 8);
  EXPECT_EQ(scores::relative_bucket(-1000, 32, 128, true), 15);
  EXPECT_EQ(scores::relative_bucket(1000, 32, 128, true), 31);
  EXPECT_EQ(scores::relative_bucket(5, 32, 128, false), 0);  // unidirectional: the future shares bucket 0
  for (std::int64_t r = -200; r < 0; ++r)  // monotone in distance
    EXPECT_GE(scores::relative_bucket(r - 1, 32, 128, true), scores::relative_bucket(r, 32, 128, true));
  EXPECT_THROW(scores::relative_bias({1.0, 2.0, 3.0}, 32, 128, true), std::invalid_argument);
  EXPECT_THROW(scores::logn(1.0), std::invalid_argument);
}

TEST(ScoreLibrary, ModifiersOnTheKernelMatchTheOracle) {
  std::vector<double> table(2 * 16);
  for (std::size_t x = 0; x < table.size(); ++x) table[x] = 0.1 * static_cast<double>(x % 7) - 0.3;
  const score_fn mods[] = {scores::logn(16.0), scores::relative_bias(table, 16, 64, true),
                           scores::then(scores::alibi(scores::alibi_slopes(2)), scores::softcap(5.0))};
  std::uint64_t seed = 90;
  for (const score_fn& f : mods) {
    problem p;
    p.seq_q = 80;
    p.seq_k = 100;
    p.heads_q = 2;
    p.heads_kv = 2;
    p.dim_qk = p.dim_v = 24;
    p.causal = causal_mode::bottom_right;
    p.seed = seed++;
    spec s;
    s.causal = p.causal;
    s.score = f;
    EXPECT_TRUE(test::check_backend(p, s, backend::cpu));
  }
}

}  // namespace
}  // namespace omniattn
