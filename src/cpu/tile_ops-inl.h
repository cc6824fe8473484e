// The CPU tile engine's per-ISA parts (Highway -inl.h: included once per target by each kernel family): the
// register-blocking traits of the target and the micro-kernels every op is built from.
//   qk_block: C[r][0 .. NV L) = sum_e A[r][e] * Bt[e][..]   (S = Q K^T, dP = dO V^T: B packed transposed, d-major)
//   pv_block: C[r][c ..] = C[r][c ..] * alpha[r] + sum_j P(r, j) * V[j][c ..]   (O += P V, dV += P^T dO, dK += dS^T Q,
//             dQ += dS K: P(r, j) read at pr[r * p_rs + j * p_cs], so a transposed operand needs no transpose pass)
// Leading dimensions are explicit; the forward's raster tiles, the grid path's in-place segments and the backward's
// packed tiles are all views the micro-kernels read through them.
#if defined(OMNIATTN_CPU_TILE_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef OMNIATTN_CPU_TILE_OPS_INL_H_
#undef OMNIATTN_CPU_TILE_OPS_INL_H_
#else
#define OMNIATTN_CPU_TILE_OPS_INL_H_
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/tiles.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using df_t = hn::ScalableTag<float>;
using vf_t = hn::Vec<df_t>;

// load_row on whole vectors for unit-stride bf16 / f16 rows (widening is a shift / a conversion per lane): the scalar
// per-element path costs more than the attention itself on local masks, where each row meets few keys.
HWY_INLINE void load_row_v(const void* base, dtype t, std::int64_t offset, std::int64_t stride, std::int64_t n, float* dst) {
  const df_t d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  std::int64_t i = 0;
  if (stride == 1 && t == dtype::bf16) {
    const hn::Rebind<hwy::bfloat16_t, df_t> dh;
    const auto* src = static_cast<const hwy::bfloat16_t*>(base) + offset;
    for (; i + L <= n; i += L) hn::StoreU(hn::PromoteTo(d, hn::LoadU(dh, src + i)), d, dst + i);
  } else if (stride == 1 && t == dtype::f16) {
    const hn::Rebind<hwy::float16_t, df_t> dh;
    const auto* src = static_cast<const hwy::float16_t*>(base) + offset;
    for (; i + L <= n; i += L) hn::StoreU(hn::PromoteTo(d, hn::LoadU(dh, src + i)), d, dst + i);
  }
  load_row(base, t, offset + i * stride, stride, n - i, dst + i);
}

// One vector of floats from L consecutive elements of a storage type: f32 as is, bf16 / f16 widened on load (a KV
// cache stored in 16 bits is read at half the bytes, which is what bounds decoding).
HWY_INLINE vf_t load_lanes(df_t d, const float* HWY_RESTRICT p) { return hn::LoadU(d, p); }
HWY_INLINE vf_t load_lanes(df_t d, const hwy::bfloat16_t* HWY_RESTRICT p) {
  return hn::PromoteTo(d, hn::LoadU(hn::Rebind<hwy::bfloat16_t, df_t>(), p));
}
HWY_INLINE vf_t load_lanes(df_t d, const hwy::float16_t* HWY_RESTRICT p) {
  return hn::PromoteTo(d, hn::LoadU(hn::Rebind<hwy::float16_t, df_t>(), p));
}

// Register blocking: MR query rows x NV vectors of keys (S) or of value dims (O). 4 x 4 accumulators leave room for
// the operands in 16 (AVX2) and 32 (AVX-512) registers.
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
// 16 vector registers (SSE4 / AVX2): 4 rows x 2 vectors of accumulators.
constexpr std::size_t k_mr = 4;
constexpr std::size_t k_nv = 2;
#else
// 32 vector registers (AVX-512, NEON, SVE): 6 rows x 4 vectors = 24 accumulators + 4 operands; 6 rows cut the
// re-reads of each packed K/V tile by 1.5x against 4 rows.
constexpr std::size_t k_mr = 6;
constexpr std::size_t k_nv = 4;
#endif
// The small loops over these are fully unrolled (HWY_UNROLL) so the accumulator arrays live in registers: GCC keeps
// vector arrays it does not unroll on the stack, which costs a load and a store per FMA.

// S[r][c0 .. c0 + NV*L) = sum_d Q[r][d] * Kt[d][c0 ..], for MR rows starting at q (row r at q + r * q_ld). Key
// vector v of the block is read at kb[v] + d * k_ld: consecutive keys of one packed tile (raster path, backward) or a
// segment of a key line read in place from the packed sequence (grid path). Row r is stored at s + r * s_ld.
template <std::size_t MR, class T>
HWY_INLINE void qk_block(df_t d, const float* HWY_RESTRICT q, std::int64_t q_ld, std::int64_t dim, const T* const* kb,
                         std::int64_t k_ld, float* HWY_RESTRICT s, std::int64_t s_ld) {
  const std::size_t L = hn::Lanes(d);
  vf_t acc[MR][k_nv];
  const T* kp[k_nv];
  HWY_UNROLL(16)
  for (std::size_t v = 0; v < k_nv; ++v) kp[v] = kb[v];
  HWY_UNROLL(16)
  for (std::size_t r = 0; r < MR; ++r)
    HWY_UNROLL(16)
    for (std::size_t v = 0; v < k_nv; ++v) acc[r][v] = hn::Zero(d);
  for (std::int64_t e = 0; e < dim; ++e) {
    vf_t kv[k_nv];
    HWY_UNROLL(16)
    for (std::size_t v = 0; v < k_nv; ++v) kv[v] = load_lanes(d, kp[v] + e * k_ld);
    HWY_UNROLL(16)
    for (std::size_t r = 0; r < MR; ++r) {
      const vf_t qb = hn::Set(d, q[static_cast<std::int64_t>(r) * q_ld + e]);
      HWY_UNROLL(16)
      for (std::size_t v = 0; v < k_nv; ++v) acc[r][v] = hn::MulAdd(qb, kv[v], acc[r][v]);
    }
  }
  HWY_UNROLL(16)
  for (std::size_t r = 0; r < MR; ++r)
    HWY_UNROLL(16)
    for (std::size_t v = 0; v < k_nv; ++v) hn::Store(acc[r][v], d, s + static_cast<std::int64_t>(r) * s_ld + v * L);
}

// O[r][c .. c + NVO*L) = O[r][..] * alpha[r] + sum_j P(r, j) * V[j][c ..], for MR rows (alpha null: 1). P(r, j) is
// pr[r * p_rs + j * p_cs]: P itself (p_rs = BK, p_cs = 1) or its transpose (p_rs = 1, p_cs = BK) read in place. Key j's
// V row is vseg[j / 16] + (j % 16) * v_ld: 16-key segments, consecutive rows of one packed tile or of the packed
// sequence.
template <std::size_t MR, std::size_t NVO, class T>
HWY_INLINE void pv_block(df_t d, const float* HWY_RESTRICT pr, std::int64_t p_rs, std::int64_t p_cs, std::int64_t keys,
                         const T* const* vseg, std::int64_t col, std::int64_t v_ld, const float* HWY_RESTRICT alpha,
                         float* HWY_RESTRICT o, std::int64_t o_ld) {
  const std::size_t L = hn::Lanes(d);
  vf_t acc[MR][NVO];
  HWY_UNROLL(16)
  for (std::size_t r = 0; r < MR; ++r) {
    HWY_UNROLL(16)
    for (std::size_t c = 0; c < NVO; ++c) acc[r][c] = hn::Load(d, o + r * o_ld + c * L);
    if (alpha) {
      const vf_t a = hn::Set(d, alpha[r]);
      HWY_UNROLL(16)
      for (std::size_t c = 0; c < NVO; ++c) acc[r][c] = hn::Mul(acc[r][c], a);
    }
  }
  for (std::int64_t s0 = 0; s0 < keys; s0 += 16) {
    const T* HWY_RESTRICT v = vseg[s0 / 16] + col;
    const std::int64_t n = std::min<std::int64_t>(16, keys - s0);
    for (std::int64_t j = 0; j < n; ++j) {
      vf_t vv[NVO];
      HWY_UNROLL(16)
      for (std::size_t c = 0; c < NVO; ++c) vv[c] = load_lanes(d, v + j * v_ld + c * L);
      HWY_UNROLL(16)
      for (std::size_t r = 0; r < MR; ++r) {
        const vf_t pb = hn::Set(d, pr[static_cast<std::int64_t>(r) * p_rs + (s0 + j) * p_cs]);
        HWY_UNROLL(16)
        for (std::size_t c = 0; c < NVO; ++c) acc[r][c] = hn::MulAdd(pb, vv[c], acc[r][c]);
      }
    }
  }
  HWY_UNROLL(16)
  for (std::size_t r = 0; r < MR; ++r)
    HWY_UNROLL(16)
    for (std::size_t c = 0; c < NVO; ++c) hn::Store(acc[r][c], d, o + r * o_ld + c * L);
}

// Calls fn(std::integral_constant<size_t, R>) for R = rows (1 .. k_mr): the row count of a register block is a
// compile-time value, so the last, shorter block of a tile runs the same unrolled code without padding rows.
template <class Fn>
HWY_INLINE void with_rows(std::int64_t rows, Fn&& fn) {
  switch (rows) {
    case 1: fn(std::integral_constant<std::size_t, 1>()); break;
    case 2: fn(std::integral_constant<std::size_t, 2>()); break;
    case 3: fn(std::integral_constant<std::size_t, 3>()); break;
    case 4: fn(std::integral_constant<std::size_t, 4>()); break;
#if !(HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3)
    case 5: fn(std::integral_constant<std::size_t, 5>()); break;
    case 6: fn(std::integral_constant<std::size_t, 6>()); break;
#endif
    default: break;
  }
}

// C[r0 .. r0 + rows)[0 .. ncol) += P V over every column block (ncol a multiple of the vector length): whole k_nv-vector
// blocks, then the 1-3 vector tail, for rows <= k_mr.
template <std::size_t MR, class T>
HWY_INLINE void pv_rows(df_t d, const float* HWY_RESTRICT pr, std::int64_t p_rs, std::int64_t p_cs, std::int64_t keys,
                        const T* const* vseg, std::int64_t v_ld, std::int64_t ncol, const float* HWY_RESTRICT alpha,
                        float* HWY_RESTRICT o, std::int64_t o_ld) {
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const std::int64_t nvec = ncol / L;
  std::int64_t cv = 0;
  for (; cv + static_cast<std::int64_t>(k_nv) <= nvec; cv += k_nv)
    pv_block<MR, k_nv>(d, pr, p_rs, p_cs, keys, vseg, cv * L, v_ld, alpha, o + cv * L, o_ld);
  switch (nvec - cv) {
    case 3: pv_block<MR, 3>(d, pr, p_rs, p_cs, keys, vseg, cv * L, v_ld, alpha, o + cv * L, o_ld); break;
    case 2: pv_block<MR, 2>(d, pr, p_rs, p_cs, keys, vseg, cv * L, v_ld, alpha, o + cv * L, o_ld); break;
    case 1: pv_block<MR, 1>(d, pr, p_rs, p_cs, keys, vseg, cv * L, v_ld, alpha, o + cv * L, o_ld); break;
    default: break;
  }
}

// Key tiles are read as 16-key segments (grid path) through per-vector pointers: a vector must not span two segments.
static_assert(hn::MaxLanes(df_t()) <= 16, "vectors wider than 16 floats would span two 16-key segments");

// Keys per tile in whole vectors of this target.
constexpr std::size_t k_row_vecs = static_cast<std::size_t>(k_bk) / hn::MaxLanes(df_t());

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard toggle
