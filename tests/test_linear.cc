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

#include "omniattn/linear.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

struct linear_case {
  std::int64_t batch = 2, seq = 65, heads = 3, dim_k = 5, dim_v = 8, chunk = 64;
  feature_map phi = feature_map::identity;
  linear_decay decay = linear_decay::none;
  bool causal = true, normalize = false, initial = false;
  std::int64_t prefix = 0;
  dtype type = dtype::f32;
  std::string str() const {
    return "B" + std::to_string(batch) + " T" + std::to_string(seq) + " H" + std::to_string(heads) + " K" + std::to_string(dim_k) + " V" +
           std::to_string(dim_v) + " C" + std::to_string(chunk) + " " + feature_map_name(phi) + " decay " + linear_decay_name(decay) +
           (causal ? " causal" : " non-causal") + (prefix ? " prefix " + std::to_string(prefix) : "") + (normalize ? " normalize" : "") + (initial ? " s0" : "") + " " + dtype_name(type);
  }
};

// Seeded inputs of a case: q, k, v (in the case's dtype), log decays, an initial state.
struct linear_data {
  linear_case c;
  std::vector<std::uint8_t> q, k, v;
  std::vector<float> g, head_g, s0;
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
    head_g.resize(static_cast<std::size_t>(c.heads));
    for (std::size_t h = 0; h < head_g.size(); ++h) head_g[h] = std::log(1.0f - std::exp2(-5.0f - static_cast<float>(h)));  // RetNet
    s0.resize(static_cast<std::size_t>(c.batch * c.heads * c.dim_k * c.dim_v));
    for (float& x : s0) x = u(rng);
  }
  std::int64_t gdim() const { return c.decay == linear_decay::channel ? c.dim_k : 1; }  // g is [B, T, H, gdim]
  tensor qv() const { return make_bshd(const_cast<std::uint8_t*>(q.data()), c.type, c.batch, c.seq, c.heads, c.dim_k); }
  tensor kv() const { return make_bshd(const_cast<std::uint8_t*>(k.data()), c.type, c.batch, c.seq, c.heads, c.dim_k); }
  tensor vv() const { return make_bshd(const_cast<std::uint8_t*>(v.data()), c.type, c.batch, c.seq, c.heads, c.dim_v); }
  linear_spec spec() const {
    linear_spec s;
    s.causal = c.causal;
    s.prefix = c.prefix;
    s.phi = c.phi;
    s.normalize = c.normalize;
    s.decay = c.decay;
    s.head_log_decay = head_g;
    s.g = make_bshd(const_cast<float*>(g.data()), dtype::f32, c.batch, c.seq, c.heads, gdim());
    return s;
  }
};

struct linear_result {
  std::vector<float> out, state;
  status st;
};

enum class runner { kernel, quadratic, recurrent, recurrent_f32 };

linear_result run(const linear_data& d, runner r, int threads = 1, const float* s0 = nullptr) {
  const linear_case& c = d.c;
  linear_result res;
  res.out.assign(static_cast<std::size_t>(c.batch * c.seq * c.heads * c.dim_v), -7.0f);
  res.state.assign(static_cast<std::size_t>(c.batch * c.heads * c.dim_k * c.dim_v), -7.0f);
  const state_tensor init = make_state(const_cast<float*>(s0 ? s0 : d.s0.data()), c.batch, c.heads, c.dim_k, c.dim_v);
  const state_tensor fin = make_state(res.state.data(), c.batch, c.heads, c.dim_k, c.dim_v);
  linear_options o;
  o.threads = threads;
  o.chunk = c.chunk;
  o.initial_state = c.initial || s0 ? &init : nullptr;
  o.final_state = &fin;
  const tensor out = make_bshd(res.out.data(), dtype::f32, c.batch, c.seq, c.heads, c.dim_v);
  if (r == runner::kernel) res.st = linear_attention(d.qv(), d.kv(), d.vv(), out, d.spec(), o);
  else
    res.st = reference_linear_attention(d.qv(), d.kv(), d.vv(), out, d.spec(), o,
                                        r == runner::quadratic ? linear_form::quadratic
                                        : r == runner::recurrent ? linear_form::recurrent
                                                                 : linear_form::recurrent_f32);
  return res;
}

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float v : x) m = std::max(m, static_cast<double>(std::fabs(v)));
  return m;
}
double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return std::numeric_limits<double>::infinity();
    m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
  }
  return m;
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
  expect_within_rule(k.state, n.state, o.state, "final_state");
}

TEST(Linear, KernelMatchesTheOracleOnAwkwardSizes) {
  // Every size edge with every decay kind.
  for (std::int64_t seq : {1, 7, 63, 64, 65, 130})
    for (std::int64_t dim_k : {1, 5, 16})
      for (linear_decay decay : {linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel}) {
        linear_case c;
        c.seq = seq;
        c.dim_k = dim_k;
        c.decay = decay;
        c.initial = seq % 2 == 1;
        check_case(c, static_cast<std::uint64_t>(seq * 100 + dim_k * 10 + static_cast<int>(decay)));
      }
}

TEST(Linear, KernelMatchesTheOracleOnEveryTarget) {
  test::for_each_target("Linear.KernelMatchesTheOracleOnEveryTarget", [&](const char* target) {
    for (linear_decay decay : {linear_decay::none, linear_decay::scalar, linear_decay::channel})
      for (std::int64_t dim_v : {1, 7, 33}) {  // below, between and above every vector width
        linear_case c;
        c.seq = 70;
        c.dim_k = 19;
        c.dim_v = dim_v;
        c.chunk = 32;
        c.decay = decay;
        c.initial = true;
        SCOPED_TRACE(target);
        check_case(c, static_cast<std::uint64_t>(dim_v * 7 + static_cast<int>(decay)));
      }
  });
}

TEST(Linear, KernelMatchesTheOracleOnRandomSpecs) {
  std::mt19937_64 rng(2024);
  const auto pick = [&](auto... xs) {
    const std::vector<std::common_type_t<decltype(xs)...>> v{xs...};
    return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng)];
  };
  for (int trial = 0; trial < 160; ++trial) {
    linear_case c;
    c.batch = pick(1, 2);
    c.heads = pick(1, 2, 3);
    c.seq = pick(1, 2, 13, 31, 32, 33, 97);
    c.dim_k = pick(1, 3, 8, 17);
    c.dim_v = pick(1, 4, 9);
    c.chunk = pick(1, 5, 16, 32, 64);
    c.phi = pick(feature_map::identity, feature_map::elu_plus_one, feature_map::relu, feature_map::softmax);
    c.causal = pick(true, true, false);
    c.decay = c.causal ? pick(linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel) : linear_decay::none;
    // The normaliser needs positive features (elu + 1, softmax): with signed ones q . z can be ~0 and the division
    // amplifies any rounding without bound.
    c.normalize = (c.phi == feature_map::elu_plus_one || c.phi == feature_map::softmax) && pick(true, false);
    c.initial = pick(true, false) && !c.normalize;
    c.type = pick(dtype::f32, dtype::bf16);
    if (c.causal && c.decay == linear_decay::none && pick(true, false))  // JRT's prefix form
      c.prefix = std::uniform_int_distribution<std::int64_t>(0, c.seq)(rng);
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
  const linear_data d(c, 4);
  const linear_result one = run(d, runner::kernel, 1), two = run(d, runner::kernel, 2);
  ASSERT_TRUE(one.st.ok() && two.st.ok());
  EXPECT_EQ(one.out, two.out);
  EXPECT_EQ(one.state, two.state);
}

// final_state may be the initial_state's own buffer (a decode loop advancing its state in place).
TEST(Linear, StateUpdatedInPlace) {
  linear_case c;
  c.seq = 21;
  c.decay = linear_decay::scalar;
  c.initial = true;
  const linear_data d(c, 6);
  const linear_result separate = run(d, runner::kernel);
  ASSERT_TRUE(separate.st.ok());
  for (runner r : {runner::kernel, runner::quadratic}) {
    std::vector<float> state = d.s0, out(separate.out.size());
    const state_tensor st = make_state(state.data(), c.batch, c.heads, c.dim_k, c.dim_v);
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
  linear_spec bidir = d.spec();
  bidir.decay = linear_decay::scalar;
  bidir.causal = false;
  EXPECT_NE(msg(d.qv(), d.kv(), d.vv(), o, bidir, {}).find("with causal = false: the bidirectional decayed form is not supported yet"),
            std::string::npos);
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
  std::vector<float> s0(static_cast<std::size_t>(c.batch * c.heads * c.dim_k * c.dim_v));
  const state_tensor full = make_state(s0.data(), c.batch, c.heads, c.dim_k, c.dim_v);
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
            "[linear_attention] options.final_state has stride 0 on axis 0: an output must not overlap itself");
  EXPECT_EQ(std::count(out.begin(), out.end(), -7.0f), static_cast<std::ptrdiff_t>(out.size())) << "a rejected call wrote out";
  // The oracle states the same rules under its own name.
  EXPECT_EQ(reference_linear_attention(d.qv(), short_k, d.vv(), o, {}, {}).error, "[reference_linear_attention] k.dim 4 != q.dim 5");
}

}  // namespace
}  // namespace omniattn
