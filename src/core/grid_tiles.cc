// Query-box tiling of grid-local masks (see core/grid_tiles.h).
#include "core/grid_tiles.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <sstream>

namespace omniattn::detail {
namespace {

// Tokens of dilation group `group` on an axis of n tokens with dilation d: coordinates group, group + d, ...
std::int64_t group_length(std::int64_t n, std::int64_t d, std::int64_t group) { return (n - group + d - 1) / d; }

// One axis of a query box: queries at group coordinates [u0, u1), their windows (group coordinates) and the union.
struct axis_box {
  std::int64_t lo = 0, extent = 0;              // union of the windows: group coordinates [lo, lo + extent)
  std::int64_t first[64] = {}, count[64] = {};  // per query of the box: window start (relative to lo) and length
};

axis_box box_axis(const grid_local& g, int a, std::int64_t group, std::int64_t u0, std::int64_t u1) {
  const std::int64_t d = g.dilation[a];
  axis_box box;
  std::int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (std::int64_t u = u0; u < u1; ++u) {
    const axis_window w = g.window(a, group + d * u);
    const std::int64_t f = (w.first - group) / d;
    box.first[u - u0] = f;
    box.count[u - u0] = w.count;
    if (w.count > 0) {
      lo = std::min(lo, f);
      hi = std::max(hi, f + w.count);
    }
  }
  if (hi < lo) return box;  // no query of the box sees anything on this axis
  box.lo = lo;
  box.extent = hi - lo;
  for (std::int64_t u = u0; u < u1; ++u) box.first[u - u0] -= lo;
  return box;
}

std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// Modelled kernel work per query of a box, in units of one row x one key slot of the micro-kernels: every row runs
// every key slot (segments padded to whole 64-key tiles), row blocks are padded to the register blocking, +2 rows
// stand for the per-tile softmax bookkeeping, and a box has a fixed cost (loading and storing its rows) of about 256.
double box_cost(double rows, double slots, std::int64_t row_block) {
  const double padded_rows = std::ceil(rows / static_cast<double>(row_block)) * static_cast<double>(row_block);
  return (std::ceil(slots / 64.0) * 64.0 * (padded_rows + 2.0) + 256.0) / rows;
}

}  // namespace

std::string grid_plan::describe() const {
  std::ostringstream os;
  os << tiles.size() << " query boxes of " << patch[0];
  for (int a = 1; a < rank; ++a) os << "x" << patch[a];
  os.precision(3);
  os << " (at most " << max_rows << " queries, " << max_segments * k_segment << " key slots); "
     << (pairs_computed ? 100.0 * static_cast<double>(pairs_allowed) / static_cast<double>(pairs_computed) : 0.0)
     << "% of computed pairs are allowed";
  return os.str();
}

grid_plan plan_grid_tiles(const grid_local& g, std::int64_t max_rows, std::int64_t row_block, std::int64_t extra_keys) {
  const int rank = g.rank, last = rank - 1;
  std::int64_t n[3] = {1, 1, 1}, dil[3] = {1, 1, 1};
  for (int a = 0; a < rank; ++a) {
    n[a] = g.grid[a];
    dil[a] = g.dilation[a];
  }
  grid_plan plan;
  plan.rank = rank;

  // Packed order: raster, with the last axis grouped by dilation so each group's line is contiguous.
  std::vector<std::int64_t> last_perm(static_cast<std::size_t>(n[last]));
  {
    std::vector<std::int64_t> off(static_cast<std::size_t>(dil[last]) + 1, 0);
    for (std::int64_t gg = 0; gg < dil[last]; ++gg)
      off[static_cast<std::size_t>(gg + 1)] = off[static_cast<std::size_t>(gg)] + group_length(n[last], dil[last], gg);
    for (std::int64_t c = 0; c < n[last]; ++c)
      last_perm[static_cast<std::size_t>(c)] = off[static_cast<std::size_t>(c % dil[last])] + c / dil[last];
  }
  const std::int64_t tokens = g.tokens();
  plan.packed_token.resize(static_cast<std::size_t>(tokens + extra_keys));
  for (std::int64_t t = 0; t < tokens; ++t)
    plan.packed_token[static_cast<std::size_t>(t / n[last] * n[last] + last_perm[static_cast<std::size_t>(t % n[last])])] = t;
  for (std::int64_t t = tokens; t < tokens + extra_keys; ++t) plan.packed_token[static_cast<std::size_t>(t)] = t;

  // Box shape: the cheapest by the cost model, with each axis's key extent and query count averaged over the boxes
  // that tile it (border boxes reach fewer keys; with halo or stride, boxes that straddle blocks reach more).
  std::int64_t glen[3] = {1, 1, 1};  // length of the longest dilation group per axis
  for (int a = 0; a < rank; ++a) glen[a] = group_length(n[a], dil[a], 0);
  const std::int64_t cap = std::min<std::int64_t>(max_rows, 64);
  double mean_keys[3][65] = {}, mean_rows[3][65] = {};
  for (int a = 0; a < rank; ++a)
    for (std::int64_t p = 1; p <= std::min(cap, glen[a]); ++p) {
      double keys = 0, rows = 0, boxes = 0;
      for (std::int64_t u0 = 0; u0 < glen[a]; u0 += p, ++boxes) {
        const std::int64_t u1 = std::min(u0 + p, glen[a]), e = box_axis(g, a, 0, u0, u1).extent;
        keys += static_cast<double>(a == last ? round_up(e, k_segment) : e);
        rows += static_cast<double>(u1 - u0);
      }
      mean_keys[a][p] = keys / boxes;
      mean_rows[a][p] = rows / boxes;
    }
  double best = -1.0;
  for (std::int64_t p0 = 1; p0 <= std::min(cap, glen[0]); ++p0)
    for (std::int64_t p1 = 1; p1 <= (rank > 1 ? std::min(cap / p0, glen[1]) : 1); ++p1)
      for (std::int64_t p2 = 1; p2 <= (rank > 2 ? std::min(cap / (p0 * p1), glen[2]) : 1); ++p2) {
        const std::int64_t p[3] = {p0, p1, p2};
        double slots = 1, rows = 1;
        for (int a = 0; a < rank; ++a) {
          slots *= mean_keys[a][p[a]];
          rows *= mean_rows[a][p[a]];
        }
        const double c = box_cost(rows, slots, row_block);
        if (best < 0 || c < best - 1e-9) {
          best = c;
          std::copy(p, p + 3, plan.patch);
        }
      }

  std::int64_t tstride[3] = {1, 1, 1};  // token stride per axis (row-major grid)
  for (int a = rank - 2; a >= 0; --a) tstride[a] = tstride[a + 1] * n[a + 1];
  const std::int64_t groups[3] = {dil[0], rank > 1 ? dil[1] : 1, rank > 2 ? dil[2] : 1};
  for (std::int64_t g0 = 0; g0 < groups[0]; ++g0)
    for (std::int64_t g1 = 0; g1 < groups[1]; ++g1)
      for (std::int64_t g2 = 0; g2 < groups[2]; ++g2) {
        const std::int64_t grp[3] = {g0, g1, g2};
        std::int64_t len[3] = {1, 1, 1};
        for (int a = 0; a < rank; ++a) len[a] = group_length(n[a], dil[a], grp[a]);
        for (std::int64_t u0 = 0; u0 < len[0]; u0 += plan.patch[0])
          for (std::int64_t v0 = 0; v0 < len[1]; v0 += plan.patch[1])
            for (std::int64_t w0 = 0; w0 < len[2]; w0 += plan.patch[2]) {
              const std::int64_t o[3] = {u0, v0, w0};
              axis_box box[3];
              std::int64_t nq[3] = {1, 1, 1};  // queries per axis
              for (int a = 0; a < rank; ++a) {
                nq[a] = std::min(plan.patch[a], len[a] - o[a]);
                box[a] = box_axis(g, a, grp[a], o[a], o[a] + nq[a]);
              }
              grid_tile t;
              t.q_begin = static_cast<std::int64_t>(plan.q_tokens.size());
              t.seg_begin = static_cast<std::int64_t>(plan.segments.size());
              t.bits_begin = static_cast<std::int64_t>(plan.bits.size());
              // Key lines: every coordinate of the outer axes in the box; each line is 16-key segments of the last axis.
              const std::int64_t outer[2] = {rank > 1 ? box[0].extent : 1, rank > 2 ? box[1].extent : 1};
              const std::int64_t seg_per_line = (box[last].extent + k_segment - 1) / k_segment;
              bool any = box[last].extent > 0;
              for (int a = 0; a < last; ++a) any = any && box[a].extent > 0;
              if (any)
                for (std::int64_t y0 = 0; y0 < outer[0]; ++y0)
                  for (std::int64_t y1 = 0; y1 < outer[1]; ++y1) {
                    const std::int64_t y[2] = {y0, y1};
                    std::int64_t line = 0;  // raster index of the line's first token without the last axis
                    for (int a = 0; a < last; ++a) line += (grp[a] + dil[a] * (box[a].lo + y[a])) * tstride[a];
                    const std::int64_t start = line + last_perm[static_cast<std::size_t>(grp[last])] + box[last].lo;
                    for (std::int64_t s = 0; s < seg_per_line; ++s) plan.segments.push_back(start + s * k_segment);
                  }
              const std::int64_t box_segments = static_cast<std::int64_t>(plan.segments.size()) - t.seg_begin;
              for (std::int64_t x0 = 0; x0 < extra_keys; x0 += k_segment) plan.segments.push_back(tokens + x0);
              t.seg_count = static_cast<std::int64_t>(plan.segments.size()) - t.seg_begin;
              const std::int64_t words = grid_plan::words(t), line_slots = seg_per_line * k_segment;
              std::int64_t q[3] = {0, 0, 0};
              bool full = true;
              for (q[0] = 0; q[0] < nq[0]; ++q[0])
                for (q[1] = 0; q[1] < nq[1]; ++q[1])
                  for (q[2] = 0; q[2] < nq[2]; ++q[2]) {
                    std::int64_t tok = 0;
                    for (int a = 0; a < rank; ++a) tok += (grp[a] + dil[a] * (o[a] + q[a])) * tstride[a];
                    plan.q_tokens.push_back(tok);
                    // The query's window in the key box is a sub-box: runs of slots along the last axis.
                    std::int64_t f[3] = {0, 0, 0}, cnt[3] = {1, 1, 1}, seen = 1;
                    for (int a = 0; a < rank; ++a) {
                      f[a] = box[a].first[q[a]];
                      cnt[a] = box[a].count[q[a]];
                      seen *= cnt[a];
                    }
                    plan.pairs_allowed += seen + extra_keys;
                    full = full && seen + extra_keys == t.seg_count * k_segment;
                    const std::size_t row = plan.bits.size();
                    plan.bits.resize(row + static_cast<std::size_t>(words), 0);
                    for (std::int64_t kk = box_segments * k_segment; kk < box_segments * k_segment + extra_keys; ++kk)
                      plan.bits[row + static_cast<std::size_t>(kk / 64)] |= std::uint64_t{1} << (kk % 64);
                    if (seen == 0) continue;
                    const std::int64_t o0 = rank > 1 ? f[0] : 0, c0 = rank > 1 ? cnt[0] : 1;
                    const std::int64_t o1 = rank > 2 ? f[1] : 0, c1 = rank > 2 ? cnt[1] : 1;
                    for (std::int64_t y0 = o0; y0 < o0 + c0; ++y0)
                      for (std::int64_t y1 = o1; y1 < o1 + c1; ++y1) {
                        const std::int64_t run = (y0 * outer[1] + y1) * line_slots + f[last];
                        for (std::int64_t kk = run; kk < run + cnt[last]; ++kk)
                          plan.bits[row + static_cast<std::size_t>(kk / 64)] |= std::uint64_t{1} << (kk % 64);
                      }
                  }
              t.q_count = static_cast<std::int64_t>(plan.q_tokens.size()) - t.q_begin;
              t.full = full && t.seg_count > 0;
              if (t.full) plan.bits.resize(static_cast<std::size_t>(t.bits_begin));
              plan.max_rows = std::max(plan.max_rows, t.q_count);
              plan.max_segments = std::max(plan.max_segments, t.seg_count);
              plan.pairs_computed += t.q_count * round_up(t.seg_count * k_segment, 64);
              plan.tiles.push_back(t);
            }
      }
  return plan;
}

std::size_t grid_plan::bytes() const {
  return (packed_token.size() + q_tokens.size() + segments.size() + bits.size()) * 8 + tiles.size() * sizeof(grid_tile);
}

namespace {
using plan_key = std::vector<std::int64_t>;
// Plans pinned for the current call of this thread (only while a call_plan_scope is active).
struct call_pins {
  int depth = 0;
  std::vector<std::pair<plan_key, std::shared_ptr<const grid_plan>>> plans;
};
call_pins& pins() {
  thread_local call_pins p;
  return p;
}
}  // namespace

call_plan_scope::call_plan_scope() { ++pins().depth; }
call_plan_scope::~call_plan_scope() {
  if (--pins().depth == 0) pins().plans.clear();
}

std::shared_ptr<const grid_plan> cached_grid_plan(const grid_local& g, std::int64_t max_rows, std::int64_t row_block,
                                                  std::int64_t extra_keys) {
  std::vector<std::int64_t> key = {static_cast<std::int64_t>(g.type), g.rank, max_rows, row_block, extra_keys};
  for (int a = 0; a < 3; ++a)
    key.insert(key.end(), {g.grid[a], g.kernel[a], g.dilation[a], g.stride[a], std::int64_t{g.causal[a]}, g.block[a], g.halo[a]});
  using entry = std::pair<std::vector<std::int64_t>, std::shared_ptr<const grid_plan>>;
  static std::mutex mu;
  static std::vector<entry> cache;  // most recently used last
  call_pins& pinned = pins();
  for (const auto& [k, plan] : pinned.plans)
    if (k == key) return plan;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (std::size_t i = 0; i < cache.size(); ++i)
      if (cache[i].first == key) {
        std::rotate(cache.begin() + static_cast<std::ptrdiff_t>(i), cache.begin() + static_cast<std::ptrdiff_t>(i) + 1, cache.end());
        return cache.back().second;
      }
  }
  // Built without the lock: a large plan (tens of MiB for big 3-D grids) must not stall callers of other grids.
  auto plan = std::make_shared<const grid_plan>(plan_grid_tiles(g, max_rows, row_block, extra_keys));
  constexpr std::size_t k_cache_bytes = std::size_t{64} << 20;
  if (plan->bytes() > k_cache_bytes) {
    if (pinned.depth > 0) pinned.plans.emplace_back(std::move(key), plan);
    return plan;
  }
  std::lock_guard<std::mutex> lock(mu);
  cache.emplace_back(std::move(key), plan);
  std::size_t total = 0;
  for (const entry& e : cache) total += e.second->bytes();
  while (cache.size() > 4 || total > k_cache_bytes) {
    total -= cache.front().second->bytes();
    cache.erase(cache.begin());
  }
  return plan;
}

}  // namespace omniattn::detail
