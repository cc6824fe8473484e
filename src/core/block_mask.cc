// Block-mask construction and per-row allowed bits: the spec's element predicate (causal, mask expression, user
// block mask) at tile and at row granularity.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "core/checked_math.h"
#include "omniattn/attention.h"

namespace omniattn {
namespace {

// The spec's causal flag and mask as one expression, so both classify in closed form together.
mask_expr effective_mask(const attn_params& p) {
  mask_expr m = p.causal == causal_mode::none ? mask_expr{} : mask_expr::causal(p.causal);
  if (p.mask) m = m & *p.mask;
  return m;
}

}  // namespace

std::uint64_t row_allowed_bits(const attn_params& p, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0,
                               std::int64_t n, std::int64_t lq, std::int64_t lk) {
  if (p.blocks) {  // a user block mask may use other tile sizes: element by element
    std::uint64_t bits = 0;
    for (std::int64_t t = 0; t < n; ++t) bits |= static_cast<std::uint64_t>(element_allowed(p, b, h, i, k0 + t, lq, lk)) << t;
    return bits;
  }
  std::uint64_t bits = n >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << n) - 1;
  if (p.causal != causal_mode::none) {
    const std::int64_t hi = i + (p.causal == causal_mode::bottom_right ? lk - lq : 0) + 1 - k0;  // keys < k0 + hi
    if (hi <= 0) return 0;
    if (hi < 64) bits &= (std::uint64_t{1} << hi) - 1;
  }
  if (p.mask && bits) bits &= p.mask->row_bits(b, h, i, k0, n, lq, lk);
  return bits;
}

block_mask build_block_mask(const attn_params& p, std::int64_t q_tile, std::int64_t kv_tile) {
  if (q_tile <= 0 || kv_tile <= 0)
    throw std::invalid_argument("[build_block_mask] tile sizes " + std::to_string(q_tile) + "x" + std::to_string(kv_tile) +
                                " must be > 0");
  // attn_params may be filled by hand rather than by make_params: the enum and the mask get the same checks here.
  if (p.causal != causal_mode::none && p.causal != causal_mode::top_left && p.causal != causal_mode::bottom_right)
    throw std::invalid_argument("[build_block_mask] p.causal " + std::to_string(static_cast<int>(p.causal)) +
                                " is not a causal_mode");
  if (p.mask)
    if (const std::string why = p.mask->check(p.batch, p.heads_q, p.seq_q, p.seq_k); !why.empty())
      throw std::invalid_argument("[build_block_mask] p.mask " + why);
  block_mask bm;
  bm.q_tile = q_tile;
  bm.kv_tile = kv_tile;
  const mask_expr m = effective_mask(p);
  // Only user predicates and user block masks can differ between heads or batches; varlen lengths differ by sequence.
  const bool per_head = p.blocks || (p.mask && p.mask->uses_head());
  const bool per_batch = p.blocks || p.cu_seqlens_q || (p.mask && p.mask->uses_batch());
  bm.batch = per_batch ? p.batch : 1;
  bm.heads = per_head ? p.heads_q : 1;
  bm.q_tiles = detail::ceil_div(p.seq_q, q_tile);
  bm.kv_tiles = detail::ceil_div(p.seq_k, kv_tile);
  std::int64_t entries = 0;
  if (!detail::product_fits({bm.batch, bm.heads, bm.q_tiles, bm.kv_tiles}, &entries))
    throw std::invalid_argument("[build_block_mask] batch * heads * q_tiles * kv_tiles overflows int64");
  bm.kinds.assign(static_cast<std::size_t>(entries), tile_kind::empty);
  for (std::int64_t b = 0; b < bm.batch; ++b) {
    const seq_extent e = sequence(p, b);
    for (std::int64_t h = 0; h < bm.heads; ++h) {
      for (std::int64_t qt = 0; qt < bm.q_tiles; ++qt) {
        const std::int64_t q0 = qt * q_tile, q1 = std::min(q0 + q_tile, e.q_len);
        for (std::int64_t kt = 0; kt < bm.kv_tiles; ++kt) {
          const std::int64_t k0 = kt * kv_tile, k1 = std::min(k0 + kv_tile, e.k_len);
          tile_kind kind = tile_kind::empty;
          if (q0 < q1 && k0 < k1) {
            if (p.blocks) {
              std::int64_t allowed = 0;
              for (std::int64_t i = q0; i < q1; ++i)
                for (std::int64_t j = k0; j < k1; ++j) allowed += element_allowed(p, b, h, i, j, e.q_len, e.k_len);
              const std::int64_t area = (q1 - q0) * (k1 - k0);
              kind = allowed == 0 ? tile_kind::empty : allowed == area ? tile_kind::full : tile_kind::partial;
            } else {
              kind = m.classify(b, h, q0, q1, k0, k1, e.q_len, e.k_len);
            }
          }
          bm.kinds[static_cast<std::size_t>(((b * bm.heads + h) * bm.q_tiles + qt) * bm.kv_tiles + kt)] = kind;
        }
      }
    }
  }
  return bm;
}

}  // namespace omniattn
