// The fp64 oracle of the backward pass: plain loops, no SIMD, no threads. The same loops in float are the naive
// backward (naive_attention_backward_f32), the "straightforward implementation in the same precision" whose error
// calibrates the kernels' tolerance (tests/tolerance.h).
//
// Math contract (include/omniattn/attention.h, attention_backward): with s_ij the final logit of every allowed pair
// (score modifiers applied to scale * <R q_i, R k_j>) and g_ij = d s_ij / d <R q_i, R k_j> by the chain rule,
//   P_ij = exp(s_ij - lse_i),  D_i = sum_j P_ij <dO_i, v_j>,  dS_ij = P_ij (<dO_i, v_j> - D_i)
//   dq_i = R^T sum_j dS_ij g_ij R k_j,  dk_j = R^T sum_{h in group, i} dS_ij g_ij R q_i,  dv_j = sum_{h, i} P_ij dO_i
//   d sink_h = -sum_i exp(sink_h - lse_i) D_i,  d bias[b, h, i, j] += dS_ij * (d s_ij / d bias, the steps after it)
// The oracle recomputes the forward (lse and P) in double from the inputs instead of reading p.fwd.out / p.fwd.lse,
// so it is the exact gradient of the forward function, whatever the forward kernel returned; D_i is taken as
// sum_j P_ij <dO_i, v_j> (= <dO_i, out_i> in exact arithmetic).
// A block of a larger problem (options::block) sees only some keys of each row: there lse_i and D_i are the whole
// row's, so they are read from p.fwd.lse and <dO_i, out_i> (the forward of the whole problem), and positions and heads
// are the whole problem's.
#include <cmath>
#include <limits>
#include <vector>

#include "core/parallel.h"
#include "core/problem.h"
#include "core/score_kinds.h"
#include "core/storage.h"
#include "omniattn/attention.h"

namespace omniattn {

namespace {

// The row's allowed keys with their final logit, d logit / d (q.k) and d logit / d bias.
template <class T>
struct scored_key {
  std::int64_t j;
  T s, g, g_bias;
};

// Every accumulation in T (double: the oracle; float: the naive backward). Score modifiers are evaluated in double
// and rounded to T, as the forward's naive path does.
template <class T>
void backward_loops(const attn_bwd_params& bp) {
  using detail::load_element;
  using detail::store_element;
  const attn_params& p = bp.fwd;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<detail::score_step> steps;
  if (p.score) detail::lower_score(*p.score, steps);
  const std::ptrdiff_t bias_step = detail::dense_bias_step(steps);
  const detail::bias_score* bias = bias_step >= 0 ? steps[static_cast<std::size_t>(bias_step)].bias : nullptr;

  std::vector<T> d_sink(static_cast<std::size_t>(p.heads_q), T(0)), d_bias;
  if (bp.d_bias) d_bias.assign(static_cast<std::size_t>(bias->elements()), T(0));
  const std::size_t dq_n = static_cast<std::size_t>(p.dim_qk), dv_n = static_cast<std::size_t>(p.dim_v);
  std::vector<T> qrow(dq_n), dorow(dv_n), dqrow(dq_n), krows, vrows, dk, dv, dp, pr;
  std::vector<scored_key<T>> keys;

  const bool block = p.total_q || p.total_k || p.total_heads;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    for (std::int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      // Rotated K rows and V rows of this (sequence, kv head), and their gradient accumulators.
      krows.assign(static_cast<std::size_t>(e.k_len) * dq_n, 0.0);
      vrows.assign(static_cast<std::size_t>(e.k_len) * dv_n, 0.0);
      dk.assign(krows.size(), 0.0);
      dv.assign(vrows.size(), 0.0);
      for (std::int64_t j = 0; j < e.k_len; ++j) {
        const std::int64_t kr = e.tensor_batch * p.k_stride[0] + (e.k_begin + j) * p.k_stride[1] + kvh * p.k_stride[2];
        const std::int64_t vr = e.tensor_batch * p.v_stride[0] + (e.k_begin + j) * p.v_stride[1] + kvh * p.v_stride[2];
        T* kj = krows.data() + static_cast<std::size_t>(j) * dq_n;
        for (std::int64_t d = 0; d < p.dim_qk; ++d) kj[d] = static_cast<T>(load_element(p.k, p.in_type, kr + d * p.k_stride[3]));
        if (p.rope) rope_rotate(p, false, e.tensor_batch, e.k_begin + j, e.k_pos + j, e.q_total, e.k_total, kj);
        for (std::int64_t d = 0; d < p.dim_v; ++d)
          vrows[static_cast<std::size_t>(j) * dv_n + static_cast<std::size_t>(d)] = static_cast<T>(load_element(p.v, p.in_type, vr + d * p.v_stride[3]));
      }
      for (std::int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h) {
        const std::int64_t hh = p.head0 + h;  // the head of the whole problem
        for (std::int64_t i = 0; i < e.q_len; ++i) {
          const std::int64_t qi = e.q_pos + i;
          const std::int64_t qr = e.tensor_batch * p.q_stride[0] + (e.q_begin + i) * p.q_stride[1] + h * p.q_stride[2];
          for (std::int64_t d = 0; d < p.dim_qk; ++d) qrow[d] = static_cast<T>(load_element(p.q, p.in_type, qr + d * p.q_stride[3]));
          if (p.rope) rope_rotate(p, true, e.tensor_batch, e.q_begin + i, qi, e.q_total, e.k_total, qrow.data());
          const std::int64_t dor = e.tensor_batch * bp.do_stride[0] + (e.q_begin + i) * bp.do_stride[1] + h * bp.do_stride[2];
          for (std::int64_t d = 0; d < p.dim_v; ++d) dorow[d] = static_cast<T>(load_element(bp.d_out, bp.d_out_type, dor + d * bp.do_stride[3]));

          keys.clear();
          T row_max = neg_inf;
          const T scale = static_cast<T>(p.scale);
          for (std::int64_t j = 0; j < e.k_len; ++j) {
            if (!element_allowed(p, b, hh, qi, e.k_pos + j, e.q_total, e.k_total)) continue;
            const T* kj = krows.data() + static_cast<std::size_t>(j) * dq_n;
            T dot = 0;
            for (std::int64_t d = 0; d < p.dim_qk; ++d) dot += qrow[d] * kj[d];
            scored_key<T> sk{j, scale * dot, scale, T(1)};
            for (std::size_t u = 0; u < steps.size(); ++u) {
              double dx = 1.0;
              sk.s = static_cast<T>(detail::call_user("spec.score functor", "score_fn", [&] {
                return detail::score_step_value_grad(steps[u], static_cast<double>(sk.s), b, hh, qi, e.k_pos + j, &dx);
              }));
              sk.g *= static_cast<T>(dx);
              if (static_cast<std::ptrdiff_t>(u) > bias_step) sk.g_bias *= static_cast<T>(dx);
            }
            if (sk.s == neg_inf) continue;
            keys.push_back(sk);
            row_max = std::max(row_max, sk.s);
          }
          const T sink = p.sink_logits ? static_cast<T>(p.sink_logits[h]) : neg_inf;
          if (p.sink_logits) row_max = std::max(row_max, sink);
          std::fill(dqrow.begin(), dqrow.end(), T(0));
          if (!keys.empty()) {
            T sum = p.sink_logits ? std::exp(sink - row_max) : T(0);
            for (const scored_key<T>& sk : keys) sum += std::exp(sk.s - row_max);
            T lse = row_max + std::log(sum);
            if (block)
              lse = static_cast<T>(p.lse[e.tensor_batch * p.lse_stride[0] + h * p.lse_stride[1] + (e.q_begin + i) * p.lse_stride[2]]);
            T big_d = 0;
            dp.resize(keys.size());
            pr.resize(keys.size());
            for (std::size_t n = 0; n < keys.size(); ++n) {
              const T* vj = vrows.data() + static_cast<std::size_t>(keys[n].j) * dv_n;
              T x = 0;
              for (std::int64_t d = 0; d < p.dim_v; ++d) x += dorow[d] * vj[d];
              dp[n] = x;
              pr[n] = std::exp(keys[n].s - lse);
              big_d += pr[n] * x;
            }
            if (block) {  // D of the whole row: <dO_i, out_i>
              const std::int64_t orr = e.tensor_batch * p.o_stride[0] + (e.q_begin + i) * p.o_stride[1] + h * p.o_stride[2];
              big_d = 0;
              for (std::int64_t d = 0; d < p.dim_v; ++d)
                big_d += dorow[d] * static_cast<T>(load_element(p.out, p.out_type, orr + d * p.o_stride[3]));
            }
            for (std::size_t n = 0; n < keys.size(); ++n) {
              const std::size_t j = static_cast<std::size_t>(keys[n].j);
              const T ds = pr[n] * (dp[n] - big_d), dsg = ds * keys[n].g;
              const T* kj = krows.data() + j * dq_n;
              for (std::size_t d = 0; d < dq_n; ++d) {
                dqrow[d] += dsg * kj[d];
                dk[j * dq_n + d] += dsg * qrow[d];
              }
              for (std::size_t d = 0; d < dv_n; ++d) dv[j * dv_n + d] += pr[n] * dorow[d];
              if (bp.d_bias) {
                const auto at = [&](int dim, std::int64_t x) { return bias->shape[static_cast<std::size_t>(dim)] == 1 ? 0 : x; };
                const std::int64_t idx =
                    ((at(0, b) * bias->shape[1] + at(1, hh)) * bias->shape[2] + at(2, qi)) * bias->shape[3] + at(3, e.k_pos + keys[n].j);
                d_bias[static_cast<std::size_t>(idx)] += ds * keys[n].g_bias;
              }
            }
            if (p.sink_logits) d_sink[static_cast<std::size_t>(h)] -= std::exp(sink - lse) * big_d;
          }
          if (p.rope) rope_rotate_back(p, true, e.tensor_batch, e.q_begin + i, qi, e.q_total, e.k_total, dqrow.data());
          const std::int64_t dqr = e.tensor_batch * bp.dq_stride[0] + (e.q_begin + i) * bp.dq_stride[1] + h * bp.dq_stride[2];
          for (std::int64_t d = 0; d < p.dim_qk; ++d) store_element(bp.dq, bp.dq_type, dqr + d * bp.dq_stride[3], static_cast<double>(dqrow[d]));
        }
      }
      for (std::int64_t j = 0; j < e.k_len; ++j) {
        T* dkj = dk.data() + static_cast<std::size_t>(j) * dq_n;
        if (p.rope) rope_rotate_back(p, false, e.tensor_batch, e.k_begin + j, e.k_pos + j, e.q_total, e.k_total, dkj);
        const std::int64_t dkr = e.tensor_batch * bp.dk_stride[0] + (e.k_begin + j) * bp.dk_stride[1] + kvh * bp.dk_stride[2];
        const std::int64_t dvr = e.tensor_batch * bp.dv_stride[0] + (e.k_begin + j) * bp.dv_stride[1] + kvh * bp.dv_stride[2];
        for (std::int64_t d = 0; d < p.dim_qk; ++d) store_element(bp.dk, bp.dk_type, dkr + d * bp.dk_stride[3], static_cast<double>(dkj[d]));
        for (std::int64_t d = 0; d < p.dim_v; ++d)
          store_element(bp.dv, bp.dv_type, dvr + d * bp.dv_stride[3],
                        static_cast<double>(dv[static_cast<std::size_t>(j) * dv_n + static_cast<std::size_t>(d)]));
      }
    }
  }
  if (bp.d_sink)
    for (std::int64_t h = 0; h < p.heads_q; ++h) bp.d_sink[h] = static_cast<float>(d_sink[static_cast<std::size_t>(h)]);
  if (bp.d_bias)
    for (std::size_t n = 0; n < d_bias.size(); ++n) bp.d_bias[n] = static_cast<float>(d_bias[n]);
}

}  // namespace

void reference_attention_backward(const attn_bwd_params& p) { backward_loops<double>(p); }
void naive_attention_backward_f32(const attn_bwd_params& p) { backward_loops<float>(p); }

}  // namespace omniattn
