// omniattn: NATTEN's heads-last layouts for neighborhood and halo attention.
//
// NATTEN's tensors are [batch, X, (Y, (Z,)) heads, dim]: the token grid spelled out as axes, heads last. attention()
// reads [batch, seq, heads, dim] views, and the mask patterns mask_expr::neighborhood() / halo() number a grid's
// tokens row-major (the last spatial axis fastest), which is exactly how such a tensor's spatial axes flatten. So a
// heads-last tensor is a [batch, X*Y*Z, heads, dim] view, without a copy, whenever its spatial axes merge into one
// strided axis: stride(a) == stride(a + 1) * size(a + 1) for consecutive spatial axes (axes of size 1 merge always).
//
//   tensor q;
//   if (status st = make_heads_last(ptr, dtype::f32, {batch, 64, 64, heads, dim}, strides, q); !st) ...
//   spec s;
//   s.mask = mask_expr::neighborhood({64, 64}, {7, 7});
//   attention(q, k, v, out, s);
#pragma once

#include <cstdint>
#include <vector>

#include "omniattn/attention.h"
#include "omniattn/tensor.h"

namespace omniattn {

// Views a [batch, X, (Y, (Z,)) heads, dim] buffer with the given element strides as [batch, X*Y*Z, heads, dim].
// The error names the axes that do not merge (the caller then copies to a contiguous layout); `out` is untouched on
// error.
status make_heads_last(void* data, dtype type, const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& strides,
                       tensor& out);

// A contiguous [batch, *grid, heads, dim] buffer (grid of rank 1..3) as [batch, prod(grid), heads, dim].
tensor make_heads_last(void* data, dtype type, std::int64_t batch, const std::vector<std::int64_t>& grid, std::int64_t heads,
                       std::int64_t dim);

}  // namespace omniattn
