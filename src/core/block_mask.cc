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

// A user block mask's tiles need not be the kernel's: visits the user tiles that cover keys [k0, k1) of row range
// [q0, q1), calling fn(kind, q0', q1', k0', k1') with each intersection.
template <class Fn>
void for_user_tiles(const block_mask& bm, std::int64_t b, std::int64_t h, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                    std::int64_t k1, Fn&& fn) {
  for (std::int64_t ut = q0 / bm.q_tile; ut * bm.q_tile < q1; ++ut)
    for (std::int64_t uk = k0 / bm.kv_tile; uk * bm.kv_tile < k1; ++uk)
      fn(bm.at(b, h, ut, uk), std::max(q0, ut * bm.q_tile), std::min(q1, (ut + 1) * bm.q_tile), std::max(k0, uk * bm.kv_tile),
         std::min(k1, (uk + 1) * bm.kv_tile));
}

// The kind of a kernel tile under a user block mask (FlexAttention's contract: EMPTY user tiles masked, FULL ones
// allowed without the mask, PARTIAL ones by the mask), exact: each part of the tile that one user tile covers is
// classified by causal alone (FULL user tile) or by causal & mask (PARTIAL), in closed form for built-in patterns, so
// no element is evaluated unless the mask is a user predicate.
tile_kind classify_with_blocks(const attn_params& p, const mask_expr& causal, const mask_expr& both, std::int64_t b,
                               std::int64_t h, std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1,
                               std::int64_t lq, std::int64_t lk) {
  bool any = false, all = true;
  for_user_tiles(*p.blocks, b, h, q0, q1, k0, k1, [&](tile_kind u, std::int64_t a0, std::int64_t a1, std::int64_t c0, std::int64_t c1) {
    const mask_expr& m = u == tile_kind::partial ? both : causal;
    if (u != tile_kind::empty) u = m ? m.classify(b, h, a0, a1, c0, c1, lq, lk) : tile_kind::full;
    any |= u != tile_kind::empty;
    all &= u == tile_kind::full;
  });
  return !any ? tile_kind::empty : all ? tile_kind::full : tile_kind::partial;
}

}  // namespace

std::uint64_t row_allowed_bits(const attn_params& p, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0,
                               std::int64_t n, std::int64_t lq, std::int64_t lk) {
  std::uint64_t bits = n >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << n) - 1;
  if (p.blocks) {
    // Per user tile the row's keys are all masked, all allowed, or (PARTIAL) the mask's row bits.
    std::uint64_t user = 0;
    for_user_tiles(*p.blocks, b, h, i, i + 1, k0, k0 + n,
                   [&](tile_kind u, std::int64_t, std::int64_t, std::int64_t c0, std::int64_t c1) {
                     if (u == tile_kind::empty) return;
                     const std::int64_t len = c1 - c0;
                     std::uint64_t part = len >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << len) - 1;
                     if (u == tile_kind::partial && p.mask) part &= p.mask->row_bits(b, h, i, c0, len, lq, lk);
                     user |= part << (c0 - k0);
                   });
    bits &= user;
  }
  if (p.causal != causal_mode::none) {
    const std::int64_t hi = i + (p.causal == causal_mode::bottom_right ? lk - lq : 0) + 1 - k0;  // keys < k0 + hi
    if (hi <= 0) return 0;
    if (hi < 64) bits &= (std::uint64_t{1} << hi) - 1;
  }
  // With a user block mask the mask only refines its PARTIAL tiles (above).
  if (!p.blocks && p.mask && bits) bits &= p.mask->row_bits(b, h, i, k0, n, lq, lk);
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
    if (const std::string why = p.mask->check(p.batch, total_heads(p), total_q(p), total_k(p)); !why.empty())
      throw std::invalid_argument("[build_block_mask] p.mask " + why);
  block_mask bm;
  bm.q_tile = q_tile;
  bm.kv_tile = kv_tile;
  const mask_expr m = effective_mask(p);
  const mask_expr causal = p.causal == causal_mode::none ? mask_expr{} : mask_expr::causal(p.causal);
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
            // The tile's rows and keys at their positions in the whole problem (options::block).
            const std::int64_t a0 = e.q_pos + q0, a1 = e.q_pos + q1, c0 = e.k_pos + k0, c1 = e.k_pos + k1;
            const std::int64_t hh = p.head0 + h;  // the head of the whole problem
            if (p.blocks) {
              kind = classify_with_blocks(p, causal, m, b, hh, a0, a1, c0, c1, e.q_total, e.k_total);
            } else {
              kind = m.classify(b, hh, a0, a1, c0, c1, e.q_total, e.k_total);
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
