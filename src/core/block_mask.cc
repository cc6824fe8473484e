// Block-mask construction: tile classification of a spec's mask (FULL / PARTIAL / EMPTY).
// Causal is classified analytically from the corner elements of each tile; a mask functor or a user block mask
// forces exact evaluation of the tiles that causal leaves non-empty.
#include <algorithm>

#include "omniattn/attention.h"

namespace omniattn {
namespace {

// Causal classification of tile [q0, q1) x [k0, k1) for sequence lengths lq, lk: allowed iff j <= i + offset.
tile_kind causal_tile(causal_mode c, std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1,
                      std::int64_t lq, std::int64_t lk) {
  if (c == causal_mode::none) return tile_kind::full;
  const std::int64_t offset = c == causal_mode::bottom_right ? lk - lq : 0;
  if (k0 > (q1 - 1) + offset) return tile_kind::empty;  // even the last query row sees none of the tile
  if (k1 - 1 <= q0 + offset) return tile_kind::full;    // even the first query row sees all of it
  return tile_kind::partial;
}

}  // namespace

block_mask build_block_mask(const attn_params& p, std::int64_t q_tile, std::int64_t kv_tile) {
  block_mask bm;
  bm.q_tile = q_tile;
  bm.kv_tile = kv_tile;
  const bool per_element = p.mask || p.blocks;
  // Causal with fixed lengths is the same for every (batch, head); anything that may vary broadcasts nothing.
  bm.batch = per_element || p.cu_seqlens_q ? p.batch : 1;
  bm.heads = per_element ? p.heads_q : 1;
  bm.q_tiles = (p.seq_q + q_tile - 1) / q_tile;
  bm.kv_tiles = (p.seq_k + kv_tile - 1) / kv_tile;
  bm.kinds.assign(static_cast<std::size_t>(bm.batch * bm.heads * bm.q_tiles * bm.kv_tiles), tile_kind::empty);
  for (std::int64_t b = 0; b < bm.batch; ++b) {
    const seq_extent e = sequence(p, b);
    for (std::int64_t h = 0; h < bm.heads; ++h) {
      for (std::int64_t qt = 0; qt < bm.q_tiles; ++qt) {
        const std::int64_t q0 = qt * q_tile, q1 = std::min(q0 + q_tile, e.q_len);
        for (std::int64_t kt = 0; kt < bm.kv_tiles; ++kt) {
          const std::int64_t k0 = kt * kv_tile, k1 = std::min(k0 + kv_tile, e.k_len);
          tile_kind kind = tile_kind::empty;
          if (q0 < q1 && k0 < k1) kind = causal_tile(p.causal, q0, q1, k0, k1, e.q_len, e.k_len);
          if (kind != tile_kind::empty && per_element) {
            std::int64_t allowed = 0;
            for (std::int64_t i = q0; i < q1; ++i)
              for (std::int64_t j = k0; j < k1; ++j) allowed += element_allowed(p, b, h, i, j, e.q_len, e.k_len);
            const std::int64_t area = (q1 - q0) * (k1 - k0);
            kind = allowed == 0 ? tile_kind::empty : allowed == area ? tile_kind::full : tile_kind::partial;
          }
          bm.kinds[static_cast<std::size_t>(((b * bm.heads + h) * bm.q_tiles + qt) * bm.kv_tiles + kt)] = kind;
        }
      }
    }
  }
  return bm;
}

}  // namespace omniattn
