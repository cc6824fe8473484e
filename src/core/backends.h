// The backend registry: each backend exposes one select() over the params struct.
#pragma once

#include "omniattn/attention.h"
#include "omniattn/kv_cache.h"

namespace omniattn {

namespace cpu {
// The fused CPU kernels (src/cpu/): a kernel for these params, or every reason none fits.
selection select(const attn_params& p);
// The fused CPU backward kernel, or every reason none fits.
backward_selection select_backward(const attn_bwd_params& p);
// The CPU decode kernel on a KV cache, or every reason none fits.
decode_selection select_decode(const attn_decode_params& p);
}  // namespace cpu

namespace detail {
// Threads a call will use: options.threads, or every core when it is 0.
int resolve_threads(int requested);
// Bytes of packed K/V a calling thread may keep between calls (set_scratch_retention).
std::int64_t scratch_retention();
// The largest options.threads accepted: 4 x the processors OpenMP sees, at least 8 (see options::threads).
int max_threads();
}  // namespace detail

}  // namespace omniattn
