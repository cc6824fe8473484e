// The chunked linear-attention forward (include/omniattn/linear.h; Lightning Attention-2's split) on the tile
// engine's register-blocked micro-kernels (tile_ops-inl.h), the forward tile loop without the softmax.
//
// Math contract, per (batch, head), chunk [t0, t0 + n) of the sequence, with B_i = g_t0 + ... + g_i the log decay
// from the chunk's start to token i (per K channel) and S, z the state carried in from the previous chunk:
//   A_ij = sum_c q_i[c] k_j[c] exp(B_i[c] - B_j[c])        for j <= i  (the masked intra-chunk product)
//   o_i  = sum_{j <= i} A_ij v_j + sum_c q_i[c] exp(B_i[c]) S[c][:]     (intra + inter)
//   den_i = the same with v_j = 1 and S = z                              (normalize: o_i / den_i, 0 where den_i = 0)
//   S[c][:] <- exp(B_last[c]) S[c][:] + sum_j exp(B_last[c] - B_j[c]) k_j[c] v_j
// As matrices of the chunk (z is one more value column of ones): O = (Q * E) S + mask(A) V and
// S <- diag(E_last) S + (K * E_last / E)^T V with E_i = exp(B_i), A = (Q * E) (K / E)^T: four small GEMMs on qk_block
// / pv_block. The factorisation of A needs 1 / E_j in range: where a chunk's decay spans more than k_linear_max_span (in
// log space; strong decays), A is formed pair by pair with exp(B_i - B_j) <= 1 instead. Every other factor is <= 1.
// E is exp of the running sum taken in double (a float sum would carry its rounding into every weight). A prefix
// (JRT; the whole sequence when non-causal; no decay) accumulates S = initial_state + its K^T V first, then its rows
// read O = Q S; the causal chunks continue from that state. Work items are the (batch, head) pairs; the state is
// float32; the result does not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "core/linear_params.h"
#include "core/parallel.h"
#include "core/storage.h"
#include "cpu/tiles.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/linear_fwd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

#include "cpu/row_ops-inl.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/linear_tiles-inl.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace {

using detail::linear_params;


std::size_t at(std::int64_t i) { return static_cast<std::size_t>(i); }

// One worker's chunk tiles, padded: rows of K and W (= V, plus the column of ones under normalize) to whole vectors,
// chunk rows to whole 64-key tiles (the micro-kernels' key blocks and 16-row V segments).
struct tiles {
  std::int64_t K = 0, W = 0, Kp = 0, Wp = 0, Cp = 0, nb = 1;
  hwy::AlignedFreeUniquePtr<float[]> qd, kt, kl, vc, a, o, s;  // [Cp][Kp] [Kp][Cp] [Cp][Kp] [Cp][Wp] [Cp][Cp] [Cp][Wp] [Kp16][Wp]
  std::vector<const float*> vseg, sseg;  // 16-row segments of vc and s
  std::vector<double> B, E;              // running log decay and its exp, [Cp][nb]
  std::vector<float> ef;                 // E rounded to float
  std::vector<float> e_last;             // exp(B_last) per channel (per S row)
  void ensure(const linear_params& p) {
    const hn::ScalableTag<float> d;
    const auto L = static_cast<std::int64_t>(hn::Lanes(d));
    const std::int64_t w = p.dim_v + (p.normalize ? 1 : 0), cp = round_up(p.chunk, 64);
    const std::int64_t bn = p.decay == linear_decay::channel ? p.dim_k : 1;
    if (K == p.dim_k && W == w && Cp == cp && nb == bn) return;
    K = p.dim_k;
    W = w;
    Cp = cp;
    nb = bn;
    Kp = round_up(K, L);
    Wp = round_up(W, L);
    const std::int64_t k16 = round_up(K, 16);
    qd = aligned_zeros(Cp * Kp);
    kt = aligned_zeros(Kp * Cp);
    kl = aligned_zeros(Cp * Kp);
    vc = aligned_zeros(Cp * Wp);
    a = aligned_zeros(Cp * Cp);
    o = aligned_zeros(Cp * Wp);
    s = aligned_zeros(k16 * Wp);
    vseg.resize(at(Cp / 16));
    for (std::int64_t x = 0; x < Cp / 16; ++x) vseg[at(x)] = vc.get() + x * 16 * Wp;
    sseg.resize(at(k16 / 16));
    for (std::int64_t x = 0; x < k16 / 16; ++x) sseg[at(x)] = s.get() + x * 16 * Wp;
    B.assign(at(Cp * nb), 0.0);
    E.assign(at(Cp * nb), 1.0);
    ef.assign(at(Cp * nb), 1.0f);
    e_last.assign(at(Kp), 1.0f);
  }
};

// Chunk [t0, t0 + n): scale phi(q) into qd, phi(k) into kl, v (and the ones column) into vc, B and E = exp(B).
void load_chunk(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, tiles& w, bool with_decay) {
  const std::int64_t K = w.K, V = p.dim_v, nb = w.nb;
  const auto scale = static_cast<float>(p.scale);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t t = t0 + i;
    float* qi = w.qd.get() + i * w.Kp;
    float* ki = w.kl.get() + i * w.Kp;
    float* vi = w.vc.get() + i * w.Wp;
    load_row(p.q, p.in_type, b * p.q_stride[0] + t * p.q_stride[1] + h * p.q_stride[2], p.q_stride[3], K, qi);
    load_row(p.k, p.in_type, b * p.k_stride[0] + t * p.k_stride[1] + h * p.k_stride[2], p.k_stride[3], K, ki);
    load_row(p.v, p.v_type, b * p.v_stride[0] + t * p.v_stride[1] + h * p.v_stride[2], p.v_stride[3], V, vi);
    map_features(p.phi, qi, K);
    map_features(p.phi, ki, K);
    scale_row(scale, qi, K);
    if (w.W > V) vi[V] = 1.0f;
    if (with_decay) {
      double* Bi = &w.B[at(i * nb)];
      float* g = w.ef.data();  // free until apply_decays
      if (p.decay == linear_decay::fixed) g[0] = p.head_log_decay[h];
      else load_row(p.g, p.g_type, b * p.g_stride[0] + t * p.g_stride[1] + h * p.g_stride[2], p.g_stride[3], nb, g);
      const double* prev = i > 0 ? &w.B[at((i - 1) * nb)] : nullptr;
      for (std::int64_t c = 0; c < nb; ++c) Bi[c] = (prev ? prev[c] : 0.0) + static_cast<double>(g[c]);
    }
  }
  if (with_decay) exp_doubles(w.B.data(), w.E.data(), n * nb);
}

// Asks for the rows of q, k and v of tokens [t0, t0 + n) while the current chunk computes: in [B, T, H, dim] a
// head's consecutive tokens are a page apart (H * dim elements), beyond the reach of the hardware prefetchers, so
// each row would otherwise be a miss to memory when the chunk loads it.
void prefetch_chunk(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n) {
  const struct {
    const void* base;
    const std::int64_t* st;
    std::int64_t dim, elem;
  } ops[3] = {{p.q, p.q_stride, p.dim_k, static_cast<std::int64_t>(dtype_size(p.in_type))},
              {p.k, p.k_stride, p.dim_k, static_cast<std::int64_t>(dtype_size(p.in_type))},
              {p.v, p.v_stride, p.dim_v, static_cast<std::int64_t>(dtype_size(p.v_type))}};
  for (const auto& x : ops) {
    const std::int64_t elem = x.elem;
    if (x.st[3] != 1 && x.dim > 1) continue;  // strided rows: not worth the addresses
    for (std::int64_t t = t0; t < t0 + n; ++t) {
      const char* row = static_cast<const char*>(x.base) + (b * x.st[0] + t * x.st[1] + h * x.st[2]) * elem;
      for (std::int64_t off = 0; off < x.dim * elem; off += 64) hwy::Prefetch(row + off);
    }
  }
}

// A [n][Cp] = qd kt^T over the key blocks at or left of each row block's diagonal, then the pairs j > i zeroed.
void intra_scores(std::int64_t n, tiles& w) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const std::int64_t kblock = static_cast<std::int64_t>(k_nv) * L;
  for (std::int64_t r0 = 0; r0 < n; r0 += static_cast<std::int64_t>(k_mr)) {
    const std::int64_t rows = std::min<std::int64_t>(static_cast<std::int64_t>(k_mr), n - r0);
    for (std::int64_t j0 = 0; j0 < r0 + rows; j0 += kblock) {
      const float* kb[k_nv];
      for (std::size_t v = 0; v < k_nv; ++v) kb[v] = w.kt.get() + j0 + static_cast<std::int64_t>(v) * L;
      with_rows(rows, [&](auto R) {
        qk_block<decltype(R)::value>(d, w.qd.get() + r0 * w.Kp, w.Kp, w.K, kb, w.Cp, w.a.get() + r0 * w.Cp + j0, w.Cp);
      });
    }
  }
}

// The same pair by pair, exp(B_i - B_j) <= 1 per channel, for chunks whose decay spans too much to factor.
void intra_scores_pairwise(std::int64_t n, tiles& w) {
  const std::int64_t K = w.K, nb = w.nb;
  for (std::int64_t i = 0; i < n; ++i) {
    const float* qi = w.qd.get() + i * w.Kp;
    float* ai = w.a.get() + i * w.Cp;
    for (std::int64_t j = 0; j <= i; ++j) {
      const float* kj = w.kl.get() + j * w.Kp;
      float s = 0.0f;
      for (std::int64_t c = 0; c < K; ++c)
        s += qi[c] * kj[c] * static_cast<float>(std::exp(w.B[at(i * nb + (nb > 1 ? c : 0))] - w.B[at(j * nb + (nb > 1 ? c : 0))]));
      ai[j] = s;
    }
  }
}

// Scales the loaded features by the decays: qd *= E_i, kt = (k / E_j)^T and kl *= E_last / E_j when factored, else
// kl *= exp(B_last - B_j). E (exp of the double running sum) is rounded to float once; the scalings are float vectors.
void apply_decays(std::int64_t n, tiles& w, bool factored) {
  const std::int64_t K = w.K, nb = w.nb;
  float* Ef = w.ef.data();
  for (std::int64_t x = 0; x < n * nb; ++x) Ef[x] = static_cast<float>(w.E[at(x)]);
  const float* El = Ef + (n - 1) * nb;
  for (std::int64_t c = 0; c < K; ++c) w.e_last[at(c)] = El[nb > 1 ? c : 0];
  for (std::int64_t j = 0; j < n; ++j) {
    const float* Ej = Ef + j * nb;
    float* qj = w.qd.get() + j * w.Kp;
    float* kj = w.kl.get() + j * w.Kp;
    if (nb == 1) {
      scale_row(Ej[0], qj, K);
    } else {
      for (std::int64_t c = 0; c < K; ++c) qj[c] *= Ej[c];
    }
    if (factored) {
      for (std::int64_t c = 0; c < K; ++c) w.kt[at(c * w.Cp + j)] = kj[c] / Ej[nb > 1 ? c : 0];
      if (nb == 1) {
        scale_row(El[0] / Ej[0], kj, K);
      } else {
        for (std::int64_t c = 0; c < K; ++c) kj[c] *= El[c] / Ej[c];
      }
    } else {  // E_j may underflow to 0: the decay since token j directly, an exponent <= 0
      for (std::int64_t c = 0; c < K; ++c) {
        const std::int64_t x = nb > 1 ? c : 0;
        kj[c] = static_cast<float>(kj[c] * std::exp(w.B[at((n - 1) * nb + x)] - w.B[at(j * nb + x)]));
      }
    }
  }
}

// kt = kl^T (no decay).
void transpose_keys(std::int64_t n, tiles& w) {
  for (std::int64_t j = 0; j < n; ++j)
    for (std::int64_t c = 0; c < w.K; ++c) w.kt[at(c * w.Cp + j)] = w.kl[at(j * w.Kp + c)];
}

// O [n][Wp] = qd S (+ mask(A) vc when intra); between(r0, rows) runs after each row block.
template <class Between>
void read_rows(std::int64_t n, tiles& w, bool intra, Between&& between) {
  const hn::ScalableTag<float> d;
  std::fill(w.o.get(), w.o.get() + n * w.Wp, 0.0f);
  for (std::int64_t r0 = 0; r0 < n; r0 += static_cast<std::int64_t>(k_mr)) {
    const std::int64_t rows = std::min<std::int64_t>(static_cast<std::int64_t>(k_mr), n - r0);
    between(r0, rows);
    with_rows(rows, [&](auto R) {
      constexpr std::size_t MR = decltype(R)::value;
      pv_rows<MR>(d, w.qd.get() + r0 * w.Kp, w.Kp, 1, w.K, w.sseg.data(), w.Wp, w.Wp, nullptr, w.o.get() + r0 * w.Wp, w.Wp);
      if (intra)
        pv_rows<MR>(d, w.a.get() + r0 * w.Cp, w.Cp, 1, r0 + rows, w.vseg.data(), w.Wp, w.Wp, nullptr, w.o.get() + r0 * w.Wp, w.Wp);
    });
  }
}

// S <- diag(e_last) S + kl^T vc (decayed), or S + kl^T vc.
void update_state(std::int64_t n, tiles& w, bool decayed) {
  const hn::ScalableTag<float> d;
  for (std::int64_t c0 = 0; c0 < w.K; c0 += static_cast<std::int64_t>(k_mr)) {
    const std::int64_t rows = std::min<std::int64_t>(static_cast<std::int64_t>(k_mr), w.K - c0);
    with_rows(rows, [&](auto R) {
      pv_rows<decltype(R)::value>(d, w.kl.get() + c0, 1, w.Kp, n, w.vseg.data(), w.Wp, w.Wp, decayed ? w.e_last.data() + c0 : nullptr,
                                  w.s.get() + c0 * w.Wp, w.Wp);
    });
  }
}

void store_rows(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n, tiles& w) {
  const std::int64_t V = p.dim_v;
  for (std::int64_t i = 0; i < n; ++i) {
    float* oi = w.o.get() + i * w.Wp;
    if (p.normalize) {
      const float den = oi[V];
      scale_row(den == 0.0f ? 0.0f : 1.0f / den, oi, V);
    }
    store_row(p.out, p.out_type, b * p.out_stride[0] + (t0 + i) * p.out_stride[1] + h * p.out_stride[2], p.out_stride[3], V, oi);
  }
}

// S[c] <- a S[c] + kc v and o += qc S[c] over n floats: one pass over a row of the state.
void step_row(float a, float kc, float qc, const float* HWY_RESTRICT v, float* HWY_RESTRICT row, float* HWY_RESTRICT o, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto L = static_cast<std::int64_t>(hn::Lanes(d));
  const auto va = hn::Set(d, a), vk = hn::Set(d, kc), vq = hn::Set(d, qc);
  std::int64_t i = 0;
  for (; i + L <= n; i += L) {
    const auto r = hn::MulAdd(vk, hn::LoadU(d, v + i), hn::Mul(va, hn::LoadU(d, row + i)));
    hn::StoreU(r, d, row + i);
    hn::StoreU(hn::MulAdd(vq, r, hn::LoadU(d, o + i)), d, o + i);
  }
  for (; i < n; ++i) {
    row[i] = a * row[i] + kc * v[i];
    o[i] += qc * row[i];
  }
}

// The decode step (a few causal tokens after a state): the recurrence itself, token by token, each row of the state
// read and written once per token, in place in final_state when there is one (a prefill's state advanced by a
// generated token costs one pass over K x V floats, not four chunk GEMMs on padded tiles).
void recurrent_head(const linear_params& p, std::int64_t b, std::int64_t h, tiles& w) {
  w.ensure(p);
  const std::int64_t K = p.dim_k, V = p.dim_v;
  const state_tensor* s0 = p.initial_state;
  const state_tensor* f = p.final_state;
  const bool in_place = f && f->stride_v == 1;
  float* S = in_place ? f->data + b * f->stride_batch + h * f->stride_head : w.s.get();
  const std::int64_t ld = in_place ? f->stride_k : w.Wp;
  const bool same = s0 && in_place && s0->data == f->data && s0->stride_batch == f->stride_batch && s0->stride_head == f->stride_head &&
                    s0->stride_k == f->stride_k && s0->stride_v == 1;
  if (!same)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t c = 0; c < V; ++c)
        S[a * ld + c] = s0 ? s0->data[b * s0->stride_batch + h * s0->stride_head + a * s0->stride_k + c * s0->stride_v] : 0.0f;
  std::vector<float>& z = w.e_last;  // the key sum under normalize (no initial state then: it starts at 0)
  std::fill(z.begin(), z.begin() + K, 0.0f);
  for (std::int64_t t = 0; t < p.seq; ++t) {
    load_chunk(p, b, h, t, 1, w, p.decay != linear_decay::none);
    const float* q = w.qd.get();
    const float* k = w.kl.get();
    const float* v = w.vc.get();
    float* o = w.o.get();
    std::fill(o, o + V, 0.0f);
    float den = 0.0f;
    for (std::int64_t a = 0; a < K; ++a) {
      const float alpha = p.decay == linear_decay::none ? 1.0f : static_cast<float>(w.E[at(w.nb > 1 ? a : 0)]);
      step_row(alpha, k[a], q[a], v, S + a * ld, o, V);
      z[at(a)] = alpha * z[at(a)] + k[a];
      den += q[a] * z[at(a)];
    }
    if (p.normalize) o[V] = den;
    store_rows(p, b, h, t, 1, w);
  }
  if (f && !in_place)
    for (std::int64_t a = 0; a < K; ++a)
      for (std::int64_t c = 0; c < V; ++c) f->data[b * f->stride_batch + h * f->stride_head + a * f->stride_k + c * f->stride_v] = S[a * ld + c];
}

void run_head(const linear_params& p, std::int64_t b, std::int64_t h, tiles& w) {
  if (detail::runs_recurrence(p)) {
    recurrent_head(p, b, h, w);
    return;
  }
  w.ensure(p);
  const std::int64_t K = p.dim_k, V = p.dim_v, C = p.chunk, T = p.seq, P = p.prefix;
  const bool decayed = p.decay != linear_decay::none;
  std::fill(w.s.get(), w.s.get() + round_up(K, 16) * w.Wp, 0.0f);
  if (const state_tensor* s0 = p.initial_state)
    for (std::int64_t a = 0; a < K; ++a) {
      const float* src = s0->data + b * s0->stride_batch + h * s0->stride_head + a * s0->stride_k;
      float* dst = w.s.get() + a * w.Wp;
      if (s0->stride_v == 1) std::memcpy(dst, src, at(V) * sizeof(float));
      else
        for (std::int64_t c = 0; c < V; ++c) dst[c] = src[c * s0->stride_v];
    }
  // Rows and key columns past a short chunk must read as 0 (the key blocks and V segments cover whole tiles).
  const auto clear_tail = [&](std::int64_t n) {
    if (n == w.Cp) return;
    std::fill(w.vc.get() + n * w.Wp, w.vc.get() + w.Cp * w.Wp, 0.0f);
    for (std::int64_t c = 0; c < K; ++c) std::fill(w.kt.get() + c * w.Cp + n, w.kt.get() + (c + 1) * w.Cp, 0.0f);
  };
  // The prefix (the whole sequence when non-causal; no decay there): every key of it first, then its rows.
  for (std::int64_t t0 = 0; t0 < P; t0 += C) {
    const std::int64_t n = std::min(C, P - t0);
    load_chunk(p, b, h, t0, n, w, false);
    update_state(n, w, false);
  }
  for (std::int64_t t0 = 0; t0 < P; t0 += C) {
    const std::int64_t n = std::min(C, P - t0);
    load_chunk(p, b, h, t0, n, w, false);
    read_rows(n, w, false, [](std::int64_t, std::int64_t) {});
    store_rows(p, b, h, t0, n, w);
  }
  // Then the causal chunks, from the prefix's state.
  for (std::int64_t t0 = P; t0 < T; t0 += C) {
    const std::int64_t n = std::min(C, T - t0);
    load_chunk(p, b, h, t0, n, w, decayed);
    clear_tail(n);
    if (!decayed) {
      transpose_keys(n, w);
      intra_scores(n, w);
    } else {
      double span = 0.0;  // the chunk's largest -B_last over the channels
      for (std::int64_t c = 0; c < w.nb; ++c) span = std::max(span, -w.B[at((n - 1) * w.nb + c)]);
      const bool factored = span <= k_linear_max_span;
      if (!factored) intra_scores_pairwise(n, w);
      apply_decays(n, w, factored);
      if (factored) intra_scores(n, w);
    }
    for (std::int64_t i = 0; i < n; ++i) std::fill(w.a.get() + i * w.Cp + i + 1, w.a.get() + (i + 1) * w.Cp, 0.0f);
    // The next chunk's rows are requested a row block at a time, between the GEMMs' blocks: all at once they would
    // fill the line-fill buffers and stall on themselves.
    const std::int64_t next = std::min(C, T - t0 - n);
    read_rows(n, w, true, [&](std::int64_t r0, std::int64_t rows) {
      if (r0 < next) prefetch_chunk(p, b, h, t0 + n + r0, std::min(rows, next - r0));
    });
    store_rows(p, b, h, t0, n, w);
    update_state(n, w, decayed);
  }
  if (const state_tensor* f = p.final_state)
    for (std::int64_t a = 0; a < K; ++a) {
      float* dst = f->data + b * f->stride_batch + h * f->stride_head + a * f->stride_k;
      const float* src = w.s.get() + a * w.Wp;
      if (f->stride_v == 1) std::memcpy(dst, src, at(V) * sizeof(float));
      else
        for (std::int64_t c = 0; c < V; ++c) dst[c * f->stride_v] = src[c];
    }
}

}  // namespace

status linear_fwd_kernel(const linear_params& p) {
  const std::int64_t items = detail::linear_sequences(p) * p.heads;
  detail::parallel_errors errors;
#pragma omp parallel num_threads(p.threads)
  {
    tiles w;
    detail::linear_sequence seq;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t it = 0; it < items; ++it)
      errors.run([&] {
        const std::int64_t s = it / p.heads, h = it % p.heads;
        if (!p.cu_seqlens) return run_head(p, s, h, w);
        detail::sequence_of(p, s, seq);  // a varlen sequence: a call of its own, batch 1
        run_head(seq.p, 0, h, w);
      });
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
