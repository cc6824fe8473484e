// RoPE inside the attention call: the oracle against inputs rotated independently in the test, relative-position
// invariance, and the CPU kernel against the oracle for every RoPE option.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/problem.h"
#include "core/storage.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {


// Rotates f32 rows of a bshd buffer the textbook way (NeoX halves), positions pos[row].
void rotate_buffer(std::vector<std::uint8_t>& buf, std::int64_t rows, std::int64_t heads, std::int64_t dim,
                   const std::vector<std::int64_t>& pos, double theta) {
  auto* x = reinterpret_cast<float*>(buf.data());
  const std::int64_t half = dim / 2;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < half; ++i) {
        const double a = static_cast<double>(pos[static_cast<std::size_t>(r)]) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
        float* row = x + (r * heads + h) * dim;
        const double x1 = row[i], x2 = row[i + half];
        row[i] = static_cast<float>(x1 * std::cos(a) - x2 * std::sin(a));
        row[i + half] = static_cast<float>(x1 * std::sin(a) + x2 * std::cos(a));
      }
}

TEST(Rope, OracleMatchesPreRotatedInputs) {
  const problem p = test::small_problem(9, 13, 2, 2, 8, dtype::f32, causal_mode::none, 4);
  problem_data with(p), pre(p);
  std::vector<std::int64_t> pos_q(9), pos_k(13);
  for (std::int64_t i = 0; i < 9; ++i) pos_q[static_cast<std::size_t>(i)] = 3 * i + 1;
  for (std::int64_t j = 0; j < 13; ++j) pos_k[static_cast<std::size_t>(j)] = 40 - 2 * j;
  rope_spec r;
  r.theta = 500.0;
  r.pos_q = pos_q.data();
  r.pos_k = pos_k.data();
  spec s;
  s.rope = &r;
  ASSERT_TRUE(run_problem(with, s, backend::reference, 1).ok());
  rotate_buffer(pre.q, 9, 2, 8, pos_q, 500.0);
  rotate_buffer(pre.k, 13, 2, 8, pos_k, 500.0);
  ASSERT_TRUE(run_problem(pre, spec{}, backend::reference, 1).ok());
  for (std::int64_t i = 0; i < 9; ++i)
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t e = 0; e < 8; ++e) EXPECT_NEAR(with.out_at(0, i, h, e), pre.out_at(0, i, h, e), 2e-6);
}

TEST(Rope, ShiftingEveryPositionLeavesTheOutputUnchanged) {
  // RoPE scores depend on position differences only.
  const problem p = test::small_problem(17, 17, 2, 1, 16, dtype::f32, causal_mode::top_left, 8);
  std::vector<std::int64_t> a(17), b(17);
  for (std::int64_t i = 0; i < 17; ++i) a[static_cast<std::size_t>(i)] = i, b[static_cast<std::size_t>(i)] = i + 1000;
  problem_data x(p), y(p);
  rope_spec ra, rb;
  ra.pos_q = ra.pos_k = a.data();
  rb.pos_q = rb.pos_k = b.data();
  spec sa, sb;
  sa.causal = sb.causal = p.causal;
  sa.rope = &ra;
  sb.rope = &rb;
  ASSERT_TRUE(run_problem(x, sa, backend::reference, 1).ok());
  ASSERT_TRUE(run_problem(y, sb, backend::reference, 1).ok());
  for (std::int64_t i = 0; i < 17; ++i)
    for (std::int64_t e = 0; e < 16; ++e) EXPECT_NEAR(x.out_at(0, i, 1, e), y.out_at(0, i, 1, e), 1e-5);
}

TEST(Rope, KernelMatchesOracleForEveryOption) {
  std::uint64_t seed = 11;
  for (dtype t : {dtype::f32, dtype::bf16})
    for (bool interleaved : {false, true})
      for (std::int64_t rotary : {0, 32})
        for (bool ids : {false, true})
          for (auto [lq, lk] : {std::pair<std::int64_t, std::int64_t>{70, 70}, {5, 130}}) {
            const problem p = test::small_problem(lq, lk, 4, 2, 64, t, causal_mode::bottom_right, seed++);
            std::vector<std::int64_t> pos_q, pos_k;
            for (std::int64_t i = 0; i < lq; ++i) pos_q.push_back((i * 7) % 23 + 100);
            for (std::int64_t j = 0; j < lk; ++j) pos_k.push_back((j * 5) % 31);
            rope_spec r;
            r.interleaved = interleaved;
            r.rotary_dim = rotary;
            if (ids) r.pos_q = pos_q.data(), r.pos_k = pos_k.data();
            spec s;
            s.causal = p.causal;
            s.rope = &r;
            EXPECT_TRUE(test::check_backend(p, s, backend::cpu)) << p.describe() << " interleaved=" << interleaved
                                                                 << " rotary=" << rotary << " ids=" << ids;
          }
}

TEST(Rope, MultiAxisSectionsAndVarlen) {
  problem p = test::small_problem(0, 0, 2, 2, 32, dtype::f32, causal_mode::none, 21);
  p.seqlens_q = {40, 0, 77};
  p.seqlens_k = {40, 9, 77};
  p.batch = 3;
  const std::int64_t tq = 117, tk = 126;
  std::vector<std::int64_t> pos_q(3 * tq), pos_k(3 * tk);  // [axes][rows]: time, height, width
  for (std::int64_t a = 0; a < 3; ++a) {
    for (std::int64_t r = 0; r < tq; ++r) pos_q[static_cast<std::size_t>(a * tq + r)] = (r * (a + 2)) % 17;
    for (std::int64_t r = 0; r < tk; ++r) pos_k[static_cast<std::size_t>(a * tk + r)] = (r * (a + 3)) % 19;
  }
  rope_spec r;
  r.sections = {8, 4, 4};
  r.pos_q = pos_q.data();
  r.pos_k = pos_k.data();
  spec s;
  s.rope = &r;
  EXPECT_TRUE(test::check_backend(p, s, backend::cpu));
}

TEST(Rope, BadSpecsAreRejected) {
  const problem p = test::small_problem(8, 8, 2, 2, 16, dtype::f32, causal_mode::none, 1);
  problem_data d(p);
  std::vector<std::int64_t> pos(8, 0);
  const auto error_of = [&](const rope_spec& r) {
    spec s;
    s.rope = &r;
    return run_problem(d, s, backend::cpu, 1).error;
  };
  rope_spec odd;
  odd.rotary_dim = 7;
  EXPECT_NE(error_of(odd).find("[attention] spec.rope.rotary_dim 7"), std::string::npos);
  rope_spec wide;
  wide.rotary_dim = 18;
  EXPECT_NE(error_of(wide).find("spec.rope.rotary_dim 18"), std::string::npos);
  rope_spec theta;
  theta.theta = -1.0;
  EXPECT_NE(error_of(theta).find("spec.rope.theta"), std::string::npos);
  rope_spec sections;
  sections.sections = {3, 3};
  sections.pos_q = sections.pos_k = pos.data();
  EXPECT_NE(error_of(sections).find("spec.rope.sections sum to 6 != rotary pairs 8"), std::string::npos);
  rope_spec one_side;
  one_side.pos_q = pos.data();
  EXPECT_NE(error_of(one_side).find("give both pos_q and pos_k"), std::string::npos);
}

}  // namespace
}  // namespace omniattn
