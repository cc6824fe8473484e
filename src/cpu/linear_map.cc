// The projected feature maps of the linear-attention family (include/omniattn/linear.h: spec.projection; Hedgehog's
// learned maps, Performer's random features): a pass before the chunked kernels and, for the backward, one after.
//
// Math contract, per token row x (dim_in raw values of q or k) of head h, W_h [dim_in][F], b_h [F]:
//   forward:  u = x W_h + b_h (less |x|^2 / 2 for performer),  y = phi(u)   into qf / kf [B, T, H, F] f32;
//             the kernels then run the identity map on F features (scale, decays and states unchanged).
//   backward: the kernels give dy = dL/dy (through scale) for every row; du = phi'(u) dy, dx = W_h du (less x sum(du)
//             for performer) into dq / dk; dW_h[c][:] = sum over rows of x[c] du, db_h = sum of du, over the batches,
//             tokens, q and k rows (and heads when W is shared), each entry summed in one fixed order: the result does
//             not depend on the thread count.
// The map and dx run over blocks of 8 tokens of one head (register-blocked: each W vector feeds 8 rows), on all threads;
// dW as partial sums over fixed blocks of 256 rows (each block's du read once while every W row takes it), summed in
// block order. Memory: the two [B, T, H, F] f32 feature buffers (four in the backward), and for dW the partials
// (B T H / 256 blocks of K x F floats, over the heads sharing W) plus q, k as f32 rows where they are not already.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "core/linear_params.h"
#include "core/parallel.h"
#include "core/storage.h"
#include "cpu/tiles.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/linear_map.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

#include "cpu/row_ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace {
namespace hn = hwy::HWY_NAMESPACE;

using detail::linear_bwd_params;
using detail::linear_params;

std::size_t at(std::int64_t i) { return static_cast<std::size_t>(i); }

const float* weight_of(const linear_params& p, std::int64_t h) { return p.proj_w + (p.proj_heads > 1 ? h : 0) * p.dim_in * p.dim_k; }
const float* bias_of(const linear_params& p, std::int64_t h) { return p.proj_b ? p.proj_b + (p.proj_heads > 1 ? h : 0) * p.dim_k : nullptr; }

// Rows of one head per register block: k_block accumulators and the W vector they share fit 16 vector registers, so
// each W vector loaded feeds k_block FMAs (row by row, the K x F weights would stream from L2 once per row).
constexpr int k_block = 8;

// u_r = x_r W + b for N rows (a compile-time count: the accumulators stay in registers), columns [0, F) on whole
// vectors and the rest one by one.
template <int N>
void project_rows(const linear_params& p, std::int64_t h, const float* x, std::int64_t ldx, float* u, std::int64_t ldu) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const std::int64_t F = p.dim_k, K = p.dim_in;
  const float *W = weight_of(p, h), *bias = bias_of(p, h);
  std::int64_t f0 = 0;
  for (; f0 + L <= F; f0 += L) {
    hn::Vec<decltype(d)> acc[N];
    for (int r = 0; r < N; ++r) acc[r] = bias ? hn::LoadU(d, bias + f0) : hn::Zero(d);
    for (std::int64_t c = 0; c < K; ++c) {
      const auto w = hn::LoadU(d, W + c * F + f0);
      for (int r = 0; r < N; ++r) acc[r] = hn::MulAdd(hn::Set(d, x[r * ldx + c]), w, acc[r]);
    }
    for (int r = 0; r < N; ++r) hn::StoreU(acc[r], d, u + r * ldu + f0);
  }
  for (; f0 < F; ++f0)
    for (int r = 0; r < N; ++r) {
      float a = bias ? bias[f0] : 0.0f;
      for (std::int64_t c = 0; c < K; ++c) a += x[r * ldx + c] * W[c * F + f0];
      u[r * ldu + f0] = a;
    }
}

// u_r = x_r W + b (less |x_r|^2 / 2 for performer) for rows r < n of head h: x rows of dim_in at stride ldx, u rows of
// F at stride ldu.
void project_block(const linear_params& p, std::int64_t h, const float* x, std::int64_t ldx, std::int64_t n, float* u, std::int64_t ldu) {
  if (n == k_block) project_rows<k_block>(p, h, x, ldx, u, ldu);
  else
    for (std::int64_t r = 0; r < n; ++r) project_rows<1>(p, h, x + r * ldx, ldx, u + r * ldu, ldu);
  if (p.phi == feature_map::performer)
    for (std::int64_t r = 0; r < n; ++r) {
      const float half = 0.5f * dot(x + r * ldx, x + r * ldx, p.dim_in);
      for (std::int64_t f = 0; f < p.dim_k; ++f) u[r * ldu + f] -= half;
    }
}

// dx_r[c] = W[c] . du_r for N rows (du rows of F at stride ldu).
template <int N>
void unproject_rows(const linear_params& p, std::int64_t h, const float* du, std::int64_t ldu, float* dx, std::int64_t lddx) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const std::int64_t F = p.dim_k, K = p.dim_in;
  const float* W = weight_of(p, h);
  for (std::int64_t c = 0; c < K; ++c) {
    hn::Vec<decltype(d)> acc[N];
    for (int r = 0; r < N; ++r) acc[r] = hn::Zero(d);
    std::int64_t f0 = 0;
    for (; f0 + L <= F; f0 += L) {
      const auto w = hn::LoadU(d, W + c * F + f0);
      for (int r = 0; r < N; ++r) acc[r] = hn::MulAdd(w, hn::LoadU(d, du + r * ldu + f0), acc[r]);
    }
    for (int r = 0; r < N; ++r) {
      float a = hn::GetLane(hn::SumOfLanes(d, acc[r]));
      for (std::int64_t f = f0; f < F; ++f) a += W[c * F + f] * du[r * ldu + f];
      dx[r * lddx + c] = a;
    }
  }
}

// dx_r = W du_r for rows r < n, less x_r sum(du_r) for performer.
void unproject_block(const linear_params& p, std::int64_t h, const float* x, std::int64_t ldx, const float* du, std::int64_t ldu,
                     std::int64_t n, float* dx, std::int64_t lddx) {
  if (n == k_block) unproject_rows<k_block>(p, h, du, ldu, dx, lddx);
  else
    for (std::int64_t r = 0; r < n; ++r) unproject_rows<1>(p, h, du + r * ldu, ldu, dx + r * lddx, lddx);
  if (p.phi == feature_map::performer)
    for (std::int64_t r = 0; r < n; ++r) {
      float total = 0.0f;
      for (std::int64_t f = 0; f < p.dim_k; ++f) total += du[r * ldu + f];
      for (std::int64_t c = 0; c < p.dim_in; ++c) dx[r * lddx + c] -= x[r * ldx + c] * total;
    }
}

// Rows [t0, t0 + n) of (b, h) of a raw [B, T, H, dim_in] input, as floats (row r at x + r * dim_in).
void load_raw_block(const linear_params& p, const void* base, const std::int64_t* st, std::int64_t b, std::int64_t t0, std::int64_t n,
                    std::int64_t h, float* x) {
  for (std::int64_t r = 0; r < n; ++r) load_row(base, p.in_type, b * st[0] + (t0 + r) * st[1] + h * st[2], st[3], p.dim_in, x + r * p.dim_in);
}

// body(b, t0, n, h, x, u, dx) for every block of up to k_block tokens of one (batch, head), on the call's threads;
// x, u, dx are k_block rows of dim_in, F and dim_in floats of the thread's scratch.
template <class Body>
status for_blocks(const char* entry, const linear_params& p, Body&& body) {
  const std::int64_t per = (p.seq + k_block - 1) / k_block, blocks = p.batch * p.heads * per;
  detail::parallel_errors errors;
#pragma omp parallel num_threads(p.threads)
  {
    std::vector<float> x(at(k_block * p.dim_in)), u(at(k_block * p.dim_k)), dx(at(k_block * p.dim_in));
#pragma omp for schedule(static)
    for (std::int64_t blk = 0; blk < blocks; ++blk)
      errors.run([&] {
        const std::int64_t b = blk / (p.heads * per), h = blk / per % p.heads, t0 = blk % per * k_block;
        body(b, t0, std::min<std::int64_t>(k_block, p.seq - t0), h, x.data(), u.data(), dx.data());
      });
  }
  try {
    errors.rethrow();
  } catch (const std::bad_alloc&) {
    return {std::string("[") + entry + "] out of memory"};
  } catch (const std::exception& e) {
    return {std::string("[") + entry + "] " + e.what()};
  }
  return {};
}

std::int64_t row_of(const linear_params& p, std::int64_t b, std::int64_t t, std::int64_t h) { return (b * p.seq + t) * p.heads + h; }

}  // namespace

status map_linear_features_kernel(const linear_params& p, float* qf, float* kf) {
  const std::int64_t F = p.dim_k, ld = p.heads * F;  // consecutive tokens of a head are H rows apart
  return for_blocks("linear_attention", p, [&](std::int64_t b, std::int64_t t0, std::int64_t n, std::int64_t h, float* x, float*, float*) {
    const struct {
      const void* base;
      const std::int64_t* st;
      float* out;
    } ops[2] = {{p.q, p.q_stride, qf}, {p.k, p.k_stride, kf}};
    for (const auto& o : ops) {
      load_raw_block(p, o.base, o.st, b, t0, n, h, x);
      float* y = o.out + row_of(p, b, t0, h) * F;
      project_block(p, h, x, p.dim_in, n, y, ld);
      for (std::int64_t r = 0; r < n; ++r) map_features(p.phi, y + r * ld, F);
    }
  });
}

status chain_linear_features_kernel(const linear_bwd_params& bp, const float* qf, const float* kf, float* dqf, float* dkf) {
  const linear_params& p = bp.fwd;
  const std::int64_t F = p.dim_k, K = p.dim_in, ld = p.heads * F;
  // du in place of dy (phi's rule at the recomputed pre-activation u), then dx = W du into dq / dk.
  status st = for_blocks("linear_attention_backward", p, [&](std::int64_t b, std::int64_t t0, std::int64_t n, std::int64_t h, float* x, float* u,
                                                             float* dx) {
    const struct {
      const void* base;
      const std::int64_t* st;
      const float* y;
      float* dy;
      void* dst;
      dtype type;
      const std::int64_t* dst_st;
    } ops[2] = {{p.q, p.q_stride, qf, dqf, bp.dq, bp.dq_type, bp.dq_stride}, {p.k, p.k_stride, kf, dkf, bp.dk, bp.dk_type, bp.dk_stride}};
    for (const auto& o : ops) {
      load_raw_block(p, o.base, o.st, b, t0, n, h, x);
      project_block(p, h, x, K, n, u, F);
      const std::int64_t r0 = row_of(p, b, t0, h);
      for (std::int64_t r = 0; r < n; ++r) detail::feature_map_backward(p.phi, u + r * F, o.y + (r0 + r * p.heads) * F, o.dy + (r0 + r * p.heads) * F, F);
      unproject_block(p, h, x, K, o.dy + r0 * F, ld, n, dx, K);
      for (std::int64_t r = 0; r < n; ++r) {
        store_row(o.dst, o.type, b * o.dst_st[0] + (t0 + r) * o.dst_st[1] + h * o.dst_st[2], o.dst_st[3], K, dx + r * K);
      }
    }
  });
  if (!st.ok()) return st;
  // dW rows (ph, c0 .. c0 + 8) and db row ph: over the rows (b, t, h) of the heads that share them, in order, q's du then
  // k's. Register-blocked like the map: per vector of F columns, 8 accumulators (one per W row) that each du vector
  // loaded feeds; the raw x as f32 rows (converted once where q, k are not f32 rows already).
  const std::int64_t per = p.proj_heads > 1 ? 1 : p.heads, rows = p.batch * p.seq * p.heads;
  const auto first_head = [&](std::int64_t ph) { return p.proj_heads > 1 ? ph : 0; };
  detail::parallel_errors errors;
  if (bp.d_proj_w) try {
    std::vector<float> xq_rows, xk_rows;
    const auto raw_rows = [&](const void* base, const std::int64_t* st, std::vector<float>& buf) -> const float* {
      // f32 rows already laid out [B, T, H, K] (kernel_strides gives size-1 dims stride 0): read in place.
      const bool dense = p.in_type == dtype::f32 && (K == 1 || st[3] == 1) && (p.heads == 1 || st[2] == K) &&
                         (p.seq == 1 || st[1] == p.heads * K) && (p.batch == 1 || st[0] == p.seq * p.heads * K);
      if (dense) return static_cast<const float*>(base);
      buf.resize(at(rows * K));
#pragma omp parallel for num_threads(p.threads) schedule(static)
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t h = r % p.heads, t = r / p.heads % p.seq, b = r / p.heads / p.seq;
        load_row(base, p.in_type, b * st[0] + t * st[1] + h * st[2], st[3], K, buf.data() + r * K);
      }
      return buf.data();
    };
    const float* xq = raw_rows(p.q, p.q_stride, xq_rows);
    const float* xk = raw_rows(p.k, p.k_stride, xk_rows);
    // Partial sums over fixed blocks of k_rows rows (each block's du, q's and k's, stays in L2 while all of W's rows
    // read it), then the partials summed in block order: the result does not depend on the thread count.
    constexpr std::int64_t k_rows = 256;
    const std::int64_t ph_rows = p.batch * p.seq * per, nblk = (ph_rows + k_rows - 1) / k_rows;
    std::vector<float> partial(at(p.proj_heads * nblk * K * F));
    const auto row_at = [&](std::int64_t ph, std::int64_t i) {  // the i-th row of the heads sharing W_ph, in order
      return row_of(p, i / per / p.seq, i / per % p.seq, first_head(ph) + i % per);
    };
#pragma omp parallel for num_threads(p.threads) schedule(dynamic, 1)
    for (std::int64_t item = 0; item < p.proj_heads * nblk; ++item)
      errors.run([&] {
        const hn::ScalableTag<float> d;
        const auto L = static_cast<std::int64_t>(hn::Lanes(d));
        const std::int64_t ph = item / nblk, i0 = item % nblk * k_rows, i1 = std::min(ph_rows, i0 + k_rows);
        float* acc_out = partial.data() + item * K * F;
        for (std::int64_t c0 = 0; c0 < K; c0 += k_block) {
          const std::int64_t nc = std::min<std::int64_t>(k_block, K - c0);
          std::int64_t f0 = 0;
          for (; f0 + L <= F; f0 += L) {
            hn::Vec<decltype(d)> acc[k_block];
            for (int c = 0; c < k_block; ++c) acc[c] = hn::Zero(d);
            const auto accumulate = [&](auto count) {  // a compile-time count keeps the accumulators in registers
              for (std::int64_t i = i0; i < i1; ++i) {
                const std::int64_t r = row_at(ph, i);
                const auto gq = hn::LoadU(d, dqf + r * F + f0), gk = hn::LoadU(d, dkf + r * F + f0);
                for (int c = 0; c < decltype(count)::value; ++c) {
                  acc[c] = hn::MulAdd(hn::Set(d, xq[r * K + c0 + c]), gq, acc[c]);
                  acc[c] = hn::MulAdd(hn::Set(d, xk[r * K + c0 + c]), gk, acc[c]);
                }
              }
            };
            if (nc == k_block) accumulate(std::integral_constant<int, k_block>{});
            else accumulate(std::integral_constant<int, 1>{});
            for (std::int64_t c = 0; c < (nc == k_block ? nc : 1); ++c) hn::StoreU(acc[c], d, acc_out + (c0 + c) * F + f0);
            for (std::int64_t c = 1; c < nc && nc != k_block; ++c) {  // a partial block of W rows: one row at a time
              auto a = hn::Zero(d);
              for (std::int64_t i = i0; i < i1; ++i) {
                const std::int64_t r = row_at(ph, i);
                a = hn::MulAdd(hn::Set(d, xq[r * K + c0 + c]), hn::LoadU(d, dqf + r * F + f0), a);
                a = hn::MulAdd(hn::Set(d, xk[r * K + c0 + c]), hn::LoadU(d, dkf + r * F + f0), a);
              }
              hn::StoreU(a, d, acc_out + (c0 + c) * F + f0);
            }
          }
          for (; f0 < F; ++f0)  // the columns past the last whole vector
            for (std::int64_t c = 0; c < nc; ++c) {
              float a = 0.0f;
              for (std::int64_t i = i0; i < i1; ++i) {
                const std::int64_t r = row_at(ph, i);
                a += xq[r * K + c0 + c] * dqf[r * F + f0] + xk[r * K + c0 + c] * dkf[r * F + f0];
              }
              acc_out[(c0 + c) * F + f0] = a;
            }
        }
      });
#pragma omp parallel for num_threads(p.threads) schedule(static)
    for (std::int64_t wr = 0; wr < p.proj_heads * K; ++wr) {  // the partials of W row (ph, c), in block order
      const std::int64_t ph = wr / K, c = wr % K;
      float* out = bp.d_proj_w + wr * F;
      std::fill(out, out + F, 0.0f);
      for (std::int64_t blk = 0; blk < nblk; ++blk) axpy(1.0f, partial.data() + ((ph * nblk + blk) * K + c) * F, out, F);
    }
  } catch (const std::bad_alloc&) {  // the converted rows or the partial sums
    return {"[linear_attention_backward] out of memory (the projection's gradient)"};
  }
  if (bp.d_proj_b) {
#pragma omp parallel for num_threads(p.threads) schedule(static)
    for (std::int64_t ph = 0; ph < p.proj_heads; ++ph) {
      float* acc = bp.d_proj_b + ph * F;
      std::fill(acc, acc + F, 0.0f);
      for (std::int64_t b = 0; b < p.batch; ++b)
        for (std::int64_t t = 0; t < p.seq; ++t)
          for (std::int64_t h = first_head(ph); h < first_head(ph) + per; ++h) {
            const std::int64_t r = row_of(p, b, t, h);
            axpy(1.0f, dqf + r * F, acc, F);
            axpy(1.0f, dkf + r * F, acc, F);
          }
    }
  }
  try {
    errors.rethrow();
  } catch (const std::exception& e) {
    return {std::string("[linear_attention_backward] ") + e.what()};
  }
  return {};
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::cpu {

HWY_EXPORT(map_linear_features_kernel);
HWY_EXPORT(chain_linear_features_kernel);

status map_linear_features(const detail::linear_params& p, float* qf, float* kf) {
  return HWY_DYNAMIC_DISPATCH(map_linear_features_kernel)(p, qf, kf);
}
status chain_linear_features(const detail::linear_bwd_params& bp, const float* qf, const float* kf, float* dqf, float* dkf) {
  return HWY_DYNAMIC_DISPATCH(chain_linear_features_kernel)(bp, qf, kf, dqf, dkf);
}

}  // namespace omniattn::cpu
#endif
