// The linear-attention backward (include/omniattn/linear.h): the fp64 oracle against central finite differences of
// the fp64 forward, the chunked kernel against the oracle under the tolerance rule (awkward sizes, every feature map,
// decay kind, normalisation, prefix, initial / final state, f32 and bf16, every compiled target), gradients through a
// split sequence (prefill then continuation) against one call, thread independence, and the validation messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "linear_common.h"
#include "omniattn/linear.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

using test::linear_case;
using test::linear_data;
using test::max_abs;
using test::max_diff;

// The gradients of one call, f32.
struct grads_result {
  std::vector<float> dq, dk, dv, dg, dgb, d_head, d_s0, d_proj_w, d_proj_b;
  status st;
};

enum class runner { kernel, oracle, naive };

// Seeded upstream gradients: d_out [B, T, H, V] and d_final_state [B, H, K, V].
struct upstream {
  std::vector<float> d_out, d_final;
  upstream(const linear_case& c, std::uint64_t seed) {
    std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ULL);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    d_out.resize(static_cast<std::size_t>(c.batch * c.seq * c.heads * c.dim_v));
    for (float& x : d_out) x = u(rng);
    d_final.resize(static_cast<std::size_t>(c.batch * c.heads * c.state_k() * c.dim_v));
    for (float& x : d_final) x = u(rng);
  }
};

grads_result run_bwd(const linear_data& d, const upstream& up, runner r, int threads = 1, bool with_final = true,
                     const float* s0 = nullptr, bool want_decay = true) {
  const linear_case& c = d.c;
  grads_result g;
  const auto sized = [](std::vector<float>& x, std::int64_t n) { x.assign(static_cast<std::size_t>(n), -7.0f); };
  sized(g.dq, c.batch * c.seq * c.heads * c.dim_k);
  sized(g.dk, c.batch * c.seq * c.heads * c.dim_k);
  sized(g.dv, c.batch * c.seq * c.heads * c.dim_v);
  sized(g.dg, c.batch * c.seq * c.heads * d.gdim());
  sized(g.dgb, static_cast<std::int64_t>(d.gb.size()));
  sized(g.d_head, c.heads);
  sized(g.d_s0, c.batch * c.heads * c.state_k() * c.dim_v);
  sized(g.d_proj_w, static_cast<std::int64_t>(d.proj_w.size()));
  sized(g.d_proj_b, static_cast<std::int64_t>(d.proj_b.size()));
  const state_tensor init = make_state(const_cast<float*>(s0 ? s0 : d.s0.data()), c.batch, c.heads, c.state_k(), c.dim_v);
  const state_tensor dfin = make_state(const_cast<float*>(up.d_final.data()), c.batch, c.heads, c.state_k(), c.dim_v);
  const state_tensor ds0 = make_state(g.d_s0.data(), c.batch, c.heads, c.state_k(), c.dim_v);
  linear_options o;
  o.threads = threads;
  o.chunk = c.chunk;
  o.initial_state = c.initial || s0 ? &init : nullptr;
  linear_grads gr;
  gr.dq = make_bshd(g.dq.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_k);
  gr.dk = make_bshd(g.dk.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_k);
  gr.dv = make_bshd(g.dv.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  if (want_decay && (c.decay == linear_decay::scalar || c.decay == linear_decay::channel))
    gr.dg = make_bshd(g.dg.data(), dtype::f32, c.batch, c.seq, c.heads, d.gdim());
  if (want_decay && c.decay == linear_decay::fixed) gr.d_head_log_decay = g.d_head;
  if (want_decay && c.backward_gates) gr.dg_backward = make_bshd(g.dgb.data(), dtype::f32, c.batch, c.seq, c.heads, d.gdim());
  gr.d_initial_state = c.stateless() ? nullptr : &ds0;  // the bidirectional and flow forms have no states
  gr.d_final_state = with_final && !c.stateless() ? &dfin : nullptr;
  gr.d_projection_weight = g.d_proj_w;
  gr.d_projection_bias = g.d_proj_b;
  const tensor d_out = make_bshd(const_cast<float*>(up.d_out.data()), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  if (r == runner::kernel) g.st = linear_attention_backward(d.qv(), d.kv(), d.vv(), d_out, d.spec(), gr, o);
  else
    g.st = reference_linear_attention_backward(d.qv(), d.kv(), d.vv(), d_out, d.spec(), gr, o,
                                               r == runner::oracle ? linear_form::recurrent : linear_form::recurrent_f32);
  return g;
}

// The tolerance rule (tests/tolerance.h, linear gradients) for one gradient; M is the call's largest oracle gradient.
void expect_within_rule(const std::vector<float>& kernel, const std::vector<float>& naive, const std::vector<float>& oracle,
                        double M, const char* what, double floor_factor = 1.0) {
  const double tol = 2.0 * max_diff(naive, oracle) + floor_factor * test::k_linear_grad_floor_eps * test::dtype_eps(dtype::f32) * M;
  EXPECT_LE(max_diff(kernel, oracle), tol) << what << " (naive error " << max_diff(naive, oracle) << ", max " << max_abs(oracle) << ")";
}

void check_case(const linear_case& c, std::uint64_t seed, int threads = 1) {
  SCOPED_TRACE(c.str());
  const linear_data d(c, seed);
  const upstream up(c, seed);
  const grads_result k = run_bwd(d, up, runner::kernel, threads), o = run_bwd(d, up, runner::oracle), n = run_bwd(d, up, runner::naive);
  ASSERT_TRUE(k.st.ok()) << k.st.error;
  ASSERT_TRUE(o.st.ok()) << o.st.error;
  ASSERT_TRUE(n.st.ok()) << n.st.error;
  const bool data_decay = c.decay == linear_decay::scalar || c.decay == linear_decay::channel;
  double M = std::max({max_abs(o.dq), max_abs(o.dk), max_abs(o.dv), max_abs(o.d_s0)});
  if (data_decay) M = std::max({M, max_abs(o.dg), max_abs(o.dgb)});
  if (c.decay == linear_decay::fixed) M = std::max(M, max_abs(o.d_head));
  // The projection's gradients sum over every token (and head when shared): their own scale, their own floor
  // (at least the call's other gradients' scale: each term of their sums is x times a gradient of the size of dq, dk).
  const double MW = std::max({max_abs(o.d_proj_w), max_abs(o.d_proj_b), M});
  const double w_floor = test::linear_projection_floor_factor(c.batch * c.seq * (c.shared_projection ? c.heads : 1));
  expect_within_rule(k.d_proj_w, n.d_proj_w, o.d_proj_w, MW, "d_projection_weight", w_floor);
  expect_within_rule(k.d_proj_b, n.d_proj_b, o.d_proj_b, MW, "d_projection_bias", w_floor);
  expect_within_rule(k.dq, n.dq, o.dq, M, "dq");
  expect_within_rule(k.dk, n.dk, o.dk, M, "dk");
  expect_within_rule(k.dv, n.dv, o.dv, M, "dv");
  if (!c.stateless()) expect_within_rule(k.d_s0, n.d_s0, o.d_s0, M, "d_initial_state");
  if (data_decay) expect_within_rule(k.dg, n.dg, o.dg, M, "dg");
  if (c.backward_gates) expect_within_rule(k.dgb, n.dgb, o.dgb, M, "dg_backward");
  if (c.decay == linear_decay::fixed)
    expect_within_rule(k.d_head, n.d_head, o.d_head, M, "d_head_log_decay", test::linear_fixed_decay_floor_factor(c.batch, c.seq));
}

// L = sum(w_o * out) + sum(w_f * final_state) by the fp64 quadratic forward, for finite differences.
double loss(const linear_data& d, const upstream& up) {
  const linear_case& c = d.c;
  std::vector<float> out(up.d_out.size()), fin(up.d_final.size());
  const state_tensor init = make_state(const_cast<float*>(d.s0.data()), c.batch, c.heads, c.state_k(), c.dim_v);
  const state_tensor f = make_state(fin.data(), c.batch, c.heads, c.state_k(), c.dim_v);
  linear_options o;
  o.initial_state = c.initial ? &init : nullptr;
  o.final_state = c.stateless() ? nullptr : &f;  // the stateless forms have none (the d_final_state term is 0)
  const status st = reference_linear_attention(d.qv(), d.kv(), d.vv(), make_bshd(out.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v),
                                               d.spec(), o, linear_form::quadratic);
  EXPECT_TRUE(st.ok()) << st.error;
  double l = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) l += static_cast<double>(up.d_out[i]) * out[i];
  for (std::size_t i = 0; i < fin.size(); ++i) l += static_cast<double>(up.d_final[i]) * fin[i];
  return l;
}

TEST(LinearBackward, OracleMatchesFiniteDifferences) {
  struct fd_case {
    feature_map phi;
    linear_decay decay;
    bool normalize, initial, causal;
    std::int64_t prefix;
    std::int64_t features = 0;
    bool shared = false, gates = false, flow = false;
  };
  const fd_case cases[] = {
      {feature_map::identity, linear_decay::none, false, true, true, 0},   {feature_map::identity, linear_decay::fixed, false, true, true, 0},
      {feature_map::identity, linear_decay::scalar, false, true, true, 0}, {feature_map::elu_plus_one, linear_decay::channel, false, true, true, 0},
      {feature_map::softmax, linear_decay::none, true, false, true, 0},    {feature_map::elu_plus_one, linear_decay::scalar, true, false, true, 0},
      {feature_map::relu, linear_decay::none, false, true, false, 0},      {feature_map::identity, linear_decay::none, false, true, true, 3},
      {feature_map::softmax, linear_decay::none, true, false, true, 2},
      // Hedgehog (projection, then exp / softmax) and Performer (random features), per head and shared.
      {feature_map::exp, linear_decay::channel, false, true, true, 0, 4},
      {feature_map::softmax, linear_decay::scalar, true, false, true, 0, 5, true},
      {feature_map::performer, linear_decay::none, true, false, true, 0, 4},
      {feature_map::performer, linear_decay::fixed, false, true, true, 0, 2, true},
      {feature_map::identity, linear_decay::none, false, true, true, 2, 3, true},
      // ViG's bidirectional form: direction-wise gates, shared gates with normalisation, a fixed decay, projected.
      {feature_map::identity, linear_decay::scalar, false, false, false, 0, 0, false, true},
      {feature_map::elu_plus_one, linear_decay::channel, true, false, false, 0},
      {feature_map::softmax, linear_decay::fixed, false, false, false, 0},
      {feature_map::exp, linear_decay::channel, false, false, false, 0, 3, false, true},
      // Flowformer's flow form: sigmoid features, then a projected softmax map.
      {feature_map::sigmoid, linear_decay::none, false, false, false, 0, 0, false, false, true},
      {feature_map::softmax, linear_decay::none, false, false, false, 0, 4, true, false, true},
  };
  for (const fd_case& fc : cases) {
    linear_case c;
    c.batch = 1;
    c.heads = 2;
    c.seq = 6;
    c.dim_k = 3;
    c.dim_v = 2;
    c.phi = fc.phi;
    c.decay = fc.decay;
    c.normalize = fc.normalize;
    c.initial = fc.initial;
    c.causal = fc.causal;
    c.prefix = fc.prefix;
    c.features = fc.features;
    c.shared_projection = fc.shared;
    c.backward_gates = fc.gates;
    c.flow = fc.flow;
    SCOPED_TRACE(c.str());
    linear_data d(c, 11);
    if (c.decay == linear_decay::fixed) d.head_g = {-0.3f, -0.15f};  // away from 0: every head is probed
    const upstream up(c, 11);
    const grads_result an = run_bwd(d, up, runner::oracle);
    ASSERT_TRUE(an.st.ok()) << an.st.error;
    const float h = 1e-2f;
    double worst = 0.0, scale = 1.0;
    // Perturbs x[i] by +-h (skipping inputs where the map has a kink within reach, and log decays that would turn
    // positive) and compares the central difference with the analytic gradient.
    const auto probe = [&](float* x, std::size_t n, const std::vector<float>& grad, bool raw_qk, bool log_decay, const char* what) {
      for (std::size_t i = 0; i < n; ++i) {
        if (raw_qk && c.phi == feature_map::relu && std::fabs(x[i]) < 2 * h) continue;
        if (log_decay && x[i] > -2 * h) continue;
        const float x0 = x[i];
        x[i] = x0 + h;
        const double lp = loss(d, up);
        x[i] = x0 - h;
        const double lm = loss(d, up);
        x[i] = x0;
        const double fd = (lp - lm) / (2.0 * static_cast<double>(h));
        scale = std::max(scale, std::fabs(fd));
        worst = std::max(worst, std::fabs(fd - grad[i]));
        EXPECT_NEAR(fd, grad[i], 2e-3 * std::max(1.0, std::fabs(fd))) << what << "[" << i << "]";
      }
    };
    probe(reinterpret_cast<float*>(d.q.data()), an.dq.size(), an.dq, true, false, "dq");
    probe(reinterpret_cast<float*>(d.k.data()), an.dk.size(), an.dk, true, false, "dk");
    probe(reinterpret_cast<float*>(d.v.data()), an.dv.size(), an.dv, false, false, "dv");
    if (c.initial) probe(d.s0.data(), d.s0.size(), an.d_s0, false, false, "d_initial_state");
    if (c.decay == linear_decay::scalar || c.decay == linear_decay::channel) probe(d.g.data(), d.g.size(), an.dg, false, true, "dg");
    if (c.decay == linear_decay::fixed) probe(d.head_g.data(), d.head_g.size(), an.d_head, false, true, "d_head_log_decay");
    if (c.backward_gates) probe(d.gb.data(), d.gb.size(), an.dgb, false, true, "dg_backward");
    probe(d.proj_w.data(), d.proj_w.size(), an.d_proj_w, false, false, "d_projection_weight");
    probe(d.proj_b.data(), d.proj_b.size(), an.d_proj_b, false, false, "d_projection_bias");
    EXPECT_LE(worst, 2e-3 * scale) << "the largest gap between a central difference and the oracle's gradient";
  }
}

// With its own reversed-scan gates, the bidirectional form's dg is the forward scan's alone whether or not dg_backward is
// asked for too (and dg_backward the reversed scan's).
TEST(LinearBackward, BidirectionalGradientsOfEachDirection) {
  linear_case c;
  c.seq = 40;
  c.chunk = 16;
  c.causal = false;
  c.decay = linear_decay::scalar;
  c.backward_gates = true;
  const linear_data d(c, 21);
  const upstream up(c, 21);
  const grads_result both = run_bwd(d, up, runner::kernel);
  ASSERT_TRUE(both.st.ok()) << both.st.error;
  std::vector<float> dg_alone(both.dg.size(), -7.0f), dq(both.dq.size()), dk = dq, dv(both.dv.size());
  linear_grads g;
  g.dq = make_bshd(dq.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_k);
  g.dk = make_bshd(dk.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_k);
  g.dv = make_bshd(dv.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  g.dg = make_bshd(dg_alone.data(), dtype::f32, c.batch, c.seq, c.heads, 1);
  linear_options o;
  o.chunk = c.chunk;
  const tensor d_out = make_bshd(const_cast<float*>(up.d_out.data()), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  for (bool kernel : {true, false}) {
    std::fill(dg_alone.begin(), dg_alone.end(), -7.0f);  // each run writes its own
    std::fill(dq.begin(), dq.end(), -7.0f);
    const status st = kernel ? linear_attention_backward(d.qv(), d.kv(), d.vv(), d_out, d.spec(), g, o)
                             : reference_linear_attention_backward(d.qv(), d.kv(), d.vv(), d_out, d.spec(), g, o);
    ASSERT_TRUE(st.ok()) << st.error;
    if (kernel) EXPECT_EQ(dg_alone, both.dg);
    else EXPECT_LE(max_diff(dg_alone, both.dg), 1e-5 * max_abs(both.dg)) << "the oracle's dg alone against the kernel's";
    if (kernel) EXPECT_EQ(dq, both.dq);
    else EXPECT_LE(max_diff(dq, both.dq), 1e-5 * max_abs(both.dq)) << "the oracle's dq against the kernel's";
  }
  EXPECT_NE(both.dg, both.dgb) << "the two scans' gates have gradients of their own";
}

TEST(LinearBackward, KernelMatchesTheOracleOnAwkwardSizes) {
  test::for_awkward_cases([](const linear_case& c, std::uint64_t seed) { check_case(c, seed); });
}

TEST(LinearBackward, KernelMatchesTheOracleOnEveryTarget) {
  test::for_target_cases("LinearBackward.KernelMatchesTheOracleOnEveryTarget", [](const linear_case& c, std::uint64_t seed) { check_case(c, seed); });
}

TEST(LinearBackward, KernelMatchesTheOracleOnRandomSpecs) {
  std::mt19937_64 rng(4049);
  for (int trial = 0; trial < 120; ++trial) {
    const linear_case c = test::random_case(rng);
    check_case(c, static_cast<std::uint64_t>(trial), trial % 2 == 0 ? 1 : 3);
  }
}

// Decays too strong for the chunk factorisation (a span beyond exp(40) in a chunk) take the row path, whose pair
// weights are exp(B_i - B_j) <= 1: finite, and within the rule.
TEST(LinearBackward, StrongDecaysTakeTheRowPath) {
  for (linear_decay decay : {linear_decay::scalar, linear_decay::channel}) {
    linear_case c;
    c.seq = 70;
    c.chunk = 32;
    c.decay = decay;
    c.initial = true;
    SCOPED_TRACE(c.str());
    linear_data d(c, 17);
    for (std::size_t i = 0; i < d.g.size(); ++i) d.g[i] = i % 3 == 0 ? -6.0f : -0.5f;  // ~ -70 per chunk of 32
    const upstream up(c, 17);
    const grads_result k = run_bwd(d, up, runner::kernel), o = run_bwd(d, up, runner::oracle), n = run_bwd(d, up, runner::naive);
    ASSERT_TRUE(k.st.ok() && o.st.ok() && n.st.ok());
    for (const auto* x : {&k.dq, &k.dk, &k.dv, &k.dg, &k.d_s0})
      for (float e : *x) ASSERT_TRUE(std::isfinite(e));
    const double M = std::max({max_abs(o.dq), max_abs(o.dk), max_abs(o.dv), max_abs(o.dg), max_abs(o.d_s0)});
    expect_within_rule(k.dq, n.dq, o.dq, M, "dq");
    expect_within_rule(k.dk, n.dk, o.dk, M, "dk");
    expect_within_rule(k.dv, n.dv, o.dv, M, "dv");
    expect_within_rule(k.dg, n.dg, o.dg, M, "dg");
    expect_within_rule(k.d_s0, n.d_s0, o.d_s0, M, "d_initial_state");
  }
}

// Prefill then continuation: the backward of the second call gives dL/d(its initial state), which is the first call's
// d_final_state; the two calls' gradients then equal those of one call over the whole sequence.
TEST(LinearBackward, SplitSequenceMatchesOneCall) {
  for (linear_decay decay : {linear_decay::none, linear_decay::scalar, linear_decay::channel}) {
    linear_case c;
    c.seq = 90;
    c.dim_k = 6;
    c.dim_v = 5;
    c.chunk = 16;
    c.decay = decay;
    c.initial = true;
    SCOPED_TRACE(c.str());
    const linear_data whole(c, 5);
    const upstream up(c, 5);
    const grads_result one = run_bwd(whole, up, runner::kernel);
    ASSERT_TRUE(one.st.ok()) << one.st.error;
    const std::int64_t cut = 37;  // not a chunk boundary
    // The two halves as their own cases, cut out of the whole one's inputs.
    const auto slice = [&](std::int64_t t0, std::int64_t t1) {
      linear_case h = c;
      h.seq = t1 - t0;
      linear_data part(h, 5);
      const auto copy_rows = [&](const std::vector<std::uint8_t>& src, std::vector<std::uint8_t>& dst, std::int64_t width) {
        for (std::int64_t b = 0; b < c.batch; ++b)
          for (std::int64_t t = t0; t < t1; ++t)
            std::copy_n(src.begin() + ((b * c.seq + t) * c.heads * width) * 4, c.heads * width * 4,
                        dst.begin() + ((b * h.seq + (t - t0)) * c.heads * width) * 4);
      };
      copy_rows(whole.q, part.q, c.dim_k);
      copy_rows(whole.k, part.k, c.dim_k);
      copy_rows(whole.v, part.v, c.dim_v);
      for (std::int64_t b = 0; b < c.batch; ++b)
        for (std::int64_t t = t0; t < t1; ++t)
          std::copy_n(whole.g.begin() + (b * c.seq + t) * c.heads * whole.gdim(), c.heads * whole.gdim(),
                      part.g.begin() + (b * h.seq + (t - t0)) * c.heads * whole.gdim());
      part.s0 = whole.s0;
      upstream u = up;
      u.d_out.resize(static_cast<std::size_t>(c.batch * h.seq * c.heads * c.dim_v));
      for (std::int64_t b = 0; b < c.batch; ++b)
        for (std::int64_t t = t0; t < t1; ++t)
          std::copy_n(up.d_out.begin() + (b * c.seq + t) * c.heads * c.dim_v, c.heads * c.dim_v,
                      u.d_out.begin() + (b * h.seq + (t - t0)) * c.heads * c.dim_v);
      return std::pair{part, u};
    };
    auto [first, up1] = slice(0, cut);
    auto [second, up2] = slice(cut, c.seq);
    // The first call's final state is the second's initial state.
    std::vector<float> mid(whole.s0.size());
    {
      std::vector<float> out(up1.d_out.size());
      const state_tensor init = make_state(first.s0.data(), c.batch, c.heads, c.state_k(), c.dim_v);
      const state_tensor fin = make_state(mid.data(), c.batch, c.heads, c.state_k(), c.dim_v);
      linear_options o;
      o.initial_state = &init;
      o.final_state = &fin;
      ASSERT_TRUE(linear_attention(first.qv(), first.kv(), first.vv(), make_bshd(out.data(), dtype::f32, c.batch, cut, c.heads, c.dim_v),
                                   first.spec(), o).ok());
    }
    const grads_result g2 = run_bwd(second, up2, runner::kernel, 1, true, mid.data());
    ASSERT_TRUE(g2.st.ok()) << g2.st.error;
    up1.d_final = g2.d_s0;
    const grads_result g1 = run_bwd(first, up1, runner::kernel);
    ASSERT_TRUE(g1.st.ok()) << g1.st.error;
    const double tol = 64 * test::dtype_eps(dtype::f32);
    EXPECT_LE(max_diff(g1.d_s0, one.d_s0), tol * std::max(1.0, max_abs(one.d_s0)));
    const auto rows = [&](const std::vector<float>& a, const std::vector<float>& b, std::int64_t width) {  // the halves side by side
      std::vector<float> joined(static_cast<std::size_t>(c.batch * c.seq * c.heads * width));
      for (std::int64_t bt = 0; bt < c.batch; ++bt)
        for (std::int64_t t = 0; t < c.seq; ++t) {
          const float* src = t < cut ? &a[static_cast<std::size_t>((bt * cut + t) * c.heads * width)]
                                     : &b[static_cast<std::size_t>((bt * (c.seq - cut) + t - cut) * c.heads * width)];
          std::copy_n(src, c.heads * width, &joined[static_cast<std::size_t>((bt * c.seq + t) * c.heads * width)]);
        }
      return joined;
    };
    EXPECT_LE(max_diff(rows(g1.dq, g2.dq, c.dim_k), one.dq), tol * std::max(1.0, max_abs(one.dq)));
    EXPECT_LE(max_diff(rows(g1.dk, g2.dk, c.dim_k), one.dk), tol * std::max(1.0, max_abs(one.dk)));
    EXPECT_LE(max_diff(rows(g1.dv, g2.dv, c.dim_v), one.dv), tol * std::max(1.0, max_abs(one.dv)));
    if (decay != linear_decay::none) {
      // dg of the first half also carries the second half's dependence on the state: through d_final_state.
      EXPECT_LE(max_diff(rows(g1.dg, g2.dg, whole.gdim()), one.dg), tol * std::max(1.0, max_abs(one.dg)));
    }
  }
}

TEST(LinearBackward, ThreadCountDoesNotChangeTheResult) {
  for (int form = 0; form < 5; ++form) {  // fixed, channel, a shared projection (dW over several 256-row partials), bidirectional, flow
  const linear_decay decay = form == 0 ? linear_decay::fixed : form == 4 ? linear_decay::none : linear_decay::channel;
  linear_case c;
  c.batch = 3;
  c.heads = 3;
  c.seq = 77;
  c.dim_k = 9;
  c.dim_v = 6;
  c.chunk = 16;
  c.decay = decay;
  c.initial = form < 3;
  c.features = form == 2 ? 13 : 0;
  c.shared_projection = form == 2;  // 3 x 77 x 3 = 693 rows share W: three partial blocks
  c.phi = form == 2 ? feature_map::exp : form == 4 ? feature_map::sigmoid : feature_map::identity;
  c.causal = form < 3;
  c.backward_gates = form == 3;
  c.flow = form == 4;
  SCOPED_TRACE(c.str());
  const linear_data d(c, 9);
  const upstream up(c, 9);
  const grads_result one = run_bwd(d, up, runner::kernel, 1), four = run_bwd(d, up, runner::kernel, 4);
  ASSERT_TRUE(one.st.ok() && four.st.ok());
  EXPECT_EQ(one.dq, four.dq);
  EXPECT_EQ(one.dk, four.dk);
  EXPECT_EQ(one.dv, four.dv);
  EXPECT_EQ(one.d_head, four.d_head);
  EXPECT_EQ(one.dg, four.dg);
  if (!c.stateless()) EXPECT_EQ(one.d_s0, four.d_s0);
  EXPECT_EQ(one.d_proj_w, four.d_proj_w);
  EXPECT_EQ(one.d_proj_b, four.d_proj_b);
  EXPECT_EQ(one.dgb, four.dgb);
  }
}

// Optional parts: without d_final_state (0), without the decay's gradient (dq, dk, dv unchanged), and gradients
// written in q's dtype, bf16 (the f32 ones rounded once).
TEST(LinearBackward, OptionalGradientsAndOutputDtypes) {
  linear_case c;
  c.seq = 50;
  c.chunk = 16;
  c.decay = linear_decay::channel;
  c.initial = true;
  c.type = dtype::bf16;  // gradients may be written in q's dtype or in f32
  const linear_data d(c, 13);
  upstream up(c, 13);
  const grads_result with_dg = run_bwd(d, up, runner::kernel), without_dg = run_bwd(d, up, runner::kernel, 1, true, nullptr, false);
  ASSERT_TRUE(with_dg.st.ok() && without_dg.st.ok()) << without_dg.st.error;
  EXPECT_EQ(with_dg.dq, without_dg.dq);
  EXPECT_EQ(with_dg.dk, without_dg.dk);
  EXPECT_EQ(with_dg.dv, without_dg.dv);
  EXPECT_EQ(std::count(without_dg.dg.begin(), without_dg.dg.end(), -7.0f), static_cast<std::ptrdiff_t>(without_dg.dg.size()));
  const grads_result no_final = run_bwd(d, up, runner::kernel, 1, false);
  std::fill(up.d_final.begin(), up.d_final.end(), 0.0f);
  const grads_result zero_final = run_bwd(d, up, runner::kernel);
  ASSERT_TRUE(no_final.st.ok() && zero_final.st.ok());
  EXPECT_EQ(no_final.dq, zero_final.dq);
  EXPECT_EQ(no_final.dk, zero_final.dk);
  EXPECT_EQ(no_final.dg, zero_final.dg);
  EXPECT_EQ(no_final.d_s0, zero_final.d_s0);
  // bf16 gradients: the f32 result rounded to bf16.
  std::vector<std::uint16_t> dq(with_dg.dq.size()), dk(dq.size()), dv(with_dg.dv.size());
  linear_grads gr;
  gr.dq = make_bshd(dq.data(), dtype::bf16, c.batch, c.seq, c.heads, c.dim_k);
  gr.dk = make_bshd(dk.data(), dtype::bf16, c.batch, c.seq, c.heads, c.dim_k);
  gr.dv = make_bshd(dv.data(), dtype::bf16, c.batch, c.seq, c.heads, c.dim_v);
  const state_tensor init = make_state(const_cast<float*>(d.s0.data()), c.batch, c.heads, c.state_k(), c.dim_v);
  linear_options o;
  o.chunk = c.chunk;
  o.initial_state = &init;
  const tensor d_out = make_bshd(up.d_out.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  const status st = linear_attention_backward(d.qv(), d.kv(), d.vv(), d_out, d.spec(), gr, o);
  ASSERT_TRUE(st.ok()) << st.error;
  for (std::size_t i = 0; i < dq.size(); ++i) ASSERT_EQ(dq[i], f32_to_bf16(no_final.dq[i])) << i;
  for (std::size_t i = 0; i < dv.size(); ++i) ASSERT_EQ(dv[i], f32_to_bf16(no_final.dv[i])) << i;
}

TEST(LinearBackward, Validation) {
  linear_case c;
  c.seq = 8;
  const linear_data d(c, 1);
  const upstream up(c, 1);
  std::vector<float> dq(static_cast<std::size_t>(c.batch * c.seq * c.heads * c.dim_k), -7.0f), dk = dq,
      dv(static_cast<std::size_t>(c.batch * c.seq * c.heads * c.dim_v), -7.0f);
  linear_grads g;
  g.dq = make_bshd(dq.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_k);
  g.dk = make_bshd(dk.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_k);
  g.dv = make_bshd(dv.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  const tensor d_out = make_bshd(const_cast<float*>(up.d_out.data()), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  const auto msg = [&](const linear_grads& gr, const linear_spec& s, const linear_options& o, const tensor& dout) {
    return linear_attention_backward(d.qv(), d.kv(), d.vv(), dout, s, gr, o).error;
  };
  ASSERT_EQ(msg(g, {}, {}, d_out), "");
  std::fill(dq.begin(), dq.end(), -7.0f);
  std::fill(dk.begin(), dk.end(), -7.0f);
  std::fill(dv.begin(), dv.end(), -7.0f);
  linear_grads short_dk = g;
  short_dk.dk.dim = 4;
  EXPECT_EQ(msg(short_dk, {}, {}, d_out), "[linear_attention_backward] grads.dk.dim 4 != k.dim 5");
  tensor bad_dout = d_out;
  bad_dout.dim = 5;
  EXPECT_EQ(msg(g, {}, {}, bad_dout), "[linear_attention_backward] d_out.dim 5 != v.dim 8");
  linear_grads alias = g;
  alias.dv = make_bshd(const_cast<float*>(up.d_out.data()), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  EXPECT_EQ(msg(alias, {}, {}, d_out), "[linear_attention_backward] grads.dv aliases d_out: the output must not overlap an input");
  linear_grads same = g;
  same.dk = g.dq;
  EXPECT_EQ(msg(same, {}, {}, d_out), "[linear_attention_backward] grads.dk aliases grads.dq: the output must not overlap an input");
  {
    linear_spec bidir = d.spec();
    bidir.decay = linear_decay::scalar;
    bidir.causal = false;
    std::vector<float> st_buf(static_cast<std::size_t>(c.batch * c.heads * c.dim_k * c.dim_v));
    const state_tensor bst = make_state(st_buf.data(), c.batch, c.heads, c.dim_k, c.dim_v);
    linear_grads with_ds0 = g;
    with_ds0.d_initial_state = &bst;
    EXPECT_EQ(msg(with_ds0, bidir, {}, d_out),
              "[linear_attention_backward] grads.d_initial_state with the bidirectional form (causal = false with decay scalar): it has no states");
    linear_spec flow;
    flow.causal = false;
    flow.flow = true;
    flow.phi = feature_map::sigmoid;
    EXPECT_EQ(msg(with_ds0, flow, {}, d_out), "[linear_attention_backward] grads.d_initial_state with spec.flow: the flow form has no states");
    linear_grads with_dgb = g;
    with_dgb.dg_backward = bidir.g;
    EXPECT_EQ(msg(with_dgb, bidir, {}, d_out),
              "[linear_attention_backward] grads.dg_backward is set but spec.g_backward is not (without it dg holds both directions)");
  }
  std::vector<float> dw(6);
  linear_grads with_dw = g;
  with_dw.d_projection_weight = dw;
  EXPECT_EQ(msg(with_dw, {}, {}, d_out), "[linear_attention_backward] grads.d_projection_weight is set but spec.projection is none");
  {
    linear_case pc = c;
    pc.features = 2;
    const linear_data pd(pc, 1);
    EXPECT_EQ(linear_attention_backward(pd.qv(), pd.kv(), pd.vv(), d_out, pd.spec(), with_dw, {}).error,
              "[linear_attention_backward] grads.d_projection_weight has 6 values, expected 30 (like spec.projection.weight)");
    linear_grads over_w = g;  // a gradient written over the weights it reads
    over_w.d_projection_bias = std::span<float>(const_cast<float*>(pd.proj_b.data()), pd.proj_b.size());
    EXPECT_EQ(linear_attention_backward(pd.qv(), pd.kv(), pd.vv(), d_out, pd.spec(), over_w, {}).error,
              "[linear_attention_backward] grads.d_projection_bias aliases spec.projection.bias: the output must not overlap an input");
  }
  std::vector<float> dg(static_cast<std::size_t>(c.batch * c.seq * c.heads));
  linear_grads with_dg = g;
  with_dg.dg = make_bshd(dg.data(), dtype::f32, c.batch, c.seq, c.heads, 1);
  EXPECT_EQ(msg(with_dg, {}, {}, d_out),
            "[linear_attention_backward] grads.dg is set but spec.decay is none (dg is the gradient of spec.g: scalar or channel)");
  std::vector<float> heads(2);
  linear_grads with_head = g;
  with_head.d_head_log_decay = heads;
  linear_spec fixed = d.spec();
  fixed.decay = linear_decay::fixed;
  EXPECT_EQ(msg(with_head, fixed, {}, d_out), "[linear_attention_backward] grads.d_head_log_decay has 2 values, expected one per head (3)");
  std::vector<float> state(static_cast<std::size_t>(c.batch * c.heads * c.state_k() * c.dim_v));
  const state_tensor st = make_state(state.data(), c.batch, c.heads, c.state_k(), c.dim_v);
  linear_options writes_state;
  writes_state.final_state = &st;
  EXPECT_NE(msg(g, {}, writes_state, d_out).find("options.final_state must be null"), std::string::npos);
  state_tensor broadcast = st;
  broadcast.stride_batch = 0;
  linear_grads self = g;
  self.d_initial_state = &broadcast;
  EXPECT_EQ(msg(self, {}, {}, d_out),
            "[linear_attention_backward] grads.d_initial_state.stride_batch 0 makes the output overlap itself (needs |stride| >= 1)");
  linear_spec scalar = d.spec();
  scalar.decay = linear_decay::scalar;
  linear_grads wide_dg = g;
  std::vector<float> dg5(static_cast<std::size_t>(c.batch * c.seq * c.heads * 5));
  wide_dg.dg = make_bshd(dg5.data(), dtype::f32, c.batch, c.seq, c.heads, 5);
  EXPECT_EQ(msg(wide_dg, scalar, {}, d_out), "[linear_attention_backward] grads.dg.dim 5 != spec.g.dim 1");
  EXPECT_EQ(msg(with_head, scalar, {}, d_out),
            "[linear_attention_backward] grads.d_head_log_decay is set but spec.decay is scalar (it is the gradient of spec.head_log_decay)");
  std::vector<std::uint16_t> half(up.d_out.size());
  const tensor f16_out = make_bshd(half.data(), dtype::f16, c.batch, c.seq, c.heads, c.dim_v);
  EXPECT_EQ(msg(g, {}, {}, f16_out), "[linear_attention_backward] d_out.type f16 must be q.type f32 or f32");
  linear_options with_s0;
  with_s0.initial_state = &st;
  linear_grads onto_s0 = g;
  onto_s0.d_initial_state = &st;
  EXPECT_EQ(msg(onto_s0, {}, with_s0, d_out),
            "[linear_attention_backward] grads.d_initial_state aliases options.initial_state: the output must not overlap an input");
  EXPECT_EQ(std::count(dq.begin(), dq.end(), -7.0f) + std::count(dk.begin(), dk.end(), -7.0f) + std::count(dv.begin(), dv.end(), -7.0f),
            static_cast<std::ptrdiff_t>(dq.size() + dk.size() + dv.size()))
      << "a rejected call wrote a gradient";
  EXPECT_EQ(reference_linear_attention_backward(d.qv(), d.kv(), d.vv(), d_out, {}, short_dk, {}).error,
            "[reference_linear_attention_backward] grads.dk.dim 4 != k.dim 5");
  EXPECT_NE(reference_linear_attention_backward(d.qv(), d.kv(), d.vv(), d_out, {}, g, {}, linear_form::quadratic).error.find("runs the recurrence"),
            std::string::npos);
}

}  // namespace
}  // namespace omniattn

namespace omniattn {
namespace {

// Varlen (cu_seqlens): packed sequences of awkward lengths (empty, 1, chunk +- 1) give, forward and backward, exactly
// the results of one call per sequence on the same tokens (each sequence is a call of its own), kernel and oracle.
TEST(LinearVarlen, PackedSequencesEqualSeparateCalls) {
  const std::vector<std::int64_t> lens = {37, 0, 1, 65, 64, 5};
  std::vector<std::int64_t> cu = {0};
  for (std::int64_t l : lens) cu.push_back(cu.back() + l);
  const std::int64_t N = static_cast<std::int64_t>(lens.size());
  for (int form = 0; form < 4; ++form) {  // no decay, fixed, channel, and non-causal (each sequence its own prefix)
    const linear_decay decay = form == 1 ? linear_decay::fixed : form == 2 ? linear_decay::channel : linear_decay::none;
    linear_case c;
    c.batch = 1;
    c.seq = cu.back();
    c.chunk = 16;
    c.decay = decay;
    c.causal = form != 3;
    SCOPED_TRACE(c.str());
    linear_data d(c, 3);
    const std::int64_t H = c.heads, K = c.dim_k, V = c.dim_v, sz = H * K * V;
    std::vector<float> s0(static_cast<std::size_t>(N * sz));
    for (std::size_t i = 0; i < s0.size(); ++i) s0[i] = std::sin(0.37f * static_cast<float>(i));
    const auto part = [](const tensor& full, std::int64_t t0, std::int64_t n) {
      tensor x = full;
      x.data = static_cast<char*>(full.data) + t0 * full.stride_seq * dtype_size(full.type);
      x.seq = n;
      return x;
    };
    const linear_spec s = d.spec();
    const upstream up(c, 3);
    for (bool kernel : {true, false}) {
      // Forward: one packed call.
      std::vector<float> out(static_cast<std::size_t>(c.seq * H * V), -7.0f), fin(s0.size(), -7.0f);
      const state_tensor init = make_state(s0.data(), N, H, K, V), fst = make_state(fin.data(), N, H, K, V);
      linear_options o;
      o.chunk = c.chunk;
      o.initial_state = &init;
      o.final_state = &fst;
      o.cu_seqlens = cu;
      const tensor ot = make_bshd(out.data(), dtype::f32, 1, c.seq, H, V);
      const status st = kernel ? linear_attention(d.qv(), d.kv(), d.vv(), ot, s, o) : reference_linear_attention(d.qv(), d.kv(), d.vv(), ot, s, o);
      ASSERT_TRUE(st.ok()) << st.error;
      // Backward: one packed call.
      std::vector<float> dq(static_cast<std::size_t>(c.seq * H * K), -7.0f), dk = dq, dv(out.size(), -7.0f), dg(d.g.size(), -7.0f),
          dhead(static_cast<std::size_t>(H), -7.0f), ds0(s0.size(), -7.0f);
      linear_grads gr;
      gr.dq = make_bshd(dq.data(), dtype::f32, 1, c.seq, H, K);
      gr.dk = make_bshd(dk.data(), dtype::f32, 1, c.seq, H, K);
      gr.dv = make_bshd(dv.data(), dtype::f32, 1, c.seq, H, V);
      if (decay == linear_decay::channel) gr.dg = make_bshd(dg.data(), dtype::f32, 1, c.seq, H, K);
      if (decay == linear_decay::fixed) gr.d_head_log_decay = dhead;
      const state_tensor dst = make_state(ds0.data(), N, H, K, V);
      gr.d_initial_state = &dst;
      std::vector<float> dfin(s0.size());
      for (std::size_t i = 0; i < dfin.size(); ++i) dfin[i] = std::cos(0.11f * static_cast<float>(i));
      const state_tensor dft = make_state(dfin.data(), N, H, K, V);
      gr.d_final_state = &dft;
      linear_options bo = o;
      bo.final_state = nullptr;
      const tensor dout = make_bshd(const_cast<float*>(up.d_out.data()), dtype::f32, 1, c.seq, H, V);
      const status bst = kernel ? linear_attention_backward(d.qv(), d.kv(), d.vv(), dout, s, gr, bo)
                                : reference_linear_attention_backward(d.qv(), d.kv(), d.vv(), dout, s, gr, bo);
      ASSERT_TRUE(bst.ok()) << bst.error;
      // The same, sequence by sequence.
      double head_sum[8] = {};
      for (std::int64_t q = 0; q < N; ++q) {
        const std::int64_t t0 = cu[static_cast<std::size_t>(q)], n = lens[static_cast<std::size_t>(q)];
        std::vector<float> o1(static_cast<std::size_t>(n * H * V), -7.0f), f1(static_cast<std::size_t>(sz), -7.0f);
        const state_tensor i1 = make_state(s0.data() + q * sz, 1, H, K, V), fs1 = make_state(f1.data(), 1, H, K, V);
        linear_options so;
        so.chunk = c.chunk;
        so.initial_state = &i1;
        so.final_state = &fs1;
        linear_spec ss = s;
        ss.g = part(s.g, t0, n);
        const tensor q1 = part(d.qv(), t0, n), k1 = part(d.kv(), t0, n), v1 = part(d.vv(), t0, n);
        const tensor ot1 = make_bshd(o1.data(), dtype::f32, 1, n, H, V);
        ASSERT_TRUE((kernel ? linear_attention(q1, k1, v1, ot1, ss, so) : reference_linear_attention(q1, k1, v1, ot1, ss, so)).ok());
        EXPECT_TRUE(std::equal(o1.begin(), o1.end(), out.begin() + t0 * H * V)) << "sequence " << q;
        EXPECT_TRUE(std::equal(f1.begin(), f1.end(), fin.begin() + q * sz)) << "sequence " << q;
        std::vector<float> dq1(static_cast<std::size_t>(n * H * K)), dk1 = dq1, dv1(o1.size()), dg1(static_cast<std::size_t>(n * H * K)),
            dh1(static_cast<std::size_t>(H)), ds1(static_cast<std::size_t>(sz));
        linear_grads g1;
        g1.dq = make_bshd(dq1.data(), dtype::f32, 1, n, H, K);
        g1.dk = make_bshd(dk1.data(), dtype::f32, 1, n, H, K);
        g1.dv = make_bshd(dv1.data(), dtype::f32, 1, n, H, V);
        if (decay == linear_decay::channel) g1.dg = make_bshd(dg1.data(), dtype::f32, 1, n, H, K);
        if (decay == linear_decay::fixed) g1.d_head_log_decay = dh1;
        const state_tensor dsi = make_state(ds1.data(), 1, H, K, V), dfi = make_state(dfin.data() + q * sz, 1, H, K, V);
        g1.d_initial_state = &dsi;
        g1.d_final_state = &dfi;
        linear_options sbo = so;
        sbo.final_state = nullptr;
        const tensor do1 = part(dout, t0, n);
        ASSERT_TRUE((kernel ? linear_attention_backward(q1, k1, v1, do1, ss, g1, sbo)
                            : reference_linear_attention_backward(q1, k1, v1, do1, ss, g1, sbo)).ok());
        EXPECT_TRUE(std::equal(dq1.begin(), dq1.end(), dq.begin() + t0 * H * K)) << "dq, sequence " << q;
        EXPECT_TRUE(std::equal(dk1.begin(), dk1.end(), dk.begin() + t0 * H * K)) << "dk, sequence " << q;
        EXPECT_TRUE(std::equal(dv1.begin(), dv1.end(), dv.begin() + t0 * H * V)) << "dv, sequence " << q;
        EXPECT_TRUE(std::equal(ds1.begin(), ds1.end(), ds0.begin() + q * sz)) << "d_initial_state, sequence " << q;
        if (decay == linear_decay::channel) EXPECT_TRUE(std::equal(dg1.begin(), dg1.end(), dg.begin() + t0 * H * K)) << "dg, sequence " << q;
        for (std::int64_t h = 0; h < H; ++h) head_sum[h] += dh1[static_cast<std::size_t>(h)];
      }
      if (decay == linear_decay::fixed)
        for (std::int64_t h = 0; h < H; ++h)  // the per-sequence parts, summed in double then rounded, against one rounding
          EXPECT_NEAR(dhead[static_cast<std::size_t>(h)], head_sum[h], 1e-5 * std::max(1.0, std::fabs(head_sum[h])));
    }
  }
}

// Packed sequences of the bidirectional form (the reversed scan's offsets mirrored) and of a projected map equal one
// call per sequence: out, dq, dk, dv and dg bitwise (every row's result is its sequence's alone); the projection's
// gradients, sums over every sequence's tokens, to float rounding.
TEST(LinearVarlen, BidirectionalAndProjectedSequencesEqualSeparateCalls) {
  const std::vector<std::int64_t> lens = {23, 0, 1, 40, 9};
  std::vector<std::int64_t> cu = {0};
  for (std::int64_t l : lens) cu.push_back(cu.back() + l);
  const std::int64_t N = static_cast<std::int64_t>(lens.size());
  for (int form = 0; form < 4; ++form) {  // bidirectional with its own gates, projected (causal), both, the flow form
    linear_case c;
    c.batch = 1;
    c.seq = cu.back();
    c.chunk = 16;
    c.decay = form == 3 ? linear_decay::none : linear_decay::channel;
    c.causal = form == 1;
    c.backward_gates = form == 0;
    c.features = form == 0 || form == 3 ? 0 : 7;
    c.phi = form == 0 ? feature_map::identity : form == 3 ? feature_map::sigmoid : feature_map::softmax;
    c.normalize = form == 2;
    c.flow = form == 3;
    SCOPED_TRACE(c.str());
    const linear_data d(c, 5);
    const upstream up(c, 5);
    const std::int64_t H = c.heads, K = c.dim_k, V = c.dim_v, nb = d.gdim();
    const auto part = [](const tensor& full, std::int64_t t0, std::int64_t n) {
      tensor x = full;
      x.data = static_cast<char*>(full.data) + t0 * full.stride_seq * dtype_size(full.type);
      x.seq = n;
      return x;
    };
    struct run_result {
      std::vector<float> out, dq, dk, dv, dg, dgb, dw, db;
    };
    // One call over tokens [t0, t0 + n) (the whole packed tensor with cu_seqlens when packed).
    const auto call = [&](std::int64_t t0, std::int64_t n, bool packed) {
      run_result r;
      r.out.assign(static_cast<std::size_t>(n * H * V), -7.0f);
      r.dq.assign(static_cast<std::size_t>(n * H * K), -7.0f);
      r.dk = r.dq;
      r.dv = r.out;
      r.dg.assign(static_cast<std::size_t>(n * H * nb), -7.0f);
      r.dgb = r.dg;
      r.dw.assign(d.proj_w.size(), -7.0f);
      r.db.assign(d.proj_b.size(), -7.0f);
      linear_spec s = d.spec();
      s.g = part(s.g, t0, n);
      if (c.backward_gates) s.g_backward = part(s.g_backward, t0, n);
      linear_options o;
      o.chunk = c.chunk;
      if (packed) o.cu_seqlens = cu;
      const tensor q = part(d.qv(), t0, n), k = part(d.kv(), t0, n), v = part(d.vv(), t0, n);
      EXPECT_TRUE(linear_attention(q, k, v, make_bshd(r.out.data(), dtype::f32, 1, n, H, V), s, o).ok());
      linear_grads g;
      g.dq = make_bshd(r.dq.data(), dtype::f32, 1, n, H, K);
      g.dk = make_bshd(r.dk.data(), dtype::f32, 1, n, H, K);
      g.dv = make_bshd(r.dv.data(), dtype::f32, 1, n, H, V);
      if (c.decay != linear_decay::none) g.dg = make_bshd(r.dg.data(), dtype::f32, 1, n, H, nb);
      if (c.backward_gates) g.dg_backward = make_bshd(r.dgb.data(), dtype::f32, 1, n, H, nb);
      g.d_projection_weight = r.dw;
      g.d_projection_bias = r.db;
      const tensor dout = part(make_bshd(const_cast<float*>(up.d_out.data()), dtype::f32, 1, c.seq, H, V), t0, n);
      const status st = linear_attention_backward(q, k, v, dout, s, g, o);
      EXPECT_TRUE(st.ok()) << st.error;
      return r;
    };
    const run_result all = call(0, c.seq, true);
    std::vector<double> dw_sum(d.proj_w.size(), 0.0), db_sum(d.proj_b.size(), 0.0);
    for (std::int64_t q = 0; q < N; ++q) {
      const std::int64_t t0 = cu[static_cast<std::size_t>(q)], n = lens[static_cast<std::size_t>(q)];
      const run_result one = call(t0, n, false);
      const auto same = [&](const std::vector<float>& x, const std::vector<float>& packed, std::int64_t width, const char* what) {
        EXPECT_TRUE(std::equal(x.begin(), x.end(), packed.begin() + t0 * H * width)) << what << ", sequence " << q;
      };
      same(one.out, all.out, V, "out");
      same(one.dq, all.dq, K, "dq");
      same(one.dk, all.dk, K, "dk");
      same(one.dv, all.dv, V, "dv");
      same(one.dg, all.dg, nb, "dg");
      if (c.backward_gates) same(one.dgb, all.dgb, nb, "dg_backward");
      for (std::size_t i = 0; i < dw_sum.size() && n > 0; ++i) dw_sum[i] += one.dw[i];
      for (std::size_t i = 0; i < db_sum.size() && n > 0; ++i) db_sum[i] += one.db[i];
    }
    for (std::size_t i = 0; i < dw_sum.size(); ++i) EXPECT_NEAR(all.dw[i], dw_sum[i], 1e-5 * std::max(1.0, std::fabs(dw_sum[i]))) << "dW " << i;
    for (std::size_t i = 0; i < db_sum.size(); ++i) EXPECT_NEAR(all.db[i], db_sum[i], 1e-5 * std::max(1.0, std::fabs(db_sum[i]))) << "db " << i;
  }
}

TEST(LinearVarlen, Validation) {
  linear_case c;
  c.batch = 1;
  c.seq = 10;
  const linear_data d(c, 1);
  std::vector<float> out(static_cast<std::size_t>(c.seq * c.heads * c.dim_v), -7.0f);
  const tensor o = make_bshd(out.data(), dtype::f32, 1, c.seq, c.heads, c.dim_v);
  const auto msg = [&](std::vector<std::int64_t> cu, const linear_spec& s, const state_tensor* init) {
    linear_options opt;
    opt.cu_seqlens = cu;
    opt.initial_state = init;
    return linear_attention(d.qv(), d.kv(), d.vv(), o, s, opt).error;
  };
  EXPECT_EQ(msg({1, 10}, {}, nullptr), "[linear_attention] options.cu_seqlens[0] 1 must be 0");
  EXPECT_EQ(msg({0, 6, 4, 10}, {}, nullptr), "[linear_attention] options.cu_seqlens[2] 4 < options.cu_seqlens[1] 6: offsets must not decrease");
  EXPECT_EQ(msg({0, 4, 9}, {}, nullptr), "[linear_attention] options.cu_seqlens ends at 9, expected q.seq 10 (the packed tokens)");
  linear_spec prefix;
  prefix.prefix = 2;
  EXPECT_EQ(msg({0, 4, 10}, prefix, nullptr), "[linear_attention] spec.prefix with options.cu_seqlens is not supported yet");
  std::vector<float> s0(static_cast<std::size_t>(c.heads * c.state_k() * c.dim_v));
  const state_tensor one = make_state(s0.data(), 1, c.heads, c.state_k(), c.dim_v);
  EXPECT_EQ(msg({0, 4, 10}, {}, &one), "[linear_attention] options.initial_state is [1, 3, 5, 8], expected [2, 3, 5, 8]");
  linear_case two = c;
  two.batch = 2;
  const linear_data d2(two, 1);
  linear_options opt;
  const std::vector<std::int64_t> cu = {0, 10};
  opt.cu_seqlens = cu;
  std::vector<float> out2(out.size() * 2);
  EXPECT_EQ(linear_attention(d2.qv(), d2.kv(), d2.vv(), make_bshd(out2.data(), dtype::f32, 2, c.seq, c.heads, c.dim_v), {}, opt).error,
            "[linear_attention] options.cu_seqlens with q.batch 2: packed sequences are [1, total tokens, heads, dim]");
  EXPECT_EQ(std::count(out.begin(), out.end(), -7.0f), static_cast<std::ptrdiff_t>(out.size()));
}

}  // namespace
}  // namespace omniattn
