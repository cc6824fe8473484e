// attention_backward: the fp64 oracle against finite differences of the forward oracle, the CPU kernel against the
// oracle under the tolerance policy (tests/tolerance.h), determinism, fully masked rows and the call's validation.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/problem.h"
#include "core/storage.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn::test {
namespace {

// A spec with the buffers it points at.
struct spec_case {
  std::string name;
  problem prob;
  std::function<void(spec&, problem&)> make;  // fills the spec (and may adjust the problem)
};

struct owned_spec {
  spec s;
  std::vector<float> sinks, bias;
  rope_spec rope;
  block_mask blocks;
};

// sum(out * d_out) through the fp64 oracle forward (f32 out): the loss whose gradient attention_backward returns.
double loss(problem_data& fwd, const backward_data& bwd, const spec& s) {
  EXPECT_TRUE(run_problem(fwd, s, backend::reference, 1).ok());
  const tensor o = fwd.out_view(), g = bwd.d_out_view();
  double sum = 0.0;
  for (std::int64_t b = 0; b < o.batch; ++b)
    for (std::int64_t i = 0; i < o.seq; ++i)
      for (std::int64_t h = 0; h < o.heads; ++h)
        for (std::int64_t d = 0; d < o.dim; ++d)
          sum += fwd.out_at(b, i, h, d) *
                 detail::load_element(g.data, g.type, b * g.stride_batch + i * g.stride_seq + h * g.stride_head + d * g.stride_dim);
  return sum;
}

// Central differences of the loss over every element of a float buffer, against the analytic gradient `grad`.
void expect_fd(const std::string& what, float* x, std::size_t n, const std::function<double()>& f,
               const std::function<double(std::size_t)>& grad) {
  constexpr float eps = 1.0f / 64;
  double worst = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const float keep = x[i];
    x[i] = keep + eps;
    const double up = f();
    x[i] = keep - eps;
    const double down = f();
    x[i] = keep;
    const double fd = (up - down) / (2.0 * eps), g = grad(i);
    worst = std::max(worst, std::fabs(fd - g));
    EXPECT_NEAR(g, fd, 2e-3 + 2e-3 * std::fabs(fd)) << what << "[" << i << "]";
  }
  EXPECT_LT(worst, 1e-2) << what;
}

std::vector<spec_case> oracle_cases() {
  problem base;
  base.batch = 2;
  base.seq_q = 5;
  base.seq_k = 6;
  base.heads_q = 2;
  base.heads_kv = 1;
  base.dim_qk = 4;
  base.dim_v = 3;
  base.out_f32 = true;
  base.input_range = 1.5;
  std::vector<spec_case> cs;
  cs.push_back({"dense", base, [](spec&, problem&) {}});
  cs.push_back({"causal_top_left", base, [](spec& s, problem&) { s.causal = causal_mode::top_left; }});
  cs.push_back({"causal_bottom_right_masked_rows", base, [](spec& s, problem& p) {
                  s.causal = causal_mode::bottom_right;
                  p.seq_q = 6;
                  p.seq_k = 4;
                }});
  cs.push_back({"window", base, [](spec& s, problem&) { s.mask = mask_expr::window(2, 1, causal_mode::top_left); }});
  cs.push_back({"gqa_4_2", base, [](spec&, problem& p) {
                  p.heads_q = 4;
                  p.heads_kv = 2;
                }});
  cs.push_back({"softcap_alibi", base, [](spec& s, problem&) {
                  s.score = scores::then(scores::softcap(1.5), scores::alibi({0.5, 0.25}));
                }});
  cs.push_back({"temperature_logn", base, [](spec& s, problem&) {
                  s.score = scores::then(scores::temperature({0.7, 1.3}), scores::logn(2.0));
                }});
  cs.push_back({"key_bias_relative", base, [](spec& s, problem&) {
                  s.score = scores::then(scores::key_bias({0.3, -0.2, 0.1}),
                                         scores::relative_bias({0.1, -0.3, 0.2, 0.4, -0.1, 0.0, 0.3, 0.2}, 4, 8, false));
                }});
  cs.push_back({"user_differentiable", base, [](spec& s, problem&) {
                  s.score = scores::differentiable(
                      [](double x, std::int64_t, std::int64_t h, std::int64_t, std::int64_t) { return x + 0.2 * x * x + 0.1 * static_cast<double>(h); },
                      [](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return 1.0 + 0.4 * x; });
                }});
  cs.push_back({"user_inlined", base, [](spec& s, problem&) {
                  s.score = scores::inlined([](auto x, auto, auto, auto q, auto) { return x * 0.5 + std::sin(x) + 0.01 * q; },
                                            [](auto x, auto, auto, auto, auto) { return 0.5 + std::cos(x); });
                }});
  cs.push_back({"varlen", base, [](spec& s, problem& p) {
                  p.seqlens_q = {3, 0, 4};
                  p.seqlens_k = {5, 2, 0};
                  p.batch = 3;
                  s.causal = causal_mode::bottom_right;
                }});
  return cs;
}

TEST(BackwardOracle, MatchesFiniteDifferences) {
  for (spec_case& c : oracle_cases()) {
    SCOPED_TRACE(c.name);
    owned_spec os;
    c.make(os.s, c.prob);
    problem_data fwd(c.prob);
    backward_data bwd(c.prob, 11);
    ASSERT_TRUE(run_backward_problem(fwd, bwd, os.s, backend::reference, 1).ok());
    const auto f = [&] { return loss(fwd, bwd, os.s); };
    const tensor q = fwd.q_view(), k = fwd.k_view(), v = fwd.v_view();
    // Gradients are stored in the same contiguous layout as the inputs.
    const auto flat = [&](int which) {
      return [&, which](std::size_t i) {
        const std::vector<std::uint8_t>& g = which == 0 ? bwd.dq : which == 1 ? bwd.dk : bwd.dv;
        return static_cast<double>(reinterpret_cast<const float*>(g.data())[i]);
      };
    };
    const auto count = [](const tensor& t) { return static_cast<std::size_t>(t.batch * t.seq * t.heads * t.dim); };
    expect_fd("dq", reinterpret_cast<float*>(fwd.q.data()), count(q), f, flat(0));
    expect_fd("dk", reinterpret_cast<float*>(fwd.k.data()), count(k), f, flat(1));
    expect_fd("dv", reinterpret_cast<float*>(fwd.v.data()), count(v), f, flat(2));
  }
}

TEST(BackwardOracle, SinkAndBiasGradientsMatchFiniteDifferences) {
  problem p = small_problem(5, 6, 2, 2, 4, dtype::f32, causal_mode::bottom_right, 3);
  p.dim_v = 3;
  p.out_f32 = true;
  p.input_range = 1.5;
  p.seq_q = 6;  // bottom-right with seq_q > seq_k: the first rows see nothing but the sink
  p.seq_k = 4;
  std::vector<float> sinks = {0.3f, -0.6f};
  // A [1, H, Lq, Lk] bias broadcast over the batch, then a softcap: the bias gradient goes through its derivative.
  std::vector<float> bias(static_cast<std::size_t>(2 * p.seq_q * p.seq_k));
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (float& x : bias) x = u(rng);
  spec s;
  s.causal = causal_mode::bottom_right;
  s.sink_logits = sinks.data();
  s.score = scores::then(scores::bias(bias.data(), {1, 2, p.seq_q, p.seq_k}), scores::softcap(2.0));
  problem_data fwd(p);
  backward_data bwd(p, 13);
  std::vector<float> d_bias(bias.size(), -1.0f);
  gradients g = bwd.grads(true);
  g.d_bias = d_bias.data();
  const options o = fwd.make_options(backend::reference, 1);
  const status st =
      attention_backward(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(), bwd.d_out_view(), g, s, o);
  ASSERT_TRUE(st.ok()) << st.error;
  const auto f = [&] { return loss(fwd, bwd, s); };
  expect_fd("d_sink", sinks.data(), sinks.size(), f, [&](std::size_t i) { return static_cast<double>(bwd.d_sink[i]); });
  expect_fd("d_bias", bias.data(), bias.size(), f, [&](std::size_t i) { return static_cast<double>(d_bias[i]); });
  // The rows with nothing but the sink still push its gradient (out = 0 there, but the sink takes all the mass).
  EXPECT_NE(bwd.d_sink[0], 0.0f);
}

TEST(BackwardOracle, RopeGradientsAreForTheUnrotatedInputs) {
  problem p = small_problem(5, 7, 2, 1, 6, dtype::f32, causal_mode::none, 9);
  p.out_f32 = true;
  rope_spec r;
  r.rotary_dim = 4;
  spec s;
  s.rope = &r;
  problem_data fwd(p);
  backward_data bwd(p, 2);
  ASSERT_TRUE(run_backward_problem(fwd, bwd, s, backend::reference, 1).ok());
  const auto f = [&] { return loss(fwd, bwd, s); };
  expect_fd("dq", reinterpret_cast<float*>(fwd.q.data()), fwd.q.size() / 4, f,
            [&](std::size_t i) { return static_cast<double>(reinterpret_cast<const float*>(bwd.dq.data())[i]); });
  expect_fd("dk", reinterpret_cast<float*>(fwd.k.data()), fwd.k.size() / 4, f,
            [&](std::size_t i) { return static_cast<double>(reinterpret_cast<const float*>(bwd.dk.data())[i]); });
}

// The kernel sweep: seeded random problems over awkward sizes, masks, scores, dtypes, GQA, varlen.
struct kernel_case {
  problem prob;
  int feature;  // which spec feature (see make_feature)
};

constexpr int k_features = 13;

void make_feature(int f, const problem& p, owned_spec& os) {
  spec& s = os.s;
  switch (f) {
    case 0: break;
    case 1: s.causal = causal_mode::top_left; break;
    case 2: s.causal = causal_mode::bottom_right; break;
    case 3: s.mask = mask_expr::window(17, 0, causal_mode::bottom_right) | mask_expr::sinks(3); break;
    case 4: s.mask = mask_expr::document({0, p.seq_q / 3, p.seq_q}) & mask_expr::causal(causal_mode::top_left); break;
    case 5: s.score = scores::then(scores::softcap(4.0), scores::alibi(scores::alibi_slopes(p.heads_q))); break;
    case 6:
      os.sinks.assign(static_cast<std::size_t>(p.heads_q), 0.5f);
      for (std::size_t h = 0; h < os.sinks.size(); ++h) os.sinks[h] = 0.4f * static_cast<float>(h) - 0.5f;
      s.sink_logits = os.sinks.data();
      s.causal = causal_mode::bottom_right;
      break;
    case 7:
      os.rope.rotary_dim = p.dim_qk % 2 == 0 ? p.dim_qk : p.dim_qk - 1;
      s.rope = &os.rope;
      s.causal = causal_mode::top_left;
      break;
    case 8: s.score = scores::then(scores::temperature({0.8, 1.25}), scores::logn(16.0)); break;
    case 9:
      s.score = scores::inlined([](auto x, auto, auto, auto, auto) { return 3 * std::tanh(x / 3) + x * 0.125; },
                                [](auto x, auto, auto, auto, auto) { return 1.125 - std::tanh(x / 3) * std::tanh(x / 3); });
      break;
    case 10: s.mask = mask_expr::block_causal(32) | mask_expr::global_tokens(2); break;
    case 11:
      s.mask = mask_expr::predicate([](std::int64_t, std::int64_t h, std::int64_t i, std::int64_t j) { return (i + j + h) % 3 != 0; });
      break;
    case 12: {
      // A user block mask with tiles unlike the kernel's (32 x 48), seeded kinds, PARTIAL tiles refined by a window.
      block_mask& bm = os.blocks;
      bm.q_tile = 32;
      bm.kv_tile = 48;
      bm.batch = 1;
      bm.heads = p.heads_q;
      bm.q_tiles = (std::max<std::int64_t>(p.seq_q, 1) + 31) / 32;
      bm.kv_tiles = (std::max<std::int64_t>(p.seq_k, 1) + 47) / 48;
      std::mt19937_64 rng(static_cast<std::uint64_t>(p.seed));
      for (std::int64_t n = 0; n < bm.heads * bm.q_tiles * bm.kv_tiles; ++n) bm.kinds.push_back(static_cast<tile_kind>(rng() % 3));
      s.blocks = &bm;
      s.mask = mask_expr::window(20, 20, causal_mode::top_left);
      break;
    }
    default: break;
  }
}

std::vector<kernel_case> kernel_cases(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::vector<std::int64_t> lens = {1, 7, 63, 64, 65, 130};
  const std::vector<std::int64_t> dims = {8, 13, 32, 64, 72, 160};
  const std::vector<std::pair<std::int64_t, std::int64_t>> heads = {{2, 2}, {4, 2}, {3, 1}};
  const std::vector<dtype> types = {dtype::f32, dtype::bf16, dtype::f16};
  std::vector<int> features(k_features);
  for (int f = 0; f < k_features; ++f) features[static_cast<std::size_t>(f)] = f;
  const auto lq = covering_sequence(lens, n, rng), lk = covering_sequence(lens, n, rng), d = covering_sequence(dims, n, rng);
  const auto hs = covering_sequence(heads, n, rng);
  const auto ts = covering_sequence(types, n, rng);
  const auto fs = covering_sequence(features, n, rng);
  std::vector<kernel_case> out;
  for (std::size_t i = 0; i < n; ++i) {
    problem p = small_problem(lq[i], lk[i], hs[i].first, hs[i].second, d[i], ts[i], causal_mode::none, 100 + i);
    p.dim_v = i % 3 == 0 ? d[(i + 1) % n] : d[i];
    p.batch = i % 4 == 1 ? 2 : 1;
    p.out_f32 = i % 2 == 0;  // f32 out and gradients, or the input dtype
    if (i % 5 == 3) {  // varlen with an empty sequence
      p.seqlens_q = {lq[i], 0, 9};
      p.seqlens_k = {lk[i], 5, 0};
      p.batch = 3;
    }
    out.push_back({p, fs[i]});
  }
  return out;
}

TEST(Backward, KernelMatchesOracleSweep) {
  const std::vector<kernel_case> cases = kernel_cases(full_intensity() ? 96 : 36, 2026);
  int block_mask_cases = 0;
  for (const kernel_case& c : cases) {
    owned_spec os;
    make_feature(c.feature, c.prob, os);
    if (c.prob.is_varlen() && c.feature == 4) os.s.mask = mask_expr{};  // document offsets are per fixed-length call
    if (c.prob.is_varlen() && c.feature == 12) continue;  // the block mask above is sized for a fixed-length call
    block_mask_cases += c.feature == 12;
    EXPECT_TRUE(check_backward(c.prob, os.s, backend::cpu, 2)) << "feature " << c.feature;
  }
  EXPECT_GT(block_mask_cases, 0);
}

TEST(Backward, KernelMatchesOracleOnEveryTarget) {
  for_each_target("Backward.KernelMatchesOracleOnEveryTarget", [](const char* target) {
    SCOPED_TRACE(target);
    for (int f : {0, 2, 5, 6, 7}) {
      problem p = small_problem(70, 129, 4, 2, 40, f % 2 ? dtype::bf16 : dtype::f32, causal_mode::none, 40 + f);
      p.dim_v = 24;
      p.out_f32 = true;
      owned_spec os;
      make_feature(f, p, os);
      EXPECT_TRUE(check_backward(p, os.s, backend::cpu, 2)) << "feature " << f;
    }
  });
}

TEST(Backward, NeighborhoodAndHaloGrids) {
  // The forward runs these on query boxes (the grid path); the backward on raster tiles with the patterns' closed-form
  // tile classes and row bits: both against the oracle.
  const std::vector<std::pair<std::string, mask_expr>> masks = {
      {"neighborhood 2-D 12x10 kernel 5x3", mask_expr::neighborhood({12, 10}, {5, 3})},
      {"neighborhood 2-D dilated, causal rows", mask_expr::neighborhood({12, 10}, {3, 3}, {2, 1}, {true, false})},
      {"neighborhood 3-D 4x5x6 kernel 3", mask_expr::neighborhood({4, 5, 6}, {3, 3, 3})},
      {"halo 2-D blocks 4x5 halo 2x1", mask_expr::halo({12, 10}, {4, 5}, {2, 1})},
  };
  for (const auto& [name, m] : masks) {
    SCOPED_TRACE(name);
    problem p = small_problem(120, 120, 4, 2, 32, dtype::f32, causal_mode::none, 77);
    p.out_f32 = true;
    owned_spec os;
    os.s.mask = m;
    EXPECT_TRUE(check_backward(p, os.s, backend::cpu, 2));
  }
}

// The dense bias gradient on the kernel, for the shapes it serves (full, broadcast over the batch (Swin's [1, H, N, N]),
// over q, over keys, over the heads of a single kv head), against the oracle under the gradient rule of
// tests/tolerance.h.
TEST(Backward, BiasGradientOnTheKernel) {
  struct bias_case {
    std::int64_t batch, hq, hkv;
    std::array<std::int64_t, 4> shape;  // -1: the call's size
    bool softcap_after;
  };
  const std::vector<bias_case> cases = {
      {2, 4, 2, {-1, -1, -1, -1}, false}, {2, 4, 2, {-1, -1, -1, -1}, true}, {1, 4, 2, {1, -1, -1, -1}, true},
      {3, 4, 2, {1, -1, -1, -1}, true},   {3, 4, 2, {1, -1, 1, -1}, false},
      {2, 3, 1, {-1, 1, -1, -1}, false},  {2, 4, 2, {-1, -1, 1, -1}, true},  {2, 4, 2, {-1, -1, -1, 1}, false}};
  for (const bias_case& c : cases) {
    problem p = small_problem(70, 131, c.hq, c.hkv, 24, dtype::f32, causal_mode::none, 300);
    p.batch = c.batch;
    p.out_f32 = true;
    const std::array<std::int64_t, 4> full = {p.batch, p.heads_q, p.seq_q, p.seq_k};
    std::array<std::int64_t, 4> shape{};
    for (int d = 0; d < 4; ++d) shape[static_cast<std::size_t>(d)] = c.shape[static_cast<std::size_t>(d)] < 0 ? full[static_cast<std::size_t>(d)] : 1;
    const std::size_t n = static_cast<std::size_t>(shape[0] * shape[1] * shape[2] * shape[3]);
    SCOPED_TRACE(testing::Message() << "bias [" << shape[0] << "," << shape[1] << "," << shape[2] << "," << shape[3] << "] softcap after "
                                    << c.softcap_after);
    std::vector<float> bias(n);
    std::mt19937_64 rng(n);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    for (float& x : bias) x = u(rng);
    spec s;
    s.causal = causal_mode::bottom_right;
    s.score = scores::bias(bias.data(), shape);
    if (c.softcap_after) s.score = scores::then(s.score, scores::softcap(3.0));
    std::vector<float> got(n, 9.0f), want(n), naive(n);
    const auto run = [&](backend b, std::vector<float>& out, bool use_naive) {
      problem_data fwd(p);
      backward_data bwd(p, 21);
      EXPECT_TRUE(run_problem(fwd, s, backend::cpu, 2).ok());
      gradients g = bwd.grads(false);
      g.d_bias = out.data();
      const options o = fwd.make_options(b, 2);
      if (use_naive) {
        attn_bwd_params bp;
        ASSERT_TRUE(make_backward_params(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(),
                                         bwd.d_out_view(), g, s, o, bp).ok());
        naive_attention_backward_f32(bp);
        return;
      }
      const status st = attention_backward(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(),
                                           bwd.d_out_view(), g, s, o);
      ASSERT_TRUE(st.ok()) << st.error;
    };
    run(backend::cpu, got, false);
    run(backend::reference, want, false);
    run(backend::reference, naive, true);
    double err = 0, naive_err = 0, mag = 0;
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_TRUE(std::isfinite(got[i])) << i;
      err = std::max(err, std::fabs(static_cast<double>(got[i]) - want[i]));
      naive_err = std::max(naive_err, std::fabs(static_cast<double>(naive[i]) - want[i]));
      mag = std::max(mag, std::fabs(static_cast<double>(want[i])));
    }
    EXPECT_GT(mag, 0.0);
    EXPECT_LE(err, 2 * naive_err + k_grad_floor_eps * dtype_eps(dtype::f32) * mag) << "naive " << naive_err << " |ref| " << mag;
  }
  // A bias broadcast over the heads of several kv heads has several writers per entry: the kernel declines.
  problem p = small_problem(16, 16, 2, 2, 8, dtype::f32, causal_mode::none, 1);
  p.batch = 2;
  p.out_f32 = true;
  std::vector<float> bias(static_cast<std::size_t>(2 * 16 * 16)), d_bias(bias.size());
  spec s;
  s.score = scores::bias(bias.data(), {2, 1, 16, 16});
  problem_data fwd(p);
  backward_data bwd(p, 1);
  ASSERT_TRUE(run_problem(fwd, s, backend::cpu, 1).ok());
  gradients g = bwd.grads(false);
  g.d_bias = d_bias.data();
  const status st = attention_backward(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(),
                                       bwd.d_out_view(), g, s, fwd.make_options(backend::cpu, 1));
  EXPECT_NE(st.error.find("broadcast over the heads of several kv heads is computed by the reference backend only"),
            std::string::npos)
      << st.error;
}

TEST(Backward, BitwiseIdenticalForAnyThreadCount) {
  problem p = small_problem(200, 333, 4, 1, 64, dtype::f32, causal_mode::none, 17);
  owned_spec os;
  make_feature(3, p, os);
  problem_data fwd(p);
  ASSERT_TRUE(run_problem(fwd, os.s, backend::cpu, 1).ok());
  std::vector<std::vector<std::uint8_t>> results;
  for (int threads : {1, 2, 3, 8}) {
    backward_data bwd(p, 3);
    const status st = run_backward_problem(fwd, bwd, os.s, backend::cpu, threads);
    ASSERT_TRUE(st.ok()) << st.error;
    std::vector<std::uint8_t> all = bwd.dq;
    all.insert(all.end(), bwd.dk.begin(), bwd.dk.end());
    all.insert(all.end(), bwd.dv.begin(), bwd.dv.end());
    results.push_back(all);
  }
  for (std::size_t i = 1; i < results.size(); ++i) EXPECT_TRUE(bytes_equal(results[0], results[i])) << "thread count #" << i;
}

TEST(Backward, FullyMaskedRowsGiveZeroGradients) {
  // Bottom-right causal with seq_q > seq_k: the first seq_q - seq_k rows see no key.
  for (backend b : {backend::reference, backend::cpu}) {
    problem p = small_problem(90, 20, 2, 2, 16, dtype::f32, causal_mode::bottom_right, 4);
    spec s;
    s.causal = causal_mode::bottom_right;
    problem_data fwd(p);
    ASSERT_TRUE(run_problem(fwd, s, b, 2).ok());
    backward_data bwd(p, 5);
    std::fill(bwd.dq.begin(), bwd.dq.end(), std::uint8_t{0x7f});
    ASSERT_TRUE(run_backward_problem(fwd, bwd, s, b, 2).ok());
    for (std::int64_t i = 0; i < p.seq_q; ++i)
      for (std::int64_t h = 0; h < p.heads_q; ++h)
        for (std::int64_t d = 0; d < p.dim_qk; ++d) {
          const double g = bwd.grad_at(0, 0, i, h, d);
          ASSERT_TRUE(std::isfinite(g)) << backend_name(b) << " dq[" << i << "," << h << "," << d << "]";
          if (i < p.seq_q - p.seq_k) ASSERT_EQ(g, 0.0) << backend_name(b) << " row " << i;
        }
  }
}

TEST(Backward, ZeroLengthCalls) {
  // Lk = 0: every row sees nothing, dq = 0; Lq = 0: no query reaches a key, dk = dv = 0. Both backends write every
  // gradient element (the buffers start poisoned).
  for (backend b : {backend::reference, backend::cpu})
    for (const auto& [lq, lk] : std::vector<std::pair<std::int64_t, std::int64_t>>{{0, 9}, {9, 0}, {0, 0}}) {
      problem p = small_problem(lq, lk, 2, 1, 8, dtype::f32, causal_mode::none, 1);
      problem_data fwd(p);
      ASSERT_TRUE(run_problem(fwd, {}, b, 2).ok());
      backward_data bwd(p, 1);
      for (auto* g : {&bwd.dq, &bwd.dk, &bwd.dv}) std::fill(g->begin(), g->end(), std::uint8_t{0x7f});
      const status st = run_backward_problem(fwd, bwd, {}, b, 2);
      ASSERT_TRUE(st.ok()) << st.error;
      for (int w = 0; w < 3; ++w) {
        const tensor t = w == 0 ? bwd.dq_view() : w == 1 ? bwd.dk_view() : bwd.dv_view();
        for (std::int64_t i = 0; i < t.seq; ++i)
          for (std::int64_t h = 0; h < t.heads; ++h)
            for (std::int64_t d = 0; d < t.dim; ++d)
              ASSERT_EQ(bwd.grad_at(w, 0, i, h, d), 0.0) << backend_name(b) << " lq " << lq << " lk " << lk << " grad " << w;
      }
    }
}

TEST(Backward, ValidationNamesTheArgument) {
  problem p = small_problem(8, 8, 2, 1, 16, dtype::f32, causal_mode::none, 1);
  problem_data fwd(p);
  backward_data bwd(p, 1);
  ASSERT_TRUE(run_problem(fwd, {}, backend::cpu, 1).ok());
  const options o = fwd.make_options(backend::automatic, 1);
  const auto call = [&](const gradients& g, const spec& s, const tensor& d_out) {
    return attention_backward(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(), d_out, g, s, o).error;
  };
  const auto expect_error = [&](const std::string& got, const std::string& want) {
    EXPECT_NE(got.find(want), std::string::npos) << "got: " << got;
    EXPECT_EQ(got.rfind("[attention_backward] ", 0), 0u) << got;
  };
  {
    gradients g = bwd.grads(false);
    g.dk.seq = 7;
    expect_error(call(g, {}, bwd.d_out_view()), "dk.seq 7 != k.seq 8");
  }
  {
    gradients g = bwd.grads(false);
    g.dq = fwd.q_view();  // writing over an input
    expect_error(call(g, {}, bwd.d_out_view()), "dq aliases q");
  }
  {
    gradients g = bwd.grads(false);
    g.dv = g.dk;
    g.dv.dim = p.dim_v;
    expect_error(call(g, {}, bwd.d_out_view()), "dv aliases dk");
  }
  {
    tensor d_out = bwd.d_out_view();
    d_out.heads = 1;
    expect_error(call(bwd.grads(false), {}, d_out), "d_out.heads 1 != out.heads 2");
  }
  {
    gradients g = bwd.grads(true);
    expect_error(call(g, {}, bwd.d_out_view()), "gradients.d_sink_logits is set but spec.sink_logits is not");
  }
  {
    gradients g = bwd.grads(false);
    std::vector<float> db(4);
    g.d_bias = db.data();
    expect_error(call(g, {}, bwd.d_out_view()), "spec.score has no bias tensor");
  }
  {
    spec s;
    s.score = [](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return x * 2; };
    const std::vector<std::uint8_t> before = bwd.dq;
    expect_error(call(bwd.grads(false), s, bwd.d_out_view()), "spec.score step 1 of 1 (a user score functor) has no derivative");
    EXPECT_TRUE(bytes_equal(before, bwd.dq));
  }
  {
    lse_tensor l = fwd.lse_view();
    l.data = nullptr;
    const std::string e = attention_backward(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), l, bwd.d_out_view(),
                                             bwd.grads(false), {}, o).error;
    expect_error(e, "lse.data is null");
  }
}

TEST(Backward, ThrowingUserDerivativeLeavesGradientsUntouched) {
  problem p = small_problem(70, 70, 2, 2, 16, dtype::f32, causal_mode::none, 2);
  spec s;
  s.score = scores::differentiable([](double x, std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return x; },
                                   [](double, std::int64_t, std::int64_t, std::int64_t q, std::int64_t) -> double {
                                     if (q == 65) throw std::runtime_error("derivative failed");
                                     return 1.0;
                                   });
  problem_data fwd(p);
  ASSERT_TRUE(run_problem(fwd, s, backend::cpu, 2).ok());
  for (backend b : {backend::reference, backend::cpu}) {
    backward_data bwd(p, 1);
    std::fill(bwd.dq.begin(), bwd.dq.end(), std::uint8_t{0x11});
    const std::vector<std::uint8_t> before = bwd.dq;
    const status st = run_backward_problem(fwd, bwd, s, b, 2);
    EXPECT_NE(st.error.find("derivative failed"), std::string::npos) << st.error;
    EXPECT_TRUE(bytes_equal(before, bwd.dq)) << backend_name(b);
  }
}

}  // namespace
}  // namespace omniattn::test

namespace omniattn::test {
namespace {

TEST(BackwardSelect, WalksTheKernelListWithReasons) {
  problem p = small_problem(16, 16, 2, 2, 8, dtype::f32, causal_mode::none, 1);
  p.out_f32 = true;
  problem_data fwd(p);
  backward_data bwd(p, 1);
  ASSERT_TRUE(run_problem(fwd, {}, backend::cpu, 1).ok());
  const auto params = [&](const spec& s, float* d_bias) {
    gradients g = bwd.grads(false);
    g.d_bias = d_bias;
    attn_bwd_params bp;
    const status st = make_backward_params(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(),
                                           bwd.d_out_view(), g, s, fwd.make_options(backend::automatic, 1), bp);
    EXPECT_TRUE(st.ok()) << st.error;
    return bp;
  };
  const backward_selection fast = select_backward(params({}, nullptr), backend::automatic);
  EXPECT_EQ(fast.name, "cpu.flash_bwd<f32>");
  ASSERT_FALSE(fast.reasons.empty());
  EXPECT_NE(fast.reasons[0].find("ISA "), std::string::npos) << fast.reasons[0];
  // A dense bias gradient: the kernel says why not, automatic falls back to the oracle, cpu refuses.
  std::vector<float> bias(static_cast<std::size_t>(16 * 16)), d_bias(bias.size());
  spec s;
  s.score = scores::bias(bias.data(), {1, 1, 16, 16});
  const attn_bwd_params with_bias = params(s, d_bias.data());
  const backward_selection fallback = select_backward(with_bias, backend::automatic);
  EXPECT_EQ(fallback.name, "reference");
  EXPECT_NE(fallback.reasons[0].find("cpu.flash_bwd<f32>: not used: gradients.d_bias"), std::string::npos) << fallback.reasons[0];
  EXPECT_FALSE(select_backward(with_bias, backend::cpu).ok());
}

}  // namespace
}  // namespace omniattn::test
