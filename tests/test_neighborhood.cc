// Grid-local masks: NATTEN's neighborhood attention (kernel, dilation, stride, causal per axis) and HaloNet's blocked
// local attention. Every reader (allows, row_bits, classify, grid_local::window) is checked pair by pair against rules
// written out independently here from their papers' / NATTEN's formulation; the CPU kernel is checked against the
// oracle on 1-D / 2-D / 3-D grids; the spec-string syntax round-trips and its errors name the problem.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "core/grid_local.h"
#include "core/problem.h"
#include "omniattn/neighborhood.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

// NATTEN's rule on one axis, in the form of its flex-attention mask (window centre clamped so that w / 2 keys fit on
// the left and w / 2 + w % 2 - 1 on the right; causal: the key is not after the query and within w of the stride
// group's last query). Deliberately not the start-clamp form masks.cc uses.
bool natten_axis(std::int64_t x, std::int64_t y, std::int64_t n, std::int64_t w, std::int64_t d, std::int64_t s, bool causal) {
  if (x % d != y % d) return false;
  const std::int64_t group = x % d;
  const std::int64_t len = n / d + (group < n % d ? 1 : 0);
  const std::int64_t q = x / d, k = y / d;
  if (causal) {
    const std::int64_t leader = std::min(q / s * s + s - 1, len - 1);
    return k <= q && leader - k < w;
  }
  const std::int64_t left = w / 2, right = w / 2 + w % 2 - 1;
  const std::int64_t leader = std::min(q / s * s + s / 2, len - 1);
  const std::int64_t centre = std::max(left, std::min(leader, len - 1 - right));
  return (k <= centre && centre - k <= left) || (k >= centre && k - centre <= right);
}

// HaloNet on one axis: the key lies within `halo` of the query's block (blocks of `block` coordinates, the last one
// possibly partial), and inside the grid.
bool halo_axis(std::int64_t x, std::int64_t y, std::int64_t n, std::int64_t block, std::int64_t halo) {
  const std::int64_t b0 = x / block * block, b1 = std::min(b0 + block, n) - 1;
  const std::int64_t nearest = std::clamp(y, b0, b1);
  return y >= 0 && y < n && std::abs(y - nearest) <= halo;
}

struct grid_case {
  std::vector<std::int64_t> grid, kernel, dilation, stride;
  std::vector<bool> causal;
  bool halo = false;  // then kernel = block sizes, dilation = halo sizes
};

mask_expr make_mask(const grid_case& c) {
  return c.halo ? mask_expr::halo(c.grid, c.kernel, c.dilation)
                : mask_expr::neighborhood(c.grid, c.kernel, c.dilation, c.causal, c.stride);
}

std::int64_t tokens_of(const grid_case& c) {
  std::int64_t t = 1;
  for (std::int64_t n : c.grid) t *= n;
  return t;
}

bool reference_allows(const grid_case& c, std::int64_t i, std::int64_t j) {
  for (std::size_t a = c.grid.size(); a-- > 0;) {
    const std::int64_t n = c.grid[a], x = i % n, y = j % n;
    const bool ok = c.halo ? halo_axis(x, y, n, c.kernel[a], c.dilation[a])
                           : natten_axis(x, y, n, c.kernel[a], c.dilation[a], c.stride[a], c.causal[a]);
    if (!ok) return false;
    i /= n;
    j /= n;
  }
  return true;
}

std::string describe(const grid_case& c) { return make_mask(c).str(); }

// All readers against the reference on every pair, plus keys / queries past the grid (lq, lk larger than the grid).
void check_all_readers(const grid_case& c, std::mt19937_64& rng) {
  const mask_expr m = make_mask(c);
  SCOPED_TRACE(describe(c));
  ASSERT_EQ(m.check(), "");
  const std::int64_t tokens = tokens_of(c), lq = tokens + 3, lk = tokens + 5;
  std::vector<char> want(static_cast<std::size_t>(lq * lk), 0);
  for (std::int64_t i = 0; i < lq; ++i)
    for (std::int64_t j = 0; j < lk; ++j) {
      const bool w = i < tokens && j < tokens && reference_allows(c, i, j);
      want[static_cast<std::size_t>(i * lk + j)] = w;
      ASSERT_EQ(m.allows(0, 0, i, j, lq, lk), w) << "allows i=" << i << " j=" << j;
    }
  // grid_local::window, the kernels' view, agrees with allows() for every pair on the grid.
  const auto g = detail::as_grid_local(m);
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->tokens(), tokens);
  for (std::int64_t i = 0; i < tokens; ++i) {
    std::int64_t qc[3], rest = i;
    for (int a = g->rank - 1; a >= 0; --a) qc[a] = rest % g->grid[a], rest /= g->grid[a];
    for (std::int64_t j = 0; j < tokens; ++j) {
      bool in = true;
      rest = j;
      for (int a = g->rank - 1; a >= 0; --a) {
        const detail::axis_window w = g->window(a, qc[a]);
        const std::int64_t kc = rest % g->grid[a];
        rest /= g->grid[a];
        bool hit = false;
        for (std::int64_t t = 0; t < w.count; ++t) hit |= w.first + t * w.step == kc;
        in &= hit;
      }
      ASSERT_EQ(in, static_cast<bool>(want[static_cast<std::size_t>(i * lk + j)])) << "window i=" << i << " j=" << j;
    }
  }
  // row_bits: every row over aligned 64-key blocks, and random unaligned ranges.
  const auto bits_want = [&](std::int64_t i, std::int64_t k0, std::int64_t n) {
    std::uint64_t b = 0;
    for (std::int64_t x = 0; x < n; ++x) b |= static_cast<std::uint64_t>(want[static_cast<std::size_t>(i * lk + k0 + x)]) << x;
    return b;
  };
  for (std::int64_t i = 0; i < lq; ++i) {
    for (std::int64_t k0 = 0; k0 < lk; k0 += 64) {
      const std::int64_t n = std::min<std::int64_t>(64, lk - k0);
      ASSERT_EQ(m.row_bits(0, 0, i, k0, n, lq, lk), bits_want(i, k0, n)) << "row_bits i=" << i << " k0=" << k0;
    }
    const std::int64_t k0 = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(lk));
    const std::int64_t n = 1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(std::min<std::int64_t>(64, lk - k0)));
    ASSERT_EQ(m.row_bits(0, 0, i, k0, n, lq, lk), bits_want(i, k0, n)) << "row_bits i=" << i << " k0=" << k0 << " n=" << n;
  }
  // classify: random tiles and regular tilings of several sizes.
  const auto tile_want = [&](std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) {
    std::int64_t allowed = 0;
    for (std::int64_t i = q0; i < q1; ++i)
      for (std::int64_t j = k0; j < k1; ++j) allowed += want[static_cast<std::size_t>(i * lk + j)];
    return allowed == 0 ? tile_kind::empty : allowed == (q1 - q0) * (k1 - k0) ? tile_kind::full : tile_kind::partial;
  };
  const auto check_tile = [&](std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) {
    ASSERT_EQ(static_cast<int>(m.classify(0, 0, q0, q1, k0, k1, lq, lk)), static_cast<int>(tile_want(q0, q1, k0, k1)))
        << "classify [" << q0 << "," << q1 << ") x [" << k0 << "," << k1 << ")";
  };
  for (int t = 0; t < 60; ++t) {
    std::int64_t q0 = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(lq)), q1 = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(lq));
    std::int64_t k0 = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(lk)), k1 = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(lk));
    if (q0 > q1) std::swap(q0, q1);
    if (k0 > k1) std::swap(k0, k1);
    check_tile(q0, q1 + 1, k0, k1 + 1);
  }
  for (std::int64_t tq : {1, 4, 7, 16}) {
    const std::int64_t tk = tq == 1 ? 1 : 2 * tq - 1;
    for (std::int64_t q0 = 0; q0 < lq; q0 += tq)
      for (std::int64_t k0 = 0; k0 < lk; k0 += tk) check_tile(q0, std::min(q0 + tq, lq), k0, std::min(k0 + tk, lk));
  }
}

std::int64_t pick(std::mt19937_64& rng, std::int64_t lo, std::int64_t hi) {
  return lo + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(hi - lo + 1));
}

grid_case random_neighborhood(std::mt19937_64& rng) {
  grid_case c;
  const int rank = static_cast<int>(pick(rng, 1, 3));
  const std::int64_t max_n = rank == 1 ? 70 : rank == 2 ? 15 : 7;
  for (int a = 0; a < rank; ++a) {
    const std::int64_t n = pick(rng, 1, max_n);
    const std::int64_t d = pick(rng, 0, 2) == 0 ? pick(rng, 1, n) : 1;
    const std::int64_t k = pick(rng, 1, n / d);
    c.grid.push_back(n);
    c.dilation.push_back(d);
    c.kernel.push_back(k);
    c.stride.push_back(pick(rng, 0, 1) ? pick(rng, 1, k) : 1);
    c.causal.push_back(pick(rng, 0, 2) == 0);
  }
  return c;
}

grid_case random_halo(std::mt19937_64& rng) {
  grid_case c;
  c.halo = true;
  const int rank = static_cast<int>(pick(rng, 1, 3));
  const std::int64_t max_n = rank == 1 ? 70 : rank == 2 ? 15 : 7;
  for (int a = 0; a < rank; ++a) {
    const std::int64_t n = pick(rng, 1, max_n);
    c.grid.push_back(n);
    c.kernel.push_back(pick(rng, 1, n));
    c.dilation.push_back(pick(rng, 0, n));
  }
  return c;
}

TEST(Neighborhood, ExplicitCasesMatchNattensRuleInEveryReader) {
  std::mt19937_64 rng(500);
  const grid_case cases[] = {
      {{13}, {5}, {1}, {1}, {false}},                 // odd length
      {{13}, {13}, {1}, {1}, {false}},                // kernel = grid: dense
      {{11}, {3}, {2}, {1}, {false}},                 // dilation not dividing the length (groups of 6 and 5)
      {{10}, {4}, {1}, {1}, {false}},                 // even kernel: 2 keys left, 1 right
      {{17}, {5}, {1}, {3}, {false}},                 // stride > 1, 17 not a multiple of 3
      {{17}, {5}, {1}, {2}, {true}},                  // causal with stride
      {{16}, {4}, {1}, {4}, {false}},                 // stride = kernel: blocked windows
      {{19}, {3}, {3}, {3}, {false}},                 // dilation and stride together
      {{9, 12}, {3, 5}, {1, 1}, {1, 1}, {false, false}},
      {{9, 12}, {3, 5}, {2, 1}, {2, 5}, {true, false}},   // causal on the first axis only, stride = kernel on the second
      {{7, 10}, {7, 10}, {1, 1}, {1, 1}, {false, false}}, // dense
      {{5, 6, 7}, {3, 3, 5}, {1, 2, 1}, {1, 1, 2}, {true, false, false}},
      {{4, 5, 6}, {2, 5, 3}, {2, 1, 2}, {2, 5, 1}, {false, true, true}},
  };
  for (const grid_case& c : cases) {
    check_all_readers(c, rng);
    if (HasFatalFailure()) return;
  }
}

TEST(Neighborhood, RandomParametersMatchNattensRuleInEveryReader) {
  std::mt19937_64 rng(501);
  const int n = test::full_intensity() ? 400 : 60;
  for (int it = 0; it < n; ++it) {
    check_all_readers(random_neighborhood(rng), rng);
    if (HasFatalFailure()) return;
  }
}

TEST(Halo, ExplicitAndRandomCasesMatchTheDefinitionInEveryReader) {
  std::mt19937_64 rng(502);
  const grid_case cases[] = {
      {{20}, {8}, {3}, {}, {}, true},                  // block not dividing the grid: a partial last block
      {{20}, {4}, {0}, {}, {}, true},                  // halo 0: plain block attention
      {{9, 11}, {4, 3}, {1, 2}, {}, {}, true},
      {{5, 6, 7}, {2, 4, 3}, {1, 0, 2}, {}, {}, true},
      {{6, 6}, {6, 6}, {0, 0}, {}, {}, true},          // one block: dense
  };
  for (const grid_case& c : cases) {
    check_all_readers(c, rng);
    if (HasFatalFailure()) return;
  }
  const int n = test::full_intensity() ? 300 : 40;
  for (int it = 0; it < n; ++it) {
    check_all_readers(random_halo(rng), rng);
    if (HasFatalFailure()) return;
  }
}

// NATTEN's window start for odd kernels without dilation or stride: max(i - r, 0) + (i + r >= L) * (L - i - r - 1).
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

TEST(Neighborhood, StrideWorkedExamples) {
  // 1-D, n = 10, kernel 3, stride 2: query pairs {0,1}, {2,3}, ... share the window of their centre query 2g + 1:
  // starts clamp(2g + 1 - 1, 0, 7) = 0, 2, 4, 6, 7.
  const mask_expr m = mask_expr::neighborhood({10}, {3}, {}, {}, {2});
  const auto keys = [](const mask_expr& e, std::int64_t q) {
    std::vector<std::int64_t> out;
    for (std::int64_t j = 0; j < 10; ++j)
      if (e.allows(0, 0, q, j, 10, 10)) out.push_back(j);
    return out;
  };
  using v = std::vector<std::int64_t>;
  EXPECT_EQ(keys(m, 0), (v{0, 1, 2}));
  EXPECT_EQ(keys(m, 1), (v{0, 1, 2}));
  EXPECT_EQ(keys(m, 2), (v{2, 3, 4}));
  EXPECT_EQ(keys(m, 5), (v{4, 5, 6}));
  EXPECT_EQ(keys(m, 8), (v{7, 8, 9}));
  EXPECT_EQ(keys(m, 9), (v{7, 8, 9}));
  // Causal, same sizes: the leader is the pair's last query 2g + 1, the window starts at max(leader - 2, 0) and ends
  // at the query itself.
  const mask_expr c = mask_expr::neighborhood({10}, {3}, {}, {true}, {2});
  EXPECT_EQ(keys(c, 0), (v{0}));
  EXPECT_EQ(keys(c, 1), (v{0, 1}));
  EXPECT_EQ(keys(c, 2), (v{1, 2}));
  EXPECT_EQ(keys(c, 3), (v{1, 2, 3}));
  EXPECT_EQ(keys(c, 9), (v{7, 8, 9}));
  // Stride = kernel, dividing the grid: blocked (Swin-style) window attention, on every axis.
  const mask_expr blocked = mask_expr::neighborhood({12, 8}, {4, 2}, {}, {}, {4, 2});
  for (std::int64_t i = 0; i < 96; ++i)
    for (std::int64_t j = 0; j < 96; ++j)
      ASSERT_EQ(blocked.allows(0, 0, i, j, 96, 96), (i / 8) / 4 == (j / 8) / 4 && (i % 8) / 2 == (j % 8) / 2) << i << " " << j;
  // A single value applies to every axis.
  EXPECT_EQ(mask_expr::neighborhood({6, 6}, {3}, {2}, {true}, {1}).str(),
            "neighborhood(grid=6x6,kernel=3x3,dilation=2x2,stride=1x1,causal=1x1)");
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
}

TEST(Neighborhood, CheckNamesTheBrokenRule) {
  const auto why = [](const mask_expr& m) { return m.check(); };
  const auto has = [](const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos ? ::testing::AssertionSuccess()
                                                : ::testing::AssertionFailure() << "'" << text << "' lacks '" << part << "'";
  };
  EXPECT_TRUE(has(why(mask_expr::neighborhood({5, 5}, {7, 3})), "neighborhood: kernel 7 x dilation 1 must be in 1..grid 5 (axis 0)"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({10}, {3}, {4})), "kernel 3 x dilation 4 must be in 1..grid 10"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({5}, {3}, {2, 2})), "neighborhood: dilation has 2 values for a rank-1 grid"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({5, 5, 5}, {3, 3})), "neighborhood: kernel has 2 values for a rank-3 grid"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({5, 5}, {})), "neighborhood: kernel has 0 values"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({8}, {3}, {}, {}, {4})), "neighborhood: stride 4 must be in 1..kernel 3 (axis 0)"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({8}, {3}, {}, {}, {0})), "stride 0 must be in 1..kernel 3"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({8, 8}, {3}, {}, {}, {1, 1, 1})), "stride has 3 values for a rank-2 grid"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({8, 8}, {3}, {}, {true, false, true})), "causal has 3 values"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({8}, {3}, {0})), "neighborhood: dilation 0 must be in 1..grid 8"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({}, {})), "neighborhood: grid rank 0 must be 1, 2 or 3"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({4, 4, 4, 4}, {3})), "neighborhood: grid rank 4 must be 1, 2 or 3"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({0}, {1})), "neighborhood: grid size 0 must be in 1..2^40"));
  EXPECT_TRUE(has(why(mask_expr::neighborhood({1 << 20, 1 << 20, 1 << 20}, {3})), "more than 2^40 tokens"));
  EXPECT_TRUE(has(why(mask_expr::halo({8}, {0}, {1})), "halo: block 0 must be in 1..grid 8 (axis 0)"));
  EXPECT_TRUE(has(why(mask_expr::halo({8}, {9}, {1})), "halo: block 9 must be in 1..grid 8"));
  EXPECT_TRUE(has(why(mask_expr::halo({8}, {2}, {-1})), "halo: halo -1 must be in 0..grid 8"));
  EXPECT_TRUE(has(why(mask_expr::halo({8, 8}, {2}, {})), "halo: halo has 0 values for a rank-2 grid"));
  // Inside a composition too, and the valid forms pass.
  EXPECT_FALSE((mask_expr::sinks(1) | mask_expr::neighborhood({8}, {3}, {}, {}, {4})).check().empty());
  EXPECT_EQ(mask_expr::neighborhood({8, 9}, {3, 9}, {2, 1}, {true, false}, {3, 9}).check(), "");
  EXPECT_EQ(mask_expr::halo({8, 9}, {3}, {0, 9}).check(), "");
  // An invalid pattern has no grid-local view; compositions have none either.
  EXPECT_FALSE(detail::as_grid_local(mask_expr::neighborhood({8}, {9})).has_value());
  EXPECT_FALSE(detail::as_grid_local(mask_expr::neighborhood({8}, {3}) | mask_expr::sinks(1)).has_value());
  const auto g = detail::as_grid_local(mask_expr::neighborhood({8, 9}, {3, 5}, {2, 1}, {false, true}, {3, 2}));
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->type, detail::grid_local::kind::neighborhood);
  EXPECT_EQ(g->rank, 2);
  EXPECT_EQ(g->stride[0], 3);
  EXPECT_EQ(g->stride[1], 2);
  EXPECT_EQ(g->dilation[0], 2);
  EXPECT_TRUE(g->causal[1]);
  const auto h = detail::as_grid_local(mask_expr::halo({8, 9}, {4, 3}, {1, 2}));
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->type, detail::grid_local::kind::halo);
  EXPECT_EQ(h->block[1], 3);
  EXPECT_EQ(h->halo[1], 2);
}

TEST(Neighborhood, SpecStrings) {
  mask_expr m;
  ASSERT_EQ(parse_mask("neighborhood(64x64, 7x7)", m), "");
  EXPECT_EQ(m.str(), "neighborhood(grid=64x64,kernel=7x7,dilation=1x1,stride=1x1,causal=0x0)");
  ASSERT_EQ(parse_mask("neighborhood(grid=16x32x32, kernel=3x7x7, stride=1x2x2, causal=1x0x0)", m), "");
  EXPECT_EQ(m.str(), "neighborhood(grid=16x32x32,kernel=3x7x7,dilation=1x1x1,stride=1x2x2,causal=1x0x0)");
  ASSERT_EQ(parse_mask("neighborhood(20 x 20, 5, 2, 5, 1)", m), "");  // all positional, one value for every axis
  EXPECT_EQ(m.str(), "neighborhood(grid=20x20,kernel=5x5,dilation=2x2,stride=5x5,causal=1x1)");
  ASSERT_EQ(parse_mask("halo(grid=64x64, block=8x8, halo=3)", m), "");
  EXPECT_EQ(m.str(), "halo(grid=64x64,block=8x8,halo=3x3)");
  // The printed form parses back to itself, also inside compositions.
  ASSERT_EQ(parse_mask("neighborhood(9x10, 3x5, dilation=1x2) | global_tokens(2) & ~halo(90, 9, 1)", m), "");
  mask_expr again;
  ASSERT_EQ(parse_mask(m.str(), again), "");
  EXPECT_EQ(again.str(), m.str());
  // The parsed pattern is the C++ one.
  const mask_expr direct = mask_expr::neighborhood({9, 10}, {3, 5}, {1, 2}, {true, false}, {3, 1});
  ASSERT_EQ(parse_mask("neighborhood(9x10, 3x5, 1x2, 3x1, 1x0)", m), "");
  for (std::int64_t i = 0; i < 90; ++i)
    for (std::int64_t j = 0; j < 90; ++j) ASSERT_EQ(m.allows(0, 0, i, j, 90, 90), direct.allows(0, 0, i, j, 90, 90));

  const auto error_of = [](const char* text) {
    mask_expr out;
    return parse_mask(text, out);
  };
  const auto has = [](const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos ? ::testing::AssertionSuccess()
                                                : ::testing::AssertionFailure() << "'" << text << "' lacks '" << part << "'";
  };
  EXPECT_TRUE(has(error_of("neighborhood(8x8, 9)"), "neighborhood: kernel 9 x dilation 1 must be in 1..grid 8"));
  EXPECT_TRUE(has(error_of("neighborhood(8, 3, stride=4)"), "stride 4 must be in 1..kernel 3"));
  EXPECT_TRUE(has(error_of("neighborhood(8, kernel=3, 2)"), "a positional value after key=value ones"));
  EXPECT_TRUE(has(error_of("neighborhood(8, 3, size=1)"), "neighborhood: unknown key 'size' (known: grid kernel dilation stride causal)"));
  EXPECT_TRUE(has(error_of("neighborhood(8, 3, causal=2)"), "neighborhood: causal values must be 0 or 1"));
  EXPECT_TRUE(has(error_of("neighborhood(8)"), "neighborhood: kernel is required"));
  EXPECT_TRUE(has(error_of("neighborhood(8, 3, kernel=3)"), "neighborhood: kernel given twice"));
  EXPECT_TRUE(has(error_of("neighborhood(8x8x8x8, 3)"), "neighborhood: more than 3 axes"));
  EXPECT_TRUE(has(error_of("neighborhood(8, 3, 1, 1, 0, 7)"), "neighborhood takes at most 5 values"));
  EXPECT_TRUE(has(error_of("neighborhood(8, )"), "expected per-axis sizes"));
  EXPECT_TRUE(has(error_of("neighborhood(8x, 3)"), "expected per-axis sizes"));
  EXPECT_TRUE(has(error_of("halo(8, 2)"), "halo: halo is required"));
  EXPECT_TRUE(has(error_of("halo(8, 2, kernel=1)"), "halo: unknown key 'kernel' (known: grid block halo)"));
  EXPECT_TRUE(has(error_of("halo(8, 9, 1)"), "halo: block 9 must be in 1..grid 8"));
  EXPECT_EQ(error_of("neighborhood(8, 3").rfind("[spec] at ", 0), 0u);
}

// ------------------------------------------------------------------------------------------------------------------
// The CPU kernel against the oracle.

problem grid_problem(std::int64_t tokens, std::uint64_t seed) {
  problem p;
  p.seq_q = p.seq_k = tokens;
  p.heads_q = 4;
  p.heads_kv = 2;  // GQA
  p.dim_qk = p.dim_v = 32;
  p.seed = seed;
  return p;
}

TEST(Neighborhood, KernelRunsEveryRankAgainstTheOracle) {
  const grid_case cases[] = {
      {{97}, {13}, {1}, {1}, {false}},                           // 1-D
      {{101}, {7}, {3}, {1}, {true}},                            // 1-D causal, dilation not dividing the length
      {{101}, {9}, {1}, {4}, {false}},                           // 1-D strided
      {{13, 11}, {5, 3}, {1, 2}, {1, 1}, {false, false}},        // 2-D odd grid, dilated columns
      {{14, 15}, {5, 5}, {1, 1}, {5, 2}, {false, true}},         // 2-D strided, causal columns
      {{4, 6, 5}, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}, {true, false, false}},  // 3-D video-like, causal in time
      {{4, 6, 6}, {2, 3, 3}, {1, 2, 1}, {2, 3, 3}, {false, false, false}}, // 3-D blocked in space, dilated
      {{9, 10}, {9, 10}, {1, 1}, {1, 1}, {false, false}},        // kernel = grid: dense
      {{30}, {8}, {3}, {}, {}, true},                            // halo 1-D, block not dividing the grid
      {{12, 10}, {4, 4}, {2, 1}, {}, {}, true},                  // halo 2-D
      {{3, 8, 9}, {1, 4, 4}, {1, 2, 2}, {}, {}, true},           // halo 3-D
  };
  std::uint64_t seed = 300;
  for (const grid_case& c : cases) {
    spec s;
    s.mask = make_mask(c);
    ASSERT_EQ(s.mask.check(), "");
    problem p = grid_problem(tokens_of(c), seed++);
    EXPECT_TRUE(test::check_backend(p, s, backend::cpu)) << s.mask.str();
    p.type = dtype::bf16;
    EXPECT_TRUE(test::check_backend(p, s, backend::cpu)) << s.mask.str();
  }
}

TEST(Neighborhood, KernelEqualToTheGridIsDenseAttention) {
  problem p;
  p.seq_q = p.seq_k = 90;
  p.heads_q = p.heads_kv = 2;
  p.dim_qk = p.dim_v = 16;
  for (bool use_halo : {false, true}) {
    problem_data a(p), b(p);
    spec s;
    s.mask = use_halo ? mask_expr::halo({9, 10}, {3, 10}, {6, 0}) : mask_expr::neighborhood({9, 10}, {9, 10});
    ASSERT_TRUE(run_problem(a, s, backend::reference, 1).ok());
    ASSERT_TRUE(run_problem(b, spec{}, backend::reference, 1).ok());
    EXPECT_EQ(a.out, b.out) << s.mask.str();
  }
}

TEST(Neighborhood, GlobalTokensAndAdditionalKeys) {
  // NATTEN's "additional KV": extra keys after the grid's tokens that every query sees, i.e. neighborhood | keys >= T
  // (~sinks(T)); and global tokens at the front that see and are seen by everything.
  const std::int64_t tokens = 8 * 9;
  spec s;
  s.mask = mask_expr::neighborhood({8, 9}, {3, 3}, {1, 2}, {false, false}, {1, 1}) | ~mask_expr::sinks(tokens);
  problem p = grid_problem(tokens, 320);
  p.seq_k = tokens + 11;
  EXPECT_TRUE(test::check_backend(p, s, backend::cpu)) << s.mask.str();
  for (std::int64_t j = tokens; j < tokens + 11; ++j) EXPECT_TRUE(s.mask.allows(0, 0, 5, j, tokens, tokens + 11));
  spec g;
  g.mask = mask_expr::neighborhood({8, 9}, {3, 5}) | mask_expr::global_tokens(4);
  EXPECT_TRUE(test::check_backend(grid_problem(tokens, 321), g, backend::cpu)) << g.mask.str();
  EXPECT_TRUE(g.mask.allows(0, 0, 70, 2, tokens, tokens));
  EXPECT_TRUE(g.mask.allows(0, 0, 1, 70, tokens, tokens));
}

TEST(HeadsLast, SpatialAxesFlattenIntoTheSequenceAxis) {
  float buffer[1];
  tensor t;
  // Contiguous [2, 5, 6, 4, 8]: the sequence axis has 30 tokens of stride 4 * 8.
  ASSERT_TRUE(make_heads_last(buffer, dtype::f32, {2, 5, 6, 4, 8}, {5 * 6 * 4 * 8, 6 * 4 * 8, 4 * 8, 8, 1}, t).ok());
  EXPECT_EQ(t.batch, 2);
  EXPECT_EQ(t.seq, 30);
  EXPECT_EQ(t.heads, 4);
  EXPECT_EQ(t.dim, 8);
  EXPECT_EQ(t.stride_seq, 32);
  EXPECT_EQ(t.stride_head, 8);
  const tensor c = make_heads_last(buffer, dtype::f32, 2, {5, 6}, 4, 8);
  EXPECT_EQ(c.seq, t.seq);
  EXPECT_EQ(c.stride_seq, t.stride_seq);
  EXPECT_EQ(c.stride_batch, t.stride_batch);
  // A strided 3-D view (every other batch entry, heads padded to 10) still merges; a size-1 axis merges with anything.
  ASSERT_TRUE(make_heads_last(buffer, dtype::bf16, {3, 2, 1, 7, 4, 8}, {9999, 7 * 80, 12345, 80, 10, 1}, t).ok());
  EXPECT_EQ(t.seq, 14);
  EXPECT_EQ(t.stride_seq, 80);
  EXPECT_EQ(t.type, dtype::bf16);
  // Swapped spatial axes (a transposed image) cannot be one strided axis.
  tensor untouched;
  untouched.seq = -7;
  const status st = make_heads_last(buffer, dtype::f32, {2, 5, 6, 4, 8}, {240, 32, 160, 8, 1}, untouched);
  EXPECT_NE(st.error.find("[heads_last] spatial axes 1 and 2 do not merge into one sequence axis: stride[1] 32 != stride 160 x 6"),
            std::string::npos)
      << st.error;
  EXPECT_EQ(untouched.seq, -7);
  EXPECT_NE(make_heads_last(buffer, dtype::f32, {2, 4, 8}, {32, 8, 1}, t).error.find("shape has 3 axes"), std::string::npos);
  EXPECT_NE(make_heads_last(buffer, dtype::f32, {2, 3, 4, 8}, {32, 8, 1}, t).error.find("strides has 3 entries"), std::string::npos);
}

TEST(HeadsLast, NeighborhoodAttentionOnAHeadsLastBufferMatchesTheOracle) {
  // [batch 2, 6, 7, heads 4, dim 16] with 2 K/V heads, read through make_heads_last and run on both backends.
  problem p = grid_problem(42, 330);
  p.batch = 2;
  p.dim_qk = p.dim_v = 16;
  problem_data cpu(p), ref(p);
  spec s;
  s.mask = mask_expr::neighborhood({6, 7}, {3, 5}, {1, 1}, {false, true}, {2, 1});
  for (problem_data* d : {&cpu, &ref}) {
    const auto view = [&](std::vector<std::uint8_t>& bytes, std::int64_t heads, std::int64_t dim) {
      return make_heads_last(bytes.data(), dtype::f32, 2, {6, 7}, heads, dim);
    };
    options o = d->make_options(d == &cpu ? backend::cpu : backend::reference);
    const lse_tensor l = d->lse_view();
    o.lse = &l;
    ASSERT_TRUE(attention(view(d->q, 4, 16), view(d->k, 2, 16), view(d->v, 2, 16), view(d->out, 4, 16), s, o).ok());
  }
  const test::references r = test::make_references(p, s);
  EXPECT_TRUE(test::within_tolerance(cpu, r));
  EXPECT_TRUE(test::within_tolerance(ref, r));
}

}  // namespace
}  // namespace omniattn
