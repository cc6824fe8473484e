// omniattn: rotary position embeddings (RoPE) applied to Q and K inside the attention call.
//
// For a query or key row x with position id `pos`, each rotary pair (x1, x2) is rotated by angle pos * theta^(-2p / R)
// (R = rotary_dim, p = 0 .. R/2 - 1 the pair index):  x1' = x1 cos - x2 sin,  x2' = x1 sin + x2 cos.
//   pairs: interleaved = false (GPT-NeoX / Llama layout) pairs dims (p, p + R/2); true (GPT-J) pairs (2p, 2p + 1).
//   dims >= R pass through unrotated (partial rotary).
// Position ids are caller data, so re-aligned positions (Concentric Causal Attention's rings, PINE's re-ordered
// segments, shifted KV-cache positions) are just different ids. Multi-axis RoPE (M-RoPE: time, height, width) takes
// `axes` id arrays and `sections[a]` = number of rotary pairs, in order, that read axis a (sum = R/2).
// Ids are indexed by token row: pos[axis * tokens + batch * seq + row] with seq / row as in the q (or k) tensor
// (for varlen: batch 0 and the packed row). Null ids mean: key j has position j, query i has i + (Lk - Lq)
// (bottom-right alignment, so a decode step's queries sit after the cache).
#pragma once

#include <cstdint>
#include <vector>

namespace omniattn {

struct rope_spec {
  double theta = 10000.0;
  std::int64_t rotary_dim = 0;  // 0: the whole q/k head dim; must be even and <= head dim
  bool interleaved = false;
  const std::int64_t* pos_q = nullptr;  // [axes][q rows] or null
  const std::int64_t* pos_k = nullptr;  // [axes][k rows] or null
  std::vector<std::int64_t> sections;   // empty: one axis
};

}  // namespace omniattn
