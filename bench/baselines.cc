// Benchmark baselines that are not part of the library: the unfused OpenBLAS path.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "bench/bench.h"

namespace omniattn::bench {

void set_openblas_threads(int threads) { openblas_set_num_threads(threads); }

const char* openblas_core() { return openblas_get_corename(); }

void openblas_unfused(const attn_params& p, int threads) {
  std::vector<float> s;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    const auto lq = static_cast<int>(e.q_len), lk = static_cast<int>(e.k_len);
    s.resize(static_cast<std::size_t>(e.q_len * e.k_len));
    for (std::int64_t h = 0; h < p.heads_q; ++h) {
      const std::int64_t kvh = h / p.group;
      const float* q = static_cast<const float*>(p.q) + e.tensor_batch * p.q_stride[0] + e.q_begin * p.q_stride[1] + h * p.q_stride[2];
      const float* k = static_cast<const float*>(p.k) + e.tensor_batch * p.k_stride[0] + e.k_begin * p.k_stride[1] + kvh * p.k_stride[2];
      const float* v = static_cast<const float*>(p.v) + e.tensor_batch * p.v_stride[0] + e.k_begin * p.v_stride[1] + kvh * p.v_stride[2];
      float* o = static_cast<float*>(p.out) + e.tensor_batch * p.o_stride[0] + e.q_begin * p.o_stride[1] + h * p.o_stride[2];
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, lq, lk, static_cast<int>(p.dim_qk), static_cast<float>(p.scale), q,
                  static_cast<int>(p.q_stride[1]), k, static_cast<int>(p.k_stride[1]), 0.0f, s.data(), lk);
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int i = 0; i < lq; ++i) {
        float* row = s.data() + static_cast<std::size_t>(i) * lk;
        const int allowed = p.causal == causal_mode::none        ? lk
                            : p.causal == causal_mode::top_left ? std::min(lk, i + 1)
                                                                : std::clamp(i + lk - lq + 1, 0, lk);
        softmax_row(row, allowed, lk);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, lq, static_cast<int>(p.dim_v), lk, 1.0f, s.data(), lk, v,
                  static_cast<int>(p.v_stride[1]), 0.0f, o, static_cast<int>(p.o_stride[1]));
    }
  }
}

}  // namespace omniattn::bench
