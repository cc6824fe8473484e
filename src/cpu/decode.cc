// Attention of new queries against a paged KV cache on the CPU tile engine: decoding (Lq = 1), chunked prefill and
// block decoding (Lq up to a few hundred), cascade over shared prefixes. Contract: include/omniattn/kv_cache.h.
//
// Math: per item (decode_plan.h: one kv head, a chunk of a key range's pages, up to BQ rows of the GQA group's q
// heads), the forward's online-softmax step (online_softmax-inl.h) over key tiles of up to 64 cached slots:
//   S = Q K^T, masked (allowed bits from the slots' token indices), scores, m / l / O updated; the item ends with a
//   partial row (O / l, lse = m + log l) per row. Then each call row merges its partials in plan order with the sink
//   logit (core/merge_states.h): out = sum_i w_i O_i, lse = log sum_i exp(lse_i) (+ exp(sink)).
// Pages whose size is a multiple of 16 are read in place: K^T segments of 16 slots and V rows straight from the
// cache's storage (f32, or bf16 / f16 widened in registers, so a 16-bit cache is read at half the bytes). Other
// page sizes gather each 64-slot tile into an f32 tile first. Slots without a token (evicted, unwritten) are masked
// by their index (-1); tiles where no row allows any slot are skipped before any product.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <string>
#include <vector>

#include "core/merge_states.h"
#include "core/parallel.h"
#include "core/storage.h"
#include "cpu/decode_plan.h"
#include "cpu/kernels.h"
#include "cpu/schedule.h"
#include "cpu/tiles.h"
#include "omniattn/kv_cache.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/decode.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "cpu/math-inl.h"
#include "cpu/score_tile-inl.h"
#include "cpu/online_softmax-inl.h"
#include "cpu/tile_ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// What every item of a call shares.
struct decode_call {
  const attn_decode_params* dp;
  attn_params sp;  // the forward params the masks and scores see: seq_q = seq_k = the call's longest sequence
  const decode_plan* plan;
  score_plan score;
  float* part_o;    // [parts][dim_vp]
  float* part_lse;  // [parts], natural log
  const float* row_lse;  // [call rows], the merged LSE (key-mass pass)
  float* mass;      // [batch][heads_kv][key_mass_slots] (key-mass pass)
};

struct decode_scratch {
  thread_scratch ts;
  hwy::AlignedFreeUniquePtr<float[]> kt, v;  // an f32 tile: gathered (page sizes not a multiple of 16) or widened
  std::vector<float> row;
  std::uint64_t bits[k_bq];
  std::int64_t tiles[3] = {};
};

// The slots of one key tile: token indices (-1: no token), whether they are consecutive tokens, and where their K / V
// live (in place: 16-slot segments of pages; gathered: the thread's f32 tile).
template <class T>
struct slot_tile {
  key_segments<T> ks;
  std::int32_t idx[k_bk];
  std::int64_t keys = 0;
  std::int64_t page_of[k_bk];  // each slot's page (position in the page table) and slot in it
  std::int32_t slot_of[k_bk];
  bool contiguous = false;
};

template <class T>
HWY_INLINE const T* page_ptr(const kv_cache_view& c, std::int32_t id) {
  return static_cast<const T*>(c.page_data[id]);
}

// Fills the allowed-key words of the item's rows for one tile; false when no row allows any slot (the tile is skipped).
template <class T>
HWY_INLINE bool tile_bits(const decode_call& call, const decode_item& it, const slot_tile<T>& st, std::uint64_t* bits) {
  const attn_params& sp = call.sp;
  const kv_cache_view& c = call.dp->cache;
  std::uint64_t valid = 0;
  for (std::int64_t j = 0; j < st.keys; ++j) valid |= static_cast<std::uint64_t>(st.idx[j] >= 0) << j;
  std::uint64_t any = 0;
  for (std::int64_t r = it.row0; r < it.row1; ++r) {
    const decode_row& dr = call.plan->rows[static_cast<std::size_t>(r)];
    const std::int64_t L = c.length[call.dp->seqs[dr.b]];
    std::uint64_t w = 0;
    if (st.contiguous) {
      w = row_allowed_bits(sp, dr.b, dr.h, dr.t, st.idx[0], st.keys, L, L);
    } else {
      for (std::int64_t j = 0; j < st.keys; ++j)
        if (st.idx[j] >= 0 && element_allowed(sp, dr.b, dr.h, dr.t, st.idx[j], L, L)) w |= std::uint64_t{1} << j;
    }
    w &= valid;
    bits[r - it.row0] = w;
    any |= w;
  }
  return any != 0;
}

// Score modifiers on a tile: rows of one (batch entry, head) are consecutive queries, so runs of them go through
// score_tile at their token positions when the slots are consecutive tokens; otherwise per element.
template <class T>
HWY_INLINE void tile_scores(const decode_call& call, const decode_item& it, const slot_tile<T>& st, float* s) {
  const attn_params& sp = call.sp;
  const auto& rows = call.plan->rows;
  for (std::int64_t r0 = it.row0; r0 < it.row1;) {
    const decode_row& a = rows[static_cast<std::size_t>(r0)];
    std::int64_t r1 = r0 + 1;
    while (r1 < it.row1 && rows[static_cast<std::size_t>(r1)].b == a.b && rows[static_cast<std::size_t>(r1)].h == a.h) ++r1;
    float* srow = s + (r0 - it.row0) * k_bk;
    if (st.contiguous) {
      score_tile(sp, call.score, srow, k_bk, r1 - r0, k_bk, st.keys, a.b, a.h, a.t, st.idx[0]);
    } else {
      constexpr double log2e = 1.4426950408889634;
      for (std::int64_t r = r0; r < r1; ++r)
        for (std::int64_t j = 0; j < st.keys; ++j) {
          if (st.idx[j] < 0) continue;
          float& x = srow[(r - r0) * k_bk + j];
          const double raw = sp.scale * static_cast<double>(x);
          const std::int64_t t = a.t + (r - r0), key = st.idx[j];
          x = static_cast<float>(
              detail::call_user("spec.score functor", "score_fn", [&] { return (*sp.score)(raw, a.b, a.h, t, key); }) * log2e);
        }
    }
    r0 = r1;
  }
}

// A 16-bit in-place tile widened to f32 into the thread's tile (K^T [dim][64], V [64][dim_vp]), segment by segment.
template <class T>
HWY_INLINE slot_tile<float> widened(const kv_cache_view& c, const slot_tile<T>& st, std::int64_t nseg, decode_scratch& ds) {
  const df_t d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  slot_tile<float> wt;
  wt.keys = st.keys;
  wt.contiguous = st.contiguous;
  std::copy(st.idx, st.idx + st.keys, wt.idx);
  std::copy(st.page_of, st.page_of + st.keys, wt.page_of);
  std::copy(st.slot_of, st.slot_of + st.keys, wt.slot_of);
  float* kt = ds.kt.get();
  float* vt = ds.v.get();
  for (std::int64_t g = 0; g < nseg; ++g) {
    for (std::int64_t dd = 0; dd < c.dim_qk; ++dd)
      for (std::int64_t x = 0; x < 16; x += L) hn::Store(load_lanes(d, st.ks.kseg[g] + dd * st.ks.k_ld + x), d, kt + dd * k_bk + g * 16 + x);
    for (std::int64_t j = 0; j < 16; ++j)
      for (std::int64_t x = 0; x < c.dim_vp; x += L)
        hn::Store(load_lanes(d, st.ks.vseg[g] + j * c.dim_vp + x), d, vt + (g * 16 + j) * c.dim_vp + x);
  }
  for (std::int64_t g = 0; g < 4; ++g) {
    const std::int64_t src = g < nseg ? g : 0;  // segments past the tile's keys: finite values, masked by the bits
    wt.ks.kseg[g] = kt + 16 * src;
    wt.ks.vseg[g] = vt + 16 * src * c.dim_vp;
  }
  wt.ks.k_ld = k_bk;
  wt.ks.v_ld = c.dim_vp;
  return wt;
}

// Walks the item's slots as key tiles of up to 64: fn(tile) for each.
template <class T, class Fn>
HWY_INLINE void for_each_tile(const decode_call& call, const decode_item& it, decode_scratch& ds, Fn&& fn) {
  const kv_cache_view& c = call.dp->cache;
  const std::int32_t* pages = c.pages[it.table];
  const std::int64_t P = c.page_size;
  slot_tile<T> st;
  st.ks.v_ld = c.dim_vp;
  if (P % 16 == 0) {
    st.ks.k_ld = P;
    const std::int64_t segs_per_page = P / 16;
    const std::int64_t total = (it.page1 - it.page0) * segs_per_page;
    const auto elem = static_cast<std::int64_t>(sizeof(T));
    // Software prefetch, one tile ahead, of each page's slot indices (read first, at the end of the page) and of one
    // line per 4 KiB of its K / V: pages are separate allocations, and a miss on the indices would stall the tile
    // before its K / V loads start; the line per 4 KiB wakes the hardware streamer on each page of memory.
    const auto prefetch_segment = [&](std::int64_t sg) {
      const std::int64_t at = it.page0 + sg / segs_per_page, first = sg % segs_per_page * 16;
      const auto* base = reinterpret_cast<const unsigned char*>(page_ptr<T>(c, pages[at]));
      hwy::Prefetch(c.page_index[pages[at]] + first);
      for (std::int64_t b = first * elem; b < c.dim_qk * P * elem; b += 4096) hwy::Prefetch(base + b);
      const unsigned char* vb = base + (c.v_offset + first * c.dim_vp) * elem;
      for (std::int64_t b = 0; b < 16 * c.dim_vp * elem; b += 4096) hwy::Prefetch(vb + b);
    };
    for (std::int64_t s0 = 0; s0 < total; s0 += 4) {
      for (std::int64_t sg = s0 + 4; sg < std::min(total, s0 + 8); ++sg) prefetch_segment(sg);
      const std::int64_t nseg = std::min<std::int64_t>(4, total - s0);
      for (std::int64_t g = 0; g < 4; ++g) {
        const std::int64_t sg = s0 + (g < nseg ? g : 0);
        const std::int64_t at = it.page0 + sg / segs_per_page, first = sg % segs_per_page * 16;
        const T* base = page_ptr<T>(c, pages[at]);
        st.ks.kseg[g] = base + first;
        st.ks.vseg[g] = base + c.v_offset + first * c.dim_vp;
        if (g >= nseg) continue;
        std::memcpy(st.idx + g * 16, c.page_index[pages[at]] + first, 16 * sizeof(std::int32_t));
        for (std::int64_t x = 0; x < 16; ++x) {
          st.page_of[g * 16 + x] = at;
          st.slot_of[g * 16 + x] = static_cast<std::int32_t>(first + x);
        }
      }
      st.keys = nseg * 16;
      st.contiguous = true;
      for (std::int64_t j = 0; j < st.keys; ++j) st.contiguous &= st.idx[j] >= 0 && st.idx[j] == st.idx[0] + j;
      if constexpr (!std::is_same_v<T, float>) {
        // Many register blocks of rows (chunked prefill): the micro-kernels would widen each 16-bit K / V vector once
        // per row block; widen the tile once into the thread's f32 tile instead. Below four blocks the in-place reads
        // win: the 64 KiB f32 tile does not stay in L1 (measured: 16 rows 20% slower widened, 256 rows 10% faster).
        if (it.row1 - it.row0 > 4 * static_cast<std::int64_t>(k_mr)) {
          fn(widened(c, st, nseg, ds));
          continue;
        }
      }
      fn(st);
    }
    return;
  }
  // Gathered tiles: 64 consecutive slots of the item's pages, widened to f32.
  const std::int64_t total = (it.page1 - it.page0) * P;
  for (std::int64_t s0 = 0; s0 < total; s0 += k_bk) {
    slot_tile<float> gt;
    gt.keys = std::min(k_bk, total - s0);
    gt.ks.k_ld = k_bk;
    gt.ks.v_ld = c.dim_vp;
    float* kt = ds.kt.get();
    float* vt = ds.v.get();
    std::fill(kt, kt + c.dim_qk * k_bk, 0.0f);
    std::fill(vt, vt + k_bk * c.dim_vp, 0.0f);
    for (std::int64_t j = 0; j < gt.keys; ++j) {
      const std::int64_t at = it.page0 + (s0 + j) / P, slot = (s0 + j) % P;
      const std::int32_t id = pages[at];
      gt.idx[j] = c.page_index[id][slot];
      gt.page_of[j] = at;
      gt.slot_of[j] = static_cast<std::int32_t>(slot);
      const void* base = c.page_data[id];
      for (std::int64_t d = 0; d < c.dim_qk; ++d)
        kt[d * k_bk + j] = static_cast<float>(detail::load_element(base, c.storage, d * P + slot));
      for (std::int64_t d = 0; d < c.dim_v; ++d)
        vt[j * c.dim_vp + d] = static_cast<float>(detail::load_element(base, c.storage, c.v_offset + slot * c.dim_vp + d));
    }
    for (std::int64_t g = 0; g < 4; ++g) {
      gt.ks.kseg[g] = kt + 16 * g;
      gt.ks.vseg[g] = vt + 16 * g * c.dim_vp;
    }
    gt.contiguous = true;
    for (std::int64_t j = 0; j < gt.keys; ++j) gt.contiguous &= gt.idx[j] >= 0 && gt.idx[j] == gt.idx[0] + j;
    fn(gt);
  }
}

// Loads the item's query rows (RoPE at their token positions) into the thread's Q tile.
HWY_INLINE void load_rows(const decode_call& call, const decode_item& it, decode_scratch& ds) {
  const attn_params& p = call.dp->fwd;
  const kv_cache_view& c = call.dp->cache;
  float* qp = ds.ts.q.get();
  for (std::int64_t r = it.row0; r < it.row1; ++r) {
    const decode_row& dr = call.plan->rows[static_cast<std::size_t>(r)];
    float* dst = qp + (r - it.row0) * p.dim_qk;
    load_row_v(p.q, p.in_type, dr.tb * p.q_stride[0] + dr.row * p.q_stride[1] + dr.h * p.q_stride[2], p.q_stride[3], p.dim_qk, dst);
    if (p.rope) {
      const std::int64_t L = c.length[call.dp->seqs[dr.b]];
      rope_rotate(p, true, dr.tb, dr.row, dr.t, L, L, dst);
    }
  }
}

template <class T>
HWY_NOINLINE void run_item(const decode_call& call, const decode_item& it, decode_scratch& ds) {
  const df_t d;
  const std::size_t lanes = hn::Lanes(d);
  const attn_params& p = call.sp;
  const std::int64_t rows = it.row1 - it.row0, dim_vp = call.dp->cache.dim_vp;
  thread_scratch& ts = ds.ts;
  load_rows(call, it, ds);
  std::fill(ts.o.get(), ts.o.get() + rows * dim_vp, 0.0f);
  std::fill(ts.m, ts.m + k_bq, -std::numeric_limits<float>::infinity());
  std::fill(ts.l.get(), ts.l.get() + k_bq * lanes, 0.0f);
  for_each_tile<T>(call, it, ds, [&](const auto& st) {
    if (!tile_bits(call, it, st, ds.bits)) {
      ++ds.tiles[static_cast<int>(tile_kind::empty)];
      return;
    }
    ++ds.tiles[static_cast<int>(st.contiguous ? tile_kind::full : tile_kind::partial)];
    key_tile<false>(p, ts, rows, st.keys, st.ks, dim_vp, [&](float* s) { tile_scores(call, it, st, s); },
                    [&](std::int64_t i) { return ds.bits[i]; });
  });
  for (std::int64_t r = 0; r < rows; ++r) {
    const float l = hn::GetLane(hn::SumOfLanes(d, hn::Load(d, ts.l.get() + static_cast<std::size_t>(r) * lanes)));
    float* dst = call.part_o + (it.part0 + r) * dim_vp;
    const float* src = ts.o.get() + r * dim_vp;
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
    for (std::int64_t c = 0; c < dim_vp; ++c) dst[c] = src[c] * inv;
    call.part_lse[it.part0 + r] =
        l == 0.0f ? -std::numeric_limits<float>::infinity() : (ts.m[r] + std::log2(l)) * 0.6931471805599453f;
  }
}

// The key-mass pass: the probabilities of the item's tiles again, from the merged LSE, summed over its rows into
// each row's sequence's slot ordinals.
template <class T>
HWY_NOINLINE void mass_item(const decode_call& call, const decode_item& it, decode_scratch& ds) {
  const df_t d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const attn_params& p = call.sp;
  const attn_decode_params& dp = *call.dp;
  const std::int64_t rows = it.row1 - it.row0, dim = p.dim_qk;
  thread_scratch& ts = ds.ts;
  load_rows(call, it, ds);
  float* qp = ts.q.get();
  float* s = ts.s.get();
  const kv_cache_view& c = dp.cache;
  // Every row of an item that shares pages (cascade) sees them at the same table positions, so the first row's
  // sequence gives the ordinals of all.
  const std::vector<std::int64_t>& live0 =
      call.plan->live_before[static_cast<std::size_t>(call.plan->rows[static_cast<std::size_t>(it.row0)].b * p.heads_kv + it.kvh)];
  for_each_tile<T>(call, it, ds, [&](const auto& st) {
    if (!tile_bits(call, it, st, ds.bits)) return;
    using E = std::remove_cv_t<std::remove_pointer_t<std::remove_cvref_t<decltype(st.ks.kseg[0])>>>;
    const E* kb[k_bk];
    for (std::int64_t v = 0; v < k_bk / L; ++v) kb[v] = st.ks.kseg[v * L / 16] + v * L % 16;
    for (std::int64_t r0 = 0; r0 < rows; r0 += static_cast<std::int64_t>(k_mr))
      with_rows(std::min<std::int64_t>(k_mr, rows - r0), [&](auto mr) {
        for (std::int64_t c0 = 0; c0 < k_bk; c0 += static_cast<std::int64_t>(k_nv) * L)
          qk_block<mr()>(d, qp + r0 * dim, dim, dim, kb + c0 / L, st.ks.k_ld, s + r0 * k_bk + c0, k_bk);
      });
    if (p.score) tile_scores(call, it, st, s);
    const float c2 = p.score ? 1.0f : p.scale_log2;
    // Slot ordinals (key_mass indices) of the tile's live slots: slots of one page are consecutive in a tile, so a
    // running rank from the page's first slot in the tile.
    std::int64_t ord[k_bk];
    std::int64_t cur = -1, rank = 0;
    for (std::int64_t j = 0; j < st.keys; ++j) {
      if (st.page_of[j] != cur) {
        cur = st.page_of[j];
        const std::int32_t* idx = c.page_index[c.pages[it.table][cur]];
        rank = 0;
        for (std::int32_t x = 0; x < st.slot_of[j]; ++x) rank += idx[x] >= 0;
      }
      ord[j] = st.idx[j] >= 0 ? live0[static_cast<std::size_t>(cur)] + rank++ : -1;
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      const decode_row& dr = call.plan->rows[static_cast<std::size_t>(it.row0 + r)];
      const float lse2 = call.row_lse[call_row(dp.fwd, dr)] * 1.4426950408889634f;
      if (!(lse2 > -std::numeric_limits<float>::infinity())) continue;
      float* mrow = call.mass + (dr.b * p.heads_kv + it.kvh) * dp.key_mass_slots;
      for (std::int64_t j = 0; j < st.keys; ++j) {
        if (!((ds.bits[r] >> j) & 1) || ord[j] < 0) continue;
        mrow[ord[j]] += std::exp2(std::min(s[r * k_bk + j] * c2 - lse2, 0.0f));
      }
    }
  });
}

// The merge of one call row's partials (plan order) and the sink logit, stored to out / lse (and kept for the
// key-mass pass).
HWY_NOINLINE void merge_row(const decode_call& call, std::int64_t row, std::vector<const float*>& parts,
                            std::vector<float>& lses, std::vector<float>& acc, float* row_lse) {
  const attn_params& p = call.dp->fwd;
  const decode_plan& plan = *call.plan;
  const std::int64_t dim_vp = call.dp->cache.dim_vp;
  const std::int64_t h = row % p.heads_q, tensor_row = row / p.heads_q;
  const std::int64_t tb = tensor_row / p.seq_rows_q, i = tensor_row % p.seq_rows_q;
  parts.clear();
  lses.clear();
  for (std::int64_t x = plan.part_begin[static_cast<std::size_t>(row)]; x < plan.part_begin[static_cast<std::size_t>(row) + 1]; ++x) {
    const std::int64_t pr = plan.part_rows[static_cast<std::size_t>(x)];
    parts.push_back(call.part_o + pr * dim_vp);
    lses.push_back(call.part_lse[pr]);
  }
  // acc: a part of zeros for the sink (which carries no value), then the merged row.
  acc.assign(static_cast<std::size_t>(2 * dim_vp), 0.0f);
  if (p.sink_logits) {
    parts.push_back(acc.data());
    lses.push_back(p.sink_logits[h]);
  }
  float* out = acc.data() + dim_vp;
  float lse = -std::numeric_limits<float>::infinity();
  if (!parts.empty()) lse = detail::merge_state_row(parts.data(), lses.data(), static_cast<std::int64_t>(parts.size()), p.dim_v, out);
  const std::int64_t off = tb * p.o_stride[0] + i * p.o_stride[1] + h * p.o_stride[2];
  for (std::int64_t dd = 0; dd < p.dim_v; ++dd) detail::store_element(p.out, p.out_type, off + dd * p.o_stride[3], out[dd]);
  if (p.lse) p.lse[tb * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2]] = lse;
  row_lse[row] = lse;
}

HWY_NOINLINE void run_item_any(const decode_call& call, const decode_item& it, decode_scratch& ds, bool mass) {
  switch (call.dp->cache.storage) {
    case dtype::bf16: mass ? mass_item<hwy::bfloat16_t>(call, it, ds) : run_item<hwy::bfloat16_t>(call, it, ds); break;
    case dtype::f16: mass ? mass_item<hwy::float16_t>(call, it, ds) : run_item<hwy::float16_t>(call, it, ds); break;
    default: mass ? mass_item<float>(call, it, ds) : run_item<float>(call, it, ds); break;
  }
}

void decode_kernel(const attn_decode_params& dp) {
  const attn_params& p = dp.fwd;
  const std::int64_t rows_of_call = call_rows(p);
  if (rows_of_call == 0) return;
  const decode_plan plan = make_decode_plan(dp);
  decode_call call;
  call.dp = &dp;
  call.sp = p;
  call.sp.seq_q = call.sp.seq_k = p.seq_k;
  call.plan = &plan;
  call.score = plan_score(call.sp);
  const std::int64_t dim_vp = dp.cache.dim_vp;
  std::vector<float> part_o(static_cast<std::size_t>(std::max<std::int64_t>(plan.parts * dim_vp, 1)));
  std::vector<float> part_lse(static_cast<std::size_t>(std::max<std::int64_t>(plan.parts, 1)));
  std::vector<float> row_lse(static_cast<std::size_t>(rows_of_call));
  std::vector<float> mass(dp.key_mass ? static_cast<std::size_t>(p.batch * p.heads_kv * dp.key_mass_slots) : 0);
  call.part_o = part_o.data();
  call.part_lse = part_lse.data();
  call.row_lse = row_lse.data();
  call.mass = mass.data();
  const int threads = p.threads;
  std::vector<decode_scratch> scratch(static_cast<std::size_t>(threads));
  // The f32 tile: gathered tiles (page sizes not a multiple of 16) and 16-bit tiles widened once for many rows.
  const bool f32_tile = dp.cache.page_size % 16 != 0 || dp.cache.storage != dtype::f32;
  for (decode_scratch& ds : scratch) {
    ds.ts.allocate(p.dim_qk, dim_vp, false);
    if (f32_tile) {
      ds.kt = detail::checked(hwy::AllocateAligned<float>(static_cast<std::size_t>(p.dim_qk * k_bk)));
      ds.v = detail::checked(hwy::AllocateAligned<float>(static_cast<std::size_t>(k_bk * dim_vp)));
    }
  }
  // Heaviest first for the dynamic schedule; the merge reads partials by plan position, so the order runs change
  // nothing.
  std::vector<std::int64_t> order(plan.items.size());
  for (std::size_t x = 0; x < order.size(); ++x) order[x] = static_cast<std::int64_t>(x);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return plan.items[static_cast<std::size_t>(a)].cost > plan.items[static_cast<std::size_t>(b)].cost;
  });
  std::vector<std::vector<const float*>> parts(static_cast<std::size_t>(threads));
  std::vector<std::vector<float>> lses(static_cast<std::size_t>(threads)), acc(static_cast<std::size_t>(threads));
  const auto n_items = static_cast<std::int64_t>(order.size());
  const auto item_phase = [&](bool for_mass) {
    return make_phase(n_items, sched::by_cost, [&, for_mass](std::int64_t x, int tid) {
      run_item_any(call, plan.items[static_cast<std::size_t>(order[static_cast<std::size_t>(x)])],
                   scratch[static_cast<std::size_t>(tid)], for_mass);
    });
  };
  detail::parallel_errors errors;
  const auto merge_phase = make_phase(rows_of_call, sched::even, [&](std::int64_t row, int tid) {
    merge_row(call, row, parts[static_cast<std::size_t>(tid)], lses[static_cast<std::size_t>(tid)], acc[static_cast<std::size_t>(tid)],
              row_lse.data());
  });
  if (dp.key_mass) {
    run_phases(threads, errors, item_phase(false), merge_phase, item_phase(true));
  } else {
    run_phases(threads, errors, item_phase(false), merge_phase);
  }
  errors.rethrow();
  if (dp.key_mass) std::copy(mass.begin(), mass.end(), dp.key_mass);
  if (p.stats) {
    *p.stats = {};
    for (const decode_scratch& ds : scratch) {
      p.stats->tiles_skipped += ds.tiles[static_cast<int>(tile_kind::empty)];
      p.stats->tiles_partial += ds.tiles[static_cast<int>(tile_kind::partial)];
      p.stats->tiles_full += ds.tiles[static_cast<int>(tile_kind::full)];
    }
  }
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::cpu {

HWY_EXPORT(decode_kernel);

void run_decode(const attn_decode_params& p) { HWY_DYNAMIC_DISPATCH(decode_kernel)(p); }

}  // namespace omniattn::cpu
#endif
