// Benchmark baselines that are not part of the library: the unfused OpenBLAS path, forward and backward.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
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
      // A one-row q / out (decoding) may carry seq stride 0; any leading dimension >= the row length is then valid.
#pragma omp parallel num_threads(threads)
      {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int r0 = static_cast<int>(static_cast<std::int64_t>(lq) * t / nt);
        const int r1 = static_cast<int>(static_cast<std::int64_t>(lq) * (t + 1) / nt);
        if (r1 > r0 && lk > 0) {
          float* rows = s.data() + static_cast<std::size_t>(r0) * lk;
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, lk, static_cast<int>(p.dim_qk), static_cast<float>(p.scale),
                      q + r0 * p.q_stride[1], static_cast<int>(std::max(p.q_stride[1], p.dim_qk)), k, static_cast<int>(p.k_stride[1]), 0.0f, rows, lk);
          for (int i = r0; i < r1; ++i) {
            const int allowed = p.causal == causal_mode::none        ? lk
                                : p.causal == causal_mode::top_left ? std::min(lk, i + 1)
                                                                    : std::clamp(i + lk - lq + 1, 0, lk);
            softmax_row(s.data() + static_cast<std::size_t>(i) * lk, allowed, lk);
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, static_cast<int>(p.dim_v), lk, 1.0f, rows, lk, v,
                      static_cast<int>(p.v_stride[1]), 0.0f, o + r0 * p.o_stride[1], static_cast<int>(std::max(p.o_stride[1], p.dim_v)));
        }
      }
    }
  }
}

namespace {

// The half-open share [begin, end) of n items of thread t out of nt.
void share(std::int64_t n, int t, int nt, int& begin, int& end) {
  begin = static_cast<int>(n * t / nt);
  end = static_cast<int>(n * (t + 1) / nt);
}

// Row i of the score matrix (lk entries, already scale q.k) gets -inf on the pairs the spec masks, then the softmax.
// Causal alone is a prefix (softmax_row's `allowed`); a mask or block mask goes through the kernels' row words.
void masked_softmax_row(const attn_params& p, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t lq,
                        std::int64_t lk, float* row) {
  if (!p.mask && !p.blocks) {
    const std::int64_t allowed = p.causal == causal_mode::none        ? lk
                                 : p.causal == causal_mode::top_left ? std::min(lk, i + 1)
                                                                     : std::clamp(i + lk - lq + 1, std::int64_t{0}, lk);
    softmax_row(row, allowed, lk);
    return;
  }
  for (std::int64_t k0 = 0; k0 < lk; k0 += 64) {
    const std::int64_t n = std::min<std::int64_t>(64, lk - k0);
    const std::uint64_t bits = row_allowed_bits(p, b, h, i, k0, n, lq, lk);
    for (std::int64_t t = 0; t < n; ++t)
      if (!(bits >> t & 1)) row[k0 + t] = -std::numeric_limits<float>::infinity();
  }
  softmax_row(row, lk, lk);
}

}  // namespace

void openblas_unfused_backward(const attn_bwd_params& bp, int threads) {
  const attn_params& p = bp.fwd;
  openblas_set_num_threads(1);
  std::vector<float> pm, ds;  // P and dP (then dS), Lq x Lk each: what an unfused backward keeps per head
  const auto scale = static_cast<float>(p.scale);
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    const auto lq = static_cast<int>(e.q_len), lk = static_cast<int>(e.k_len);
    const auto dqk = static_cast<int>(p.dim_qk), dvd = static_cast<int>(p.dim_v);
    pm.resize(static_cast<std::size_t>(e.q_len * e.k_len));
    ds.resize(pm.size());
    for (std::int64_t h = 0; h < p.heads_q; ++h) {
      const std::int64_t kvh = h / p.group;
      const bool first_of_group = h % p.group == 0;  // dK, dV of the kv head start here (beta 0), later heads add
      const float* q = static_cast<const float*>(p.q) + e.tensor_batch * p.q_stride[0] + e.q_begin * p.q_stride[1] + h * p.q_stride[2];
      const float* k = static_cast<const float*>(p.k) + e.tensor_batch * p.k_stride[0] + e.k_begin * p.k_stride[1] + kvh * p.k_stride[2];
      const float* v = static_cast<const float*>(p.v) + e.tensor_batch * p.v_stride[0] + e.k_begin * p.v_stride[1] + kvh * p.v_stride[2];
      const float* o = static_cast<const float*>(p.out) + e.tensor_batch * p.o_stride[0] + e.q_begin * p.o_stride[1] + h * p.o_stride[2];
      const float* d_o = static_cast<const float*>(bp.d_out) + e.tensor_batch * bp.do_stride[0] + e.q_begin * bp.do_stride[1] + h * bp.do_stride[2];
      float* dq = static_cast<float*>(bp.dq) + e.tensor_batch * bp.dq_stride[0] + e.q_begin * bp.dq_stride[1] + h * bp.dq_stride[2];
      float* dk = static_cast<float*>(bp.dk) + e.tensor_batch * bp.dk_stride[0] + e.k_begin * bp.dk_stride[1] + kvh * bp.dk_stride[2];
      float* dv = static_cast<float*>(bp.dv) + e.tensor_batch * bp.dv_stride[0] + e.k_begin * bp.dv_stride[1] + kvh * bp.dv_stride[2];
      const int ldq = static_cast<int>(p.q_stride[1]), ldk = static_cast<int>(p.k_stride[1]), ldv = static_cast<int>(p.v_stride[1]);
      const int ldo = static_cast<int>(p.o_stride[1]), lddo = static_cast<int>(bp.do_stride[1]);
      const int lddq = static_cast<int>(bp.dq_stride[1]), lddk = static_cast<int>(bp.dk_stride[1]), lddv = static_cast<int>(bp.dv_stride[1]);
#pragma omp parallel num_threads(threads)
      {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int r0 = 0, r1 = 0;
        share(lq, t, nt, r0, r1);
        if (r1 > r0 && lk == 0) {
          for (int i = r0; i < r1; ++i) std::memset(dq + static_cast<std::ptrdiff_t>(i) * lddq, 0, sizeof(float) * static_cast<std::size_t>(dqk));
        } else if (r1 > r0) {
          float* prow = pm.data() + static_cast<std::size_t>(r0) * lk;
          float* dsrow = ds.data() + static_cast<std::size_t>(r0) * lk;
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, lk, dqk, scale, q + static_cast<std::ptrdiff_t>(r0) * ldq, ldq,
                      k, ldk, 0.0f, prow, lk);
          for (int i = r0; i < r1; ++i) masked_softmax_row(p, b, h, i, lq, lk, pm.data() + static_cast<std::size_t>(i) * lk);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, lk, dvd, 1.0f, d_o + static_cast<std::ptrdiff_t>(r0) * lddo,
                      lddo, v, ldv, 0.0f, dsrow, lk);
          for (int i = r0; i < r1; ++i) {
            const float* oi = o + static_cast<std::ptrdiff_t>(i) * ldo;
            const float* doi = d_o + static_cast<std::ptrdiff_t>(i) * lddo;
            float delta = 0.0f;  // D_i = rowsum(dO_i * O_i)
            for (int d = 0; d < dvd; ++d) delta += doi[d] * oi[d];
            const float* pi = pm.data() + static_cast<std::size_t>(i) * lk;
            float* si = ds.data() + static_cast<std::size_t>(i) * lk;
            for (int j = 0; j < lk; ++j) si[j] = pi[j] * (si[j] - delta);  // dS = P (dP - D); masked pairs: P = 0
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, dqk, lk, scale, dsrow, lk, k, ldk, 0.0f,
                      dq + static_cast<std::ptrdiff_t>(r0) * lddq, lddq);
        }
#pragma omp barrier
        int c0 = 0, c1 = 0;
        share(lk, t, nt, c0, c1);
        if (c1 > c0 && lq == 0) {
          if (first_of_group)
            for (int j = c0; j < c1; ++j) {
              std::memset(dk + static_cast<std::ptrdiff_t>(j) * lddk, 0, sizeof(float) * static_cast<std::size_t>(dqk));
              std::memset(dv + static_cast<std::ptrdiff_t>(j) * lddv, 0, sizeof(float) * static_cast<std::size_t>(dvd));
            }
        } else if (c1 > c0) {
          const float beta = first_of_group ? 0.0f : 1.0f;
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c1 - c0, dvd, lq, 1.0f, pm.data() + c0, lk, d_o, lddo, beta,
                      dv + static_cast<std::ptrdiff_t>(c0) * lddv, lddv);
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c1 - c0, dqk, lq, scale, ds.data() + c0, lk, q, ldq, beta,
                      dk + static_cast<std::ptrdiff_t>(c0) * lddk, lddk);
        }
      }
    }
  }
}

}  // namespace omniattn::bench
