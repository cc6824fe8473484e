// Shared by the linear-attention tests (test_linear.cc, test_linear_backward.cc): a case, its seeded inputs, and
// max-norm helpers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "omniattn/linear.h"
#include "test_common.h"

namespace omniattn::test {

struct linear_case {
  std::int64_t batch = 2, seq = 65, heads = 3, dim_k = 5, dim_v = 8, chunk = 64;
  feature_map phi = feature_map::identity;
  linear_decay decay = linear_decay::none;
  bool causal = true, normalize = false, initial = false;
  std::int64_t prefix = 0;
  dtype type = dtype::f32;
  std::int64_t features = 0;  // a projection K -> features before phi (0: none)
  bool shared_projection = false, projection_bias = true;
  bool backward_gates = false;  // bidirectional: a g_backward of its own
  bool flow = false;            // Flowformer's form (non-causal, no decay)
  bool bidirectional() const { return !causal && decay != linear_decay::none; }
  bool stateless() const { return flow || bidirectional(); }  // no state in or out
  std::int64_t state_k() const { return features > 0 ? features : dim_k; }  // the state's rows
  std::string str() const {
    return "B" + std::to_string(batch) + " T" + std::to_string(seq) + " H" + std::to_string(heads) + " K" + std::to_string(dim_k) + " V" +
           std::to_string(dim_v) + " C" + std::to_string(chunk) + " " + feature_map_name(phi) + " decay " + linear_decay_name(decay) +
           (causal ? " causal" : " non-causal") + (prefix ? " prefix " + std::to_string(prefix) : "") + (normalize ? " normalize" : "") + (initial ? " s0" : "") +
            (backward_gates ? " g_backward" : "") + (flow ? " flow" : "") + (features ? " projection F" + std::to_string(features) + (shared_projection ? " shared" : "") + (projection_bias ? " bias" : "") : "") +
           " " + dtype_name(type);
  }
};

// Seeded inputs of a case: q, k, v (in the case's dtype), log decays, an initial state.
struct linear_data {
  linear_case c;
  std::vector<std::uint8_t> q, k, v;
  std::vector<float> g, gb, head_g, s0, proj_w, proj_b;
  explicit linear_data(const linear_case& lc, std::uint64_t seed) : c(lc) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f), decay(-0.7f, 0.0f);
    const auto fill = [&](std::vector<std::uint8_t>& buf, std::int64_t n) {
      buf.resize(static_cast<std::size_t>(n * dtype_size(c.type)));
      for (std::int64_t i = 0; i < n; ++i) {
        const float x = u(rng);
        if (c.type == dtype::f32) reinterpret_cast<float*>(buf.data())[i] = x;
        else reinterpret_cast<std::uint16_t*>(buf.data())[i] = f32_to_bf16(x);
      }
    };
    fill(q, c.batch * c.seq * c.heads * c.dim_k);
    fill(k, c.batch * c.seq * c.heads * c.dim_k);
    fill(v, c.batch * c.seq * c.heads * c.dim_v);
    g.resize(static_cast<std::size_t>(c.batch * c.seq * c.heads * gdim()));
    for (float& x : g) x = decay(rng);
    if (c.backward_gates) {
      gb.resize(g.size());
      for (float& x : gb) x = decay(rng);
    }
    head_g.resize(static_cast<std::size_t>(c.heads));
    for (std::size_t h = 0; h < head_g.size(); ++h) head_g[h] = std::log(1.0f - std::exp2(-5.0f - static_cast<float>(h)));  // RetNet
    s0.resize(static_cast<std::size_t>(c.batch * c.heads * c.state_k() * c.dim_v));
    for (float& x : s0) x = u(rng);
    if (c.features > 0) {  // Performer's directions, or a learned-looking projection of unit-scale features
      const std::int64_t ph = c.shared_projection ? 1 : c.heads;
      if (c.phi == feature_map::performer) {
        proj_w = performer_projection(ph, c.dim_k, c.features, seed);
      } else {
        proj_w.resize(static_cast<std::size_t>(ph * c.dim_k * c.features));
        for (float& x : proj_w) x = u(rng) * std::sqrt(3.0f / static_cast<float>(c.dim_k));
      }
      if (c.projection_bias) {
        proj_b.resize(static_cast<std::size_t>(ph * c.features));
        for (float& x : proj_b) x = 0.5f * u(rng);
      }
    }
  }
  std::int64_t gdim() const { return c.decay == linear_decay::channel ? c.state_k() : 1; }  // g is [B, T, H, gdim]
  tensor qv() const { return make_bshd(const_cast<std::uint8_t*>(q.data()), c.type, c.batch, c.seq, c.heads, c.dim_k); }
  tensor kv() const { return make_bshd(const_cast<std::uint8_t*>(k.data()), c.type, c.batch, c.seq, c.heads, c.dim_k); }
  tensor vv() const { return make_bshd(const_cast<std::uint8_t*>(v.data()), c.type, c.batch, c.seq, c.heads, c.dim_v); }
  linear_spec spec() const {
    linear_spec s;
    s.causal = c.causal;
    s.prefix = c.prefix;
    s.phi = c.phi;
    s.normalize = c.normalize;
    s.flow = c.flow;
    s.decay = c.decay;
    s.head_log_decay = head_g;
    s.g = make_bshd(const_cast<float*>(g.data()), dtype::f32, c.batch, c.seq, c.heads, gdim());
    if (c.backward_gates) s.g_backward = make_bshd(const_cast<float*>(gb.data()), dtype::f32, c.batch, c.seq, c.heads, gdim());
    if (c.features > 0) s.projection = {proj_w, proj_b, c.shared_projection ? 1 : c.heads, c.features};
    return s;
  }
};

inline double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float v : x) m = std::max(m, static_cast<double>(std::fabs(v)));
  return m;
}
inline double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return std::numeric_limits<double>::infinity();
    m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
  }
  return m;
}

// A seeded random case of the sweeps: every feature map, decay kind, normalisation, prefix, dtype, awkward sizes.
inline linear_case random_case(std::mt19937_64& rng) {
  const auto pick = [&](auto... xs) {
    const std::vector<std::common_type_t<decltype(xs)...>> v{xs...};
    return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng)];
  };
  linear_case c;
  c.batch = pick(1, 2);
  c.heads = pick(1, 2, 3);
  c.seq = pick(1, 2, 13, 31, 32, 33, 97);
  c.dim_k = pick(1, 3, 8, 17);
  c.dim_v = pick(1, 4, 9);
  c.chunk = pick(1, 5, 16, 32, 64);
  c.phi = pick(feature_map::identity, feature_map::elu_plus_one, feature_map::relu, feature_map::softmax, feature_map::exp,
               feature_map::performer, feature_map::sigmoid);
  // Hedgehog / Performer: a projection to F features (always for performer, sometimes for the others).
  if (c.phi == feature_map::performer || pick(false, false, true)) {
    c.features = pick(1, 4, 16, 19);
    c.shared_projection = pick(true, false);
    c.projection_bias = pick(true, false);
  }
  c.causal = pick(true, true, false);
  c.decay = pick(linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel);  // non-causal: ViG's form
  c.backward_gates = c.bidirectional() && c.decay != linear_decay::fixed && pick(true, false);
  // The normaliser needs positive features (elu + 1, softmax): with signed ones q . z can be ~0 and the division
  // amplifies any rounding without bound.
  const bool positive = c.phi == feature_map::elu_plus_one || c.phi == feature_map::softmax || c.phi == feature_map::exp ||
                        c.phi == feature_map::performer || c.phi == feature_map::sigmoid;
  c.normalize = positive && pick(true, false);
  c.flow = !c.causal && c.decay == linear_decay::none && positive && !c.normalize && pick(true, false);
  c.initial = pick(true, false) && !c.normalize && !c.stateless();  // the bidirectional and flow forms have no state
  c.type = pick(dtype::f32, dtype::bf16);
  if (c.causal && c.decay == linear_decay::none && pick(true, false))  // JRT's prefix form
    c.prefix = std::uniform_int_distribution<std::int64_t>(0, c.seq)(rng);
  return c;
}

// Every size edge (1, a chunk +- 1, K below and above a vector) with every decay kind: check(case, seed).
template <class Check>
void for_awkward_cases(Check&& check) {
  for (std::int64_t seq : {1, 7, 63, 64, 65, 130})
    for (std::int64_t dim_k : {1, 5, 16})
      for (linear_decay decay : {linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel}) {
        linear_case c;
        c.seq = seq;
        c.dim_k = dim_k;
        c.decay = decay;
        c.initial = seq % 2 == 1;
        check(c, static_cast<std::uint64_t>(seq * 100 + dim_k * 10 + static_cast<int>(decay)));
      }
}

// On every compiled target: V below, between and above the vector widths, each data-dependent decay.
template <class Check>
void for_target_cases(const char* test_name, Check&& check) {
  for_each_target(test_name, [&](const char* target) {
    for (linear_decay decay : {linear_decay::none, linear_decay::scalar, linear_decay::channel})
      for (std::int64_t dim_v : {1, 7, 33}) {
        linear_case c;
        c.seq = 70;
        c.dim_k = 19;
        c.dim_v = dim_v;
        c.chunk = 32;
        c.decay = decay;
        c.initial = true;
        SCOPED_TRACE(target);
        check(c, static_cast<std::uint64_t>(dim_v * 7 + static_cast<int>(decay)));
        c.features = 21;  // the projected pre-pass (and its chain) on this target, then the bidirectional form
        c.phi = feature_map::performer;
        check(c, static_cast<std::uint64_t>(dim_v * 7 + static_cast<int>(decay)) + 1);
        c.features = 0;
        c.phi = feature_map::identity;
        c.causal = false;  // the bidirectional form with a decay, the plain non-causal one without
        c.initial = false;
        check(c, static_cast<std::uint64_t>(dim_v * 7 + static_cast<int>(decay)) + 2);
        c.phi = feature_map::sigmoid;  // and Flowformer's flow form, which has no decay
        c.decay = linear_decay::none;
        c.flow = true;
        check(c, static_cast<std::uint64_t>(dim_v * 7 + static_cast<int>(decay)) + 3);
        c.decay = decay;
        c.flow = false;
        c.causal = true;
        c.initial = true;
      }
  });
}

}  // namespace omniattn::test
