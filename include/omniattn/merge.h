// omniattn: merging partial attention results (FlashInfer's merge_states, xFormers' merge_attentions).
//
// Attention of one query over a key set K split into disjoint parts K_1 ... K_n (split-K decoding, a shared prefix
// and per-request suffixes in cascade attention, KV shards of context parallelism) is recovered from the parts'
// outputs and log-sum-exps alone: with out_i = attention over K_i and lse_i = log sum_{j in K_i} exp(s_j),
//   m = max_i lse_i,  w_i = exp(lse_i - m)
//   out = sum_i w_i out_i / sum_i w_i,  lse = m + log(sum_i w_i)      (= attention and LSE over all of K)
// per (batch, query, head) row, computed in fp32 with the parts summed in the order given: the result depends only on
// the parts and their order, never on the thread count. A part with lse = -inf (no allowed key in its set) has weight
// 0 and its out is not read into the sum; when every part is -inf, out is 0 and lse -inf. A NaN or +inf lse makes the
// row NaN. A sink logit is a part with lse = sink and out = 0.
//
//   outs[i]  [batch, seq, heads, dim]   every part of one shape; any strides; each f32, bf16, f16 or f64 on its own
//   lses[i]  [batch, heads, seq] float32, natural log (what options::lse returns)
//   out      [batch, seq, heads, dim]   f32, bf16, f16 or f64; must not overlap itself or any input
//   lse_out  [batch, heads, seq] float32, optional; must not overlap itself, any input or out
//   threads  0 = all cores
// As everywhere in the library, errors never throw and never touch the outputs: the status names the argument and
// the rule it broke, e.g. "[merge_attention_states] outs[1].seq 7 != outs[0].seq 9".
#pragma once

#include <span>

#include "omniattn/attention.h"
#include "omniattn/tensor.h"

namespace omniattn {

status merge_attention_states(std::span<const tensor> outs, std::span<const lse_tensor> lses, const tensor& out,
                              const lse_tensor* lse_out = nullptr, int threads = 0);

}  // namespace omniattn
