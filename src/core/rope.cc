// RoPE angles and rotations (contract in include/omniattn/rope.h), shared by the oracle and the CPU kernels.
#include <cmath>

#include "omniattn/params.h"

namespace omniattn {

double rope_angle(const attn_params& p, bool q_side, std::int64_t tensor_batch, std::int64_t row, std::int64_t local,
                  std::int64_t lq, std::int64_t lk, std::int64_t pair) {
  const rope_spec& r = *p.rope;
  const std::int64_t* ids = q_side ? r.pos_q : r.pos_k;
  double pos = 0.0;
  if (!ids) {
    pos = static_cast<double>(q_side ? local + (lk - lq) : local);
  } else {
    std::int64_t axis = 0, first = 0;
    for (std::int64_t a = 0; a < static_cast<std::int64_t>(r.sections.size()); ++a) {
      if (pair < first + r.sections[static_cast<std::size_t>(a)]) {
        axis = a;
        break;
      }
      first += r.sections[static_cast<std::size_t>(a)];
    }
    const std::int64_t seq = q_side ? p.seq_rows_q : p.seq_rows_k;  // rows per batch in the tensor
    const std::int64_t batches = p.cu_seqlens_q ? 1 : p.batch;
    pos = static_cast<double>(ids[axis * batches * seq + tensor_batch * seq + row]);
  }
  return pos * std::pow(r.theta, -2.0 * static_cast<double>(pair) / static_cast<double>(p.rope_dim));
}

namespace {

// sign -1 rotates back (R^T = R(-angle)): the backward pass maps gradients of rotated q, k to the unrotated inputs.
template <class T>
void rotate(const attn_params& p, bool q_side, std::int64_t tb, std::int64_t row, std::int64_t local, std::int64_t lq,
            std::int64_t lk, T* x, double sign = 1.0) {
  const std::int64_t half = p.rope_dim / 2;
  for (std::int64_t pr = 0; pr < half; ++pr) {
    const double angle = rope_angle(p, q_side, tb, row, local, lq, lk, pr);
    const double c = std::cos(angle), s = sign * std::sin(angle);
    const std::int64_t i1 = p.rope->interleaved ? 2 * pr : pr, i2 = p.rope->interleaved ? 2 * pr + 1 : pr + half;
    const double x1 = static_cast<double>(x[i1]), x2 = static_cast<double>(x[i2]);
    x[i1] = static_cast<T>(x1 * c - x2 * s);
    x[i2] = static_cast<T>(x1 * s + x2 * c);
  }
}

}  // namespace

void rope_rotate(const attn_params& p, bool q_side, std::int64_t tb, std::int64_t row, std::int64_t local, std::int64_t lq,
                 std::int64_t lk, double* x) {
  rotate(p, q_side, tb, row, local, lq, lk, x);
}

void rope_rotate(const attn_params& p, bool q_side, std::int64_t tb, std::int64_t row, std::int64_t local, std::int64_t lq,
                 std::int64_t lk, float* x) {
  rotate(p, q_side, tb, row, local, lq, lk, x);
}

void rope_rotate_back(const attn_params& p, bool q_side, std::int64_t tb, std::int64_t row, std::int64_t local,
                      std::int64_t lq, std::int64_t lk, double* x) {
  rotate(p, q_side, tb, row, local, lq, lk, x, -1.0);
}

void rope_rotate_back(const attn_params& p, bool q_side, std::int64_t tb, std::int64_t row, std::int64_t local,
                      std::int64_t lq, std::int64_t lk, float* x) {
  rotate(p, q_side, tb, row, local, lq, lk, x, -1.0);
}

void rope_apply_back(const attn_params& p, const float* cos_row, const float* sin_row, float* x) {
  const std::int64_t half = p.rope_dim / 2;
  for (std::int64_t pr = 0; pr < half; ++pr) {
    const std::int64_t i1 = p.rope->interleaved ? 2 * pr : pr, i2 = p.rope->interleaved ? 2 * pr + 1 : pr + half;
    const float x1 = x[i1], x2 = x[i2];
    x[i1] = x1 * cos_row[pr] + x2 * sin_row[pr];
    x[i2] = x2 * cos_row[pr] - x1 * sin_row[pr];
  }
}

void rope_tables(const attn_params& p, bool q_side, std::vector<float>& cos_table, std::vector<float>& sin_table) {
  const std::int64_t half = p.rope_dim / 2, rows = q_side ? p.seq_rows_q : p.seq_rows_k;
  const std::int64_t batches = p.cu_seqlens_q ? 1 : p.batch;
  cos_table.assign(static_cast<std::size_t>(batches * rows * half), 0.0f);
  sin_table.assign(cos_table.size(), 0.0f);
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    const std::int64_t begin = q_side ? e.q_begin : e.k_begin, len = q_side ? e.q_len : e.k_len;
#pragma omp parallel for schedule(static) num_threads(p.threads)
    for (std::int64_t t = 0; t < len; ++t) {
      const std::int64_t row = begin + t;
      const std::size_t at = static_cast<std::size_t>((e.tensor_batch * rows + row) * half);
      for (std::int64_t pr = 0; pr < half; ++pr) {
        const double angle =
            rope_angle(p, q_side, e.tensor_batch, row, (q_side ? e.q_pos : e.k_pos) + t, e.q_total, e.k_total, pr);
        cos_table[at + static_cast<std::size_t>(pr)] = static_cast<float>(std::cos(angle));
        sin_table[at + static_cast<std::size_t>(pr)] = static_cast<float>(std::sin(angle));
      }
    }
  }
}

void rope_apply(const attn_params& p, const float* cos_row, const float* sin_row, float* x) {
  const std::int64_t half = p.rope_dim / 2;
  for (std::int64_t pr = 0; pr < half; ++pr) {
    const std::int64_t i1 = p.rope->interleaved ? 2 * pr : pr, i2 = p.rope->interleaved ? 2 * pr + 1 : pr + half;
    const float x1 = x[i1], x2 = x[i2];
    x[i1] = x1 * cos_row[pr] - x2 * sin_row[pr];
    x[i2] = x1 * sin_row[pr] + x2 * cos_row[pr];
  }
}

}  // namespace omniattn
