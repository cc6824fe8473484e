// merge_attention_states: attention over disjoint key sets, merged, against attention over their union (and against
// the merge formula in fp64); masked parts, thread counts and part order, storage dtypes and strided views; every
// validation rule, with the outputs untouched. Tolerances: tests/tolerance.h (k_merge_eps).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/problem.h"
#include "core/storage.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

constexpr float k_nan = std::numeric_limits<float>::quiet_NaN();
constexpr float k_neg_inf = -std::numeric_limits<float>::infinity();

// An f32 result: out [batch, seq, heads, dim] (contiguous BSHD) and lse [batch, heads, seq], poisoned with NaN until
// written.
struct result {
  std::int64_t batch, seq, heads, dim;
  std::vector<float> out, lse;

  result(std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d)
      : batch(b), seq(s), heads(h), dim(d), out(static_cast<std::size_t>(b * s * h * d), k_nan),
        lse(static_cast<std::size_t>(b * h * s), k_nan) {}
  tensor out_view() const { return make_bshd(const_cast<float*>(out.data()), dtype::f32, batch, seq, heads, dim); }
  lse_tensor lse_view() const { return make_lse(const_cast<float*>(lse.data()), heads, seq); }
};

// The keys [begin, end) of a K or V view.
tensor key_slice(tensor t, std::int64_t begin, std::int64_t end) {
  t.data = static_cast<char*>(t.data) + begin * t.stride_seq * dtype_size(t.type);
  t.seq = end - begin;
  return t;
}

// attention over the keys [begin, end) of d's K and V (all of them by default) on the CPU kernel: out f32 and its LSE.
result attend(const problem_data& d, const spec& s, std::int64_t begin = 0, std::int64_t end = -1) {
  const problem& p = d.prob;
  result r(p.batch, p.seq_q, p.heads_q, p.dim_v);
  options o = d.make_options(backend::cpu, 1);
  const lse_tensor l = r.lse_view();
  o.lse = &l;
  if (end < 0) end = p.seq_k;
  const status st = attention(d.q_view(), key_slice(d.k_view(), begin, end), key_slice(d.v_view(), begin, end),
                              r.out_view(), s, o);
  EXPECT_TRUE(st.ok()) << st.error;
  return r;
}

// The out and LSE views of results, as merge_attention_states takes them.
struct part_views {
  std::vector<tensor> outs;
  std::vector<lse_tensor> lses;

  explicit part_views(const std::vector<result>& parts) {
    for (const result& r : parts) {
      outs.push_back(r.out_view());
      lses.push_back(r.lse_view());
    }
  }
};

result merge(const std::vector<result>& parts, int threads = 1) {
  const part_views v(parts);
  result m(parts[0].batch, parts[0].seq, parts[0].heads, parts[0].dim);
  const lse_tensor l = m.lse_view();
  const status st = merge_attention_states(v.outs, v.lses, m.out_view(), &l, threads);
  EXPECT_TRUE(st.ok()) << st.error;
  return m;
}

// max |got - want| <= tol over every element; NaN anywhere, or an infinity not matched exactly, fails.
::testing::AssertionResult all_near(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                                    double tol) {
  double worst = 0.0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i]) || std::isinf(got[i]) != std::isinf(want[i]) ||
        (std::isinf(want[i]) && got[i] != want[i]))
      return ::testing::AssertionFailure() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
    if (std::isinf(want[i])) continue;
    if (std::fabs(got[i] - want[i]) > worst) worst = std::fabs(got[i] - want[i]), at = i;
  }
  std::ostringstream os;
  os << what << ": max err " << worst << " at " << at << " (tol " << tol << ")";
  if (worst <= tol) return ::testing::AssertionSuccess() << os.str();
  return ::testing::AssertionFailure() << os.str();
}

std::vector<double> widened(const std::vector<float>& x) { return {x.begin(), x.end()}; }

double lse_scale(const std::vector<float>& lse) {
  double m = 1.0;
  for (float x : lse)
    if (std::isfinite(x)) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

// The merge policy (tolerance.h): got against want, v_max = max|v|, extra_out = the parts' storage rounding.
::testing::AssertionResult merge_near(const result& got, const result& want, double v_max, double extra_out = 0.0) {
  const double l = lse_scale(want.lse), unit = test::k_merge_eps * test::dtype_eps(dtype::f32) * l;
  const ::testing::AssertionResult o = all_near("out", got.out, widened(want.out), unit * v_max + extra_out);
  const ::testing::AssertionResult s = all_near("lse", got.lse, widened(want.lse), unit);
  if (o && s) return ::testing::AssertionSuccess() << o.message() << "; " << s.message();
  return ::testing::AssertionFailure() << o.message() << "; " << s.message();
}

std::int64_t count_neg_inf(const std::vector<result>& parts) {
  std::int64_t n = 0;
  for (const result& r : parts) n += std::count(r.lse.begin(), r.lse.end(), k_neg_inf);
  return n;
}

// A mask allowing the keys k with k % parts == which.
mask_expr residue(std::int64_t parts, std::int64_t which) {
  return mask_expr::inlined([parts, which](auto, auto, auto, auto k) { return k % parts == which; }, "residue");
}

// A mask allowing the keys assigned to `which` (part_of[k]).
mask_expr assigned(std::shared_ptr<const std::vector<int>> part_of, int which) {
  return mask_expr::predicate(
      [part_of, which](std::int64_t, std::int64_t, std::int64_t, std::int64_t k) {
        return (*part_of)[static_cast<std::size_t>(k)] == which;
      },
      "assigned");
}

// Five disjoint random key sets (seeded) of lk keys with top-left causal: their specs and the union's.
std::vector<spec> random_sets(std::int64_t lk, std::uint64_t seed, spec& all) {
  std::mt19937_64 rng(seed);
  auto part_of = std::make_shared<std::vector<int>>(static_cast<std::size_t>(lk));
  for (int& x : *part_of) x = static_cast<int>(rng() % 5);
  all.causal = causal_mode::top_left;
  std::vector<spec> sets(5);
  for (int i = 0; i < 5; ++i) {
    sets[static_cast<std::size_t>(i)].causal = causal_mode::top_left;
    sets[static_cast<std::size_t>(i)].mask = assigned(part_of, i);
  }
  return sets;
}

std::vector<result> attend_each(const problem_data& d, const std::vector<spec>& sets) {
  std::vector<result> parts;
  for (const spec& s : sets) parts.push_back(attend(d, s));
  return parts;
}

struct shape_case {
  std::int64_t batch, seq_q, seq_k, heads_q, heads_kv, dim;
};
// Odd sizes: head dims 1, 7, 130; query lengths 1 and 13; key lengths inside one 64-key tile and across three.
const shape_case k_shapes[] = {{2, 13, 29, 3, 1, 7}, {1, 1, 13, 2, 2, 130}, {2, 13, 13, 2, 1, 1}, {1, 13, 150, 2, 2, 7}};

problem shape_problem(const shape_case& c, dtype t, std::uint64_t seed) {
  problem p = test::small_problem(c.seq_q, c.seq_k, c.heads_q, c.heads_kv, c.dim, t, causal_mode::none, seed);
  p.batch = c.batch;
  return p;
}

// ------------------------------------------------------------------------------------------------------------------

TEST(Merge, SplitKeysMatchAttentionOverAllKeys) {
  std::uint64_t seed = 11;
  for (const shape_case& c : k_shapes) {
    const problem p = shape_problem(c, dtype::f32, seed++);
    SCOPED_TRACE(p.describe());
    const problem_data d(p);
    {  // 2 parts: a prefix and the rest of the keys as separate K / V slices (cascade attention)
      const std::int64_t cut = std::max<std::int64_t>(1, c.seq_k / 3);
      const std::vector<result> parts = {attend(d, {}, 0, cut), attend(d, {}, cut, c.seq_k)};
      EXPECT_TRUE(merge_near(merge(parts), attend(d, {}), p.input_range)) << "2 slices";
    }
    {  // 3 interleaved sets (k % 3) under bottom-right causal
      spec all;
      all.causal = causal_mode::bottom_right;
      std::vector<spec> sets(3, all);
      for (std::int64_t i = 0; i < 3; ++i) sets[static_cast<std::size_t>(i)].mask = residue(3, i);
      EXPECT_TRUE(merge_near(merge(attend_each(d, sets)), attend(d, all), p.input_range)) << "3 residues";
    }
    {  // 5 random sets under top-left causal: early rows find no key in most sets (lse -inf there)
      spec all;
      const std::vector<result> parts = attend_each(d, random_sets(c.seq_k, seed, all));
      EXPECT_GT(count_neg_inf(parts), 0);
      EXPECT_TRUE(merge_near(merge(parts), attend(d, all), p.input_range)) << "5 random sets";
    }
  }
}

TEST(Merge, MatchesTheFormulaInFp64) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f), logit(-3.0f, 8.0f);
  for (std::int64_t dim : {1, 7, 130}) {
    const std::int64_t n = 4;
    std::vector<result> parts(n, result(2, 13, 3, dim));
    for (result& r : parts) {
      for (float& x : r.out) x = value(rng);
      for (float& x : r.lse) x = rng() % 4 == 0 ? k_neg_inf : logit(rng);
    }
    std::vector<double> want_out(parts[0].out.size()), want_lse(parts[0].lse.size());
    for (std::int64_t b = 0; b < 2; ++b)
      for (std::int64_t s = 0; s < 13; ++s)
        for (std::int64_t h = 0; h < 3; ++h) {
          const auto li = static_cast<std::size_t>((b * 3 + h) * 13 + s);
          double total = 0.0;
          for (const result& r : parts) total += std::exp(static_cast<double>(r.lse[li]));
          want_lse[li] = total > 0.0 ? std::log(total) : -std::numeric_limits<double>::infinity();
          for (std::int64_t e = 0; e < dim; ++e) {
            const auto oi = static_cast<std::size_t>(((b * 13 + s) * 3 + h) * dim + e);
            double sum = 0.0;
            for (const result& r : parts)
              if (total > 0.0) sum += std::exp(static_cast<double>(r.lse[li]) - want_lse[li]) * r.out[oi];
            want_out[oi] = sum;
          }
        }
    const result got = merge(parts);
    const double unit = test::k_merge_eps * test::dtype_eps(dtype::f32) * lse_scale(got.lse);
    EXPECT_TRUE(all_near("out", got.out, want_out, unit)) << "dim " << dim;
    EXPECT_TRUE(all_near("lse", got.lse, want_lse, unit)) << "dim " << dim;
  }
}

TEST(Merge, SinkLogitIsAPartWithZeroOut) {
  const problem p = test::small_problem(13, 29, 3, 1, 7, dtype::f32, causal_mode::none, 21);
  const problem_data d(p);
  const std::vector<float> sinks = {-1.0f, 0.5f, 3.0f};
  spec with_sinks, causal;
  with_sinks.causal = causal.causal = causal_mode::bottom_right;
  with_sinks.sink_logits = sinks.data();
  result sink(1, 13, 3, 7);
  std::fill(sink.out.begin(), sink.out.end(), 0.0f);
  for (std::int64_t h = 0; h < 3; ++h)
    std::fill(sink.lse.begin() + h * 13, sink.lse.begin() + (h + 1) * 13, sinks[static_cast<std::size_t>(h)]);
  EXPECT_TRUE(merge_near(merge({attend(d, causal), sink}), attend(d, with_sinks), p.input_range));
}

TEST(Merge, FullyMaskedPartContributesNothing) {
  const problem p = test::small_problem(13, 29, 2, 2, 7, dtype::f32, causal_mode::none, 3);
  const problem_data d(p);
  const result a = attend(d, {});
  result masked(1, 13, 2, 7);  // out left NaN: a part with lse -inf is never read into the sum
  std::fill(masked.lse.begin(), masked.lse.end(), k_neg_inf);
  const std::vector<std::vector<result>> cases = {{a}, {masked, a, masked}, {a, masked}};
  for (const std::vector<result>& parts : cases) {
    const result m = merge(parts);
    EXPECT_TRUE(test::bytes_equal(m.out, a.out));
    EXPECT_TRUE(test::bytes_equal(m.lse, a.lse));
  }
}

TEST(Merge, AllPartsMaskedGiveZeroAndMinusInf) {
  std::vector<result> parts(3, result(2, 13, 2, 7));
  for (result& r : parts) std::fill(r.lse.begin(), r.lse.end(), k_neg_inf);  // outs stay NaN
  for (dtype t : {dtype::f32, dtype::bf16, dtype::f16, dtype::f64}) {
    std::vector<std::uint8_t> out(static_cast<std::size_t>(2 * 13 * 2 * 7 * dtype_size(t)), 0xa5);
    std::vector<float> lse(2 * 2 * 13, k_nan);
    const part_views v(parts);
    const lse_tensor l = make_lse(lse.data(), 2, 13);
    const status st = merge_attention_states(v.outs, v.lses, make_bshd(out.data(), t, 2, 13, 2, 7), &l, 2);
    ASSERT_TRUE(st.ok()) << st.error;
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](std::uint8_t x) { return x == 0; })) << dtype_name(t);
    EXPECT_TRUE(std::all_of(lse.begin(), lse.end(), [](float x) { return x == k_neg_inf; })) << dtype_name(t);
  }
  // A real call: keys [5, 13) under top-left causal leave rows 0..4 with no key; merging the part with itself twice
  // keeps them at out 0, lse -inf.
  const problem p = test::small_problem(13, 13, 1, 1, 7, dtype::f32, causal_mode::none, 4);
  const problem_data d(p);
  spec late;
  late.causal = causal_mode::top_left;
  late.mask = mask_expr::inlined([](auto, auto, auto, auto k) { return k >= 5; }, "late");
  const result part = attend(d, late);
  const result m = merge({part, part});
  for (std::int64_t i = 0; i < 13; ++i) {
    EXPECT_EQ(m.lse[static_cast<std::size_t>(i)] == k_neg_inf, i < 5) << "row " << i;
    for (std::int64_t e = 0; e < 7; ++e)
      if (i < 5) EXPECT_EQ(m.out[static_cast<std::size_t>(i * 7 + e)], 0.0f) << "row " << i;
  }
}

TEST(Merge, NanOrPlusInfLseMakesOnlyItsRowNan) {
  for (float bad : {k_nan, std::numeric_limits<float>::infinity()}) {
    std::vector<result> parts(2, result(1, 3, 1, 4));
    for (result& r : parts) {
      std::fill(r.out.begin(), r.out.end(), 0.25f);
      std::fill(r.lse.begin(), r.lse.end(), 1.0f);
    }
    parts[1].lse[1] = bad;
    const result m = merge(parts);
    for (std::int64_t s = 0; s < 3; ++s) {
      EXPECT_EQ(std::isnan(m.lse[static_cast<std::size_t>(s)]), s == 1) << bad << " row " << s;
      for (std::int64_t e = 0; e < 4; ++e) EXPECT_EQ(std::isnan(m.out[static_cast<std::size_t>(s * 4 + e)]), s == 1);
    }
    EXPECT_FLOAT_EQ(m.out[0], 0.25f);
    EXPECT_FLOAT_EQ(m.lse[0], 1.0f + std::log(2.0f));
  }
}

TEST(Merge, ThreadCountIsBitwiseIdenticalAndOrderWithinTolerance) {
  problem p = test::small_problem(64, 96, 4, 2, 130, dtype::f32, causal_mode::none, 8);
  p.batch = 2;
  const problem_data d(p);
  spec all;
  const std::vector<result> parts = attend_each(d, random_sets(p.seq_k, 9, all));
  const result one = merge(parts, 1);
  for (int threads : {2, 3, 0}) {
    const result m = merge(parts, threads);
    EXPECT_TRUE(test::bytes_equal(m.out, one.out)) << threads << " threads";
    EXPECT_TRUE(test::bytes_equal(m.lse, one.lse)) << threads << " threads";
  }
  std::vector<result> reversed(parts.rbegin(), parts.rend()), rotated(parts.begin() + 2, parts.end());
  rotated.insert(rotated.end(), parts.begin(), parts.begin() + 2);
  EXPECT_TRUE(merge_near(merge(reversed, 2), one, p.input_range)) << "reversed";
  EXPECT_TRUE(merge_near(merge(rotated, 2), one, p.input_range)) << "rotated";
  EXPECT_TRUE(merge_near(one, attend(d, all), p.input_range));
}

// Result r's out (BSHD) stored in dtype t in BHSD memory, every stride times `step` (step 2: every other element of a
// twice larger buffer, the gaps NaN): values are rounded to t.
struct stored_part {
  std::vector<std::uint8_t> bytes;
  tensor view;

  stored_part(const result& r, dtype t, std::int64_t step = 1)
      : bytes(r.out.size() * static_cast<std::size_t>(step * dtype_size(t)), 0xff) {
    view = make_bhsd(bytes.data(), t, r.batch, r.heads, r.seq, r.dim);
    for (std::int64_t* st : {&view.stride_batch, &view.stride_seq, &view.stride_head, &view.stride_dim}) *st *= step;
    for (std::int64_t b = 0; b < r.batch; ++b)
      for (std::int64_t s = 0; s < r.seq; ++s)
        for (std::int64_t h = 0; h < r.heads; ++h)
          for (std::int64_t e = 0; e < r.dim; ++e)
            detail::store_element(view.data, t,
                                  b * view.stride_batch + s * view.stride_seq + h * view.stride_head + e * view.stride_dim,
                                  r.out[static_cast<std::size_t>(((b * r.seq + s) * r.heads + h) * r.dim + e)]);
  }
  stored_part(const stored_part&) = delete;
  stored_part& operator=(const stored_part&) = delete;
};

TEST(Merge, StorageDtypesAndStridedViews) {
  problem p = test::small_problem(13, 40, 3, 1, 7, dtype::f32, causal_mode::none, 12);
  p.batch = 2;
  const problem_data d(p);
  spec all;
  std::vector<result> parts = attend_each(d, random_sets(p.seq_k, 13, all));
  parts.erase(parts.begin() + 3, parts.end());
  // Round every part to bf16 values (those below f16's normal range to 0): then bf16, f16 and f64 storage hold the
  // same numbers, and the merge reads them exactly.
  for (result& r : parts)
    for (float& x : r.out) x = std::fabs(x) < 0x1p-14f ? 0.0f : bf16_to_f32(f32_to_bf16(x));
  const result want = merge(parts);
  // bf16 BHSD, f64 BHSD with every other element, f16 BHSD
  const stored_part p0(parts[0], dtype::bf16), p1(parts[1], dtype::f64, 2), p2(parts[2], dtype::f16);
  const std::vector<tensor> outs = {p0.view, p1.view, p2.view};
  const std::vector<lse_tensor> lses = part_views(parts).lses;
  // out: f32 seq-reversed (negative stride), then bf16 / f16 / f64 BHSD; lse_out strided as [batch, seq, heads] memory.
  result got(2, 13, 3, 7);
  tensor reversed = got.out_view();
  reversed.data = got.out.data() + 12 * reversed.stride_seq;
  reversed.stride_seq = -reversed.stride_seq;
  std::vector<float> lse_bsh(want.lse.size(), k_nan);
  const lse_tensor l{lse_bsh.data(), 13 * 3, 1, 3};
  ASSERT_TRUE(merge_attention_states(outs, lses, reversed, &l, 2).ok());
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t s = 0; s < 13; ++s)
      for (std::int64_t h = 0; h < 3; ++h) {
        EXPECT_EQ(lse_bsh[static_cast<std::size_t>((b * 13 + s) * 3 + h)], want.lse[static_cast<std::size_t>((b * 3 + h) * 13 + s)]);
        for (std::int64_t e = 0; e < 7; ++e)
          EXPECT_EQ(got.out[static_cast<std::size_t>(((b * 13 + 12 - s) * 3 + h) * 7 + e)],
                    want.out[static_cast<std::size_t>(((b * 13 + s) * 3 + h) * 7 + e)]);
      }
  for (dtype t : {dtype::bf16, dtype::f16, dtype::f64}) {
    std::vector<std::uint8_t> out(want.out.size() * static_cast<std::size_t>(dtype_size(t)));
    ASSERT_TRUE(merge_attention_states(outs, lses, make_bhsd(out.data(), t, 2, 3, 13, 7)).ok());
    EXPECT_TRUE(out == stored_part(want, t).bytes) << dtype_name(t) << ": not the f32 merge rounded once";
  }
}

TEST(Merge, Bf16InputsMatchAttentionOverAllKeys) {
  for (const shape_case& c : k_shapes) {
    const problem p = shape_problem(c, dtype::bf16, 31);
    SCOPED_TRACE(p.describe());
    const problem_data d(p);
    spec all;
    const std::vector<result> parts = attend_each(d, random_sets(c.seq_k, 32, all));
    std::vector<std::unique_ptr<stored_part>> stored;
    part_views v(parts);
    for (std::size_t i = 0; i < parts.size(); ++i) {  // the parts as attention returns them for bf16 inputs: bf16 out
      stored.push_back(std::make_unique<stored_part>(parts[i], dtype::bf16));
      v.outs[i] = stored.back()->view;
    }
    result m(c.batch, c.seq_q, c.heads_q, c.dim);
    const lse_tensor l = m.lse_view();
    ASSERT_TRUE(merge_attention_states(v.outs, v.lses, m.out_view(), &l).ok());
    EXPECT_TRUE(merge_near(m, attend(d, all), p.input_range, test::dtype_eps(dtype::bf16) * p.input_range));
  }
}

TEST(Merge, EmptyCallsWriteNothing) {
  std::vector<float> sentinel(8, 7.0f);
  for (const shape_case& c : {shape_case{0, 5, 0, 2, 0, 4}, {2, 0, 0, 2, 0, 4}, {2, 5, 0, 0, 0, 4}}) {
    const tensor part{nullptr, dtype::bf16, c.batch, c.seq_q, c.heads_q, c.dim, 0, 0, 0, 1};
    const std::vector<tensor> outs = {part, part};
    const std::vector<lse_tensor> lses = {lse_tensor{}, lse_tensor{}};
    const tensor out = make_bshd(sentinel.data(), dtype::f32, c.batch, c.seq_q, c.heads_q, c.dim);
    const lse_tensor l{sentinel.data() + 4, 0, 0, 0};
    const status st = merge_attention_states(outs, lses, out, &l);
    EXPECT_TRUE(st.ok()) << st.error;
  }
  EXPECT_TRUE(std::all_of(sentinel.begin(), sentinel.end(), [](float x) { return x == 7.0f; }));
}

// ------------------------------------------------------------------------------------------------------------------
// Validation: each rule broken alone is reported by name, and no buffer (inputs included) changes.

constexpr std::int64_t B = 2, S = 5, H = 3, D = 7;
constexpr std::size_t k_slack = 4096;  // oversized buffers: a wrongly accepted call cannot write out of bounds
constexpr std::uint8_t k_sentinel = 0x5a;

// A valid merge of two f32 parts over caller buffers; tests break one rule at a time.
struct merge_call {
  std::vector<float> part0, part1, lse0, lse1, out_buf, lse_buf;
  std::vector<tensor> outs;
  std::vector<lse_tensor> lses;
  tensor out;
  lse_tensor lse_out;
  const lse_tensor* lse_out_ptr = &lse_out;
  int threads = 1;

  merge_call()
      : part0(B * S * H * D + k_slack), part1(part0.size()), lse0(B * H * S + k_slack), lse1(lse0.size()),
        out_buf(part0.size()), lse_buf(lse0.size()) {
    std::mt19937_64 rng(3);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto* buf : {&part0, &part1, &lse0, &lse1})
      for (float& x : *buf) x = u(rng);
    std::memset(out_buf.data(), k_sentinel, out_buf.size() * sizeof(float));
    std::memset(lse_buf.data(), k_sentinel, lse_buf.size() * sizeof(float));
    outs = {make_bshd(part0.data(), dtype::f32, B, S, H, D), make_bshd(part1.data(), dtype::f32, B, S, H, D)};
    lses = {make_lse(lse0.data(), H, S), make_lse(lse1.data(), H, S)};
    out = make_bshd(out_buf.data(), dtype::f32, B, S, H, D);
    lse_out = make_lse(lse_buf.data(), H, S);
  }
  merge_call(const merge_call&) = delete;
  merge_call& operator=(const merge_call&) = delete;

  status run() const { return merge_attention_states(outs, lses, out, lse_out_ptr, threads); }
  std::vector<std::uint8_t> snapshot() const {
    std::vector<std::uint8_t> all;
    for (const auto* buf : {&part0, &part1, &lse0, &lse1, &out_buf, &lse_buf}) {
      const auto* p = reinterpret_cast<const std::uint8_t*>(buf->data());
      all.insert(all.end(), p, p + buf->size() * sizeof(float));
    }
    return all;
  }
};

void expect_rejected(const std::function<void(merge_call&)>& mutate, const std::string& message) {
  SCOPED_TRACE(message);
  merge_call c;
  mutate(c);
  const std::vector<std::uint8_t> before = c.snapshot();
  const status st = c.run();
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(st.error.rfind("[merge_attention_states] " + message, 0), 0u) << st.error;
  EXPECT_TRUE(c.snapshot() == before) << "a rejected call wrote to memory";
}

float* misaligned(std::vector<float>& buf) {
  return reinterpret_cast<float*>(reinterpret_cast<char*>(buf.data()) + 2);
}

TEST(MergeValidation, ValidCallsSucceed) {
  const std::function<void(merge_call&)> valid[] = {
      [](merge_call&) {},
      [](merge_call& c) { c.lse_out_ptr = nullptr; },
      [](merge_call& c) { c.threads = 0; },
      [](merge_call& c) {  // inputs may broadcast with stride 0
        c.outs[1].stride_batch = 0;
        c.lses[1].stride_head = 0;
      },
      [](merge_call& c) {  // a part of another dtype, an out of another dtype
        c.outs[1].type = dtype::bf16;
        c.out.type = dtype::f16;
      },
  };
  for (const auto& mutate : valid) {
    merge_call c;
    mutate(c);
    const status st = c.run();
    EXPECT_TRUE(st.ok()) << st.error;
    EXPECT_NE(c.out_buf[0], c.out_buf.back()) << "out not written";
  }
}

TEST(MergeValidation, PartsAndCounts) {
  expect_rejected([](merge_call& c) { c.outs.clear(), c.lses.clear(); }, "outs is empty: at least one part is needed");
  expect_rejected([](merge_call& c) { c.lses.pop_back(); }, "lses has 1 entries, outs 2: one LSE per part");
  expect_rejected([](merge_call& c) { c.lses.push_back(c.lses[0]); }, "lses has 3 entries, outs 2: one LSE per part");
}

TEST(MergeValidation, Shapes) {
  expect_rejected([](merge_call& c) { c.outs[1].seq = 4; }, "outs[1].seq 4 != outs[0].seq 5");
  expect_rejected([](merge_call& c) { c.outs[1].batch = 1; }, "outs[1].batch 1 != outs[0].batch 2");
  expect_rejected([](merge_call& c) { c.outs[1].heads = 2; }, "outs[1].heads 2 != outs[0].heads 3");
  expect_rejected([](merge_call& c) { c.outs[1].dim = 3; }, "outs[1].dim 3 != outs[0].dim 7");
  expect_rejected([](merge_call& c) { c.out.heads = 2; }, "out.heads 2 != outs[0].heads 3");
  expect_rejected([](merge_call& c) { c.out.dim = 8; }, "out.dim 8 != outs[0].dim 7");
  expect_rejected([](merge_call& c) { c.outs[0].dim = 0; }, "outs[0].dim 0 must be > 0");
  expect_rejected([](merge_call& c) { c.outs[1].batch = -1; }, "outs[1].batch -1 must be >= 0");
  expect_rejected([](merge_call& c) { c.out.seq = -2; }, "out.seq -2 must be >= 0");
}

TEST(MergeValidation, DataDtypesAndAlignment) {
  expect_rejected([](merge_call& c) { c.outs[1].data = nullptr; }, "outs[1].data is null");
  expect_rejected([](merge_call& c) { c.lses[1].data = nullptr; }, "lses[1].data is null");
  expect_rejected([](merge_call& c) { c.out.data = nullptr; }, "out.data is null");
  expect_rejected([](merge_call& c) { c.lse_out.data = nullptr; }, "lse_out.data is null");
  expect_rejected([](merge_call& c) { c.outs[0].type = static_cast<dtype>(9); }, "outs[0].type 9 is not a known dtype");
  expect_rejected([](merge_call& c) { c.out.type = static_cast<dtype>(4); }, "out.type 4 is not a known dtype");
  expect_rejected([](merge_call& c) { c.lses[0].data = misaligned(c.lse0); }, "lses[0].data ");
  expect_rejected([](merge_call& c) { c.lse_out.data = misaligned(c.lse_buf); }, "lse_out.data ");
  expect_rejected([](merge_call& c) { c.out.data = misaligned(c.out_buf); }, "out.data ");
  expect_rejected([](merge_call& c) { c.outs[1].stride_head = std::numeric_limits<std::int64_t>::max() / 2; },
                  "outs[1] strides overflow int64 addressing");
  expect_rejected([](merge_call& c) { c.lses[1].stride_head = std::numeric_limits<std::int64_t>::max() / 2; },
                  "lses[1] strides overflow int64 addressing");
}

TEST(MergeValidation, OutputsWrittenOnceAndOverlapNoInput) {
  expect_rejected([](merge_call& c) { c.out.stride_seq = 0; }, "out.stride_seq 0 makes the output overlap itself");
  expect_rejected([](merge_call& c) { c.out.stride_head = 3; },
                  "out.stride_head 3 makes the output overlap itself (needs |stride| >= 7)");
  expect_rejected([](merge_call& c) { c.lse_out.stride_head = 0; }, "lse_out.stride_head 0 makes the output overlap itself");
  expect_rejected([](merge_call& c) { c.out.data = c.part1.data() + 3; },
                  "out aliases outs[1]: the output must not overlap an input");
  expect_rejected([](merge_call& c) { c.out.data = c.lse0.data(); }, "out aliases lses[0]: the output must not overlap an input");
  expect_rejected([](merge_call& c) { c.lse_out.data = c.part0.data() + B * S * H * D - 1; },
                  "lse_out aliases outs[0]: the output must not overlap an input");
  expect_rejected([](merge_call& c) { c.lse_out.data = c.lse1.data(); }, "lse_out aliases lses[1]");
  expect_rejected([](merge_call& c) { c.lse_out.data = c.out_buf.data() + 5; }, "lse_out aliases out");
}

TEST(MergeValidation, Threads) {
  expect_rejected([](merge_call& c) { c.threads = -1; }, "threads -1 must be >= 0 (0 = all cores)");
  expect_rejected([](merge_call& c) { c.threads = 1 << 20; }, "threads 1048576 must be <= ");
}

}  // namespace
}  // namespace omniattn
