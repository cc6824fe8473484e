// Neighborhood attention (NATTEN semantics) as a mask pattern: against NATTEN's window-start formula written out
// independently, kernel = grid equals dense attention, and the CPU kernel against the oracle on 1-D / 2-D / 3-D grids
// with dilation and per-axis causality.
#include <gtest/gtest.h>

#include <vector>

#include "core/problem.h"
#include "omniattn/omniattn.h"
#include "tolerance.h"

namespace omniattn {
namespace {

// NATTEN's 1-D window start for odd kernels without dilation: max(i - r, 0) + (i + r >= L) * (L - i - r - 1).
std::int64_t natten_start(std::int64_t i, std::int64_t length, std::int64_t kernel) {
  const std::int64_t r = kernel / 2;
  return std::max<std::int64_t>(i - r, 0) + (i + r >= length ? length - i - r - 1 : 0);
}

TEST(Neighborhood, TwoDimensionalMatchesNattenWindowStarts) {
  const std::int64_t rows = 9, cols = 12, kr = 3, kc = 5;
  const mask_expr m = mask_expr::neighborhood({rows, cols}, {kr, kc});
  ASSERT_EQ(m.check(), "");
  for (std::int64_t q = 0; q < rows * cols; ++q) {
    const std::int64_t qr = q / cols, qc = q % cols;
    const std::int64_t r0 = natten_start(qr, rows, kr), c0 = natten_start(qc, cols, kc);
    std::int64_t seen = 0;
    for (std::int64_t k = 0; k < rows * cols; ++k) {
      const std::int64_t kr_ = k / cols, kc_ = k % cols;
      const bool want = kr_ >= r0 && kr_ < r0 + kr && kc_ >= c0 && kc_ < c0 + kc;
      EXPECT_EQ(m.allows(0, 0, q, k, rows * cols, rows * cols), want) << "q " << q << " k " << k;
      seen += want;
    }
    EXPECT_EQ(seen, kr * kc);  // shifted, not clipped: every query sees the whole kernel
  }
}

TEST(Neighborhood, DilationAndCausalAxes) {
  // 1-D, length 11, kernel 3, dilation 2: groups {0,2,..,10} (6 tokens) and {1,3,..,9} (5 tokens).
  const mask_expr m = mask_expr::neighborhood({11}, {3}, {2});
  EXPECT_TRUE(m.allows(0, 0, 0, 0, 11, 11));
  EXPECT_TRUE(m.allows(0, 0, 0, 4, 11, 11));   // group 0: query coordinate 0 sees group coordinates 0..2
  EXPECT_FALSE(m.allows(0, 0, 0, 6, 11, 11));
  EXPECT_FALSE(m.allows(0, 0, 0, 1, 11, 11));  // other dilation group
  EXPECT_TRUE(m.allows(0, 0, 10, 6, 11, 11));  // the window shifts left at the end: coordinates 3..5
  EXPECT_FALSE(m.allows(0, 0, 10, 4, 11, 11));
  // Causal on the first axis of a 2-D grid: only the current and previous kernel-1 rows.
  const mask_expr c = mask_expr::neighborhood({6, 6}, {3, 3}, {1, 1}, {true, false});
  EXPECT_TRUE(c.allows(0, 0, 3 * 6 + 2, 1 * 6 + 2, 36, 36));
  EXPECT_FALSE(c.allows(0, 0, 3 * 6 + 2, 4 * 6 + 2, 36, 36));
  EXPECT_FALSE(c.allows(0, 0, 3 * 6 + 2, 0 * 6 + 2, 36, 36));
  EXPECT_NE(mask_expr::neighborhood({5, 5}, {7, 3}).check(), "");
  EXPECT_NE(mask_expr::neighborhood({5}, {3}, {2, 2}).check(), "");
}

TEST(Neighborhood, KernelRunsEveryRankAgainstTheOracle) {
  struct config {
    std::vector<std::int64_t> grid, kernel, dilation;
    std::vector<bool> causal;
  };
  const config configs[] = {
      {{97}, {13}, {1}, {false}},                 // 1-D
      {{101}, {7}, {3}, {true}},                  // 1-D causal, dilation that does not divide the length
      {{13, 11}, {5, 3}, {1, 2}, {false, false}},  // 2-D odd grid, dilated columns
      {{4, 6, 5}, {3, 3, 3}, {1, 1, 1}, {true, false, false}},  // 3-D video-like, causal in time
      {{9, 10}, {9, 10}, {1, 1}, {false, false}},  // kernel = grid: dense
  };
  std::uint64_t seed = 300;
  for (const config& c : configs) {
    std::int64_t tokens = 1;
    for (std::int64_t n : c.grid) tokens *= n;
    problem p;
    p.seq_q = p.seq_k = tokens;
    p.heads_q = 4;
    p.heads_kv = 2;
    p.dim_qk = p.dim_v = 32;
    p.seed = seed++;
    spec s;
    s.mask = mask_expr::neighborhood(c.grid, c.kernel, c.dilation, c.causal);
    ASSERT_EQ(s.mask.check(), "");
    EXPECT_TRUE(test::check_backend(p, s, backend::cpu)) << s.mask.str();
    for (dtype t : {dtype::bf16}) {
      problem pb = p;
      pb.type = t;
      EXPECT_TRUE(test::check_backend(pb, s, backend::cpu)) << s.mask.str();
    }
  }
  // kernel = grid is exactly dense attention.
  problem p;
  p.seq_q = p.seq_k = 90;
  p.heads_q = p.heads_kv = 2;
  p.dim_qk = p.dim_v = 16;
  problem_data a(p), b(p);
  spec s;
  s.mask = mask_expr::neighborhood({9, 10}, {9, 10});
  ASSERT_TRUE(run_problem(a, s, backend::reference, 1).ok());
  ASSERT_TRUE(run_problem(b, spec{}, backend::reference, 1).ok());
  EXPECT_EQ(a.out, b.out);
}

}  // namespace
}  // namespace omniattn
