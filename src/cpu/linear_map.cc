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
// Rows are independent, so the map runs over all rows on all threads; dW runs over its rows (h, c), each a pass over
// the tokens. Memory: the two [B, T, H, F] f32 feature buffers (four in the backward).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "core/linear_params.h"
#include "core/parallel.h"
#include "core/storage.h"
#include "cpu/tiles.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/linear_map.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

#include "cpu/row_ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace {

using detail::linear_bwd_params;
using detail::linear_params;

std::size_t at(std::int64_t i) { return static_cast<std::size_t>(i); }

const float* weight_of(const linear_params& p, std::int64_t h) { return p.proj_w + (p.proj_heads > 1 ? h : 0) * p.dim_in * p.dim_k; }

// u = x W + b (less |x|^2 / 2 for performer): one axpy of a W row per raw feature.
void project(const linear_params& p, std::int64_t h, const float* x, float* u) {
  const std::int64_t F = p.dim_k;
  const float* W = weight_of(p, h);
  if (p.proj_b) std::copy(p.proj_b + (p.proj_heads > 1 ? h : 0) * F, p.proj_b + (p.proj_heads > 1 ? h : 0) * F + F, u);
  else std::fill(u, u + F, 0.0f);
  for (std::int64_t c = 0; c < p.dim_in; ++c) axpy(x[c], W + c * F, u, F);
  if (p.phi == feature_map::performer) {
    const float half = 0.5f * dot(x, x, p.dim_in);
    for (std::int64_t f = 0; f < F; ++f) u[f] -= half;
  }
}

// Row r of [B, T, H, *] (r = (b * T + t) * H + h) of a raw input, as floats.
void load_raw(const linear_params& p, const void* base, const std::int64_t* st, std::int64_t r, float* x) {
  const std::int64_t h = r % p.heads, t = r / p.heads % p.seq, b = r / p.heads / p.seq;
  load_row(base, p.in_type, b * st[0] + t * st[1] + h * st[2], st[3], p.dim_in, x);
}

template <class Body>
status for_rows(const char* entry, const linear_params& p, std::int64_t rows, Body&& body) {
  detail::parallel_errors errors;
#pragma omp parallel num_threads(p.threads)
  {
    std::vector<float> x(at(p.dim_in)), u(at(p.dim_k)), dx(at(p.dim_in));
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) errors.run([&] { body(r, x.data(), u.data(), dx.data()); });
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

}  // namespace

status map_linear_features_kernel(const linear_params& p, float* qf, float* kf) {
  const std::int64_t F = p.dim_k;
  return for_rows("linear_attention", p, p.batch * p.seq * p.heads, [&](std::int64_t r, float* x, float*, float*) {
    const std::int64_t h = r % p.heads;
    const struct {
      const void* base;
      const std::int64_t* st;
      float* out;
    } ops[2] = {{p.q, p.q_stride, qf}, {p.k, p.k_stride, kf}};
    for (const auto& o : ops) {
      load_raw(p, o.base, o.st, r, x);
      float* y = o.out + r * F;
      project(p, h, x, y);
      detail::apply_feature_map(p.phi, y, F);
    }
  });
}

status chain_linear_features_kernel(const linear_bwd_params& bp, const float* qf, const float* kf, float* dqf, float* dkf) {
  const linear_params& p = bp.fwd;
  const std::int64_t F = p.dim_k, K = p.dim_in, rows = p.batch * p.seq * p.heads;
  // du in place of dy, then dx = W du (one dot per raw feature) into dq / dk.
  status st = for_rows("linear_attention_backward", p, rows, [&](std::int64_t r, float* x, float* u, float* dx) {
    const std::int64_t h = r % p.heads, t = r / p.heads % p.seq, b = r / p.heads / p.seq;
    const float* W = weight_of(p, h);
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
      load_raw(p, o.base, o.st, r, x);
      float* du = o.dy + r * F;
      project(p, h, x, u);
      detail::feature_map_backward(p.phi, u, o.y + r * F, du, F);
      float total = 0.0f;
      if (p.phi == feature_map::performer)
        for (std::int64_t f = 0; f < F; ++f) total += du[f];
      for (std::int64_t c = 0; c < K; ++c) dx[c] = dot(W + c * F, du, F) - x[c] * total;
      const std::int64_t off = b * o.dst_st[0] + t * o.dst_st[1] + h * o.dst_st[2];
      for (std::int64_t c = 0; c < K; ++c) detail::store_element(o.dst, o.type, off + c * o.dst_st[3], static_cast<double>(dx[c]));
    }
  });
  if (!st.ok()) return st;
  // dW row (ph, c) and db row ph: the rows (b, t, h) of the heads that share them, in order; q's du then k's.
  const std::int64_t ph_count = p.proj_heads, per = p.proj_heads > 1 ? 1 : p.heads;
  const auto heads_of = [&](std::int64_t ph) { return p.proj_heads > 1 ? ph : 0; };
  if (bp.d_proj_w)
    st = for_rows("linear_attention_backward", p, ph_count * K, [&](std::int64_t wr, float*, float* acc, float*) {
      const std::int64_t ph = wr / K, c = wr % K;
      std::fill(acc, acc + F, 0.0f);
      for (std::int64_t b = 0; b < p.batch; ++b)
        for (std::int64_t t = 0; t < p.seq; ++t)
          for (std::int64_t h = heads_of(ph); h < heads_of(ph) + per; ++h) {
            const std::int64_t r = (b * p.seq + t) * p.heads + h;
            const auto xq = static_cast<float>(
                detail::load_element(p.q, p.in_type, b * p.q_stride[0] + t * p.q_stride[1] + h * p.q_stride[2] + c * p.q_stride[3]));
            const auto xk = static_cast<float>(
                detail::load_element(p.k, p.in_type, b * p.k_stride[0] + t * p.k_stride[1] + h * p.k_stride[2] + c * p.k_stride[3]));
            axpy(xq, dqf + r * F, acc, F);
            axpy(xk, dkf + r * F, acc, F);
          }
      std::copy(acc, acc + F, bp.d_proj_w + wr * F);
    });
  if (!st.ok() || !bp.d_proj_b) return st;
  return for_rows("linear_attention_backward", p, ph_count, [&](std::int64_t ph, float*, float* acc, float*) {
    std::fill(acc, acc + F, 0.0f);
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t t = 0; t < p.seq; ++t)
        for (std::int64_t h = heads_of(ph); h < heads_of(ph) + per; ++h) {
          const std::int64_t r = (b * p.seq + t) * p.heads + h;
          for (std::int64_t f = 0; f < F; ++f) acc[f] += dqf[r * F + f] + dkf[r * F + f];
        }
    std::copy(acc, acc + F, bp.d_proj_b + ph * F);
  });
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
