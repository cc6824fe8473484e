// omniattn: the one plain params struct every attention kernel (and the oracle) sees.
// Built once by make_params() after validation: pointers, int64 strides in elements, sizes and precomputed scalars.
// No framework types, no ownership.
#pragma once

#include <cstdint>
#include <vector>

#include "omniattn/spec.h"
#include "omniattn/tensor.h"

namespace omniattn {

struct attn_params {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // null when LSE is not requested
  dtype in_type = dtype::f32;
  dtype out_type = dtype::f32;

  std::int64_t batch = 0;  // number of sequences (num_seqs for varlen)
  std::int64_t seq_q = 0, seq_k = 0;  // per-sequence lengths for fixed-length batches; max lengths for varlen
  std::int64_t heads_q = 0, heads_kv = 0, group = 1;  // group = heads_q / heads_kv
  std::int64_t dim_qk = 0, dim_v = 0;
  std::int64_t seq_rows_q = 0, seq_rows_k = 0;  // rows of the q / k tensors' seq dimension (total tokens for varlen)

  // Strides in elements, order: batch, seq, head, dim.
  std::int64_t q_stride[4] = {}, k_stride[4] = {}, v_stride[4] = {}, o_stride[4] = {};
  std::int64_t lse_stride[3] = {};  // batch, head, seq

  const std::int64_t* cu_seqlens_q = nullptr;  // varlen only (then the tensors have batch 1)
  const std::int64_t* cu_seqlens_k = nullptr;

  // A block of a larger problem (options::block): q row i is position pos_q0 + i and key j position pos_k0 + j of a
  // problem of total_q x total_k, which masks, scores, RoPE and the causal alignment see. Zeros: the call itself
  // (positions from 0, totals = seq_q / seq_k), so hand-filled params need not set them. Fixed-length batches only.
  std::int64_t pos_q0 = 0, pos_k0 = 0, total_q = 0, total_k = 0;
  // Likewise for heads: q head h is head head0 + h of total_heads (0: the call's own), which masks, scores, block
  // masks and their tables see (sink_logits already points at the call's first head). K/V heads follow the group.
  std::int64_t head0 = 0, total_heads = 0;

  double scale = 1.0;
  float scale_log2 = 1.0f;  // scale * log2(e): kernels use exp2
  causal_mode causal = causal_mode::none;
  const mask_expr* mask = nullptr;  // null when absent
  const score_fn* score = nullptr;
  const block_mask* blocks = nullptr;
  const float* sink_logits = nullptr;  // per query head, natural-log units; null when absent
  const rope_spec* rope = nullptr;     // null when absent; rotary_dim resolved (> 0)
  std::int64_t rope_dim = 0;           // resolved rotary dim
  run_stats* stats = nullptr;
  int threads = 1;
};

// The backward pass (attention_backward): the forward's params, where out and lse are inputs, plus the incoming
// gradient d_out and the gradient outputs. Strides in elements, order batch, seq, head, dim.
struct attn_bwd_params {
  attn_params fwd;
  const void* d_out = nullptr;
  dtype d_out_type = dtype::f32;
  std::int64_t do_stride[4] = {};
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  dtype dq_type = dtype::f32, dk_type = dtype::f32, dv_type = dtype::f32;
  std::int64_t dq_stride[4] = {}, dk_stride[4] = {}, dv_stride[4] = {};
  float* d_sink = nullptr;  // [heads_q], or null
  float* d_bias = nullptr;  // contiguous, the shape of the score chain's bias tensor, or null
};

// The lengths masks and scores see: the whole problem's (options::block), else the call's.
inline std::int64_t total_q(const attn_params& p) { return p.total_q ? p.total_q : p.seq_q; }
inline std::int64_t total_k(const attn_params& p) { return p.total_k ? p.total_k : p.seq_k; }
inline std::int64_t total_heads(const attn_params& p) { return p.total_heads ? p.total_heads : p.heads_q; }

// One sequence of a (possibly varlen) batch: where its rows start in the tensors and how long it is, and which
// positions of which lengths its rows and keys are for the spec's functors (q row i is position q_pos + i of q_total).
struct seq_extent {
  std::int64_t q_begin, q_len, k_begin, k_len, tensor_batch;
  std::int64_t q_pos = 0, k_pos = 0, q_total = 0, k_total = 0;
};

inline seq_extent sequence(const attn_params& p, std::int64_t b) {
  if (p.cu_seqlens_q) {
    const std::int64_t lq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b], lk = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    return {p.cu_seqlens_q[b], lq, p.cu_seqlens_k[b], lk, 0, 0, 0, lq, lk};
  }
  return {0, p.seq_q, 0, p.seq_k, b, p.pos_q0, p.pos_k0, total_q(p), total_k(p)};
}

// RoPE angle of rotary pair `pair` for a token (row index `row` in its tensor, sequence-local position `local`):
// pos * theta^(-2 pair / R). q_side picks pos_q and the default query alignment. Shared by the oracle and the kernels.
double rope_angle(const attn_params& p, bool q_side, std::int64_t tensor_batch, std::int64_t row, std::int64_t local,
                  std::int64_t lq, std::int64_t lk, std::int64_t pair);
// Rotates one row of dim_qk values in place (double, for the oracle) / (float, for the kernels).
void rope_rotate(const attn_params& p, bool q_side, std::int64_t tensor_batch, std::int64_t row, std::int64_t local,
                 std::int64_t lq, std::int64_t lk, double* x);
void rope_rotate(const attn_params& p, bool q_side, std::int64_t tensor_batch, std::int64_t row, std::int64_t local,
                 std::int64_t lq, std::int64_t lk, float* x);

// The inverse rotation (R^T), for gradients: double for the oracle, float from the tables for the kernels.
void rope_rotate_back(const attn_params& p, bool q_side, std::int64_t tensor_batch, std::int64_t row, std::int64_t local,
                      std::int64_t lq, std::int64_t lk, double* x);
void rope_rotate_back(const attn_params& p, bool q_side, std::int64_t tensor_batch, std::int64_t row, std::int64_t local,
                      std::int64_t lq, std::int64_t lk, float* x);
void rope_apply_back(const attn_params& p, const float* cos_row, const float* sin_row, float* x);

// Per-token cos / sin tables of the RoPE angles, [rows of the tensor (all batches)][rope_dim / 2], for the kernels.
void rope_tables(const attn_params& p, bool q_side, std::vector<float>& cos_table, std::vector<float>& sin_table);
// Rotates x in place with one token's table rows.
void rope_apply(const attn_params& p, const float* cos_row, const float* sin_row, float* x);

// Causal predicate shared by every backend.
inline bool causal_allows(causal_mode c, std::int64_t i, std::int64_t j, std::int64_t lq, std::int64_t lk) {
  switch (c) {
    case causal_mode::none: return true;
    case causal_mode::top_left: return j <= i;
    case causal_mode::bottom_right: return j <= i + (lk - lq);
  }
  return true;
}

// The element predicate of the spec (causal, block mask, mask functor), shared by the oracle and the kernels' PARTIAL tiles.
inline bool element_allowed(const attn_params& p, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j,
                            std::int64_t lq, std::int64_t lk) {
  if (!causal_allows(p.causal, i, j, lq, lk)) return false;
  if (p.blocks) {
    const tile_kind t = p.blocks->at(b, h, i / p.blocks->q_tile, j / p.blocks->kv_tile);
    if (t == tile_kind::empty) return false;
    if (t == tile_kind::full) return true;
  }
  return !p.mask || p.mask->allows(b, h, i, j, lq, lk);
}

// Bit t set iff key k0 + t (t < n <= 64) is allowed for query row i: the same predicate as element_allowed, one
// word per row (closed forms for causal and the built-in patterns). Used on the kernels' PARTIAL tiles.
std::uint64_t row_allowed_bits(const attn_params& p, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0,
                               std::int64_t n, std::int64_t lq, std::int64_t lk);

}  // namespace omniattn
