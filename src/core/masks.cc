// Mask expressions: built-in patterns in closed form, composition, and tile classification.
//
// Every built-in pattern except dilated allows, for each query row i, one interval of keys [lo(i), hi(i)), and lo, hi
// never decrease as i grows. That gives exact tile classes from two rows: a tile [q0, q1) x [k0, k1) is FULL iff
// lo(q1 - 1) <= k0 and hi(q0) >= k1, and non-empty iff the first row whose interval ends after k0 starts before k1.
// Compositions classify their children and, when that leaves the tile PARTIAL, settle it exactly from the row bits.
// The grid patterns (neighborhood, halo) are products of per-axis windows (detail::grid_local::window, shared with the
// kernels' gather path): one function per reader works on the N-d coordinates of any rank, and tiles classify exactly
// per axis. Dense tables are read 8 bytes at a time per row and classified from those bits.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/grid_local.h"
#include "core/parallel.h"
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
  m.depth_ = 1;
  return m;
}

int mask_expr::append(const mask_expr& other) {
  const int base = static_cast<int>(nodes_.size());
  const int tbase = static_cast<int>(tables_.size()), fbase = static_cast<int>(fns_.size());
  const int dbase = static_cast<int>(dense_.size());
  const auto shift = [base](int& index) {
    if (index >= 0) index += base;
  };
  for (node n : other.nodes_) {
    shift(n.first);
    shift(n.last);
    shift(n.next);
    if (n.table >= 0) n.table += n.kind == op::predicate ? fbase : n.kind == op::dense ? dbase : tbase;
    nodes_.push_back(n);
  }
  tables_.insert(tables_.end(), other.tables_.begin(), other.tables_.end());
  fns_.insert(fns_.end(), other.fns_.begin(), other.fns_.end());
  names_.insert(names_.end(), other.names_.begin(), other.names_.end());
  rows_.insert(rows_.end(), other.rows_.begin(), other.rows_.end());
  dense_.insert(dense_.end(), other.dense_.begin(), other.dense_.end());
  return other.root_ + base;
}

mask_expr mask_expr::join(op kind, mask_expr a, const mask_expr& b) {
  // a's root becomes (or already is) the n-ary node; b joins it as one child, or, when b is the same operator, its
  // children join it one by one. Nested chains thus stay one level deep: "a | b | ... | z" has depth 2 however it
  // was grouped, so no reader recurses once per term.
  if (a.nodes_[static_cast<std::size_t>(a.root_)].kind != kind) {
    node n;
    n.kind = kind;
    n.first = n.last = a.root_;
    a.nodes_.push_back(n);
    a.root_ = static_cast<int>(a.nodes_.size()) - 1;
    ++a.depth_;
  }
  const int b_root = a.append(b);
  const node inner = a.nodes_[static_cast<std::size_t>(b_root)];
  node& root = a.nodes_[static_cast<std::size_t>(a.root_)];
  if (inner.kind == kind) {
    // b's own root is left without children; no reader reaches it (it is no one's child).
    a.nodes_[static_cast<std::size_t>(root.last)].next = inner.first;
    root.last = inner.last;
    a.nodes_[static_cast<std::size_t>(b_root)].first = a.nodes_[static_cast<std::size_t>(b_root)].last = -1;
    a.depth_ = std::max(a.depth_, b.depth_);
  } else {
    a.nodes_[static_cast<std::size_t>(root.last)].next = b_root;
    root.last = b_root;
    a.depth_ = std::max(a.depth_, b.depth_ + 1);
  }
  return a;
}

mask_expr operator&(mask_expr a, const mask_expr& b) {
  if (!a) return b;
  if (!b) return a;
  return mask_expr::join(mask_expr::op::and_, std::move(a), b);
}
mask_expr operator|(mask_expr a, const mask_expr& b) {
  if (!a || !b) return mask_expr::full();
  return mask_expr::join(mask_expr::op::or_, std::move(a), b);
}
mask_expr operator~(mask_expr a) {
  if (!a) a = mask_expr::full();
  mask_expr::node n;
  n.kind = mask_expr::op::not_;
  n.first = n.last = a.root_;
  a.nodes_.push_back(n);
  a.root_ = static_cast<int>(a.nodes_.size()) - 1;
  ++a.depth_;
  return a;
}

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

namespace {

// Table layouts of the grid patterns; check() validates them, evaluation decodes them into a detail::grid_local:
//   neighborhood: [rank, #kernel, #dilation, #stride, #causal, grid[rank], kernel[rank], dilation[rank], stride[rank],
//                  causal[rank]]
//   halo:         [rank, #block, #halo, grid[rank], block[rank], halo[rank]]
// #x is how many values the caller gave (0: the default, 1: every axis), kept so check() can name a wrong count.
constexpr std::size_t k_neighborhood_head = 5, k_halo_head = 3;
constexpr std::int64_t k_max_tokens = std::int64_t{1} << 40;  // keeps raster indices and their products far from overflow

void put_per_axis(std::vector<std::int64_t>& t, const std::vector<std::int64_t>& v, std::size_t rank, std::int64_t fallback) {
  for (std::size_t a = 0; a < rank; ++a)
    t.push_back(v.empty() ? fallback : v.size() == 1 ? v[0] : a < v.size() ? v[a] : 0);  // 0: a count check() reports
}

}  // namespace

mask_expr mask_expr::neighborhood(std::vector<std::int64_t> grid, std::vector<std::int64_t> kernel,
                                  std::vector<std::int64_t> dilation, std::vector<bool> causal,
                                  std::vector<std::int64_t> stride) {
  const std::size_t rank = grid.size();
  const std::vector<std::int64_t> causal_values(causal.begin(), causal.end());
  std::vector<std::int64_t> t{static_cast<std::int64_t>(rank), static_cast<std::int64_t>(kernel.size()),
                              static_cast<std::int64_t>(dilation.size()), static_cast<std::int64_t>(stride.size()),
                              static_cast<std::int64_t>(causal.size())};
  t.insert(t.end(), grid.begin(), grid.end());
  put_per_axis(t, kernel, rank, 0);
  put_per_axis(t, dilation, rank, 1);
  put_per_axis(t, stride, rank, 1);
  put_per_axis(t, causal_values, rank, 0);
  mask_expr m = leaf({op::neighborhood});
  m.nodes_[0].table = 0;
  m.tables_.push_back(std::make_shared<const std::vector<std::int64_t>>(std::move(t)));
  return m;
}

mask_expr mask_expr::halo(std::vector<std::int64_t> grid, std::vector<std::int64_t> block, std::vector<std::int64_t> halo) {
  const std::size_t rank = grid.size();
  std::vector<std::int64_t> t{static_cast<std::int64_t>(rank), static_cast<std::int64_t>(block.size()),
                              static_cast<std::int64_t>(halo.size())};
  t.insert(t.end(), grid.begin(), grid.end());
  put_per_axis(t, block, rank, 0);
  put_per_axis(t, halo, rank, -1);  // no halo given: -1, which check() reports
  mask_expr m = leaf({op::halo});
  m.nodes_[0].table = 0;
  m.tables_.push_back(std::make_shared<const std::vector<std::int64_t>>(std::move(t)));
  return m;
}

mask_expr mask_expr::dense(const std::uint8_t* data, std::array<std::int64_t, 4> shape, std::array<std::int64_t, 4> strides,
                           std::string name) {
  mask_expr m = leaf({op::dense});
  m.nodes_[0].table = 0;
  for (std::size_t d = 0; d < 4; ++d)
    if (shape[d] == 1) strides[d] = 0;  // broadcast: every index reads entry 0
  m.dense_.push_back({data, shape, strides, std::move(name)});
  return m;
}

namespace {

using detail::axis_window;
using detail::grid_local;

grid_local decode_grid(mask_expr::op kind, const std::vector<std::int64_t>& t) {
  grid_local g;
  const auto r = static_cast<std::size_t>(t[0]);
  g.rank = static_cast<int>(std::min<std::size_t>(r, 3));  // an invalid rank (check() reports it) stays in bounds
  const auto at = [&](std::size_t head, std::size_t part, int a) { return t[head + part * r + static_cast<std::size_t>(a)]; };
  // Sizes, dilations, strides and blocks below 1 are invalid (check() says why); clamping them keeps a premature
  // evaluation of an unchecked expression free of divisions by zero.
  const auto positive = [](std::int64_t x) { return std::max<std::int64_t>(x, 1); };
  for (int a = 0; a < g.rank; ++a) {
    if (kind == mask_expr::op::neighborhood) {
      g.type = grid_local::kind::neighborhood;
      g.grid[a] = positive(at(k_neighborhood_head, 0, a));
      g.kernel[a] = positive(at(k_neighborhood_head, 1, a));
      g.dilation[a] = positive(at(k_neighborhood_head, 2, a));
      g.stride[a] = positive(at(k_neighborhood_head, 3, a));
      g.causal[a] = at(k_neighborhood_head, 4, a) != 0;
    } else {
      g.type = grid_local::kind::halo;
      g.grid[a] = positive(at(k_halo_head, 0, a));
      g.block[a] = positive(at(k_halo_head, 1, a));
      g.halo[a] = at(k_halo_head, 2, a);
    }
  }
  return g;
}

std::int64_t floor_div(std::int64_t a, std::int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }  // b > 0
std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return -floor_div(-a, b); }

// NATTEN's window on one axis (the rule documented in masks.h): the key coordinates first, first + step, ...
axis_window neighborhood_window(std::int64_t x, std::int64_t n, std::int64_t kernel, std::int64_t dilation,
                                std::int64_t stride, bool causal) {
  const std::int64_t group = x % dilation, q = x / dilation;
  const std::int64_t len = (n - group + dilation - 1) / dilation;  // tokens in this dilation group
  std::int64_t start, count;
  if (causal) {
    const std::int64_t leader = std::min(q / stride * stride + stride - 1, len - 1);  // the group's last query
    start = std::max<std::int64_t>(leader - kernel + 1, 0);
    count = q - start + 1;  // the window ends at the query itself, not at its leader
  } else {
    const std::int64_t leader = std::min(q / stride * stride + stride / 2, len - 1);  // the group's centre query
    start = std::clamp<std::int64_t>(leader - kernel / 2, 0, std::max<std::int64_t>(len - kernel, 0));
    count = std::min(kernel, len - start);
  }
  return {start * dilation + group, dilation, std::max<std::int64_t>(count, 0)};
}

bool in_window(const axis_window& w, std::int64_t y) {
  if (y < w.first) return false;
  const std::int64_t off = y - w.first;
  return off % w.step == 0 && off / w.step < w.count;
}

// Tokens per step of axis a (the product of the later axes' lengths).
std::int64_t slab(const grid_local& g, int a) {
  std::int64_t s = 1;
  for (int x = a + 1; x < g.rank; ++x) s *= g.grid[x];
  return s;
}

void coords_of(const grid_local& g, std::int64_t i, std::int64_t c[3]) {
  for (int a = g.rank - 1; a >= 0; --a) {  // row-major: the last axis varies fastest
    c[a] = i % g.grid[a];
    i /= g.grid[a];
  }
}

bool grid_allows(const grid_local& g, std::int64_t i, std::int64_t j) {
  const std::int64_t tokens = g.tokens();
  if (i < 0 || j < 0 || i >= tokens || j >= tokens) return false;  // outside the grid
  std::int64_t qc[3], kc[3];
  coords_of(g, i, qc);
  coords_of(g, j, kc);
  for (int a = 0; a < g.rank; ++a)
    if (!in_window(g.window(a, qc[a]), kc[a])) return false;
  return true;
}

// Allowed-key bits of query i over keys [k0, k0 + cnt): the window is a product of per-axis progressions, so each
// axis visits only the window coordinates whose slab of keys meets the range (at most about cnt / slab + 2 of them),
// and the last axis sets bits; the cost is bounded by the 64 keys, not by the kernel.
struct bits_walk {
  const axis_window* win;
  const std::int64_t* slabs;
  int last;
  std::int64_t k0, k1, cnt;
  std::uint64_t bits = 0;

  template <int a>  // the axis, at compile time: the recursion ends at axis 2 (grids have rank <= 3)
  void visit(std::int64_t base) {
    const axis_window& w = win[a];
    if (w.count <= 0) return;
    const std::int64_t s = slabs[a];
    const std::int64_t c_lo = floor_div(k0 - base, s), c_hi = floor_div(k1 - 1 - base, s);
    const std::int64_t t_lo = std::max<std::int64_t>(0, ceil_div(c_lo - w.first, w.step));
    const std::int64_t t_hi = std::min(w.count - 1, floor_div(c_hi - w.first, w.step));
    if (t_lo > t_hi) return;
    if (a == last) {
      if (w.step == 1) {
        bits |= span_bits(base + w.first + t_lo, base + w.first + t_hi + 1, k0, cnt);
      } else {
        for (std::int64_t t = t_lo; t <= t_hi; ++t) bits |= std::uint64_t{1} << (base + w.first + t * w.step - k0);
      }
      return;
    }
    if constexpr (a < 2)
      for (std::int64_t t = t_lo; t <= t_hi; ++t) visit<a + 1>(base + (w.first + t * w.step) * s);
  }
};

std::uint64_t grid_bits(const grid_local& g, std::int64_t i, std::int64_t k0, std::int64_t cnt) {
  const std::int64_t tokens = g.tokens();
  if (i < 0 || i >= tokens || k0 >= tokens || cnt <= 0) return 0;
  std::int64_t qc[3], slabs[3];
  axis_window win[3];
  coords_of(g, i, qc);
  for (int a = 0; a < g.rank; ++a) {
    win[a] = g.window(a, qc[a]);
    slabs[a] = slab(g, a);
  }
  bits_walk walk{win, slabs, g.rank - 1, k0, std::min(k0 + cnt, tokens), cnt};
  walk.visit<0>(0);
  return walk.bits;
}

// A raster range of a grid as at most 2 * rank - 1 boxes (products of per-axis coordinate ranges).
struct box {
  std::int64_t lo[3] = {0, 0, 0}, hi[3] = {1, 1, 1};
};
struct box_list {
  box items[8];
  int size = 0;
};

void raster_boxes(const grid_local& g, int a, std::int64_t s, std::int64_t e, box b, box_list& out) {
  // [s, e) is a non-empty range of the sub-grid of axes a.. ; b fixes the axes before a.
  if (a == g.rank - 1) {
    b.lo[a] = s, b.hi[a] = e;
    out.items[out.size++] = b;
    return;
  }
  const std::int64_t sl = slab(g, a), first = s / sl, final_slab = (e - 1) / sl;
  if (first == final_slab) {
    b.lo[a] = first, b.hi[a] = first + 1;
    raster_boxes(g, a + 1, s - first * sl, e - first * sl, b, out);
    return;
  }
  std::int64_t whole_lo = first, whole_hi = final_slab + 1;
  if (s % sl != 0) {  // a partial leading slab
    b.lo[a] = first, b.hi[a] = first + 1;
    raster_boxes(g, a + 1, s - first * sl, sl, b, out);
    whole_lo = first + 1;
  }
  const bool partial_tail = e % sl != 0;
  if (partial_tail) whole_hi = final_slab;
  if (whole_lo < whole_hi) {
    box f = b;
    f.lo[a] = whole_lo, f.hi[a] = whole_hi;
    for (int x = a + 1; x < g.rank; ++x) f.lo[x] = 0, f.hi[x] = g.grid[x];
    out.items[out.size++] = f;
  }
  if (partial_tail) {
    b.lo[a] = final_slab, b.hi[a] = final_slab + 1;
    raster_boxes(g, a + 1, 0, e - final_slab * sl, b, out);
  }
}

// Over query coordinates [x0, x1) and key coordinates [y0, y1) of one axis: does some query see some key (any), and
// does every query see every key (all)?
void axis_cover(const grid_local& g, int a, std::int64_t x0, std::int64_t x1, std::int64_t y0, std::int64_t y1, bool& any,
                bool& all) {
  any = false, all = true;
  for (std::int64_t x = x0; x < x1 && (all || !any); ++x) {
    const axis_window w = g.window(a, x);
    const std::int64_t t = std::max<std::int64_t>(0, ceil_div(y0 - w.first, w.step));
    any |= t < w.count && w.first + t * w.step < y1;
    const std::int64_t last = w.first + (w.count - 1) * w.step;
    all &= w.count > 0 && w.first <= y0 && last >= y1 - 1 && (w.step == 1 || (y1 - y0 == 1 && in_window(w, y0)));
  }
}

// Exact tile class: both raster ranges split into boxes, and a box pair's class follows per axis (the allowed set is
// a product over axes): some pair allowed iff on every axis some pair is, all allowed iff on every axis all are.
tile_kind grid_classify(const grid_local& g, std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) {
  const std::int64_t tokens = g.tokens();
  const std::int64_t qe = std::min(q1, tokens), ke = std::min(k1, tokens);
  if (q0 >= qe || k0 >= ke) return tile_kind::empty;
  bool any = false, all = q1 <= tokens && k1 <= tokens;  // rows or keys past the grid allow nothing
  box_list qb, kb;
  raster_boxes(g, 0, q0, qe, box{}, qb);
  raster_boxes(g, 0, k0, ke, box{}, kb);
  for (int x = 0; x < qb.size && (all || !any); ++x)
    for (int y = 0; y < kb.size && (all || !any); ++y) {
      bool pair_any = true, pair_all = true;
      for (int a = 0; a < g.rank; ++a) {
        bool axis_any, axis_all;
        axis_cover(g, a, qb.items[x].lo[a], qb.items[x].hi[a], kb.items[y].lo[a], kb.items[y].hi[a], axis_any, axis_all);
        pair_any &= axis_any;
        pair_all &= axis_all;
      }
      any |= pair_any;
      all &= pair_all;
    }
  return all ? tile_kind::full : any ? tile_kind::partial : tile_kind::empty;
}

// Bits of the 8 bytes at p that are non-zero (bit t for byte t), on a little-endian host: each byte is folded to 0 / 1
// in its lowest bit, and one multiplication gathers the eight lowest bits into the top byte without carries.
std::uint64_t nonzero_byte_bits(const std::uint8_t* p) {
  std::uint64_t w;
  std::memcpy(&w, p, 8);
  constexpr std::uint64_t low7 = 0x7f7f7f7f7f7f7f7full;
  const std::uint64_t high = (((w & low7) + low7) | w) & ~low7;  // the high bit of each byte: byte != 0
  return ((high >> 7) * 0x0102040810204080ull) >> 56;
}

}  // namespace

mask_expr mask_expr::predicate(mask_fn f, std::string name) { return predicate_rows(std::move(f), nullptr, std::move(name)); }

mask_expr mask_expr::predicate_rows(mask_fn f, mask_row_fn row, std::string name) {
  mask_expr m = leaf({op::predicate});
  m.nodes_[0].table = 0;
  m.fns_.push_back(std::make_shared<const mask_fn>(std::move(f)));
  m.names_.push_back(std::move(name));
  m.rows_.push_back(row ? std::make_shared<const mask_row_fn>(std::move(row)) : nullptr);
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
    case op::neighborhood:
    case op::halo: return grid_allows(decode_grid(nd.kind, *tables_[static_cast<std::size_t>(nd.table)]), i, j);
    case op::dense: {
      const dense_view& d = dense_[static_cast<std::size_t>(nd.table)];
      const std::int64_t idx[4] = {b, h, i, j};
      std::int64_t off = 0;
      for (std::size_t x = 0; x < 4; ++x) {
        if (d.shape[x] == 1) continue;  // broadcast
        if (idx[x] < 0 || idx[x] >= d.shape[x]) return false;
        off += idx[x] * d.strides[x];
      }
      return d.data[off] != 0;
    }
    case op::predicate: {
      const auto at = static_cast<std::size_t>(nd.table);
      return detail::call_user("spec.mask predicate", names_[at], [&] { return (*fns_[at])(b, h, i, j); });
    }
    case op::and_:
      for (int c = nd.first; c >= 0; c = next_child(c))
        if (!allows_node(c, b, h, i, j, lq, lk)) return false;
      return true;
    case op::or_:
      for (int c = nd.first; c >= 0; c = next_child(c))
        if (allows_node(c, b, h, i, j, lq, lk)) return true;
      return false;
    case op::not_: return !allows_node(nd.first, b, h, i, j, lq, lk);
    default: return false;
  }
}

std::uint64_t mask_expr::bits_node(int n, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0, std::int64_t cnt,
                                   std::int64_t lq, std::int64_t lk) const {
  const node& nd = nodes_[static_cast<std::size_t>(n)];
  std::int64_t lo, hi;
  if (interval(nd, i, lq, lk, lo, hi)) return span_bits(lo, hi, k0, cnt);
  switch (nd.kind) {
    case op::and_: {
      std::uint64_t bits = low_bits(cnt);
      for (int c = nd.first; c >= 0 && bits != 0; c = next_child(c)) bits &= bits_node(c, b, h, i, k0, cnt, lq, lk);
      return bits;
    }
    case op::or_: {
      std::uint64_t bits = 0;
      for (int c = nd.first; c >= 0 && bits != low_bits(cnt); c = next_child(c)) bits |= bits_node(c, b, h, i, k0, cnt, lq, lk);
      return bits;
    }
    case op::not_: return ~bits_node(nd.first, b, h, i, k0, cnt, lq, lk) & low_bits(cnt);
    case op::global_tokens: return i < nd.a ? low_bits(cnt) : span_bits(0, nd.a, k0, cnt);
    case op::neighborhood:
    case op::halo: return grid_bits(decode_grid(nd.kind, *tables_[static_cast<std::size_t>(nd.table)]), i, k0, cnt);
    case op::dense: return dense_bits(dense_[static_cast<std::size_t>(nd.table)], b, h, i, k0, cnt);
    case op::dilated: {
      std::uint64_t bits = 0;
      const std::int64_t first = k0 + (((i - k0) % nd.a) + nd.a) % nd.a;  // first key >= k0 with (j - i) % a == 0
      for (std::int64_t j = first; j < k0 + cnt; j += nd.a) bits |= std::uint64_t{1} << (j - k0);
      return bits;
    }
    case op::predicate: {
      // An inlined() predicate: one call for the whole row. A plain one: one call per key, straight to the function
      // (not through allows_node, whose pattern dispatch would run per key too).
      const auto at = static_cast<std::size_t>(nd.table);
      return detail::call_user("spec.mask predicate", names_[at], [&] {
        if (const auto& row = rows_[at]) return cnt > 0 ? (*row)(b, h, i, k0, cnt) : std::uint64_t{0};
        const mask_fn& f = *fns_[at];
        std::uint64_t bits = 0;
        for (std::int64_t t = 0; t < cnt; ++t) bits |= static_cast<std::uint64_t>(f(b, h, i, k0 + t)) << t;
        return bits;
      });
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
  } else if (nd.kind == op::neighborhood || nd.kind == op::halo) {
    return grid_classify(decode_grid(nd.kind, *tables_[static_cast<std::size_t>(nd.table)]), q0, q1, k0, k1);
  } else if (nd.kind == op::and_ || nd.kind == op::or_) {
    // One child of the dominant class decides the tile; all children of the neutral class give it; anything else
    // (some child PARTIAL) is settled exactly below.
    const tile_kind dominant = nd.kind == op::and_ ? tile_kind::empty : tile_kind::full;
    const tile_kind neutral = nd.kind == op::and_ ? tile_kind::full : tile_kind::empty;
    bool all_neutral = true;
    for (int c = nd.first; c >= 0; c = next_child(c)) {
      const tile_kind k = classify_node(c, b, h, q0, q1, k0, k1, lq, lk);
      if (k == dominant) return dominant;
      all_neutral &= k == neutral;
    }
    if (all_neutral) return neutral;
  } else if (nd.kind == op::not_) {
    const tile_kind c = classify_node(nd.first, b, h, q0, q1, k0, k1, lq, lk);
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
  if (depth_ > max_depth) return false;  // invalid (check() says why): too deep to walk
  return root_ < 0 || allows_node(root_, b, h, i, j, lq, lk);
}

std::uint64_t mask_expr::row_bits(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0, std::int64_t n,
                                  std::int64_t lq, std::int64_t lk) const {
  if (depth_ > max_depth) return 0;  // invalid (check() says why): too deep to walk
  return root_ < 0 ? low_bits(n) : bits_node(root_, b, h, i, k0, n, lq, lk);
}

tile_kind mask_expr::classify(std::int64_t b, std::int64_t h, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                              std::int64_t k1, std::int64_t lq, std::int64_t lk) const {
  if (depth_ > max_depth) return tile_kind::empty;  // invalid (check() says why): too deep to walk
  return root_ < 0 ? tile_kind::full : classify_node(root_, b, h, q0, q1, k0, k1, lq, lk);
}

bool mask_expr::uses_head() const {
  return !fns_.empty() || std::any_of(dense_.begin(), dense_.end(), [](const dense_view& d) { return d.shape[1] > 1; });
}
bool mask_expr::has_user_code() const { return !fns_.empty(); }
bool mask_expr::uses_batch() const {
  return !fns_.empty() || std::any_of(dense_.begin(), dense_.end(), [](const dense_view& d) { return d.shape[0] > 1; });
}

void mask_expr::str_node(int n, std::ostream& os) const {
  const node& nd = nodes_[static_cast<std::size_t>(n)];
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
    case op::neighborhood:
    case op::halo: {
      // Every key, per-axis values joined by 'x': the form parse_mask reads back to the same expression.
      const auto& t = *tables_[static_cast<std::size_t>(nd.table)];
      const auto rank = static_cast<std::size_t>(t[0]);
      const bool nb = nd.kind == op::neighborhood;
      const char* const nb_keys[] = {"grid", "kernel", "dilation", "stride", "causal"};
      const char* const halo_keys[] = {"grid", "block", "halo"};
      const std::size_t head = nb ? k_neighborhood_head : k_halo_head, parts = nb ? 5 : 3;
      os << (nb ? "neighborhood(" : "halo(");
      for (std::size_t part = 0; part < parts; ++part) {
        os << (part ? "," : "") << (nb ? nb_keys[part] : halo_keys[part]) << "=";
        for (std::size_t a = 0; a < rank; ++a) os << (a ? "x" : "") << t[head + part * rank + a];
      }
      os << ")";
      break;
    }
    case op::dense: os << dense_[static_cast<std::size_t>(nd.table)].name; break;
    case op::mutual: os << "mutual(<" << tables_[static_cast<std::size_t>(nd.table)]->size() << " ids>," << nd.a << "," << nd.b << ")"; break;
    case op::random_blocks:
      os << "random_blocks(" << nd.a << "," << static_cast<double>(nd.b) / 1e4 << "," << nd.seed << ")";
      break;
    case op::predicate: os << names_[static_cast<std::size_t>(nd.table)]; break;
    case op::and_:
    case op::or_:
      os << "(";
      for (int c = nd.first; c >= 0; c = next_child(c)) {
        if (c != nd.first) os << (nd.kind == op::and_ ? " & " : " | ");
        str_node(c, os);
      }
      os << ")";
      break;
    case op::not_:
      os << "~";
      str_node(nd.first, os);
      break;
  }
}

std::string mask_expr::str() const {
  if (root_ < 0) return "none";
  if (depth_ > max_depth) return "<an expression nesting deeper than " + std::to_string(max_depth) + ">";
  std::ostringstream os;  // one stream for the whole tree: linear in the expression's size
  str_node(root_, os);
  return os.str();
}

namespace {

// The parameter rules of the grid patterns (documented in masks.h), one message per broken rule.
std::string check_grid(mask_expr::op kind, const std::vector<std::int64_t>& t) {
  const bool nb = kind == mask_expr::op::neighborhood;
  const std::string name = nb ? "neighborhood" : "halo";
  const std::int64_t rank = t[0];
  if (rank < 1 || rank > 3) return name + ": grid rank " + std::to_string(rank) + " must be 1, 2 or 3";
  const char* const nb_parts[] = {"kernel", "dilation", "stride", "causal"};
  const char* const halo_parts[] = {"block", "halo"};
  for (std::size_t part = 0; part < (nb ? 4u : 2u); ++part) {
    const std::int64_t given = t[1 + part];
    const bool required = nb ? part == 0 : true;
    if ((given == 0 && required) || (given > 1 && given != rank))
      return name + ": " + (nb ? nb_parts[part] : halo_parts[part]) + " has " + std::to_string(given) + " values for a rank-" +
             std::to_string(rank) + " grid (give 1 for every axis" + (required ? "" : ", 0 for the default") + ", or " +
             std::to_string(rank) + ")";
  }
  // The raw values (decode_grid clamps invalid ones).
  const auto r = static_cast<std::size_t>(rank);
  const std::size_t head = nb ? k_neighborhood_head : k_halo_head;
  const auto raw = [&](std::size_t part, std::int64_t a) { return t[head + part * r + static_cast<std::size_t>(a)]; };
  std::int64_t tokens = 1;
  for (std::int64_t a = 0; a < rank; ++a) {
    const std::string axis = " (axis " + std::to_string(a) + ")";
    const std::int64_t n = raw(0, a);
    if (n <= 0 || n > k_max_tokens) return name + ": grid size " + std::to_string(n) + " must be in 1..2^40" + axis;
    if (tokens > k_max_tokens / n) return name + ": the grid has more than 2^40 tokens";
    tokens *= n;
    if (nb) {
      const std::int64_t k = raw(1, a), d = raw(2, a), s = raw(3, a), c = raw(4, a);
      if (d <= 0 || d > n) return name + ": dilation " + std::to_string(d) + " must be in 1..grid " + std::to_string(n) + axis;
      if (k <= 0 || k > n / d)
        return name + ": kernel " + std::to_string(k) + " x dilation " + std::to_string(d) + " must be in 1..grid " +
               std::to_string(n) + axis;
      if (s <= 0 || s > k)
        return name + ": stride " + std::to_string(s) + " must be in 1..kernel " + std::to_string(k) + axis;
      if (c != 0 && c != 1) return name + ": causal " + std::to_string(c) + " must be 0 or 1" + axis;
    } else {
      const std::int64_t block = raw(1, a), halo = raw(2, a);
      if (block <= 0 || block > n)
        return name + ": block " + std::to_string(block) + " must be in 1..grid " + std::to_string(n) + axis;
      if (halo < 0 || halo > n) return name + ": halo " + std::to_string(halo) + " must be in 0..grid " + std::to_string(n) + axis;
    }
  }
  return {};
}

}  // namespace

std::uint64_t mask_expr::dense_bits(const dense_view& d, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0,
                                    std::int64_t cnt) const {
  const std::int64_t idx[3] = {b, h, i};
  std::int64_t off = 0;
  for (std::size_t x = 0; x < 3; ++x) {
    if (d.shape[x] == 1) continue;
    if (idx[x] < 0 || idx[x] >= d.shape[x]) return 0;
    off += idx[x] * d.strides[x];
  }
  const std::uint8_t* row = d.data + off;
  if (d.shape[3] == 1) return row[0] ? low_bits(cnt) : 0;  // one value for every key
  const std::int64_t n = std::clamp<std::int64_t>(d.shape[3] - k0, 0, cnt);  // keys past the table are not allowed
  const std::int64_t s3 = d.strides[3];
  std::uint64_t bits = 0;
  std::int64_t t = 0;
  if (s3 == 1 && std::endian::native == std::endian::little) {
    for (; t + 8 <= n; t += 8) bits |= nonzero_byte_bits(row + k0 + t) << t;  // 8 keys per load
  }
  for (; t < n; ++t) bits |= static_cast<std::uint64_t>(row[(k0 + t) * s3] != 0) << t;
  return bits;
}

std::string mask_expr::check() const {
  constexpr std::int64_t k_limit = std::int64_t{1} << 40;  // keeps i + offset +- parameter far from int64 overflow
  if (depth_ > max_depth)
    return "expression nests deeper than " + std::to_string(max_depth) + " (depth " + std::to_string(depth_) +
           "; chains of & or | count as one level)";
  for (const node& nd : nodes_) {
    if (nd.a > k_limit || nd.a < -k_limit || nd.b > k_limit || nd.b < -k_limit)
      return "pattern parameter " + std::to_string(std::abs(nd.a) > k_limit ? nd.a : nd.b) + " out of range (|x| <= 2^40)";
    if (nd.kind == op::causal || nd.kind == op::window || nd.kind == op::prefix_lm) {
      // align arrives as a causal_mode from the API, where any number converts: only the two alignments are meaningful
      // (causal(none) is already full(); none elsewhere would print as bottom_right and evaluate as top_left).
      const auto align = static_cast<causal_mode>(nd.align);
      if (align != causal_mode::top_left && align != causal_mode::bottom_right)
        return std::string(nd.kind == op::causal ? "causal" : nd.kind == op::window ? "window" : "prefix_lm") + ": align " +
               std::to_string(nd.align) + " must be causal_mode::top_left (" +
               std::to_string(static_cast<int>(causal_mode::top_left)) + ") or causal_mode::bottom_right (" +
               std::to_string(static_cast<int>(causal_mode::bottom_right)) + ")";
    }
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
      case op::neighborhood:
      case op::halo: {
        if (std::string why = check_grid(nd.kind, *tables_[static_cast<std::size_t>(nd.table)]); !why.empty()) return why;
        break;
      }
      case op::dense: {
        const dense_view& d = dense_[static_cast<std::size_t>(nd.table)];
        if (!d.data) return "dense '" + d.name + "': data is null";
        for (std::size_t x = 0; x < 4; ++x)
          if (d.shape[x] < 0 || d.shape[x] > k_max_tokens)  // 0: for a call with no queries / keys
            return "dense '" + d.name + "': shape[" + std::to_string(x) + "] " + std::to_string(d.shape[x]) +
                   " must be in 0..2^40";
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

std::string mask_expr::check(std::int64_t batch, std::int64_t heads_q, std::int64_t seq_q, std::int64_t seq_k) const {
  if (std::string why = check(); !why.empty()) return why;
  const std::int64_t want[4] = {batch, heads_q, seq_q, seq_k};
  const char* const dims[4] = {"batch", "heads_q", "seq_q", "seq_k"};
  for (const dense_view& d : dense_)
    for (std::size_t x = 0; x < 4; ++x)
      if (d.shape[x] != 1 && d.shape[x] != want[x])
        return "dense '" + d.name + "': shape[" + std::to_string(x) + "] " + std::to_string(d.shape[x]) + " must be 1 or " +
               dims[x] + " " + std::to_string(want[x]);
  return {};
}

namespace detail {

axis_window grid_local::window(int axis, std::int64_t qc) const {
  if (type == kind::neighborhood)
    return neighborhood_window(qc, grid[axis], kernel[axis], dilation[axis], stride[axis], causal[axis]);
  const std::int64_t lo = std::max<std::int64_t>(qc / block[axis] * block[axis] - halo[axis], 0);
  const std::int64_t hi = std::min<std::int64_t>((qc / block[axis] + 1) * block[axis] + halo[axis], grid[axis]);
  return {lo, 1, hi - lo};
}

std::optional<grid_local> as_grid_local(const mask_expr& m) {
  using op = mask_expr::op;
  const auto is_grid = [](const mask_expr::node* nd) { return nd && (nd->kind == op::neighborhood || nd->kind == op::halo); };
  const mask_expr::node* root = m.root_node();
  const mask_expr::node* grid = root;
  const mask_expr::node* extra = nullptr;  // ~sinks(t) of "grid | ~sinks(t)"
  if (root && root->kind == op::or_) {
    const mask_expr::node* a = m.node_at(root->first);
    const mask_expr::node* b = a ? m.node_at(a->next) : nullptr;
    if (!b || b->next >= 0) return std::nullopt;  // exactly two terms
    if (!is_grid(a)) std::swap(a, b);
    grid = a;
    extra = b;
    const mask_expr::node* inner = extra->kind == op::not_ ? m.node_at(extra->first) : nullptr;
    if (!inner || inner->kind != op::sinks) return std::nullopt;
    extra = inner;
  }
  if (!is_grid(grid)) return std::nullopt;
  const std::vector<std::int64_t>& t = *m.table(grid->table);
  if (!check_grid(grid->kind, t).empty()) return std::nullopt;  // an invalid pattern has no windows to gather
  grid_local g = decode_grid(grid->kind, t);
  if (extra) {
    if (extra->a != g.tokens()) return std::nullopt;  // global keys inside the grid are not "additional" keys
    g.extra_keys = true;
  }
  return g;
}

}  // namespace detail

}  // namespace omniattn
