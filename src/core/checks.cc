// The shared argument checks (checks.h).
#include "core/checks.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/backends.h"
#include "core/checked_math.h"

namespace omniattn::detail {
namespace {

std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* name) {
  std::int64_t r;
  if (!detail::mul_fits(a, b, &r)) fail(name, " strides overflow int64 addressing");
  return r;
}

std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* name) {
  std::int64_t r;
  if (!detail::add_fits(a, b, &r)) fail(name, " strides overflow int64 addressing");
  return r;
}

const char* const k_tensor_dims[4] = {"batch", "seq", "heads", "dim"};
const char* const k_stride_dims[4] = {"batch", "seq", "head", "dim"};

}  // namespace

byte_range extent(const char* name, const void* data, int elem_bytes, const std::int64_t* sizes,
                  const std::int64_t* strides, int rank) {
  for (int d = 0; d < rank; ++d)
    if (sizes[d] == 0) return {reinterpret_cast<std::uintptr_t>(data), reinterpret_cast<std::uintptr_t>(data)};  // no element
  std::int64_t first = 0, last = 0;  // smallest and largest element offset
  for (int d = 0; d < rank; ++d) {
    const std::int64_t step = checked_mul(sizes[d] - 1, strides[d], name);
    if (step < 0) first = checked_add(first, step, name);
    else last = checked_add(last, step, name);
  }
  const std::int64_t below = checked_mul(first, elem_bytes, name);  // <= 0
  const std::int64_t above = checked_mul(checked_add(last, 1, name), elem_bytes, name);
  const auto base = reinterpret_cast<std::uintptr_t>(data);
  const auto down = static_cast<std::uintptr_t>(-(below + 1)) + 1;  // -below without overflow at INT64_MIN
  if (base < down) fail(name, " extends below the start of the address space (negative strides)");
  if (base + static_cast<std::uintptr_t>(above) < base) fail(name, " extends past the end of the address space");
  return {base - down, base + static_cast<std::uintptr_t>(above)};
}

bool overlaps(byte_range a, byte_range b) {
  return a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end;
}

byte_range array_range(const char* name, const void* data, std::int64_t count, int elem_bytes) {
  const std::int64_t sizes[1] = {count}, strides[1] = {1};
  return extent(name, data, elem_bytes, sizes, strides, 1);
}

void check_no_alias(const char* output, byte_range r, const std::vector<input_range>& inputs) {
  for (const input_range& in : inputs)
    if (overlaps(r, in.range)) fail(output, " aliases ", in.name, ": the output must not overlap an input");
}

// With dims sorted by stride, each stride must step over the whole extent of the smaller ones.
void check_no_self_overlap(const char* name, const std::int64_t* sizes, const std::int64_t* strides,
                           const char* const* dim_names, int rank) {
  for (int d = 0; d < rank; ++d)
    if (sizes[d] == 0) return;  // no element to write twice
  // Negative strides walk the same elements backwards: only |stride| matters. Size-1 dims are skipped (their
  // stride, even INT64_MIN, is never multiplied by more than 0).
  int order[4] = {0, 1, 2, 3};
  std::int64_t mag[4] = {};
  for (int d = 0; d < rank; ++d) mag[d] = sizes[d] == 1 ? 0 : strides[d] < 0 ? -strides[d] : strides[d];
  for (int i = 0; i < rank; ++i)
    for (int j = i + 1; j < rank; ++j)
      if (mag[order[j]] < mag[order[i]]) std::swap(order[i], order[j]);
  std::int64_t span = 1;  // elements covered by the dims so far
  for (int i = 0; i < rank; ++i) {
    const int d = order[i];
    if (sizes[d] == 1) continue;
    if (mag[d] < span)
      fail(name, ".stride_", dim_names[d], " ", strides[d], " makes the output overlap itself (needs |stride| >= ", span, ")");
    span = checked_mul(mag[d], sizes[d], name);
  }
}

byte_range check_tensor(const char* name, const tensor& t) {
  if (t.type != dtype::f32 && t.type != dtype::bf16 && t.type != dtype::f16 && t.type != dtype::f64)
    fail(name, ".type ", static_cast<int>(t.type), " is not a known dtype");
  const std::int64_t sizes[4] = {t.batch, t.seq, t.heads, t.dim};
  // Empty batches, sequences and head sets are valid (as in PyTorch and FlashAttention's varlen); a head needs a dim.
  for (int d = 0; d < 3; ++d)
    if (sizes[d] < 0) fail(name, ".", k_tensor_dims[d], " ", sizes[d], " must be >= 0");
  if (t.dim <= 0) fail(name, ".dim ", t.dim, " must be > 0");
  const bool empty = t.batch == 0 || t.seq == 0 || t.heads == 0;
  if (!t.data && !empty) fail(name, ".data is null");  // an empty torch tensor may have no storage
  // f32 / f64 are read through float / double pointers (vector gathers, stores); 2-byte dtypes are read bytewise at
  // any address.
  if (t.type == dtype::f32 && reinterpret_cast<std::uintptr_t>(t.data) % 4 != 0)
    fail(name, ".data ", t.data, " is not aligned to its 4-byte f32 elements");
  if (t.type == dtype::f64 && reinterpret_cast<std::uintptr_t>(t.data) % 8 != 0)
    fail(name, ".data ", t.data, " is not aligned to its 8-byte f64 elements");
  const std::int64_t strides[4] = {t.stride_batch, t.stride_seq, t.stride_head, t.stride_dim};
  return extent(name, t.data, dtype_size(t.type), sizes, strides, 4);
}

void check_no_self_overlap(const char* name, const tensor& t) {
  const std::int64_t sizes[4] = {t.batch, t.seq, t.heads, t.dim};
  const std::int64_t strides[4] = {t.stride_batch, t.stride_seq, t.stride_head, t.stride_dim};
  check_no_self_overlap(name, sizes, strides, k_stride_dims, 4);
}

void check_same_shape(const char* name, const tensor& t, const char* like_name, const tensor& like) {
  const std::int64_t got[4] = {t.batch, t.seq, t.heads, t.dim}, want[4] = {like.batch, like.seq, like.heads, like.dim};
  for (int d = 0; d < 4; ++d)
    if (got[d] != want[d]) fail(name, ".", k_tensor_dims[d], " ", got[d], " != ", like_name, ".", k_tensor_dims[d], " ", want[d]);
}

int check_threads(const char* name, int threads) {
  if (threads < 0) fail(name, " ", threads, " must be >= 0 (0 = all cores)");
  if (threads > detail::max_threads())
    fail(name, " ", threads, " must be <= ", detail::max_threads(), " (4 x the ", omp_get_num_procs(),
         " processors, at least 8)");
  return detail::resolve_threads(threads);
}

void kernel_strides(const tensor& x, std::int64_t* st) {
  st[0] = x.batch == 1 ? 0 : x.stride_batch;
  st[1] = x.seq == 1 ? 0 : x.stride_seq;
  st[2] = x.heads == 1 ? 0 : x.stride_head;
  st[3] = x.dim == 1 ? 0 : x.stride_dim;
}

}  // namespace omniattn::detail
