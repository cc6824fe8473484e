// Sparse tile plans from a dense tile map (core/block_plan.h).
#include "core/block_plan.h"

namespace omniattn::detail {

block_plan make_block_plan(const block_mask& bm, bool kv_major) {
  block_plan pl;
  pl.batch = bm.batch;
  pl.heads = bm.heads;
  pl.q_tiles = bm.q_tiles;
  pl.kv_tiles = bm.kv_tiles;
  const std::int64_t slots = bm.batch * bm.heads;
  pl.row_begin.reserve(static_cast<std::size_t>(slots * bm.q_tiles + 1));
  pl.row_begin.push_back(0);
  for (std::int64_t s = 0; s < slots; ++s)
    for (std::int64_t qt = 0; qt < bm.q_tiles; ++qt) {
      const tile_kind* kinds = bm.kinds.data() + (s * bm.q_tiles + qt) * bm.kv_tiles;
      for (std::int64_t kt = 0; kt < bm.kv_tiles; ++kt) {
        const tile_kind k = kinds[kt];
        if (k == tile_kind::empty) {
          ++pl.empty;
          continue;
        }
        ++(k == tile_kind::full ? pl.full : pl.partial);
        pl.rows.push_back({static_cast<std::int32_t>(kt), k});
      }
      pl.row_begin.push_back(static_cast<std::int64_t>(pl.rows.size()));
    }
  if (!kv_major) return pl;
  // Counting sort by key tile: each column lists its q tiles in ascending order.
  pl.col_begin.assign(static_cast<std::size_t>(slots * bm.kv_tiles + 1), 0);
  for (std::int64_t s = 0; s < slots; ++s)
    for (std::int64_t qt = 0; qt < bm.q_tiles; ++qt)
      for (const block_plan::entry& e : pl.row(s / bm.heads, s % bm.heads, qt))
        ++pl.col_begin[static_cast<std::size_t>(s * bm.kv_tiles + e.tile + 1)];
  for (std::size_t i = 1; i < pl.col_begin.size(); ++i) pl.col_begin[i] += pl.col_begin[i - 1];
  pl.cols.resize(pl.rows.size());
  std::vector<std::int64_t> fill(pl.col_begin.begin(), pl.col_begin.end() - 1);
  for (std::int64_t s = 0; s < slots; ++s)
    for (std::int64_t qt = 0; qt < bm.q_tiles; ++qt)
      for (const block_plan::entry& e : pl.row(s / bm.heads, s % bm.heads, qt))
        pl.cols[static_cast<std::size_t>(fill[static_cast<std::size_t>(s * bm.kv_tiles + e.tile)]++)] = {static_cast<std::int32_t>(qt), e.kind};
  return pl;
}

}  // namespace omniattn::detail
