// The fused CPU attention backward (FlashAttention-2's algorithm) on the tile engine's micro-kernels.
//
// Math contract: include/omniattn/attention.h (attention_backward); the oracle is src/ref/attention_bwd_ref.cc.
// For each key tile (BK keys of one kv head) and each q tile of the GQA group's heads that meets it (the kv-major
// lists of the block plan):
//   S  = Q K^T                  qk_block, K packed transposed; score modifiers give base-2 logits and, in G, the
//                               derivative d s / d (q.k) of the natural logit (softmax scale included)
//   P  = exp2(S - lse_i log2 e) masked pairs -> 0 (FULL tiles skip the predicate, PARTIAL ones use the row bits)
//   dP = dO V^T                 qk_block, V packed transposed
//   dS = P (dP - D_i) [G]       D_i = rowsum(dO_i * O_i), once per row before the main pass
//   dV += P^T dO, dK += dS^T Q  pv_rows reading P and dS transposed in place
//   dQ += dS K                  pv_rows, K packed row-major; without score modifiers scale multiplies dK, dQ once
// All accumulation is fp32 (f32 / bf16 / f16 inputs are widened while packing); the extra memory is O(N): Q and dO
// packed as f32, D and the LSE per row, and the dQ accumulators.
// Determinism without atomics: a work item owns a contiguous range of key tiles of one (sequence, kv head) and
// accumulates its dK, dV alone, every q head of the group in order; its dQ contributions go to its split's buffer,
// and the splits are summed in split order at the end. How the key tiles are split depends on the problem only,
// never on the thread count, so the results are bitwise identical for any number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>


#include "core/backends.h"
#include "core/block_plan.h"
#include "core/parallel.h"
#include "core/score_kinds.h"
#include "core/storage.h"
#include "cpu/kernels.h"
#include "cpu/schedule.h"
#include "cpu/tiles.h"
#include "omniattn/attention.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/flash_bwd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "cpu/math-inl.h"
#include "cpu/score_tile-inl.h"
#include "cpu/tile_ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace bwd {

// Per-call packed operands, shared read-only by every work item after the prologue (except dq, see bwd_item).
struct layout {
  std::int64_t dim = 0, dim_p = 0, dim_vp = 0;  // head dims; padded to whole vectors
  std::int64_t rows = 0;                        // query rows of the tensors (all tensor batches)
  std::int64_t splits = 1;
  hwy::AlignedFreeUniquePtr<float[]> q;      // [heads_q][rows][dim_p]  rotated Q
  hwy::AlignedFreeUniquePtr<float[]> d_out;  // [heads_q][rows][dim_vp]
  hwy::AlignedFreeUniquePtr<float[]> dq;     // [splits][heads_q][rows][dim_p]
  std::vector<float> delta, lse2;            // [heads_q][rows]: D_i; lse_i * log2 e (+inf for empty rows)
  std::vector<double> sink_part;             // [heads_q][rows]: -exp(sink - lse_i) D_i
  std::vector<float> q_cos, q_sin, k_cos, k_sin;
  score_plan score;
  // The dense bias gradient (gradients.d_bias): the chain's bias step, its shape (d_bias is contiguous in it).
  const detail::bias_score* bias = nullptr;
  std::size_t bias_step = 0;

  std::int64_t row_of(const seq_extent& e, std::int64_t p_seq_rows, std::int64_t i) const {
    return e.tensor_batch * p_seq_rows + e.q_begin + i;
  }
  float* q_row(std::int64_t h, std::int64_t r) const { return q.get() + (h * rows + r) * dim_p; }
  float* do_row(std::int64_t h, std::int64_t r) const { return d_out.get() + (h * rows + r) * dim_vp; }
  float* dq_row(std::int64_t split, std::int64_t h, std::int64_t heads, std::int64_t r) const {
    return dq.get() + ((split * heads + h) * rows + r) * dim_p;
  }
};

// One thread's buffers for one key tile and one q tile.
struct scratch {
  hwy::AlignedFreeUniquePtr<float[]> kt, krow, vt, dk, dv, s, dp, g, gb;
  void allocate(const layout& lay, std::int64_t dim_v) {
    const auto n = [](std::int64_t x) { return static_cast<std::size_t>(x); };
    kt = detail::checked(hwy::AllocateAligned<float>(n(lay.dim * k_bk)));
    krow = detail::checked(hwy::AllocateAligned<float>(n(k_bk * lay.dim_p)));
    vt = detail::checked(hwy::AllocateAligned<float>(n(dim_v * k_bk)));
    dk = detail::checked(hwy::AllocateAligned<float>(n(k_bk * lay.dim_p)));
    dv = detail::checked(hwy::AllocateAligned<float>(n(k_bk * lay.dim_vp)));
    s = detail::checked(hwy::AllocateAligned<float>(n(k_bq * k_bk)));
    dp = detail::checked(hwy::AllocateAligned<float>(n(k_bq * k_bk)));
    g = detail::checked(hwy::AllocateAligned<float>(n(k_bq * k_bk)));
    if (lay.bias) gb = detail::checked(hwy::AllocateAligned<float>(n(k_bq * k_bk)));
  }
};

// Key tiles [kt0, kt1) of one kv head for sequences [b, b1) (one sequence, or every batch entry when a dense bias
// broadcast over the batch needs a single writer per entry), accumulating dQ into split `split`.
struct item {
  std::int64_t b, b1, kvh, kt0, kt1, split, cost;
};

// Prologue for one q tile of one head: packed rotated Q and dO, D_i = <dO_i, O_i>, the LSE in base 2 and the sink term.
// out_row: the thread's dim_v floats for one row of out.
HWY_NOINLINE void prepare_rows(const attn_bwd_params& bp, layout& lay, std::int64_t b, std::int64_t h, std::int64_t qt,
                               float* out_row) {
  const attn_params& p = bp.fwd;
  const seq_extent e = sequence(p, b);
  const std::int64_t q0 = qt * k_bq, rows = std::min(k_bq, e.q_len - q0);
  constexpr float log2e = 1.4426950408889634f;
  for (std::int64_t i = q0; i < q0 + rows; ++i) {
    const std::int64_t r = lay.row_of(e, p.seq_rows_q, i), at = e.q_begin + i;
    float* qr = lay.q_row(h, r);
    load_row_v(p.q, p.in_type, e.tensor_batch * p.q_stride[0] + at * p.q_stride[1] + h * p.q_stride[2], p.q_stride[3], p.dim_qk, qr);
    if (p.rope) {
      const std::size_t t = static_cast<std::size_t>(r * (p.rope_dim / 2));
      rope_apply(p, lay.q_cos.data() + t, lay.q_sin.data() + t, qr);
    }
    std::fill(qr + p.dim_qk, qr + lay.dim_p, 0.0f);
    float* dr = lay.do_row(h, r);
    load_row_v(bp.d_out, bp.d_out_type, e.tensor_batch * bp.do_stride[0] + at * bp.do_stride[1] + h * bp.do_stride[2],
               bp.do_stride[3], p.dim_v, dr);
    std::fill(dr + p.dim_v, dr + lay.dim_vp, 0.0f);
    load_row_v(p.out, p.out_type, e.tensor_batch * p.o_stride[0] + at * p.o_stride[1] + h * p.o_stride[2], p.o_stride[3],
               p.dim_v, out_row);
    double delta = 0.0;  // one row of dim_v products: in double, it is cheap and D is used for every key of the row
    for (std::int64_t c = 0; c < p.dim_v; ++c) delta += static_cast<double>(dr[c]) * out_row[c];
    const float lse = p.lse[e.tensor_batch * p.lse_stride[0] + h * p.lse_stride[1] + at * p.lse_stride[2]];
    const auto at_row = static_cast<std::size_t>(h * lay.rows + r);
    lay.delta[at_row] = static_cast<float>(delta);
    // A row with nothing allowed has lse -inf: +inf makes every P of the row exp2(-inf) = 0.
    lay.lse2[at_row] = lse == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::infinity() : lse * log2e;
    if (p.sink_logits) lay.sink_part[at_row] = -std::exp(static_cast<double>(p.sink_logits[h]) - lse) * delta;
  }
}

// One (q tile, key tile) pair of one head: recompute P, then the four gradient products.
HWY_INLINE void pair_tile(const attn_bwd_params& bp, const layout& lay, scratch& ts, std::int64_t b, std::int64_t h,
                          std::int64_t qt, tile_kind kind, std::int64_t k0, std::int64_t keys, std::int64_t split) {
  const attn_params& p = bp.fwd;
  const df_t d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const seq_extent e = sequence(p, b);
  const std::int64_t q0 = qt * k_bq, rows = std::min(k_bq, e.q_len - q0);
  const std::int64_t r0 = lay.row_of(e, p.seq_rows_q, q0);
  const float* qp = lay.q_row(h, r0);
  const float* dop = lay.do_row(h, r0);
  float* HWY_RESTRICT s = ts.s.get();
  float* HWY_RESTRICT dp = ts.dp.get();
  float* HWY_RESTRICT g = ts.g.get();
  const float* kb[k_bk];
  const float* vb[k_bk];
  for (std::int64_t v = 0; v < k_bk / L; ++v) {
    kb[v] = ts.kt.get() + v * L;
    vb[v] = ts.vt.get() + v * L;
  }
  // S = Q K^T and dP = dO V^T, register block by register block.
  for (std::int64_t i0 = 0; i0 < rows; i0 += static_cast<std::int64_t>(k_mr))
    with_rows(std::min<std::int64_t>(k_mr, rows - i0), [&](auto mr) {
      for (std::int64_t c0 = 0; c0 < k_bk; c0 += static_cast<std::int64_t>(k_nv) * L) {
        qk_block<mr()>(d, qp + i0 * lay.dim_p, lay.dim_p, lay.dim, kb + c0 / L, k_bk, s + i0 * k_bk + c0, k_bk);
        qk_block<mr()>(d, dop + i0 * lay.dim_vp, lay.dim_vp, p.dim_v, vb + c0 / L, k_bk, dp + i0 * k_bk + c0, k_bk);
      }
    });
  const bool scored = p.score != nullptr;
  float* HWY_RESTRICT gb = ts.gb.get();  // with d_bias: d logit / d bias, then dS times it
  // Positions and heads of the whole problem (options::block) for the score modifiers and the mask.
  if (scored) score_tile_grad(p, lay.score, s, g, k_bk, rows, k_bk, keys, b, p.head0 + h, e.q_pos + q0, e.k_pos + k0, gb, lay.bias_step);
  const float c = scored ? 1.0f : p.scale_log2;
  const std::uint64_t in_range = keys == k_bk ? ~std::uint64_t{0} : (std::uint64_t{1} << keys) - 1;
  const hn::RebindToUnsigned<df_t> du;
  const auto lane_bit = hn::Shl(hn::Set(du, 1u), hn::Iota(du, 0));
  const vf_t vc = hn::Set(d, c), vninf = hn::Set(d, -std::numeric_limits<float>::infinity());
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::uint64_t allowed =
        kind == tile_kind::partial ? row_allowed_bits(p, b, p.head0 + h, e.q_pos + q0 + i, e.k_pos + k0, keys, e.q_total, e.k_total)
                                   : in_range;
    const auto at_row = static_cast<std::size_t>(h * lay.rows + r0 + i);
    const vf_t lse2 = hn::Set(d, lay.lse2[at_row]), delta = hn::Set(d, lay.delta[at_row]);
    for (std::int64_t v = 0; v < k_bk / L; ++v) {
      const std::int64_t at = i * k_bk + v * L;
      vf_t x = hn::Mul(hn::Load(d, s + at), vc);
      if (allowed != ~std::uint64_t{0}) {
        const auto bits = hn::Set(du, static_cast<std::uint32_t>((allowed >> (v * L)) & ((std::uint64_t{2} << (L - 1)) - 1)));
        x = hn::IfThenElse(hn::RebindMask(d, hn::TestBit(bits, lane_bit)), x, vninf);
      }
      const vf_t pr = exp2_neg(d, hn::Sub(x, lse2));
      vf_t ds = hn::Mul(pr, hn::Sub(hn::Load(d, dp + at), delta));
      if (gb) hn::Store(hn::Mul(ds, hn::Load(d, gb + at)), d, gb + at);
      if (scored) ds = hn::Mul(ds, hn::Load(d, g + at));
      hn::Store(pr, d, s + at);
      hn::Store(ds, d, dp + at);
    }
  }
  if (gb) {
    // Broadcast dims of the bias collapse to index 0; select() admits only the shapes where this item is the one
    // writer of every entry it touches, so the sums keep a fixed order.
    const auto& sh = lay.bias->shape;
    const auto at = [&](int dim, std::int64_t x) { return sh[static_cast<std::size_t>(dim)] == 1 ? 0 : x; };
    float* base = bp.d_bias + (at(0, b) * sh[1] + at(1, h)) * sh[2] * sh[3];
    for (std::int64_t i = 0; i < rows; ++i) {
      float* drow = base + at(2, q0 + i) * sh[3];
      for (std::int64_t j = 0; j < keys; ++j) drow[at(3, k0 + j)] += gb[i * k_bk + j];
    }
  }
  // dV += P^T dO and dK += dS^T Q: output rows are keys, the sum runs over the tile's query rows.
  const float* do_seg[4] = {dop, dop + 16 * lay.dim_vp, dop + 32 * lay.dim_vp, dop + 48 * lay.dim_vp};
  const float* q_seg[4] = {qp, qp + 16 * lay.dim_p, qp + 32 * lay.dim_p, qp + 48 * lay.dim_p};
  for (std::int64_t j0 = 0; j0 < keys; j0 += static_cast<std::int64_t>(k_mr))
    with_rows(std::min<std::int64_t>(k_mr, keys - j0), [&](auto mr) {
      pv_rows<mr()>(d, s + j0, 1, k_bk, rows, do_seg, lay.dim_vp, lay.dim_vp, nullptr, ts.dv.get() + j0 * lay.dim_vp, lay.dim_vp);
      pv_rows<mr()>(d, dp + j0, 1, k_bk, rows, q_seg, lay.dim_p, lay.dim_p, nullptr, ts.dk.get() + j0 * lay.dim_p, lay.dim_p);
    });
  // dQ += dS K into this item's split.
  const float* k_seg[4] = {ts.krow.get(), ts.krow.get() + 16 * lay.dim_p, ts.krow.get() + 32 * lay.dim_p, ts.krow.get() + 48 * lay.dim_p};
  float* dq = lay.dq_row(split, h, p.heads_q, r0);
  for (std::int64_t i0 = 0; i0 < rows; i0 += static_cast<std::int64_t>(k_mr))
    with_rows(std::min<std::int64_t>(k_mr, rows - i0), [&](auto mr) {
      pv_rows<mr()>(d, dp + i0 * k_bk, k_bk, 1, keys, k_seg, lay.dim_p, lay.dim_p, nullptr, dq + i0 * lay.dim_p, lay.dim_p);
    });
}

// Packs key tile kt of (b, kvh): K rotated, row-major and transposed, V transposed; rows past the sequence are 0.
HWY_INLINE void pack_key_tile(const attn_params& p, const layout& lay, scratch& ts, const seq_extent& e, std::int64_t kvh,
                              std::int64_t k0, std::int64_t keys, float* row) {
  float* kr = ts.krow.get();
  float* kt = ts.kt.get();
  float* vt = ts.vt.get();
  std::fill(kr, kr + k_bk * lay.dim_p, 0.0f);
  std::fill(kt, kt + lay.dim * k_bk, 0.0f);
  std::fill(vt, vt + p.dim_v * k_bk, 0.0f);
  for (std::int64_t j = 0; j < keys; ++j) {
    const std::int64_t at = e.k_begin + k0 + j;
    float* krj = kr + j * lay.dim_p;
    load_row_v(p.k, p.in_type, e.tensor_batch * p.k_stride[0] + at * p.k_stride[1] + kvh * p.k_stride[2], p.k_stride[3], p.dim_qk, krj);
    if (p.rope) {
      const std::size_t t = static_cast<std::size_t>((e.tensor_batch * p.seq_rows_k + at) * (p.rope_dim / 2));
      rope_apply(p, lay.k_cos.data() + t, lay.k_sin.data() + t, krj);
    }
    for (std::int64_t c = 0; c < lay.dim; ++c) kt[c * k_bk + j] = krj[c];
    load_row_v(p.v, p.in_type, e.tensor_batch * p.v_stride[0] + at * p.v_stride[1] + kvh * p.v_stride[2], p.v_stride[3], p.dim_v, row);
    for (std::int64_t c = 0; c < p.dim_v; ++c) vt[c * k_bk + j] = row[c];
  }
}

// One work item: its key tiles, each folded over every q tile of the group's heads that meets it, then stored.
HWY_NOINLINE void run_item(const attn_bwd_params& bp, const layout& lay, const detail::block_plan& plan, scratch& ts,
                           const item& it, float* row) {
  const attn_params& p = bp.fwd;
  const float post = p.score ? 1.0f : static_cast<float>(p.scale);
  for (std::int64_t b = it.b; b < it.b1; ++b) {
    const seq_extent e = sequence(p, b);
    for (std::int64_t kt = it.kt0; kt < it.kt1; ++kt) {
      const std::int64_t k0 = kt * k_bk, keys = std::min(k_bk, e.k_len - k0);
      pack_key_tile(p, lay, ts, e, it.kvh, k0, keys, row);
      std::fill(ts.dk.get(), ts.dk.get() + k_bk * lay.dim_p, 0.0f);
      std::fill(ts.dv.get(), ts.dv.get() + k_bk * lay.dim_vp, 0.0f);
      for (std::int64_t h = it.kvh * p.group; h < (it.kvh + 1) * p.group; ++h)
        for (const detail::block_plan::entry& en : plan.col(b, h, kt))
          pair_tile(bp, lay, ts, b, h, en.tile, en.kind, k0, keys, it.split);
      for (std::int64_t j = 0; j < keys; ++j) {
        const std::int64_t at = e.k_begin + k0 + j;
        float* dk = ts.dk.get() + j * lay.dim_p;
        for (std::int64_t c = 0; c < lay.dim; ++c) dk[c] *= post;
        if (p.rope) {
          const std::size_t t = static_cast<std::size_t>((e.tensor_batch * p.seq_rows_k + at) * (p.rope_dim / 2));
          rope_apply_back(p, lay.k_cos.data() + t, lay.k_sin.data() + t, dk);
        }
        const std::int64_t ko = e.tensor_batch * bp.dk_stride[0] + at * bp.dk_stride[1] + it.kvh * bp.dk_stride[2];
        const std::int64_t vo = e.tensor_batch * bp.dv_stride[0] + at * bp.dv_stride[1] + it.kvh * bp.dv_stride[2];
        for (std::int64_t c = 0; c < lay.dim; ++c) detail::store_element(bp.dk, bp.dk_type, ko + c * bp.dk_stride[3], dk[c]);
        const float* dv = ts.dv.get() + j * lay.dim_vp;
        for (std::int64_t c = 0; c < p.dim_v; ++c) detail::store_element(bp.dv, bp.dv_type, vo + c * bp.dv_stride[3], dv[c]);
      }
    }
  }
}

// Epilogue for one q tile of one head: dQ = the splits summed in order, scaled, rotated back, stored.
HWY_NOINLINE void finish_rows(const attn_bwd_params& bp, const layout& lay, std::int64_t b, std::int64_t h, std::int64_t qt) {
  const attn_params& p = bp.fwd;
  const df_t d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const seq_extent e = sequence(p, b);
  const std::int64_t q0 = qt * k_bq, rows = std::min(k_bq, e.q_len - q0);
  const float post = p.score ? 1.0f : static_cast<float>(p.scale);
  for (std::int64_t i = q0; i < q0 + rows; ++i) {
    const std::int64_t r = lay.row_of(e, p.seq_rows_q, i), at = e.q_begin + i;
    float* acc = lay.dq_row(0, h, p.heads_q, r);
    for (std::int64_t sp = 1; sp < lay.splits; ++sp) {
      const float* part = lay.dq_row(sp, h, p.heads_q, r);
      for (std::int64_t c = 0; c < lay.dim_p; c += L) hn::Store(hn::Add(hn::Load(d, acc + c), hn::Load(d, part + c)), d, acc + c);
    }
    for (std::int64_t c = 0; c < lay.dim; ++c) acc[c] *= post;
    if (p.rope) {
      const std::size_t t = static_cast<std::size_t>(r * (p.rope_dim / 2));
      rope_apply_back(p, lay.q_cos.data() + t, lay.q_sin.data() + t, acc);
    }
    const std::int64_t o = e.tensor_batch * bp.dq_stride[0] + at * bp.dq_stride[1] + h * bp.dq_stride[2];
    for (std::int64_t c = 0; c < lay.dim; ++c) detail::store_element(bp.dq, bp.dq_type, o + c * bp.dq_stride[3], acc[c]);
  }
}

// Items over the problem: each (sequence, kv head) cut into `splits` contiguous key-tile ranges of about equal cost
// (the q tiles each key tile meets, over the group): independent of the thread count. fold_batch: one range set per
// kv head covering every batch entry (fixed-length batches only, where every entry has the same key tiles).
std::vector<item> make_items(const attn_params& p, const detail::block_plan& plan, std::int64_t splits, bool fold_batch) {
  std::vector<item> items;
  for (std::int64_t b0 = 0; b0 < p.batch; b0 += fold_batch ? p.batch : 1) {
    const std::int64_t b1 = fold_batch ? p.batch : b0 + 1;
    const seq_extent e = sequence(p, b0);
    const std::int64_t kv_tiles = (e.k_len + k_bk - 1) / k_bk;
    for (std::int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      std::vector<std::int64_t> cost(static_cast<std::size_t>(kv_tiles), 1);
      std::int64_t total = 0;
      for (std::int64_t kt = 0; kt < kv_tiles; ++kt) {
        for (std::int64_t b = b0; b < b1; ++b)
          for (std::int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h)
            cost[static_cast<std::size_t>(kt)] += static_cast<std::int64_t>(plan.col(b, h, kt).size());
        total += cost[static_cast<std::size_t>(kt)];
      }
      std::int64_t kt0 = 0, acc = 0, acc0 = 0, split = 0;  // acc0: the cost before tile kt0
      for (std::int64_t kt = 0; kt < kv_tiles; ++kt) {
        acc += cost[static_cast<std::size_t>(kt)];
        const bool cut = kt + 1 == kv_tiles || (split + 1 < splits && acc * splits >= total * (split + 1));
        if (!cut) continue;
        items.push_back({b0, b1, kvh, kt0, kt + 1, split, acc - acc0});
        kt0 = kt + 1;
        acc0 = acc;
        ++split;
      }
    }
  }
  sort_by_cost(items);
  return items;
}

}  // namespace bwd

void flash_bwd_f32(const attn_bwd_params& bp) {
  const attn_params& p = bp.fwd;
  const df_t d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const int threads = p.threads;
  const detail::block_plan plan = detail::make_block_plan(build_block_mask(p, k_bq, k_bk), true);

  bwd::layout lay;
  lay.dim = p.dim_qk;
  lay.dim_p = (p.dim_qk + L - 1) / L * L;
  lay.dim_vp = (p.dim_v + L - 1) / L * L;
  lay.rows = (p.cu_seqlens_q ? 1 : p.batch) * p.seq_rows_q;
  std::int64_t kv_tiles = 0;
  for (std::int64_t b = 0; b < p.batch; ++b) kv_tiles = std::max(kv_tiles, (sequence(p, b).k_len + k_bk - 1) / k_bk);
  lay.score = plan_score(p);
  if (bp.d_bias) {
    lay.bias_step = static_cast<std::size_t>(detail::dense_bias_step(lay.score.steps));
    lay.bias = lay.score.steps[lay.bias_step].bias;
  }
  // A dense bias gradient broadcast over the batch: every batch entry of a kv head in one item (one writer per entry).
  const bool fold_batch = lay.bias && lay.bias->shape[0] == 1 && !p.cu_seqlens_q && p.batch > 1;
  // Enough items for 16 threads' worth of balance, at most 8 dQ partial sums (memory: splits x the size of Q in f32).
  // Counted over the whole problem's kv heads (options::block's heads_q), so a block of heads sums dQ in the same
  // order as the call of every head: the head-block contract holds bitwise for the backward too.
  const std::int64_t pairs = std::max<std::int64_t>((fold_batch ? 1 : p.batch) * (total_heads(p) / p.group), 1);
  lay.splits = std::clamp<std::int64_t>((16 + pairs - 1) / pairs, 1, std::min<std::int64_t>(8, std::max<std::int64_t>(kv_tiles, 1)));
  // A bias broadcast over the keys sums every key tile of a row into one entry: one item per (sequence, kv head).
  if (lay.bias && lay.bias->shape[3] == 1) lay.splits = 1;
  const auto sz = [](std::int64_t x) { return static_cast<std::size_t>(std::max<std::int64_t>(x, 1)); };
  lay.q = detail::checked(hwy::AllocateAligned<float>(sz(p.heads_q * lay.rows * lay.dim_p)));
  lay.d_out = detail::checked(hwy::AllocateAligned<float>(sz(p.heads_q * lay.rows * lay.dim_vp)));
  lay.dq = detail::checked(hwy::AllocateAligned<float>(sz(lay.splits * p.heads_q * lay.rows * lay.dim_p)));
  lay.delta.assign(sz(p.heads_q * lay.rows), 0.0f);
  lay.lse2.assign(lay.delta.size(), 0.0f);
  if (p.sink_logits) lay.sink_part.assign(lay.delta.size(), 0.0);
  if (p.rope) {
    rope_tables(p, true, lay.q_cos, lay.q_sin);
    rope_tables(p, false, lay.k_cos, lay.k_sin);
  }
  std::vector<bwd::item> items = bwd::make_items(p, plan, lay.splits, fold_batch);
  std::vector<bwd::scratch> scratch(static_cast<std::size_t>(threads));
  for (bwd::scratch& ts : scratch) ts.allocate(lay, p.dim_v);
  std::vector<std::vector<float>> rows(static_cast<std::size_t>(threads), std::vector<float>(sz(p.dim_v)));
  // q tiles of every (sequence, head), for the prologue and the epilogue.
  std::vector<std::int64_t> tile_begin{0};
  for (std::int64_t b = 0; b < p.batch; ++b) tile_begin.push_back(tile_begin.back() + (sequence(p, b).q_len + k_bq - 1) / k_bq);
  const std::int64_t q_tiles = tile_begin.back() * p.heads_q;
  const auto q_tile_at = [&](std::int64_t it, std::int64_t& b, std::int64_t& h, std::int64_t& qt) {
    h = it % p.heads_q;
    const std::int64_t flat = it / p.heads_q;
    b = std::upper_bound(tile_begin.begin(), tile_begin.end(), flat) - tile_begin.begin() - 1;
    qt = flat - tile_begin[static_cast<std::size_t>(b)];
  };
  // Every buffer is allocated: only now is an output touched (a failed allocation leaves them as they were).
  if (lay.bias) std::fill(bp.d_bias, bp.d_bias + lay.bias->elements(), 0.0f);
  detail::parallel_errors errors;
  run_phases(threads, errors,
             // The dQ partial sums start at 0 (first touch by the threads that use them).
             make_phase(lay.splits * p.heads_q, sched::even, [&](std::int64_t c, int) {
               std::fill(lay.dq.get() + c * lay.rows * lay.dim_p, lay.dq.get() + (c + 1) * lay.rows * lay.dim_p, 0.0f);
             }),
             make_phase(q_tiles, sched::by_cost, [&](std::int64_t it, int tid) {
               std::int64_t b, h, qt;
               q_tile_at(it, b, h, qt);
               bwd::prepare_rows(bp, lay, b, h, qt, rows[static_cast<std::size_t>(tid)].data());
             }),
             make_phase(static_cast<std::int64_t>(items.size()), sched::by_cost, [&](std::int64_t it, int tid) {
               bwd::run_item(bp, lay, plan, scratch[static_cast<std::size_t>(tid)], items[static_cast<std::size_t>(it)],
                             rows[static_cast<std::size_t>(tid)].data());
             }),
             make_phase(q_tiles, sched::by_cost, [&](std::int64_t it, int) {
               std::int64_t b, h, qt;
               q_tile_at(it, b, h, qt);
               bwd::finish_rows(bp, lay, b, h, qt);
             }));
  errors.rethrow();
  if (bp.d_sink)
    for (std::int64_t h = 0; h < p.heads_q; ++h) {
      double sum = 0.0;
      for (std::int64_t r = 0; r < lay.rows; ++r) sum += lay.sink_part[static_cast<std::size_t>(h * lay.rows + r)];
      bp.d_sink[h] = static_cast<float>(sum);
    }
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::cpu {

HWY_EXPORT(flash_bwd_f32);

void run_flash_bwd(const attn_bwd_params& p) { HWY_DYNAMIC_DISPATCH(flash_bwd_f32)(p); }

}  // namespace omniattn::cpu
#endif
