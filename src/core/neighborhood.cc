// Heads-last (NATTEN) layouts as [batch, seq, heads, dim] views: see include/omniattn/neighborhood.h.
#include "omniattn/neighborhood.h"

#include <string>

namespace omniattn {

status make_heads_last(void* data, dtype type, const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& strides,
                       tensor& out) {
  const std::size_t n = shape.size();
  if (n < 4 || n > 6)
    return {"[heads_last] shape has " + std::to_string(n) +
            " axes; expected [batch, X, (Y, (Z,)) heads, dim] with 1 to 3 spatial axes"};
  if (strides.size() != n)
    return {"[heads_last] strides has " + std::to_string(strides.size()) + " entries for a " + std::to_string(n) + "-axis shape"};
  for (std::size_t a = 0; a < n; ++a)
    if (shape[a] < 0) return {"[heads_last] shape[" + std::to_string(a) + "] " + std::to_string(shape[a]) + " must be >= 0"};
  // Merge the spatial axes 1 .. n-3 from the last one outwards; size-1 axes take no part.
  std::int64_t seq = 1, seq_stride = 0;
  bool have_stride = false;
  std::size_t inner = 0;  // the axis seq_stride came from, for the message
  for (std::size_t a = n - 3; a >= 1; --a) {
    if (shape[a] != 1) {
      if (!have_stride) {
        seq_stride = strides[a];
        have_stride = true;
      } else if (strides[a] != seq_stride * seq) {
        return {"[heads_last] spatial axes " + std::to_string(a) + " and " + std::to_string(inner) +
                " do not merge into one sequence axis: stride[" + std::to_string(a) + "] " + std::to_string(strides[a]) +
                " != stride " + std::to_string(seq_stride) + " x " + std::to_string(seq) +
                " tokens; copy the tensor to a contiguous layout first"};
      }
      inner = a;
    }
    seq *= shape[a];
    if (a == 1) break;
  }
  out = tensor{};
  out.data = data;
  out.type = type;
  out.batch = shape[0];
  out.seq = seq;
  out.heads = shape[n - 2];
  out.dim = shape[n - 1];
  out.stride_batch = strides[0];
  out.stride_seq = seq_stride;
  out.stride_head = strides[n - 2];
  out.stride_dim = strides[n - 1];
  return {};
}

tensor make_heads_last(void* data, dtype type, std::int64_t batch, const std::vector<std::int64_t>& grid, std::int64_t heads,
                       std::int64_t dim) {
  std::int64_t tokens = 1;
  for (std::int64_t x : grid) tokens *= x;
  return make_bshd(data, type, batch, tokens, heads, dim);
}

}  // namespace omniattn
