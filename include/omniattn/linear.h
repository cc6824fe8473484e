// Linear attention (the kernel trick with a recurrent state): kernelised, gated / decayed, chunked, with a state in
// and out, in fla's conventions (flash-linear-attention): q, k [batch, seq, heads, K], v [batch, seq, heads, V],
// a scale applied to q, log-space decays g, initial_state / final_state [batch, heads, K, V] (K: the projection's F
// where the spec has one).
//
// Math contract (token t = 0 .. T - 1 of one (batch, head); phi the feature map, applied to q and k on load):
//   q_t = scale phi(P(q_t)),  k_t = phi(P(k_t)),  P the spec's projection (x -> x W_h + b_h, K -> F features;
//   none: P(x) = x and F = K), alpha_t = exp(g_t)  (a per-channel vector over K; a scalar decay is the
//   same value in every channel, the fixed decay the same value at every token; no decay: alpha = 1)
//   causal:      S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,   S_{-1} = initial_state (0 when none)
//                o_t = q_t S_t                                                       [F x V state, f32]
//   normalize:   z_t = alpha_t * z_{t-1} + k_t,  z_{-1} = 0,   o_t = (q_t S_t) / (q_t . z_t)   (0 where q_t . z_t = 0);
//                z is not carried between calls yet, so normalize takes no initial_state
//   non-causal:  o_t = q_t S,  S = initial_state + sum over every token of k_t^T v_t  (no decay)
//   bidirectional (non-causal with a decay; ViG's BiGLA, LION): the causal call with g plus the same call over the
//                reversed tokens with g_backward (ViG's direction-wise gates; g when unset), each direction holding the
//                token itself: o_i = sum_{j <= i} (q_i . (exp(G_i - G_j) * k_j)) v_j
//                              + sum_{j >= i} (q_i . (exp(R_i - R_j) * k_j)) v_j,   R_i = gb_i + ... + gb_{T-1};
//                normalize divides by the same two sums over v = 1; no initial_state or final_state
//   flow:        Flowformer's flow conservation (non-causal, no decay, positive features; e = 1e-6 as in its
//                reference, added to every feature and every sum): with n tokens,
//                I_i = (q_i + e) . (sum_j k_j + e),  O_j = (k_j + e) . (sum_i q_i + e)               (incoming, outgoing)
//                Ih_i = (q_i + e) . (sum_j k_j / O_j + e),  Oh_j = (k_j + e) . (sum_i q_i / I_i + e)   (conserved)
//                o_i = sigmoid(Ih_i) * sum_j ((q_i / I_i) . k_j) c_j v_j,  c = n softmax(clamp(Oh, -1, 1))
//                (allocation, competition); no states
//   prefix P:    JRT's prefix-linear form: tokens t < P read the state of the whole prefix (non-causal inside it),
//                tokens t >= P the causal S_t, which holds the whole prefix (no decay; non-causal without a decay is P = T)
//   final_state = S_{T-1} (causal) or S (non-causal).
// Equivalently (the quadratic form the oracle computes): with G_t = g_0 + ... + g_t,
//   o_i = sum_{j <= i} (q_i . (exp(G_i - G_j) * k_j)) v_j + (q_i * exp(G_i)) . initial_state.
// The chunked kernel (Lightning Attention-2's split) computes, per chunk of C tokens, the masked intra-chunk product
// (conventional attention without the softmax, decays relative to the chunk: every exponent <= 0) plus the
// inter-chunk term from the carried state, then advances the state; so prefill with final_state followed by calls
// with initial_state equals one long call (to rounding).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "omniattn/tensor.h"
#include "omniattn/attention.h"

namespace omniattn {

// Feature maps phi, applied elementwise (softmax: over the features of a token) to q and k on load, after the
// projection when the spec has one (y = x W + b below; without one y = x):
//   identity, elu_plus_one (elu(y) + 1), relu, softmax (over y's features, max subtracted)
//   exp        exp(y): Hedgehog's map after its learned projection (softmax is the same map normalised per token;
//              exp of a large y overflows to inf, as in any exp map)
//   sigmoid    1 / (1 + exp(-y)): Flowformer's map
//   performer  exp(y - |x|^2 / 2) / sqrt(F): FAVOR+ positive random features (Performer); needs a projection whose
//              columns are the random directions (performer_projection below), x the raw q or k row. Its features
//              estimate exp(x_q . x_k): pass q, k already scaled by K^(-1/4) and spec.scale 1 for softmax's kernel.
enum class feature_map : std::uint8_t { identity, elu_plus_one, relu, softmax, exp, performer, sigmoid };
inline constexpr feature_map k_feature_maps[] = {feature_map::identity, feature_map::elu_plus_one, feature_map::relu, feature_map::softmax,
                                                 feature_map::exp,      feature_map::performer,    feature_map::sigmoid};  // every map, once
const char* feature_map_name(feature_map f);
bool parse_feature_map(const std::string& name, feature_map& f);  // the names above; false (f untouched) otherwise

// A projection of q and k before phi (Hedgehog's learned maps, Performer's random features): each raw row x of head h
// becomes y = x W_h + b_h with F features. weight is [heads][K][F] row-major f32, bias [heads][F] or empty, heads
// q.heads (one per head) or 1 (shared). With a projection the state is F x V: spec.g (channel), initial_state and
// final_state take F where they took K.
struct feature_projection {
  std::span<const float> weight;  // heads * K * F values
  std::span<const float> bias;    // heads * F values, or empty
  std::int64_t heads = 0;         // 0: no projection
  std::int64_t features = 0;      // F
};

// Performer's random features for `heads` heads: W [heads][dim][features], the columns Gaussian directions N(0, I);
// orthogonal: within each block of `dim` columns orthogonalised, then each rescaled to the norm of an independent
// Gaussian vector (FAVOR+'s orthogonal random features, lower variance). Deterministic in seed: mt19937_64 and a
// Box-Muller transform written out (std::normal_distribution's algorithm is the library's), so platforms agree up to
// their libm's log and cos.
std::vector<float> performer_projection(std::int64_t heads, std::int64_t dim, std::int64_t features, std::uint64_t seed,
                                        bool orthogonal = true);

// Decay / gating, in log space (g <= 0, so alpha = exp(g) is in (0, 1]):
//   none     alpha = 1 (plain linear attention)
//   fixed    one log decay per head for every token (RetNet, Lightning / TransNormer): linear_spec::head_log_decay
//   scalar   a data-dependent log decay per (batch, token, head) (simple GLA, Mamba-2): linear_spec::g [B, T, H, 1]
//   channel  a data-dependent log decay per (batch, token, head, K channel) (GLA): linear_spec::g [B, T, H, K]
//            (F with a projection)
enum class linear_decay : std::uint8_t { none, fixed, scalar, channel };
const char* linear_decay_name(linear_decay d);

struct linear_spec {
  bool causal = true;
  std::int64_t prefix = 0;  // causal: the first `prefix` tokens attend within the whole prefix (JRT), 0 .. seq
  double scale = -1.0;  // < 0: 1 / sqrt(K) (fla's default)
  feature_map phi = feature_map::identity;
  feature_projection projection;  // heads 0: none
  bool normalize = false;  // divide by q_t . z_t (classic linear attention); off: TransNormer / Lightning / GLA
  bool flow = false;       // Flowformer's flow-conservation normalisation (non-causal; see the contract)
  linear_decay decay = linear_decay::none;
  std::span<const float> head_log_decay;  // fixed: one per head (q.heads of them), each finite and <= 0
  tensor g;                               // scalar / channel: log decays, finite and <= 0, f32 / bf16 / f16
  tensor g_backward;                      // bidirectional (causal = false, scalar / channel): the reversed scan's log
                                          // decays, like g; null data: g for both directions
};

// A [batch, heads, K (or F), V] float32 state with its own strides (elements).
struct state_tensor {
  float* data = nullptr;
  std::int64_t batch = 0, heads = 0, dim_k = 0, dim_v = 0;
  std::int64_t stride_batch = 0, stride_head = 0, stride_k = 0, stride_v = 0;
};
state_tensor make_state(float* data, std::int64_t batch, std::int64_t heads, std::int64_t dim_k, std::int64_t dim_v);

struct linear_options {
  int threads = 0;                              // 0: all cores; the result does not depend on it
  const state_tensor* initial_state = nullptr;  // read
  const state_tensor* final_state = nullptr;    // written (may be the same buffer as initial_state)
  std::int64_t chunk = 64;                      // tokens per chunk of the chunked kernel, 1 .. 1024
  // Varlen (fla's cu_seqlens): q, k, v, out (and g, g_backward) hold packed sequences [1, total, H, *], sequence s owns tokens
  // [cu_seqlens[s], cu_seqlens[s + 1]) and is a call of its own (its own state); the states are [num_seqs, H, K or F, V].
  // num_seqs + 1 non-decreasing offsets from 0 to q.seq. Empty: every batch entry is one sequence.
  std::span<const std::int64_t> cu_seqlens;
};

// The chunked CPU kernel. q, k [B, T, H, K], v [B, T, H, V] (f32, bf16 or f16, any strides, one dtype), out
// [B, T, H, V] (q's dtype or f32). Errors name the argument and the rule ("[linear_attention] k.dim 5 != q.dim 7");
// a call that breaks a rule writes nothing. initial_state and final_state may be the very same view (a state
// advanced in place) or disjoint, nothing in between; outputs must not overlap inputs or themselves.
status linear_attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s,
                        const linear_options& o = {});

// What linear_attention (and its backward) would run for this call and why, one line per decision: the work items
// and threads, the decode recurrence or the chunked kernel and its chunks, per decay which chunks factor
// (E_i / E_j) and which take pair-by-pair weights, the backward's path. An invalid call gives its error as the one
// line. Runs nothing.
std::vector<std::string> explain_linear(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s,
                                        const linear_options& o = {});

// The fp64 oracle of the same contract: the quadratic form above (explicit pair weights; O(T^2 K V)), or the
// recurrence itself in fp64 (they agree to fp64 rounding; the tests check it), or the recurrence in float (the naive
// f32 implementation the tolerance rule compares against). Same arguments and errors. The quadratic form computes the
// bidirectional and flow forms from their definitions in fp64; their recurrent forms are the composition the kernels
// run (two scans, or the flows around one non-causal call: core/linear_forms.cc) over fp64 recurrences, with f32
// buffers between the calls (they agree with the quadratic form to f32 rounding, not fp64).
enum class linear_form : std::uint8_t { quadratic, recurrent, recurrent_f32 };
status reference_linear_attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s,
                                  const linear_options& o = {}, linear_form form = linear_form::quadratic);

// The backward of linear_attention: given d_out = dL/d out (and dL/d final_state), the gradients of q, k, v, of the
// decay and of the initial state. Math contract (per (batch, head), tokens t; q, k as loaded: scale phi(.)):
//   D_t = q_t^T do_t + diag(alpha_{t+1}) D_{t+1},  D_{T-1} = q_{T-1}^T do_{T-1} + d_final_state   (dL/dS_t, K or F x V)
//   dq_t = S_t do_t^T,  dk_t = D_t v_t^T,  dv_t = k_t D_t,  d_initial_state = diag(alpha_0) D_0
//   dg_t[c] = sum over tokens i >= t of (q_i[c] dq_i[c] - k_i[c] dk_i[c]), plus final_state[c] . d_final_state[c]
//             (the gradient of a log decay is that of every running sum G_i it enters; scalar: summed over c; fixed:
//             summed over the tokens too), then dq, dk through scale, phi and the projection to the raw inputs, with
//             dW_h = sum over tokens (and batches; heads too when W is shared) of x^T dy, db_h the sum of dy, dy the
//             gradient of y = x W_h + b_h (summed in a fixed order: deterministic).
//   normalize: o = num / den, so num gets do / den and den gets -(do . o) / den (0 where den = 0), and den is one more
//   value column (of ones) of the same recurrence; the prefix and non-causal forms read D of the whole prefix.
// The kernel runs two passes per (batch, head): forward over the chunks for dq (the state rebuilt, never stored),
// then backward for dk, dv with D carried; it is deterministic and does not depend on the thread count.
struct linear_grads {
  tensor dq, dk, dv;                              // written: like q, k, v; f32 or q's dtype
  tensor dg;                                      // decay scalar / channel, written: like spec.g, f32; null data: not computed
                                                  // (bidirectional: both scans' when they share g, else the forward scan's)
  tensor dg_backward;                             // bidirectional with spec.g_backward: its gradient, like dg
  std::span<float> d_projection_weight;           // written: like spec.projection.weight; empty: not computed
  std::span<float> d_projection_bias;             // written: like spec.projection.bias; empty: not computed
  std::span<float> d_head_log_decay;              // decay fixed, written: one per head; empty: not computed
  const state_tensor* d_initial_state = nullptr;  // written: dL / d options.initial_state (a zero state when it is null)
  const state_tensor* d_final_state = nullptr;    // read: dL / d final_state (null: 0)
};
// q, k, v, spec and options as for the forward (options.final_state must be null: the backward writes no state).
status linear_attention_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& d_out, const linear_spec& s,
                                 const linear_grads& grads, const linear_options& o = {});
// The oracle of the same: the recurrence with every state kept and the adjoint recursion above taken literally (the
// decay gradient from alpha_t's own factor, not the running-sum identity the kernel uses), in fp64 (form recurrent) or
// in float (recurrent_f32: the naive implementation of the tolerance rule); form quadratic is refused. Same errors.
// The bidirectional and flow forms are the kernels' composition over these adjoints, with f32 buffers between the calls
// (the finite-difference tests check them against the quadratic forward).
status reference_linear_attention_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& d_out,
                                           const linear_spec& s, const linear_grads& grads, const linear_options& o = {},
                                           linear_form form = linear_form::recurrent);

}  // namespace omniattn
