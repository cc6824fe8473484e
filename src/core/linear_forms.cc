// The linear-attention forms composed of kernel calls (core/linear_params.h): a projected call (Hedgehog, Performer)
// maps q and k in a pass and runs the kernels on the features; the bidirectional form (ViG's BiGLA: non-causal with a
// decay) runs the causal call and the causal call over the reversed tokens and sums them; Flowformer's flow form
// computes its flows per (sequence, head) in double (O(T K)) around one non-causal call of q / I, k and c v, and its
// backward chains through them after the call's backward (the flow math is shared by the kernels and the oracle; the
// oracle's quadratic form computes the flows again from their definition).
//
// Math contract of the bidirectional form (include/omniattn/linear.h), per (batch, head):
//   o_i = (f_i + b_i) / (normalize ? fd_i + bd_i : 1)   (0 where the sum of the denominators is 0)
//   f = the causal call with g on [v, 1] (the column of ones only under normalize), b = the same causal call over the
//   reversed tokens with g_backward (g when unset). Its backward is the two calls' backwards, each given the value-side
//   gradient [do / den, -(do . o) / den] (normalize) or do, summed (dg gets both directions unless g_backward has its
//   own). The reversed call is a view: every [B, T, H, *] pointer moved to the last token and its seq stride negated
//   (varlen: the offsets mirrored), so nothing is copied but the f32 results the sum reads.
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/linear_params.h"
#include "core/parallel.h"
#include "core/storage.h"
#include "cpu/tiles.h"

namespace omniattn {
namespace cpu {
status run_linear_fwd(const detail::linear_params& p);
status run_linear_bwd(const detail::linear_bwd_params& p);
status map_linear_features(const detail::linear_params& p, float* qf, float* kf);
status chain_linear_features(const detail::linear_bwd_params& bp, const float* qf, const float* kf, float* dqf, float* dkf);
}  // namespace cpu

namespace detail {
namespace {

std::size_t at(std::int64_t i) { return static_cast<std::size_t>(i); }

// n zeroed floats per buffer, or false when they do not fit.
bool allocate(std::int64_t n, std::initializer_list<std::vector<float>*> buffers) {
  try {
    for (std::vector<float>* b : buffers) b->assign(at(n), 0.0f);
  } catch (const std::bad_alloc&) {
    return false;
  } catch (const std::length_error&) {
    return false;
  }
  return true;
}

// [B, T, H, w] contiguous element strides.
void contiguous(const linear_params& p, std::int64_t w, std::int64_t* st) {
  st[0] = p.seq * p.heads * w;
  st[1] = p.heads * w;
  st[2] = w;
  st[3] = 1;
}

// A [B, T, H, *] view read from its last token with its seq stride negated.
template <class Ptr>
void flip(Ptr& base, dtype t, std::int64_t* st, std::int64_t seq) {
  if (!base || seq == 0) return;
  base = static_cast<Ptr>(const_cast<void*>(advance(base, t, (seq - 1) * st[1])));
  st[1] = -st[1];
}

}  // namespace

linear_params mirrored(const linear_params& p, std::vector<std::int64_t>& offsets) {
  linear_params m = p;
  flip(m.q, m.in_type, m.q_stride, p.seq);
  flip(m.k, m.in_type, m.k_stride, p.seq);
  flip(m.v, m.v_type, m.v_stride, p.seq);
  flip(m.out, m.out_type, m.out_stride, p.seq);
  if (p.gb) {
    m.g = p.gb;
    m.g_type = p.gb_type;
    std::copy(p.gb_stride, p.gb_stride + 4, m.g_stride);
  }
  m.gb = nullptr;
  flip(m.g, m.g_type, m.g_stride, p.seq);
  if (p.cu_seqlens) {
    offsets.resize(at(p.num_seqs + 1));
    for (std::int64_t s = 0; s <= p.num_seqs; ++s) offsets[at(s)] = p.seq - p.cu_seqlens[p.num_seqs - s];
    m.cu_seqlens = offsets.data();
  }
  return m;
}

namespace {

linear_bwd_params mirrored(const linear_bwd_params& bp, std::vector<std::int64_t>& offsets) {
  linear_bwd_params m = bp;
  const std::int64_t T = bp.fwd.seq;
  m.fwd = mirrored(bp.fwd, offsets);
  flip(m.d_out, m.do_type, m.do_stride, T);
  flip(m.dq, m.dq_type, m.dq_stride, T);
  flip(m.dk, m.dk_type, m.dk_stride, T);
  flip(m.dv, m.dv_type, m.dv_stride, T);
  flip(m.dg, dtype::f32, m.dg_stride, T);
  m.dgb = nullptr;
  return m;
}

// The causal call of the forward direction, into `out` ([B, T, H, W] f32), on v or (normalize) on [v, 1] in `va`.
linear_params forward_direction(const linear_params& p, std::vector<float>& va, float* out) {
  const std::int64_t V = p.dim_v, W = V + (p.normalize ? 1 : 0);
  linear_params f = p;
  f.causal = true;
  f.prefix = 0;
  f.normalize = false;
  f.initial_state = f.final_state = nullptr;
  f.gb = nullptr;  // the reversed scan's gates: not this direction's
  if (p.normalize) {
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t t = 0; t < p.seq; ++t)
        for (std::int64_t h = 0; h < p.heads; ++h) {
          float* row = &va[at(((b * p.seq + t) * p.heads + h) * W)];
          for (std::int64_t c = 0; c < V; ++c)
            row[c] = static_cast<float>(load_element(p.v, p.v_type, b * p.v_stride[0] + t * p.v_stride[1] + h * p.v_stride[2] + c * p.v_stride[3]));
          row[V] = 1.0f;
        }
    f.v = va.data();
    f.v_type = dtype::f32;
    contiguous(p, W, f.v_stride);
    f.dim_v = W;
  }
  f.out = out;
  f.out_type = dtype::f32;
  contiguous(p, W, f.out_stride);
  return f;
}

// Both directions of the forward: f (forward_direction's, into its out) and the reversed one with p's gates into `ob`
// ([B, T, H, W] f32).
status both_directions(const linear_params& p, const linear_params& f, const linear_fwd_fn& causal_fwd, std::vector<float>& ob) {
  if (status st = causal_fwd(f); !st.ok()) return st;
  linear_params r = f;
  r.gb = p.gb;
  r.gb_type = p.gb_type;
  std::copy(p.gb_stride, p.gb_stride + 4, r.gb_stride);
  r.out = ob.data();
  std::vector<std::int64_t> offsets;
  return causal_fwd(mirrored(r, offsets));
}

void store_row(void* base, dtype type, const std::int64_t* st, std::int64_t b, std::int64_t t, std::int64_t h, const float* x, std::int64_t n) {
  cpu::store_row(base, type, b * st[0] + t * st[1] + h * st[2], st[3], n, x);
}

// body(r, scratch) for every row r of [B, T, H, *] on the call's threads, each thread with n floats of scratch: the
// sums and stores after the kernel calls, row by row (independent rows: nothing depends on the thread count).
template <class Body>
void for_rows(const linear_params& p, std::int64_t n, Body&& body) {
  const std::int64_t rows = p.batch * p.seq * p.heads;
#pragma omp parallel num_threads(p.threads)
  {
    std::vector<float> scratch(at(std::max<std::int64_t>(n, 1)));
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) body(r, scratch.data());
  }
}

status out_of_memory(const char* what) { return {std::string("[linear_attention] out of memory (") + what + ")"}; }

// A projected call: the features phi(P(q)), phi(P(k)) first (cpu/linear_map.cc), then the kernel on them.
status run_projected_fwd(const linear_params& p) {
  std::vector<float> qf, kf;
  if (!allocate(p.batch * p.seq * p.heads * p.dim_k, {&qf, &kf})) return out_of_memory("the projected features");
  if (status st = cpu::map_linear_features(p, qf.data(), kf.data()); !st.ok()) return st;
  return run_linear_forward(features_view(p, qf.data(), kf.data()));
}

// Its backward: the features again, the backward on them into their gradients, then the chain through phi and P.
status run_projected_bwd(const linear_bwd_params& bp) {
  const linear_params& p = bp.fwd;
  std::vector<float> qf, kf, dqf, dkf;
  if (!allocate(p.batch * p.seq * p.heads * p.dim_k, {&qf, &kf, &dqf, &dkf}))
    return {"[linear_attention_backward] out of memory (the projected features)"};
  if (status st = cpu::map_linear_features(p, qf.data(), kf.data()); !st.ok()) return st;
  linear_bwd_params f = bp;
  f.fwd = features_view(p, qf.data(), kf.data());
  f.dq = dqf.data();
  f.dk = dkf.data();
  f.dq_type = f.dk_type = dtype::f32;
  std::copy(f.fwd.q_stride, f.fwd.q_stride + 4, f.dq_stride);
  std::copy(f.fwd.k_stride, f.fwd.k_stride + 4, f.dk_stride);
  f.d_proj_w = f.d_proj_b = nullptr;
  if (status st = run_linear_backward(f); !st.ok()) return st;
  return cpu::chain_linear_features(bp, qf.data(), kf.data(), dqf.data(), dkf.data());
}

// ---- Flowformer's flow-conservation normalisation ----------------------------------------------------------------

// Flowformer's epsilon, added to every feature and every sum of the flows (its reference's 1e-6).
constexpr double k_flow_eps = 1e-6;

// The (sequence, head) items of a call: batch b, tokens [t0, t0 + n).
template <class Body>
void for_sequences(const linear_params& p, Body&& body) {
  for (std::int64_t s = 0; s < linear_sequences(p); ++s) {
    const std::int64_t b = p.cu_seqlens ? 0 : s, t0 = p.cu_seqlens ? p.cu_seqlens[s] : 0;
    const std::int64_t n = p.cu_seqlens ? p.cu_seqlens[s + 1] - t0 : p.seq;
    for (std::int64_t h = 0; h < p.heads; ++h) body(b, t0, n, h);
  }
}

// One (sequence, head)'s flows, in double (n tokens, K features, loaded q = scale phi(P q), k = phi(P k)):
//   I_i = (q_i + e) . (sum_j k_j + e),  O_j = (k_j + e) . (sum_i q_i + e)
//   Ihat_i = (q_i + e) . (sum_j k_j / O_j + e),  Ohat_j = (k_j + e) . (sum_i q_i / I_i + e)
//   A_i = sigmoid(Ihat_i),  c_j = n softmax_j(clamp(Ohat_j, -1, 1))
struct flow_head {
  std::int64_t n = 0, K = 0;
  std::vector<double> q, k;                  // [n][K]
  std::vector<double> sk, sq, a, bsum;       // [K]: sum k, sum q, sum k / O, sum q / I
  std::vector<double> I, O, Ih, Oh, p, c, A;  // [n]
  void compute() {
    const double e = k_flow_eps;
    sk.assign(at(K), 0.0);
    sq.assign(at(K), 0.0);
    a.assign(at(K), 0.0);
    bsum.assign(at(K), 0.0);
    I.assign(at(n), 0.0);
    O = Ih = Oh = p = c = A = I;
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t x = 0; x < K; ++x) {
        sk[at(x)] += k[at(t * K + x)];
        sq[at(x)] += q[at(t * K + x)];
      }
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t x = 0; x < K; ++x) {
        I[at(t)] += (q[at(t * K + x)] + e) * (sk[at(x)] + e);
        O[at(t)] += (k[at(t * K + x)] + e) * (sq[at(x)] + e);
      }
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t x = 0; x < K; ++x) {
        a[at(x)] += k[at(t * K + x)] / O[at(t)];
        bsum[at(x)] += q[at(t * K + x)] / I[at(t)];
      }
    double top = -std::numeric_limits<double>::infinity(), total = 0.0;
    for (std::int64_t t = 0; t < n; ++t) {
      for (std::int64_t x = 0; x < K; ++x) {
        Ih[at(t)] += (q[at(t * K + x)] + e) * (a[at(x)] + e);
        Oh[at(t)] += (k[at(t * K + x)] + e) * (bsum[at(x)] + e);
      }
      A[at(t)] = 1.0 / (1.0 + std::exp(-Ih[at(t)]));
      top = std::max(top, std::clamp(Oh[at(t)], -1.0, 1.0));
    }
    for (std::int64_t t = 0; t < n; ++t) total += p[at(t)] = std::exp(std::clamp(Oh[at(t)], -1.0, 1.0) - top);
    for (std::int64_t t = 0; t < n; ++t) {
      p[at(t)] /= total;
      c[at(t)] = static_cast<double>(n) * p[at(t)];
    }
  }
};

// Rows r of [B, T, H, *] for (b, t, h).
std::int64_t row_of(const linear_params& p, std::int64_t b, std::int64_t t, std::int64_t h) { return (b * p.seq + t) * p.heads + h; }

// Loads one (sequence, head) as the contract reads it (q scaled, both through the projection and phi), into f.
void load_flow_head(const linear_params& p, std::int64_t b, std::int64_t t0, std::int64_t n, std::int64_t h, flow_head& f,
                    std::vector<double>& v) {
  const std::int64_t K = p.dim_k, V = p.dim_v;
  f.n = n;
  f.K = K;
  f.q.assign(at(n * K), 0.0);
  f.k.assign(at(n * K), 0.0);
  v.assign(at(n * V), 0.0);
  for (std::int64_t t = 0; t < n; ++t) load_token(p, b, h, t0 + t, &f.q[at(t * K)], &f.k[at(t * K)], &v[at(t * V)]);
  f.compute();
}

// The core of the flow form: non-causal linear attention of q / I over k with values c v, on f32 [B, T, H, *] buffers
// (the identity map, scale 1, no projection: the features are the contract's already).
linear_params flow_core(const linear_params& p, const float* qf, const float* kf, const float* vf, float* out) {
  linear_params f = features_view(p, qf, kf);
  f.scale = 1.0;
  f.flow = false;
  f.causal = false;
  f.prefix = p.seq;
  f.normalize = false;
  f.initial_state = f.final_state = nullptr;
  f.v = vf;
  f.v_type = dtype::f32;
  contiguous(p, p.dim_v, f.v_stride);
  f.out = out;
  f.out_type = dtype::f32;
  contiguous(p, p.dim_v, f.out_stride);
  return f;
}

// The inputs of the core (qf = q / I, kf = k, vf = c v) for every (sequence, head), and each row's A.
status flow_inputs(const linear_params& p, std::vector<float>& qf, std::vector<float>& kf, std::vector<float>& vf, std::vector<float>& A) {
  const std::int64_t K = p.dim_k, V = p.dim_v;
  struct item {
    std::int64_t b, t0, n, h;
  };
  std::vector<item> items;  // the (sequence, head) pairs, each on one thread (they write disjoint rows)
  for_sequences(p, [&](std::int64_t b, std::int64_t t0, std::int64_t n, std::int64_t h) { items.push_back({b, t0, n, h}); });
  parallel_errors errors;  // a head's buffers that cannot be had: the call's status, not a terminate
#pragma omp parallel num_threads(p.threads)
  {
    flow_head f;
    std::vector<double> v;
#pragma omp for schedule(dynamic, 1)
    for (std::size_t x = 0; x < items.size(); ++x)
      errors.run([&] {
        const auto [b, t0, n, h] = items[x];
        load_flow_head(p, b, t0, n, h, f, v);
        for (std::int64_t t = 0; t < n; ++t) {
          const std::int64_t r = row_of(p, b, t0 + t, h);
          for (std::int64_t c = 0; c < K; ++c) {
            qf[at(r * K + c)] = static_cast<float>(f.q[at(t * K + c)] / f.I[at(t)]);
            kf[at(r * K + c)] = static_cast<float>(f.k[at(t * K + c)]);
          }
          for (std::int64_t e = 0; e < V; ++e) vf[at(r * V + e)] = static_cast<float>(f.c[at(t)] * v[at(t * V + e)]);
          A[at(r)] = static_cast<float>(f.A[at(t)]);
        }
      });
  }
  try {
    errors.rethrow();
  } catch (const std::bad_alloc&) {
    return {"[linear_attention] out of memory (the flow form's heads)"};
  } catch (const std::exception& e) {
    return {std::string("[linear_attention] ") + e.what()};
  }
  return {};
}

// The raw inputs' gradients of one token from those of the loaded features gq = dL/d(scale phi(P q)), gk = dL/d phi(P k)
// (K values in, dim_in values out, in place: both hold max(K, dim_in)): through scale, phi and the projection (whose
// gradients add to dW, db).
void flow_to_raw(const linear_params& p, std::int64_t b, std::int64_t t, std::int64_t h, std::vector<double>& gq, std::vector<double>& gk,
                 std::vector<double>& dW, std::vector<double>& db, bool want_w, bool want_b, std::vector<double>& xq, std::vector<double>& xk) {
  const std::int64_t K = p.dim_k, Kin = p.dim_in;
  xq.assign(at(std::max(K, Kin)), 0.0);
  xk = xq;
  load_raw_qk(p, b, h, t, xq.data(), xk.data());
  for (std::int64_t x = 0; x < K; ++x) gq[at(x)] *= p.scale;
  std::vector<double> u(at(K)), y(at(K)), dx(at(Kin));
  features_to_raw(p, h, xq.data(), gq.data(), u.data(), y.data(), dx.data(), want_w ? dW.data() : nullptr, want_b ? db.data() : nullptr);
  features_to_raw(p, h, xk.data(), gk.data(), u.data(), y.data(), dx.data(), want_w ? dW.data() : nullptr, want_b ? db.data() : nullptr);
}

}  // namespace


status run_flow_fwd(const linear_params& p, const linear_fwd_fn& core_fwd) {
  const std::int64_t K = p.dim_k, V = p.dim_v, rows = p.batch * p.seq * p.heads;
  std::vector<float> qf, kf, vf, A, out;
  if (!allocate(rows * K, {&qf, &kf}) || !allocate(rows * V, {&vf, &out}) || !allocate(rows, {&A})) return out_of_memory("the flow form");
  if (status st = flow_inputs(p, qf, kf, vf, A); !st.ok()) return st;
  if (status st = core_fwd(flow_core(p, qf.data(), kf.data(), vf.data(), out.data())); !st.ok()) return st;
  for_rows(p, V, [&](std::int64_t r, float* row) {
    for (std::int64_t x = 0; x < V; ++x) row[x] = A[at(r)] * out[at(r * V + x)];
    store_row(p.out, p.out_type, p.out_stride, r / p.heads / p.seq, r / p.heads % p.seq, r % p.heads, row, V);
  });
  return {};
}

// The chain rule of the flow form, per (sequence, head), given the core's gradients (dq', dk', dv' of q / I, k, c v):
//   u_i = the core's row, dA_i = do_i . u_i, dIhat_i = dA_i A_i (1 - A_i), dv_j = c_j dv'_j, dc_j = dv'_j . v_j,
//   dOhat_j = c_j (dc_j - sum_l p_l dc_l) where |Ohat_j| <= 1 (the clamp passes nothing outside), and then back through
//   Ohat (k, sum q / I), q / I, Ihat (q, sum k / O), I (q, sum k) and O (k, sum q).
status run_flow_bwd(const linear_bwd_params& bp, const linear_fwd_fn& core_fwd, const linear_bwd_fn& core_bwd) {
  const linear_params& p = bp.fwd;
  const std::int64_t K = p.dim_k, V = p.dim_v, rows = p.batch * p.seq * p.heads;
  std::vector<float> qf, kf, vf, A, u, du, dq1, dk1, dv1;
  if (!allocate(rows * K, {&qf, &kf, &dq1, &dk1}) || !allocate(rows * V, {&vf, &u, &du, &dv1}) || !allocate(rows, {&A}))
    return {"[linear_attention_backward] out of memory (the flow form)"};
  if (status st = flow_inputs(p, qf, kf, vf, A); !st.ok()) return st;
  const linear_params core = flow_core(p, qf.data(), kf.data(), vf.data(), u.data());
  if (status st = core_fwd(core); !st.ok()) return st;
  std::vector<double> dA(at(rows));
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t b = r / p.heads / p.seq, t = r / p.heads % p.seq, h = r % p.heads;
    double d = 0.0;
    for (std::int64_t x = 0; x < V; ++x) {
      const double g = load_element(bp.d_out, bp.do_type, b * bp.do_stride[0] + t * bp.do_stride[1] + h * bp.do_stride[2] + x * bp.do_stride[3]);
      du[at(r * V + x)] = static_cast<float>(A[at(r)] * g);
      d += g * u[at(r * V + x)];
    }
    dA[at(r)] = d;
  }
  linear_bwd_params cb = bp;
  cb.fwd = core;
  cb.d_out = du.data();
  cb.do_type = dtype::f32;
  contiguous(p, V, cb.do_stride);
  cb.dq = dq1.data();
  cb.dk = dk1.data();
  cb.dv = dv1.data();
  cb.dq_type = cb.dk_type = cb.dv_type = dtype::f32;
  contiguous(p, K, cb.dq_stride);
  contiguous(p, K, cb.dk_stride);
  contiguous(p, V, cb.dv_stride);
  cb.dg = cb.dgb = nullptr;
  cb.d_head_log_decay = nullptr;
  cb.d_initial_state = cb.d_final_state = nullptr;
  cb.d_proj_w = cb.d_proj_b = nullptr;
  if (status st = core_bwd(cb); !st.ok()) return st;
  const double e = k_flow_eps;
  const std::int64_t Kin = p.dim_in;
  std::vector<double> dW(at(p.proj_heads * Kin * K), 0.0), db(at(p.proj_heads * K), 0.0), xq, xk;
  flow_head f;
  std::vector<double> v;
  for_sequences(p, [&](std::int64_t b, std::int64_t t0, std::int64_t n, std::int64_t h) {
    if (n == 0) return;
    load_flow_head(p, b, t0, n, h, f, v);
    const auto r_of = [&](std::int64_t t) { return row_of(p, b, t0 + t, h); };
    std::vector<double> dq(at(n * K), 0.0), dk(at(n * K), 0.0), dI(at(n), 0.0), dO(at(n), 0.0), dOh(at(n), 0.0);
    std::vector<double> dbsum(at(K), 0.0), da(at(K), 0.0), dsk(at(K), 0.0), dsq(at(K), 0.0);
    double pdc = 0.0;
    std::vector<double> dc(at(n));
    for (std::int64_t j = 0; j < n; ++j) {  // values: v' = c v
      double s = 0.0;
      for (std::int64_t x = 0; x < V; ++x) s += static_cast<double>(dv1[at(r_of(j) * V + x)]) * v[at(j * V + x)];
      dc[at(j)] = s;
      pdc += f.p[at(j)] * s;
    }
    for (std::int64_t j = 0; j < n; ++j) {  // the competition's softmax and clamp, then Ohat = (k + e) . (bsum + e)
      const double oh = f.Oh[at(j)];
      dOh[at(j)] = oh >= -1.0 && oh <= 1.0 ? f.c[at(j)] * (dc[at(j)] - pdc) : 0.0;
      for (std::int64_t x = 0; x < K; ++x) {
        dk[at(j * K + x)] = static_cast<double>(dk1[at(r_of(j) * K + x)]) + dOh[at(j)] * (f.bsum[at(x)] + e);
        dbsum[at(x)] += dOh[at(j)] * (f.k[at(j * K + x)] + e);
      }
    }
    for (std::int64_t i = 0; i < n; ++i) {  // q' = q / I, bsum = sum q / I, Ihat = (q + e) . (a + e), A = sigmoid(Ihat)
      const double Ii = f.I[at(i)], dIh = dA[at(r_of(i))] * f.A[at(i)] * (1.0 - f.A[at(i)]);
      double dIi = 0.0;
      for (std::int64_t x = 0; x < K; ++x) {
        const double qx = f.q[at(i * K + x)], g = static_cast<double>(dq1[at(r_of(i) * K + x)]) + dbsum[at(x)];
        dq[at(i * K + x)] = g / Ii + dIh * (f.a[at(x)] + e);
        dIi -= g * qx / (Ii * Ii);
        da[at(x)] += dIh * (qx + e);
      }
      dI[at(i)] = dIi;
    }
    for (std::int64_t j = 0; j < n; ++j) {  // a = sum k / O
      const double Oj = f.O[at(j)];
      double dOj = 0.0;
      for (std::int64_t x = 0; x < K; ++x) {
        dk[at(j * K + x)] += da[at(x)] / Oj;
        dOj -= da[at(x)] * f.k[at(j * K + x)] / (Oj * Oj);
      }
      dO[at(j)] = dOj;
    }
    for (std::int64_t t = 0; t < n; ++t)  // I = (q + e) . (sk + e), O = (k + e) . (sq + e)
      for (std::int64_t x = 0; x < K; ++x) {
        dq[at(t * K + x)] += dI[at(t)] * (f.sk[at(x)] + e);
        dsk[at(x)] += dI[at(t)] * (f.q[at(t * K + x)] + e);
        dk[at(t * K + x)] += dO[at(t)] * (f.sq[at(x)] + e);
        dsq[at(x)] += dO[at(t)] * (f.k[at(t * K + x)] + e);
      }
    std::vector<double> gq(at(std::max(K, Kin))), gk(gq.size());
    for (std::int64_t t = 0; t < n; ++t) {  // sk = sum k, sq = sum q; then to the raw inputs
      for (std::int64_t x = 0; x < K; ++x) {
        gq[at(x)] = dq[at(t * K + x)] + dsq[at(x)];
        gk[at(x)] = dk[at(t * K + x)] + dsk[at(x)];
      }
      flow_to_raw(p, b, t0 + t, h, gq, gk, dW, db, bp.d_proj_w != nullptr, bp.d_proj_b != nullptr, xq, xk);
      const std::int64_t T = t0 + t;
      for (std::int64_t x = 0; x < Kin; ++x) {
        store_element(bp.dq, bp.dq_type, b * bp.dq_stride[0] + T * bp.dq_stride[1] + h * bp.dq_stride[2] + x * bp.dq_stride[3], gq[at(x)]);
        store_element(bp.dk, bp.dk_type, b * bp.dk_stride[0] + T * bp.dk_stride[1] + h * bp.dk_stride[2] + x * bp.dk_stride[3], gk[at(x)]);
      }
      for (std::int64_t x = 0; x < V; ++x)
        store_element(bp.dv, bp.dv_type, b * bp.dv_stride[0] + T * bp.dv_stride[1] + h * bp.dv_stride[2] + x * bp.dv_stride[3],
                      f.c[at(t)] * static_cast<double>(dv1[at(r_of(t) * V + x)]));
    }
  });
  if (bp.d_proj_w)
    for (std::size_t i = 0; i < dW.size(); ++i) bp.d_proj_w[i] = static_cast<float>(dW[i]);
  if (bp.d_proj_b)
    for (std::size_t i = 0; i < db.size(); ++i) bp.d_proj_b[i] = static_cast<float>(db[i]);
  return {};
}

status run_bidirectional_fwd(const linear_params& p, const linear_fwd_fn& causal_fwd) {
  const std::int64_t V = p.dim_v, W = V + (p.normalize ? 1 : 0), rows = p.batch * p.seq * p.heads;
  std::vector<float> va, of, ob;
  if (!allocate(rows * W, {&of, &ob}) || (p.normalize && !allocate(rows * W, {&va}))) return out_of_memory("the bidirectional form's sums");
  if (status st = both_directions(p, forward_direction(p, va, of.data()), causal_fwd, ob); !st.ok()) return st;
  for_rows(p, V, [&](std::int64_t r, float* row) {
    const float *f = &of[at(r * W)], *b = &ob[at(r * W)];
    const float den = p.normalize ? f[V] + b[V] : 1.0f;
    for (std::int64_t c = 0; c < V; ++c) row[c] = den == 0.0f ? 0.0f : (f[c] + b[c]) / den;
    store_row(p.out, p.out_type, p.out_stride, r / p.heads / p.seq, r / p.heads % p.seq, r % p.heads, row, V);
  });
  return {};
}

status run_bidirectional_bwd(const linear_bwd_params& bp, const linear_fwd_fn& causal_fwd, const linear_bwd_fn& causal_bwd) {
  const linear_params& p = bp.fwd;
  const std::int64_t V = p.dim_v, W = V + (p.normalize ? 1 : 0), K = p.dim_in, rows = p.batch * p.seq * p.heads;
  const std::int64_t nb = p.decay == linear_decay::channel ? p.dim_k : 1;
  const bool want_dg = bp.dg || bp.dgb;
  std::vector<float> va, of, ob, d_out, dq[2], dk[2], dv[2], dg[2], dh[2];
  if (!allocate(rows * K, {&dq[0], &dq[1], &dk[0], &dk[1]}) || !allocate(rows * W, {&dv[0], &dv[1]}) ||
      !allocate(want_dg ? rows * nb : 0, {&dg[0], &dg[1]}) || !allocate(p.heads, {&dh[0], &dh[1]}) ||
      (p.normalize && !allocate(rows * W, {&va, &of, &ob, &d_out})))
    return {"[linear_attention_backward] out of memory (the bidirectional form's sums)"};
  linear_bwd_params f = bp;
  f.fwd = forward_direction(p, va, of.data());
  if (p.normalize) {  // o and the denominators of both directions, then the value-side gradient of [v, 1]
    if (status st = both_directions(p, f.fwd, causal_fwd, ob); !st.ok()) return st;
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t b = r / p.heads / p.seq, t = r / p.heads % p.seq, h = r % p.heads;
      const float *nf = &of[at(r * W)], *nr = &ob[at(r * W)];
      const float den = nf[V] + nr[V];
      float* w = &d_out[at(r * W)];
      if (den == 0.0f) continue;  // the forward wrote 0 whatever the inputs
      float dot = 0.0f;
      for (std::int64_t c = 0; c < V; ++c) {
        const auto g = static_cast<float>(load_element(bp.d_out, bp.do_type, b * bp.do_stride[0] + t * bp.do_stride[1] + h * bp.do_stride[2] + c * bp.do_stride[3]));
        w[c] = g / den;
        dot += g * (nf[c] + nr[c]) / den;
      }
      w[V] = -dot / den;
    }
    f.d_out = d_out.data();
    f.do_type = dtype::f32;
    contiguous(p, W, f.do_stride);
  }
  f.d_initial_state = f.d_final_state = nullptr;
  f.dgb = nullptr;
  // The oracle's projected calls give the projection's gradients per direction ([x][direction]: weight, bias).
  std::vector<float> dproj[2][2];
  const std::int64_t proj_sizes[2] = {p.proj_heads * p.dim_in * p.dim_k, p.proj_heads * p.dim_k};
  for (int x = 0; x < 2; ++x)
    if ((x == 0 ? bp.d_proj_w : bp.d_proj_b) && !allocate(proj_sizes[x], {&dproj[x][0], &dproj[x][1]}))
      return {"[linear_attention_backward] out of memory (the bidirectional form's sums)"};
  linear_bwd_params dirs[2] = {f, f};
  dirs[1].fwd.gb = p.gb;
  dirs[1].fwd.gb_type = p.gb_type;
  std::copy(p.gb_stride, p.gb_stride + 4, dirs[1].fwd.gb_stride);
  std::vector<std::int64_t> offsets;
  for (int d = 0; d < 2; ++d) {
    linear_bwd_params& x = dirs[d];
    x.dq = dq[d].data();
    x.dk = dk[d].data();
    x.dv = dv[d].data();
    x.dq_type = x.dk_type = x.dv_type = dtype::f32;
    contiguous(p, K, x.dq_stride);
    contiguous(p, K, x.dk_stride);
    contiguous(p, W, x.dv_stride);
    x.dg = want_dg ? dg[d].data() : nullptr;
    contiguous(p, nb, x.dg_stride);
    x.d_head_log_decay = bp.d_head_log_decay ? dh[d].data() : nullptr;
    x.d_proj_w = bp.d_proj_w ? dproj[0][d].data() : nullptr;
    x.d_proj_b = bp.d_proj_b ? dproj[1][d].data() : nullptr;
    if (status st = causal_bwd(d == 0 ? x : mirrored(x, offsets)); !st.ok()) return st;
  }
  // Rows of the sum of `parts` ([B, T, H, width] f32 each, the first n columns) into a [B, T, H, n] view.
  const auto store = [&](std::initializer_list<const std::vector<float>*> parts, std::int64_t width, std::int64_t n, void* base, dtype type,
                         const std::int64_t* st) {
    for_rows(p, n, [&](std::int64_t r, float* sum) {
      std::fill(sum, sum + n, 0.0f);
      for (const std::vector<float>* x : parts)
        for (std::int64_t c = 0; c < n; ++c) sum[c] += (*x)[at(r * width + c)];
      store_row(base, type, st, r / p.heads / p.seq, r / p.heads % p.seq, r % p.heads, sum, n);
    });
  };
  store({&dq[0], &dq[1]}, K, K, bp.dq, bp.dq_type, bp.dq_stride);
  store({&dk[0], &dk[1]}, K, K, bp.dk, bp.dk_type, bp.dk_stride);
  store({&dv[0], &dv[1]}, W, V, bp.dv, bp.dv_type, bp.dv_stride);
  if (p.gb) {  // each direction its own decay: dg is the forward scan's alone, dg_backward the reversed one's
    if (bp.dg) store({&dg[0]}, nb, nb, bp.dg, dtype::f32, bp.dg_stride);
    if (bp.dgb) store({&dg[1]}, nb, nb, bp.dgb, dtype::f32, bp.dgb_stride);
  } else if (bp.dg) {
    store({&dg[0], &dg[1]}, nb, nb, bp.dg, dtype::f32, bp.dg_stride);
  }
  for (int x = 0; x < 2; ++x) {  // the oracle's projection gradients (the kernels project outside this form)
    float* total = x == 0 ? bp.d_proj_w : bp.d_proj_b;
    if (!total) continue;
    for (std::size_t i = 0; i < dproj[x][0].size(); ++i) total[i] = dproj[x][0][i] + dproj[x][1][i];
  }
  if (bp.d_head_log_decay)
    for (std::int64_t h = 0; h < p.heads; ++h) bp.d_head_log_decay[h] = dh[0][at(h)] + dh[1][at(h)];
  return {};
}

status run_linear_forward(const linear_params& p) {
  if (p.proj_w) return run_projected_fwd(p);
  if (p.flow) return run_flow_fwd(p, [](const linear_params& x) { return cpu::run_linear_fwd(x); });
  if (bidirectional(p)) return run_bidirectional_fwd(p, [](const linear_params& x) { return cpu::run_linear_fwd(x); });
  return cpu::run_linear_fwd(p);
}

status run_linear_backward(const linear_bwd_params& p) {
  if (p.fwd.proj_w) return run_projected_bwd(p);
  if (p.fwd.flow)
    return run_flow_bwd(p, [](const linear_params& x) { return cpu::run_linear_fwd(x); },
                        [](const linear_bwd_params& x) { return cpu::run_linear_bwd(x); });
  if (bidirectional(p.fwd))
    return run_bidirectional_bwd(p, [](const linear_params& x) { return cpu::run_linear_fwd(x); },
                                 [](const linear_bwd_params& x) { return cpu::run_linear_bwd(x); });
  return cpu::run_linear_bwd(p);
}

}  // namespace detail
}  // namespace omniattn
