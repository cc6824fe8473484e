// The forward's online-softmax step on the CPU tile engine (Highway -inl.h: included once per target by each op that
// runs it: the forward (cpu/flash_fwd.cc) and decoding on a KV cache (cpu/decode.cc)). Math contract: spec.h;
// per key tile of up to BK keys for up to BQ rows:
//   S = Q K^T (qk_block),  S = scores(S * scale) in base 2,  masked -> -inf,
//   m' = max(m, rowmax S),  P = exp2(S - m'),  l = l * exp2(m - m') + rowsum P,  O = O * exp2(m - m') + P V.
#if defined(OMNIATTN_CPU_ONLINE_SOFTMAX_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef OMNIATTN_CPU_ONLINE_SOFTMAX_INL_H_
#undef OMNIATTN_CPU_ONLINE_SOFTMAX_INL_H_
#else
#define OMNIATTN_CPU_ONLINE_SOFTMAX_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/parallel.h"
#include "cpu/bf16_dot.h"
#include "cpu/math-inl.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/tiles.h"
#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "omniattn/params.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// One row of the online softmax over a key tile, in registers. On entry srow holds the raw scores q.k of the tile's
// keys; `allowed` has one bit per key. On exit srow holds P = exp2(s * c - m_new) (0 where not allowed), and
// l (one vector of lane partial sums) is rescaled and accumulated; alpha = exp2(m_old - m_new) rescales the row's output accumulator. Returns m_new.
// A row with nothing allowed so far keeps m = -inf, P = 0 and alpha = 1, so it contributes nothing and stays finite.
HWY_INLINE float softmax_row(df_t d, float* HWY_RESTRICT srow, std::uint64_t allowed, float c, float m_old, float* HWY_RESTRICT l,
                             float& alpha) {
  constexpr std::size_t L = hn::MaxLanes(df_t());
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const hn::RebindToUnsigned<df_t> du;
  const auto lane_bit = hn::Shl(hn::Set(du, 1u), hn::Iota(du, 0));
  const vf_t vc = hn::Set(d, c), vninf = hn::Set(d, neg_inf);
  vf_t x[k_row_vecs];
  vf_t vmax = vninf;
  HWY_UNROLL(16)
  for (std::size_t v = 0; v < k_row_vecs; ++v) {
    x[v] = hn::Mul(hn::Load(d, srow + v * L), vc);
    if (allowed != ~std::uint64_t{0}) {
      const auto bits = hn::Set(du, static_cast<std::uint32_t>((allowed >> (v * L)) & ((std::uint64_t{2} << (L - 1)) - 1)));
      x[v] = hn::IfThenElse(hn::RebindMask(d, hn::TestBit(bits, lane_bit)), x[v], vninf);
    }
    vmax = hn::Max(vmax, x[v]);
  }
  // An allowed NaN logit makes the row NaN, as in the oracle, without a per-vector test in this hot loop: Max may
  // drop a NaN lane, but then exp2_neg(NaN - m) is NaN, so P, l and the output are. Only a row whose allowed keys
  // are all NaN can look empty (m = -inf); that rare branch checks explicitly.
  float m_new = std::max(m_old, hn::GetLane(hn::MaxOfLanes(d, vmax)));
  if (m_new == neg_inf) {
    auto nan = hn::IsNaN(x[0]);
    HWY_UNROLL(16)
    for (std::size_t v = 1; v < k_row_vecs; ++v) nan = hn::Or(nan, hn::IsNaN(x[v]));
    if (hn::AllFalse(d, nan)) {  // nothing allowed so far
      alpha = 1.0f;
      std::fill(srow, srow + k_bk, 0.0f);
      return m_new;
    }
    m_new = std::numeric_limits<float>::quiet_NaN();
  }
  if (std::isnan(m_new)) {  // NaN sticks: alpha and l NaN make out and lse NaN
    alpha = m_new;
    std::fill(srow, srow + k_bk, 0.0f);
    hn::Store(hn::Set(d, alpha), d, l);
    return alpha;
  }
  const vf_t vm = hn::Set(d, m_new);
  vf_t vsum = hn::Zero(d);
  HWY_UNROLL(16)
  for (std::size_t v = 0; v < k_row_vecs; ++v) {
    const vf_t pv = exp2_neg(d, hn::Sub(x[v], vm));
    hn::Store(pv, d, srow + v * L);
    vsum = hn::Add(vsum, pv);
  }
  // exp2_neg on one lane instead of a libm call: this runs once per row and key tile.
  alpha = m_old == neg_inf ? 0.0f : hn::GetLane(exp2_neg(d, hn::Set(d, m_old - m_new)));
  // l stays a vector of per-lane partial sums until the row is finished: no horizontal sum per tile.
  hn::Store(hn::MulAdd(hn::Load(d, l), hn::Set(d, alpha), vsum), d, l);
  return m_new;
}

struct thread_scratch {
  hwy::AlignedFreeUniquePtr<float[]> q, s, o;
  hwy::AlignedFreeUniquePtr<std::uint32_t[]> p16;  // P as bf16 pairs (bf16-dot kernel only)
  float m[k_bq], alpha[k_bq];
  hwy::AlignedFreeUniquePtr<float[]> l;  // [k_bq][lanes]: per-row softmax denominators as lane partial sums
  std::int64_t tiles[3] = {};  // key tiles seen, by tile_kind (empty ones are skipped)
  std::int64_t pairs[3] = {};  // grid path: query x key-slot pairs computed, by tile_kind

  // Buffers for one query tile of BQ rows (both work decompositions); bf16_dot adds the packed P.
  void allocate(std::int64_t dim_qk, std::int64_t dim_vp, bool bf16_dot) {
    const df_t d;
    q = detail::checked(hwy::AllocateAligned<float>(static_cast<std::size_t>(k_bq * dim_qk)));
    s = detail::checked(hwy::AllocateAligned<float>(static_cast<std::size_t>(k_bq * k_bk)));
    o = detail::checked(hwy::AllocateAligned<float>(static_cast<std::size_t>(k_bq * dim_vp)));
    l = detail::checked(hwy::AllocateAligned<float>(static_cast<std::size_t>(k_bq) * hn::Lanes(d)));
    if (bf16_dot) p16 = detail::checked(hwy::AllocateAligned<std::uint32_t>(static_cast<std::size_t>(k_bq * k_bk / 2)));
  }
};

// One tile of up to BK keys as four 16-key segments: key 16 s + j has K column kseg[s] + j (dims k_ld apart) and
// V row vseg[s] + j * v_ld. A packed raster tile is kseg[s] = kt + 16 s, k_ld = BK, vseg[s] = vt + 16 s * dim_vp.
template <class T = float>
struct key_segments {
  const T* kseg[4];
  const T* vseg[4];
  std::int64_t k_ld, v_ld;
};

// Folds one key tile (keys <= BK real keys) into the rows' online softmax; allowed(i) gives row i's key bits.
// With a score modifier, scores(s) turns the raw q.k of the tile (s[i * BK + j]) into base-2 logits: each op knows
// which positions its rows and keys are. K / V elements are T (f32, or bf16 / f16 read in place from a KV cache).
// The bf16-dot kernel reads packed raster tiles only (kt_tile / vt).
template <bool Bf16Dot, class T, class Scores, class Allowed>
HWY_INLINE void key_tile(const attn_params& p, thread_scratch& ts, std::int64_t rows, std::int64_t keys,
                         const key_segments<T>& ks, std::int64_t dim_vp, Scores&& scores, Allowed&& allowed) {
  static_assert(!Bf16Dot || std::is_same_v<T, float>, "the bf16-dot kernel reads packed bf16 pairs");
  const T* kt_tile = ks.kseg[0];
  const T* vt = ks.vseg[0];
  const df_t d;
  const std::size_t L = hn::Lanes(d);
  const std::int64_t dim = p.dim_qk;
  float* HWY_RESTRICT qp = ts.q.get();
  float* HWY_RESTRICT s = ts.s.get();
  float* HWY_RESTRICT o = ts.o.get();
  if constexpr (Bf16Dot) {
    const std::int64_t dim_pairs = (dim + 1) / 2;
    for (std::int64_t r0 = 0; r0 < rows; r0 += 6)
      bf16_qk_tile(static_cast<int>(std::min<std::int64_t>(6, rows - r0)), reinterpret_cast<std::uint32_t*>(qp) + r0 * dim_pairs,
                   dim_pairs, reinterpret_cast<const std::uint32_t*>(kt_tile), s + r0 * k_bk);
  } else {
    // Pointers of every key vector of the tile, in groups of k_nv per micro-kernel call.
    const T* kb[k_bk];
    const auto n_vec = static_cast<std::int64_t>(k_bk) / static_cast<std::int64_t>(L);
    for (std::int64_t v = 0; v < n_vec; ++v) kb[v] = ks.kseg[v * static_cast<std::int64_t>(L) / 16] + v * static_cast<std::int64_t>(L) % 16;
    for (std::int64_t r0 = 0; r0 < rows; r0 += static_cast<std::int64_t>(k_mr))
      with_rows(std::min<std::int64_t>(k_mr, rows - r0), [&](auto mr) {
        for (std::int64_t c0 = 0; c0 < k_bk; c0 += static_cast<std::int64_t>(k_nv * L))
          qk_block<mr()>(d, qp + r0 * dim, dim, dim, kb + c0 / static_cast<std::int64_t>(L), ks.k_ld, s + r0 * k_bk + c0, k_bk);
      });
  }
  if (p.score) scores(s);
  for (std::int64_t i = 0; i < rows; ++i) {
    // The whole row stays in registers: scale, mask, max, exp2, sum, one store. With a score functor srow already
    // holds the modified logits in base 2.
    ts.m[i] = softmax_row(d, s + i * k_bk, allowed(i), p.score ? 1.0f : p.scale_log2, ts.m[i],
                          ts.l.get() + static_cast<std::size_t>(i) * L, ts.alpha[i]);
  }
  if constexpr (Bf16Dot) {
    bf16_pack_p(static_cast<int>(rows), s, ts.p16.get());
    for (std::int64_t r0 = 0; r0 < rows; r0 += 6)
      bf16_pv_tile(static_cast<int>(std::min<std::int64_t>(6, rows - r0)), ts.p16.get() + r0 * (k_bk / 2), (keys + 1) / 2,
                   reinterpret_cast<const std::uint32_t*>(vt), dim_vp, ts.alpha + r0, o + r0 * dim_vp);
    return;
  }
  for (std::int64_t r0 = 0; r0 < rows; r0 += static_cast<std::int64_t>(k_mr))
    with_rows(std::min<std::int64_t>(k_mr, rows - r0), [&](auto mr) {
      pv_rows<mr()>(d, s + r0 * k_bk, k_bk, 1, keys, ks.vseg, ks.v_ld, dim_vp, ts.alpha + r0, o + r0 * dim_vp, dim_vp);
    });
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard toggle
