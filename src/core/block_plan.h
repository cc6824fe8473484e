// Sparse tile plans (BCSR): for each (batch, head, q tile) the non-empty key tiles with their kinds, and for the
// backward's kv-major passes the transpose (for each key tile, the q tiles that meet it). Kernels iterate only the
// listed tiles, so a 1%-dense mask costs 1% of the tiles, not a scan of all of them. Broadcast dims of the block
// mask (batch or heads 1) stay collapsed: at() maps a call's (b, h) onto them.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "omniattn/spec.h"

namespace omniattn::detail {

struct block_plan {
  struct entry {
    std::int32_t tile;  // key tile (q-major lists) or q tile (kv-major lists)
    tile_kind kind;     // full or partial, never empty
  };
  std::int64_t batch = 0, heads = 0, q_tiles = 0, kv_tiles = 0;
  std::vector<std::int64_t> row_begin;  // [batch * heads * q_tiles + 1]: q-major lists
  std::vector<entry> rows;
  std::vector<std::int64_t> col_begin;  // [batch * heads * kv_tiles + 1]: kv-major lists (only if asked for)
  std::vector<entry> cols;
  std::int64_t full = 0, partial = 0, empty = 0;  // tiles by kind, over the collapsed structure

  std::int64_t slot(std::int64_t b, std::int64_t h) const { return (batch == 1 ? 0 : b) * heads + (heads == 1 ? 0 : h); }
  std::span<const entry> row(std::int64_t b, std::int64_t h, std::int64_t qt) const {
    const std::int64_t at = slot(b, h) * q_tiles + qt;
    return {rows.data() + row_begin[static_cast<std::size_t>(at)],
            static_cast<std::size_t>(row_begin[static_cast<std::size_t>(at) + 1] - row_begin[static_cast<std::size_t>(at)])};
  }
  std::span<const entry> col(std::int64_t b, std::int64_t h, std::int64_t kt) const {
    const std::int64_t at = slot(b, h) * kv_tiles + kt;
    return {cols.data() + col_begin[static_cast<std::size_t>(at)],
            static_cast<std::size_t>(col_begin[static_cast<std::size_t>(at) + 1] - col_begin[static_cast<std::size_t>(at)])};
  }
};

// The lists of a dense tile map; kv_major adds the transpose.
block_plan make_block_plan(const block_mask& bm, bool kv_major);

}  // namespace omniattn::detail
