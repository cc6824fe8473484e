// Benchmark baselines that are not part of the library: the unfused OpenBLAS path.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "bench/bench.h"

namespace omniattn::bench {

void set_openblas_threads(int threads) { openblas_set_num_threads(threads); }  // openblas_unfused sets 1 itself

const char* openblas_core() { return openblas_get_corename(); }

// One thread pool: OpenBLAS runs single-threaded inside OpenMP threads that split each head's query rows. OpenBLAS's
// own (pthreads) workers next to OpenMP threads oversubscribe the cores (each pool spins while the other works), which
// made this baseline 10-20x slower at small N and erratic; one pool is what an unfused framework path does.
void openblas_unfused(const attn_params& p, int threads) {
  openblas_set_num_threads(1);
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
#pragma omp parallel num_threads(threads)
      {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int r0 = static_cast<int>(static_cast<std::int64_t>(lq) * t / nt);
        const int r1 = static_cast<int>(static_cast<std::int64_t>(lq) * (t + 1) / nt);
        if (r1 > r0 && lk > 0) {
          float* rows = s.data() + static_cast<std::size_t>(r0) * lk;
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, lk, static_cast<int>(p.dim_qk), static_cast<float>(p.scale),
                      q + r0 * p.q_stride[1], static_cast<int>(p.q_stride[1]), k, static_cast<int>(p.k_stride[1]), 0.0f, rows, lk);
          for (int i = r0; i < r1; ++i) {
            const int allowed = p.causal == causal_mode::none        ? lk
                                : p.causal == causal_mode::top_left ? std::min(lk, i + 1)
                                                                    : std::clamp(i + lk - lq + 1, 0, lk);
            softmax_row(s.data() + static_cast<std::size_t>(i) * lk, allowed, lk);
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, static_cast<int>(p.dim_v), lk, 1.0f, rows, lk, v,
                      static_cast<int>(p.v_stride[1]), 0.0f, o + r0 * p.o_stride[1], static_cast<int>(p.o_stride[1]));
        }
      }
    }
  }
}

}  // namespace omniattn::bench
