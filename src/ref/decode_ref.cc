// The fp64 oracle of attention on a KV cache (contract in include/omniattn/kv_cache.h): plain loops over the cached
// slots of each (sequence, kv head), with the forward's element predicate and score functor at absolute positions.
//   query i of sequence b (of its n_b new queries): token index t = L_b - n_b + i;  for each cached slot, index j:
//   s = score(scale * <R(q_i), k_j>, b, h, t, j) if element_allowed(b, h, t, j, L_b, L_b) (k_j as stored: rotated)
//   out, lse: the softmax over those s (and the sink logit), as reference_attention.
// key_mass[b][kvh][slot] = sum over the call's rows of the kv head's group of exp(s - lse).
#include <cmath>
#include <limits>
#include <vector>

#include "core/parallel.h"
#include "core/storage.h"
#include "omniattn/kv_cache.h"

namespace omniattn {

void reference_attention_decode(const attn_decode_params& dp) {
  using detail::load_element;
  using detail::store_element;
  const attn_params& p = dp.fwd;
  const kv_cache_view& c = dp.cache;
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  std::vector<double> qrow(static_cast<std::size_t>(p.dim_qk)), acc(static_cast<std::size_t>(p.dim_v));
  std::vector<double> keys, values, scores;  // the (seq, kv head)'s cached K / V rows in slot order
  std::vector<std::int64_t> index;
  if (dp.key_mass)
    std::fill(dp.key_mass, dp.key_mass + p.batch * p.heads_kv * dp.key_mass_slots, 0.0f);
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const std::int64_t seq = dp.seqs[b], L = c.length[seq];
    for (std::int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      keys.clear();
      values.clear();
      index.clear();
      const std::int64_t table = seq * c.heads_kv + kvh;
      for (std::int64_t pg = 0; pg < c.page_count[table]; ++pg) {
        const std::int32_t id = c.pages[table][pg];
        const void* data = c.page_data[id];
        for (std::int64_t s = 0; s < c.page_size; ++s) {
          const std::int32_t j = c.page_index[id][s];
          if (j < 0) continue;
          index.push_back(j);
          for (std::int64_t d = 0; d < p.dim_qk; ++d) keys.push_back(load_element(data, c.storage, d * c.page_size + s));
          for (std::int64_t d = 0; d < p.dim_v; ++d)
            values.push_back(load_element(data, c.storage, c.v_offset + s * c.dim_vp + d));
        }
      }
      const auto n = static_cast<std::int64_t>(index.size());
      std::vector<double> mass(static_cast<std::size_t>(n), 0.0);
      const seq_extent e = sequence(p, b);  // the sequence's query rows in q / out
      for (std::int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h)
        for (std::int64_t i = 0; i < e.q_len; ++i) {
          const std::int64_t t = L - e.q_len + i, row = e.q_begin + i, tb = e.tensor_batch;
          const std::int64_t q_row = tb * p.q_stride[0] + row * p.q_stride[1] + h * p.q_stride[2];
          for (std::int64_t d = 0; d < p.dim_qk; ++d) qrow[d] = load_element(p.q, p.in_type, q_row + d * p.q_stride[3]);
          if (p.rope) rope_rotate(p, true, tb, row, t, L, L, qrow.data());
          scores.assign(static_cast<std::size_t>(n), neg_inf);
          double row_max = p.sink_logits ? static_cast<double>(p.sink_logits[h]) : neg_inf;
          for (std::int64_t s = 0; s < n; ++s) {
            const std::int64_t j = index[s];
            if (!element_allowed(p, b, h, t, j, L, L)) continue;
            double dot = 0.0;
            for (std::int64_t d = 0; d < p.dim_qk; ++d) dot += qrow[d] * keys[s * p.dim_qk + d];
            double sc = p.scale * dot;
            if (p.score) sc = detail::call_user("spec.score functor", "score_fn", [&] { return (*p.score)(sc, b, h, t, j); });
            scores[s] = sc;
            row_max = std::max(row_max, sc);
          }
          double lse = neg_inf;
          std::fill(acc.begin(), acc.end(), 0.0);
          if (row_max != neg_inf || std::isnan(row_max)) {
            double sum = p.sink_logits ? std::exp(p.sink_logits[h] - row_max) : 0.0;
            for (double sc : scores) sum += sc == neg_inf ? 0.0 : std::exp(sc - row_max);
            lse = row_max + std::log(sum);
            for (std::int64_t s = 0; s < n; ++s) {
              if (scores[s] == neg_inf) continue;
              const double w = std::exp(scores[s] - lse);
              for (std::int64_t d = 0; d < p.dim_v; ++d) acc[d] += w * values[s * p.dim_v + d];
              mass[s] += w;
            }
          }
          const std::int64_t o_row = tb * p.o_stride[0] + row * p.o_stride[1] + h * p.o_stride[2];
          for (std::int64_t d = 0; d < p.dim_v; ++d) store_element(p.out, p.out_type, o_row + d * p.o_stride[3], acc[d]);
          if (p.lse) p.lse[tb * p.lse_stride[0] + h * p.lse_stride[1] + row * p.lse_stride[2]] = static_cast<float>(lse);
        }
      if (dp.key_mass)
        for (std::int64_t s = 0; s < n; ++s)
          dp.key_mass[(b * p.heads_kv + kvh) * dp.key_mass_slots + s] = static_cast<float>(mass[s]);
    }
  }
}

}  // namespace omniattn
