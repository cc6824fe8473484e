// Validation entry points of the library's calls that have no params struct (make_params and make_backward_params
// are public: attention.h).
#pragma once

#include <span>

#include "omniattn/attention.h"
#include "omniattn/tensor.h"

namespace omniattn::detail {

// The rules of merge_attention_states (merge.h): the first one broken, as "[merge_attention_states] <argument> ...";
// on success resolved_threads is the thread count to run with.
status check_merge(std::span<const tensor> outs, std::span<const lse_tensor> lses, const tensor& out,
                   const lse_tensor* lse_out, int threads, int& resolved_threads);

}  // namespace omniattn::detail
