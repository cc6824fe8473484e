// omniattn: the attention spec — everything about an attention call that is not a tensor.
//
// Semantics (the contract every backend and the fp64 oracle implement):
//   for each batch b (or varlen sequence), query head h, query i < Lq:
//     kvh      = h / (heads_q / heads_kv)                      (GQA / MQA grouping)
//     allowed  = causal(i, j) && block(i, j) && mask(b, h, i, j)
//     s_ij     = score(scale * <R(q_i), R(k_j)>, b, h, i, j)    for allowed j; a score of -inf masks the pair
//                (R = the RoPE rotation of rope.h when spec.rope is set, identity otherwise)
//     out_i    = sum_j softmax_j(s_ij) * v_j                    (0 if no j is allowed)
//     lse_i    = log(sum_j exp(s_ij))                           (-inf if no j is allowed)
//   With sink logits (a learnable sink, gpt-oss / StreamingLLM calibration), the row's softmax has one more logit,
//   sink[h], that takes probability mass but has no value: lse_i = log(exp(sink[h]) + sum_j exp(s_ij)),
//   out_i = sum_j exp(s_ij - lse_i) v_j; a row with nothing allowed then gives out_i = 0 and lse_i = sink[h].
//   i and j are positions inside the sequence (0-based), also for varlen.
//   causal top_left:     j <= i                  (FlashAttention < 2.1, PyTorch is_causal)
//   causal bottom_right: j <= i + Lk - Lq        (FlashAttention >= 2.1: the last query sees the last key)
//   block(i, j): with a block mask, EMPTY tiles are masked, FULL tiles are allowed without evaluating `mask`,
//   PARTIAL tiles evaluate `mask` (FlexAttention's BlockMask contract).
//   Inputs are assumed finite. As in FlashAttention, kernels compute masked pairs of a visited tile and give them
//   probability exactly 0, so an inf / NaN in a masked key's K or V row can still reach an output (0 * inf).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "omniattn/masks.h"
#include "omniattn/rope.h"
#include "omniattn/tensor.h"

namespace omniattn {

enum class causal_mode : std::uint8_t { none, top_left, bottom_right };

// score(s, b, h, q, k) -> modified logit; s is already multiplied by the softmax scale. Evaluated in double by the
// oracle and in float by the kernels, so it must be a plain function of its arguments.
using score_fn = std::function<double(double s, std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k)>;

enum class tile_kind : std::uint8_t { empty = 0, partial = 1, full = 2 };

// Tile-level structure of a mask: for each (batch, head, q tile, kv tile) whether the tile is empty, partial or full.
// batch and heads may be 1 to broadcast over all batches / heads. Tile sizes are in tokens.
struct block_mask {
  std::int64_t q_tile = 0, kv_tile = 0;
  std::int64_t batch = 0, heads = 0, q_tiles = 0, kv_tiles = 0;
  std::vector<tile_kind> kinds;  // [batch][heads][q_tiles][kv_tiles], row-major

  tile_kind at(std::int64_t b, std::int64_t h, std::int64_t qt, std::int64_t kt) const {
    const std::int64_t bb = batch == 1 ? 0 : b, hh = heads == 1 ? 0 : h;
    return kinds[static_cast<std::size_t>(((bb * heads + hh) * q_tiles + qt) * kv_tiles + kt)];
  }
};

struct spec {
  std::optional<double> scale;  // softmax scale; default 1/sqrt(q.head_dim)
  causal_mode causal = causal_mode::none;
  mask_expr mask;                      // optional mask: built-in patterns, compositions, user predicates (masks.h)
  score_fn score;                      // optional score modifier
  const block_mask* blocks = nullptr;  // optional tile structure (user-provided block sparsity)
  const float* sink_logits = nullptr;  // optional, one logit per query head (see the contract above)
  const rope_spec* rope = nullptr;     // optional rotary embedding of q and k (rope.h), applied before q.k
};

// Variable-length batches (FlashAttention's varlen API): q/k/v/out have batch 1 and seq = total tokens;
// sequence s occupies rows [cu_seqlens_q[s], cu_seqlens_q[s+1]) of q/out and [cu_seqlens_k[s], cu_seqlens_k[s+1]) of k/v.
struct varlen {
  const std::int64_t* cu_seqlens_q = nullptr;
  const std::int64_t* cu_seqlens_k = nullptr;
  std::int64_t num_seqs = 0;
};

enum class backend : std::uint8_t { automatic, reference, cpu };
const char* backend_name(backend b);

// What a kernel did, for tests and the benchmark: key tiles visited per (query tile, head), by class. The grid path
// (neighborhood / halo masks on query boxes) reports the pairs it computed in units of 64 x 64 tiles, and as skipped
// the rest of the dense problem's tiles.
struct run_stats {
  std::int64_t tiles_full = 0, tiles_partial = 0, tiles_skipped = 0;
};

// One block of a larger problem: the call's q rows are positions q_offset .. q_offset + q.seq - 1 and its keys
// k_offset .. k_offset + k.seq - 1 of a problem of seq_q x seq_k (fixed-length batches). Masks, score modifiers and
// their tables, block masks, RoPE and the causal alignment see those positions and lengths, so the call returns
// exactly those rows of that problem restricted to these keys: out and lse are the partial softmax over them, which
// merge_attention_states combines exactly with the other key blocks' (context parallelism, ring attention, chunked
// prefill without a cache). Sink logits, if given, join this block's normaliser: give them to one block only.
// attention_backward takes a block too: the block's share of the whole problem's gradients (attention.h).
// The heads may be a block too (h_offset, heads_q below).
struct problem_block {
  std::int64_t q_offset = 0, k_offset = 0;
  std::int64_t seq_q = 0, seq_k = 0;
  // The call's q heads are heads h_offset .. h_offset + q.heads - 1 of heads_q (0: q.heads, the call's own), e.g. a
  // head-sharded (Ulysses) call: per-head parameters, tables and sink logits are the whole problem's, indexed so.
  std::int64_t h_offset = 0, heads_q = 0;
};

struct options {
  backend use = backend::automatic;
  // 0: all cores. At most max(8, 4 x the processors OpenMP sees): more threads than that only oversubscribe the
  // CPU, and asking for thousands can make thread creation fail and kill the process, so they are rejected.
  int threads = 0;
  const lse_tensor* lse = nullptr;      // optional LSE output
  const varlen* packed = nullptr;       // optional varlen description
  const problem_block* block = nullptr;  // optional: the call is one block of a larger problem (see problem_block)
  run_stats* stats = nullptr;           // optional: filled by the CPU kernels (left zero by the oracle)
  // backend::automatic runs the fp64 oracle when no fast kernel fits a call (select() and `omniattn explain` say so);
  // false makes such a call fail instead, with every reason in the status.
  bool allow_fallback = true;
};

}  // namespace omniattn
