// Mask expressions: built-in patterns in closed form, composition, and tile classification.
//
// Every built-in pattern except dilated allows, for each query row i, one interval of keys [lo(i), hi(i)), and lo, hi
// never decrease as i grows. That gives exact tile classes from two rows: a tile [q0, q1) x [k0, k1) is FULL iff
// lo(q1 - 1) <= k0 and hi(q0) >= k1, and non-empty iff the first row whose interval ends after k0 starts before k1.
// Compositions classify their children and, when that leaves the tile PARTIAL, settle it exactly from the row bits.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "omniattn/masks.h"
#include "omniattn/spec.h"

namespace omniattn {
namespace {

constexpr std::int64_t k_unbounded = std::int64_t{1} << 60;

std::uint64_t span_bits(std::int64_t lo, std::int64_t hi, std::int64_t k0, std::int64_t n) {
  // Bits of keys k0 + t, t < n, that fall in [lo, hi).
  const std::int64_t a = std::clamp<std::int64_t>(lo - k0, 0, n), b = std::clamp<std::int64_t>(hi - k0, 0, n);
  if (a >= b) return 0;
  const std::uint64_t upto_b = b >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << b) - 1;
  const std::uint64_t upto_a = (std::uint64_t{1} << a) - 1;
  return upto_b & ~upto_a;
}

std::uint64_t low_bits(std::int64_t n) { return n >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << n) - 1; }

std::int64_t offset_of(std::uint8_t align, std::int64_t lq, std::int64_t lk) {
  return static_cast<causal_mode>(align) == causal_mode::bottom_right ? lk - lq : 0;
}

const char* align_name(std::uint8_t align) {
  return static_cast<causal_mode>(align) == causal_mode::top_left ? "top_left" : "bottom_right";
}

}  // namespace

mask_expr mask_expr::leaf(node n) {
  mask_expr m;
  m.nodes_.push_back(n);
  m.root_ = 0;
  return m;
}

int mask_expr::append(const mask_expr& other) {
  const int base = static_cast<int>(nodes_.size());
  const int tbase = static_cast<int>(tables_.size()), fbase = static_cast<int>(fns_.size());
  for (node n : other.nodes_) {
    if (n.lhs >= 0) n.lhs += base;
    if (n.rhs >= 0) n.rhs += base;
    if (n.table >= 0) n.table += n.kind == op::predicate ? fbase : tbase;
    nodes_.push_back(n);
  }
  tables_.insert(tables_.end(), other.tables_.begin(), other.tables_.end());
  fns_.insert(fns_.end(), other.fns_.begin(), other.fns_.end());
  names_.insert(names_.end(), other.names_.begin(), other.names_.end());
  return other.root_ + base;
}

mask_expr mask_expr::combine(op kind, const mask_expr& a, const mask_expr* b) {
  mask_expr m;
  node n;
  n.kind = kind;
  n.lhs = m.append(a.root_ >= 0 ? a : full());
  if (b) n.rhs = m.append(b->root_ >= 0 ? *b : full());
  m.nodes_.push_back(n);
  m.root_ = static_cast<int>(m.nodes_.size()) - 1;
  return m;
}

mask_expr operator&(const mask_expr& a, const mask_expr& b) {
  if (!a) return b;
  if (!b) return a;
  return mask_expr::combine(mask_expr::op::and_, a, &b);
}
mask_expr operator|(const mask_expr& a, const mask_expr& b) {
  if (!a || !b) return mask_expr::full();
  return mask_expr::combine(mask_expr::op::or_, a, &b);
}
mask_expr operator~(const mask_expr& a) { return mask_expr::combine(mask_expr::op::not_, a, nullptr); }

mask_expr mask_expr::full() { return leaf({op::full}); }
mask_expr mask_expr::causal(causal_mode align) {
  if (align == causal_mode::none) return full();
  return leaf({op::causal, 0, 0, static_cast<std::uint8_t>(align)});
}
mask_expr mask_expr::window(std::int64_t left, std::int64_t right, causal_mode align) {
  return leaf({op::window, left, right, static_cast<std::uint8_t>(align)});
}
mask_expr mask_expr::sinks(std::int64_t n) { return leaf({op::sinks, n}); }
mask_expr mask_expr::prefix_lm(std::int64_t n, causal_mode align) {
  return leaf({op::prefix_lm, n, 0, static_cast<std::uint8_t>(align)});
}
mask_expr mask_expr::block_causal(std::int64_t block) { return leaf({op::block_causal, block}); }
mask_expr mask_expr::dilated(std::int64_t dilation) { return leaf({op::dilated, dilation}); }

mask_expr mask_expr::document(std::vector<std::int64_t> offsets) {
  mask_expr m = leaf({op::document});
  m.nodes_[0].table = 0;
  m.tables_.push_back(std::make_shared<const std::vector<std::int64_t>>(std::move(offsets)));
  return m;
}

mask_expr mask_expr::segments(std::vector<std::int64_t> ids) {
  mask_expr m = leaf({op::segments});
  m.nodes_[0].table = 0;
  m.tables_.push_back(std::make_shared<const std::vector<std::int64_t>>(std::move(ids)));
  return m;
}

mask_expr mask_expr::global_tokens(std::int64_t n) { return leaf({op::global_tokens, n}); }

mask_expr mask_expr::mutual(std::vector<std::int64_t> ids, std::int64_t a, std::int64_t b) {
  mask_expr m = leaf({op::mutual, a, b});
  m.nodes_[0].table = 0;
  m.tables_.push_back(std::make_shared<const std::vector<std::int64_t>>(std::move(ids)));
  return m;
}

mask_expr mask_expr::random_blocks(std::int64_t block, double density, std::uint64_t seed) {
  node n{op::random_blocks, block, std::llround(std::clamp(density, 0.0, 1.0) * 1e6)};  // parts per million
  n.seed = seed;
  return leaf(n);
}

mask_expr mask_expr::neighborhood(std::vector<std::int64_t> grid, std::vector<std::int64_t> kernel,
                                  std::vector<std::int64_t> dilation, std::vector<bool> causal) {
  // Table layout: [rank, grid[rank], kernel[rank], dilation[rank], causal[rank]]; check() validates it.
  const std::size_t rank = grid.size();
  std::vector<std::int64_t> t{static_cast<std::int64_t>(rank)};
  t.insert(t.end(), grid.begin(), grid.end());
  t.insert(t.end(), kernel.begin(), kernel.end());
  for (std::size_t a = 0; a < rank; ++a) t.push_back(a < dilation.size() ? dilation[a] : 1);
  for (std::size_t a = 0; a < rank; ++a) t.push_back(a < causal.size() && causal[a] ? 1 : 0);
  mask_expr m = leaf({op::neighborhood, static_cast<std::int64_t>(kernel.size()), static_cast<std::int64_t>(dilation.size())});
  m.nodes_[0].table = 0;
  m.tables_.push_back(std::make_shared<const std::vector<std::int64_t>>(std::move(t)));
  return m;
}

namespace {

// NATTEN's rule on one axis: may a query at coordinate qc see the key at kc (grid length n)?
bool neighborhood_axis(std::int64_t qc, std::int64_t kc, std::int64_t n, std::int64_t kernel, std::int64_t dilation,
                       bool causal) {
  if (qc % dilation != kc % dilation) return false;
  const std::int64_t group = qc % dilation;
  const std::int64_t len = (n - group + dilation - 1) / dilation;  // tokens in this dilation group
  const std::int64_t q = qc / dilation, k = kc / dilation;
  if (causal) return k <= q && k > q - kernel;
  const std::int64_t start = std::clamp<std::int64_t>(q - kernel / 2, 0, std::max<std::int64_t>(len - kernel, 0));
  return k >= start && k < start + kernel;
}

// The keys one query sees on one axis: coordinates first, first + step, ..., `count` of them (NATTEN's rule above).
struct axis_window {
  std::int64_t first, step, count;
};

axis_window neighborhood_window(std::int64_t qc, std::int64_t n, std::int64_t kernel, std::int64_t dilation, bool causal) {
  const std::int64_t group = qc % dilation, q = qc / dilation;
  const std::int64_t len = (n - group + dilation - 1) / dilation;
  std::int64_t start, count;
  if (causal) {
    start = std::max<std::int64_t>(q - kernel + 1, 0);
    count = q - start + 1;
  } else {
    start = std::clamp<std::int64_t>(q - kernel / 2, 0, std::max<std::int64_t>(len - kernel, 0));
    count = std::min(kernel, len - start);
  }
  return {start * dilation + group, dilation, count};
}

// Allowed-key bits of raster query i over keys [k0, k0 + cnt): the window is a product of per-axis progressions, so
// the outer axes enumerate the (few) window lines that reach into the key range and the last axis sets their bits.
std::uint64_t neighborhood_bits(const std::vector<std::int64_t>& t, std::int64_t i, std::int64_t k0, std::int64_t cnt) {
  const std::int64_t rank = t[0];
  std::int64_t tokens = 1;
  for (std::int64_t a = 0; a < rank; ++a) tokens *= t[static_cast<std::size_t>(1 + a)];
  if (i >= tokens) return 0;
  axis_window w[3];
  std::int64_t stride[3];
  std::int64_t rest = i, st = 1;
  for (std::int64_t a = rank - 1; a >= 0; --a) {
    const std::int64_t n = t[static_cast<std::size_t>(1 + a)];
    w[a] = neighborhood_window(rest % n, n, t[static_cast<std::size_t>(1 + rank + a)], t[static_cast<std::size_t>(1 + 2 * rank + a)],
                               t[static_cast<std::size_t>(1 + 3 * rank + a)] != 0);
    stride[a] = st;
    st *= n;
    rest /= n;
  }
  std::uint64_t bits = 0;
  const std::int64_t k1 = k0 + cnt, last = rank - 1;
  // Enumerate outer coordinates (up to two outer axes) whose line [base, base + stride[last-1]) meets [k0, k1).
  const auto line = [&](std::int64_t base) {
    const axis_window& lw = w[last];
    if (base + (lw.first + (lw.count - 1) * lw.step) < k0 || base + lw.first >= k1) return;
    if (lw.step == 1) {
      bits |= span_bits(base + lw.first, base + lw.first + lw.count, k0, cnt);
      return;
    }
    for (std::int64_t c = 0; c < lw.count; ++c) {
      const std::int64_t key = base + lw.first + c * lw.step;
      if (key >= k0 && key < k1) bits |= std::uint64_t{1} << (key - k0);
    }
  };
  if (rank == 1) {
    line(0);
  } else if (rank == 2) {
    for (std::int64_t r = 0; r < w[0].count; ++r) line((w[0].first + r * w[0].step) * stride[0]);
  } else {
    for (std::int64_t r = 0; r < w[0].count; ++r) {
      const std::int64_t base0 = (w[0].first + r * w[0].step) * stride[0];
      if (base0 + stride[0] <= k0 || base0 >= k1) continue;  // this whole plane misses the key range
      for (std::int64_t c = 0; c < w[1].count; ++c) line(base0 + (w[1].first + c * w[1].step) * stride[1]);
    }
  }
  return bits;
}

}  // namespace

mask_expr mask_expr::predicate(mask_fn f, std::string name) {
  mask_expr m = leaf({op::predicate});
  m.nodes_[0].table = 0;
  m.fns_.push_back(std::make_shared<const mask_fn>(std::move(f)));
  m.names_.push_back(std::move(name));
  return m;
}

bool mask_expr::interval(const node& nd, std::int64_t i, std::int64_t lq, std::int64_t lk, std::int64_t& lo,
                         std::int64_t& hi) const {
  const std::int64_t off = offset_of(nd.align, lq, lk);
  switch (nd.kind) {
    case op::full: lo = 0, hi = lk; return true;
    case op::causal: lo = 0, hi = i + off + 1; return true;
    case op::window:
      lo = nd.a < 0 ? -k_unbounded : i + off - nd.a;
      hi = nd.b < 0 ? k_unbounded : i + off + nd.b + 1;
      return true;
    case op::sinks: lo = 0, hi = nd.a; return true;
    case op::prefix_lm: lo = 0, hi = std::max(nd.a, i + off + 1); return true;
    case op::block_causal: lo = 0, hi = (i / nd.a + 1) * nd.a; return true;
    case op::document: {
      const std::vector<std::int64_t>& o = *tables_[static_cast<std::size_t>(nd.table)];
      const auto it = std::upper_bound(o.begin(), o.end(), i);
      if (it == o.end()) {  // past the last document: nothing allowed (an empty interval keeps lo, hi monotone)
        lo = hi = o.back();
        return true;
      }
      lo = *(it - 1), hi = *it;
      return true;
    }
    default: return false;
  }
}

bool mask_expr::allows_node(int n, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, std::int64_t lq,
                            std::int64_t lk) const {
  const node& nd = nodes_[static_cast<std::size_t>(n)];
  std::int64_t lo, hi;
  if (interval(nd, i, lq, lk, lo, hi)) return lo <= j && j < hi;
  switch (nd.kind) {
    case op::dilated: return (j - i) % nd.a == 0;
    case op::segments: {
      const std::vector<std::int64_t>& ids = *tables_[static_cast<std::size_t>(nd.table)];
      const auto n_ids = static_cast<std::int64_t>(ids.size());
      return i < n_ids && j < n_ids && ids[static_cast<std::size_t>(i)] == ids[static_cast<std::size_t>(j)];
    }
    case op::global_tokens: return i < nd.a || j < nd.a;
    case op::mutual: {
      const std::vector<std::int64_t>& ids = *tables_[static_cast<std::size_t>(nd.table)];
      const auto n_ids = static_cast<std::int64_t>(ids.size());
      return i < n_ids && j < n_ids && ids[static_cast<std::size_t>(i)] == nd.a && ids[static_cast<std::size_t>(j)] == nd.b;
    }
    case op::random_blocks: {
      // splitmix64 of (seed, block row, block column): a fixed pseudo-random choice per block pair.
      std::uint64_t x = nd.seed ^ (static_cast<std::uint64_t>(i / nd.a) * 0x9e3779b97f4a7c15ull) ^
                        (static_cast<std::uint64_t>(j / nd.a) * 0xc2b2ae3d27d4eb4full);
      x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
      x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
      x ^= x >> 31;
      return static_cast<double>(x & 0xffffffffull) < static_cast<double>(nd.b) * (4294967296.0 / 1e6);
    }
    case op::neighborhood: {
      const std::vector<std::int64_t>& t = *tables_[static_cast<std::size_t>(nd.table)];
      const std::int64_t rank = t[0];
      std::int64_t tokens = 1;
      for (std::int64_t a = 0; a < rank; ++a) tokens *= t[static_cast<std::size_t>(1 + a)];
      if (i >= tokens || j >= tokens) return false;  // outside the grid
      std::int64_t qi = i, kj = j;
      for (std::int64_t a = rank - 1; a >= 0; --a) {  // row-major: the last axis varies fastest
        const std::int64_t n = t[static_cast<std::size_t>(1 + a)];
        if (!neighborhood_axis(qi % n, kj % n, n, t[static_cast<std::size_t>(1 + rank + a)],
                               t[static_cast<std::size_t>(1 + 2 * rank + a)], t[static_cast<std::size_t>(1 + 3 * rank + a)] != 0))
          return false;
        qi /= n;
        kj /= n;
      }
      return true;
    }
    case op::predicate: return (*fns_[static_cast<std::size_t>(nd.table)])(b, h, i, j);
    case op::and_: return allows_node(nd.lhs, b, h, i, j, lq, lk) && allows_node(nd.rhs, b, h, i, j, lq, lk);
    case op::or_: return allows_node(nd.lhs, b, h, i, j, lq, lk) || allows_node(nd.rhs, b, h, i, j, lq, lk);
    case op::not_: return !allows_node(nd.lhs, b, h, i, j, lq, lk);
    default: return false;
  }
}

std::uint64_t mask_expr::bits_node(int n, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0, std::int64_t cnt,
                                   std::int64_t lq, std::int64_t lk) const {
  const node& nd = nodes_[static_cast<std::size_t>(n)];
  std::int64_t lo, hi;
  if (interval(nd, i, lq, lk, lo, hi)) return span_bits(lo, hi, k0, cnt);
  switch (nd.kind) {
    case op::and_: return bits_node(nd.lhs, b, h, i, k0, cnt, lq, lk) & bits_node(nd.rhs, b, h, i, k0, cnt, lq, lk);
    case op::or_: return bits_node(nd.lhs, b, h, i, k0, cnt, lq, lk) | bits_node(nd.rhs, b, h, i, k0, cnt, lq, lk);
    case op::not_: return ~bits_node(nd.lhs, b, h, i, k0, cnt, lq, lk) & low_bits(cnt);
    case op::global_tokens: return i < nd.a ? low_bits(cnt) : span_bits(0, nd.a, k0, cnt);
    case op::neighborhood: return neighborhood_bits(*tables_[static_cast<std::size_t>(nd.table)], i, k0, cnt);
    case op::dilated: {
      std::uint64_t bits = 0;
      const std::int64_t first = k0 + (((i - k0) % nd.a) + nd.a) % nd.a;  // first key >= k0 with (j - i) % a == 0
      for (std::int64_t j = first; j < k0 + cnt; j += nd.a) bits |= std::uint64_t{1} << (j - k0);
      return bits;
    }
    default: {
      std::uint64_t bits = 0;
      for (std::int64_t t = 0; t < cnt; ++t) bits |= static_cast<std::uint64_t>(allows_node(n, b, h, i, k0 + t, lq, lk)) << t;
      return bits;
    }
  }
}

tile_kind mask_expr::classify_node(int n, std::int64_t b, std::int64_t h, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                                   std::int64_t k1, std::int64_t lq, std::int64_t lk) const {
  const node& nd = nodes_[static_cast<std::size_t>(n)];
  std::int64_t lo_first, hi_first, lo_last, hi_last;
  const bool is_interval = interval(nd, q0, lq, lk, lo_first, hi_first);
  if (is_interval) {
    interval(nd, q1 - 1, lq, lk, lo_last, hi_last);
    if (lo_last <= k0 && hi_first >= k1) return tile_kind::full;
    // First row whose interval ends after k0 (hi is non-decreasing): binary search, then test its start.
    std::int64_t a = q0, z = q1;
    while (a < z) {
      const std::int64_t mid = a + (z - a) / 2;
      std::int64_t lo, hi;
      interval(nd, mid, lq, lk, lo, hi);
      if (hi > k0) z = mid; else a = mid + 1;
    }
    if (a == q1) return tile_kind::empty;
    std::int64_t lo, hi;
    interval(nd, a, lq, lk, lo, hi);
    // Rows after `a` start no earlier; row `a` reaches past k0, so the tile is non-empty iff some row from `a` on
    // starts before k1 and still ends after k0 - row `a` does iff lo < k1 (its hi > k0 already).
    if (lo >= k1) return tile_kind::empty;
    if (lo < hi) return tile_kind::partial;
    // Row `a` allows nothing (e.g. past the last document): the two-row argument does not hold; settle exactly below.
  } else if (nd.kind == op::neighborhood) {
    // Every query's keys lie between its window's first and last corner: a tile whose key range misses the union of
    // those spans is EMPTY without looking at elements.
    const std::vector<std::int64_t>& t = *tables_[static_cast<std::size_t>(nd.table)];
    // The span depends on the query rows only; block-mask builders walk all key tiles of one query tile in a row,
    // so the last span is remembered (per thread, keyed by the table and the rows).
    thread_local struct {
      const void* table = nullptr;
      std::int64_t q0 = -1, q1 = -1, lo = 0, hi = 0;
    } memo;
    if (memo.table != &t || memo.q0 != q0 || memo.q1 != q1) {
      std::int64_t lo = k_unbounded, hi = -1;
      for (std::int64_t i = q0; i < q1; ++i) {
        std::int64_t rest = i, st = 1, first = 0, final_key = 0;
        const std::int64_t rank = t[0];
        for (std::int64_t a = rank - 1; a >= 0; --a) {
          const std::int64_t n2 = t[static_cast<std::size_t>(1 + a)];
          const axis_window w = neighborhood_window(rest % n2, n2, t[static_cast<std::size_t>(1 + rank + a)],
                                                    t[static_cast<std::size_t>(1 + 2 * rank + a)], t[static_cast<std::size_t>(1 + 3 * rank + a)] != 0);
          first += w.first * st;
          final_key += (w.first + (w.count - 1) * w.step) * st;
          st *= n2;
          rest /= n2;
        }
        lo = std::min(lo, first);
        hi = std::max(hi, final_key);
      }
      memo = {&t, q0, q1, lo, hi};
    }
    if (memo.hi < k0 || memo.lo >= k1) return tile_kind::empty;
  } else if (nd.kind == op::and_ || nd.kind == op::or_) {
    const tile_kind l = classify_node(nd.lhs, b, h, q0, q1, k0, k1, lq, lk);
    const tile_kind r = classify_node(nd.rhs, b, h, q0, q1, k0, k1, lq, lk);
    const tile_kind dominant = nd.kind == op::and_ ? tile_kind::empty : tile_kind::full;
    if (l == dominant || r == dominant) return dominant;
    if (l == r && l != tile_kind::partial) return l;  // both the neutral class
  } else if (nd.kind == op::not_) {
    const tile_kind c = classify_node(nd.lhs, b, h, q0, q1, k0, k1, lq, lk);
    if (c != tile_kind::partial) return c == tile_kind::full ? tile_kind::empty : tile_kind::full;
  }
  // Settle exactly from row bits, 64 keys at a time.
  bool any = false, all = true;
  for (std::int64_t i = q0; i < q1 && (all || !any); ++i)
    for (std::int64_t c = k0; c < k1; c += 64) {
      const std::int64_t cnt = std::min<std::int64_t>(64, k1 - c);
      const std::uint64_t bits = bits_node(n, b, h, i, c, cnt, lq, lk);
      any |= bits != 0;
      all &= bits == low_bits(cnt);
    }
  return all ? tile_kind::full : any ? tile_kind::partial : tile_kind::empty;
}

bool mask_expr::allows(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, std::int64_t lq, std::int64_t lk) const {
  return root_ < 0 || allows_node(root_, b, h, i, j, lq, lk);
}

std::uint64_t mask_expr::row_bits(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0, std::int64_t n,
                                  std::int64_t lq, std::int64_t lk) const {
  return root_ < 0 ? low_bits(n) : bits_node(root_, b, h, i, k0, n, lq, lk);
}

tile_kind mask_expr::classify(std::int64_t b, std::int64_t h, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                              std::int64_t k1, std::int64_t lq, std::int64_t lk) const {
  return root_ < 0 ? tile_kind::full : classify_node(root_, b, h, q0, q1, k0, k1, lq, lk);
}

bool mask_expr::uses_head() const { return !fns_.empty(); }
bool mask_expr::uses_batch() const { return !fns_.empty(); }

std::string mask_expr::str_node(int n) const {
  const node& nd = nodes_[static_cast<std::size_t>(n)];
  std::ostringstream os;
  switch (nd.kind) {
    case op::full: os << "full"; break;
    case op::causal: os << "causal(" << align_name(nd.align) << ")"; break;
    case op::window: os << "window(" << nd.a << "," << nd.b << "," << align_name(nd.align) << ")"; break;
    case op::sinks: os << "sinks(" << nd.a << ")"; break;
    case op::prefix_lm: os << "prefix_lm(" << nd.a << "," << align_name(nd.align) << ")"; break;
    case op::block_causal: os << "block_causal(" << nd.a << ")"; break;
    case op::dilated: os << "dilated(" << nd.a << ")"; break;
    case op::document:
    case op::segments: {
      os << (nd.kind == op::document ? "document(" : "segments(");
      const auto& t = *tables_[static_cast<std::size_t>(nd.table)];
      for (std::size_t x = 0; x < t.size(); ++x) os << (x ? "," : "") << t[x];
      os << ")";
      break;
    }
    case op::global_tokens: os << "global_tokens(" << nd.a << ")"; break;
    case op::neighborhood: {
      const auto& t = *tables_[static_cast<std::size_t>(nd.table)];
      const std::int64_t rank = t[0];
      const char* parts[4] = {"grid", "kernel", "dilation", "causal"};
      os << "neighborhood(";
      for (std::int64_t part = 0; part < 4; ++part) {
        os << (part ? ";" : "") << parts[part] << "=";
        for (std::int64_t a = 0; a < rank; ++a) os << (a ? "x" : "") << t[static_cast<std::size_t>(1 + part * rank + a)];
      }
      os << ")";
      break;
    }
    case op::mutual: os << "mutual(<" << tables_[static_cast<std::size_t>(nd.table)]->size() << " ids>," << nd.a << "," << nd.b << ")"; break;
    case op::random_blocks:
      os << "random_blocks(" << nd.a << "," << static_cast<double>(nd.b) / 1e4 << "," << nd.seed << ")";
      break;
    case op::predicate: os << names_[static_cast<std::size_t>(nd.table)]; break;
    case op::and_: os << "(" << str_node(nd.lhs) << " & " << str_node(nd.rhs) << ")"; break;
    case op::or_: os << "(" << str_node(nd.lhs) << " | " << str_node(nd.rhs) << ")"; break;
    case op::not_: os << "~" << str_node(nd.lhs); break;
  }
  return os.str();
}

std::string mask_expr::str() const { return root_ < 0 ? "none" : str_node(root_); }

std::string mask_expr::check() const {
  constexpr std::int64_t k_limit = std::int64_t{1} << 40;  // keeps i + offset +- parameter far from int64 overflow
  for (const node& nd : nodes_) {
    if (nd.a > k_limit || nd.a < -k_limit || nd.b > k_limit || nd.b < -k_limit)
      return "pattern parameter " + std::to_string(std::abs(nd.a) > k_limit ? nd.a : nd.b) + " out of range (|x| <= 2^40)";
    switch (nd.kind) {
      case op::sinks:
      case op::prefix_lm:
        if (nd.a < 0) return (nd.kind == op::sinks ? "sinks: n " : "prefix_lm: n ") + std::to_string(nd.a) + " must be >= 0";
        break;
      case op::block_causal:
        if (nd.a <= 0) return "block_causal: block " + std::to_string(nd.a) + " must be > 0";
        break;
      case op::random_blocks:
        if (nd.a <= 0) return "random_blocks: block " + std::to_string(nd.a) + " must be > 0";
        break;
      case op::global_tokens:
        if (nd.a < 0) return "global_tokens: n " + std::to_string(nd.a) + " must be >= 0";
        break;
      case op::neighborhood: {
        const auto& t = *tables_[static_cast<std::size_t>(nd.table)];
        const std::int64_t rank = t[0];
        if (rank < 1 || rank > 3) return "neighborhood: grid rank " + std::to_string(rank) + " must be 1, 2 or 3";
        if (nd.a != rank) return "neighborhood: kernel has " + std::to_string(nd.a) + " sizes for a rank-" + std::to_string(rank) + " grid";
        if (nd.b != 0 && nd.b != rank)
          return "neighborhood: dilation has " + std::to_string(nd.b) + " entries for a rank-" + std::to_string(rank) + " grid";
        for (std::int64_t a = 0; a < rank; ++a) {
          const std::int64_t n = t[static_cast<std::size_t>(1 + a)], k = t[static_cast<std::size_t>(1 + rank + a)],
                             dil = t[static_cast<std::size_t>(1 + 2 * rank + a)];
          const std::string axis = " (axis " + std::to_string(a) + ")";
          if (n <= 0) return "neighborhood: grid size " + std::to_string(n) + " must be > 0" + axis;
          if (dil <= 0) return "neighborhood: dilation " + std::to_string(dil) + " must be > 0" + axis;
          if (k <= 0 || k * dil > n)
            return "neighborhood: kernel " + std::to_string(k) + " x dilation " + std::to_string(dil) + " must be in 1..grid " +
                   std::to_string(n) + axis;
        }
        break;
      }
      case op::dilated:
        if (nd.a <= 0) return "dilated: dilation " + std::to_string(nd.a) + " must be > 0";
        break;
      case op::document: {
        const auto& o = *tables_[static_cast<std::size_t>(nd.table)];
        if (o.empty() || o[0] != 0) return "document: offsets must start at 0";
        for (std::size_t x = 1; x < o.size(); ++x)
          if (o[x] < o[x - 1]) return "document: offsets must be non-decreasing (offsets[" + std::to_string(x) + "])";
        break;
      }
      default: break;
    }
  }
  return {};
}

}  // namespace omniattn
