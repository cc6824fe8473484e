// Edge cases of valid calls (issue 17): empty problems, rows with no keys, and the kernels against the fp64 oracle on
// them. Rejections of invalid calls are in test_validation.cc.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
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

// A copy of view `t` (4 dtype-sized elements per float of `storage`) laid out with axis `axis` reversed in memory and
// read through a negative stride: the same logical tensor, its data pointer at element [0, 0, 0, 0].
tensor reversed_copy(const tensor& t, int axis, std::vector<std::uint8_t>& storage) {
  const std::int64_t sizes[4] = {t.batch, t.seq, t.heads, t.dim};
  const std::int64_t dense[4] = {t.seq * t.heads * t.dim, t.heads * t.dim, t.dim, 1};
  const int eb = dtype_size(t.type);
  storage.assign(static_cast<std::size_t>(t.batch * dense[0] * eb), 0);
  tensor r = t;
  std::int64_t* strides[4] = {&r.stride_batch, &r.stride_seq, &r.stride_head, &r.stride_dim};
  for (int d = 0; d < 4; ++d) *strides[d] = d == axis ? -dense[d] : dense[d];
  r.data = storage.data() + (sizes[axis] - 1) * dense[axis] * eb;
  const std::int64_t src[4] = {t.stride_batch, t.stride_seq, t.stride_head, t.stride_dim};
  for (std::int64_t b = 0; b < t.batch; ++b)
    for (std::int64_t i = 0; i < t.seq; ++i)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.dim; ++d) {
          const std::int64_t from = b * src[0] + i * src[1] + h * src[2] + d * src[3];
          const std::int64_t to = b * r.stride_batch + i * r.stride_seq + h * r.stride_head + d * r.stride_dim;
          std::memcpy(static_cast<std::uint8_t*>(r.data) + to * eb, static_cast<const std::uint8_t*>(t.data) + from * eb,
                      static_cast<std::size_t>(eb));
        }
  return r;
}

// Logical contents of a view as bytes, element by element in [b, s, h, d] order.
std::vector<std::uint8_t> contents(const tensor& t) {
  std::vector<std::uint8_t> out;
  const int eb = dtype_size(t.type);
  for (std::int64_t b = 0; b < t.batch; ++b)
    for (std::int64_t i = 0; i < t.seq; ++i)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.dim; ++d) {
          const auto* at = static_cast<const std::uint8_t*>(t.data) +
                           (b * t.stride_batch + i * t.stride_seq + h * t.stride_head + d * t.stride_dim) * eb;
          out.insert(out.end(), at, at + eb);
        }
  return out;
}

TEST(NegativeStrides, SameResultAsTheContiguousCall) {
  // numpy's x[:, ::-1] and friends: every operand, every axis, read (and out / lse written) through negative strides.
  // The logical tensors are the same, so each backend must give the same bits as on the contiguous layout.
  for (dtype t : {dtype::f32, dtype::bf16}) {
    problem prob = sized(2, 70, 67, 4, 2);
    prob.type = t;
    prob.causal = causal_mode::bottom_right;
    for (backend b : k_backends) {
      for (int axis = 0; axis < 4; ++axis) {
        SCOPED_TRACE(std::string(dtype_name(t)) + " " + backend_name(b) + " axis " + std::to_string(axis));
        problem_data want(prob), got(prob);
        const spec s{.causal = prob.causal};
        ASSERT_TRUE(run_problem(want, s, b, 2).ok());
        std::vector<std::uint8_t> qs, ks, vs, os;
        const tensor q = reversed_copy(got.q_view(), axis, qs), k = reversed_copy(got.k_view(), axis, ks),
                     v = reversed_copy(got.v_view(), axis, vs), out = reversed_copy(got.out_view(), axis, os);
        // LSE [batch, heads, seq_q] with its seq axis reversed.
        std::vector<float> lse(got.lse.size(), 0.0f);
        const lse_tensor l{lse.data() + (prob.seq_q - 1), prob.heads_q * prob.seq_q, prob.seq_q, -1};
        options o = got.make_options(b, 2);
        o.lse = &l;
        const status st = attention(q, k, v, out, s, o);
        ASSERT_TRUE(st.ok()) << st.error;
        EXPECT_TRUE(contents(out) == contents(want.out_view()));
        for (std::int64_t r = 0; r < prob.batch * prob.heads_q; ++r)
          for (std::int64_t i = 0; i < prob.seq_q; ++i)
            ASSERT_EQ(lse[static_cast<std::size_t>(r * prob.seq_q + prob.seq_q - 1 - i)],
                      want.lse[static_cast<std::size_t>(r * prob.seq_q + i)]);
      }
    }
  }
}

TEST(NegativeStrides, KernelMatchesTheOracleOnAFlippedView) {
  // Not a copy: a view of the same buffer in reverse, whose result differs from the forward one (a kernel ignoring
  // the sign would read the wrong rows), checked against the oracle on the same view.
  problem prob = sized(1, 40, 150, 2, 1);
  prob.causal = causal_mode::top_left;
  problem_data data(prob), ref(prob);
  const auto flip_seq = [](tensor t) {
    t.data = static_cast<float*>(t.data) + (t.seq - 1) * t.stride_seq;
    t.stride_seq = -t.stride_seq;
    return t;
  };
  const lse_tensor lg = data.lse_view(), lr = ref.lse_view();
  options o = data.make_options(backend::cpu, 2), orf = ref.make_options(backend::reference, 1);
  o.lse = &lg;
  orf.lse = &lr;
  const spec s{.causal = prob.causal};
  ASSERT_TRUE(attention(flip_seq(data.q_view()), flip_seq(data.k_view()), data.v_view(), data.out_view(), s, o).ok());
  ASSERT_TRUE(attention(flip_seq(ref.q_view()), flip_seq(ref.k_view()), ref.v_view(), ref.out_view(), s, orf).ok());
  double worst = 0.0;
  for (std::int64_t i = 0; i < prob.seq_q; ++i)
    for (std::int64_t h = 0; h < prob.heads_q; ++h)
      for (std::int64_t d = 0; d < prob.dim_v; ++d)
        worst = std::max(worst, std::fabs(data.out_at(0, i, h, d) - ref.out_at(0, i, h, d)));
  EXPECT_LT(worst, 1e-5);
  problem_data forward(prob);
  ASSERT_TRUE(run_problem(forward, s, backend::cpu, 2).ok());
  EXPECT_FALSE(forward.out == data.out);
}

// out / lse of a run with a score (every backend, f32), for NaN comparisons.
problem_data run_scored(const problem& prob, const spec& s, backend b) {
  problem_data data(prob);
  EXPECT_TRUE(run_problem(data, s, b, 1).ok());
  return data;
}

TEST(NanPropagation, BiasNanMakesItsRowNan) {
  // scores.h: NaN in a bias table gives NaN outputs like any logit. The oracle makes the whole row (out and lse) NaN;
  // the kernel must agree row by row, and match the oracle elsewhere. A NaN at a masked pair changes nothing.
  problem prob = sized(1, 70, 130, 2, 1);
  prob.causal = causal_mode::top_left;
  std::vector<float> table(static_cast<std::size_t>(2 * 70 * 130), 0.25f);
  const auto at = [&](std::int64_t h, std::int64_t i, std::int64_t j) -> float& {
    return table[static_cast<std::size_t>((h * 70 + i) * 130 + j)];
  };
  const float nan = std::nanf("");
  at(0, 3, 2) = nan;     // allowed (j <= i), the first key tile
  at(1, 65, 120) = nan;  // masked (j > i): no effect
  at(1, 66, 66) = nan;   // allowed, in the second key tile: the row's max there is already finite
  at(0, 0, 0) = nan;     // row 0's only allowed key: no finite logit at all in the row
  for (int variant = 0; variant < 2; ++variant) {
    SCOPED_TRACE(variant ? "bias then softcap" : "bias");
    spec s{.causal = prob.causal};
    s.score = scores::bias(table.data(), {1, 2, 70, 130});
    if (variant) s.score = scores::then(s.score, scores::softcap(4.0));
    const problem_data ref = run_scored(prob, s, backend::reference), got = run_scored(prob, s, backend::cpu);
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t i = 0; i < 70; ++i) {
        const bool want_nan = (h == 0 && (i == 3 || i == 0)) || (h == 1 && i == 66);
        const float lr = ref.lse[static_cast<std::size_t>(h * 70 + i)], lg = got.lse[static_cast<std::size_t>(h * 70 + i)];
        ASSERT_EQ(std::isnan(lr), want_nan) << "oracle h " << h << " i " << i;
        ASSERT_EQ(std::isnan(lg), want_nan) << "kernel lse h " << h << " i " << i << ": " << lg;
        if (!want_nan) EXPECT_NEAR(lg, lr, 1e-5);
        for (std::int64_t d = 0; d < prob.dim_v; ++d) {
          const double og = got.out_at(0, i, h, d), orf = ref.out_at(0, i, h, d);
          ASSERT_EQ(std::isnan(og), want_nan) << "kernel out h " << h << " i " << i << " d " << d << ": " << og;
          if (!want_nan) EXPECT_NEAR(og, orf, 1e-5);
        }
      }
  }
}

// A byte-for-byte copy of `t`'s storage (dense, as problem_data lays it out) starting at an odd address of `storage`.
tensor at_odd_address(const tensor& t, const std::vector<std::uint8_t>& src, std::vector<std::uint8_t>& storage) {
  storage.assign(src.size() + 2, 0);
  std::memcpy(storage.data() + 1, src.data(), src.size());
  tensor r = t;
  r.data = storage.data() + 1;
  return r;
}

TEST(Alignment, TwoByteTensorsAtOddAddresses) {
  // bf16 / f16 tensors need no alignment: every backend (and the bf16 dot-product kernel where the CPU has it) gives
  // the same bits as on aligned copies.
  for (dtype t : {dtype::bf16, dtype::f16})
    for (const char* dot : {"0", "1"}) {
      const test::scoped_env env("OMNIATTN_BF16_DOT", dot);
      problem prob = sized(2, 70, 67, 4, 2);
      prob.type = t;
      for (backend b : k_backends) {
        SCOPED_TRACE(std::string(dtype_name(t)) + " " + backend_name(b) + " OMNIATTN_BF16_DOT=" + dot);
        problem_data want(prob), got(prob);
        const spec s{.causal = causal_mode::bottom_right};
        ASSERT_TRUE(run_problem(want, s, b, 2).ok());
        std::vector<std::uint8_t> qs, ks, vs, os;
        const tensor q = at_odd_address(got.q_view(), got.q, qs), k = at_odd_address(got.k_view(), got.k, ks),
                     v = at_odd_address(got.v_view(), got.v, vs), out = at_odd_address(got.out_view(), got.out, os);
        ASSERT_EQ(reinterpret_cast<std::uintptr_t>(q.data) % 2, 1u);
        const lse_tensor l = got.lse_view();
        options o = got.make_options(b, 2);
        o.lse = &l;
        const status st = attention(q, k, v, out, s, o);
        ASSERT_TRUE(st.ok()) << st.error;
        EXPECT_TRUE(contents(out) == contents(want.out_view()));
        EXPECT_TRUE(test::bytes_equal(got.lse, want.lse));
      }
    }
}

}  // namespace
}  // namespace omniattn
