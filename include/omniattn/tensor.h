// omniattn: strided tensor views over caller memory.
//
// Every attention operand is a 4-d view with the logical layout [batch, seq, heads, head_dim]. Strides are in
// elements (not bytes) and are int64, so the same view describes BSHD (FlashAttention's layout), BHSD (PyTorch SDPA's),
// packed QKV buffers and any other arrangement without a copy. Inputs may use stride 0 to broadcast (e.g. one K/V for
// every batch); outputs must not overlap themselves. Strides may be negative (numpy's x[:, ::-1]): data then points
// at element [0, 0, 0, 0] and the view extends below it. bf16 / f16 data may sit at any address (odd ones too); f32
// data (and the LSE) must be 4-byte aligned, f64 data 8-byte aligned.
// f64 is a storage dtype for checking (e.g. float64 gradcheck): only the fp64 reference backend serves it (the CPU
// kernels reject it, so backend::automatic falls back to the oracle and select() says why).
#pragma once

#include <cstdint>

namespace omniattn {

enum class dtype : std::uint8_t { f32, bf16, f16, f64 };

const char* dtype_name(dtype t);
int dtype_size(dtype t);
// Rounding unit (2^-mantissa bits) of a storage dtype: f32 2^-23, bf16 2^-8, f16 2^-11, f64 2^-52.
double dtype_epsilon(dtype t);

// A non-owning view of a [batch, seq, heads, dim] tensor.
struct tensor {
  void* data = nullptr;
  dtype type = dtype::f32;
  std::int64_t batch = 0, seq = 0, heads = 0, dim = 0;
  std::int64_t stride_batch = 0, stride_seq = 0, stride_head = 0, stride_dim = 0;
};

// Contiguous [batch, seq, heads, dim] (FlashAttention layout).
tensor make_bshd(void* data, dtype type, std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t dim);
// Contiguous [batch, heads, seq, dim] memory (PyTorch SDPA layout), viewed as [batch, seq, heads, dim].
tensor make_bhsd(void* data, dtype type, std::int64_t batch, std::int64_t heads, std::int64_t seq, std::int64_t dim);

// The log-sum-exp output: float32, logical shape [batch, heads, seq_q], natural log, as FlashAttention returns it.
// For varlen problems batch is 1 and seq_q the total number of query tokens.
struct lse_tensor {
  float* data = nullptr;
  std::int64_t stride_batch = 0, stride_head = 0, stride_seq = 0;
};

// Contiguous [batch, heads, seq_q] float32 LSE.
lse_tensor make_lse(float* data, std::int64_t heads, std::int64_t seq_q);

// bf16 / f16 storage conversions (round to nearest even), used by the oracle, the kernels and the tests.
float bf16_to_f32(std::uint16_t bits);
std::uint16_t f32_to_bf16(float x);
float f16_to_f32(std::uint16_t bits);
std::uint16_t f32_to_f16(float x);

}  // namespace omniattn
