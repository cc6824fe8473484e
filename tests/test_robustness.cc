// Edge cases of valid calls (issue 17): empty problems, rows with no keys, and the kernels against the fp64 oracle on
// them. Rejections of invalid calls are in test_validation.cc.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/problem.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

constexpr float k_neg_inf = -std::numeric_limits<float>::infinity();

// The backends a valid call must run on.
const backend k_backends[2] = {backend::reference, backend::cpu};

// Runs a problem on every backend after poisoning its outputs; checks out == 0 and lse == `lse_want` (per query
// head) for every row when `no_keys`, and the kernel against the oracle always.
void expect_runs(const problem& prob, const spec& s, bool no_keys, const std::vector<float>& lse_want = {}) {
  SCOPED_TRACE(prob.describe());
  for (backend b : k_backends) {
    problem pl = prob;
    pl.lse = true;
    problem_data data(pl);
    std::fill(data.out.begin(), data.out.end(), std::uint8_t{0x7f});
    std::fill(data.lse.begin(), data.lse.end(), 1234.5f);
    const status st = run_problem(data, s, b, 1);
    ASSERT_TRUE(st.ok()) << backend_name(b) << ": " << st.error;
    if (!no_keys) continue;
    const tensor o = data.out_view();
    for (std::int64_t bb = 0; bb < o.batch; ++bb)
      for (std::int64_t i = 0; i < o.seq; ++i)
        for (std::int64_t h = 0; h < o.heads; ++h) {
          for (std::int64_t d = 0; d < o.dim; ++d) ASSERT_EQ(data.out_at(bb, i, h, d), 0.0) << backend_name(b);
          const float l = data.lse[static_cast<std::size_t>((bb * o.heads + h) * o.seq + i)];
          ASSERT_EQ(l, lse_want.empty() ? k_neg_inf : lse_want[static_cast<std::size_t>(h)]) << backend_name(b);
        }
  }
  EXPECT_TRUE(test::check_backend(prob, s, backend::cpu, 1));
}

problem sized(std::int64_t batch, std::int64_t lq, std::int64_t lk, std::int64_t hq, std::int64_t hkv) {
  problem p = test::small_problem(lq, lk, hq, hkv, 16, dtype::f32, causal_mode::none, 3);
  p.batch = batch;
  p.dim_v = 8;
  return p;
}

TEST(ZeroLength, NoQueriesIsANoOp) {
  // Nothing to compute: OK, and the (empty) output is not touched.
  for (const problem& p : {sized(2, 0, 7, 4, 2), sized(0, 5, 7, 4, 2), sized(2, 5, 7, 0, 2), sized(2, 5, 7, 0, 0),
                           sized(0, 0, 0, 0, 0)})
    expect_runs(p, {}, false);
}

TEST(ZeroLength, NoKeysGivesZeroAndMinusInfinity) {
  // Lk = 0: every row has no key, like a fully masked row (PyTorch SDPA gives NaN there, FlashAttention 0).
  spec s;
  expect_runs(sized(2, 5, 0, 4, 2), s, true);
  s.causal = causal_mode::bottom_right;
  expect_runs(sized(2, 70, 0, 4, 2), s, true);  // more than one query tile
  s.causal = causal_mode::none;
  s.mask = mask_expr::window(2, 0, causal_mode::bottom_right) | mask_expr::sinks(1);
  expect_runs(sized(1, 5, 0, 2, 2), s, true);
  // A neighborhood over an 8-token grid: its rules are about the grid, not the call's lengths.
  s.mask = mask_expr::neighborhood({8}, {3});
  expect_runs(sized(1, 8, 0, 2, 1), s, true);
  expect_runs(sized(1, 0, 8, 2, 1), s, false);
  // Score modifiers see no key.
  s.mask = {};
  s.score = scores::then(scores::alibi({0.5}, 3), scores::softcap(10));
  expect_runs(sized(1, 5, 0, 2, 2), s, true);
  // Sink logits still join every row's normalizer: out 0, lse = sink.
  const std::vector<float> sinks = {0.5f, -1.25f};
  s = {};
  s.sink_logits = sinks.data();
  expect_runs(sized(1, 5, 0, 2, 1), s, true, sinks);
}

TEST(ZeroLength, BlockMaskWithNoKeyTiles) {
  block_mask bm;
  bm.q_tile = 2;
  bm.kv_tile = 4;
  bm.batch = bm.heads = 1;
  bm.q_tiles = 3;
  bm.kv_tiles = 0;
  spec s;
  s.blocks = &bm;
  expect_runs(sized(2, 5, 0, 4, 2), s, true);
  bm.q_tiles = 0;
  bm.kv_tiles = 2;
  expect_runs(sized(2, 0, 7, 4, 2), s, false);
}

TEST(ZeroLength, VarlenEmptySequences) {
  // cu_seqlens with repeated entries: sequences without queries, without keys, or both, between normal ones.
  problem p = sized(1, 0, 0, 4, 2);
  p.seqlens_q = {3, 0, 70, 0, 2};
  p.seqlens_k = {0, 4, 65, 0, 9};
  p.batch = 5;
  for (causal_mode c : {causal_mode::none, causal_mode::bottom_right}) {
    p.causal = c;
    EXPECT_TRUE(test::check_backend(p, {}, backend::cpu, 1));
    problem_data data(p);
    ASSERT_TRUE(run_problem(data, {}, backend::cpu, 1).ok());
    for (std::int64_t i = 0; i < 3; ++i)  // sequence 0: three queries, no key
      for (std::int64_t h = 0; h < 4; ++h) {
        for (std::int64_t d = 0; d < p.dim_v; ++d) EXPECT_EQ(data.out_at(0, i, h, d), 0.0);
        EXPECT_EQ(data.lse[static_cast<std::size_t>(h * 75 + i)], k_neg_inf);
      }
  }
  // Every sequence empty.
  p.seqlens_q = {0, 0};
  p.seqlens_k = {0, 0};
  p.batch = 2;
  expect_runs(p, {}, false);
  p.seqlens_q = {0, 0};
  p.seqlens_k = {3, 0};
  expect_runs(p, {}, false);
}

}  // namespace
}  // namespace omniattn
