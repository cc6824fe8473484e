// The plain parameters of one linear_attention call (include/omniattn/linear.h), validated: pointers, int64 element
// strides, resolved scalars. The oracle (src/ref/linear_ref.cc) and the chunked kernel (src/cpu/linear_fwd.cc) read
// only this.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/storage.h"
#include "omniattn/linear.h"

namespace omniattn::detail {

struct linear_params {
  const void *q = nullptr, *k = nullptr, *v = nullptr, *g = nullptr;
  void* out = nullptr;
  dtype in_type = dtype::f32, out_type = dtype::f32, g_type = dtype::f32;
  std::int64_t q_stride[4]{}, k_stride[4]{}, v_stride[4]{}, out_stride[4]{}, g_stride[4]{};  // batch, seq, head, dim
  std::int64_t batch = 0, seq = 0, heads = 0, dim_k = 0, dim_v = 0;
  double scale = 1.0;
  feature_map phi = feature_map::identity;
  bool causal = true, normalize = false;
  std::int64_t prefix = 0;  // tokens [0, prefix) read the state of the whole prefix; seq when non-causal
  linear_decay decay = linear_decay::none;
  const float* head_log_decay = nullptr;  // [heads]
  const state_tensor* initial_state = nullptr;
  const state_tensor* final_state = nullptr;
  std::int64_t chunk = 64;
  int threads = 1;
};

// The backward's: the forward's inputs (fwd.out unused), d_out and the gradient views.
struct linear_bwd_params {
  linear_params fwd;
  const void* d_out = nullptr;
  dtype do_type = dtype::f32, dq_type = dtype::f32, dk_type = dtype::f32, dv_type = dtype::f32;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float* dg = nullptr;  // [B, T, H, 1 or K] f32, when wanted
  std::int64_t do_stride[4]{}, dq_stride[4]{}, dk_stride[4]{}, dv_stride[4]{}, dg_stride[4]{};
  float* d_head_log_decay = nullptr;  // [heads], when wanted
  const state_tensor* d_initial_state = nullptr;
  const state_tensor* d_final_state = nullptr;
};

// Validate the call and fill p; the message names the argument and the rule, prefixed "[<entry>] ".
status make_linear_params(const char* entry, const tensor& q, const tensor& k, const tensor& v, const tensor& out,
                          const linear_spec& s, const linear_options& o, linear_params& p);
status make_linear_bwd_params(const char* entry, const tensor& q, const tensor& k, const tensor& v, const tensor& d_out,
                              const linear_spec& s, const linear_grads& g, const linear_options& o, linear_bwd_params& p);

// phi over one token's K features, in place (x: n values).
template <class T>
void apply_feature_map(feature_map phi, T* x, std::int64_t n) {
  switch (phi) {
    case feature_map::identity: return;
    case feature_map::elu_plus_one:  // elu(x) + 1: x + 1 above 0, exp(x) below (positive, smooth)
      for (std::int64_t i = 0; i < n; ++i) x[i] = x[i] > T(0) ? x[i] + T(1) : std::exp(x[i]);
      return;
    case feature_map::relu:
      for (std::int64_t i = 0; i < n; ++i) x[i] = std::max(x[i], T(0));
      return;
    case feature_map::softmax: {  // over the features; the max is subtracted first so exp cannot overflow
      T m = x[0], sum = T(0);
      for (std::int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
      for (std::int64_t i = 0; i < n; ++i) sum += x[i] = std::exp(x[i] - m);
      for (std::int64_t i = 0; i < n; ++i) x[i] /= sum;
      return;
    }
  }
}

// dx of one token's features given y = phi(x) and dy (n values; dx may be dy): the chain rule of apply_feature_map.
template <class T>
void feature_map_backward(feature_map phi, const T* x, const T* y, T* dy_dx, std::int64_t n) {
  switch (phi) {
    case feature_map::identity: return;
    case feature_map::elu_plus_one:  // d/dx: 1 above 0, exp(x) = y below
      for (std::int64_t i = 0; i < n; ++i) dy_dx[i] *= x[i] > T(0) ? T(1) : y[i];
      return;
    case feature_map::relu:
      for (std::int64_t i = 0; i < n; ++i) dy_dx[i] = x[i] > T(0) ? dy_dx[i] : T(0);
      return;
    case feature_map::softmax: {  // the softmax Jacobian: y * (dy - y . dy)
      T dot = T(0);
      for (std::int64_t i = 0; i < n; ++i) dot += y[i] * dy_dx[i];
      for (std::int64_t i = 0; i < n; ++i) dy_dx[i] = y[i] * (dy_dx[i] - dot);
      return;
    }
  }
}

// The raw q and k of token t (before phi and scale), for the backward's chain rule through them.
template <class T>
void load_raw_qk(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t, T* q, T* k) {
  for (std::int64_t c = 0; c < p.dim_k; ++c) {
    q[c] = static_cast<T>(load_element(p.q, p.in_type, b * p.q_stride[0] + t * p.q_stride[1] + h * p.q_stride[2] + c * p.q_stride[3]));
    k[c] = static_cast<T>(load_element(p.k, p.in_type, b * p.k_stride[0] + t * p.k_stride[1] + h * p.k_stride[2] + c * p.k_stride[3]));
  }
}

// Token t of (batch b, head h) as the math contract reads it, in T: q = scale phi(q), k = phi(k), v (K, K, V values).
// The oracle (in double) and the kernel (in float) both load through this.
template <class T>
void load_token(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t, T* q, T* k, T* v) {
  load_raw_qk(p, b, h, t, q, k);
  apply_feature_map(p.phi, q, p.dim_k);
  apply_feature_map(p.phi, k, p.dim_k);
  for (std::int64_t c = 0; c < p.dim_k; ++c) q[c] *= static_cast<T>(p.scale);
  for (std::int64_t c = 0; c < p.dim_v; ++c)
    v[c] = static_cast<T>(load_element(p.v, p.in_type, b * p.v_stride[0] + t * p.v_stride[1] + h * p.v_stride[2] + c * p.v_stride[3]));
}

// The log decay of token t in channel c (0 without decay).
inline double log_decay(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t, std::int64_t c) {
  switch (p.decay) {
    case linear_decay::none: return 0.0;
    case linear_decay::fixed: return p.head_log_decay[h];
    case linear_decay::scalar: return load_element(p.g, p.g_type, b * p.g_stride[0] + t * p.g_stride[1] + h * p.g_stride[2]);
    case linear_decay::channel:
      return load_element(p.g, p.g_type, b * p.g_stride[0] + t * p.g_stride[1] + h * p.g_stride[2] + c * p.g_stride[3]);
  }
  return 0.0;
}

}  // namespace omniattn::detail
