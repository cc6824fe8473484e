// The plain parameters of one linear_attention call (include/omniattn/linear.h), validated: pointers, int64 element
// strides, resolved scalars. The oracle (src/ref/linear_ref.cc) and the chunked kernel (src/cpu/linear_fwd.cc) read
// only this.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/storage.h"
#include "omniattn/linear.h"

namespace omniattn::detail {

struct linear_params {
  const void *q = nullptr, *k = nullptr, *v = nullptr, *g = nullptr;
  const void* gb = nullptr;  // bidirectional: the reversed scan's log decays (null: g)
  dtype gb_type = dtype::f32;
  std::int64_t gb_stride[4]{};
  void* out = nullptr;
  dtype in_type = dtype::f32, v_type = dtype::f32, out_type = dtype::f32, g_type = dtype::f32;  // in_type: q's and k's
  std::int64_t q_stride[4]{}, k_stride[4]{}, v_stride[4]{}, out_stride[4]{}, g_stride[4]{};  // batch, seq, head, dim
  std::int64_t batch = 0, seq = 0, heads = 0, dim_k = 0, dim_v = 0;
  std::int64_t dim_in = 0;  // the raw q / k features; dim_k is the state's (the projection's F, else dim_in)
  double scale = 1.0;
  feature_map phi = feature_map::identity;
  const float* proj_w = nullptr;  // [proj_heads][dim_in][dim_k], null: no projection
  const float* proj_b = nullptr;  // [proj_heads][dim_k], or null
  std::int64_t proj_heads = 0;    // 1 (shared) or heads
  bool causal = true, normalize = false, flow = false;
  std::int64_t prefix = 0;  // tokens [0, prefix) read the state of the whole prefix; seq when non-causal
  linear_decay decay = linear_decay::none;
  const float* head_log_decay = nullptr;  // [heads]
  const state_tensor* initial_state = nullptr;
  const state_tensor* final_state = nullptr;
  std::int64_t chunk = 64;
  int threads = 1;
  const std::int64_t* cu_seqlens = nullptr;  // varlen: num_seqs + 1 offsets (batch is 1)
  std::int64_t num_seqs = 0;
  std::int64_t seqs = 0;  // the states' first dim: batch, or num_seqs under varlen
};

// The backward's: the forward's inputs (fwd.out unused), d_out and the gradient views.
struct linear_bwd_params {
  linear_params fwd;  // with fwd.cu_seqlens: every gradient view is packed like q, k, v
  const void* d_out = nullptr;
  dtype do_type = dtype::f32, dq_type = dtype::f32, dk_type = dtype::f32, dv_type = dtype::f32;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float* dg = nullptr;  // [B, T, H, 1 or K] f32, when wanted
  float* dgb = nullptr;  // bidirectional: spec.g_backward's gradient, when wanted
  std::int64_t dgb_stride[4]{};
  std::int64_t do_stride[4]{}, dq_stride[4]{}, dk_stride[4]{}, dv_stride[4]{}, dg_stride[4]{};
  float* d_head_log_decay = nullptr;  // [heads], when wanted
  float* d_proj_w = nullptr;          // like proj_w, when wanted
  float* d_proj_b = nullptr;          // like proj_b, when wanted
  const state_tensor* d_initial_state = nullptr;
  const state_tensor* d_final_state = nullptr;
};

// ViG's bidirectional form: non-causal with a decay, run as the causal call plus the call over the reversed tokens.
inline bool bidirectional(const linear_params& p) { return !p.causal && p.decay != linear_decay::none; }

// The work items of a call: (sequence, head) pairs, a sequence being a batch entry or a varlen sequence.
inline std::int64_t linear_sequences(const linear_params& p) { return p.cu_seqlens ? p.num_seqs : p.batch; }

// Varlen sequence s as a call of its own (batch 1, its tokens, its states): the kernels and the oracle run it as such.
struct linear_sequence {
  linear_params p;
  state_tensor init, fin;
};
inline const void* advance(const void* base, dtype t, std::int64_t elements) {
  return static_cast<const char*>(base) + elements * static_cast<std::int64_t>(dtype_size(t));
}
inline state_tensor state_of_sequence(const state_tensor& st, std::int64_t s) {
  state_tensor x = st;
  x.data += s * st.stride_batch;
  x.batch = 1;
  return x;
}
inline void sequence_of(const linear_params& p, std::int64_t s, linear_sequence& out) {
  out.p = p;
  linear_params& q = out.p;
  const std::int64_t t0 = p.cu_seqlens[s];
  q.cu_seqlens = nullptr;
  q.num_seqs = 0;
  q.batch = 1;
  q.seq = p.cu_seqlens[s + 1] - t0;
  q.prefix = p.causal ? p.prefix : q.seq;  // non-causal: the whole sequence is its prefix (not the whole packed length)
  q.q = advance(p.q, p.in_type, t0 * p.q_stride[1]);
  q.k = advance(p.k, p.in_type, t0 * p.k_stride[1]);
  q.v = advance(p.v, p.v_type, t0 * p.v_stride[1]);
  if (p.g) q.g = advance(p.g, p.g_type, t0 * p.g_stride[1]);
  if (p.gb) q.gb = advance(p.gb, p.gb_type, t0 * p.gb_stride[1]);
  if (p.out) q.out = const_cast<void*>(advance(p.out, p.out_type, t0 * p.out_stride[1]));
  if (p.initial_state) {
    out.init = state_of_sequence(*p.initial_state, s);
    q.initial_state = &out.init;
  }
  if (p.final_state) {
    out.fin = state_of_sequence(*p.final_state, s);
    q.final_state = &out.fin;
  }
}

// The backward's view of varlen sequence s (see sequence_of): every pointer moved to the sequence.
struct linear_bwd_sequence {
  linear_sequence fwd;
  linear_bwd_params p;
  state_tensor d_init, d_fin;
};
inline void sequence_of(const linear_bwd_params& bp, std::int64_t s, linear_bwd_sequence& out) {
  sequence_of(bp.fwd, s, out.fwd);
  out.p = bp;
  out.p.fwd = out.fwd.p;
  if (out.p.fwd.initial_state) out.p.fwd.initial_state = &out.fwd.init;
  const std::int64_t t0 = bp.fwd.cu_seqlens[s];
  out.p.d_out = advance(bp.d_out, bp.do_type, t0 * bp.do_stride[1]);
  out.p.dq = const_cast<void*>(advance(bp.dq, bp.dq_type, t0 * bp.dq_stride[1]));
  out.p.dk = const_cast<void*>(advance(bp.dk, bp.dk_type, t0 * bp.dk_stride[1]));
  out.p.dv = const_cast<void*>(advance(bp.dv, bp.dv_type, t0 * bp.dv_stride[1]));
  if (bp.dg) out.p.dg = bp.dg + t0 * bp.dg_stride[1];
  if (bp.dgb) out.p.dgb = bp.dgb + t0 * bp.dgb_stride[1];
  if (bp.d_initial_state) {
    out.d_init = state_of_sequence(*bp.d_initial_state, s);
    out.p.d_initial_state = &out.d_init;
  }
  if (bp.d_final_state) {
    out.d_fin = state_of_sequence(*bp.d_final_state, s);
    out.p.d_final_state = &out.d_fin;
  }
}

// The forms composed of kernel calls (core/linear_forms.cc), for the kernels (cpu::run_linear_fwd / bwd) and the
// oracle alike: a projected call maps q, k in a pass first (kernels only: the oracle projects per token); the
// bidirectional form is the causal call plus the causal call over the reversed tokens (every [B, T, H, *] view read
// from its last token with its seq stride negated), summed; the flow form is Flowformer's flows around one
// non-causal call.
using linear_fwd_fn = std::function<status(const linear_params&)>;
using linear_bwd_fn = std::function<status(const linear_bwd_params&)>;
status run_bidirectional_fwd(const linear_params& p, const linear_fwd_fn& causal_fwd);
status run_bidirectional_bwd(const linear_bwd_params& p, const linear_fwd_fn& causal_fwd, const linear_bwd_fn& causal_bwd);
// The bidirectional form's reversed scan: the call over the reversed tokens as a view (every [B, T, H, *] pointer at
// its last token, its seq stride negated; the decay g_backward where the call has one; varlen offsets mirrored into
// `offsets`).
linear_params mirrored(const linear_params& p, std::vector<std::int64_t>& offsets);
// Flowformer's flow form: the flows per (sequence, head) around one non-causal call (`core`) of q / I, k, c v.
status run_flow_fwd(const linear_params& p, const linear_fwd_fn& core_fwd);
status run_flow_bwd(const linear_bwd_params& p, const linear_fwd_fn& core_fwd, const linear_bwd_fn& core_bwd);
status run_linear_forward(const linear_params& p);       // the kernels, every form
status run_linear_backward(const linear_bwd_params& p);  // the kernels, every form

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
    case feature_map::exp:
      for (std::int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
      return;
    case feature_map::sigmoid:
      for (std::int64_t i = 0; i < n; ++i) x[i] = T(1) / (T(1) + std::exp(-x[i]));
      return;
    case feature_map::performer: {  // x here is y - |raw|^2 / 2 (project_token subtracts it)
      const T norm = T(1) / std::sqrt(static_cast<T>(n));
      for (std::int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]) * norm;
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
    case feature_map::sigmoid:
      for (std::int64_t i = 0; i < n; ++i) dy_dx[i] *= y[i] * (T(1) - y[i]);
      return;
    case feature_map::exp:
    case feature_map::performer:  // both are c exp(x): the derivative is y itself
      for (std::int64_t i = 0; i < n; ++i) dy_dx[i] *= y[i];
      return;
  }
}

// The projection of one raw row x (dim_in values) of head h: y = x W_h + b_h (dim_k values), less |x|^2 / 2 for the
// performer map (its exp(w . x - |x|^2 / 2)); nothing to do without a projection (y = x: the caller loads x into y).
template <class T>
void project_token(const linear_params& p, std::int64_t h, const T* x, T* y) {
  const std::int64_t F = p.dim_k, ph = p.proj_heads > 1 ? h : 0;
  const float* W = p.proj_w + ph * p.dim_in * F;
  for (std::int64_t f = 0; f < F; ++f) y[f] = p.proj_b ? static_cast<T>(p.proj_b[ph * F + f]) : T(0);
  for (std::int64_t c = 0; c < p.dim_in; ++c)
    for (std::int64_t f = 0; f < F; ++f) y[f] += x[c] * static_cast<T>(W[c * F + f]);
  if (p.phi == feature_map::performer) {
    T sq = T(0);
    for (std::int64_t c = 0; c < p.dim_in; ++c) sq += x[c] * x[c];
    for (std::int64_t f = 0; f < F; ++f) y[f] -= sq / T(2);
  }
}

// The projection's chain rule for one row: given x (dim_in), the pre-activation's gradient dy (dim_k), adds x^T dy to
// dW_h and dy to db_h (either may be null) and writes dx = W_h dy (less x sum(dy) for the performer map's norm term).
template <class T, class Acc>
void project_token_backward(const linear_params& p, std::int64_t h, const T* x, const T* dy, T* dx, Acc* dW, Acc* db) {
  const std::int64_t F = p.dim_k, ph = p.proj_heads > 1 ? h : 0;
  const float* W = p.proj_w + ph * p.dim_in * F;
  T total = T(0);
  for (std::int64_t f = 0; f < F; ++f) total += dy[f];
  for (std::int64_t c = 0; c < p.dim_in; ++c) {
    T acc = T(0);
    for (std::int64_t f = 0; f < F; ++f) acc += static_cast<T>(W[c * F + f]) * dy[f];
    dx[c] = p.phi == feature_map::performer ? acc - x[c] * total : acc;
  }
  if (dW)
    for (std::int64_t c = 0; c < p.dim_in; ++c)
      for (std::int64_t f = 0; f < F; ++f) dW[(ph * p.dim_in + c) * F + f] += static_cast<Acc>(x[c] * dy[f]);
  if (db)
    for (std::int64_t f = 0; f < F; ++f) db[ph * F + f] += static_cast<Acc>(dy[f]);
}

// The gradient of one raw q / k row x (dim_in values) of head h from that of its features phi(P(x)) (before scale):
// g holds dim_k feature gradients in and dim_in raw ones out (it has room for max(dim_k, dim_in)); the projection's
// gradients add to dW, db (null: not wanted). u, y: dim_k scratch values, dx: dim_in.
template <class T, class Acc>
void features_to_raw(const linear_params& p, std::int64_t h, const T* x, T* g, T* u, T* y, T* dx, Acc* dW, Acc* db) {
  const std::int64_t K = p.dim_k;
  if (p.proj_w) project_token(p, h, x, u);
  else std::copy(x, x + K, u);
  std::copy(u, u + K, y);
  apply_feature_map(p.phi, y, K);
  feature_map_backward(p.phi, u, y, g, K);
  if (!p.proj_w) return;
  project_token_backward(p, h, x, g, dx, dW, db);
  std::copy(dx, dx + p.dim_in, g);
}

// The raw q and k of token t (before the projection, phi and scale; dim_in values each), for the backward's chain rule.
template <class T>
void load_raw_qk(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t, T* q, T* k) {
  for (std::int64_t c = 0; c < p.dim_in; ++c) {
    q[c] = static_cast<T>(load_element(p.q, p.in_type, b * p.q_stride[0] + t * p.q_stride[1] + h * p.q_stride[2] + c * p.q_stride[3]));
    k[c] = static_cast<T>(load_element(p.k, p.in_type, b * p.k_stride[0] + t * p.k_stride[1] + h * p.k_stride[2] + c * p.k_stride[3]));
  }
}

// Token t of (batch b, head h) as the math contract reads it, in T: q = scale phi(P(q)), k = phi(P(k)), v (dim_k,
// dim_k, dim_v values). The oracle (in double) and the kernel (in float) both load through this.
template <class T>
void load_token(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t, T* q, T* k, T* v) {
  if (!p.proj_w) {
    load_raw_qk(p, b, h, t, q, k);
  } else {
    std::vector<T> raw(static_cast<std::size_t>(2 * p.dim_in));
    load_raw_qk(p, b, h, t, raw.data(), raw.data() + p.dim_in);
    project_token(p, h, raw.data(), q);
    project_token(p, h, raw.data() + p.dim_in, k);
  }
  apply_feature_map(p.phi, q, p.dim_k);
  apply_feature_map(p.phi, k, p.dim_k);
  for (std::int64_t c = 0; c < p.dim_k; ++c) q[c] *= static_cast<T>(p.scale);
  for (std::int64_t c = 0; c < p.dim_v; ++c)
    v[c] = static_cast<T>(load_element(p.v, p.v_type, b * p.v_stride[0] + t * p.v_stride[1] + h * p.v_stride[2] + c * p.v_stride[3]));
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

// The chunked kernels factor a chunk's decay weights exp(B_i - B_j) as E_i / E_j while the chunk's decay spans at most
// this much in log space in every channel: exp(40) ~ 2.4e17 keeps K / E far from float's range for any feature value
// the products could still use. A chunk that spans more is formed pair by pair.
inline constexpr double k_linear_max_span = 40.0;

// The largest span -(g_t0 + ... + g_{t0+n-1}) over the channels of tokens [t0, t0 + n) of (b, h) (0 without decay).
inline double chunk_decay_span(const linear_params& p, std::int64_t b, std::int64_t h, std::int64_t t0, std::int64_t n) {
  if (p.decay == linear_decay::none) return 0.0;
  const std::int64_t channels = p.decay == linear_decay::channel ? p.dim_k : 1;
  double widest = 0.0;
  for (std::int64_t c = 0; c < channels; ++c) {
    double span = 0.0;
    for (std::int64_t t = t0; t < t0 + n; ++t) span -= log_decay(p, b, h, t, c);
    widest = std::max(widest, span);
  }
  return widest;
}

// A call (or varlen sequence) of at most this many causal tokens runs as the recurrence itself (the decode step): one
// pass over the K x V state per token costs less than the chunk GEMMs on padded tiles.
inline constexpr std::int64_t k_recurrent_tokens = 8;
inline bool runs_recurrence(const linear_params& p) { return p.prefix == 0 && p.seq <= k_recurrent_tokens; }

// Whether every causal chunk of (b, h) factors (the backward's tiled path needs all of them to).
inline bool chunks_factor(const linear_params& p, std::int64_t b, std::int64_t h) {
  for (std::int64_t t0 = p.prefix; t0 < p.seq; t0 += p.chunk)
    if (chunk_decay_span(p, b, h, t0, std::min(p.chunk, p.seq - t0)) > k_linear_max_span) return false;
  return true;
}

// A projected call as the kernels run it: qf, kf [batch, seq, heads, dim_k] f32 (contiguous) hold phi(P(q)), phi(P(k))
// (map_linear_features), so the kernels see the identity map on F features; scale, decays and states are unchanged.
inline linear_params features_view(const linear_params& p, const float* qf, const float* kf) {
  linear_params f = p;
  const std::int64_t st[4] = {p.seq * p.heads * p.dim_k, p.heads * p.dim_k, p.dim_k, 1};
  f.q = qf;
  f.k = kf;
  f.in_type = dtype::f32;
  std::copy(st, st + 4, f.q_stride);
  std::copy(st, st + 4, f.k_stride);
  f.phi = feature_map::identity;
  f.dim_in = p.dim_k;
  f.proj_w = f.proj_b = nullptr;
  f.proj_heads = 0;
  return f;
}

}  // namespace omniattn::detail
