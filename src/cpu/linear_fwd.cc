// The chunked linear-attention forward (include/omniattn/linear.h; Lightning Attention-2's split).
//
// Math contract, per (batch, head), chunk [t0, t0 + n) of the sequence, with B_i = g_t0 + ... + g_i the log decay
// from the chunk's start to token i (per K channel) and S, z the state carried in from the previous chunk:
//   A_ij = sum_c q_i[c] k_j[c] exp(B_i[c] - B_j[c])        for j <= i  (the masked intra-chunk product; <= 0 exponents)
//   o_i  = sum_{j <= i} A_ij v_j + sum_c q_i[c] exp(B_i[c]) S[c][:]     (intra + inter: no cumulative sum over tokens)
//   den_i = sum_{j <= i} A_ij + sum_c q_i[c] exp(B_i[c]) z[c]            (normalize: o_i / den_i, 0 where den_i = 0)
//   S[c][:] <- exp(B_last[c]) S[c][:] + sum_j exp(B_last[c] - B_j[c]) k_j[c] v_j,  z likewise with v_j = 1
// Every exponent is <= 0 (decays are <= 0 and B is non-increasing within the chunk), so nothing overflows however
// strong the decay. A scalar or fixed decay is one value per token, factored out of the channel sum. A prefix (JRT;
// the whole sequence when non-causal; no decay): one pass accumulates S = initial_state + the prefix's k_t^T v_t, a
// second reads o_t = q_t S for its rows; the causal chunks continue from that state.
// Work items are the (batch, head) pairs; the state is float32; the result does not depend on the thread count.
// The V-wide row updates and the K-wide dot products are Highway vectors, compiled for every target and dispatched
// once per call; register-blocked micro-kernels on the tile engine are to come.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "core/linear_params.h"
#include "core/parallel.h"
#include "core/storage.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/linear_fwd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

#include "cpu/row_ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
namespace {

using detail::linear_params;

struct head_scratch {
  std::vector<float> q, k, v, S, z, o, den;
  // The running log decays in double: differences B_i - B_j of sums over up to a chunk of tokens, taken in float,
  // would carry the rounding of the whole sum into every pair weight.
  std::vector<double> B;
};

// Loads chunk [t0, t0 + n) of one (batch, head): phi(q) * scale, phi(k), v, and B (cumulative log decay from t0; one
// value per token when the decay has no channels).
void load_chunk(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, head_scratch& w,
                bool per_channel) {
  const std::int64_t K = p.dim_k, V = p.dim_v, nb = per_channel ? K : 1;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t t = t0 + i;
    detail::load_token(p, b, h, t, &w.q[static_cast<std::size_t>(i * K)], &w.k[static_cast<std::size_t>(i * K)],
                       &w.v[static_cast<std::size_t>(i * V)]);
    double* Bi = &w.B[static_cast<std::size_t>(i * nb)];
    for (std::int64_t c = 0; c < nb; ++c)
      Bi[c] = (i > 0 ? w.B[static_cast<std::size_t>((i - 1) * nb + c)] : 0.0) + detail::log_decay(p, b, h, t, c);
  }
}

void store_rows(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, const head_scratch& w) {
  const std::int64_t V = p.dim_v;
  for (std::int64_t i = 0; i < n; ++i) {
    const float* oi = &w.o[static_cast<std::size_t>(i * V)];
    const float d = w.den[static_cast<std::size_t>(i)];
    const float inv = p.normalize ? (d == 0.0f ? 0.0f : 1.0f / d) : 1.0f;
    const std::int64_t base = b * p.out_stride[0] + (t0 + i) * p.out_stride[1] + h * p.out_stride[2];
    for (std::int64_t c = 0; c < V; ++c) detail::store_element(p.out, p.out_type, base + c * p.out_stride[3], static_cast<double>(oi[c] * inv));
  }
}

// o_i = (q_i * weight(c)) S and returns (q_i * weight(c)) . z: row i of the chunk against the carried state, each
// channel weighted by its decay since the chunk's start (1 without decay).
template <class Weight>
float read_state(const linear_params& p, head_scratch& w, std::int64_t i, Weight&& weight) {
  const std::int64_t K = p.dim_k, V = p.dim_v;
  const float* qi = &w.q[static_cast<std::size_t>(i * K)];
  float* oi = &w.o[static_cast<std::size_t>(i * V)];
  std::fill(oi, oi + V, 0.0f);
  float den = 0.0f;
  for (std::int64_t c = 0; c < K; ++c) {
    const float qc = qi[c] * weight(c);
    den += qc * w.z[static_cast<std::size_t>(c)];
    axpy(qc, &w.S[static_cast<std::size_t>(c * V)], oi, V);
  }
  return den;
}

// The chunk's rows against the carried state (inter) and each other (intra), then the state advanced past the chunk.
void causal_chunk(const linear_params& p, std::int64_t n, head_scratch& w, bool per_channel) {
  const std::int64_t K = p.dim_k, V = p.dim_v, nb = per_channel ? K : 1;
  const auto B = [&](std::int64_t i, std::int64_t c) { return w.B[static_cast<std::size_t>(i * nb + (per_channel ? c : 0))]; };
  const auto decay = [](double x) { return static_cast<float>(std::exp(x)); };  // x <= 0: a weight in [0, 1]
  for (std::int64_t i = 0; i < n; ++i) {
    const float* qi = &w.q[static_cast<std::size_t>(i * K)];
    float* oi = &w.o[static_cast<std::size_t>(i * V)];
    float den = read_state(p, w, i, [&](std::int64_t c) { return decay(B(i, c)); });  // inter
    // intra: the masked product with the chunk's earlier keys (and the token itself)
    for (std::int64_t j = 0; j <= i; ++j) {
      const float* kj = &w.k[static_cast<std::size_t>(j * K)];
      float a = 0.0f;
      if (per_channel) {
        for (std::int64_t c = 0; c < K; ++c) a += qi[c] * kj[c] * decay(B(i, c) - B(j, c));
      } else {
        a = dot(qi, kj, K) * decay(B(i, 0) - B(j, 0));
      }
      den += a;
      axpy(a, &w.v[static_cast<std::size_t>(j * V)], oi, V);
    }
    w.den[static_cast<std::size_t>(i)] = den;
  }
  // state past the chunk
  for (std::int64_t c = 0; c < K; ++c) {
    const double last = B(n - 1, c);
    const float e_last = decay(last);
    float* Sc = &w.S[static_cast<std::size_t>(c * V)];
    scale_row(e_last, Sc, V);
    w.z[static_cast<std::size_t>(c)] *= e_last;
    for (std::int64_t j = 0; j < n; ++j) {
      const float kw = w.k[static_cast<std::size_t>(j * K + c)] * decay(last - B(j, c));
      w.z[static_cast<std::size_t>(c)] += kw;
      axpy(kw, &w.v[static_cast<std::size_t>(j * V)], Sc, V);
    }
  }
}

void run_head(const linear_params& p, std::int64_t b, std::int64_t h, head_scratch& w) {
  const std::int64_t K = p.dim_k, V = p.dim_v, C = p.chunk, T = p.seq;
  const bool per_channel = p.decay == linear_decay::channel;
  w.q.resize(static_cast<std::size_t>(C * K));
  w.k.resize(w.q.size());
  w.v.resize(static_cast<std::size_t>(C * V));
  w.B.resize(static_cast<std::size_t>(C * (per_channel ? K : 1)));
  w.o.resize(static_cast<std::size_t>(C * V));
  w.den.resize(static_cast<std::size_t>(C));
  w.S.assign(static_cast<std::size_t>(K * V), 0.0f);
  w.z.assign(static_cast<std::size_t>(K), 0.0f);
  if (const state_tensor* s0 = p.initial_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t c = 0; c < V; ++c)
        w.S[static_cast<std::size_t>(a * V + c)] = s0->data[b * s0->stride_batch + h * s0->stride_head + a * s0->stride_k + c * s0->stride_v];
  // The prefix (the whole sequence when non-causal; no decay there): every key of it first, then its rows read the
  // state of the whole prefix.
  const std::int64_t P = p.prefix;
  if (P > 0) {
    for (std::int64_t t0 = 0; t0 < P; t0 += C) {
      const std::int64_t n = std::min(C, P - t0);
      load_chunk(p, b, h, t0, n, w, false);
      for (std::int64_t c = 0; c < K; ++c) {
        float* Sc = &w.S[static_cast<std::size_t>(c * V)];
        for (std::int64_t j = 0; j < n; ++j) {
          const float kc = w.k[static_cast<std::size_t>(j * K + c)];
          w.z[static_cast<std::size_t>(c)] += kc;
          axpy(kc, &w.v[static_cast<std::size_t>(j * V)], Sc, V);
        }
      }
    }
    for (std::int64_t t0 = 0; t0 < P; t0 += C) {
      const std::int64_t n = std::min(C, P - t0);
      load_chunk(p, b, h, t0, n, w, false);
      for (std::int64_t i = 0; i < n; ++i) w.den[static_cast<std::size_t>(i)] = read_state(p, w, i, [](std::int64_t) { return 1.0f; });
      store_rows(p, b, h, t0, n, w);
    }
  }
  // Then the causal chunks, from the prefix's state.
  for (std::int64_t t0 = P; t0 < T; t0 += C) {
    const std::int64_t n = std::min(C, T - t0);
    load_chunk(p, b, h, t0, n, w, per_channel);
    causal_chunk(p, n, w, per_channel);
    store_rows(p, b, h, t0, n, w);
  }
  if (const state_tensor* f = p.final_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t c = 0; c < V; ++c)
        f->data[b * f->stride_batch + h * f->stride_head + a * f->stride_k + c * f->stride_v] = w.S[static_cast<std::size_t>(a * V + c)];
}

}  // namespace

status linear_fwd_kernel(const linear_params& p) {
  const std::int64_t items = p.batch * p.heads;
  detail::parallel_errors errors;
#pragma omp parallel num_threads(p.threads)
  {
    head_scratch w;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t it = 0; it < items; ++it) errors.run([&] { run_head(p, it / p.heads, it % p.heads, w); });
  }
  try {
    errors.rethrow();
  } catch (const std::bad_alloc&) {
    return {"[linear_attention] out of memory"};
  } catch (const std::exception& e) {
    return {std::string("[linear_attention] ") + e.what()};
  }
  return {};
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::cpu {

HWY_EXPORT(linear_fwd_kernel);

status run_linear_fwd(const detail::linear_params& p) { return HWY_DYNAMIC_DISPATCH(linear_fwd_kernel)(p); }

}  // namespace omniattn::cpu
#endif
