// Linear attention (include/omniattn/linear.h): the chunked kernel against the fp64 oracle on seeded random sweeps
// (awkward sizes: 1, primes, chunk +- 1, K not a multiple of a vector; every feature map, decay kind, normalisation,
// initial / final state, f32 and bf16 inputs), the oracle's quadratic form against its recurrence, prefill then
// continuation against one call, thread independence, strong decays, and the validation messages.
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

struct linear_result {
  std::vector<float> out, state;
  status st;
};

enum class runner { kernel, quadratic, recurrent, recurrent_f32 };

linear_result run(const linear_data& d, runner r, int threads = 1, const float* s0 = nullptr) {
  const linear_case& c = d.c;
  linear_result res;
  res.out.assign(static_cast<std::size_t>(c.batch * c.seq * c.heads * c.dim_v), -7.0f);
  res.state.assign(static_cast<std::size_t>(c.batch * c.heads * c.state_k() * c.dim_v), -7.0f);
  const state_tensor init = make_state(const_cast<float*>(s0 ? s0 : d.s0.data()), c.batch, c.heads, c.state_k(), c.dim_v);
  const state_tensor fin = make_state(res.state.data(), c.batch, c.heads, c.state_k(), c.dim_v);
  linear_options o;
  o.threads = threads;
  o.chunk = c.chunk;
  o.initial_state = c.initial || s0 ? &init : nullptr;
  o.final_state = c.stateless() ? nullptr : &fin;  // the bidirectional and flow forms have no state
  const tensor out = make_bshd(res.out.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  if (r == runner::kernel) res.st = linear_attention(d.qv(), d.kv(), d.vv(), out, d.spec(), o);
  else
    res.st = reference_linear_attention(d.qv(), d.kv(), d.vv(), out, d.spec(), o,
                                        r == runner::quadratic ? linear_form::quadratic
                                        : r == runner::recurrent ? linear_form::recurrent
                                                                 : linear_form::recurrent_f32);
  return res;
}

// The tolerance rule of tests/tolerance.h for one output.
void expect_within_rule(const std::vector<float>& kernel, const std::vector<float>& naive, const std::vector<float>& oracle,
                        const char* what) {
  const double tol = 2.0 * max_diff(naive, oracle) + test::k_linear_floor_eps * test::dtype_eps(dtype::f32) * max_abs(oracle);
  EXPECT_LE(max_diff(kernel, oracle), tol) << what << " (naive error " << max_diff(naive, oracle) << ")";
}

void check_case(const linear_case& c, std::uint64_t seed) {
  SCOPED_TRACE(c.str());
  const linear_data d(c, seed);
  const linear_result k = run(d, runner::kernel), o = run(d, runner::quadratic), n = run(d, runner::recurrent_f32);
  ASSERT_TRUE(k.st.ok()) << k.st.error;
  ASSERT_TRUE(o.st.ok()) << o.st.error;
  ASSERT_TRUE(n.st.ok()) << n.st.error;
  expect_within_rule(k.out, n.out, o.out, "out");
  if (!c.stateless()) expect_within_rule(k.state, n.state, o.state, "final_state");
}

TEST(Linear, KernelMatchesTheOracleOnAwkwardSizes) {
  test::for_awkward_cases([](const linear_case& c, std::uint64_t seed) { check_case(c, seed); });
}

TEST(Linear, KernelMatchesTheOracleOnEveryTarget) {
  test::for_target_cases("Linear.KernelMatchesTheOracleOnEveryTarget", [](const linear_case& c, std::uint64_t seed) { check_case(c, seed); });
}

TEST(Linear, KernelMatchesTheOracleOnRandomSpecs) {
  std::mt19937_64 rng(2024);
  for (int trial = 0; trial < 160; ++trial) {
    const linear_case c = test::random_case(rng);
    check_case(c, static_cast<std::uint64_t>(trial));
  }
}

// JRT's prefix form: prefix P = 0 is causal, P = T is the non-causal call; in between, rows of the prefix equal the
// non-causal call over the prefix alone, and every prefix length matches the oracle (chunk boundaries on both sides).
TEST(Linear, PrefixFormSpansCausalToNonCausal) {
  linear_case c;
  c.seq = 50;
  c.chunk = 16;
  c.initial = true;
  const linear_data d(c, 21);
  const linear_result causal = run(d, runner::kernel);
  linear_data nc = d;
  nc.c.causal = false;
  const linear_result non_causal = run(nc, runner::kernel);
  for (std::int64_t prefix : {0, 1, 15, 16, 17, 33, 50}) {
    SCOPED_TRACE("prefix " + std::to_string(prefix));
    linear_data pd = d;
    pd.c.prefix = prefix;
    const linear_result k = run(pd, runner::kernel), o = run(pd, runner::quadratic), n = run(pd, runner::recurrent_f32);
    ASSERT_TRUE(k.st.ok()) << k.st.error;
    expect_within_rule(k.out, n.out, o.out, "out");
    expect_within_rule(k.state, n.state, o.state, "final_state");
    if (prefix == 0) EXPECT_EQ(k.out, causal.out);
    if (prefix == c.seq) EXPECT_EQ(k.out, non_causal.out);
  }
  linear_data bad = d;
  bad.c.prefix = 51;
  EXPECT_EQ(run(bad, runner::kernel).st.error, "[linear_attention] spec.prefix 51 must be in 0..q.seq 50");
  bad.c.prefix = 10;
  bad.c.decay = linear_decay::scalar;
  EXPECT_NE(run(bad, runner::kernel).st.error.find("the prefix form with a decay is not supported yet"), std::string::npos);
}

// The oracle's quadratic form (explicit pair weights) and its recurrence agree in fp64.
TEST(Linear, OracleQuadraticFormMatchesItsRecurrence) {
  for (linear_decay decay : {linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel})
    for (bool normalize : {false, true}) {
      linear_case c;
      c.seq = 40;
      c.decay = decay;
      c.normalize = normalize;
      c.phi = normalize ? feature_map::elu_plus_one : feature_map::identity;
      c.initial = !normalize;
      SCOPED_TRACE(c.str());
      const linear_data d(c, 9);
      const linear_result a = run(d, runner::quadratic), b = run(d, runner::recurrent);
      ASSERT_TRUE(a.st.ok() && b.st.ok());
      EXPECT_LE(max_diff(a.out, b.out), test::k_linear_forms_eps * test::dtype_eps(dtype::f32) * std::max(1.0, max_abs(a.out)));
      EXPECT_LE(max_diff(a.state, b.state), test::k_linear_forms_eps * test::dtype_eps(dtype::f32) * std::max(1.0, max_abs(a.state)));
    }
}

// Prefill with final_state, then the rest with it as initial_state, equals one call over the whole sequence.
TEST(Linear, PrefillThenContinuationEqualsOneCall) {
  for (linear_decay decay : {linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel}) {
    linear_case whole;
    whole.seq = 90;
    whole.decay = decay;
    whole.initial = true;
    SCOPED_TRACE(whole.str());
    const linear_data d(whole, 31);
    const linear_result one = run(d, runner::kernel), oracle = run(d, runner::quadratic), naive = run(d, runner::recurrent_f32);
    ASSERT_TRUE(one.st.ok());
    // The same inputs cut at token 37 (not a chunk boundary), then 37..89 one token at a time would be the decode
    // step; here in two calls.
    for (std::int64_t cut : {1, 37, 64}) {
      const auto slice = [&](const linear_data& src, std::int64_t t0, std::int64_t t1) {
        linear_case c = src.c;
        c.seq = t1 - t0;
        linear_data part(c, 0);
        const auto copy = [&](const std::vector<std::uint8_t>& from, std::vector<std::uint8_t>& to, std::int64_t dim) {
          const std::int64_t row = c.heads * dim * dtype_size(c.type);
          for (std::int64_t b = 0; b < c.batch; ++b)
            std::copy(from.begin() + (b * src.c.seq + t0) * row, from.begin() + (b * src.c.seq + t1) * row, to.begin() + b * c.seq * row);
        };
        copy(src.q, part.q, c.dim_k);
        copy(src.k, part.k, c.dim_k);
        copy(src.v, part.v, c.dim_v);
        const std::int64_t grow = c.heads * src.gdim();
        for (std::int64_t b = 0; b < c.batch; ++b)
          std::copy(src.g.begin() + (b * src.c.seq + t0) * grow, src.g.begin() + (b * src.c.seq + t1) * grow, part.g.begin() + b * c.seq * grow);
        part.s0 = src.s0;
        part.head_g = src.head_g;
        return part;
      };
      const linear_data first = slice(d, 0, cut), second = slice(d, cut, whole.seq);
      const linear_result a = run(first, runner::kernel);
      ASSERT_TRUE(a.st.ok());
      const linear_result b = run(second, runner::kernel, 1, a.state.data());
      ASSERT_TRUE(b.st.ok());
      std::vector<float> joined(one.out.size());
      const std::int64_t row = whole.heads * whole.dim_v;
      for (std::int64_t bb = 0; bb < whole.batch; ++bb) {
        std::copy(a.out.begin() + bb * cut * row, a.out.begin() + (bb + 1) * cut * row, joined.begin() + bb * whole.seq * row);
        std::copy(b.out.begin() + bb * (whole.seq - cut) * row, b.out.begin() + (bb + 1) * (whole.seq - cut) * row,
                  joined.begin() + (bb * whole.seq + cut) * row);
      }
      SCOPED_TRACE("cut at " + std::to_string(cut));
      expect_within_rule(joined, naive.out, oracle.out, "out of the two calls");
      expect_within_rule(b.state, naive.state, oracle.state, "final_state of the two calls");
    }
  }
}

TEST(Linear, ResultDoesNotDependOnThreads) {
  linear_case c;
  c.batch = 3;
  c.heads = 5;
  c.seq = 77;
  c.decay = linear_decay::channel;
  for (int form = 0; form < 3; ++form) {  // plain, projected, bidirectional
    c.features = form == 1 ? 11 : 0;
    c.phi = form == 1 ? feature_map::softmax : feature_map::identity;
    c.causal = form != 2;
    SCOPED_TRACE(c.str());
    const linear_data d(c, 4);
    const linear_result one = run(d, runner::kernel, 1), two = run(d, runner::kernel, 2);
    ASSERT_TRUE(one.st.ok() && two.st.ok());
    EXPECT_EQ(one.out, two.out);
    if (!c.stateless()) EXPECT_EQ(one.state, two.state);
  }
}

// final_state may be the initial_state's own buffer (a decode loop advancing its state in place).
TEST(Linear, StateUpdatedInPlace) {
  for (std::int64_t seq : {21, 3, 1})  // the chunked kernel and the decode step's recurrence (a few tokens)
    for (linear_decay decay : {linear_decay::scalar, linear_decay::channel}) {
      linear_case c;
      c.seq = seq;
      c.decay = decay;
      c.initial = true;
      SCOPED_TRACE(c.str());
      const linear_data d(c, 6);
      const linear_result separate = run(d, runner::kernel);
      ASSERT_TRUE(separate.st.ok());
      for (runner r : {runner::kernel, runner::quadratic}) {
        std::vector<float> state = d.s0, out(separate.out.size());
        const state_tensor st = make_state(state.data(), c.batch, c.heads, c.state_k(), c.dim_v);
        linear_options o;
        o.initial_state = o.final_state = &st;
        const tensor ot = make_bshd(out.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
        const status s = r == runner::kernel ? linear_attention(d.qv(), d.kv(), d.vv(), ot, d.spec(), o)
                                             : reference_linear_attention(d.qv(), d.kv(), d.vv(), ot, d.spec(), o);
        ASSERT_TRUE(s.ok()) << s.error;
        if (r == runner::kernel) {
          EXPECT_EQ(out, separate.out);
          EXPECT_EQ(state, separate.state);
        } else {
          const linear_result oracle = run(d, runner::quadratic);
          EXPECT_EQ(state, oracle.state);
        }
      }
    }
}

// Prefill, then decode steps of one token each with the state advanced in place: the rows and the state match one
// call over the whole sequence under the tolerance rule.
TEST(Linear, DecodeStepsContinueAPrefill) {
  for (linear_decay decay : {linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel}) {
    linear_case c;
    c.seq = 46;
    c.chunk = 16;
    c.decay = decay;
    c.initial = true;
    SCOPED_TRACE(c.str());
    const linear_data d(c, 21);
    const linear_result whole = run(d, runner::kernel), oracle = run(d, runner::quadratic), naive = run(d, runner::recurrent_f32);
    ASSERT_TRUE(whole.st.ok()) << whole.st.error;
    const std::int64_t prefill = 40, H = c.heads, K = c.dim_k, V = c.dim_v;
    std::vector<float> state = d.s0, out(whole.out.size(), -7.0f);
    const state_tensor st = make_state(state.data(), c.batch, H, K, V);
    linear_options o;
    o.chunk = c.chunk;
    o.initial_state = o.final_state = &st;
    linear_spec s = d.spec();
    // Views of tokens [t0, t0 + n) of every input (the batch stride stays the whole sequence's).
    const auto part = [&](const tensor& full, std::int64_t t0, std::int64_t n) {
      tensor x = full;
      x.data = static_cast<char*>(full.data) + t0 * full.stride_seq * dtype_size(full.type);
      x.seq = n;
      return x;
    };
    const tensor ot = make_bshd(out.data(), dtype::f32, c.batch, c.seq, H, V);
    for (std::int64_t t0 = 0; t0 < c.seq; t0 += t0 == 0 ? prefill : 1) {
      const std::int64_t n = t0 == 0 ? prefill : 1;
      linear_spec sp = s;
      sp.g = part(s.g, t0, n);
      ASSERT_TRUE(linear_attention(part(d.qv(), t0, n), part(d.kv(), t0, n), part(d.vv(), t0, n), part(ot, t0, n), sp, o).ok());
    }
    expect_within_rule(out, naive.out, oracle.out, "out");
    expect_within_rule(state, naive.state, oracle.state, "final_state");
  }
}

// Decays of exp(-80) per token: the chunked form's exponents stay <= 0, so nothing overflows (the naive
// q exp(B) / k exp(-B) factorisation would give inf * 0).
TEST(Linear, StrongDecaysStayFinite) {
  linear_case c;
  c.seq = 70;
  c.decay = linear_decay::channel;
  linear_data d(c, 12);
  for (float& x : d.g) x = -80.0f;
  const linear_result k = run(d, runner::kernel), o = run(d, runner::quadratic), n = run(d, runner::recurrent_f32);
  ASSERT_TRUE(k.st.ok());
  for (float x : k.out) ASSERT_TRUE(std::isfinite(x));
  for (float x : k.state) ASSERT_TRUE(std::isfinite(x));
  expect_within_rule(k.out, n.out, o.out, "out");
  expect_within_rule(k.state, n.state, o.state, "final_state");
}

// explain_linear reports the kernels' own decisions: the decode recurrence for a short call, and per (chunk, head)
// whether the decay factors; a head with a chunk that does not is on the backward's row path.
TEST(Linear, ExplainNamesThePaths) {
  const auto explain = [](const linear_data& d) {
    std::vector<float> out(static_cast<std::size_t>(d.c.batch * d.c.seq * d.c.heads * d.c.dim_v));
    std::string all;
    linear_options o;
    o.chunk = d.c.chunk;
    for (const std::string& l : explain_linear(d.qv(), d.kv(), d.vv(), make_bshd(out.data(), dtype::f32, d.c.batch, d.c.seq, d.c.heads, d.c.dim_v),
                                               d.spec(), o))
      all += l + "\n";
    return all;
  };
  linear_case c;
  c.batch = 1;
  c.heads = 2;
  c.seq = 96;
  c.chunk = 32;
  c.decay = linear_decay::scalar;
  linear_data d(c, 3);
  for (float& x : d.g) x = -0.1f;  // 3.2 per chunk: every chunk factors
  for (std::int64_t t = 32; t < 64; ++t) d.g[static_cast<std::size_t>(t * c.heads + 1)] = -2.0f;  // head 1, chunk 1: 64 > 40
  const std::string e = explain(d);
  EXPECT_NE(e.find("3 causal chunks per head"), std::string::npos) << e;
  EXPECT_NE(e.find("5 of 6 (chunk, head) pairs factor"), std::string::npos) << e;
  EXPECT_NE(e.find("1 (sequence, head) items on the row path"), std::string::npos) << e;
  c.seq = 5;
  EXPECT_NE(explain(linear_data(c, 3)).find("decode: 1 of 1 sequences"), std::string::npos);
  c.seq = 96;
  c.causal = false;  // the bidirectional form: two causal passes, the chunks counted per direction
  const std::string bidir = explain(linear_data(c, 3));
  EXPECT_NE(bidir.find("bidirectional (ViG): the causal call with spec.g plus the causal call over the reversed tokens"), std::string::npos) << bidir;
  EXPECT_NE(bidir.find("6 causal chunks per head over both directions"), std::string::npos) << bidir;
  EXPECT_NE(bidir.find("chunked: 1 sequences"), std::string::npos) << bidir;
  c.causal = true;
  tensor bad = d.kv();
  bad.dim = 4;
  std::vector<float> out(static_cast<std::size_t>(96 * 2 * 8));
  const std::vector<std::string> err = explain_linear(d.qv(), bad, d.vv(), make_bshd(out.data(), dtype::f32, 1, 96, 2, 8), d.spec(), {});
  ASSERT_EQ(err.size(), 1u);
  EXPECT_EQ(err[0], "[linear_attention] k.dim 4 != q.dim 5");
}

// Hedgehog (a projection, then exp / softmax) and Performer (random features), with every decay, normalisation,
// prefix, non-causal, decode and dtype: the projected pre-pass and the kernels on F features against the oracle,
// which projects in fp64 per token.
TEST(Linear, ProjectedFeatureMapsMatchTheOracle) {
  struct proj_case {
    feature_map phi;
    std::int64_t features;
    bool shared, bias;
    linear_decay decay;
    bool normalize, causal, initial;
    std::int64_t seq, prefix;
    dtype type;
  };
  const proj_case cases[] = {
      {feature_map::exp, 16, false, true, linear_decay::none, false, true, true, 97, 0, dtype::f32},
      {feature_map::softmax, 19, true, true, linear_decay::channel, false, true, true, 65, 0, dtype::f32},  // g over F
      {feature_map::performer, 32, false, false, linear_decay::none, true, true, false, 70, 0, dtype::f32},
      {feature_map::performer, 7, true, false, linear_decay::fixed, false, true, true, 64, 0, dtype::bf16},
      {feature_map::relu, 33, false, true, linear_decay::scalar, false, true, false, 63, 0, dtype::f32},  // F > K
      {feature_map::elu_plus_one, 1, false, true, linear_decay::none, true, true, false, 31, 0, dtype::bf16},
      {feature_map::performer, 24, false, true, linear_decay::none, true, false, false, 40, 0, dtype::f32},  // non-causal
      {feature_map::exp, 8, true, false, linear_decay::none, false, true, true, 50, 20, dtype::f32},  // JRT prefix
      {feature_map::identity, 12, false, true, linear_decay::channel, false, true, true, 5, 0, dtype::f32},  // decode
  };
  for (const proj_case& pc : cases) {
    linear_case c;
    c.phi = pc.phi;
    c.features = pc.features;
    c.shared_projection = pc.shared;
    c.projection_bias = pc.bias;
    c.decay = pc.decay;
    c.normalize = pc.normalize;
    c.causal = pc.causal;
    c.initial = pc.initial;
    c.seq = pc.seq;
    c.prefix = pc.prefix;
    c.type = pc.type;
    c.chunk = 32;
    check_case(c, static_cast<std::uint64_t>(pc.features * 31 + pc.seq));
  }
}

// Performer's positive random features estimate exp(q . k): normalised, non-causal linear attention on them approaches
// softmax attention as F grows (error ~ 1 / sqrt(F)); the directions are Gaussian (iid) or orthogonal blocks.
TEST(Linear, PerformerFeaturesApproachSoftmaxAttention) {
  const std::int64_t T = 48, K = 4, V = 3;
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> q(static_cast<std::size_t>(T * K)), k = q, v(static_cast<std::size_t>(T * V));
  for (float& x : q) x = 0.5f * u(rng);
  for (float& x : k) x = 0.5f * u(rng);
  for (float& x : v) x = u(rng);
  std::vector<double> exact(static_cast<std::size_t>(T * V), 0.0);
  for (std::int64_t i = 0; i < T; ++i) {
    double den = 0.0;
    for (std::int64_t j = 0; j < T; ++j) {
      double s = 0.0;
      for (std::int64_t c = 0; c < K; ++c) s += static_cast<double>(q[static_cast<std::size_t>(i * K + c)]) * k[static_cast<std::size_t>(j * K + c)];
      const double w = std::exp(s);
      den += w;
      for (std::int64_t e = 0; e < V; ++e) exact[static_cast<std::size_t>(i * V + e)] += w * v[static_cast<std::size_t>(j * V + e)];
    }
    for (std::int64_t e = 0; e < V; ++e) exact[static_cast<std::size_t>(i * V + e)] /= den;
  }
  const auto error = [&](std::int64_t F, bool orthogonal) {
    const std::vector<float> w = performer_projection(1, K, F, 99, orthogonal);
    linear_spec s;
    s.causal = false;
    s.normalize = true;
    s.scale = 1.0;
    s.phi = feature_map::performer;
    s.projection = {w, {}, 1, F};
    std::vector<float> out(static_cast<std::size_t>(T * V));
    const status st = linear_attention(make_bshd(q.data(), dtype::f32, 1, T, 1, K), make_bshd(k.data(), dtype::f32, 1, T, 1, K),
                                       make_bshd(v.data(), dtype::f32, 1, T, 1, V), make_bshd(out.data(), dtype::f32, 1, T, 1, V), s);
    EXPECT_TRUE(st.ok()) << st.error;
    double worst = 0.0;
    for (std::size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::fabs(out[i] - exact[i]));
    return worst;
  };
  for (bool orthogonal : {false, true}) {
    SCOPED_TRACE(orthogonal ? "orthogonal" : "iid");
    const double coarse = error(16, orthogonal), fine = error(4096, orthogonal);
    EXPECT_LT(fine, 0.03);
    EXPECT_LT(fine, coarse / 3.0) << "16 features: " << coarse;
  }
}

// performer_projection: the same seed gives the same directions, another seed others; orthogonal columns within a
// block of K are orthogonal, with Gaussian-vector lengths (around sqrt(K)).
TEST(Linear, PerformerProjectionIsSeededAndOrthogonal) {
  const std::int64_t H = 2, K = 6, F = 15;
  const std::vector<float> a = performer_projection(H, K, F, 7), b = performer_projection(H, K, F, 7), c = performer_projection(H, K, F, 8);
  ASSERT_EQ(a.size(), static_cast<std::size_t>(H * K * F));
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  const auto col = [&](std::int64_t h, std::int64_t f, std::int64_t r) { return static_cast<double>(a[static_cast<std::size_t>((h * K + r) * F + f)]); };
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t f = 0; f < F; ++f) {
      double norm = 0.0;
      for (std::int64_t r = 0; r < K; ++r) norm += col(h, f, r) * col(h, f, r);
      EXPECT_GT(norm, 0.0);
      EXPECT_LT(norm, 10.0 * K);
      for (std::int64_t g = f / K * K; g < f; ++g) {  // earlier columns of the same block
        double dot = 0.0, ng = 0.0;
        for (std::int64_t r = 0; r < K; ++r) {
          dot += col(h, f, r) * col(h, g, r);
          ng += col(h, g, r) * col(h, g, r);
        }
        EXPECT_LT(std::fabs(dot), 1e-5 * std::sqrt(norm * ng)) << "head " << h << " columns " << g << ", " << f;
      }
    }
  EXPECT_TRUE(performer_projection(0, K, F, 7).empty());
}

// The projection's rules; the state, and g under a channel decay, are over its F features.
// The kernels' vectorised maps keep exp's edges: sigmoid and elu + 1 of inputs far outside exp's float range are 0 or
// 1 (not garbage), and a NaN input stays NaN in the rows it reaches.
TEST(Linear, FeatureMapsKeepTheirEdges) {
  for (feature_map phi : {feature_map::sigmoid, feature_map::elu_plus_one, feature_map::softmax}) {
    linear_case c;
    c.seq = 40;
    c.dim_k = 19;
    c.phi = phi;
    c.causal = false;
    SCOPED_TRACE(c.str());
    linear_data d(c, 2);
    float* q = reinterpret_cast<float*>(d.q.data());
    float* k = reinterpret_cast<float*>(d.k.data());
    const float edges[] = {-200.0f, -120.0f, -95.0f, 90.0f, 150.0f, 200.0f};
    for (std::size_t i = 0; i < d.q.size() / 4; i += 7) q[i] = edges[i % 6];
    for (std::size_t i = 3; i < d.k.size() / 4; i += 11) k[i] = edges[(i + 3) % 6] * (phi == feature_map::sigmoid ? 1.0f : -1.0f);
    const linear_result kr = run(d, runner::kernel), o = run(d, runner::quadratic), n = run(d, runner::recurrent_f32);
    ASSERT_TRUE(kr.st.ok() && o.st.ok() && n.st.ok());
    for (float x : o.out) ASSERT_TRUE(std::isfinite(x));
    expect_within_rule(kr.out, n.out, o.out, "out");
    q[5] = std::nanf("");  // token 0 of batch 0, head 0: its output row is NaN, the others are not touched by it
    const linear_result kn = run(d, runner::kernel);
    ASSERT_TRUE(kn.st.ok());
    for (std::int64_t c2 = 0; c2 < c.dim_v; ++c2) EXPECT_TRUE(std::isnan(kn.out[static_cast<std::size_t>(c2)])) << "NaN lost, column " << c2;
  }
}

TEST(Linear, ProjectionValidation) {
  linear_case c;
  c.seq = 8;
  c.features = 4;
  const linear_data d(c, 1);
  std::vector<float> out(static_cast<std::size_t>(c.batch * c.seq * c.heads * c.dim_v), -7.0f);
  const tensor o = make_bshd(out.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  const auto msg = [&](const linear_spec& s, const linear_options& opt = {}) { return linear_attention(d.qv(), d.kv(), d.vv(), o, s, opt).error; };
  linear_spec s = d.spec();
  s.projection.heads = 2;
  EXPECT_EQ(msg(s), "[linear_attention] spec.projection.heads 2 must be 1 (shared) or q.heads 3");
  s = d.spec();
  s.projection.features = 5;
  EXPECT_EQ(msg(s), "[linear_attention] spec.projection.weight has 60 values, expected heads x K x F = 3 x 5 x 5");
  s = d.spec();
  s.projection.bias = std::span<const float>(d.proj_b).first(3);
  EXPECT_EQ(msg(s), "[linear_attention] spec.projection.bias has 3 values, expected heads x F = 3 x 4 (or none)");
  linear_data nan_w = d;
  nan_w.proj_w[7] = std::nanf("");
  EXPECT_EQ(linear_attention(nan_w.qv(), nan_w.kv(), nan_w.vv(), o, nan_w.spec()).error,
            "[linear_attention] spec.projection.weight[7] nan must be finite");
  s = d.spec();
  s.projection = {};
  s.phi = feature_map::performer;
  EXPECT_EQ(msg(s), "[linear_attention] spec.phi performer needs spec.projection (its random directions: performer_projection)");
  std::vector<float> s0(static_cast<std::size_t>(c.batch * c.heads * c.dim_k * c.dim_v));
  const state_tensor over_k = make_state(s0.data(), c.batch, c.heads, c.dim_k, c.dim_v);  // K rows where F are wanted
  linear_options with_k;
  with_k.initial_state = &over_k;
  EXPECT_EQ(msg(d.spec(), with_k), "[linear_attention] options.initial_state is [2, 3, 5, 8], expected [2, 3, 4, 8]");
  s = d.spec();
  s.decay = linear_decay::channel;  // d.g is [.., 1]
  EXPECT_NE(msg(s).find("spec.g is [2, 8, 3, 1], expected [2, 8, 3, 4] (decay channel)"), std::string::npos);
  std::vector<float> shared(out.size(), -7.0f);  // out written over the weights it reads
  std::copy(d.proj_w.begin(), d.proj_w.end(), shared.begin());
  s = d.spec();
  s.projection.weight = std::span<const float>(shared).first(d.proj_w.size());
  EXPECT_EQ(linear_attention(d.qv(), d.kv(), d.vv(), make_bshd(shared.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v), s).error,
            "[linear_attention] out aliases spec.projection.weight: the output must not overlap an input");
  EXPECT_EQ(std::count(out.begin(), out.end(), -7.0f), static_cast<std::ptrdiff_t>(out.size())) << "a rejected call wrote out";
}

TEST(Linear, Validation) {
  linear_case c;
  c.seq = 8;
  const linear_data d(c, 1);
  std::vector<float> out(static_cast<std::size_t>(c.batch * c.seq * c.heads * c.dim_v), -7.0f);
  const tensor o = make_bshd(out.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  const auto msg = [&](const tensor& q, const tensor& k, const tensor& v, const tensor& out_t, const linear_spec& s, const linear_options& opt) {
    return linear_attention(q, k, v, out_t, s, opt).error;
  };
  tensor short_k = d.kv();
  short_k.dim = 4;
  EXPECT_EQ(msg(d.qv(), short_k, d.vv(), o, {}, {}), "[linear_attention] k.dim 4 != q.dim 5");
  tensor short_v = d.vv();
  short_v.seq = 7;
  EXPECT_EQ(msg(d.qv(), d.kv(), short_v, o, {}, {}), "[linear_attention] v.seq 7 != q.seq 8");
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), d.qv(), {}, {}), "[linear_attention] out.dim 5 != v.dim 8");
  linear_spec fixed;
  fixed.decay = linear_decay::fixed;
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, fixed, {}), "[linear_attention] spec.head_log_decay has 0 values, expected one per head (3)");
  std::vector<float> bad_heads = {-0.1f, 0.5f, -0.2f};
  fixed.head_log_decay = bad_heads;
  EXPECT_NE(msg(d.qv(), d.kv(), d.vv(), o, fixed, {}).find("spec.head_log_decay[1] 0.5 must be finite and <= 0"), std::string::npos);
  linear_spec chan = d.spec();
  chan.decay = linear_decay::channel;
  EXPECT_NE(msg(d.qv(), d.kv(), d.vv(), o, chan, {}).find("spec.g is [2, 8, 3, 1], expected [2, 8, 3, 5] (decay channel)"),
            std::string::npos);
  linear_data pos = d;
  pos.g[3] = 0.25f;
  linear_spec sc = pos.spec();
  sc.decay = linear_decay::scalar;
  EXPECT_NE(msg(pos.qv(), pos.kv(), pos.vv(), o, sc, {}).find("must be finite and <= 0"), std::string::npos);
  // The bidirectional form (non-causal with a decay) has no state; g_backward belongs to it alone.
  linear_spec bidir = d.spec();
  bidir.decay = linear_decay::scalar;
  bidir.causal = false;
  {
    std::vector<float> st_buf(static_cast<std::size_t>(c.batch * c.heads * c.dim_k * c.dim_v));
    const state_tensor bst = make_state(st_buf.data(), c.batch, c.heads, c.dim_k, c.dim_v);
    linear_options in_state, out_state;
    in_state.initial_state = &bst;
    out_state.final_state = &bst;
    EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, bidir, in_state),
              "[linear_attention] options.initial_state with the bidirectional form (causal = false with decay scalar): it has no state to start from");
    EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, bidir, out_state),
              "[linear_attention] options.final_state with the bidirectional form (causal = false with decay scalar): it has no state to return");
    linear_spec gates = d.spec();
    gates.decay = linear_decay::scalar;
    gates.g_backward = gates.g;
    EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, gates, {}),
              "[linear_attention] spec.g_backward is set but causal = true (it is the reversed scan's decay of the bidirectional form)");
    linear_spec flow;
    flow.flow = true;
    flow.phi = feature_map::sigmoid;
    EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, flow, {}), "[linear_attention] spec.flow with causal = true: Flowformer's flow form is non-causal");
    flow.causal = false;
    flow.phi = feature_map::identity;
    EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, flow, {}),
              "[linear_attention] spec.flow with phi identity: the flows need positive features (sigmoid, elu_plus_one, softmax, exp or performer)");
    flow.phi = feature_map::sigmoid;
    EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, flow, out_state), "[linear_attention] options.final_state with spec.flow: the flow form has no state to return");
    flow.normalize = true;
    EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, flow, {}), "[linear_attention] spec.flow with spec.normalize: the flows are the normalisation");
    gates.causal = false;
    gates.g_backward.dim = 2;
    EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, gates, {}), "[linear_attention] spec.g_backward.dim 2 != spec.g.dim 1");
  }
  linear_options chunk0;
  chunk0.chunk = 0;
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, {}, chunk0), "[linear_attention] options.chunk 0 must be in 1..1024");
  std::vector<float> small(4);
  const state_tensor st = make_state(small.data(), 1, 1, 2, 2);
  linear_options with_state;
  with_state.initial_state = &st;
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, {}, with_state),
            "[linear_attention] options.initial_state is [1, 1, 2, 2], expected [2, 3, 5, 8]");
  const tensor alias = make_bshd(const_cast<std::uint8_t*>(d.v.data()), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), alias, {}, {}), "[linear_attention] out aliases v: the output must not overlap an input");
  // normalize cannot continue from a state (z is not carried); states that overlap without being the same view.
  linear_spec norm;
  norm.normalize = true;
  std::vector<float> s0(static_cast<std::size_t>(c.batch * c.heads * c.state_k() * c.dim_v));
  const state_tensor full = make_state(s0.data(), c.batch, c.heads, c.state_k(), c.dim_v);
  linear_options carry;
  carry.initial_state = &full;
  EXPECT_NE(msg(d.qv(), d.kv(), d.vv(), o, norm, carry).find("spec.normalize with options.initial_state"), std::string::npos);
  state_tensor broadcast = full;  // one state for every batch entry, read while the final states are written
  broadcast.stride_batch = 0;
  linear_options partial;
  partial.initial_state = &broadcast;
  partial.final_state = &full;
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, {}, partial),
            "[linear_attention] options.final_state overlaps options.initial_state without being the same view");
  linear_options self;
  self.final_state = &broadcast;
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, {}, self),
            "[linear_attention] options.final_state.stride_batch 0 makes the output overlap itself (needs |stride| >= 1)");
  tensor self_out = o;  // two tokens written to one row
  self_out.stride_seq = 0;
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), self_out, {}, {}),
            "[linear_attention] out.stride_seq 0 makes the output overlap itself (needs |stride| >= 1)");
  tensor null_q = d.qv();
  null_q.data = nullptr;
  EXPECT_EQ(msg(null_q, d.kv(), d.vv(), o, {}, {}), "[linear_attention] q.data is null");
  linear_options bad_threads;
  bad_threads.threads = -1;
  EXPECT_EQ(msg(d.qv(), d.kv(), d.vv(), o, {}, bad_threads), "[linear_attention] options.threads -1 must be >= 0 (0 = all cores)");
  EXPECT_EQ(std::count(out.begin(), out.end(), -7.0f), static_cast<std::ptrdiff_t>(out.size())) << "a rejected call wrote out";
  // The oracle states the same rules under its own name.
  EXPECT_EQ(reference_linear_attention(d.qv(), short_k, d.vv(), o, {}, {}).error, "[reference_linear_attention] k.dim 4 != q.dim 5");
}

}  // namespace
}  // namespace omniattn
