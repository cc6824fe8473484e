// The fp64 oracle of linear attention (include/omniattn/linear.h), in plain loops: the quadratic form with explicit
// pair weights exp(G_i - G_j) (G the running sum of the log decays), or the recurrence S_t = diag(alpha_t) S_{t-1} +
// k_t^T v_t itself, in double (the two agree to fp64 rounding) or in float (the naive f32 implementation of the
// tolerance rule). Every form writes out and final_state.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/linear_params.h"
#include "core/storage.h"

namespace omniattn::ref {
namespace {

using detail::linear_params;
using detail::load_element;

// One (batch, head)'s inputs in T: phi(q) * scale, phi(k), v, the log decays g [T][K] and the initial state [K][V].
template <class T>
struct head_inputs {
  std::vector<T> q, k, v, g, gb, s0;  // gb: the bidirectional form's reversed-scan decays (g when it has none)
};

template <class T>
head_inputs<T> load_head(const linear_params& p, std::int64_t b, std::int64_t h) {
  const std::int64_t n = p.seq, K = p.dim_k, V = p.dim_v;
  head_inputs<T> x;
  x.q.resize(static_cast<std::size_t>(n * K));
  x.k.resize(x.q.size());
  x.v.resize(static_cast<std::size_t>(n * V));
  x.g.assign(static_cast<std::size_t>(n * K), T(0));
  x.s0.assign(static_cast<std::size_t>(K * V), T(0));
  for (std::int64_t t = 0; t < n; ++t) {
    detail::load_token(p, b, h, t, &x.q[static_cast<std::size_t>(t * K)], &x.k[static_cast<std::size_t>(t * K)],
                       &x.v[static_cast<std::size_t>(t * V)]);
    for (std::int64_t c = 0; c < K; ++c) x.g[static_cast<std::size_t>(t * K + c)] = static_cast<T>(detail::log_decay(p, b, h, t, c));
  }
  x.gb = x.g;
  if (p.gb) {
    linear_params r = p;  // log_decay reads g
    r.g = p.gb;
    r.g_type = p.gb_type;
    std::copy(p.gb_stride, p.gb_stride + 4, r.g_stride);
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t c = 0; c < K; ++c) x.gb[static_cast<std::size_t>(t * K + c)] = static_cast<T>(detail::log_decay(r, b, h, t, c));
  }
  if (const state_tensor* s0 = p.initial_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t c = 0; c < V; ++c)
        x.s0[static_cast<std::size_t>(a * V + c)] =
            static_cast<T>(s0->data[b * s0->stride_batch + h * s0->stride_head + a * s0->stride_k + c * s0->stride_v]);
  return x;
}

// o [T][V] and the final state [K][V] of one (batch, head), by the quadratic form.
void quadratic(const linear_params& p, const head_inputs<double>& x, std::vector<double>& o, std::vector<double>& fin) {
  const std::int64_t n = p.seq, K = p.dim_k, V = p.dim_v;
  // Running log decays G (prefix sums of g) and, for the bidirectional form, R (suffix sums of gb).
  std::vector<double> G(static_cast<std::size_t>(n * K), 0.0), R(static_cast<std::size_t>(n * K), 0.0);
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t c = 0; c < K; ++c)
      G[static_cast<std::size_t>(t * K + c)] = (t > 0 ? G[static_cast<std::size_t>((t - 1) * K + c)] : 0.0) + x.g[static_cast<std::size_t>(t * K + c)];
  for (std::int64_t t = n - 1; t >= 0; --t)
    for (std::int64_t c = 0; c < K; ++c)
      R[static_cast<std::size_t>(t * K + c)] = (t + 1 < n ? R[static_cast<std::size_t>((t + 1) * K + c)] : 0.0) + x.gb[static_cast<std::size_t>(t * K + c)];
  const bool both = detail::bidirectional(p);
  o.assign(static_cast<std::size_t>(n * V), 0.0);
  for (std::int64_t i = 0; i < n; ++i) {
    double* oi = &o[static_cast<std::size_t>(i * V)];
    double den = 0.0;
    // The pairs of each direction and their weight per channel: the forward direction j <= i (and, in the prefix or a
    // non-causal call without decay, every pair of the prefix: G is 0 there) with exp(G_i - G_j); the bidirectional
    // form's reversed scan j >= i with exp(R_i - R_j) (the diagonal is in both).
    const auto holds = [&](std::int64_t j, bool reversed) {
      if (reversed) return both && j >= i;
      return j <= i || (!both && i < p.prefix && j < p.prefix);
    };
    const auto weight = [&](std::int64_t j, std::int64_t c, bool reversed) {
      const std::size_t ic = static_cast<std::size_t>(i * K + c), jc = static_cast<std::size_t>(j * K + c);
      return reversed ? std::exp(R[ic] - R[jc]) : std::exp(G[ic] - G[jc]);
    };
    for (std::int64_t j = 0; j < n; ++j)
      for (const bool reversed : {false, true}) {
        if (!holds(j, reversed)) continue;
        double a = 0.0;  // q_i . (w_ij k_j)
        for (std::int64_t c = 0; c < K; ++c)
          a += x.q[static_cast<std::size_t>(i * K + c)] * x.k[static_cast<std::size_t>(j * K + c)] * weight(j, c, reversed);
        den += a;
        for (std::int64_t c = 0; c < V; ++c) oi[c] += a * x.v[static_cast<std::size_t>(j * V + c)];
      }
    for (std::int64_t c = 0; c < K; ++c) {  // the initial state, decayed to token i
      const double w = x.q[static_cast<std::size_t>(i * K + c)] * (p.causal ? std::exp(G[static_cast<std::size_t>(i * K + c)]) : 1.0);
      for (std::int64_t e = 0; e < V; ++e) oi[e] += w * x.s0[static_cast<std::size_t>(c * V + e)];
    }
    if (p.normalize)
      for (std::int64_t c = 0; c < V; ++c) oi[c] = den == 0.0 ? 0.0 : oi[c] / den;
  }
  fin.assign(static_cast<std::size_t>(K * V), 0.0);
  for (std::int64_t c = 0; c < K; ++c) {
    const double gt = n > 0 && p.causal ? G[static_cast<std::size_t>((n - 1) * K + c)] : 0.0;
    for (std::int64_t e = 0; e < V; ++e) fin[static_cast<std::size_t>(c * V + e)] = std::exp(gt) * x.s0[static_cast<std::size_t>(c * V + e)];
    for (std::int64_t j = 0; j < n; ++j) {
      const double w = x.k[static_cast<std::size_t>(j * K + c)] * (p.causal ? std::exp(gt - G[static_cast<std::size_t>(j * K + c)]) : 1.0);
      for (std::int64_t e = 0; e < V; ++e) fin[static_cast<std::size_t>(c * V + e)] += w * x.v[static_cast<std::size_t>(j * V + e)];
    }
  }
}

// Flowformer's flow form by its definition, pair by pair (include/omniattn/linear.h): every flow from the loaded q, k
// of one (batch, head), then o_i = A_i sum_j ((q_i / I_i) . k_j) c_j v_j.
void flow_quadratic(const linear_params& p, const head_inputs<double>& x, std::vector<double>& o) {
  const std::int64_t n = p.seq, K = p.dim_k, V = p.dim_v;
  const double e = 1e-6;
  const auto q = [&](std::int64_t t, std::int64_t c) { return x.q[static_cast<std::size_t>(t * K + c)]; };
  const auto k = [&](std::int64_t t, std::int64_t c) { return x.k[static_cast<std::size_t>(t * K + c)]; };
  std::vector<double> I(static_cast<std::size_t>(n), 0.0), O = I, Ih = I, Oh = I;
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t c = 0; c < K; ++c) {
      double sk = 0.0, sq = 0.0;
      for (std::int64_t j = 0; j < n; ++j) {
        sk += k(j, c);
        sq += q(j, c);
      }
      I[static_cast<std::size_t>(i)] += (q(i, c) + e) * (sk + e);
      O[static_cast<std::size_t>(i)] += (k(i, c) + e) * (sq + e);
    }
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t c = 0; c < K; ++c) {
      double a = 0.0, b = 0.0;
      for (std::int64_t j = 0; j < n; ++j) {
        a += k(j, c) / O[static_cast<std::size_t>(j)];
        b += q(j, c) / I[static_cast<std::size_t>(j)];
      }
      Ih[static_cast<std::size_t>(i)] += (q(i, c) + e) * (a + e);
      Oh[static_cast<std::size_t>(i)] += (k(i, c) + e) * (b + e);
    }
  double z = 0.0;
  for (std::int64_t j = 0; j < n; ++j) z += std::exp(std::clamp(Oh[static_cast<std::size_t>(j)], -1.0, 1.0));
  o.assign(static_cast<std::size_t>(n * V), 0.0);
  for (std::int64_t i = 0; i < n; ++i) {
    const double A = 1.0 / (1.0 + std::exp(-Ih[static_cast<std::size_t>(i)]));
    for (std::int64_t j = 0; j < n; ++j) {
      double w = 0.0;
      for (std::int64_t c = 0; c < K; ++c) w += q(i, c) / I[static_cast<std::size_t>(i)] * k(j, c);
      const double cj = static_cast<double>(n) * std::exp(std::clamp(Oh[static_cast<std::size_t>(j)], -1.0, 1.0)) / z;
      for (std::int64_t e2 = 0; e2 < V; ++e2) o[static_cast<std::size_t>(i * V + e2)] += A * w * cj * x.v[static_cast<std::size_t>(j * V + e2)];
    }
  }
}

// The same by the recurrence, in T (non-causal: the state of every token first, then each row reads it).
template <class T>
void recurrent(const linear_params& p, const head_inputs<T>& x, std::vector<T>& o, std::vector<T>& S) {
  const std::int64_t n = p.seq, K = p.dim_k, V = p.dim_v;
  S = x.s0;
  std::vector<T> z(static_cast<std::size_t>(K), T(0));
  o.assign(static_cast<std::size_t>(n * V), T(0));
  const auto read = [&](std::int64_t t) {
    T* ot = &o[static_cast<std::size_t>(t * V)];
    T den = 0;
    for (std::int64_t c = 0; c < K; ++c) {
      const T qc = x.q[static_cast<std::size_t>(t * K + c)];
      den += qc * z[static_cast<std::size_t>(c)];
      for (std::int64_t e = 0; e < V; ++e) ot[e] += qc * S[static_cast<std::size_t>(c * V + e)];
    }
    if (p.normalize)
      for (std::int64_t e = 0; e < V; ++e) ot[e] = den == T(0) ? T(0) : ot[e] / den;
  };
  const auto update = [&](std::int64_t t) {
    for (std::int64_t c = 0; c < K; ++c) {
      const T a = std::exp(x.g[static_cast<std::size_t>(t * K + c)]), kc = x.k[static_cast<std::size_t>(t * K + c)];
      z[static_cast<std::size_t>(c)] = a * z[static_cast<std::size_t>(c)] + kc;
      for (std::int64_t e = 0; e < V; ++e)
        S[static_cast<std::size_t>(c * V + e)] = a * S[static_cast<std::size_t>(c * V + e)] + kc * x.v[static_cast<std::size_t>(t * V + e)];
    }
  };
  // The prefix's keys first, then its rows read the state of the whole prefix; every later token updates, then reads.
  for (std::int64_t t = 0; t < p.prefix; ++t) update(t);
  for (std::int64_t t = 0; t < p.prefix; ++t) read(t);
  for (std::int64_t t = p.prefix; t < n; ++t) {
    update(t);
    read(t);
  }
}

template <class T>
void store(const linear_params& p, std::int64_t b, std::int64_t h, const std::vector<T>& o, const std::vector<T>& fin) {
  for (std::int64_t t = 0; t < p.seq; ++t)
    for (std::int64_t c = 0; c < p.dim_v; ++c)
      detail::store_element(p.out, p.out_type, b * p.out_stride[0] + t * p.out_stride[1] + h * p.out_stride[2] + c * p.out_stride[3],
                            static_cast<double>(o[static_cast<std::size_t>(t * p.dim_v + c)]));
  if (const state_tensor* f = p.final_state)
    for (std::int64_t a = 0; a < p.dim_k; ++a)
      for (std::int64_t c = 0; c < p.dim_v; ++c)
        f->data[b * f->stride_batch + h * f->stride_head + a * f->stride_k + c * f->stride_v] =
            static_cast<float>(fin[static_cast<std::size_t>(a * p.dim_v + c)]);
}

}  // namespace

status run_linear_ref(const linear_params& p, linear_form form) {
  // The bidirectional form: the quadratic form holds both directions' pair weights; the recurrences are its two scans.
  if (p.flow && form != linear_form::quadratic)  // the flows around one non-causal call of the recurrence
    return detail::run_flow_fwd(p, [form](const linear_params& x) { return run_linear_ref(x, form); });
  if (detail::bidirectional(p) && form != linear_form::quadratic)
    return detail::run_bidirectional_fwd(p, [form](const linear_params& x) { return run_linear_ref(x, form); });
  if (p.cu_seqlens) {  // varlen: every sequence a call of its own
    detail::linear_sequence seq;
    for (std::int64_t s = 0; s < p.num_seqs; ++s) {
      detail::sequence_of(p, s, seq);
      run_linear_ref(seq.p, form);
    }
    return {};
  }
  // Every head's result is computed before anything is written: final_state may be the initial_state's buffer.
  std::vector<std::vector<double>> outs, states;
  std::vector<std::vector<float>> outs_f, states_f;
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < p.heads; ++h) {
      if (form == linear_form::recurrent_f32) {
        outs_f.emplace_back();
        states_f.emplace_back();
        recurrent(p, load_head<float>(p, b, h), outs_f.back(), states_f.back());
        continue;
      }
      outs.emplace_back();
      states.emplace_back();
      const head_inputs<double> x = load_head<double>(p, b, h);
      if (form == linear_form::quadratic && p.flow) flow_quadratic(p, x, outs.back());
      else if (form == linear_form::quadratic) quadratic(p, x, outs.back(), states.back());
      else recurrent(p, x, outs.back(), states.back());
    }
  std::size_t at = 0;
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < p.heads; ++h, ++at) {
      if (form == linear_form::recurrent_f32) store(p, b, h, outs_f[at], states_f[at]);
      else store(p, b, h, outs[at], states[at]);
    }
  return {};
}

}  // namespace omniattn::ref
