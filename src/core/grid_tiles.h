// Query tiles that are boxes of a token grid, each with the box of keys its queries can reach (grid-local masks:
// neighborhood, halo). Raster tiles of a 2-D neighborhood are all PARTIAL and mostly masked (a 64-token row strip of a
// 64x64 image with a 7x7 window touches 7 whole image rows = 448 keys for 49 useful per query); a box of queries
// shares most of its keys instead, so the kernel computes only the box's keys.
//
// Key boxes are read in place, without a gather: K and V are packed once per (sequence, kv head) in "packed order"
// (raster order, except that the last axis is grouped by dilation, so that every line of a key box is a run of
// consecutive packed keys), and a key box is a list of 16-key segments, each one line (or a 16-key piece of one) of
// the box. A segment always spans 16 packed keys; keys of it past the line are masked by the plan's bits.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/grid_local.h"

namespace omniattn::detail {

inline constexpr std::int64_t k_segment = 16;  // keys per segment: one AVX-512 vector (two AVX2 / four NEON vectors)

struct grid_tile {
  std::int64_t q_begin = 0, q_count = 0;      // its queries (raster tokens): plan.q_tokens[q_begin, q_begin + q_count)
  std::int64_t seg_begin = 0, seg_count = 0;  // its keys: 16 from each packed index plan.segments[seg_begin + s]
  std::int64_t bits_begin = 0;  // allowed key slots (slot = 16 s + lane) of query i: plan.bits[bits_begin + i * words + w]
  bool full = false;            // every query sees every slot: no bits stored
};

struct grid_plan {
  int rank = 1;
  std::int64_t patch[3] = {1, 1, 1};  // query box per axis, in tokens of one dilation group
  std::int64_t max_rows = 0, max_segments = 0;
  std::int64_t pairs_allowed = 0;     // mask area: sum over queries of the keys they see
  std::int64_t pairs_computed = 0;    // rows x key slots padded to whole 64-key tiles, summed over boxes
  std::vector<std::int64_t> packed_token;  // token at each packed index (tokens() of them)
  std::vector<std::int64_t> q_tokens, segments;
  std::vector<std::uint64_t> bits;
  std::vector<grid_tile> tiles;

  static std::int64_t words(const grid_tile& t) { return (t.seg_count * k_segment + 63) / 64; }
  std::string describe() const;
  std::size_t bytes() const;
};

// Covers every token of the grid by query boxes of at most max_rows (<= 64) queries, shaped by a cost model of the
// fused kernel (64-key tiles, register blocks of row_block rows), in raster order of the boxes.
// extra_keys: keys past the grid (packed as themselves, after it) that every query sees, appended to every box as
// whole segments (g.extra_keys; NATTEN's additional KV).
grid_plan plan_grid_tiles(const grid_local& g, std::int64_t max_rows, std::int64_t row_block, std::int64_t extra_keys = 0);

// Within one attention() call, selection and the kernel share a plan too large for the cache: a call_plan_scope on
// the calling thread keeps the plans built during the call (select() builds one to describe it), and drops them when
// the call returns, so a large plan is built once per call and retained by nobody afterwards.
class call_plan_scope {
 public:
  call_plan_scope();
  ~call_plan_scope();
  call_plan_scope(const call_plan_scope&) = delete;
  call_plan_scope& operator=(const call_plan_scope&) = delete;
};

// The same plan from a small process-wide cache (the last few grids, at most 64 MiB of plans): selection and every
// call of a layer that runs the same grid reuse one plan instead of rebuilding it. Thread-safe; plans are built
// outside the cache's lock.
std::shared_ptr<const grid_plan> cached_grid_plan(const grid_local& g, std::int64_t max_rows, std::int64_t row_block,
                                                  std::int64_t extra_keys = 0);

}  // namespace omniattn::detail
