// The chunked linear-attention backward (include/omniattn/linear.h; the forward's split, in two passes).
//
// Math contract, per (batch, head), chunk [t0, t0 + n) with B_i the log decay from the chunk's start to token i (per K
// channel; one value per token for scalar / fixed decays), w_i the value-side gradient of row i (d_out, or under
// normalize [do / den, -(do . o) / den] against the value columns [v, 1]) and q, k as loaded (scale phi(.)):
//   pass 1, chunks in order, S the state before the chunk:
//     dq_i[c] = exp(B_i[c]) (S[c] . w_i) + sum_{j <= i} exp(B_i[c] - B_j[c]) k_j[c] (w_i . v_j)
//     then S advanced past the chunk, exactly as the forward
//   pass 2, chunks in reverse, D = dL/dS after the chunk (d_final_state at the end):
//     dk_j[c] = sum_{i >= j} exp(B_i[c] - B_j[c]) q_i[c] (w_i . v_j) + exp(B_last[c] - B_j[c]) (D[c] . v_j)
//     dv_j    = sum_{i >= j} A_ij w_i + sum_c k_j[c] exp(B_last[c] - B_j[c]) D[c],   A_ij the forward's pair weight
//     D[c]   <- exp(B_last[c]) D[c] + sum_i exp(B_i[c]) q_i[c] w_i;   d_initial_state = D after the first chunk
//   dg_t[c] = sum_{i >= t} (q_i[c] dq_i[c] - k_i[c] dk_i[c]) + final_state[c] . d_final_state[c] (the gradient of the
//   running sums G_i, summed over the G_i each g_t enters), in double, over the tokens in reverse.
// Every exponent is <= 0, as in the forward. A prefix (no decay) is one state for all its rows: pass 1 reads the
// prefix state for them, pass 2 adds their q_i^T w_i to D before their keys read it. The state is never stored per
// chunk: pass 1 rebuilds it. Work items are the (batch, head) pairs; nothing depends on the thread count (the fixed
// decay's gradient, a sum over the batch, is added in batch order after the heads).
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
#define HWY_TARGET_INCLUDE "cpu/linear_bwd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

#include "cpu/row_ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace {

using detail::linear_bwd_params;
using detail::linear_params;

std::size_t at(std::int64_t i) { return static_cast<std::size_t>(i); }

float decay(double x) { return static_cast<float>(std::exp(x)); }  // x <= 0: a weight in [0, 1]

struct bwd_scratch {
  std::vector<float> q, k, v, w, dq, dk, dv, S, D, y, raw_q, raw_k;
  std::vector<double> B;          // running log decays of the chunk, in double (see linear_fwd.cc)
  std::vector<float> w_all;       // normalize: every row's w, from pass 1 for pass 2 ([T][W])
  std::vector<float> qdq;         // decay gradients: q_t[c] dq_t[c] per token ([T][nb])
  std::vector<double> run;        // the reverse running sum of dg, [nb]
  double fixed = 0.0;             // the sum of every dg_t[c] (the fixed decay's gradient)
};

struct head_ctx {
  const linear_bwd_params& bp;
  const linear_params& p;
  std::int64_t b, h, K, V, W, nb;
  bool per_channel, want_dg;
};

// Chunk [t0, t0 + n): q, k, value columns v (with the column of ones under normalize) and B.
void load_chunk(const head_ctx& c, std::int64_t t0, std::int64_t n, bwd_scratch& s, bool with_decay) {
  const linear_params& p = c.p;
  for (std::int64_t i = 0; i < n; ++i) {
    detail::load_token(p, c.b, c.h, t0 + i, &s.q[at(i * c.K)], &s.k[at(i * c.K)], &s.y[0]);
    float* vi = &s.v[at(i * c.W)];
    std::copy(s.y.begin(), s.y.begin() + c.V, vi);
    if (c.W > c.V) vi[c.V] = 1.0f;
    double* Bi = &s.B[at(i * c.nb)];
    for (std::int64_t e = 0; e < c.nb; ++e)
      Bi[e] = (i > 0 ? s.B[at((i - 1) * c.nb + e)] : 0.0) + (with_decay ? detail::log_decay(p, c.b, c.h, t0 + i, e) : 0.0);
  }
}

// Rows [t0, t0 + n) of d_out into w (without normalize w is d_out itself).
void load_d_out(const head_ctx& c, std::int64_t t0, std::int64_t n, bwd_scratch& s) {
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t base = c.b * c.bp.do_stride[0] + (t0 + i) * c.bp.do_stride[1] + c.h * c.bp.do_stride[2];
    for (std::int64_t e = 0; e < c.V; ++e)
      s.w[at(i * c.W + e)] = static_cast<float>(detail::load_element(c.bp.d_out, c.bp.do_type, base + e * c.bp.do_stride[3]));
  }
}

// normalize: row i's numerator and denominator (num[V] = den) are q_i against the state plus the intra product, as in
// the forward; w_i becomes [do / den, -(do . num) / den^2] (0 where den = 0: the forward wrote 0 whatever the inputs).
void normalize_rows(const head_ctx& c, std::int64_t n, bwd_scratch& s, bool intra, const auto& B) {
  const std::int64_t K = c.K, V = c.V, W = c.W;
  std::vector<float>& num = s.dv;  // free until pass 2
  for (std::int64_t i = 0; i < n; ++i) {
    float* ni = &num[at(i * W)];
    std::fill(ni, ni + W, 0.0f);
    for (std::int64_t a = 0; a < K; ++a) axpy(s.q[at(i * K + a)] * decay(B(i, a)), &s.S[at(a * W)], ni, W);
    if (intra)
      for (std::int64_t j = 0; j <= i; ++j) {
        float aij = 0.0f;
        for (std::int64_t a = 0; a < K; ++a) aij += s.q[at(i * K + a)] * s.k[at(j * K + a)] * decay(B(i, a) - B(j, a));
        axpy(aij, &s.v[at(j * W)], ni, W);
      }
    float* wi = &s.w[at(i * W)];
    const float den = ni[V];
    if (den == 0.0f) {
      std::fill(wi, wi + W, 0.0f);
      continue;
    }
    const float d = dot(wi, ni, V);
    scale_row(1.0f / den, wi, V);
    wi[V] = -d / (den * den);
  }
}

// dx of the raw inputs from the loaded features' gradient g (K values of row i, in place): scale, then phi's rule.
void to_raw(const head_ctx& c, std::int64_t t, float* g, bool is_q, bwd_scratch& s) {
  detail::load_raw_qk(c.p, c.b, c.h, t, s.raw_q.data(), s.raw_k.data());
  float* x = is_q ? s.raw_q.data() : s.raw_k.data();
  if (is_q) scale_row(static_cast<float>(c.p.scale), g, c.K);
  if (c.p.phi == feature_map::identity) return;
  std::copy(x, x + c.K, s.y.begin());
  detail::apply_feature_map(c.p.phi, s.y.data(), c.K);
  detail::feature_map_backward(c.p.phi, x, s.y.data(), g, c.K);
}

void store(void* base, dtype type, std::int64_t offset, std::int64_t stride, const float* x, std::int64_t n) {
  for (std::int64_t e = 0; e < n; ++e) detail::store_element(base, type, offset + e * stride, static_cast<double>(x[e]));
}

// Pass 1 for one chunk read against the state S: dq of its rows (the prefix's rows read the whole prefix's state:
// no intra product, no decay).
void chunk_dq(const head_ctx& c, std::int64_t t0, std::int64_t n, bwd_scratch& s, bool intra) {
  const std::int64_t K = c.K, W = c.W, nb = c.nb;
  const auto B = [&](std::int64_t i, std::int64_t a) { return s.B[at(i * nb + (c.per_channel ? a : 0))]; };
  load_d_out(c, t0, n, s);
  if (c.p.normalize) {
    normalize_rows(c, n, s, intra, B);
    std::copy(s.w.begin(), s.w.begin() + n * W, s.w_all.begin() + t0 * W);
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const float* wi = &s.w[at(i * W)];
    float* dqi = &s.dq[at(i * K)];
    for (std::int64_t a = 0; a < K; ++a) dqi[a] = decay(B(i, a)) * dot(&s.S[at(a * W)], wi, W);
    if (intra)
      for (std::int64_t j = 0; j <= i; ++j) {
        const float pij = dot(wi, &s.v[at(j * W)], W);
        const float* kj = &s.k[at(j * K)];
        if (c.per_channel) {
          for (std::int64_t a = 0; a < K; ++a) dqi[a] += decay(B(i, a) - B(j, a)) * kj[a] * pij;
        } else {
          axpy(decay(B(i, 0) - B(j, 0)) * pij, kj, dqi, K);
        }
      }
    if (c.want_dg)
      for (std::int64_t e = 0; e < nb; ++e) {
        float sum = 0.0f;
        if (c.per_channel) sum = s.q[at(i * K + e)] * dqi[e];
        else sum = dot(&s.q[at(i * K)], dqi, K);
        s.qdq[at((t0 + i) * nb + e)] = sum;
      }
    to_raw(c, t0 + i, dqi, true, s);
    store(c.bp.dq, c.bp.dq_type, c.b * c.bp.dq_stride[0] + (t0 + i) * c.bp.dq_stride[1] + c.h * c.bp.dq_stride[2], c.bp.dq_stride[3], dqi, K);
  }
}

// The state past a causal chunk, as the forward advances it.
void advance_state(const head_ctx& c, std::int64_t n, bwd_scratch& s, const auto& B) {
  const std::int64_t K = c.K, W = c.W;
  for (std::int64_t a = 0; a < K; ++a) {
    const double last = B(n - 1, a);
    float* Sa = &s.S[at(a * W)];
    scale_row(decay(last), Sa, W);
    for (std::int64_t j = 0; j < n; ++j) axpy(s.k[at(j * K + a)] * decay(last - B(j, a)), &s.v[at(j * W)], Sa, W);
  }
}

// Pass 2 for one chunk against D (dL/dS after the chunk): dk, dv of its keys; then D moved to before the chunk.
// `intra` false: the prefix's keys, which all see D of the whole prefix (their rows' q^T w added to D already).
void chunk_dkdv(const head_ctx& c, std::int64_t t0, std::int64_t n, bwd_scratch& s, bool intra) {
  const std::int64_t K = c.K, V = c.V, W = c.W, nb = c.nb;
  const auto B = [&](std::int64_t i, std::int64_t a) { return s.B[at(i * nb + (c.per_channel ? a : 0))]; };
  if (c.p.normalize) std::copy(s.w_all.begin() + t0 * W, s.w_all.begin() + (t0 + n) * W, s.w.begin());
  else load_d_out(c, t0, n, s);
  for (std::int64_t j = 0; j < n; ++j) {
    const float* vj = &s.v[at(j * W)];
    const float* kj = &s.k[at(j * K)];
    float* dkj = &s.dk[at(j * K)];
    float* dvj = &s.dv[at(j * W)];
    std::fill(dvj, dvj + W, 0.0f);
    for (std::int64_t a = 0; a < K; ++a) {
      const float e = intra ? decay(B(n - 1, a) - B(j, a)) : 1.0f;
      dkj[a] = e * dot(&s.D[at(a * W)], vj, W);
      axpy(kj[a] * e, &s.D[at(a * W)], dvj, W);
    }
    if (intra)
      for (std::int64_t i = j; i < n; ++i) {
        const float* qi = &s.q[at(i * K)];
        const float* wi = &s.w[at(i * W)];
        const float pij = dot(wi, vj, W);
        float aij = 0.0f;
        if (c.per_channel) {
          for (std::int64_t a = 0; a < K; ++a) {
            const float e = decay(B(i, a) - B(j, a));
            dkj[a] += e * qi[a] * pij;
            aij += qi[a] * kj[a] * e;
          }
        } else {
          const float e = decay(B(i, 0) - B(j, 0));
          axpy(e * pij, qi, dkj, K);
          aij = e * dot(qi, kj, K);
        }
        axpy(aij, wi, dvj, W);
      }
  }
  if (intra) {  // D before the chunk
    for (std::int64_t a = 0; a < K; ++a) {
      float* Da = &s.D[at(a * W)];
      scale_row(decay(B(n - 1, a)), Da, W);
      for (std::int64_t i = 0; i < n; ++i) axpy(s.q[at(i * K + a)] * decay(B(i, a)), &s.w[at(i * W)], Da, W);
    }
  }
  for (std::int64_t j = n - 1; j >= 0; --j) {
    const std::int64_t t = t0 + j;
    float* dkj = &s.dk[at(j * K)];
    if (c.want_dg) {  // the reverse running sum, before dk leaves the loaded features
      for (std::int64_t e = 0; e < nb; ++e) {
        const float kdk = c.per_channel ? s.k[at(j * K + e)] * dkj[e] : dot(&s.k[at(j * K)], dkj, K);
        s.run[at(e)] += static_cast<double>(s.qdq[at(t * nb + e)]) - static_cast<double>(kdk);
      }
    }
    to_raw(c, t, dkj, false, s);
    store(c.bp.dk, c.bp.dk_type, c.b * c.bp.dk_stride[0] + t * c.bp.dk_stride[1] + c.h * c.bp.dk_stride[2], c.bp.dk_stride[3], dkj, K);
    store(c.bp.dv, c.bp.dv_type, c.b * c.bp.dv_stride[0] + t * c.bp.dv_stride[1] + c.h * c.bp.dv_stride[2], c.bp.dv_stride[3], &s.dv[at(j * W)], V);
    if (c.want_dg) {  // qdq[t] is read: from here on it holds token t's dg (the running sum with the final-state term)
      for (std::int64_t e = 0; e < nb; ++e) {
        s.qdq[at(t * nb + e)] = static_cast<float>(s.run[at(e)]);
        s.fixed += s.run[at(e)];  // the sum over tokens in double: the dg_t are large next to their sum
      }
    }
  }
}

// One (batch, head); returns its part of the fixed decay's gradient.
double run_head(const linear_bwd_params& bp, std::int64_t b, std::int64_t h, bwd_scratch& s) {
  const linear_params& p = bp.fwd;
  const bool per_channel = p.decay == linear_decay::channel;
  const bool want_dg = bp.dg != nullptr || bp.d_head_log_decay != nullptr;
  const head_ctx c{bp, p, b, h, p.dim_k, p.dim_v, p.dim_v + (p.normalize ? 1 : 0), per_channel ? p.dim_k : 1, per_channel, want_dg};
  const std::int64_t K = c.K, V = c.V, W = c.W, C = p.chunk, T = p.seq, P = p.prefix;
  s.q.resize(at(C * K));
  s.k.resize(at(C * K));
  s.dq.resize(at(C * K));
  s.dk.resize(at(C * K));
  s.v.resize(at(C * W));
  s.w.resize(at(C * W));
  s.dv.resize(at(C * W));
  s.B.resize(at(C * c.nb));
  s.y.resize(at(std::max(K, V)));
  s.raw_q.resize(at(K));
  s.raw_k.resize(at(K));
  if (p.normalize) s.w_all.resize(at(T * W));
  if (want_dg) s.qdq.resize(at(T * c.nb));
  s.S.assign(at(K * W), 0.0f);
  if (const state_tensor* s0 = p.initial_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t e = 0; e < V; ++e) s.S[at(a * W + e)] = s0->data[b * s0->stride_batch + h * s0->stride_head + a * s0->stride_k + e * s0->stride_v];
  const auto Bof = [&](std::int64_t i, std::int64_t a) { return s.B[at(i * c.nb + (per_channel ? a : 0))]; };
  // Pass 1: the prefix's state, its rows, then the causal chunks.
  for (std::int64_t t0 = 0; t0 < P; t0 += C) {
    const std::int64_t n = std::min(C, P - t0);
    load_chunk(c, t0, n, s, false);
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t j = 0; j < n; ++j) axpy(s.k[at(j * K + a)], &s.v[at(j * W)], &s.S[at(a * W)], W);
  }
  for (std::int64_t t0 = 0; t0 < P; t0 += C) {
    const std::int64_t n = std::min(C, P - t0);
    load_chunk(c, t0, n, s, false);
    chunk_dq(c, t0, n, s, false);
  }
  for (std::int64_t t0 = P; t0 < T; t0 += C) {
    const std::int64_t n = std::min(C, T - t0);
    load_chunk(c, t0, n, s, true);
    chunk_dq(c, t0, n, s, true);
    advance_state(c, n, s, Bof);
  }
  // Pass 2: D from d_final_state; the final state's term of dg starts the running sum.
  s.D.assign(at(K * W), 0.0f);
  s.run.assign(at(c.nb), 0.0);
  s.fixed = 0.0;
  if (const state_tensor* f = bp.d_final_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t e = 0; e < V; ++e) {
        const float d = f->data[b * f->stride_batch + h * f->stride_head + a * f->stride_k + e * f->stride_v];
        s.D[at(a * W + e)] = d;
        if (want_dg) s.run[at(per_channel ? a : 0)] += static_cast<double>(d) * s.S[at(a * W + e)];
      }
  const std::int64_t causal_chunks = T > P ? (T - P + C - 1) / C : 0;
  for (std::int64_t ch = causal_chunks - 1; ch >= 0; --ch) {
    const std::int64_t t0 = P + ch * C, n = std::min(C, T - t0);
    load_chunk(c, t0, n, s, true);
    chunk_dkdv(c, t0, n, s, true);
  }
  // The prefix's chunks may run in order: without a decay (refused with a prefix) their keys all see one D, and no
  // running sum of dg crosses them.
  if (P > 0) {
    for (std::int64_t t0 = 0; t0 < P; t0 += C) {  // D of the prefix state: every prefix row read it
      const std::int64_t n = std::min(C, P - t0);
      load_chunk(c, t0, n, s, false);
      if (p.normalize) std::copy(s.w_all.begin() + t0 * W, s.w_all.begin() + (t0 + n) * W, s.w.begin());
      else load_d_out(c, t0, n, s);
      for (std::int64_t a = 0; a < K; ++a)
        for (std::int64_t i = 0; i < n; ++i) axpy(s.q[at(i * K + a)], &s.w[at(i * W)], &s.D[at(a * W)], W);
    }
    for (std::int64_t t0 = 0; t0 < P; t0 += C) {
      const std::int64_t n = std::min(C, P - t0);
      load_chunk(c, t0, n, s, false);
      chunk_dkdv(c, t0, n, s, false);
    }
  }
  if (const state_tensor* d = bp.d_initial_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t e = 0; e < V; ++e) d->data[b * d->stride_batch + h * d->stride_head + a * d->stride_k + e * d->stride_v] = s.D[at(a * W + e)];
  if (want_dg)
    for (std::int64_t t = 0; t < T; ++t) {
      if (bp.dg) {
        const std::int64_t base = b * bp.dg_stride[0] + t * bp.dg_stride[1] + h * bp.dg_stride[2];
        for (std::int64_t e = 0; e < c.nb; ++e) bp.dg[base + e * bp.dg_stride[3]] = s.qdq[at(t * c.nb + e)];
      }
    }
  return s.fixed;
}

}  // namespace

status linear_bwd_kernel(const linear_bwd_params& p) {
  const std::int64_t items = p.fwd.batch * p.fwd.heads;
  std::vector<double> fixed(static_cast<std::size_t>(items), 0.0);
  detail::parallel_errors errors;
#pragma omp parallel num_threads(p.fwd.threads)
  {
    bwd_scratch s;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t it = 0; it < items; ++it)
      errors.run([&] { fixed[static_cast<std::size_t>(it)] = run_head(p, it / p.fwd.heads, it % p.fwd.heads, s); });
  }
  try {
    errors.rethrow();
  } catch (const std::bad_alloc&) {
    return {"[linear_attention_backward] out of memory"};
  } catch (const std::exception& e) {
    return {std::string("[linear_attention_backward] ") + e.what()};
  }
  if (p.d_head_log_decay)
    for (std::int64_t h = 0; h < p.fwd.heads; ++h) {
      double sum = 0.0;
      for (std::int64_t b = 0; b < p.fwd.batch; ++b) sum += fixed[static_cast<std::size_t>(b * p.fwd.heads + h)];
      p.d_head_log_decay[h] = static_cast<float>(sum);
    }
  return {};
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace omniattn::cpu {

HWY_EXPORT(linear_bwd_kernel);

status run_linear_bwd(const detail::linear_bwd_params& p) { return HWY_DYNAMIC_DISPATCH(linear_bwd_kernel)(p); }

}  // namespace omniattn::cpu
#endif
