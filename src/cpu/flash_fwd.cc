// The fused CPU attention forward kernel (FlashAttention-2 style), written once over Highway for every ISA.
//
// Math contract: identical to the oracle (include/omniattn/spec.h). Per query tile of BQ rows and key tile of BK keys:
//   S = Q K^T                                 (fp32 FMA micro-kernel, K packed transposed per tile)
//   S = S * scale * log2(e), masked -> -inf    (element predicate only on PARTIAL tiles and the ragged edge)
//   m' = max(m, rowmax S);  P = exp2(S - m');  l = l * exp2(m - m') + rowsum P
//   O  = O * exp2(m - m') + P V                (fp32 FMA micro-kernel, V packed row-major per sequence/head)
//   out = O / l,  lse = (m + log2 l) * ln 2;  l == 0 (nothing allowed) gives out = 0, lse = -inf.
// Working in base 2 folds log2(e) into the scale once, so each exponential is one exp2.
// Work: for each (sequence, kv head) K/V are packed once (shared by every q head of the GQA group), then one parallel
// loop runs over (q tile, q head of the group) with dynamic scheduling, heaviest tiles first. Each output row is
// computed by exactly one thread in a fixed order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>


#include "core/backends.h"
#include "core/block_plan.h"
#include "core/grid_tiles.h"
#include "core/parallel.h"
#include "core/score_kinds.h"
#include "core/storage.h"
#include "cpu/bf16_dot.h"
#include "cpu/kernels.h"
#include "cpu/schedule.h"
#include "cpu/scratch.h"
#include "cpu/tiles.h"
#include "omniattn/attention.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/flash_fwd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/aligned_allocator.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "cpu/math-inl.h"
#include "cpu/score_tile-inl.h"
#include "cpu/online_softmax-inl.h"
#include "cpu/tile_ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;


// Packed K/V of a range of kv heads for every sequence. Per (sequence, kv head) slot: K transposed per key tile
// ([tile][dim][BK], so the S micro-kernel loads BK consecutive keys of one dim) and V row-major ([tile][BK][dim_vp]).
// The bf16-dot kernel stores bf16 pairs in the same slots (see cpu/bf16_dot.h), using half of each.
struct packed_kv {
  float* kt = nullptr;  // pack_lease slots 0 and 1
  float* v = nullptr;
  std::int64_t kvh_begin = 0, tiles_total = 0;
  std::vector<std::int64_t> tile_offset;  // first kv tile of each sequence within a head's slot
  std::int64_t dim_qk = 0, dim_vp = 0;
  score_plan score;  // the score modifier, lowered once per call
  // RoPE cos / sin per token row and rotary pair, shared by every head (empty without RoPE).
  std::vector<float> q_cos, q_sin, k_cos, k_sin;

  std::int64_t tile_index(std::int64_t b, std::int64_t kvh, std::int64_t kt) const {
    return (kvh - kvh_begin) * tiles_total + tile_offset[static_cast<std::size_t>(b)] + kt;
  }
  float* k_tile(std::int64_t b, std::int64_t kvh, std::int64_t kt) const { return kt_ptr() + tile_index(b, kvh, kt) * dim_qk * k_bk; }
  float* v_tile(std::int64_t b, std::int64_t kvh, std::int64_t kt) const { return v_ptr() + tile_index(b, kvh, kt) * k_bk * dim_vp; }
  float* kt_ptr() const { return kt; }
  float* v_ptr() const { return v; }
};

inline std::uint32_t bf16_pair(const void* base, std::int64_t lo, std::int64_t hi, bool hi_valid) {
  return static_cast<std::uint32_t>(detail::load_bits16(base, lo)) |
         (hi_valid ? static_cast<std::uint32_t>(detail::load_bits16(base, hi)) << 16 : 0u);
}

// A query tile runs in three steps that both work decompositions share (raster tiles of the block mask, query boxes
// of a grid): begin_rows loads its Q rows and resets the softmax state, key_tile folds in one tile of 16-key segments,
// end_rows normalises and stores. pos(i) is the sequence position of tile row i.
template <bool Bf16Dot, class Pos>
void begin_rows(const attn_params& p, const packed_kv& kv, thread_scratch& ts, const seq_extent& e, std::int64_t h,
                std::int64_t rows, std::int64_t dim_vp, Pos&& pos) {
  const df_t d;
  const std::int64_t dim = p.dim_qk;
  float* HWY_RESTRICT qp = ts.q.get();
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const std::int64_t dim_pairs = (dim + 1) / 2;
  auto* q16 = reinterpret_cast<std::uint32_t*>(qp);
  std::fill(qp, qp + rows * dim, 0.0f);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t at = e.q_begin + pos(i);
    const std::int64_t off = e.tensor_batch * p.q_stride[0] + at * p.q_stride[1] + h * p.q_stride[2];
    if constexpr (Bf16Dot) {
      for (std::int64_t dp = 0; dp < dim_pairs; ++dp)
        q16[i * dim_pairs + dp] = bf16_pair(p.q, off + 2 * dp * p.q_stride[3], off + (2 * dp + 1) * p.q_stride[3], 2 * dp + 1 < dim);
    } else {
      load_row_v(p.q, p.in_type, off, p.q_stride[3], dim, qp + i * dim);
      if (p.rope) {
        const std::size_t t = static_cast<std::size_t>((e.tensor_batch * p.seq_rows_q + at) * (p.rope_dim / 2));
        rope_apply(p, kv.q_cos.data() + t, kv.q_sin.data() + t, qp + i * dim);
      }
    }
  }
  std::fill(ts.o.get(), ts.o.get() + rows * dim_vp, 0.0f);
  const float log2e = 1.4426950408889634f;
  // A sink logit starts the row's running max and sum: exp2(sink - m) = 1 at m = sink, and it never meets V.
  std::fill(ts.m, ts.m + k_bq, p.sink_logits ? p.sink_logits[h] * log2e : neg_inf);
  const std::size_t lanes = hn::Lanes(d);
  std::fill(ts.l.get(), ts.l.get() + k_bq * lanes, 0.0f);
  if (p.sink_logits)
    for (std::int64_t i = 0; i < k_bq; ++i) ts.l[static_cast<std::size_t>(i) * lanes] = 1.0f;
}

template <class Pos>
void end_rows(const attn_params& p, thread_scratch& ts, const seq_extent& e, std::int64_t h, std::int64_t rows,
              std::int64_t dim_vp, Pos&& pos) {
  const df_t d;
  const std::size_t lanes = hn::Lanes(d);
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t at = e.q_begin + pos(i);
    const std::int64_t off = e.tensor_batch * p.o_stride[0] + at * p.o_stride[1] + h * p.o_stride[2];
    const float l = hn::GetLane(hn::SumOfLanes(d, hn::Load(d, ts.l.get() + static_cast<std::size_t>(i) * lanes)));
    const bool empty = l == 0.0f;  // nothing allowed and no sink
    const float inv = empty ? 0.0f : 1.0f / l;
    const float* orow = ts.o.get() + i * dim_vp;
    std::int64_t dd = 0;
    if (p.out_type == dtype::f32 && p.o_stride[3] == 1) {
      // Whole vectors: with few keys per row (local attention) the epilogue is a visible share of the work.
      float* dst = static_cast<float*>(p.out) + off;
      const vf_t vinv = hn::Set(d, inv);
      for (; dd + static_cast<std::int64_t>(lanes) <= p.dim_v; dd += static_cast<std::int64_t>(lanes))
        hn::StoreU(hn::Mul(hn::Load(d, orow + dd), vinv), d, dst + dd);
    }
    for (; dd < p.dim_v; ++dd) detail::store_element(p.out, p.out_type, off + dd * p.o_stride[3], orow[dd] * inv);
    if (p.lse)
      p.lse[e.tensor_batch * p.lse_stride[0] + h * p.lse_stride[1] + at * p.lse_stride[2]] =
          empty ? neg_inf : (ts.m[i] + std::log2(l)) * 0.6931471805599453f;
  }
}

// One raster query tile of one head: the online-softmax loop over the tile's non-empty key tiles of the block mask.
// Bf16Dot: Q/K/V/P are bf16 pairs and both products run on vdpbf16ps (bf16 storage only); otherwise fp32 FMA.
template <bool Bf16Dot>
HWY_NOINLINE void run_q_tile(const attn_params& p, const detail::block_plan& plan, const packed_kv& kv, thread_scratch& ts,
                             std::int64_t b, std::int64_t h, std::int64_t qt, const seq_extent& e, std::int64_t dim_vp) {
  const std::int64_t q0 = qt * k_bq, rows = std::min(k_bq, e.q_len - q0);
  const auto pos = [q0](std::int64_t i) { return q0 + i; };
  begin_rows<Bf16Dot>(p, kv, ts, e, h, rows, dim_vp, pos);
  const std::span<const detail::block_plan::entry> listed = plan.row(b, h, qt);
  ts.tiles[static_cast<int>(tile_kind::empty)] += plan.kv_tiles - static_cast<std::int64_t>(listed.size());
  for (const detail::block_plan::entry& en : listed) {
    const tile_kind kind = en.kind;
    const std::int64_t kt = en.tile;
    ++ts.tiles[static_cast<int>(kind)];
    const std::int64_t k0 = kt * k_bk, keys = std::min(k_bk, e.k_len - k0);
    const std::uint64_t in_range = keys == k_bk ? ~std::uint64_t{0} : (std::uint64_t{1} << keys) - 1;
    // Allowed keys of a row as one bit per key: every key in range on FULL tiles, the element predicate on PARTIAL ones.
    const float* ktile = kv.k_tile(b, h / p.group, kt);
    const float* vtile = kv.v_tile(b, h / p.group, kt);
    const key_segments<float> ks{{ktile, ktile + 16, ktile + 32, ktile + 48},
                          {vtile, vtile + 16 * dim_vp, vtile + 32 * dim_vp, vtile + 48 * dim_vp}, k_bk, dim_vp};
    key_tile<Bf16Dot>(p, ts, rows, keys, ks, dim_vp,
                      [&](float* s) { score_tile(p, kv.score, s, k_bk, rows, k_bk, keys, b, p.head0 + h, e.q_pos + q0, e.k_pos + k0); },
                      [&](std::int64_t i) {
                        return kind == tile_kind::partial
                                   ? row_allowed_bits(p, b, p.head0 + h, e.q_pos + q0 + i, e.k_pos + k0, keys, e.q_total, e.k_total)
                                   : in_range;
                      });
  }
  end_rows(p, ts, e, h, rows, dim_vp, pos);
}

// K of up to BK keys of one kv head, transposed: dst[dd * dst_ld + j] = K[pos[j]][dd] (RoPE applied). f32 storage
// without RoPE uses vector gathers (one per dim and L keys) instead of a load and L scalar stores per key: for local
// attention, where each key meets few queries, packing is a visible share of the work.
HWY_INLINE void transpose_k(const attn_params& p, const packed_kv& kv, std::int64_t tensor_batch, std::int64_t kvh,
                            const std::int64_t* pos, std::int64_t n, float* HWY_RESTRICT dst, std::int64_t dst_ld, float* row) {
  const df_t d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const std::int64_t base = tensor_batch * p.k_stride[0] + kvh * p.k_stride[2];
  std::int64_t j = 0;
  if (p.in_type == dtype::f32 && !p.rope && std::abs(p.k_stride[1]) < (std::int64_t{1} << 31) / std::max<std::int64_t>(p.seq_rows_k, 1)) {
    const hn::RebindToSigned<df_t> di;
    const float* kb = static_cast<const float*>(p.k) + base;
    alignas(64) std::int32_t idx[k_bk];
    for (std::int64_t t = 0; t < n; ++t) idx[t] = static_cast<std::int32_t>(pos[t] * p.k_stride[1]);
    for (; j + L <= n; j += L) {
      const auto vi = hn::Load(di, idx + j);
      for (std::int64_t dd = 0; dd < p.dim_qk; ++dd) hn::StoreU(hn::GatherIndex(d, kb + dd * p.k_stride[3], vi), d, dst + dd * dst_ld + j);
    }
  }
  for (; j < n; ++j) {
    load_row_v(p.k, p.in_type, base + pos[j] * p.k_stride[1], p.k_stride[3], p.dim_qk, row);
    if (p.rope) {
      const std::size_t at = static_cast<std::size_t>((tensor_batch * p.seq_rows_k + pos[j]) * (p.rope_dim / 2));
      rope_apply(p, kv.k_cos.data() + at, kv.k_sin.data() + at, row);
    }
    for (std::int64_t dd = 0; dd < p.dim_qk; ++dd) dst[dd * dst_ld + j] = row[dd];
  }
}

template <bool Bf16Dot>
HWY_NOINLINE void pack_kv_tile(const attn_params& p, std::int64_t b, std::int64_t kvh, std::int64_t kt, const packed_kv& kv, float* row) {
  const seq_extent e = sequence(p, b);
  const std::int64_t k0 = kt * k_bk, keys = std::min(k_bk, e.k_len - k0);
  float* ktile = kv.k_tile(b, kvh, kt);
  float* vtile = kv.v_tile(b, kvh, kt);
  std::fill(ktile, ktile + p.dim_qk * k_bk, 0.0f);
  std::fill(vtile, vtile + k_bk * kv.dim_vp, 0.0f);
  const std::int64_t k_base = e.tensor_batch * p.k_stride[0] + (e.k_begin + k0) * p.k_stride[1] + kvh * p.k_stride[2];
  const std::int64_t v_base = e.tensor_batch * p.v_stride[0] + (e.k_begin + k0) * p.v_stride[1] + kvh * p.v_stride[2];
  if constexpr (Bf16Dot) {
    auto* k16 = reinterpret_cast<std::uint32_t*>(ktile);
    auto* v16 = reinterpret_cast<std::uint32_t*>(vtile);
    for (std::int64_t j = 0; j < keys; ++j) {
      const std::int64_t off = k_base + j * p.k_stride[1];
      for (std::int64_t dp = 0; dp < (p.dim_qk + 1) / 2; ++dp)
        k16[dp * k_bk + j] = bf16_pair(p.k, off + 2 * dp * p.k_stride[3], off + (2 * dp + 1) * p.k_stride[3], 2 * dp + 1 < p.dim_qk);
    }
    for (std::int64_t jp = 0; jp < (keys + 1) / 2; ++jp) {
      const std::int64_t off = v_base + 2 * jp * p.v_stride[1];
      for (std::int64_t c = 0; c < p.dim_v; ++c)
        v16[jp * kv.dim_vp + c] = bf16_pair(p.v, off + c * p.v_stride[3], off + p.v_stride[1] + c * p.v_stride[3], 2 * jp + 1 < keys);
    }
    return;
  }
  std::int64_t pos[k_bk];
  for (std::int64_t j = 0; j < keys; ++j) pos[j] = e.k_begin + k0 + j;
  transpose_k(p, kv, e.tensor_batch, kvh, pos, keys, ktile, k_bk, row);
  for (std::int64_t j = 0; j < keys; ++j)
    load_row_v(p.v, p.in_type, v_base + j * p.v_stride[1], p.v_stride[3], p.dim_v, vtile + j * kv.dim_vp);
}

struct work_item {
  std::int64_t b, h, qt, cost;
};

template <bool Bf16Dot>
void flash_fwd(const attn_params& p) {
  const df_t d;
  // The bf16-dot micro-kernels work on whole 16-float vectors whatever Highway's target.
  const auto L = Bf16Dot ? std::int64_t{16} : static_cast<std::int64_t>(hn::Lanes(d));
  // Only the non-empty tiles are listed: a sparse mask costs its tiles, not a scan of all of them.
  const detail::block_plan plan = detail::make_block_plan(build_block_mask(p, k_bq, k_bk), false);
  const int threads = p.threads;

  packed_kv kv;
  kv.dim_qk = p.dim_qk;
  kv.dim_vp = (p.dim_v + L - 1) / L * L;
  // K and V broadcast over the batch (stride 0, as for a shared prompt or cross-attention memory) are the same
  // tiles for every batch entry: packed once, every sequence's slot offset 0. RoPE by per-row position ids can
  // still differ per batch entry, so those calls pack per entry.
  const bool shared_kv = !p.cu_seqlens_q && p.batch > 1 && p.k_stride[0] == 0 && p.v_stride[0] == 0 &&
                         !(p.rope && p.rope->pos_k);
  for (std::int64_t b = 0; b < p.batch; ++b) {
    kv.tile_offset.push_back(shared_kv ? 0 : kv.tiles_total);
    if (!shared_kv || b == 0) kv.tiles_total += (sequence(p, b).k_len + k_bk - 1) / k_bk;
  }
  kv.score = plan_score(p);
  if (p.rope) {
    rope_tables(p, true, kv.q_cos, kv.q_sin);
    rope_tables(p, false, kv.k_cos, kv.k_sin);
  }
  const std::int64_t head_bytes = std::max<std::int64_t>(kv.tiles_total, 1) * k_bk * (p.dim_qk + kv.dim_vp) * 4;
  const std::int64_t heads_per_chunk = std::clamp<std::int64_t>(k_pack_budget_bytes / head_bytes, 1, p.heads_kv);
  const pack_lease kt_buffer(0, static_cast<std::size_t>(std::max<std::int64_t>(heads_per_chunk * kv.tiles_total * p.dim_qk * k_bk, 1)));
  const pack_lease v_buffer(1, static_cast<std::size_t>(std::max<std::int64_t>(heads_per_chunk * kv.tiles_total * k_bk * kv.dim_vp, 1)));
  kv.kt = kt_buffer.get();
  kv.v = v_buffer.get();
  std::vector<thread_scratch> scratch(static_cast<std::size_t>(threads));
  for (thread_scratch& ts : scratch) ts.allocate(p.dim_qk, kv.dim_vp, Bf16Dot);
  std::vector<std::vector<float>> rows(static_cast<std::size_t>(threads),
                                       std::vector<float>(static_cast<std::size_t>(std::max(p.dim_qk, p.dim_v))));

  detail::parallel_errors errors;
  for (std::int64_t kvh0 = 0; kvh0 < p.heads_kv && !errors.failed(); kvh0 += heads_per_chunk) {
    const std::int64_t kvh1 = std::min(p.heads_kv, kvh0 + heads_per_chunk);
    kv.kvh_begin = kvh0;
    // Work items of this chunk, heaviest first (causal: later q tiles see more keys) so no thread idles at the end.
    std::vector<work_item> items;
    for (std::int64_t b = 0; b < p.batch; ++b) {
      const seq_extent e = sequence(p, b);
      const std::int64_t q_tiles = (e.q_len + k_bq - 1) / k_bq;
      for (std::int64_t h = kvh0 * p.group; h < kvh1 * p.group; ++h)
        for (std::int64_t qt = 0; qt < q_tiles; ++qt) {
          const std::int64_t cost = 1 + static_cast<std::int64_t>(plan.row(b, h, qt).size());
          items.push_back({b, h, qt, cost});
        }
    }
    sort_by_cost(items);
    const std::int64_t pack_items = (kvh1 - kvh0) * kv.tiles_total;
    run_phases(threads, errors,
               make_phase(pack_items, sched::even, [&](std::int64_t it, int tid) {
                 const std::int64_t kvh = kvh0 + it / kv.tiles_total, flat = it % kv.tiles_total;
                 const auto next = std::upper_bound(kv.tile_offset.begin(), kv.tile_offset.end(), flat);
                 const auto b = static_cast<std::int64_t>(next - kv.tile_offset.begin()) - 1;
                 pack_kv_tile<Bf16Dot>(p, b, kvh, flat - kv.tile_offset[static_cast<std::size_t>(b)], kv,
                                       rows[static_cast<std::size_t>(tid)].data());
               }),
               make_phase(static_cast<std::int64_t>(items.size()), sched::by_cost, [&](std::int64_t it, int tid) {
                 const work_item& w = items[static_cast<std::size_t>(it)];
                 run_q_tile<Bf16Dot>(p, plan, kv, scratch[static_cast<std::size_t>(tid)], w.b, w.h, w.qt, sequence(p, w.b), kv.dim_vp);
               }));
  }
  errors.rethrow();
  if (p.stats) {
    *p.stats = {};
    for (const thread_scratch& ts : scratch) {
      p.stats->tiles_skipped += ts.tiles[static_cast<int>(tile_kind::empty)];
      p.stats->tiles_partial += ts.tiles[static_cast<int>(tile_kind::partial)];
      p.stats->tiles_full += ts.tiles[static_cast<int>(tile_kind::full)];
    }
  }
}

// Where the grid path packs K/V: per (sequence, kv head) pair of a chunk, head_floats floats at packed + c *
// head_floats: K transposed ([dim][k_ld]) then V ([n_pad][dim_vp]).
struct grid_layout {
  float* packed;
  std::int64_t head_floats, k_ld, n, n_pad, dim_vp;
};

// Packs keys j0 .. j0 + BK of pair pair0 + c in the plan's packed order (K transposed, V row-major), zero-padded.
// Kept out of line (as run_grid_tile): the OpenMP region calls them, and its outlined function carries no target
// attribute, so Highway code inlined into it would not compile for the vector ISA (clang rejects it).
HWY_NOINLINE void pack_grid_block(const attn_params& p, const detail::grid_plan& plan, const packed_kv& kv,
                                  const grid_layout& lay, std::int64_t pair0, std::int64_t c, std::int64_t j0, float* row) {
  const std::int64_t dim = p.dim_qk, k_ld = lay.k_ld, n = lay.n, n_pad = lay.n_pad, dim_vp = lay.dim_vp;
  const std::int64_t kvh = (pair0 + c) % p.heads_kv;
  const seq_extent e = sequence(p, (pair0 + c) / p.heads_kv);
  float* kp = lay.packed + c * lay.head_floats;
  float* vp = kp + dim * k_ld;
  const std::int64_t j1 = std::min(n, j0 + k_bk);
  std::int64_t pos[k_bk];
  for (std::int64_t j = j0; j < j1; ++j) pos[j - j0] = e.k_begin + plan.packed_token[static_cast<std::size_t>(j)];
  if (j1 > j0) transpose_k(p, kv, e.tensor_batch, kvh, pos, j1 - j0, kp + j0, k_ld, row);
  for (std::int64_t j = j0; j < j1; ++j)
    load_row_v(p.v, p.in_type, e.tensor_batch * p.v_stride[0] + pos[j - j0] * p.v_stride[1] + kvh * p.v_stride[2],
               p.v_stride[3], p.dim_v, vp + j * dim_vp);
  // Padding past the sequence (read by segments that reach past the last key) and past dim_v: zeros.
  for (std::int64_t j = std::max(j0, n); j < std::min(n_pad, j0 + k_bk); ++j)
    for (std::int64_t dd = 0; dd < dim; ++dd) kp[dd * k_ld + j] = 0.0f;
  for (std::int64_t j = j0; j < std::min(n_pad, j0 + k_bk); ++j)
    std::fill(vp + j * dim_vp + (j < n ? p.dim_v : 0), vp + (j + 1) * dim_vp, 0.0f);
}

// One query box of the plan for every q head of pair pair0 + c's GQA group.
HWY_NOINLINE void run_grid_tile(const attn_params& p, const detail::grid_plan& plan, const packed_kv& kv, thread_scratch& ts,
                                const grid_layout& lay, std::int64_t pair0, std::int64_t c, std::int64_t tile) {
  const std::int64_t dim = p.dim_qk, k_ld = lay.k_ld, dim_vp = lay.dim_vp;
  const std::int64_t b = (pair0 + c) / p.heads_kv, kvh = (pair0 + c) % p.heads_kv;
  const seq_extent e = sequence(p, b);
  const detail::grid_tile& t = plan.tiles[static_cast<std::size_t>(tile)];
  const float* kp = lay.packed + c * lay.head_floats;
  const float* vp = kp + dim * k_ld;
  const std::int64_t slots = t.seg_count * detail::k_segment, tiles_k = (slots + k_bk - 1) / k_bk;
  const std::int64_t words = detail::grid_plan::words(t);
  const auto pos = [&](std::int64_t i) { return plan.q_tokens[static_cast<std::size_t>(t.q_begin + i)]; };
  for (std::int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h) {
    begin_rows<false>(p, kv, ts, e, h, t.q_count, dim_vp, pos);
    for (std::int64_t kt = 0; kt < tiles_k; ++kt) {
      const std::int64_t keys = std::min(k_bk, slots - kt * k_bk);
      key_segments<float> ks{{}, {}, k_ld, dim_vp};
      for (std::int64_t sg = 0; sg < 4; ++sg) {
        // Slots past the box's segments point at segment 0: finite values, masked by the bits.
        const std::int64_t at = kt * 4 + sg < t.seg_count ? kt * 4 + sg : 0;
        const std::int64_t start = plan.segments[static_cast<std::size_t>(t.seg_begin + at)];
        ks.kseg[sg] = kp + start;
        ks.vseg[sg] = vp + start * dim_vp;
      }
      const std::uint64_t in_range = keys == k_bk ? ~std::uint64_t{0} : (std::uint64_t{1} << keys) - 1;
      ts.pairs[static_cast<int>(t.full ? tile_kind::full : tile_kind::partial)] += t.q_count * k_bk;
      key_tile<false>(p, ts, t.q_count, keys, ks, dim_vp, [](float*) {}, [&](std::int64_t i) {
        return t.full ? in_range : plan.bits[static_cast<std::size_t>(t.bits_begin + i * words + kt)];
      });
    }
    end_rows(p, ts, e, h, t.q_count, dim_vp, pos);
  }
}

// Grid-local masks (neighborhood, halo) on query boxes (core/grid_tiles.h): each work item is one box of the grid
// plan for one kv head. K (transposed, [dim][packed key]) and V ([packed key][dim_vp]) of a sequence and kv head are
// packed once in the plan's packed order, where every line of a key box is consecutive; the micro-kernels then read
// a box's 16-key segments in place, with no gather, and every q head of the GQA group reuses them. The allowed-key
// words come from the plan, so no mask is evaluated here. Rows of a box are not contiguous positions, so score
// modifiers stay on the raster path.
void flash_fwd_grid(const attn_params& p) {
  const df_t d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const detail::grid_local g = *detail::as_grid_local(*p.mask);
  const std::shared_ptr<const detail::grid_plan> plan_ptr =
      detail::cached_grid_plan(g, k_bq, k_plan_row_block, g.extra_keys ? p.seq_k - g.tokens() : 0);
  const detail::grid_plan& plan = *plan_ptr;
  const int threads = p.threads;
  const std::int64_t dim = p.dim_qk;
  packed_kv kv;
  kv.dim_qk = dim;
  kv.dim_vp = (p.dim_v + L - 1) / L * L;
  const std::int64_t dim_vp = kv.dim_vp;
  if (p.rope) {
    rope_tables(p, true, kv.q_cos, kv.q_sin);
    rope_tables(p, false, kv.k_cos, kv.k_sin);
  }
  // A segment reads 16 packed keys from its start, up to 15 past the last token: zero padding keeps them finite
  // (they are masked, and meet P = 0 in the PV product).
  const std::int64_t n = p.seq_k, n_pad = n + detail::k_segment, k_ld = (n_pad + L - 1) / L * L;
  const std::int64_t head_floats = dim * k_ld + n_pad * dim_vp;
  // Packed (sequence, kv head) pairs, as many per chunk as the budget holds: one chunk (two barriers) for a batch of
  // small grids (window attention over many images) as well as for one large grid's heads.
  const std::int64_t pairs = p.batch * p.heads_kv;
  const std::int64_t pairs_per_chunk = std::clamp<std::int64_t>(k_pack_budget_bytes / (4 * head_floats), 1, pairs);
  const pack_lease packed_buffer(0, static_cast<std::size_t>(pairs_per_chunk * head_floats));
  float* const packed = packed_buffer.get();
  std::vector<thread_scratch> scratch(static_cast<std::size_t>(threads));
  std::vector<std::vector<float>> rows(static_cast<std::size_t>(threads), std::vector<float>(static_cast<std::size_t>(dim)));
  for (thread_scratch& ts : scratch) ts.allocate(dim, dim_vp, false);
  const auto n_tiles = static_cast<std::int64_t>(plan.tiles.size());
  const std::int64_t pack_blocks = (n_pad + k_bk - 1) / k_bk;

  const grid_layout lay{packed, head_floats, k_ld, n, n_pad, dim_vp};
  detail::parallel_errors errors;
  for (std::int64_t pair0 = 0; pair0 < pairs && !errors.failed(); pair0 += pairs_per_chunk) {
    const std::int64_t chunk = std::min(pairs_per_chunk, pairs - pair0);
    run_phases(threads, errors,
               make_phase(chunk * pack_blocks, sched::even, [&](std::int64_t it, int tid) {
                 pack_grid_block(p, plan, kv, lay, pair0, it / pack_blocks, it % pack_blocks * k_bk,
                                 rows[static_cast<std::size_t>(tid)].data());
               }),
               make_phase(chunk * n_tiles, sched::by_cost, [&](std::int64_t it, int tid) {
                 run_grid_tile(p, plan, kv, scratch[static_cast<std::size_t>(tid)], lay, pair0, it / n_tiles, it % n_tiles);
               }));
  }
  errors.rethrow();
  if (p.stats) {
    // In units of BQ x BK tiles, so the share skipped compares with the raster path: the dense problem's tiles minus
    // the pairs computed (boxes have fewer rows than a tile).
    std::int64_t full = 0, partial = 0;
    for (const thread_scratch& ts : scratch) {
      full += ts.pairs[static_cast<int>(tile_kind::full)];
      partial += ts.pairs[static_cast<int>(tile_kind::partial)];
    }
    const std::int64_t dense = p.batch * p.heads_q * ((p.seq_q + k_bq - 1) / k_bq) * ((p.seq_k + k_bk - 1) / k_bk);
    *p.stats = {};
    p.stats->tiles_full = (full + k_bq * k_bk - 1) / (k_bq * k_bk);
    p.stats->tiles_partial = (partial + k_bq * k_bk - 1) / (k_bq * k_bk);
    p.stats->tiles_skipped = std::max<std::int64_t>(dense - p.stats->tiles_full - p.stats->tiles_partial, 0);
  }
}

void flash_fwd_f32(const attn_params& p) { flash_fwd<false>(p); }
const char* target_name() { return hwy::TargetName(HWY_TARGET); }
void flash_fwd_bf16_dot(const attn_params& p) { flash_fwd<true>(p); }

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::cpu {

HWY_EXPORT(flash_fwd_f32);
HWY_EXPORT(flash_fwd_bf16_dot);
HWY_EXPORT(flash_fwd_grid);
HWY_EXPORT(target_name);

void run_flash_fwd(const attn_params& p) { HWY_DYNAMIC_DISPATCH(flash_fwd_f32)(p); }
void run_flash_fwd_bf16_dot(const attn_params& p) { HWY_DYNAMIC_DISPATCH(flash_fwd_bf16_dot)(p); }
void run_flash_fwd_grid(const attn_params& p) { HWY_DYNAMIC_DISPATCH(flash_fwd_grid)(p); }

// The Highway target dynamic dispatch runs on this CPU (or the one a test pinned): asked through the dispatch table
// itself, which costs an atomic load, where hwy::SupportedTargets() runs cpuid on every call.
std::string dispatch_isa() { return std::string("ISA ") + HWY_DYNAMIC_DISPATCH(target_name)(); }

}  // namespace omniattn::cpu
#endif
