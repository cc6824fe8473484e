// The naive unfused attention in float: S = scale * Q K^T materialized per row, softmax in float, O = P V in float.
// Not an oracle: it is the "straightforward implementation in the same precision" whose error calibrates the
// tolerance of the fast kernels, and the simplest baseline of the benchmark.
#include <cmath>
#include <limits>
#include <vector>

#include "core/problem.h"
#include "core/storage.h"

namespace omniattn {

void naive_attention_f32(const attn_params& p) {
  using detail::load_element;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> s, acc(static_cast<std::size_t>(p.dim_v)), qv(static_cast<std::size_t>(p.dim_qk)), kv(qv.size());
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    s.resize(static_cast<std::size_t>(e.k_len));
    for (std::int64_t h = 0; h < p.heads_q; ++h) {
      const std::int64_t kvh = h / p.group, hh = p.head0 + h;
      for (std::int64_t i = 0; i < e.q_len; ++i) {
        const std::int64_t q_row = e.tensor_batch * p.q_stride[0] + (e.q_begin + i) * p.q_stride[1] + h * p.q_stride[2];
        for (std::int64_t d = 0; d < p.dim_qk; ++d) qv[static_cast<std::size_t>(d)] = static_cast<float>(load_element(p.q, p.in_type, q_row + d * p.q_stride[3]));
        const std::int64_t qi = e.q_pos + i;
        if (p.rope) rope_rotate(p, true, e.tensor_batch, e.q_begin + i, qi, e.q_total, e.k_total, qv.data());
        float mx = neg_inf;
        for (std::int64_t j = 0; j < e.k_len; ++j) {
          float x = neg_inf;
          const std::int64_t kj = e.k_pos + j;
          if (element_allowed(p, b, hh, qi, kj, e.q_total, e.k_total)) {
            const std::int64_t k_row = e.tensor_batch * p.k_stride[0] + (e.k_begin + j) * p.k_stride[1] + kvh * p.k_stride[2];
            for (std::int64_t d = 0; d < p.dim_qk; ++d) kv[static_cast<std::size_t>(d)] = static_cast<float>(load_element(p.k, p.in_type, k_row + d * p.k_stride[3]));
            if (p.rope) rope_rotate(p, false, e.tensor_batch, e.k_begin + j, kj, e.q_total, e.k_total, kv.data());
            float dot = 0.0f;
            for (std::int64_t d = 0; d < p.dim_qk; ++d) dot += qv[static_cast<std::size_t>(d)] * kv[static_cast<std::size_t>(d)];
            x = dot * static_cast<float>(p.scale);
            if (p.score) x = static_cast<float>((*p.score)(x, b, hh, qi, kj));
          }
          s[static_cast<std::size_t>(j)] = x;
          mx = std::max(mx, x);
        }
        const float sink = p.sink_logits ? p.sink_logits[h] : neg_inf;
        mx = std::max(mx, sink);
        float sum = p.sink_logits ? std::exp(sink - mx) : 0.0f;
        for (std::int64_t j = 0; j < e.k_len; ++j) {
          const float w = mx == neg_inf ? 0.0f : std::exp(s[static_cast<std::size_t>(j)] - mx);
          s[static_cast<std::size_t>(j)] = w;
          sum += w;
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (std::int64_t j = 0; j < e.k_len; ++j) {
          const float w = s[static_cast<std::size_t>(j)];
          if (w == 0.0f) continue;
          const std::int64_t v_row = e.tensor_batch * p.v_stride[0] + (e.k_begin + j) * p.v_stride[1] + kvh * p.v_stride[2];
          for (std::int64_t d = 0; d < p.dim_v; ++d)
            acc[static_cast<std::size_t>(d)] += w * static_cast<float>(load_element(p.v, p.in_type, v_row + d * p.v_stride[3]));
        }
        const std::int64_t o_row = e.tensor_batch * p.o_stride[0] + (e.q_begin + i) * p.o_stride[1] + h * p.o_stride[2];
        for (std::int64_t d = 0; d < p.dim_v; ++d)
          detail::store_element(p.out, p.out_type, o_row + d * p.o_stride[3], sum > 0.0f ? acc[static_cast<std::size_t>(d)] / sum : 0.0f);
        if (p.lse)
          p.lse[e.tensor_batch * p.lse_stride[0] + h * p.lse_stride[1] + (e.q_begin + i) * p.lse_stride[2]] =
              sum > 0.0f ? mx + std::log(sum) : neg_inf;
      }
    }
  }
}

}  // namespace omniattn
