// The fp64 oracle of the linear-attention backward (include/omniattn/linear.h), in plain loops: the forward
// recurrence with every state kept, then the adjoint recursion taken literally, D_t = q_t^T do_t + diag(alpha_{t+1})
// D_{t+1}, with each decay's gradient from its own factor, dg_t[c] = alpha_t[c] (D_t[c] . S_{t-1}[c]). The kernel
// instead uses the running-sum identity dg_t = sum_{i >= t} (q_i dq_i - k_i dk_i); agreement checks both. normalize
// is one more value column of ones (den = q_t . z_t) with num getting do / den and den getting -(do . o) / den.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/linear_params.h"
#include "core/storage.h"

namespace omniattn::ref {

status run_linear_ref(const detail::linear_params& p, linear_form form);

namespace {

using detail::linear_bwd_params;
using detail::linear_params;

// One (batch, head), in T (double: the oracle; float: the naive f32 implementation of the tolerance rule): writes its
// gradients, adds its part of the projection's gradients to dW, db (in double, in call order) and returns its part of
// d_head_log_decay[h] (the sum of its dg).
template <class T>
double backward_head(const linear_bwd_params& bp, std::int64_t b, std::int64_t h, std::vector<double>& dW, std::vector<double>& db) {
  const linear_params& p = bp.fwd;
  const std::int64_t n = p.seq, K = p.dim_k, V = p.dim_v, W = V + (p.normalize ? 1 : 0), P = p.prefix, Kin = p.dim_in;
  const auto at = [](std::int64_t i) { return static_cast<std::size_t>(i); };
  std::vector<T> qr(at(n * Kin)), kr(at(n * Kin)), q(at(n * K)), k(at(n * K)), v(at(n * W), T(1)), g(at(n * K)), s0(at(K * W), T(0));
  std::vector<T> vt(at(V));
  for (std::int64_t t = 0; t < n; ++t) {
    detail::load_raw_qk(p, b, h, t, &qr[at(t * Kin)], &kr[at(t * Kin)]);
    detail::load_token(p, b, h, t, &q[at(t * K)], &k[at(t * K)], vt.data());
    for (std::int64_t e = 0; e < V; ++e) v[at(t * W + e)] = vt[at(e)];
    for (std::int64_t c = 0; c < K; ++c) g[at(t * K + c)] = detail::log_decay(p, b, h, t, c);
  }
  if (const state_tensor* s = p.initial_state)
    for (std::int64_t c = 0; c < K; ++c)
      for (std::int64_t e = 0; e < V; ++e) s0[at(c * W + e)] = s->data[b * s->stride_batch + h * s->stride_head + c * s->stride_k + e * s->stride_v];
  // Slot 0 holds the state before the causal part (s0 plus the prefix's keys; the prefix's rows read it), slot
  // t - P + 1 the causal state after token t.
  const std::int64_t KW = K * W;
  std::vector<T> S(at((n - P + 1) * KW));
  const auto state = [&](std::int64_t slot) { return &S[at(slot * KW)]; };
  for (std::int64_t i = 0; i < KW; ++i) state(0)[i] = s0[at(i)];
  for (std::int64_t t = 0; t < P; ++t)
    for (std::int64_t c = 0; c < K; ++c)
      for (std::int64_t e = 0; e < W; ++e) state(0)[c * W + e] += k[at(t * K + c)] * v[at(t * W + e)];
  for (std::int64_t t = P; t < n; ++t)
    for (std::int64_t c = 0; c < K; ++c) {
      const T a = std::exp(g[at(t * K + c)]);
      for (std::int64_t e = 0; e < W; ++e)
        state(t - P + 1)[c * W + e] = a * state(t - P)[c * W + e] + k[at(t * K + c)] * v[at(t * W + e)];
    }
  const auto read_slot = [&](std::int64_t t) { return t < P ? 0 : t - P + 1; };
  // d_out as the recurrence's value columns see it (normalize: through the division).
  std::vector<T> dw(at(n * W), 0.0);
  for (std::int64_t t = 0; t < n; ++t) {
    const T* R = state(read_slot(t));
    std::vector<T> num(at(W), 0.0);
    for (std::int64_t c = 0; c < K; ++c)
      for (std::int64_t e = 0; e < W; ++e) num[at(e)] += q[at(t * K + c)] * R[c * W + e];
    const std::int64_t base = b * bp.do_stride[0] + t * bp.do_stride[1] + h * bp.do_stride[2];
    T* d = &dw[at(t * W)];
    for (std::int64_t e = 0; e < V; ++e) d[e] = detail::load_element(bp.d_out, bp.do_type, base + e * bp.do_stride[3]);
    if (p.normalize) {
      const T den = num[at(V)];
      if (den == 0.0) {
        for (std::int64_t e = 0; e <= V; ++e) d[e] = 0.0;  // the forward wrote 0 there, whatever the inputs
      } else {
        T dot = 0;
        for (std::int64_t e = 0; e < V; ++e) dot += d[e] * num[at(e)];
        for (std::int64_t e = 0; e < V; ++e) d[e] /= den;
        d[V] = -dot / (den * den);
      }
    }
  }
  std::vector<T> dq(at(n * K), 0.0), dk(at(n * K), 0.0), dv(at(n * W), 0.0), dg(at(n * K), 0.0);
  for (std::int64_t t = 0; t < n; ++t) {
    const T* R = state(read_slot(t));
    for (std::int64_t c = 0; c < K; ++c)
      for (std::int64_t e = 0; e < W; ++e) dq[at(t * K + c)] += R[c * W + e] * dw[at(t * W + e)];
  }
  std::vector<T> D(at(KW), 0.0);  // dL / dS of the state the loop stands at
  if (const state_tensor* f = bp.d_final_state)
    for (std::int64_t c = 0; c < K; ++c)
      for (std::int64_t e = 0; e < V; ++e) D[at(c * W + e)] = f->data[b * f->stride_batch + h * f->stride_head + c * f->stride_k + e * f->stride_v];
  const auto key_grads = [&](std::int64_t t) {  // dk_t = D v_t, dv_t = k_t D
    for (std::int64_t c = 0; c < K; ++c)
      for (std::int64_t e = 0; e < W; ++e) {
        dk[at(t * K + c)] += D[at(c * W + e)] * v[at(t * W + e)];
        dv[at(t * W + e)] += k[at(t * K + c)] * D[at(c * W + e)];
      }
  };
  const auto add_query = [&](std::int64_t t) {  // D += q_t^T do_t
    for (std::int64_t c = 0; c < K; ++c)
      for (std::int64_t e = 0; e < W; ++e) D[at(c * W + e)] += q[at(t * K + c)] * dw[at(t * W + e)];
  };
  for (std::int64_t t = n - 1; t >= P; --t) {
    add_query(t);
    key_grads(t);
    for (std::int64_t c = 0; c < K; ++c) {
      const T a = std::exp(g[at(t * K + c)]);
      T s = 0;
      for (std::int64_t e = 0; e < W; ++e) s += D[at(c * W + e)] * state(t - P)[c * W + e];
      dg[at(t * K + c)] = a * s;
      for (std::int64_t e = 0; e < W; ++e) D[at(c * W + e)] *= a;
    }
  }
  for (std::int64_t t = 0; t < P; ++t) add_query(t);  // every prefix row read the prefix's state
  for (std::int64_t t = 0; t < P; ++t) key_grads(t);
  // To the raw inputs: through scale, phi and the projection (u its output, phi's input; u = x without one).
  std::vector<T> y(at(K)), u(at(K)), dx(at(Kin));
  const auto to_raw = [&](const T* x, T* g) {  // g: K feature gradients in, Kin raw ones out
    detail::features_to_raw(p, h, x, g, u.data(), y.data(), dx.data(), bp.d_proj_w ? dW.data() : nullptr, bp.d_proj_b ? db.data() : nullptr);
  };
  std::vector<T> dqk(at(std::max(K, Kin)));
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t qb = b * bp.dq_stride[0] + t * bp.dq_stride[1] + h * bp.dq_stride[2];
    const std::int64_t kb = b * bp.dk_stride[0] + t * bp.dk_stride[1] + h * bp.dk_stride[2];
    const std::int64_t vb = b * bp.dv_stride[0] + t * bp.dv_stride[1] + h * bp.dv_stride[2];
    for (std::int64_t c = 0; c < K; ++c) dqk[at(c)] = dq[at(t * K + c)] * p.scale;
    to_raw(&qr[at(t * Kin)], dqk.data());
    for (std::int64_t c = 0; c < Kin; ++c) detail::store_element(bp.dq, bp.dq_type, qb + c * bp.dq_stride[3], dqk[at(c)]);
    std::copy(&dk[at(t * K)], &dk[at(t * K)] + K, dqk.begin());
    to_raw(&kr[at(t * Kin)], dqk.data());
    for (std::int64_t c = 0; c < Kin; ++c) detail::store_element(bp.dk, bp.dk_type, kb + c * bp.dk_stride[3], dqk[at(c)]);
    for (std::int64_t e = 0; e < V; ++e) detail::store_element(bp.dv, bp.dv_type, vb + e * bp.dv_stride[3], dv[at(t * W + e)]);
    if (bp.dg) {
      const std::int64_t gb = b * bp.dg_stride[0] + t * bp.dg_stride[1] + h * bp.dg_stride[2];
      if (p.decay == linear_decay::scalar) {
        T s = 0;
        for (std::int64_t c = 0; c < K; ++c) s += dg[at(t * K + c)];
        bp.dg[gb] = static_cast<float>(s);
      } else {
        for (std::int64_t c = 0; c < K; ++c) bp.dg[gb + c * bp.dg_stride[3]] = static_cast<float>(dg[at(t * K + c)]);
      }
    }
  }
  if (const state_tensor* d = bp.d_initial_state)
    for (std::int64_t c = 0; c < K; ++c)
      for (std::int64_t e = 0; e < V; ++e)
        d->data[b * d->stride_batch + h * d->stride_head + c * d->stride_k + e * d->stride_v] = static_cast<float>(D[at(c * W + e)]);
  double fixed = 0.0;
  for (double x : dg) fixed += x;
  return fixed;
}

}  // namespace

status run_linear_bwd_ref(const linear_bwd_params& p, bool f32) {
  if (p.fwd.flow)  // the flows' chain rule around the adjoint of the non-causal call
    return detail::run_flow_bwd(
        p, [f32](const linear_params& x) { return run_linear_ref(x, f32 ? linear_form::recurrent_f32 : linear_form::recurrent); },
        [f32](const linear_bwd_params& x) { return run_linear_bwd_ref(x, f32); });
  // The bidirectional form: the adjoint of each of its two scans (the causal call and the reversed one), summed.
  if (detail::bidirectional(p.fwd))
    return detail::run_bidirectional_bwd(
        p, [f32](const linear_params& x) { return run_linear_ref(x, f32 ? linear_form::recurrent_f32 : linear_form::recurrent); },
        [f32](const linear_bwd_params& x) { return run_linear_bwd_ref(x, f32); });
  // d_head_log_decay sums over the batch (or the varlen sequences, each a call of its own) too.
  std::vector<double> fixed(static_cast<std::size_t>(p.fwd.heads), 0.0);
  const std::int64_t ph = p.fwd.proj_heads;
  std::vector<double> dW(static_cast<std::size_t>(ph * p.fwd.dim_in * p.fwd.dim_k), 0.0), db(static_cast<std::size_t>(ph * p.fwd.dim_k), 0.0);
  detail::linear_bwd_sequence seq;
  for (std::int64_t b = 0; b < detail::linear_sequences(p.fwd); ++b) {
    const linear_bwd_params* q = &p;
    std::int64_t bi = b;
    if (p.fwd.cu_seqlens) {
      detail::sequence_of(p, b, seq);
      q = &seq.p;
      bi = 0;
    }
    for (std::int64_t h = 0; h < p.fwd.heads; ++h)
      fixed[static_cast<std::size_t>(h)] += f32 ? backward_head<float>(*q, bi, h, dW, db) : backward_head<double>(*q, bi, h, dW, db);
  }
  if (p.d_proj_w)
    for (std::size_t i = 0; i < dW.size(); ++i) p.d_proj_w[i] = static_cast<float>(dW[i]);
  if (p.d_proj_b)
    for (std::size_t i = 0; i < db.size(); ++i) p.d_proj_b[i] = static_cast<float>(db[i]);
  if (p.d_head_log_decay)
    for (std::int64_t h = 0; h < p.fwd.heads; ++h) p.d_head_log_decay[h] = static_cast<float>(fixed[static_cast<std::size_t>(h)]);
  return {};
}

}  // namespace omniattn::ref
