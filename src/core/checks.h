// The argument checks every validator shares (validate.cc: attention, backward, decode, merge; linear.cc: linear
// attention): a rule broken throws a failure whose message names the argument and the rule, and the entry point turns
// it into a status tagged with its call, "[<call>] <argument> <what is wrong>", before anything is written.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "omniattn/attention.h"
#include "omniattn/tensor.h"

namespace omniattn::detail {

struct failure {
  std::string message;
};

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw failure{os.str()};
}

// Runs build(), which reports a broken rule by fail(); the status carries "[entry] " and the rule.
template <class Build>
status guarded(const char* entry, Build&& build) {
  try {
    build();
    return {};
  } catch (const failure& f) {
    return {std::string("[") + entry + "] " + f.message};
  }
}

// Byte range [begin, end) a strided view can touch (data is element [0, ...]; negative strides reach below it).
struct byte_range {
  std::uintptr_t begin = 0, end = 0;
};

// The bytes of a strided view of `rank` dims; rejects int64 overflow and ranges that leave the address space.
byte_range extent(const char* name, const void* data, int elem_bytes, const std::int64_t* sizes, const std::int64_t* strides,
                  int rank);
// `count` contiguous elements of `elem_bytes` bytes each.
byte_range array_range(const char* name, const void* data, std::int64_t count, int elem_bytes);
// Empty ranges overlap nothing.
bool overlaps(byte_range a, byte_range b);

// A buffer the call reads (or has written already), by the name an error gives it.
struct input_range {
  std::string name;
  byte_range range;
};
void check_no_alias(const char* output, byte_range r, const std::vector<input_range>& inputs);

// An output must not write one element twice.
void check_no_self_overlap(const char* name, const std::int64_t* sizes, const std::int64_t* strides,
                           const char* const* dim_names, int rank);
void check_no_self_overlap(const char* name, const tensor& t);

// A [batch, seq, heads, dim] view: a known dtype, sizes >= 0 (dim > 0), data set unless empty, f32 / f64 aligned; the
// bytes it spans.
byte_range check_tensor(const char* name, const tensor& t);
// Every dim of t equal to like's ("dq.seq 5 != q.seq 6").
void check_same_shape(const char* name, const tensor& t, const char* like_name, const tensor& like);
// A requested thread count (0 = all cores), resolved.
int check_threads(const char* name, int threads);

// A tensor's strides as kernels read them: batch, seq, head, dim, with the stride of a size-1 dim stored as 0 (never
// multiplied by more than 0, so an arbitrary one such as INT64_MIN is never met).
void kernel_strides(const tensor& x, std::int64_t* st);

}  // namespace omniattn::detail
