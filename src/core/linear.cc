// linear_attention(): validation of the call (one set of rules for the kernel and the oracle) and the entry points.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <random>
#include <span>
#include <utility>
#include <sstream>
#include <string>
#include <vector>

#include "core/backends.h"
#include "core/checked_math.h"
#include "core/checks.h"
#include "core/linear_params.h"
#include "core/storage.h"
#include "cpu/tiles.h"
#include "omniattn/linear.h"

namespace omniattn {

const char* feature_map_name(feature_map f) {
  switch (f) {
    case feature_map::identity: return "identity";
    case feature_map::elu_plus_one: return "elu_plus_one";
    case feature_map::relu: return "relu";
    case feature_map::softmax: return "softmax";
    case feature_map::exp: return "exp";
    case feature_map::performer: return "performer";
    case feature_map::sigmoid: return "sigmoid";
  }
  return "?";
}

bool parse_feature_map(const std::string& name, feature_map& f) {
  for (feature_map x : k_feature_maps)
    if (name == feature_map_name(x)) {
      f = x;
      return true;
    }
  return false;
}

const char* linear_decay_name(linear_decay d) {
  switch (d) {
    case linear_decay::none: return "none";
    case linear_decay::fixed: return "fixed";
    case linear_decay::scalar: return "scalar";
    case linear_decay::channel: return "channel";
  }
  return "?";
}

// Box-Muller over mt19937_64's 53-bit uniforms: both are fully specified, so the directions are the same on every
// platform (std::normal_distribution's algorithm is the library's choice).
std::vector<float> performer_projection(std::int64_t heads, std::int64_t dim, std::int64_t features, std::uint64_t seed, bool orthogonal) {
  if (heads < 1 || dim < 1 || features < 1) return {};
  std::mt19937_64 gen(seed);
  const auto uniform = [&] { return (static_cast<double>(gen() >> 11) + 0.5) * 0x1.0p-53; };  // in (0, 1)
  const auto gaussian = [&] {  // the two draws in a fixed order (operands of one expression would not be)
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  };
  std::vector<float> w(static_cast<std::size_t>(heads * dim * features));
  std::vector<double> block(static_cast<std::size_t>(dim * dim));
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t f0 = 0; f0 < features; f0 += dim) {
      const std::int64_t cols = std::min(dim, features - f0);
      for (double& x : block) x = gaussian();  // row r of block: direction f0 + r
      if (orthogonal)
        for (std::int64_t r = 0; r < dim; ++r) {  // modified Gram-Schmidt, then the length of a fresh Gaussian vector
          double* u = &block[static_cast<std::size_t>(r * dim)];
          for (std::int64_t e = 0; e < r; ++e) {
            const double* prev = &block[static_cast<std::size_t>(e * dim)];
            double d = 0.0;
            for (std::int64_t c = 0; c < dim; ++c) d += u[c] * prev[c];
            for (std::int64_t c = 0; c < dim; ++c) u[c] -= d * prev[c];
          }
          double norm = 0.0;
          for (std::int64_t c = 0; c < dim; ++c) norm += u[c] * u[c];
          for (std::int64_t c = 0; c < dim; ++c) u[c] /= std::sqrt(norm);
        }
      for (std::int64_t r = 0; r < cols; ++r) {
        double length = 1.0;
        if (orthogonal) {
          double sq = 0.0;
          for (std::int64_t c = 0; c < dim; ++c) {
            const double x = gaussian();
            sq += x * x;
          }
          length = std::sqrt(sq);
        }
        for (std::int64_t c = 0; c < dim; ++c)
          w[static_cast<std::size_t>((h * dim + c) * features + f0 + r)] = static_cast<float>(length * block[static_cast<std::size_t>(r * dim + c)]);
      }
    }
  return w;
}

state_tensor make_state(float* data, std::int64_t batch, std::int64_t heads, std::int64_t dim_k, std::int64_t dim_v) {
  return {data, batch, heads, dim_k, dim_v, heads * dim_k * dim_v, dim_k * dim_v, dim_v, 1};
}

namespace detail {
namespace {

const char* const k_state_dims[4] = {"batch", "head", "k", "v"};

// A [sequences, heads, K, V] f32 state (sequences: q.batch, or the varlen call's count), K the state's features (q.dim,
// or the projection's F), V = v.dim: the bytes it spans.
byte_range check_state(const char* name, const state_tensor& st, const tensor& q, const tensor& v, std::int64_t sequences,
                       std::int64_t dim_k) {
  if (st.batch != sequences || st.heads != q.heads || st.dim_k != dim_k || st.dim_v != v.dim)
    fail(name, " is [", st.batch, ", ", st.heads, ", ", st.dim_k, ", ", st.dim_v, "], expected [", sequences, ", ", q.heads, ", ", dim_k,
         ", ", v.dim, "]");
  if (!st.data && sequences * q.heads > 0) fail(name, ".data is null");
  if (reinterpret_cast<std::uintptr_t>(st.data) % 4 != 0) fail(name, ".data is not aligned to its 4-byte f32 elements");
  const std::int64_t sizes[4] = {st.batch, st.heads, st.dim_k, st.dim_v}, strides[4] = {st.stride_batch, st.stride_head, st.stride_k, st.stride_v};
  return extent(name, st.data, 4, sizes, strides, 4);
}

void check_state_written(const char* name, const state_tensor& st) {
  const std::int64_t sizes[4] = {st.batch, st.heads, st.dim_k, st.dim_v}, strides[4] = {st.stride_batch, st.stride_head, st.stride_k, st.stride_v};
  check_no_self_overlap(name, sizes, strides, k_state_dims, 4);
}

bool same_view(const state_tensor& a, const state_tensor& b) {
  return a.data == b.data && a.stride_batch == b.stride_batch && a.stride_head == b.stride_head && a.stride_k == b.stride_k &&
         a.stride_v == b.stride_v;
}

// [B, T, H, dim] like q's first three dims.
void check_bth(const char* name, const tensor& t, const tensor& q, std::int64_t dim, const char* dim_name) {
  const struct {
    const char* axis;
    std::int64_t got, want;
  } dims[3] = {{"batch", t.batch, q.batch}, {"seq", t.seq, q.seq}, {"heads", t.heads, q.heads}};
  for (const auto& x : dims)
    if (x.got != x.want) fail(name, ".", x.axis, " ", x.got, " != q.", x.axis, " ", x.want);
  if (t.dim != dim) fail(name, ".dim ", t.dim, " != ", dim_name, " ", dim);
}

// Every log decay of g finite and <= 0. The whole of g is read before the call runs (a channel decay is as large as q):
// rows of f32 are tested without a branch per element, and only a row that holds a bad value is searched for it.
void check_log_decays(const char* name, const tensor& g) {
  for (std::int64_t b = 0; b < g.batch; ++b)
    for (std::int64_t t = 0; t < g.seq; ++t)
      for (std::int64_t h = 0; h < g.heads; ++h) {
        const std::int64_t base = b * g.stride_batch + t * g.stride_seq + h * g.stride_head;
        if (g.type == dtype::f32 && (g.stride_dim == 1 || g.dim == 1)) {
          const float* row = static_cast<const float*>(g.data) + base;
          bool bad = false;
          for (std::int64_t c = 0; c < g.dim; ++c) bad |= !(row[c] <= 0.0f && row[c] >= -std::numeric_limits<float>::max());
          if (!bad) continue;
        }
        for (std::int64_t c = 0; c < g.dim; ++c) {
          const double x = load_element(g.data, g.type, base + c * g.stride_dim);
          if (!(std::isfinite(x) && x <= 0.0))
            fail(name, "[", b, ", ", t, ", ", h, ", ", c, "] ", x, " must be finite and <= 0 (log of a decay in (0, 1])");
        }
      }
}

// q, k, v, the spec and options.initial_state: the rules of both directions; p filled but for out; every buffer read
// recorded in `inputs`.
void build_inputs(const tensor& q, const tensor& k, const tensor& v, const linear_spec& s, const linear_options& o, linear_params& p,
                  std::vector<input_range>& inputs) {
  inputs = {{"q", check_tensor("q", q)}, {"k", check_tensor("k", k)}, {"v", check_tensor("v", v)}};
  if (q.type == dtype::f64) fail("q.type f64: the linear kernels take f32, bf16 or f16");
  if (k.type != q.type) fail("k.type ", dtype_name(k.type), " != q.type ", dtype_name(q.type));
  if (v.type != q.type) fail("v.type ", dtype_name(v.type), " != q.type ", dtype_name(q.type));
  check_same_shape("k", k, "q", q);
  check_bth("v", v, q, v.dim, "v.dim");
  if (!std::isfinite(s.scale)) fail("spec.scale ", s.scale, " must be finite (< 0: 1 / sqrt(K))");
  if (std::find(std::begin(k_feature_maps), std::end(k_feature_maps), s.phi) == std::end(k_feature_maps))
    fail("spec.phi ", static_cast<int>(s.phi), " is not a feature map");
  if (o.chunk < 1 || o.chunk > 1024) fail("options.chunk ", o.chunk, " must be in 1..1024");
  p = {};
  p.threads = check_threads("options.threads", o.threads);
  p.dim_in = q.dim;
  p.dim_k = q.dim;
  if (const feature_projection& pr = s.projection; pr.heads != 0) {
    if (pr.heads != 1 && pr.heads != q.heads) fail("spec.projection.heads ", pr.heads, " must be 1 (shared) or q.heads ", q.heads);
    if (pr.features < 1) fail("spec.projection.features ", pr.features, " must be >= 1");
    // The weights, and the pre-pass's [B, T, H, F] f32 feature buffers, must be addressable.
    std::int64_t nw = 0, nb = 0, buffer = 0;
    if (!mul_fits(pr.heads, q.dim, &nw) || !mul_fits(nw, pr.features, &nw) || !mul_fits(pr.heads, pr.features, &nb) ||
        !mul_fits(q.batch, q.seq, &buffer) || !mul_fits(buffer, q.heads, &buffer) || !mul_fits(buffer, pr.features, &buffer) ||
        !mul_fits(buffer, 16, &buffer))
      fail("spec.projection.features ", pr.features, ": the weights or the [B, T, H, F] feature buffers overflow int64 addressing");
    if (static_cast<std::int64_t>(pr.weight.size()) != nw)
      fail("spec.projection.weight has ", pr.weight.size(), " values, expected heads x K x F = ", pr.heads, " x ", q.dim, " x ", pr.features);
    if (!pr.bias.empty() && static_cast<std::int64_t>(pr.bias.size()) != nb)
      fail("spec.projection.bias has ", pr.bias.size(), " values, expected heads x F = ", pr.heads, " x ", pr.features, " (or none)");
    for (const auto& [name, vals] : {std::pair{"spec.projection.weight", pr.weight}, std::pair{"spec.projection.bias", pr.bias}}) {
      for (std::size_t i = 0; i < vals.size(); ++i)
        if (!std::isfinite(vals[i])) fail(name, "[", i, "] ", vals[i], " must be finite");
      if (!vals.empty()) inputs.push_back({name, array_range(name, vals.data(), static_cast<std::int64_t>(vals.size()), 4)});
    }
    if (!pr.weight.data()) fail("spec.projection.weight.data is null");
    p.proj_w = pr.weight.data();
    p.proj_b = pr.bias.empty() ? nullptr : pr.bias.data();
    p.proj_heads = pr.heads;
    p.dim_k = pr.features;
  } else if (s.phi == feature_map::performer) {
    fail("spec.phi performer needs spec.projection (its random directions: performer_projection)");
  }
  switch (s.decay) {
    case linear_decay::none: break;
    case linear_decay::fixed:
      if (static_cast<std::int64_t>(s.head_log_decay.size()) != q.heads)
        fail("spec.head_log_decay has ", s.head_log_decay.size(), " values, expected one per head (", q.heads, ")");
      for (std::int64_t h = 0; h < q.heads; ++h)
        if (!(std::isfinite(s.head_log_decay[h]) && s.head_log_decay[h] <= 0.0f))
          fail("spec.head_log_decay[", h, "] ", s.head_log_decay[h], " must be finite and <= 0 (log of a decay in (0, 1])");
      inputs.push_back({"spec.head_log_decay", array_range("spec.head_log_decay", s.head_log_decay.data(), q.heads, 4)});
      break;
    case linear_decay::scalar:
    case linear_decay::channel: {
      const tensor& g = s.g;
      const std::int64_t want = s.decay == linear_decay::scalar ? 1 : p.dim_k;  // channel: one per state row
      if (g.data == nullptr && q.batch * q.seq * q.heads > 0) fail("spec.g.data is null (decay ", linear_decay_name(s.decay), ")");
      if (g.type == dtype::f64) fail("spec.g.type f64: f32, bf16 or f16");
      if (g.batch != q.batch || g.seq != q.seq || g.heads != q.heads || g.dim != want)
        fail("spec.g is [", g.batch, ", ", g.seq, ", ", g.heads, ", ", g.dim, "], expected [", q.batch, ", ", q.seq, ", ", q.heads, ", ",
             want, "] (decay ", linear_decay_name(s.decay), ")");
      inputs.push_back({"spec.g", check_tensor("spec.g", g)});
      check_log_decays("spec.g", g);
      p.g = g.data;
      p.g_type = g.type;
      kernel_strides(g, p.g_stride);
      if (const tensor& gb = s.g_backward; gb.data) {
        if (s.causal) fail("spec.g_backward is set but causal = true (it is the reversed scan's decay of the bidirectional form)");
        if (gb.type == dtype::f64) fail("spec.g_backward.type f64: f32, bf16 or f16");
        check_same_shape("spec.g_backward", gb, "spec.g", g);
        inputs.push_back({"spec.g_backward", check_tensor("spec.g_backward", gb)});
        check_log_decays("spec.g_backward", gb);
        p.gb = gb.data;
        p.gb_type = gb.type;
        kernel_strides(gb, p.gb_stride);
      }
      break;
    }
    default: fail("spec.decay ", static_cast<int>(s.decay), " is not a decay kind");
  }
  if (s.normalize && o.initial_state)
    fail("spec.normalize with options.initial_state: the key-sum state z is not carried between calls yet");
  if (s.prefix < 0 || s.prefix > q.seq) fail("spec.prefix ", s.prefix, " must be in 0..q.seq ", q.seq);
  if (s.prefix > 0 && !s.causal) fail("spec.prefix ", s.prefix, " with causal = false: the whole sequence is the prefix already");
  if (s.prefix > 0 && s.decay != linear_decay::none)
    fail("spec.prefix with decay ", linear_decay_name(s.decay), ": the prefix form with a decay is not supported yet");
  if (s.g_backward.data && s.decay != linear_decay::scalar && s.decay != linear_decay::channel)
    fail("spec.g_backward is set but spec.decay is ", linear_decay_name(s.decay), " (it is the reversed scan's scalar or channel decay)");
  if (s.flow) {  // Flowformer's form: its flows divide by sums of features, which must be positive
    if (s.causal) fail("spec.flow with causal = true: Flowformer's flow form is non-causal");
    if (s.decay != linear_decay::none) fail("spec.flow with decay ", linear_decay_name(s.decay), ": the flow form has no decay");
    if (s.normalize) fail("spec.flow with spec.normalize: the flows are the normalisation");
    if (o.initial_state) fail("options.initial_state with spec.flow: the flow form has no state");
    if (s.phi == feature_map::identity || s.phi == feature_map::relu)
      fail("spec.flow with phi ", feature_map_name(s.phi), ": the flows need positive features (sigmoid, elu_plus_one, softmax, exp or performer)");
  }
  if (!s.causal && s.decay != linear_decay::none && o.initial_state)
    fail("options.initial_state with the bidirectional form (causal = false with decay ", linear_decay_name(s.decay),
         "): it has no state to start from");
  p.seqs = q.batch;
  if (!o.cu_seqlens.empty()) {
    const std::span<const std::int64_t> cu = o.cu_seqlens;
    if (q.batch != 1) fail("options.cu_seqlens with q.batch ", q.batch, ": packed sequences are [1, total tokens, heads, dim]");
    if (cu[0] != 0) fail("options.cu_seqlens[0] ", cu[0], " must be 0");
    for (std::size_t s_ = 1; s_ < cu.size(); ++s_)
      if (cu[s_] < cu[s_ - 1]) fail("options.cu_seqlens[", s_, "] ", cu[s_], " < options.cu_seqlens[", s_ - 1, "] ", cu[s_ - 1], ": offsets must not decrease");
    if (cu.back() != q.seq) fail("options.cu_seqlens ends at ", cu.back(), ", expected q.seq ", q.seq, " (the packed tokens)");
    if (s.prefix > 0) fail("spec.prefix with options.cu_seqlens is not supported yet");
    inputs.push_back({"options.cu_seqlens", array_range("options.cu_seqlens", cu.data(), static_cast<std::int64_t>(cu.size()), 8)});
    p.cu_seqlens = cu.data();
    p.num_seqs = static_cast<std::int64_t>(cu.size()) - 1;
    p.seqs = p.num_seqs;
  }
  if (o.initial_state) inputs.push_back({"options.initial_state", check_state("options.initial_state", *o.initial_state, q, v, p.seqs, p.dim_k)});
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.in_type = q.type;
  p.v_type = v.type;
  kernel_strides(q, p.q_stride);
  kernel_strides(k, p.k_stride);
  kernel_strides(v, p.v_stride);
  p.batch = q.batch;
  p.seq = q.seq;
  p.heads = q.heads;
  p.dim_v = v.dim;
  p.scale = s.scale < 0 ? 1.0 / std::sqrt(static_cast<double>(q.dim)) : s.scale;
  p.phi = s.phi;
  p.causal = s.causal;
  p.prefix = s.causal ? s.prefix : q.seq;
  p.normalize = s.normalize;
  p.flow = s.flow;
  p.decay = s.decay;
  p.head_log_decay = s.head_log_decay.data();
  p.initial_state = o.initial_state;
  p.chunk = o.chunk;
}

// A written [B, T, H, *] view of dtype q.type or f32: checked against itself, the inputs and what is written already.
byte_range written_view(const char* name, const tensor& t, dtype q_type, const std::vector<input_range>& inputs,
                        std::vector<input_range>& written) {
  const byte_range r = check_tensor(name, t);
  if (t.type != q_type && t.type != dtype::f32) fail(name, ".type ", dtype_name(t.type), " must be q.type ", dtype_name(q_type), " or f32");
  check_no_self_overlap(name, t);
  check_no_alias(name, r, inputs);
  check_no_alias(name, r, written);
  written.push_back({name, r});
  return r;
}

void build_forward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s, const linear_options& o,
                   linear_params& p) {
  std::vector<input_range> inputs, written;
  build_inputs(q, k, v, s, o, p, inputs);
  if (o.final_state && p.flow) fail("options.final_state with spec.flow: the flow form has no state to return");
  if (o.final_state && detail::bidirectional(p))
    fail("options.final_state with the bidirectional form (causal = false with decay ", linear_decay_name(s.decay), "): it has no state to return");
  check_bth("out", out, q, v.dim, "v.dim");
  written_view("out", out, q.type, inputs, written);
  if (const state_tensor* f = o.final_state) {
    const byte_range r = check_state("options.final_state", *f, q, v, p.seqs, p.dim_k);
    check_state_written("options.final_state", *f);
    // The same view is a state advanced in place (each head reads its slice before it writes it); any other overlap
    // would let one head's final state overwrite another head's initial state before it is read.
    if (const state_tensor* i = o.initial_state; i && overlaps(r, check_state("options.initial_state", *i, q, v, p.seqs, p.dim_k))) {
      if (!same_view(*f, *i)) fail("options.final_state overlaps options.initial_state without being the same view");
      inputs.pop_back();
    }
    check_no_alias("options.final_state", r, inputs);
    check_no_alias("options.final_state", r, written);
  }
  p.out = out.data;
  p.out_type = out.type;
  kernel_strides(out, p.out_stride);
  p.final_state = o.final_state;
}

void build_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& d_out, const linear_spec& s, const linear_grads& g,
                    const linear_options& o, linear_bwd_params& p) {
  std::vector<input_range> inputs, written;
  build_inputs(q, k, v, s, o, p.fwd, inputs);
  if (o.final_state) fail("options.final_state must be null: the backward writes no state (linear_grads.d_initial_state is its gradient)");
  check_bth("d_out", d_out, q, v.dim, "v.dim");
  inputs.push_back({"d_out", check_tensor("d_out", d_out)});
  if (d_out.type != q.type && d_out.type != dtype::f32)
    fail("d_out.type ", dtype_name(d_out.type), " must be q.type ", dtype_name(q.type), " or f32");
  if (const state_tensor* f = g.d_final_state) inputs.push_back({"grads.d_final_state", check_state("grads.d_final_state", *f, q, v, p.fwd.seqs, p.fwd.dim_k)});
  check_same_shape("grads.dq", g.dq, "q", q);
  check_same_shape("grads.dk", g.dk, "k", k);
  check_same_shape("grads.dv", g.dv, "v", v);
  written_view("grads.dq", g.dq, q.type, inputs, written);
  written_view("grads.dk", g.dk, q.type, inputs, written);
  written_view("grads.dv", g.dv, q.type, inputs, written);
  if (p.fwd.flow && (g.d_final_state || g.d_initial_state))
    fail(g.d_final_state ? "grads.d_final_state" : "grads.d_initial_state", " with spec.flow: the flow form has no states");
  if (detail::bidirectional(p.fwd) && (g.d_final_state || g.d_initial_state))
    fail(g.d_final_state ? "grads.d_final_state" : "grads.d_initial_state", " with the bidirectional form (causal = false with decay ",
         linear_decay_name(s.decay), "): it has no states");
  if (g.dg_backward.data) {
    if (!s.g_backward.data) fail("grads.dg_backward is set but spec.g_backward is not (without it dg holds both directions)");
    check_same_shape("grads.dg_backward", g.dg_backward, "spec.g_backward", s.g_backward);
    if (g.dg_backward.type != dtype::f32) fail("grads.dg_backward.type ", dtype_name(g.dg_backward.type), " must be f32");
  }
  if (g.dg.data) {
    if (s.decay != linear_decay::scalar && s.decay != linear_decay::channel)
      fail("grads.dg is set but spec.decay is ", linear_decay_name(s.decay), " (dg is the gradient of spec.g: scalar or channel)");
    check_same_shape("grads.dg", g.dg, "spec.g", s.g);
    if (g.dg.type != dtype::f32) fail("grads.dg.type ", dtype_name(g.dg.type), " must be f32");
    written_view("grads.dg", g.dg, dtype::f32, inputs, written);
    p.dg = static_cast<float*>(g.dg.data);
    kernel_strides(g.dg, p.dg_stride);
  }
  if (g.dg_backward.data) {
    written_view("grads.dg_backward", g.dg_backward, dtype::f32, inputs, written);
    p.dgb = static_cast<float*>(g.dg_backward.data);
    kernel_strides(g.dg_backward, p.dgb_stride);
  }
  if (!g.d_head_log_decay.empty()) {
    if (s.decay != linear_decay::fixed)
      fail("grads.d_head_log_decay is set but spec.decay is ", linear_decay_name(s.decay), " (it is the gradient of spec.head_log_decay)");
    if (static_cast<std::int64_t>(g.d_head_log_decay.size()) != q.heads)
      fail("grads.d_head_log_decay has ", g.d_head_log_decay.size(), " values, expected one per head (", q.heads, ")");
    if (!g.d_head_log_decay.data()) fail("grads.d_head_log_decay.data is null");
    if (reinterpret_cast<std::uintptr_t>(g.d_head_log_decay.data()) % 4 != 0) fail("grads.d_head_log_decay is not aligned to 4 bytes");
    const byte_range r = array_range("grads.d_head_log_decay", g.d_head_log_decay.data(), q.heads, 4);
    check_no_alias("grads.d_head_log_decay", r, inputs);
    check_no_alias("grads.d_head_log_decay", r, written);
    written.push_back({"grads.d_head_log_decay", r});
    p.d_head_log_decay = g.d_head_log_decay.data();
  }
  const auto projection_grad = [&](const char* name, std::span<float> grad, std::span<const float> of, const char* of_name) -> float* {
    if (grad.empty()) return nullptr;
    if (s.projection.heads == 0) fail(name, " is set but spec.projection is none");
    if (grad.size() != of.size()) fail(name, " has ", grad.size(), " values, expected ", of.size(), " (like ", of_name, ")");
    if (reinterpret_cast<std::uintptr_t>(grad.data()) % 4 != 0) fail(name, " is not aligned to 4 bytes");
    const byte_range r = array_range(name, grad.data(), static_cast<std::int64_t>(grad.size()), 4);
    check_no_alias(name, r, inputs);
    check_no_alias(name, r, written);
    written.push_back({name, r});
    return grad.data();
  };
  p.d_proj_w = projection_grad("grads.d_projection_weight", g.d_projection_weight, s.projection.weight, "spec.projection.weight");
  p.d_proj_b = projection_grad("grads.d_projection_bias", g.d_projection_bias, s.projection.bias, "spec.projection.bias");
  if (const state_tensor* d = g.d_initial_state) {
    const byte_range r = check_state("grads.d_initial_state", *d, q, v, p.fwd.seqs, p.fwd.dim_k);
    check_state_written("grads.d_initial_state", *d);
    check_no_alias("grads.d_initial_state", r, inputs);
    check_no_alias("grads.d_initial_state", r, written);
    p.d_initial_state = d;
  }
  p.d_out = d_out.data;
  p.do_type = d_out.type;
  kernel_strides(d_out, p.do_stride);
  p.dq = g.dq.data;
  p.dk = g.dk.data;
  p.dv = g.dv.data;
  p.dq_type = g.dq.type;
  p.dk_type = g.dk.type;
  p.dv_type = g.dv.type;
  kernel_strides(g.dq, p.dq_stride);
  kernel_strides(g.dk, p.dk_stride);
  kernel_strides(g.dv, p.dv_stride);
  p.d_final_state = g.d_final_state;
}

}  // namespace

status make_linear_params(const char* entry, const tensor& q, const tensor& k, const tensor& v, const tensor& out,
                          const linear_spec& s, const linear_options& o, linear_params& p) {
  linear_params built;
  status st = guarded(entry, [&] { build_forward(q, k, v, out, s, o, built); });
  if (st.ok()) p = built;
  return st;
}

status make_linear_bwd_params(const char* entry, const tensor& q, const tensor& k, const tensor& v, const tensor& d_out,
                              const linear_spec& s, const linear_grads& g, const linear_options& o, linear_bwd_params& p) {
  linear_bwd_params built;
  status st = guarded(entry, [&] { build_backward(q, k, v, d_out, s, g, o, built); });
  if (st.ok()) p = built;
  return st;
}

}  // namespace detail

namespace ref {
status run_linear_ref(const detail::linear_params& p, linear_form form);
status run_linear_bwd_ref(const detail::linear_bwd_params& p, bool f32);
}  // namespace ref

status linear_attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s,
                        const linear_options& o) {
  detail::linear_params p;
  if (status st = detail::make_linear_params("linear_attention", q, k, v, out, s, o, p); !st.ok()) return st;
  return detail::run_linear_forward(p);
}

status reference_linear_attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s,
                                  const linear_options& o, linear_form form) {
  detail::linear_params p;
  if (status st = detail::make_linear_params("reference_linear_attention", q, k, v, out, s, o, p); !st.ok()) return st;
  if (form != linear_form::quadratic && form != linear_form::recurrent && form != linear_form::recurrent_f32)
    return {"[reference_linear_attention] form " + std::to_string(static_cast<int>(form)) + " is not a linear_form"};
  return ref::run_linear_ref(p, form);
}

}  // namespace omniattn

namespace omniattn {

status linear_attention_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& d_out, const linear_spec& s,
                                 const linear_grads& grads, const linear_options& o) {
  detail::linear_bwd_params p;
  if (status st = detail::make_linear_bwd_params("linear_attention_backward", q, k, v, d_out, s, grads, o, p); !st.ok()) return st;
  return detail::run_linear_backward(p);
}

status reference_linear_attention_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& d_out,
                                           const linear_spec& s, const linear_grads& grads, const linear_options& o, linear_form form) {
  detail::linear_bwd_params p;
  if (status st = detail::make_linear_bwd_params("reference_linear_attention_backward", q, k, v, d_out, s, grads, o, p); !st.ok())
    return st;
  if (form != linear_form::recurrent && form != linear_form::recurrent_f32)
    return {"[reference_linear_attention_backward] form " + std::to_string(static_cast<int>(form)) +
            ": the backward oracle runs the recurrence (recurrent or recurrent_f32)"};
  return ref::run_linear_bwd_ref(p, form == linear_form::recurrent_f32);
}

// The decisions of the kernels, from the same predicates they take (detail::runs_recurrence, chunk_decay_span against
// k_linear_max_span), per work item.
std::vector<std::string> explain_linear(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s,
                                        const linear_options& o) {
  detail::linear_params p;
  if (status st = detail::make_linear_params("linear_attention", q, k, v, out, s, o, p); !st.ok()) return {st.error};
  std::vector<std::string> lines;
  std::ostringstream os;
  const auto line = [&](auto&&... parts) {
    os.str("");
    (os << ... << parts);
    lines.push_back(os.str());
  };
  const std::int64_t seqs = detail::linear_sequences(p), items = seqs * p.heads;
  line("kernel: the chunked linear-attention family (", cpu::dispatch_isa(), "); work items: ", seqs,
       p.cu_seqlens ? " packed sequences" : " batch entries", " x ", p.heads, " heads = ", items, " on ", p.threads, " threads",
       items < p.threads ? " (fewer items than threads: some threads idle, the chunks of a head run in order)" : "");
  if (p.proj_w)
    line("feature map: ", feature_map_name(p.phi), " after a projection ", p.dim_in, " -> ", p.dim_k, p.proj_heads > 1 ? " per head" : " shared by the heads",
         p.proj_b ? " with a bias" : "", ", mapped in a pass before the kernels into two [B, T, H, ", p.dim_k, "] f32 buffers (",
         2 * p.batch * p.seq * p.heads * p.dim_k * 4 >> 10, " KiB; the backward twice that), the kernels then run the identity map on ",
         p.dim_k, " features");
  else
    line("feature map: ", feature_map_name(p.phi), " on load");
  std::int64_t decode = 0, chunked = 0, chunks = 0, pairwise = 0, row_heads = 0;
  detail::linear_sequence view;
  // The bidirectional form: each direction is a causal call, the reversed one over the mirrored view with its own gates
  // (its chunks start from the other end): both are read.
  std::vector<detail::linear_params> directions(1, p);
  std::vector<std::int64_t> offsets;
  if (detail::bidirectional(p)) {
    directions[0].causal = true;
    directions[0].prefix = 0;
    directions.push_back(detail::mirrored(directions[0], offsets));
  }
  for (const detail::linear_params& dir : directions)
  for (std::int64_t x = 0; x < seqs; ++x) {
    const detail::linear_params* sp = &dir;
    std::int64_t b = x;
    if (p.cu_seqlens) {
      detail::sequence_of(dir, x, view);
      sp = &view.p;
      b = 0;
    }
    if (detail::runs_recurrence(*sp)) {
      ++decode;
      continue;
    }
    ++chunked;
    for (std::int64_t t0 = sp->prefix; t0 < sp->seq; t0 += sp->chunk) ++chunks;
    if (p.decay == linear_decay::none) continue;
    for (std::int64_t h = 0; h < p.heads; ++h) {  // chunks_factor's predicate, each chunk's span read once
      std::int64_t wide = 0;
      for (std::int64_t t0 = sp->prefix; t0 < sp->seq; t0 += sp->chunk)
        wide += detail::chunk_decay_span(*sp, b, h, t0, std::min(sp->chunk, sp->seq - t0)) > detail::k_linear_max_span;
      pairwise += wide;
      row_heads += wide > 0;
    }
  }
  const auto ndir = static_cast<std::int64_t>(directions.size());
  decode /= ndir;
  chunked /= ndir;
  if (decode)
    line("decode: ", decode, " of ", seqs, " sequences have at most ", detail::k_recurrent_tokens,
         " causal tokens: the recurrence itself, one pass over the K x V state per token",
         o.final_state && o.initial_state && o.final_state->data == o.initial_state->data ? ", in place" : "");
  if (chunked)
    line("chunked: ", chunked, " sequences, chunks of ", p.chunk, " tokens (", chunks, " causal chunks per head", ndir > 1 ? " over both directions" : "",
         "), state ", p.dim_k, " x ",
         p.dim_v, p.normalize ? " + the normaliser's column" : "", " in f32");
  if (p.causal && p.prefix > 0) line("prefix: the first ", p.prefix, " tokens read the state of the whole prefix (JRT), the rest are causal");
  if (detail::bidirectional(p))
    line("bidirectional (ViG): the causal call with spec.g plus the causal call over the reversed tokens with ",
         p.gb ? "spec.g_backward" : "spec.g", " (a view: seq strides negated), summed in f32", p.normalize ? " over both denominators" : "",
         "; the chunks and decays below count both directions");
  else if (p.flow)
    line("flow (Flowformer): incoming / outgoing and conserved flows per (sequence, head) in double around one non-causal call of "
         "q / I, k and c v (competition c, allocation sigmoid(Ih) applied after)");
  else if (!p.causal)
    line("non-causal: every token reads the state of its whole sequence");
  if (p.decay == linear_decay::none) {
    line("decay: none");
  } else if (chunks > 0) {
    line("decay ", linear_decay_name(p.decay), ": ", chunks * p.heads - pairwise, " of ", chunks * p.heads,
         " (chunk, head) pairs factor as E_i / E_j (GEMMs); ", pairwise, " span more than exp(", detail::k_linear_max_span,
         ") and take pair-by-pair weights exp(B_i - B_j)");
  }
  line("backward: ", row_heads == 0 ? "tiled GEMMs for every (sequence, head)"
                                    : std::to_string(row_heads) + " (sequence, head) items on the row path (a chunk that does not factor), the rest tiled");
  return lines;
}

}  // namespace omniattn
