// AVX512-BF16 micro-kernels; see bf16_dot.h for the contract and layouts.
#include "cpu/bf16_dot.h"

#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define OMNIATTN_BF16_DOT 1
#define OMNIATTN_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace omniattn::cpu {

#if OMNIATTN_BF16_DOT

bool has_bf16_dot() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 16))) return false;  // AVX512F
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  // The OS must save ZMM state: XCR0 bits 1, 2 (SSE, AVX) and 5..7 (opmask, ZMM_Hi256, Hi16_ZMM).
  unsigned lo = 0, hi = 0;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (a & (1u << 5)) && (lo & 0xe6u) == 0xe6u;
}

namespace {

template <int R>
OMNIATTN_BF16_TARGET inline void qk_rows(const std::uint32_t* q, std::int64_t dim_pairs, const std::uint32_t* k, float* s) {
  __m512 acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (std::int64_t p = 0; p < dim_pairs; ++p) {
    __m512bh kv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) kv[v] = (__m512bh)_mm512_load_si512(k + p * 64 + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * dim_pairs + p]));
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], qb, kv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_store_ps(s + r * 64 + v * 16, acc[r][v]);
}

// One block of up to 4 vectors (64 dims) of O for R rows.
template <int R, int NV>
OMNIATTN_BF16_TARGET inline void pv_rows(const std::uint32_t* p, std::int64_t key_pairs, const std::uint32_t* v,
                                         std::int64_t dim_vp, const float* alpha, float* o) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o + r * dim_vp + c * 16), a);
  }
  for (std::int64_t jp = 0; jp < key_pairs; ++jp) {
    __m512bh vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_load_si512(v + jp * dim_vp + c * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * 32 + jp]));
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_store_ps(o + r * dim_vp + c * 16, acc[r][c]);
}

template <int R>
OMNIATTN_BF16_TARGET void pv_all(const std::uint32_t* p, std::int64_t key_pairs, const std::uint32_t* v, std::int64_t dim_vp,
                                 const float* alpha, float* o) {
  const std::int64_t nvec = dim_vp / 16;
  std::int64_t c = 0;
  for (; c + 4 <= nvec; c += 4) pv_rows<R, 4>(p, key_pairs, v + c * 16, dim_vp, alpha, o + c * 16);
  switch (nvec - c) {
    case 3: pv_rows<R, 3>(p, key_pairs, v + c * 16, dim_vp, alpha, o + c * 16); break;
    case 2: pv_rows<R, 2>(p, key_pairs, v + c * 16, dim_vp, alpha, o + c * 16); break;
    case 1: pv_rows<R, 1>(p, key_pairs, v + c * 16, dim_vp, alpha, o + c * 16); break;
    default: break;
  }
}

template <int R>
OMNIATTN_BF16_TARGET void qk_all(const std::uint32_t* q, std::int64_t dim_pairs, const std::uint32_t* k, float* s) {
  qk_rows<R>(q, dim_pairs, k, s);
}

}  // namespace

OMNIATTN_BF16_TARGET void bf16_qk_tile(int rows, const std::uint32_t* q_pairs, std::int64_t dim_pairs,
                                       const std::uint32_t* k_pairs, float* s) {
  switch (rows) {
    case 1: qk_all<1>(q_pairs, dim_pairs, k_pairs, s); break;
    case 2: qk_all<2>(q_pairs, dim_pairs, k_pairs, s); break;
    case 3: qk_all<3>(q_pairs, dim_pairs, k_pairs, s); break;
    case 4: qk_all<4>(q_pairs, dim_pairs, k_pairs, s); break;
    case 5: qk_all<5>(q_pairs, dim_pairs, k_pairs, s); break;
    case 6: qk_all<6>(q_pairs, dim_pairs, k_pairs, s); break;
    default: std::abort();
  }
}

OMNIATTN_BF16_TARGET void bf16_pack_p(int rows, const float* s, std::uint32_t* p_pairs) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < 64; c += 32) {
      const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_load_ps(s + r * 64 + c + 16), _mm512_load_ps(s + r * 64 + c));
      _mm512_store_si512(p_pairs + r * 32 + c / 2, (__m512i)packed);
    }
}

OMNIATTN_BF16_TARGET void bf16_pv_tile(int rows, const std::uint32_t* p_pairs, std::int64_t key_pairs,
                                       const std::uint32_t* v_pairs, std::int64_t dim_vp, const float* alpha, float* o) {
  switch (rows) {
    case 1: pv_all<1>(p_pairs, key_pairs, v_pairs, dim_vp, alpha, o); break;
    case 2: pv_all<2>(p_pairs, key_pairs, v_pairs, dim_vp, alpha, o); break;
    case 3: pv_all<3>(p_pairs, key_pairs, v_pairs, dim_vp, alpha, o); break;
    case 4: pv_all<4>(p_pairs, key_pairs, v_pairs, dim_vp, alpha, o); break;
    case 5: pv_all<5>(p_pairs, key_pairs, v_pairs, dim_vp, alpha, o); break;
    case 6: pv_all<6>(p_pairs, key_pairs, v_pairs, dim_vp, alpha, o); break;
    default: std::abort();
  }
}

OMNIATTN_BF16_TARGET double bf16_dot_chains(std::int64_t iters, float seed) {
  __m512 acc[12];
  for (int c = 0; c < 12; ++c) acc[c] = _mm512_set1_ps(seed * static_cast<float>(c));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  for (std::int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < 12; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  __m512 sum = acc[0];
  for (int c = 1; c < 12; ++c) sum = _mm512_add_ps(sum, acc[c]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  volatile float sink = lanes[0];
  (void)sink;
  return 12.0 * 64.0 * static_cast<double>(iters);
}

#else  // no AVX512-BF16 on this architecture: never selected.

bool has_bf16_dot() { return false; }
void bf16_qk_tile(int, const std::uint32_t*, std::int64_t, const std::uint32_t*, float*) { std::abort(); }
void bf16_pack_p(int, const float*, std::uint32_t*) { std::abort(); }
void bf16_pv_tile(int, const std::uint32_t*, std::int64_t, const std::uint32_t*, std::int64_t, const float*, float*) { std::abort(); }
double bf16_dot_chains(std::int64_t, float) { return 0.0; }

#endif

}  // namespace omniattn::cpu
