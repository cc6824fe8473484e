// omniattn: the attention entry points.
//
//   q   [batch, seq_q, heads_q,  dim_qk]
//   k   [batch, seq_k, heads_kv, dim_qk]     heads_q % heads_kv == 0 (MHA, GQA, MQA)
//   v   [batch, seq_k, heads_kv, dim_v]      dim_v may differ from dim_qk
//   out [batch, seq_q, heads_q,  dim_v]      dtype of q, or f32
//   lse [batch, heads_q, seq_q] float32      optional (options::lse)
// q, k, v share one dtype (f32, bf16, f16); accumulation is always at least fp32. See spec.h for the math contract.
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

// Memory kept between calls. Each calling thread keeps its packed K/V buffers for its next call (a fresh multi-MiB
// buffer costs a page fault per 4 KiB on first touch), up to this many bytes; larger buffers are freed when their call
// returns. Default 32 MiB per thread, or OMNIATTN_SCRATCH_RETAIN_MB; 0 keeps nothing. Returns the previous limit.
std::int64_t set_scratch_retention(std::int64_t bytes);

// Build the tile structure of the spec in params (causal, block mask, mask functor) for the given tile sizes.
// Causal tiles are classified analytically; a mask functor is evaluated exactly on the tiles causal leaves non-empty.
// Throws std::invalid_argument for tile sizes <= 0, a p.causal that is not a causal_mode and a p.mask that fails check().
block_mask build_block_mask(const attn_params& p, std::int64_t q_tile, std::int64_t kv_tile);

}  // namespace omniattn
