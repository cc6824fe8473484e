// The fused CPU backend (backend::cpu) against the fp64 oracle under the tolerance policy of tolerance.h, plus
// thread-count determinism, kernel selection, block-mask construction and mask_area.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/problem.h"
#include "cpu/bf16_dot.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

using test::check_backend;

problem make_problem(std::int64_t b, std::int64_t lq, std::int64_t lk, std::int64_t hq, std::int64_t hkv, std::int64_t d,
                     std::int64_t dv, dtype t = dtype::f32, causal_mode c = causal_mode::none, std::uint64_t seed = 1) {
  problem p;
  p.batch = b;
  p.seq_q = lq;
  p.seq_k = lk;
  p.heads_q = hq;
  p.heads_kv = hkv;
  p.dim_qk = d;
  p.dim_v = dv;
  p.type = t;
  p.causal = c;
  p.seed = seed;
  return p;
}

spec spec_of(const problem& p) {
  spec s;
  s.causal = p.causal;
  s.scale = p.scale;
  return s;
}

// Functors used by the sweeps: plain functions of their arguments (as spec.h requires).
bool sweep_mask(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
  // A band (whole tiles become EMPTY far from the diagonal), a sparse pattern inside it, and one fully masked row in
  // every 37.
  return (i - j <= 70 && j - i <= 90) && (i + 2 * j + h + b) % 7 != 3 && i % 37 != 5;
}

double sweep_score(double s, std::int64_t, std::int64_t h, std::int64_t i, std::int64_t j) {
  // Tanh soft-capping plus an ALiBi-like head-dependent distance bias; -inf for one key in every 29 (masking by score).
  if ((i + j) % 29 == 11) return -std::numeric_limits<double>::infinity();
  return 8.0 * std::tanh(s / 8.0) - 0.02 * static_cast<double>(h + 1) * std::fabs(static_cast<double>(i - j));
}

// ------------------------------------------------------------------------------------------------------------------
// The seeded random sweep: every value of every axis is covered; combinations are random.

struct sweep_case {
  problem p;
  int functor = 0;  // 0 none, 1 mask, 2 score, 3 both
  int threads = 1;
};

std::vector<sweep_case> make_sweep(std::uint64_t seed, std::size_t n) {
  std::mt19937_64 rng(seed);
  const auto dtypes = test::covering_sequence<dtype>({dtype::f32, dtype::bf16, dtype::f16}, n, rng);
  const auto dims = test::covering_sequence<std::int64_t>({1, 17, 32, 63, 64, 80, 96, 128, 200, 256}, n, rng);
  const auto ratios = test::covering_sequence<int>({1, 2, 4, 0}, n, rng);  // 0 = MQA
  const auto causals = test::covering_sequence<causal_mode>(
      {causal_mode::none, causal_mode::top_left, causal_mode::bottom_right}, n, rng);
  const std::vector<std::int64_t> sizes = {1, 2, 7, 31, 63, 64, 65, 127, 128, 129};
  const auto lqs = test::covering_sequence(sizes, n, rng);
  const auto lks = test::covering_sequence(sizes, n, rng);
  const auto dvs = test::covering_sequence<std::int64_t>({0, 0, 8, 17, 64, 96, 160}, n, rng);  // 0 = same as dim_qk
  const auto layouts = test::covering_sequence<layout>({layout::bshd, layout::bhsd}, n, rng);
  const auto varlens = test::covering_sequence<int>({0, 0, 1}, n, rng);
  const auto functors = test::covering_sequence<int>({0, 0, 1, 2, 3}, n, rng);
  const auto out_f32 = test::covering_sequence<int>({0, 0, 0, 1}, n, rng);
  const auto batches = test::covering_sequence<std::int64_t>({1, 2}, n, rng);
  const auto threads = test::covering_sequence<int>({1, 2}, n, rng);
  std::vector<sweep_case> cases;
  for (std::size_t c = 0; c < n; ++c) {
    sweep_case sc;
    problem& p = sc.p;
    p.type = dtypes[c];
    p.dim_qk = dims[c];
    p.dim_v = dvs[c] == 0 ? dims[c] : dvs[c];
    p.heads_kv = ratios[c] == 0 ? 1 : 2;
    p.heads_q = ratios[c] == 0 ? 4 : 2 * ratios[c];
    p.causal = causals[c];
    p.seq_q = lqs[c];
    p.seq_k = lks[c];
    p.lay = layouts[c];
    p.out_f32 = out_f32[c] != 0 && p.type != dtype::f32;
    p.batch = batches[c];
    p.seed = seed * 1000 + c;
    if (varlens[c]) {
      // Three sequences, two of them with an empty side.
      p.seqlens_q = {p.seq_q, 0, std::max<std::int64_t>(1, p.seq_k / 3)};
      p.seqlens_k = {p.seq_k, std::max<std::int64_t>(1, p.seq_q / 2), 0};
      p.batch = 3;
    }
    sc.functor = functors[c];
    sc.threads = threads[c];
    cases.push_back(sc);
  }
  return cases;
}

spec sweep_spec(const sweep_case& c) {
  spec s = spec_of(c.p);
  if (c.functor & 1) s.mask = sweep_mask;
  if (c.functor & 2) s.score = sweep_score;
  return s;
}

TEST(Kernel, SeededRandomSweep) {
  const std::size_t n = test::full_intensity() ? 240 : 30;
  const auto cases = make_sweep(2024, n);
  for (const sweep_case& c : cases) {
    SCOPED_TRACE(testing::Message() << c.p.describe() << " functor=" << c.functor << " threads=" << c.threads);
    EXPECT_TRUE(check_backend(c.p, sweep_spec(c), backend::cpu, c.threads));
  }
}

TEST(Kernel, SeededRandomSweepOnEveryTarget) {
  // A different slice of the sweep per target, so every target meets every dtype and functor kind.
  std::uint64_t seed = 3100;
  test::for_each_target("Kernel.SeededRandomSweepOnEveryTarget", [&](const char* target) {
    for (const sweep_case& c : make_sweep(seed++, test::full_intensity() ? 40 : 10)) {
      SCOPED_TRACE(testing::Message() << target << ": " << c.p.describe() << " functor=" << c.functor << " threads=" << c.threads);
      EXPECT_TRUE(check_backend(c.p, sweep_spec(c), backend::cpu, c.threads));
    }
    // The built-in score modifiers run vectorized per target too.
    for (const char* score : {"alibi + softcap(30)", "temperature(0.7) + logn(64)"}) {
      problem p = test::small_problem(70, 131, 4, 2, 40, dtype::bf16, causal_mode::bottom_right, seed++);
      ASSERT_TRUE(set_problem_score(p, score).ok());
      EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2)) << target << ": " << score;
    }
  });
}

TEST(Kernel, SweepCoversEveryAxisValue) {
  // The sweep's promise: every dtype, head dim, GQA ratio and causal mode appears (a guard on make_sweep itself).
  const auto cases = make_sweep(2024, 30);
  std::vector<std::int64_t> dims;
  int dt[3] = {}, cm[3] = {}, mqa = 0, varlen = 0;
  for (const auto& c : cases) {
    dims.push_back(c.p.dim_qk);
    ++dt[static_cast<int>(c.p.type)];
    ++cm[static_cast<int>(c.p.causal)];
    mqa += c.p.heads_kv == 1;
    varlen += c.p.is_varlen();
  }
  for (std::int64_t d : {1, 17, 32, 63, 64, 80, 96, 128, 200, 256}) EXPECT_NE(std::count(dims.begin(), dims.end(), d), 0) << d;
  for (int x : dt) EXPECT_GT(x, 0);
  for (int x : cm) EXPECT_GT(x, 0);
  EXPECT_GT(mqa, 0);
  EXPECT_GT(varlen, 0);
}

// ------------------------------------------------------------------------------------------------------------------
// Targeted shapes.

TEST(Kernel, TileBoundarySizes) {
  test::for_each_target("Kernel.TileBoundarySizes", [&](const char* target) {
    SCOPED_TRACE(target);
    // Tile = 64: every combination of sizes around one and two tiles, each causal mode.
    const std::vector<std::int64_t> sizes = {1, 63, 64, 65, 127, 128, 129};
    const std::vector<dtype> types = test::full_intensity() ? std::vector<dtype>{dtype::f32, dtype::bf16, dtype::f16}
                                                            : std::vector<dtype>{dtype::f32};
    std::uint64_t seed = 100;
    for (dtype t : types)
      for (std::int64_t lq : sizes)
        for (std::int64_t lk : sizes)
          for (causal_mode c : {causal_mode::none, causal_mode::top_left, causal_mode::bottom_right}) {
            const problem p = make_problem(1, lq, lk, 1, 1, 32, 32, t, c, ++seed);
            EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
          }
  });
}

TEST(Kernel, EveryHeadDimEveryDtype) {
  test::for_each_target("Kernel.EveryHeadDimEveryDtype", [&](const char* target) {
    SCOPED_TRACE(target);
    std::uint64_t seed = 200;
    for (dtype t : {dtype::f32, dtype::bf16, dtype::f16})
      for (std::int64_t d : {1, 17, 32, 63, 64, 80, 96, 128, 200, 256}) {
        const problem p = make_problem(1, 67, 71, 2, 1, d, d, t, causal_mode::bottom_right, ++seed);
        EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
      }
  });
}


TEST(Kernel, DimVDiffersFromDimQk) {
  test::for_each_target("Kernel.DimVDiffersFromDimQk", [&](const char* target) {
    SCOPED_TRACE(target);
    std::uint64_t seed = 400;
    for (auto [d, dv] : std::vector<std::pair<std::int64_t, std::int64_t>>{{1, 200}, {32, 80}, {96, 17}, {64, 1}, {256, 64}, {17, 512}}) {
      const problem p = make_problem(2, 66, 65, 4, 2, d, dv, dtype::f32, causal_mode::top_left, ++seed);
      EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
    }
  });
}

TEST(Kernel, GqaRatiosAndMqa) {
  test::for_each_target("Kernel.GqaRatiosAndMqa", [&](const char* target) {
    SCOPED_TRACE(target);
    std::uint64_t seed = 500;
    for (auto [hq, hkv] : std::vector<std::pair<std::int64_t, std::int64_t>>{{3, 3}, {4, 2}, {8, 2}, {6, 1}, {5, 1}})
      for (causal_mode c : {causal_mode::none, causal_mode::bottom_right}) {
        const problem p = make_problem(2, 70, 130, hq, hkv, 40, 24, dtype::bf16, c, ++seed);
        EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
      }
  });
}

TEST(Kernel, VarlenWithEmptySequences) {
  test::for_each_target("Kernel.VarlenWithEmptySequences", [&](const char* target) {
    SCOPED_TRACE(target);
    std::uint64_t seed = 600;
    for (causal_mode c : {causal_mode::none, causal_mode::top_left, causal_mode::bottom_right}) {
      problem p = make_problem(5, 0, 0, 4, 2, 32, 48, dtype::f16, c, ++seed);
      p.seqlens_q = {0, 5, 70, 0, 129, 1};
      p.seqlens_k = {3, 0, 65, 0, 200, 64};
      p.batch = 6;
      EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
      p.lay = layout::bhsd;
      EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 1));
    }
  });
}

TEST(Kernel, BhsdLayout) {
  test::for_each_target("Kernel.BhsdLayout", [&](const char* target) {
    SCOPED_TRACE(target);
    std::uint64_t seed = 700;
    for (dtype t : {dtype::f32, dtype::bf16}) {
      problem p = make_problem(2, 100, 77, 4, 4, 64, 64, t, causal_mode::top_left, ++seed);
      p.lay = layout::bhsd;
      EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
    }
  });
}

TEST(Kernel, MaskFunctor) {
  std::uint64_t seed = 800;
  for (causal_mode c : {causal_mode::none, causal_mode::bottom_right}) {
    const problem p = make_problem(2, 150, 140, 2, 1, 32, 32, dtype::f32, c, ++seed);
    spec s = spec_of(p);
    s.mask = sweep_mask;
    EXPECT_TRUE(check_backend(p, s, backend::cpu, 2));
  }
}

TEST(Kernel, ScoreFunctor) {
  std::uint64_t seed = 900;
  for (causal_mode c : {causal_mode::none, causal_mode::top_left}) {
    problem p = make_problem(1, 130, 66, 4, 2, 48, 48, dtype::bf16, c, ++seed);
    p.input_range = 3.0;
    spec s = spec_of(p);
    s.score = sweep_score;
    EXPECT_TRUE(check_backend(p, s, backend::cpu, 2));
  }
}

TEST(Kernel, UserBlockMask) {
  // A user block mask with tiles that do not match the kernel's (16 x 24), random kinds per head, and a mask functor
  // for the PARTIAL tiles.
  problem p = make_problem(2, 100, 90, 2, 2, 16, 16, dtype::f32, causal_mode::none, 1000);
  block_mask bm;
  bm.q_tile = 16;
  bm.kv_tile = 24;
  bm.batch = 1;
  bm.heads = 2;
  bm.q_tiles = (100 + 15) / 16;
  bm.kv_tiles = (90 + 23) / 24;
  std::mt19937_64 rng(1000);
  for (std::int64_t n = 0; n < bm.heads * bm.q_tiles * bm.kv_tiles; ++n) bm.kinds.push_back(static_cast<tile_kind>(rng() % 3));
  spec s = spec_of(p);
  s.blocks = &bm;
  s.mask = [](std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) { return (i * 3 + j) % 4 != 0; };
  EXPECT_TRUE(check_backend(p, s, backend::cpu, 2));
  s.causal = causal_mode::bottom_right;
  EXPECT_TRUE(check_backend(p, s, backend::cpu, 2));
}

TEST(Kernel, FullyMaskedRows) {
  test::for_each_target("Kernel.FullyMaskedRows", [&](const char* target) {
    SCOPED_TRACE(target);
    // Bottom-right with Lq > Lk: the first Lq - Lk rows see nothing, including whole 64-row tiles.
    {
      const problem p = make_problem(1, 200, 70, 2, 1, 32, 32, dtype::bf16, causal_mode::bottom_right, 1100);
      EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
      problem_data d(p);
      ASSERT_TRUE(run_problem(d, spec_of(p), backend::cpu, 2).ok());
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t i = 0; i < 200; ++i) {
          const float l = d.lse[static_cast<std::size_t>(h * 200 + i)];
          if (i < 130) {
            EXPECT_EQ(l, -std::numeric_limits<float>::infinity()) << i;
            for (std::int64_t x = 0; x < 32; ++x) ASSERT_EQ(d.out_at(0, i, h, x), 0.0) << i;
          } else {
            EXPECT_TRUE(std::isfinite(l)) << i;
          }
        }
    }
    // A mask that leaves rows, a whole head and the rows of a PARTIAL tile empty.
    {
      const problem p = make_problem(2, 130, 100, 3, 3, 16, 16, dtype::f32, causal_mode::none, 1101);
      spec s = spec_of(p);
      s.mask = [](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
        return !(b == 1 && h == 2) && i % 3 != 0 && (j < 60 || i > 70);
      };
      EXPECT_TRUE(check_backend(p, s, backend::cpu, 2));
    }
    // A score that returns -inf for every key of some rows.
    {
      const problem p = make_problem(1, 70, 70, 1, 1, 8, 8, dtype::f16, causal_mode::top_left, 1102);
      spec s = spec_of(p);
      s.score = [](double x, std::int64_t, std::int64_t, std::int64_t i, std::int64_t) {
        return i % 5 == 0 ? -std::numeric_limits<double>::infinity() : x;
      };
      EXPECT_TRUE(check_backend(p, s, backend::cpu, 2));
    }
  });
}

TEST(Kernel, SharpSoftmaxAndLargeScores) {
  std::uint64_t seed = 1200;
  for (double range : {4.0, 16.0}) {
    problem p = make_problem(1, 65, 129, 2, 1, 64, 64, dtype::f32, causal_mode::none, ++seed);
    p.input_range = range;
    EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
  }
  problem p = make_problem(1, 33, 100, 1, 1, 16, 16, dtype::bf16, causal_mode::top_left, ++seed);
  p.scale = 30.0;
  EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
}

TEST(Kernel, F32OutputWithLowPrecisionInputs) {
  std::uint64_t seed = 1300;
  for (dtype t : {dtype::bf16, dtype::f16}) {
    problem p = make_problem(2, 65, 64, 2, 2, 80, 80, t, causal_mode::bottom_right, ++seed);
    p.out_f32 = true;
    EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
  }
}

TEST(Kernel, LseIsOptionalAndDoesNotChangeTheOutput) {
  problem p = make_problem(1, 70, 90, 2, 1, 32, 32, dtype::f32, causal_mode::top_left, 1400);
  problem_data with(p);
  p.lse = false;
  problem_data without(p);
  std::fill(without.lse.begin(), without.lse.end(), 42.0f);
  ASSERT_TRUE(run_problem(with, spec_of(p), backend::cpu, 2).ok());
  ASSERT_TRUE(run_problem(without, spec_of(p), backend::cpu, 2).ok());
  EXPECT_TRUE(test::bytes_equal(with.out, without.out));
  for (float l : without.lse) EXPECT_EQ(l, 42.0f);
}

TEST(Kernel, StridedViewsBroadcastAndStridedLse) {
  test::for_each_target("Kernel.StridedViewsBroadcastAndStridedLse", [&](const char* target) {
    SCOPED_TRACE(target);
    // Padded rows in q and out, K/V broadcast over the batch with stride 0, LSE with gaps: only addressing changes, so
    // the result must equal, bit for bit, the cpu result on contiguous copies.
    for (dtype t : {dtype::f32, dtype::bf16}) {
      const std::int64_t b = 3, lq = 70, lk = 65, hq = 4, hkv = 2, d = 24, dv = 20, pad = 5;
      problem p = make_problem(b, lq, lk, hq, hkv, d, dv, t, causal_mode::bottom_right, 2000);
      problem_data ref(p);
      // Make K/V of every batch a copy of batch 0 in the contiguous problem.
      const std::size_t es = static_cast<std::size_t>(dtype_size(t));
      const std::size_t kbatch = static_cast<std::size_t>(lk * hkv * d) * es, vbatch = static_cast<std::size_t>(lk * hkv * dv) * es;
      for (std::int64_t x = 1; x < b; ++x) {
        std::copy(ref.k.begin(), ref.k.begin() + static_cast<std::ptrdiff_t>(kbatch), ref.k.begin() + static_cast<std::ptrdiff_t>(x * kbatch));
        std::copy(ref.v.begin(), ref.v.begin() + static_cast<std::ptrdiff_t>(vbatch), ref.v.begin() + static_cast<std::ptrdiff_t>(x * vbatch));
      }
      ASSERT_TRUE(run_problem(ref, spec_of(p), backend::cpu, 2).ok());

      // Strided copies.
      std::vector<std::uint8_t> q(static_cast<std::size_t>(b * lq * (hq * d + pad)) * es), o(static_cast<std::size_t>(b * lq * (hq * dv + pad)) * es, 0xee);
      tensor qv{q.data(), t, b, lq, hq, d, lq * (hq * d + pad), hq * d + pad, d, 1};
      tensor ov{o.data(), t, b, lq, hq, dv, lq * (hq * dv + pad), hq * dv + pad, dv, 1};
      const tensor src = ref.q_view();
      for (std::int64_t x = 0; x < b; ++x)
        for (std::int64_t i = 0; i < lq; ++i)
          std::memcpy(q.data() + static_cast<std::size_t>(x * qv.stride_batch + i * qv.stride_seq) * es,
                      static_cast<const std::uint8_t*>(src.data) + static_cast<std::size_t>(x * src.stride_batch + i * src.stride_seq) * es,
                      static_cast<std::size_t>(hq * d) * es);
      tensor kv = ref.k_view(), vv = ref.v_view();
      kv.stride_batch = 0;
      vv.stride_batch = 0;
      std::vector<float> lse(static_cast<std::size_t>(b * hq * lq * 2), 7.0f);
      const lse_tensor l{lse.data(), 2 * hq * lq, 2 * lq, 2};
      options opt;
      opt.use = backend::cpu;
      opt.threads = 2;
      opt.lse = &l;
      const status st = attention(qv, kv, vv, ov, spec_of(p), opt);
      ASSERT_TRUE(st.ok()) << st.error;
      for (std::int64_t x = 0; x < b; ++x)
        for (std::int64_t i = 0; i < lq; ++i) {
          const std::uint8_t* got = o.data() + static_cast<std::size_t>(x * ov.stride_batch + i * ov.stride_seq) * es;
          const std::uint8_t* want = ref.out.data() + static_cast<std::size_t>((x * lq + i) * hq * dv) * es;
          ASSERT_EQ(std::memcmp(got, want, static_cast<std::size_t>(hq * dv) * es), 0) << dtype_name(t) << " b=" << x << " i=" << i;
          for (std::size_t e = static_cast<std::size_t>(hq * dv) * es; e < static_cast<std::size_t>(hq * dv + pad) * es; ++e)
            ASSERT_EQ(got[e], 0xee) << "padding written";
          for (std::int64_t h = 0; h < hq; ++h) {
            const std::size_t at = static_cast<std::size_t>(x * 2 * hq * lq + h * 2 * lq + 2 * i);
            EXPECT_EQ(std::memcmp(&lse[at], &ref.lse[static_cast<std::size_t>((x * hq + h) * lq + i)], 4), 0);
            EXPECT_EQ(lse[at + 1], 7.0f) << "lse gap written";
          }
        }
    }
  });
}

// ------------------------------------------------------------------------------------------------------------------
// Determinism: the thread count does not change a single bit.

TEST(Kernel, ThreadCountDoesNotChangeResults) {
  std::vector<std::pair<problem, int>> cases;  // problem, functor
  cases.push_back({make_problem(2, 200, 190, 4, 4, 64, 64, dtype::f32, causal_mode::top_left, 1500), 0});
  cases.push_back({make_problem(1, 257, 129, 8, 2, 96, 96, dtype::bf16, causal_mode::bottom_right, 1501), 0});
  cases.push_back({make_problem(1, 130, 300, 6, 1, 32, 17, dtype::f16, causal_mode::none, 1502), 3});
  problem v = make_problem(1, 0, 0, 4, 2, 40, 40, dtype::f32, causal_mode::bottom_right, 1503);
  v.seqlens_q = {65, 0, 130, 7};
  v.seqlens_k = {200, 3, 70, 0};
  v.batch = 4;
  cases.push_back({v, 1});
  for (const char* dot : {"0", "1"}) {  // both cpu kernels (the bf16 dot product only for bf16, where available)
    const test::scoped_env env("OMNIATTN_BF16_DOT", dot);
    for (const auto& [p, f] : cases) {
      if (dot[0] == '1' && p.type != dtype::bf16) continue;
      sweep_case sc{p, f, 1};
      const spec s = sweep_spec(sc);
      problem_data one(p), two(p), three(p);
      ASSERT_TRUE(run_problem(one, s, backend::cpu, 1).ok());
      ASSERT_TRUE(run_problem(two, s, backend::cpu, 2).ok());
      ASSERT_TRUE(run_problem(three, s, backend::cpu, 3).ok());
      EXPECT_TRUE(test::bytes_equal(one.out, two.out)) << p.describe() << " bf16dot=" << dot;
      EXPECT_TRUE(test::bytes_equal(one.lse, two.lse)) << p.describe() << " bf16dot=" << dot;
      EXPECT_TRUE(test::bytes_equal(one.out, three.out)) << p.describe() << " bf16dot=" << dot;
      EXPECT_TRUE(test::bytes_equal(one.lse, three.lse)) << p.describe() << " bf16dot=" << dot;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Selection.

attn_params params_of(const problem_data& d, const spec& s, backend b, int threads) {
  attn_params ap;
  options o = d.make_options(b, threads);
  const lse_tensor l = d.lse_view();
  o.lse = &l;
  const status st = make_params(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, o, ap);
  EXPECT_TRUE(st.ok()) << st.error;
  return ap;
}

bool any_reason_contains(const selection& sel, const std::string& needle) {
  return std::any_of(sel.reasons.begin(), sel.reasons.end(), [&](const std::string& r) { return r.find(needle) != std::string::npos; });
}

TEST(Kernel, AutomaticBackendSelectsTheCpuKernel) {
  const test::scoped_env plain("OMNIATTN_BF16_DOT", "0");  // the fp32-FMA kernel for every dtype
  for (dtype t : {dtype::f32, dtype::bf16, dtype::f16}) {
    const problem p = make_problem(1, 70, 80, 2, 1, 64, 64, t, causal_mode::top_left, 1600);
    problem_data d(p);
    const attn_params ap = params_of(d, spec_of(p), backend::automatic, 2);
    const selection sel = select(ap, backend::automatic);
    ASSERT_TRUE(sel.ok());
    EXPECT_EQ(sel.name, std::string("cpu.flash_fwd<") + dtype_name(t) + ">");
    EXPECT_NE(sel.run, &reference_attention);
    // And attention() with backend::automatic runs exactly that kernel: bitwise the same as backend::cpu.
    problem_data a(p), c(p);
    ASSERT_TRUE(run_problem(a, spec_of(p), backend::automatic, 2).ok());
    ASSERT_TRUE(run_problem(c, spec_of(p), backend::cpu, 2).ok());
    EXPECT_TRUE(test::bytes_equal(a.out, c.out));
    EXPECT_TRUE(test::bytes_equal(a.lse, c.lse));
  }
}

TEST(Kernel, SelectCpuGivesReasons) {
  const test::scoped_env plain("OMNIATTN_BF16_DOT", "0");
  problem p = make_problem(1, 70, 80, 2, 1, 64, 64, dtype::bf16, causal_mode::top_left, 1700);
  problem_data d(p);
  spec s = spec_of(p);
  s.mask = sweep_mask;
  s.score = sweep_score;
  const attn_params ap = params_of(d, s, backend::cpu, 2);
  const selection sel = select(ap, backend::cpu);
  ASSERT_TRUE(sel.ok());
  EXPECT_EQ(sel.name, "cpu.flash_fwd<bf16>");
  ASSERT_FALSE(sel.reasons.empty());
  EXPECT_TRUE(any_reason_contains(sel, "mask functor"));
  EXPECT_TRUE(any_reason_contains(sel, "score functor"));
  EXPECT_TRUE(any_reason_contains(sel, "widened"));
  // Why the bf16 dot product is not used depends on the CPU: the override where it has AVX512-BF16, else its absence.
  EXPECT_TRUE(any_reason_contains(sel, cpu::has_bf16_dot() ? "OMNIATTN_BF16_DOT=0" : "no AVX512-BF16 on this CPU"));
  // The kernel list is walked in order: the kernels before the chosen one say why they did not fit, first.
  ASSERT_GE(sel.reasons.size(), 3u);
  EXPECT_EQ(sel.reasons[0].rfind("cpu.flash_fwd_grid<bf16>: not used: ", 0), 0u) << sel.reasons[0];
  EXPECT_EQ(sel.reasons[1].rfind("cpu.flash_fwd<bf16,bf16dot>: not used: ", 0), 0u) << sel.reasons[1];
  EXPECT_EQ(sel.reasons[2].rfind("cpu.flash_fwd<bf16>: ", 0), 0u) << sel.reasons[2];
  const selection ref = select(ap, backend::reference);
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(ref.name, "reference");
  EXPECT_EQ(ref.run, &reference_attention);
  EXPECT_FALSE(ref.reasons.empty());
  // f32 inputs never take the bf16 dot product; neither does a reason claim they were widened.
  problem pf = p;
  pf.type = dtype::f32;
  problem_data df(pf);
  const selection f = select(params_of(df, spec_of(pf), backend::cpu, 1), backend::cpu);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f.name, "cpu.flash_fwd<f32>");
  EXPECT_FALSE(any_reason_contains(f, "widened"));
  EXPECT_TRUE(any_reason_contains(f, "1 thread(s)"));
  // The ISA that will run is named, and follows dispatch (here pinned to each compiled target in turn).
  test::for_each_target("Kernel.SelectCpuGivesReasons", [&](const char* target) {
    EXPECT_TRUE(any_reason_contains(select(params_of(df, spec_of(pf), backend::cpu, 1), backend::cpu), std::string("ISA ") + target))
        << target;
  });
}

TEST(Kernel, SelectHonoursTheBf16DotOverride) {
  const test::scoped_env force("OMNIATTN_BF16_DOT", "1");
  const problem p = make_problem(1, 70, 80, 2, 1, 64, 64, dtype::bf16, causal_mode::top_left, 1701);
  problem_data d(p);
  const selection sel = select(params_of(d, spec_of(p), backend::cpu, 2), backend::cpu);
  ASSERT_TRUE(sel.ok());
  if (sel.name == "cpu.flash_fwd<bf16,bf16dot>") {
    EXPECT_TRUE(any_reason_contains(sel, "OMNIATTN_BF16_DOT=1"));
    EXPECT_TRUE(any_reason_contains(sel, "P rounded to bf16"));
  } else {
    EXPECT_EQ(sel.name, "cpu.flash_fwd<bf16>");
    EXPECT_TRUE(any_reason_contains(sel, "no AVX512-BF16")) << "the override was ignored on a CPU that has the ISA";
  }
  // f16 never uses it.
  problem ph = p;
  ph.type = dtype::f16;
  problem_data dh(ph);
  EXPECT_EQ(select(params_of(dh, spec_of(ph), backend::cpu, 2), backend::cpu).name, "cpu.flash_fwd<f16>");
}

// The bf16 dot-product kernel (forced with OMNIATTN_BF16_DOT=1; the plain kernel where the CPU lacks AVX512-BF16)
// under the same tolerance policy, bf16 output.
TEST(Kernel, Bf16DotKernelWithBf16Output) {
  const test::scoped_env force("OMNIATTN_BF16_DOT", "1");
  std::uint64_t seed = 1750;
  for (std::int64_t d : {1, 17, 64, 96, 128, 256})
    for (causal_mode c : {causal_mode::none, causal_mode::bottom_right}) {
      const problem p = make_problem(1, 129, 65, 4, 2, d, d == 17 ? 40 : d, dtype::bf16, c, ++seed);
      EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
    }
  problem v = make_problem(1, 0, 0, 2, 1, 32, 32, dtype::bf16, causal_mode::top_left, ++seed);
  v.seqlens_q = {65, 0, 7};
  v.seqlens_k = {63, 5, 0};
  v.batch = 3;
  spec s = spec_of(v);
  s.mask = sweep_mask;
  EXPECT_TRUE(check_backend(v, s, backend::cpu, 2));
}

// BUG (src/cpu/flash_fwd.cc, select(): `bf16_dot = dot.use` ignores p.out_type): with bf16 inputs and an f32 output
// the bf16 dot-product kernel rounds P to bf16 before PV, so its error is ~2^-9 relative (~4e-4 here) while the
// naive f32 path's is ~1e-7: thousands of times over the 2x-naive policy. It is chosen whenever the CPU probe
// favours it (or OMNIATTN_BF16_DOT=1); an f32 output asks for f32 accuracy, so select() should keep the fp32 kernel
// there (or the kernel keep P in f32 for PV).
TEST(Kernel, Bf16DotKernelWithF32Output) {
  const test::scoped_env force("OMNIATTN_BF16_DOT", "1");
  problem p = make_problem(1, 65, 64, 2, 2, 80, 80, dtype::bf16, causal_mode::bottom_right, 1780);
  p.out_f32 = true;
  EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2));
}

TEST(Kernel, HeadDimsPastTheRegisterPlanRunOnTheKernel) {
  // The absorbed-MLA decode shape (576 / 512), dims that are not multiples of any vector width, and dim_v > dim_qk:
  // the CPU kernel serves all of them, on every target.
  struct dims {
    std::int64_t dqk, dv;
    causal_mode c;
  };
  std::uint64_t seed = 1800;
  test::for_each_target("Kernel.HeadDimsPastTheRegisterPlanRunOnTheKernel", [&](const char* target) {
    for (const dims x : {dims{576, 512, causal_mode::bottom_right}, dims{513, 600, causal_mode::none}, dims{1000, 17, causal_mode::top_left}}) {
      const problem p = make_problem(1, 9, 70, 4, 1, x.dqk, x.dv, dtype::bf16, x.c, ++seed);
      problem_data d(p);
      const selection sel = select(params_of(d, spec_of(p), backend::automatic, 2), backend::automatic);
      EXPECT_EQ(sel.name.rfind("cpu.flash_fwd<bf16", 0), 0u) << target << ": " << sel.name;
      EXPECT_TRUE(check_backend(p, spec_of(p), backend::cpu, 2)) << target << ": " << x.dqk << "/" << x.dv;
    }
  });
}

TEST(Kernel, SizesTheMachineCannotServeAreRefusedNotAllocated) {
  // K/V broadcast (stride 0) to 2^33 and 2^40 keys: no input memory, but the kernel would pack terabytes. select()
  // refuses before allocating; backend::cpu fails with the reason; automatic says it falls back, and with
  // allow_fallback = false fails instead. Nothing is run (the oracle would take days), so only selection and
  // validation-level calls are made here.
  for (const std::int64_t lk : {std::int64_t{1} << 33, std::int64_t{1} << 40}) {
    std::vector<float> q(2 * 64), k(64), v(64), out(q.size(), 3.0f);
    const tensor tq = make_bshd(q.data(), dtype::f32, 1, 2, 1, 64);
    tensor tk = make_bshd(k.data(), dtype::f32, 1, 1, 1, 64), tv = make_bshd(v.data(), dtype::f32, 1, 1, 1, 64);
    tk.seq = tv.seq = lk;
    tk.stride_seq = tv.stride_seq = 0;
    const tensor to = make_bshd(out.data(), dtype::f32, 1, 2, 1, 64);
    options opt;
    opt.threads = 1;
    attn_params ap;
    ASSERT_TRUE(make_params(tq, tk, tv, to, spec{}, opt, ap).ok());
    const selection cpu = select(ap, backend::cpu);
    EXPECT_FALSE(cpu.ok());
    EXPECT_TRUE(any_reason_contains(cpu, "GiB of working memory"));
    const selection autom = select(ap, backend::automatic);
    EXPECT_EQ(autom.name, "reference");
    EXPECT_TRUE(any_reason_contains(autom, "fallback"));
    opt.use = backend::cpu;
    const status st = attention(tq, tk, tv, to, spec{}, opt);
    EXPECT_NE(st.error.find("GiB of working memory"), std::string::npos) << st.error;
    opt.use = backend::automatic;
    opt.allow_fallback = false;
    const status refused = attention(tq, tk, tv, to, spec{}, opt);
    EXPECT_EQ(refused.error.rfind("[attention] no fast kernel fits and options.allow_fallback is false:", 0), 0u) << refused.error;
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == 3.0f; }));
  }
}

// Regression (fixed in 83287c5): make_params() with the default options.threads = 0 ("all cores") used to store
// threads = 0 in attn_params, and running the selected kernel on those params indexed its per-thread scratch out of
// bounds (segfault). The public flow make_params -> select -> run must work; it runs in a child process so a crash
// fails only this test.
TEST(Kernel, MakeParamsResolvesThreads) {
  const problem p = make_problem(1, 8, 8, 1, 1, 4, 4);
  problem_data d(p);
  EXPECT_GE(params_of(d, spec{}, backend::cpu, 0).threads, 1);  // 0 = all cores, resolved to a real count
  EXPECT_EQ(params_of(d, spec{}, backend::cpu, 3).threads, 3);
}

// The child-process body: exit code 0 when the selected kernel ran and matched attention().
[[noreturn]] void run_selected_kernel_with_default_threads(const problem& p) {
  problem_data d(p), want(p);
  attn_params ap;
  const options o = d.make_options(backend::cpu, 0);  // threads = 0: all cores (the default)
  if (!make_params(d.q_view(), d.k_view(), d.v_view(), d.out_view(), spec{}, o, ap).ok()) std::_Exit(2);
  const selection sel = select(ap, backend::cpu);
  if (!sel.ok()) std::_Exit(3);
  sel.run(ap);
  if (!run_problem(want, spec{}, backend::cpu, 0).ok()) std::_Exit(4);
  std::_Exit(d.out == want.out ? 0 : 5);
}

TEST(KernelDeathTest, SelectedKernelRunsOnParamsFromMakeParamsWithDefaultThreads) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const problem p = make_problem(1, 70, 70, 2, 2, 16, 16, dtype::f32, causal_mode::none, 1900);
  EXPECT_EXIT(run_selected_kernel_with_default_threads(p), ::testing::ExitedWithCode(0), "");
}

// ------------------------------------------------------------------------------------------------------------------
// build_block_mask and mask_area against exact per-element evaluation written here.

bool test_mask(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) { return (i * 5 + j * 3 + b + 2 * h) % 11 < 7 || j == i; }

bool allowed_here(causal_mode c, const block_mask* user, bool masked, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j,
                  std::int64_t lq, std::int64_t lk) {
  const std::int64_t off = c == causal_mode::bottom_right ? lk - lq : 0;
  if (c != causal_mode::none && j > i + off) return false;
  if (user) {
    const std::int64_t bb = user->batch == 1 ? 0 : b, hh = user->heads == 1 ? 0 : h;
    const tile_kind t = user->kinds[static_cast<std::size_t>(((bb * user->heads + hh) * user->q_tiles + i / user->q_tile) * user->kv_tiles +
                                                             j / user->kv_tile)];
    if (t == tile_kind::empty) return false;
    if (t == tile_kind::full) return true;
  }
  return !masked || test_mask(b, h, i, j);
}

struct random_setup {
  problem p;
  bool masked = false;
  bool user_blocks = false;
};

random_setup random_problem(std::mt19937_64& rng) {
  auto pick = [&](std::int64_t lo, std::int64_t hi) { return lo + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(hi - lo + 1)); };
  random_setup r;
  problem& p = r.p;
  p.batch = pick(1, 3);
  p.heads_kv = pick(1, 2);
  p.heads_q = p.heads_kv * pick(1, 3);
  p.dim_qk = p.dim_v = 2;
  p.seq_q = pick(1, 150);
  p.seq_k = pick(1, 150);
  p.causal = static_cast<causal_mode>(pick(0, 2));
  if (pick(0, 3) == 0) {
    for (std::int64_t s = 0; s < p.batch; ++s) {  // the first sequence is non-empty: the tensors need seq > 0
      p.seqlens_q.push_back(pick(s == 0 ? 1 : 0, 100));
      p.seqlens_k.push_back(pick(s == 0 ? 1 : 0, 100));
    }
  }
  r.masked = pick(0, 2) == 0;
  r.user_blocks = pick(0, 3) == 0;
  return r;
}

TEST(BlockMask, MatchesExactPerElementClassification) {
  std::mt19937_64 rng(2100);
  const int n = test::full_intensity() ? 300 : 60;
  for (int it = 0; it < n; ++it) {
    random_setup r = random_problem(rng);
    problem_data d(r.p);
    // Optionally a user block mask (tiles 8 x 16, random kinds) that build_block_mask must respect.
    block_mask user;
    const attn_params probe = params_of(d, spec{}, backend::cpu, 1);
    if (r.user_blocks) {
      user.q_tile = 8;
      user.kv_tile = 16;
      user.batch = probe.batch;
      user.heads = 1;
      user.q_tiles = (probe.seq_q + 7) / 8;
      user.kv_tiles = (probe.seq_k + 15) / 16;
      for (std::int64_t k = 0; k < user.batch * user.q_tiles * user.kv_tiles; ++k) user.kinds.push_back(static_cast<tile_kind>(rng() % 3));
    }
    spec s;
    s.causal = r.p.causal;
    if (r.masked) s.mask = test_mask;
    if (r.user_blocks) s.blocks = &user;
    const attn_params ap = params_of(d, s, backend::cpu, 1);
    const std::int64_t qt = 1 + static_cast<std::int64_t>(rng() % 70), kt = 1 + static_cast<std::int64_t>(rng() % 70);
    const block_mask bm = build_block_mask(ap, qt, kt);
    SCOPED_TRACE(testing::Message() << r.p.describe() << " masked=" << r.masked << " user_blocks=" << r.user_blocks << " tiles " << qt << "x" << kt);
    ASSERT_EQ(bm.q_tile, qt);
    ASSERT_EQ(bm.kv_tile, kt);
    ASSERT_EQ(bm.q_tiles, (ap.seq_q + qt - 1) / qt);
    ASSERT_EQ(bm.kv_tiles, (ap.seq_k + kt - 1) / kt);
    ASSERT_TRUE(bm.batch == 1 || bm.batch == ap.batch);
    ASSERT_TRUE(bm.heads == 1 || bm.heads == ap.heads_q);
    ASSERT_EQ(bm.kinds.size(), static_cast<std::size_t>(bm.batch * bm.heads * bm.q_tiles * bm.kv_tiles));
    for (std::int64_t b = 0; b < ap.batch; ++b) {
      const std::int64_t lq = r.p.is_varlen() ? r.p.seqlens_q[static_cast<std::size_t>(b)] : r.p.seq_q;
      const std::int64_t lk = r.p.is_varlen() ? r.p.seqlens_k[static_cast<std::size_t>(b)] : r.p.seq_k;
      for (std::int64_t h = 0; h < ap.heads_q; ++h)
        for (std::int64_t a = 0; a < bm.q_tiles; ++a)
          for (std::int64_t c = 0; c < bm.kv_tiles; ++c) {
            std::int64_t allowed = 0, area = 0;
            for (std::int64_t i = a * qt; i < std::min((a + 1) * qt, lq); ++i)
              for (std::int64_t j = c * kt; j < std::min((c + 1) * kt, lk); ++j) {
                ++area;
                allowed += allowed_here(r.p.causal, r.user_blocks ? &user : nullptr, r.masked, b, h, i, j, lq, lk);
              }
            const tile_kind want = allowed == 0 ? tile_kind::empty : allowed == area ? tile_kind::full : tile_kind::partial;
            ASSERT_EQ(static_cast<int>(bm.at(b, h, a, c)), static_cast<int>(want)) << "b=" << b << " h=" << h << " tile " << a << "," << c;
          }
    }
  }
}

TEST(BlockMask, CausalTilesOfASquareProblem) {
  // 130 x 130, tiles 64: the classic lower-triangular tile pattern (hand-written).
  problem p = make_problem(1, 130, 130, 1, 1, 2, 2);
  problem_data d(p);
  spec s;
  s.causal = causal_mode::top_left;
  const block_mask bm = build_block_mask(params_of(d, s, backend::cpu, 1), 64, 64);
  using tk = tile_kind;
  const std::vector<tk> want = {tk::partial, tk::empty, tk::empty,  //
                                tk::full, tk::partial, tk::empty,   //
                                tk::full, tk::full, tk::partial};
  ASSERT_EQ(bm.kinds.size(), want.size());
  for (std::size_t n = 0; n < want.size(); ++n) EXPECT_EQ(static_cast<int>(bm.kinds[n]), static_cast<int>(want[n])) << n;
  // Bottom-right with Lk = Lq + 64 shifts the diagonal one tile to the right.
  problem pr = make_problem(1, 64, 128, 1, 1, 2, 2);
  problem_data dr(pr);
  s.causal = causal_mode::bottom_right;
  const block_mask br = build_block_mask(params_of(dr, s, backend::cpu, 1), 64, 64);
  ASSERT_EQ(br.kinds.size(), 2u);
  EXPECT_EQ(br.kinds[0], tk::full);
  EXPECT_EQ(br.kinds[1], tk::partial);
}

TEST(BlockMask, HandBuiltParamsAreChecked) {
  // attn_params filled without make_params: build_block_mask applies the enum and mask rules itself.
  problem p = make_problem(1, 16, 16, 1, 1, 2, 2);
  problem_data d(p);
  spec s;
  attn_params ap = params_of(d, s, backend::cpu, 1);
  const auto error_of = [](const attn_params& params) -> std::string {
    try {
      (void)build_block_mask(params, 8, 8);
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "";
  };
  ap.causal = static_cast<causal_mode>(4);
  EXPECT_EQ(error_of(ap), "[build_block_mask] p.causal 4 is not a causal_mode");
  ap.causal = causal_mode::top_left;
  const mask_expr bad = mask_expr::window(2, 0, static_cast<causal_mode>(9));
  ap.mask = &bad;
  EXPECT_EQ(error_of(ap), "[build_block_mask] p.mask window: align 9 must be causal_mode::top_left (1) or "
                          "causal_mode::bottom_right (2)");
  const mask_expr good = mask_expr::window(2, 0, causal_mode::top_left);
  ap.mask = &good;
  EXPECT_EQ(error_of(ap), "");
}

TEST(MaskArea, MatchesBruteForceCount) {
  std::mt19937_64 rng(2200);
  const int n = test::full_intensity() ? 300 : 60;
  for (int it = 0; it < n; ++it) {
    random_setup r = random_problem(rng);
    problem_data d(r.p);
    const attn_params probe = params_of(d, spec{}, backend::cpu, 1);
    block_mask user;
    if (r.user_blocks) {
      user.q_tile = 5;
      user.kv_tile = 9;
      user.batch = 1;
      user.heads = probe.heads_q;
      user.q_tiles = (probe.seq_q + 4) / 5;
      user.kv_tiles = (probe.seq_k + 8) / 9;
      for (std::int64_t k = 0; k < user.heads * user.q_tiles * user.kv_tiles; ++k) user.kinds.push_back(static_cast<tile_kind>(rng() % 3));
    }
    spec s;
    s.causal = r.p.causal;
    if (r.masked) s.mask = test_mask;
    if (r.user_blocks) s.blocks = &user;
    const attn_params ap = params_of(d, s, backend::cpu, 1);
    std::int64_t want = 0;
    for (std::int64_t b = 0; b < ap.batch; ++b) {
      const std::int64_t lq = r.p.is_varlen() ? r.p.seqlens_q[static_cast<std::size_t>(b)] : r.p.seq_q;
      const std::int64_t lk = r.p.is_varlen() ? r.p.seqlens_k[static_cast<std::size_t>(b)] : r.p.seq_k;
      for (std::int64_t h = 0; h < ap.heads_q; ++h)
        for (std::int64_t i = 0; i < lq; ++i)
          for (std::int64_t j = 0; j < lk; ++j) want += allowed_here(r.p.causal, r.user_blocks ? &user : nullptr, r.masked, b, h, i, j, lq, lk);
    }
    EXPECT_EQ(mask_area(ap), want) << r.p.describe() << " masked=" << r.masked << " user_blocks=" << r.user_blocks;
  }
}

TEST(MaskArea, ClosedForms) {
  // Causal square n x n: n (n + 1) / 2 per head; bottom-right Lq = 10 > Lk = 4: rows 6..9 see 1..4 keys.
  problem p = make_problem(2, 9, 9, 3, 1, 2, 2);
  problem_data d(p);
  spec s;
  s.causal = causal_mode::top_left;
  EXPECT_EQ(mask_area(params_of(d, s, backend::cpu, 1)), 2 * 3 * 45);
  EXPECT_EQ(mask_area(params_of(d, spec{}, backend::cpu, 1)), 2 * 3 * 81);
  problem q = make_problem(1, 10, 4, 1, 1, 2, 2);
  problem_data e(q);
  s.causal = causal_mode::bottom_right;
  EXPECT_EQ(mask_area(params_of(e, s, backend::cpu, 1)), 1 + 2 + 3 + 4);
  s.causal = causal_mode::top_left;
  EXPECT_EQ(mask_area(params_of(e, s, backend::cpu, 1)), 1 + 2 + 3 + 4 * 7);
}

}  // namespace
}  // namespace omniattn
