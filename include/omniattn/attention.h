// omniattn: the attention entry points.
//
//   q   [batch, seq_q, heads_q,  dim_qk]
//   k   [batch, seq_k, heads_kv, dim_qk]     heads_q % heads_kv == 0 (MHA, GQA, MQA)
//   v   [batch, seq_k, heads_kv, dim_v]      dim_v may differ from dim_qk
//   out [batch, seq_q, heads_q,  dim_v]      dtype of q, or f32
//   lse [batch, heads_q, seq_q] float32      optional (options::lse)
// q, k, v share one dtype (f32, bf16, f16; f64 on the reference backend only); accumulation is always at least fp32.
// See spec.h for the math contract.
// Empty calls are valid (as in PyTorch SDPA and FlashAttention's varlen): batch, seq_q or heads 0 (and varlen
// sequences of length 0) leave nothing to compute; seq_k 0 makes every row one with no allowed key (out 0, lse -inf,
// or lse = sink with sink logits). An empty tensor's data may be null. head dims must be > 0.
//
// Errors never throw and never touch the output: the returned status names the argument and the rule it broke,
// e.g. "[attention] k.dim 96 != q.dim 128".
#pragma once

#include <string>
#include <vector>

#include "omniattn/params.h"
#include "omniattn/spec.h"
#include "omniattn/tensor.h"

namespace omniattn {

struct status {
  std::string error;  // empty on success
  bool ok() const { return error.empty(); }
  explicit operator bool() const { return ok(); }
};

status attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s = {},
                 const options& opt = {});

// Validates the call and fills the params struct; the first rule broken is reported.
status make_params(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s,
                   const options& opt, attn_params& p);

// Kernel selection: what would run for these params on a backend, or every reason why nothing can.
using kernel_fn = void (*)(const attn_params&);
struct selection {
  kernel_fn run = nullptr;
  std::string name;                  // kernel that would run
  std::vector<std::string> reasons;  // why it was chosen, or why each candidate was rejected
  bool ok() const { return run != nullptr; }
};
selection select(const attn_params& p, backend b);

// The fp64 oracle (plain loops, no SIMD, no threads). Also reachable as backend::reference.
void reference_attention(const attn_params& p);

// ---- Backward ----
//
// attention_backward: the gradients of a loss L through out = attention(q, k, v, spec), given d_out = dL/d out and
// the forward's out and lse (FlashAttention-2's algorithm: P is recomputed from the LSE, D_i = rowsum(d_out_i * out_i)):
//   P_ij  = exp(s_ij - lse_i) over the allowed pairs (s_ij the final logit of the spec, after every score modifier)
//   dV_j  = sum_i P_ij d_out_i,  dP_ij = <d_out_i, v_j>,  dS_ij = P_ij (dP_ij - D_i)
//   dQ_i  = sum_j dS_ij * ds_ij/d(q.k) k_j,  dK_j = sum_i dS_ij * ds_ij/d(q.k) q_i   (with RoPE: w.r.t. the unrotated
//           q, k, i.e. rotated back; with GQA / MQA dK, dV are summed over the q heads of each kv head)
//   d sink_h = -sum_i exp(sink_h - lse_i) D_i    (the sink joins the normalizer and carries no value)
// ds/d(q.k) is the softmax scale times the chain rule through the score modifiers: every built-in has a closed form;
// a user modifier needs a derivative (scores::inlined(f, df), scores::differentiable(f, df)), else the call fails.
// Rows with no allowed key (lse -inf) contribute nothing: their dq rows are 0 and they add 0 to dk, dv.
// out and lse must be what the forward returned for the same inputs and spec (lse is required: make it with
// options::lse); out must be as accurate as possible (an f32 out for bf16 inputs gives a better D).
// The CPU kernel is deterministic: results are bitwise identical for any thread count.
struct gradients {
  tensor dq, dk, dv;  // shapes of q, k, v; dtype q's or f32 (each on its own); written entirely
  // Optional: the gradient of spec.sink_logits, one float per query head (requires spec.sink_logits).
  float* d_sink_logits = nullptr;
  // Optional: the gradient of the dense bias tensor of spec.score (scores::bias; exactly one in the chain), as a
  // contiguous row-major float32 array of the bias's shape (broadcast dims of size 1 hold the sum over that dim).
  float* d_bias = nullptr;
};

// options::block: the block's share of the gradients of the whole problem (context-parallel training). out and lse
// (and d_out) are the whole problem's rows of the block (out of the whole forward, lse over every key), so
// P = exp(s - lse) is the whole row's; dq holds the sum over the block's keys, dk and dv over its rows: summed over
// the key blocks (dq) and the row blocks (dk, dv) they give the whole problem's gradients. d_sink_logits and d_bias
// are not taken with a block.
status attention_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const lse_tensor& lse,
                          const tensor& d_out, const gradients& g, const spec& s = {}, const options& opt = {});

// Validates a backward call and fills its params struct (options.lse is ignored: lse is an argument here).
status make_backward_params(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const lse_tensor& lse,
                            const tensor& d_out, const gradients& g, const spec& s, const options& opt,
                            attn_bwd_params& p);

using backward_kernel_fn = void (*)(const attn_bwd_params&);
struct backward_selection {
  backward_kernel_fn run = nullptr;
  std::string name;
  std::vector<std::string> reasons;
  bool ok() const { return run != nullptr; }
};
backward_selection select_backward(const attn_bwd_params& p, backend b);

// The fp64 oracle of the backward pass (plain loops; recomputes the forward in fp64 and ignores p.fwd.out / lse, except
// for a block of a larger problem, whose rows' lse and D = <d_out, out> are the whole problem's: read from them).
void reference_attention_backward(const attn_bwd_params& p);

// Memory kept between calls. Each calling thread keeps its packed K/V buffers for its next call (a fresh multi-MiB
// buffer costs a page fault per 4 KiB on first touch), up to this many bytes; larger buffers are freed when their call
// returns. Default 32 MiB per thread, or OMNIATTN_SCRATCH_RETAIN_MB; 0 keeps nothing. Returns the previous limit.
std::int64_t set_scratch_retention(std::int64_t bytes);

// Build the tile structure of the spec in params (causal, block mask, mask functor) for the given tile sizes.
// Causal tiles are classified analytically; a mask functor is evaluated exactly on the tiles causal leaves non-empty.
// Throws std::invalid_argument for tile sizes <= 0, a p.causal that is not a causal_mode and a p.mask that fails check().
block_mask build_block_mask(const attn_params& p, std::int64_t q_tile, std::int64_t kv_tile);

}  // namespace omniattn
