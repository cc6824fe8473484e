// A problem description shared by the tests, the CLI (`omniattn check`, `explain`) and the benchmark:
// shape, dtype, layout and spec, plus owned, seeded random data to run it on.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "omniattn/attention.h"
#include "omniattn/scores.h"

namespace omniattn {

enum class layout : std::uint8_t { bshd, bhsd };

struct problem {
  std::int64_t batch = 1, seq_q = 128, seq_k = 128, heads_q = 8, heads_kv = 8, dim_qk = 64, dim_v = 64;
  dtype type = dtype::f32;
  bool out_f32 = false;  // write the output in f32 whatever the input dtype
  layout lay = layout::bshd;
  causal_mode causal = causal_mode::none;
  std::vector<std::int64_t> seqlens_q, seqlens_k;  // varlen when non-empty (then batch = number of sequences)
  std::optional<double> scale;
  bool lse = true;
  std::uint64_t seed = 1;
  double input_range = 1.0;  // inputs uniform in [-range, range]
  std::string score_spec;    // score modifier spec string (README grammar, parse_score), "" for none
  score_fn score;            // score_spec parsed for heads_q (set by parse_problem / set_problem_score)

  bool is_varlen() const { return !seqlens_q.empty(); }
  std::string describe() const;
};

// Parses "b=2,lq=128,lk=96,hq=8,hkv=2,d=64,dv=32,dtype=bf16,causal=bottom_right,layout=bhsd,varlen=3:5/7:2,seed=3,
// score=alibi + softcap(30)". Items are split at commas outside parentheses, so a score spec may hold argument lists.
// Unknown keys or malformed values give an error naming the key.
status parse_problem(const std::string& text, problem& out);

// Sets the problem's score modifier from a spec string (parse_score with the problem's heads_q; "" or "none" clears
// it). The error is "[problem] score=...: [spec] at N: ..." with the caret.
status set_problem_score(problem& p, const std::string& spec_text);

// Owned buffers for a problem, filled with seeded uniform values (rounded to the storage dtype).
struct problem_data {
  problem prob;
  std::vector<std::uint8_t> q, k, v, out;
  std::vector<float> lse;
  std::vector<std::int64_t> cu_q, cu_k;
  varlen packed;

  explicit problem_data(const problem& p);
  tensor q_view() const;
  tensor k_view() const;
  tensor v_view() const;
  tensor out_view() const;
  lse_tensor lse_view() const;
  options make_options(backend b, int threads = 0) const;
  // Output element (batch, seq, head, dim) as double, whatever the dtype and layout.
  double out_at(std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) const;
};

// Buffers of a backward run of a problem: the incoming gradient d_out (seeded uniform, out's dtype) and the gradients
// dq, dk, dv (the input dtype, or f32 with out_f32), d_sink (with sink logits). The forward's out and lse come from
// the problem_data the backward runs on.
struct backward_data {
  problem prob;
  std::vector<std::uint8_t> d_out, dq, dk, dv;
  std::vector<float> d_sink;

  backward_data(const problem& p, std::uint64_t seed);
  dtype grad_type() const { return prob.out_f32 ? dtype::f32 : prob.type; }
  tensor d_out_view() const;
  tensor dq_view() const;
  tensor dk_view() const;
  tensor dv_view() const;
  gradients grads(bool with_sink) const;
  // Gradient element (batch, seq, head, dim) of dq (0), dk (1) or dv (2) as double.
  double grad_at(int which, std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) const;
};

// attention_backward on a backend for the forward result in `fwd` (which needs its lse); gradients land in bwd.
status run_backward_problem(const problem_data& fwd, backward_data& bwd, const spec& s, backend b, int threads = 0);
// The naive float backward (naive_attention_backward_f32) on the same buffers.
status run_naive_backward(const problem_data& fwd, backward_data& bwd, const spec& s);

// Total count of (query, key) pairs the spec allows, over all batches and heads: the FLOP count is 2*area*(dqk+dv).
std::int64_t mask_area(const attn_params& p);

// Runs a problem on a backend with the given spec; out and lse land in data.
status run_problem(problem_data& data, const spec& s, backend b, int threads = 0);

// The naive unfused path in float: materialized scores, float softmax, float PV; used to calibrate tolerances
// (FlashAttention's rule: the kernel's error may be at most 2x this path's) and as a benchmark baseline.
void naive_attention_f32(const attn_params& p);
// The same for the backward: the oracle's loops in float (materialized P and dS per row, float sums).
void naive_attention_backward_f32(const attn_bwd_params& p);

}  // namespace omniattn
