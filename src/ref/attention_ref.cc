// The fp64 oracle for attention: plain loops, no SIMD, no threads.
//
// Math contract (see include/omniattn/spec.h): for each sequence b, query head h and query row i,
//   s_j   = score(scale * <q_i, k_j>, b, h, i, j) for every j with element_allowed(b, h, i, j); -inf masks too
// (i, j: the positions of the row and key in the whole problem, which options::block may place past 0).
//   lse_i = log(sum_j exp(s_j)),  out_i = sum_j exp(s_j - lse_i) v_j
// Rows with no allowed key (or only -inf scores) give out_i = 0 and lse_i = -inf (= sink[h] with sink logits, which
// join the normalizer but carry no value).
// Everything is accumulated in double; inputs are widened exactly, the output is rounded once at the end.
#include <cmath>
#include <limits>
#include <vector>

#include "core/parallel.h"
#include "core/storage.h"
#include "omniattn/attention.h"

namespace omniattn {

void reference_attention(const attn_params& p) {
  using detail::load_element;
  using detail::store_element;
  std::vector<double> qrow(static_cast<std::size_t>(p.dim_qk)), krow(qrow.size()), scores, acc(static_cast<std::size_t>(p.dim_v));
  std::vector<std::int64_t> keys;
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();

  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    for (std::int64_t h = 0; h < p.heads_q; ++h) {
      const std::int64_t kvh = h / p.group, hh = p.head0 + h;  // hh: the head of the whole problem (options::block)
      for (std::int64_t i = 0; i < e.q_len; ++i) {
        const std::int64_t q_row = e.tensor_batch * p.q_stride[0] + (e.q_begin + i) * p.q_stride[1] + h * p.q_stride[2];
        for (std::int64_t d = 0; d < p.dim_qk; ++d) qrow[d] = load_element(p.q, p.in_type, q_row + d * p.q_stride[3]);
        const std::int64_t qi = e.q_pos + i;
        if (p.rope) rope_rotate(p, true, e.tensor_batch, e.q_begin + i, qi, e.q_total, e.k_total, qrow.data());

        scores.clear();
        keys.clear();
        double row_max = neg_inf;
        for (std::int64_t j = 0; j < e.k_len; ++j) {
          const std::int64_t kj = e.k_pos + j;
          if (!element_allowed(p, b, hh, qi, kj, e.q_total, e.k_total)) continue;
          const std::int64_t k_row = e.tensor_batch * p.k_stride[0] + (e.k_begin + j) * p.k_stride[1] + kvh * p.k_stride[2];
          for (std::int64_t d = 0; d < p.dim_qk; ++d) krow[d] = load_element(p.k, p.in_type, k_row + d * p.k_stride[3]);
          if (p.rope) rope_rotate(p, false, e.tensor_batch, e.k_begin + j, kj, e.q_total, e.k_total, krow.data());
          double dot = 0.0;
          for (std::int64_t d = 0; d < p.dim_qk; ++d) dot += qrow[d] * krow[d];
          double s = p.scale * dot;
          if (p.score) s = detail::call_user("spec.score functor", "score_fn", [&] { return (*p.score)(s, b, hh, qi, kj); });
          if (s == neg_inf) continue;
          scores.push_back(s);
          keys.push_back(j);
          row_max = std::max(row_max, s);
        }

        double lse = neg_inf;
        std::fill(acc.begin(), acc.end(), 0.0);
        const double sink = p.sink_logits ? static_cast<double>(p.sink_logits[h]) : neg_inf;
        if (p.sink_logits) row_max = std::max(row_max, sink);
        if (!scores.empty() || p.sink_logits) {
          double sum = p.sink_logits ? std::exp(sink - row_max) : 0.0;
          for (double s : scores) sum += std::exp(s - row_max);
          lse = row_max + std::log(sum);
          for (std::size_t n = 0; n < keys.size(); ++n) {
            const double w = std::exp(scores[n] - row_max) / sum;
            const std::int64_t v_row =
                e.tensor_batch * p.v_stride[0] + (e.k_begin + keys[n]) * p.v_stride[1] + kvh * p.v_stride[2];
            for (std::int64_t d = 0; d < p.dim_v; ++d) acc[d] += w * load_element(p.v, p.in_type, v_row + d * p.v_stride[3]);
          }
        }
        const std::int64_t o_row = e.tensor_batch * p.o_stride[0] + (e.q_begin + i) * p.o_stride[1] + h * p.o_stride[2];
        for (std::int64_t d = 0; d < p.dim_v; ++d) store_element(p.out, p.out_type, o_row + d * p.o_stride[3], acc[d]);
        if (p.lse)
          p.lse[e.tensor_batch * p.lse_stride[0] + h * p.lse_stride[1] + (e.q_begin + i) * p.lse_stride[2]] =
              static_cast<float>(lse);
      }
    }
  }
}

}  // namespace omniattn
