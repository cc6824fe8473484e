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
// Two implementations of this contract: the tiled one (below: the passes as GEMMs on the tile engine's micro-kernels,
// with the forward's factorisation exp(B_i - B_j) = E_i / E_j), and the row one (first: row operations, every pair
// weight an exp(B_i - B_j) <= 1), which runs a head whose decay spans more than the factorisation's range in a chunk.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <cmath>
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
#define HWY_TARGET_INCLUDE "cpu/linear_bwd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/aligned_allocator.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

#include "cpu/row_ops-inl.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/linear_tiles-inl.h"

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
  map_features(c.p.phi, s.y.data(), c.K);
  detail::feature_map_backward(c.p.phi, x, s.y.data(), g, c.K);
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
    store_row(c.bp.dq, c.bp.dq_type, c.b * c.bp.dq_stride[0] + (t0 + i) * c.bp.dq_stride[1] + c.h * c.bp.dq_stride[2], c.bp.dq_stride[3], K, dqi);
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
    store_row(c.bp.dk, c.bp.dk_type, c.b * c.bp.dk_stride[0] + t * c.bp.dk_stride[1] + c.h * c.bp.dk_stride[2], c.bp.dk_stride[3], K, dkj);
    store_row(c.bp.dv, c.bp.dv_type, c.b * c.bp.dv_stride[0] + t * c.bp.dv_stride[1] + c.h * c.bp.dv_stride[2], c.bp.dv_stride[3], V, &s.dv[at(j * W)]);
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

// ---------------------------------------------------------------------------------------------------------------
// The tiled path: the same two passes as GEMMs on the tile engine's micro-kernels (qk_block / pv_block), with the
// forward's factorisation exp(B_i - B_j) = E_i / E_j (E = exp of the running log decay, in double, rounded once):
//   pass 1:  P = mask(W V^T);  X = W S^T + P (K / E);  dq = E X   (and q dq = (q E) X for dg);  S advanced
//   pass 2:  A = mask((Q E)(K / E)^T);  dk = (P^T (Q E)) / E + (V D^T) E_last / E;  dv = A^T W + (K E_last / E) D;
//            D <- diag(E_last) D + (Q E)^T W
// with W the value-side gradient rows. It runs when every chunk's decay spans at most k_linear_max_span (else the row path
// above, whose weights are exp(B_i - B_j) <= 1 pair by pair).


// One worker's padded tiles: K and W columns to whole 64-wide key blocks (they are the column count of qk_block
// products too), chunk rows to 64.
struct bwd_tiles {
  std::int64_t K = 0, V = 0, W = 0, Kp = 0, Wp = 0, Cp = 0, nb = 1;
  // [Cp][Kp]: qd = q E, kf = k / E, kl = k E_last / E, x, y (dq / dk parts); [Kp][Cp]: kft = kf^T; [Cp][Wp]: vc, wc, dv, o;
  // [Wp][Cp]: vt = vc^T; [Cp][Cp]: a, pm; [Kp][Wp]: s, d; [Wp][Kp]: st = s^T, dt = d^T
  hwy::AlignedFreeUniquePtr<float[]> qd, kf, kl, x, y, kft, vc, wc, dv, o, vt, a, pm, s, d, st, dt;
  std::vector<double> B, E;
  std::vector<float> ef, e_last, w_all, qdq, raw_q, raw_k, y_map;
  std::vector<double> run;
  std::vector<const float*> seg;
  double fixed = 0.0;
  void ensure(const linear_params& p) {
    const std::int64_t w = p.dim_v + (p.normalize ? 1 : 0), cp = round_up(p.chunk, 64), bn = p.decay == linear_decay::channel ? p.dim_k : 1;
    if (K == p.dim_k && W == w && Cp == cp && nb == bn) return;
    K = p.dim_k;
    V = p.dim_v;
    W = w;
    Cp = cp;
    nb = bn;
    Kp = round_up(K, 64);
    Wp = round_up(W, 64);
    for (auto* m : {&qd, &kf, &kl, &x, &y}) *m = aligned_zeros(Cp * Kp);
    kft = aligned_zeros(Kp * Cp);
    for (auto* m : {&vc, &wc, &dv, &o}) *m = aligned_zeros(Cp * Wp);
    vt = aligned_zeros(Wp * Cp);
    a = aligned_zeros(Cp * Cp);
    pm = aligned_zeros(Cp * Cp);
    s = aligned_zeros(Kp * Wp);
    d = aligned_zeros(Kp * Wp);
    st = aligned_zeros(Wp * Kp);
    dt = aligned_zeros(Wp * Kp);
    B.assign(at(Cp * nb), 0.0);
    E.assign(at(Cp * nb), 1.0);
    ef.assign(at(Cp * nb), 1.0f);
    e_last.assign(at(Kp), 1.0f);
    raw_q.resize(at(K));
    raw_k.resize(at(K));
    y_map.resize(at(std::max(K, V)));
    seg.resize(at(std::max(Cp, Kp) / 16 + 1));
  }
};

// out[i][0 .. ncols) = sum_e A[i][e] Bt[e][..] for rows [0, n), key blocks below limit(r0, rows) only.
template <class Limit>
void gemm_abt(std::int64_t n, const float* A, std::int64_t a_ld, std::int64_t dim, const float* Bt, std::int64_t b_ld, std::int64_t ncols,
              float* out, std::int64_t out_ld, Limit&& limit) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const std::int64_t kblock = static_cast<std::int64_t>(k_nv) * L;
  for (std::int64_t r0 = 0; r0 < n; r0 += static_cast<std::int64_t>(k_mr)) {
    const std::int64_t rows = std::min<std::int64_t>(static_cast<std::int64_t>(k_mr), n - r0);
    const std::int64_t end = std::min(ncols, limit(r0, rows));
    for (std::int64_t j0 = 0; j0 < end; j0 += kblock) {
      const float* kb[k_nv];
      for (std::size_t v = 0; v < k_nv; ++v) kb[v] = Bt + j0 + static_cast<std::int64_t>(v) * L;
      with_rows(rows, [&](auto R) { qk_block<decltype(R)::value>(d, A + r0 * a_ld, a_ld, dim, kb, b_ld, out + r0 * out_ld + j0, out_ld); });
    }
  }
}

// out[i][0 .. ncol) += sum_{j in keys(r0, rows)} P(i, j) V[j][..], P(i, j) = pr[i p_rs + j p_cs]; alpha (per row) scales
// out first.
template <class Keys>
void gemm_pv(std::int64_t n, const float* pr, std::int64_t p_rs, std::int64_t p_cs, const float* Vm, std::int64_t v_ld, std::int64_t ncol,
             const float* alpha, float* out, std::int64_t out_ld, std::vector<const float*>& seg, Keys&& keys) {
  const hn::ScalableTag<float> d;
  for (std::int64_t r0 = 0; r0 < n; r0 += static_cast<std::int64_t>(k_mr)) {
    const std::int64_t rows = std::min<std::int64_t>(static_cast<std::int64_t>(k_mr), n - r0);
    const std::pair<std::int64_t, std::int64_t> range = keys(r0, rows);
    const std::int64_t k0 = range.first, k1 = range.second;  // named copies: a lambda may not capture structured bindings (clang)
    if (k1 <= k0 && !alpha) continue;
    for (std::int64_t x = 0; x * 16 < std::max<std::int64_t>(k1 - k0, 0); ++x) seg[at(x)] = Vm + (k0 + 16 * x) * v_ld;
    with_rows(rows, [&](auto R) {
      pv_rows<decltype(R)::value>(d, pr + r0 * p_rs + k0 * p_cs, p_rs, p_cs, std::max<std::int64_t>(k1 - k0, 0), seg.data(), v_ld, ncol,
                                  alpha ? alpha + r0 : nullptr, out + r0 * out_ld, out_ld);
    });
  }
}

// dst[c][r] = src[r][c] for r < rows, c < cols (the rest of dst is left as it is: zero padding).
void transpose(const float* src, std::int64_t src_ld, std::int64_t rows, std::int64_t cols, float* dst, std::int64_t dst_ld) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
}

// The log decays of chunk [t0, t0 + n) into B (running, double) and E = exp(B) (double, and float in ef).
void chunk_decays(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, bwd_tiles& w) {
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t c = 0; c < w.nb; ++c)
      w.B[at(i * w.nb + c)] = (i > 0 ? w.B[at((i - 1) * w.nb + c)] : 0.0) + detail::log_decay(p, b, h, t0 + i, c);
  exp_doubles(w.B.data(), w.E.data(), n * w.nb);
  for (std::int64_t x = 0; x < n * w.nb; ++x) w.ef[at(x)] = static_cast<float>(w.E[at(x)]);
  const float* El = &w.ef[at((n - 1) * w.nb)];
  for (std::int64_t c = 0; c < w.K; ++c) w.e_last[at(c)] = El[w.nb > 1 ? c : 0];
}

// Chunk [t0, t0 + n): qd = q E, kf = k / E, kl = k E_last / E (no decay: q, k, k), kft = kf^T, vc (with the column of
// ones), vt = vc^T, and the rows past n cleared.
void load_tiles(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, bwd_tiles& w, bool decayed) {
  const std::int64_t K = w.K, V = w.V, nb = w.nb;
  if (decayed) chunk_decays(p, b, h, t0, n, w);
  for (std::int64_t i = 0; i < w.Cp; ++i) {
    float* qi = w.qd.get() + i * w.Kp;
    float* ki = w.kf.get() + i * w.Kp;
    float* li = w.kl.get() + i * w.Kp;
    float* vi = w.vc.get() + i * w.Wp;
    if (i >= n) {
      std::fill(qi, qi + K, 0.0f);
      std::fill(ki, ki + K, 0.0f);
      std::fill(li, li + K, 0.0f);
      std::fill(vi, vi + w.W, 0.0f);
      continue;
    }
    const std::int64_t t = t0 + i;
    load_row(p.q, p.in_type, b * p.q_stride[0] + t * p.q_stride[1] + h * p.q_stride[2], p.q_stride[3], K, qi);
    load_row(p.k, p.in_type, b * p.k_stride[0] + t * p.k_stride[1] + h * p.k_stride[2], p.k_stride[3], K, ki);
    load_row(p.v, p.v_type, b * p.v_stride[0] + t * p.v_stride[1] + h * p.v_stride[2], p.v_stride[3], V, vi);
    map_features(p.phi, qi, K);
    map_features(p.phi, ki, K);
    scale_row(static_cast<float>(p.scale), qi, K);
    if (w.W > V) vi[V] = 1.0f;
    if (!decayed) {
      std::copy(ki, ki + K, li);
      continue;
    }
    const float* Ei = &w.ef[at(i * nb)];
    for (std::int64_t c = 0; c < K; ++c) {
      const float e = Ei[nb > 1 ? c : 0];
      qi[c] *= e;
      li[c] = ki[c] * (w.e_last[at(c)] / e);
      ki[c] /= e;
    }
  }
  transpose(w.kf.get(), w.Kp, w.Cp, K, w.kft.get(), w.Cp);
  transpose(w.vc.get(), w.Wp, w.Cp, w.W, w.vt.get(), w.Cp);
}

// W rows of chunk [t0, t0 + n): d_out (rows past n cleared), or under normalize the saved [do / den, -(do . o) / den^2].
void load_w(const linear_bwd_params& bp, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, bwd_tiles& w, bool saved) {
  for (std::int64_t i = 0; i < w.Cp; ++i) {
    float* wi = w.wc.get() + i * w.Wp;
    if (i >= n) {
      std::fill(wi, wi + w.W, 0.0f);
    } else if (saved) {
      std::copy_n(w.w_all.begin() + (t0 + i) * w.W, w.W, wi);
    } else {
      load_row(bp.d_out, bp.do_type, b * bp.do_stride[0] + (t0 + i) * bp.do_stride[1] + h * bp.do_stride[2], bp.do_stride[3], w.V, wi);
    }
  }
}

const auto k_causal = [](std::int64_t r0, std::int64_t rows) { return r0 + rows; };
const auto k_all = [](std::int64_t, std::int64_t) { return std::numeric_limits<std::int64_t>::max(); };

// normalize, pass 1: the forward's rows (num, den = num[V]) from S and the chunk, then w = [do / den, -(do . num) / den^2],
// saved for pass 2.
void normalize_w(std::int64_t t0, std::int64_t n, bwd_tiles& w, bool intra) {
  std::fill(w.o.get(), w.o.get() + n * w.Wp, 0.0f);
  gemm_pv(n, w.qd.get(), w.Kp, 1, w.s.get(), w.Wp, w.Wp, nullptr, w.o.get(), w.Wp, w.seg,
          [&](std::int64_t, std::int64_t) { return std::pair<std::int64_t, std::int64_t>{0, w.K}; });
  if (intra) {
    gemm_abt(n, w.qd.get(), w.Kp, w.K, w.kft.get(), w.Cp, w.Cp, w.a.get(), w.Cp, k_causal);
    for (std::int64_t i = 0; i < n; ++i) std::fill(w.a.get() + i * w.Cp + i + 1, w.a.get() + (i + 1) * w.Cp, 0.0f);
    gemm_pv(n, w.a.get(), w.Cp, 1, w.vc.get(), w.Wp, w.Wp, nullptr, w.o.get(), w.Wp, w.seg,
            [](std::int64_t r0, std::int64_t rows) { return std::pair<std::int64_t, std::int64_t>{0, r0 + rows}; });
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const float* num = w.o.get() + i * w.Wp;
    float* wi = w.wc.get() + i * w.Wp;
    const float den = num[w.V];
    if (den == 0.0f) {
      std::fill(wi, wi + w.W, 0.0f);
    } else {
      const float dotp = dot(wi, num, w.V);
      scale_row(1.0f / den, wi, w.V);
      wi[w.V] = -dotp / (den * den);
    }
    std::copy_n(wi, w.W, w.w_all.begin() + (t0 + i) * w.W);
  }
}

void store_grad(void* base, dtype type, const std::int64_t* st, std::int64_t b, std::int64_t t, std::int64_t h, const float* g, std::int64_t n) {
  store_row(base, type, b * st[0] + t * st[1] + h * st[2], st[3], n, g);
}

// The raw input's gradient from the loaded feature's (g, K values, in place): scale (q), then phi's rule.
void features_to_raw(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t, float* g, bool is_q, bwd_tiles& w) {
  if (is_q) scale_row(static_cast<float>(p.scale), g, w.K);
  if (p.phi == feature_map::identity) return;
  detail::load_raw_qk(p, b, h, t, w.raw_q.data(), w.raw_k.data());
  const float* x = is_q ? w.raw_q.data() : w.raw_k.data();
  std::copy(x, x + w.K, w.y_map.begin());
  map_features(p.phi, w.y_map.data(), w.K);
  detail::feature_map_backward(p.phi, x, w.y_map.data(), g, w.K);
}

// Pass 1 for one chunk against the state (st = S^T): dq of its rows (intra: the chunk's own pairs too).
void tiles_dq(const linear_bwd_params& bp, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, bwd_tiles& w, bool intra,
              bool want_dg) {
  const linear_params& p = bp.fwd;
  const std::int64_t K = w.K, nb = w.nb;
  load_w(bp, b, h, t0, n, w, false);
  if (p.normalize) normalize_w(t0, n, w, intra);
  gemm_abt(n, w.wc.get(), w.Wp, w.W, w.st.get(), w.Kp, w.Kp, w.x.get(), w.Kp, k_all);  // W S^T
  if (intra) {
    gemm_abt(n, w.wc.get(), w.Wp, w.W, w.vt.get(), w.Cp, w.Cp, w.pm.get(), w.Cp, k_causal);  // P = W V^T
    for (std::int64_t i = 0; i < n; ++i) std::fill(w.pm.get() + i * w.Cp + i + 1, w.pm.get() + (i + 1) * w.Cp, 0.0f);
    gemm_pv(n, w.pm.get(), w.Cp, 1, w.kf.get(), w.Kp, w.Kp, nullptr, w.x.get(), w.Kp, w.seg,
            [](std::int64_t r0, std::int64_t rows) { return std::pair<std::int64_t, std::int64_t>{0, r0 + rows}; });
  }
  const bool decayed = intra && p.decay != linear_decay::none;
  for (std::int64_t i = 0; i < n; ++i) {
    float* xi = w.x.get() + i * w.Kp;
    const float* qi = w.qd.get() + i * w.Kp;
    if (want_dg)
      for (std::int64_t e = 0; e < nb; ++e) w.qdq[at((t0 + i) * nb + e)] = nb > 1 ? qi[e] * xi[e] : dot(qi, xi, K);
    if (decayed) {
      const float* Ei = &w.ef[at(i * nb)];
      for (std::int64_t c = 0; c < K; ++c) xi[c] *= Ei[nb > 1 ? c : 0];
    }
    features_to_raw(p, b, h, t0 + i, xi, true, w);
    store_grad(bp.dq, bp.dq_type, bp.dq_stride, b, t0 + i, h, xi, K);
  }
}

// S <- diag(e_last) S + kl^T vc (decayed) or S + kl^T vc, then st = S^T.
void tiles_state(std::int64_t n, bwd_tiles& w, bool decayed) {
  gemm_pv(w.K, w.kl.get(), 1, w.Kp, w.vc.get(), w.Wp, w.Wp, decayed ? w.e_last.data() : nullptr, w.s.get(), w.Wp, w.seg,
          [&](std::int64_t, std::int64_t) { return std::pair<std::int64_t, std::int64_t>{0, n}; });
}

// Pass 2 for one chunk against D (dL/dS after it; dt = D^T): dk, dv of its keys, then D moved before the chunk
// (intra); the prefix's keys (!intra) all read D of the whole prefix.
void tiles_dkdv(const linear_bwd_params& bp, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, bwd_tiles& w, bool intra,
                bool want_dg) {
  const linear_params& p = bp.fwd;
  const std::int64_t K = w.K, nb = w.nb;
  load_w(bp, b, h, t0, n, w, p.normalize);
  const auto upper = [n](std::int64_t r0, std::int64_t) { return std::pair<std::int64_t, std::int64_t>{r0, n}; };
  // dk: Z = V D^T into y; intra, X = P^T (Q E) into x.
  gemm_abt(n, w.vc.get(), w.Wp, w.W, w.dt.get(), w.Kp, w.Kp, w.y.get(), w.Kp, k_all);
  std::fill(w.dv.get(), w.dv.get() + n * w.Wp, 0.0f);
  gemm_pv(n, w.kl.get(), w.Kp, 1, w.d.get(), w.Wp, w.Wp, nullptr, w.dv.get(), w.Wp, w.seg,
          [&](std::int64_t, std::int64_t) { return std::pair<std::int64_t, std::int64_t>{0, K}; });  // dv = (K E_last / E) D
  if (intra) {
    gemm_abt(n, w.wc.get(), w.Wp, w.W, w.vt.get(), w.Cp, w.Cp, w.pm.get(), w.Cp, k_causal);
    gemm_abt(n, w.qd.get(), w.Kp, K, w.kft.get(), w.Cp, w.Cp, w.a.get(), w.Cp, k_causal);
    for (std::int64_t i = 0; i < n; ++i) {
      std::fill(w.pm.get() + i * w.Cp + i + 1, w.pm.get() + (i + 1) * w.Cp, 0.0f);
      std::fill(w.a.get() + i * w.Cp + i + 1, w.a.get() + (i + 1) * w.Cp, 0.0f);
    }
    std::fill(w.x.get(), w.x.get() + n * w.Kp, 0.0f);
    gemm_pv(n, w.pm.get(), 1, w.Cp, w.qd.get(), w.Kp, w.Kp, nullptr, w.x.get(), w.Kp, w.seg, upper);  // P^T (Q E)
    gemm_pv(n, w.a.get(), 1, w.Cp, w.wc.get(), w.Wp, w.Wp, nullptr, w.dv.get(), w.Wp, w.seg, upper);  // + A^T W
    // D before the chunk: diag(E_last) D + (Q E)^T W, and dt = D^T.
    gemm_pv(K, w.qd.get(), 1, w.Kp, w.wc.get(), w.Wp, w.Wp, p.decay != linear_decay::none ? w.e_last.data() : nullptr, w.d.get(), w.Wp,
            w.seg, [&](std::int64_t, std::int64_t) { return std::pair<std::int64_t, std::int64_t>{0, n}; });
  }
  const bool decayed = intra && p.decay != linear_decay::none;
  for (std::int64_t j = n - 1; j >= 0; --j) {
    const std::int64_t t = t0 + j;
    float* zj = w.y.get() + j * w.Kp;
    const float* xj = w.x.get() + j * w.Kp;
    const float* kfj = w.kf.get() + j * w.Kp;
    const float* klj = w.kl.get() + j * w.Kp;
    // k dk = kf X + kl Z (the loaded k times its gradient), then dk = X / E + Z E_last / E into zj.
    if (want_dg)
      for (std::int64_t e = 0; e < nb; ++e) {
        double kdk = 0.0;
        for (std::int64_t c = nb > 1 ? e : 0; c < (nb > 1 ? e + 1 : K); ++c)
          kdk += static_cast<double>(klj[c]) * zj[c] + (intra ? static_cast<double>(kfj[c]) * xj[c] : 0.0);
        w.run[at(e)] += static_cast<double>(w.qdq[at(t * nb + e)]) - kdk;
        w.qdq[at(t * nb + e)] = static_cast<float>(w.run[at(e)]);  // from here on: token t's dg
        w.fixed += w.run[at(e)];
      }
    if (decayed) {
      const float* Ej = &w.ef[at(j * nb)];
      for (std::int64_t c = 0; c < K; ++c) {
        const float e = Ej[nb > 1 ? c : 0];
        zj[c] = xj[c] / e + zj[c] * (w.e_last[at(c)] / e);
      }
    } else if (intra) {
      for (std::int64_t c = 0; c < K; ++c) zj[c] += xj[c];
    }
    features_to_raw(p, b, h, t, zj, false, w);
    store_grad(bp.dk, bp.dk_type, bp.dk_stride, b, t, h, zj, K);
    store_grad(bp.dv, bp.dv_type, bp.dv_stride, b, t, h, w.dv.get() + j * w.Wp, w.V);
  }
  if (intra) transpose(w.d.get(), w.Wp, K, w.W, w.dt.get(), w.Kp);
}

double run_head_tiles(const linear_bwd_params& bp, std::int64_t b, std::int64_t h, bwd_tiles& w) {
  const linear_params& p = bp.fwd;
  w.ensure(p);
  const std::int64_t K = w.K, V = w.V, C = p.chunk, T = p.seq, P = p.prefix;
  const bool want_dg = bp.dg != nullptr || bp.d_head_log_decay != nullptr, decayed = p.decay != linear_decay::none;
  if (p.normalize) w.w_all.resize(at(T * w.W));
  if (want_dg) w.qdq.assign(at(T * w.nb), 0.0f);
  std::fill(w.s.get(), w.s.get() + w.Kp * w.Wp, 0.0f);
  if (const state_tensor* s0 = p.initial_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t c = 0; c < V; ++c) w.s[at(a * w.Wp + c)] = s0->data[b * s0->stride_batch + h * s0->stride_head + a * s0->stride_k + c * s0->stride_v];
  // Pass 1.
  for (std::int64_t t0 = 0; t0 < P; t0 += C) {
    const std::int64_t n = std::min(C, P - t0);
    load_tiles(p, b, h, t0, n, w, false);
    tiles_state(n, w, false);
  }
  transpose(w.s.get(), w.Wp, K, w.W, w.st.get(), w.Kp);
  for (std::int64_t t0 = 0; t0 < P; t0 += C) {
    const std::int64_t n = std::min(C, P - t0);
    load_tiles(p, b, h, t0, n, w, false);
    tiles_dq(bp, b, h, t0, n, w, false, want_dg);
  }
  for (std::int64_t t0 = P; t0 < T; t0 += C) {
    const std::int64_t n = std::min(C, T - t0);
    load_tiles(p, b, h, t0, n, w, decayed);
    tiles_dq(bp, b, h, t0, n, w, true, want_dg);
    tiles_state(n, w, decayed);
    transpose(w.s.get(), w.Wp, K, w.W, w.st.get(), w.Kp);
  }
  // Pass 2: D from d_final_state; its term of dg (final_state . d_final_state) starts the running sum.
  std::fill(w.d.get(), w.d.get() + w.Kp * w.Wp, 0.0f);
  w.run.assign(at(w.nb), 0.0);
  w.fixed = 0.0;
  if (const state_tensor* f = bp.d_final_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t c = 0; c < V; ++c) {
        const float x = f->data[b * f->stride_batch + h * f->stride_head + a * f->stride_k + c * f->stride_v];
        w.d[at(a * w.Wp + c)] = x;
        if (want_dg) w.run[at(w.nb > 1 ? a : 0)] += static_cast<double>(x) * w.s[at(a * w.Wp + c)];
      }
  transpose(w.d.get(), w.Wp, K, w.W, w.dt.get(), w.Kp);
  const std::int64_t causal_chunks = T > P ? (T - P + C - 1) / C : 0;
  for (std::int64_t ch = causal_chunks - 1; ch >= 0; --ch) {
    const std::int64_t t0 = P + ch * C, n = std::min(C, T - t0);
    load_tiles(p, b, h, t0, n, w, decayed);
    tiles_dkdv(bp, b, h, t0, n, w, true, want_dg);
  }
  if (P > 0) {  // D of the prefix state: every prefix row read it (no decay, no running sum across the prefix)
    for (std::int64_t t0 = 0; t0 < P; t0 += C) {
      const std::int64_t n = std::min(C, P - t0);
      load_tiles(p, b, h, t0, n, w, false);
      load_w(bp, b, h, t0, n, w, p.normalize);
      gemm_pv(K, w.qd.get(), 1, w.Kp, w.wc.get(), w.Wp, w.Wp, nullptr, w.d.get(), w.Wp, w.seg,
              [&](std::int64_t, std::int64_t) { return std::pair<std::int64_t, std::int64_t>{0, n}; });
    }
    transpose(w.d.get(), w.Wp, K, w.W, w.dt.get(), w.Kp);
    for (std::int64_t t0 = 0; t0 < P; t0 += C) {
      const std::int64_t n = std::min(C, P - t0);
      load_tiles(p, b, h, t0, n, w, false);
      tiles_dkdv(bp, b, h, t0, n, w, false, want_dg);
    }
  }
  if (const state_tensor* dst = bp.d_initial_state)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t c = 0; c < V; ++c)
        dst->data[b * dst->stride_batch + h * dst->stride_head + a * dst->stride_k + c * dst->stride_v] = w.d[at(a * w.Wp + c)];
  if (bp.dg)
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t base = b * bp.dg_stride[0] + t * bp.dg_stride[1] + h * bp.dg_stride[2];
      for (std::int64_t e = 0; e < w.nb; ++e) bp.dg[base + e * bp.dg_stride[3]] = w.qdq[at(t * w.nb + e)];
    }
  return w.fixed;
}

}  // namespace

status linear_bwd_kernel(const linear_bwd_params& p) {
  const std::int64_t items = detail::linear_sequences(p.fwd) * p.fwd.heads;
  std::vector<double> fixed(static_cast<std::size_t>(items), 0.0);
  detail::parallel_errors errors;
#pragma omp parallel num_threads(p.fwd.threads)
  {
    bwd_scratch s;
    bwd_tiles w;
    detail::linear_bwd_sequence seq;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t it = 0; it < items; ++it)
      errors.run([&] {
        std::int64_t b = it / p.fwd.heads;
        const std::int64_t h = it % p.fwd.heads;
        const linear_bwd_params* q = &p;
        if (p.fwd.cu_seqlens) {  // a varlen sequence: a call of its own, batch 1
          detail::sequence_of(p, b, seq);
          q = &seq.p;
          b = 0;
        }
        fixed[static_cast<std::size_t>(it)] = detail::chunks_factor(q->fwd, b, h) ? run_head_tiles(*q, b, h, w) : run_head(*q, b, h, s);
      });
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
      for (std::int64_t b = 0; b < detail::linear_sequences(p.fwd); ++b) sum += fixed[static_cast<std::size_t>(b * p.fwd.heads + h)];
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
