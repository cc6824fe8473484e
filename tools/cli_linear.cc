// omniattn check --linear: linear-attention problems (linear.h) on the chunked CPU kernel, against the fp64 oracle
// (the quadratic form; the backward's recurrence) and the naive float recurrence, by tests/tolerance.h's linear rules.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cli.h"
#include "omniattn/linear.h"

namespace omniattn::cli {
namespace {

const char* const k_linear_suite[] = {
    "b=2,t=130,h=3,k=64,v=48",                                 // plain, chunk + 2
    "b=1,t=200,h=2,k=64,v=64,decay=fixed,s0=1",                // RetNet / Lightning
    "b=2,t=97,h=2,k=32,v=40,decay=scalar,dtype=bf16",          // simple GLA, bf16
    "b=1,t=150,h=2,k=48,v=17,decay=channel,chunk=32,s0=1",     // GLA, odd V
    "b=1,t=90,h=2,k=16,v=16,phi=elu_plus_one,normalize=1",     // classic normalised linear attention
    "b=1,t=70,h=2,k=24,v=24,causal=0,phi=softmax",             // non-causal
    "b=1,t=100,h=2,k=32,v=32,prefix=37",                       // JRT prefix-linear
    "b=3,t=5,h=4,k=64,v=64,decay=scalar,s0=1",                 // a decode-sized step after a state
    "b=1,t=120,h=2,k=32,v=32,f=48,phi=softmax,decay=channel",  // Hedgehog: a learned projection, then softmax
    "b=2,t=80,h=2,k=16,v=24,f=64,phi=performer,normalize=1",   // Performer's random features
    "b=2,t=110,h=2,k=32,v=16,causal=0,decay=channel",          // ViG: bidirectional gated
    "b=2,t=60,h=2,k=16,v=16,causal=0,phi=sigmoid,flow=1",      // Flowformer's flow conservation
};

struct linear_problem {
  std::int64_t b = 1, t = 128, h = 2, k = 64, v = 64, prefix = 0, chunk = 64;
  std::int64_t f = 0;  // a projection to f features before phi (0: none)
  std::int64_t sk() const { return f > 0 ? f : k; }  // the state's rows
  std::uint64_t seed = 1;
  dtype type = dtype::f32;
  linear_decay decay = linear_decay::none;
  feature_map phi = feature_map::identity;
  bool normalize = false, causal = true, s0 = false;
  std::string text;
  bool flow = false;
  bool stateless() const { return flow || (!causal && decay != linear_decay::none); }  // the flow and bidirectional forms
};

bool parse_int(const std::string& s, std::int64_t& out) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0') return false;
  out = v;
  return true;
}

bool parse_linear_problem(const std::string& text, linear_problem& p, std::string& error) {
  p = {};
  p.text = text;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos) {
      error = "'" + item + "' is not key=value";
      return false;
    }
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    std::int64_t n = 0;
    const bool is_int = parse_int(value, n);
    std::int64_t* ints[] = {&p.b, &p.t, &p.h, &p.k, &p.v, &p.prefix, &p.chunk, &p.f};
    const char* int_keys[] = {"b", "t", "h", "k", "v", "prefix", "chunk", "f"};
    bool done = false;
    for (std::size_t x = 0; x < std::size(int_keys); ++x)
      if (key == int_keys[x]) {
        if (!is_int) {
          error = key + "='" + value + "': expected an integer";
          return false;
        }
        *ints[x] = n;
        done = true;
      }
    if (done) continue;
    if (key == "seed" && is_int && n >= 0) {
      p.seed = static_cast<std::uint64_t>(n);
    } else if ((key == "normalize" || key == "causal" || key == "s0" || key == "flow") && is_int && (n == 0 || n == 1)) {
      (key == "normalize" ? p.normalize : key == "causal" ? p.causal : key == "flow" ? p.flow : p.s0) = n == 1;
    } else if (key == "dtype" && (value == "f32" || value == "bf16" || value == "f16")) {
      p.type = value == "f32" ? dtype::f32 : value == "bf16" ? dtype::bf16 : dtype::f16;
    } else if (key == "phi" && parse_feature_map(value, p.phi)) {
    } else if (key == "decay") {
      bool ok = false;
      for (linear_decay d : {linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel})
        if (value == linear_decay_name(d)) {
          p.decay = d;
          ok = true;
        }
      if (!ok) {
        error = "decay='" + value + "': expected none, fixed, scalar or channel";
        return false;
      }
    } else {
      error = "'" + item + "': unknown key or bad value (omniattn check --help)";
      return false;
    }
  }
  for (std::int64_t x : {p.b, p.t, p.h, p.k, p.v, p.f})
    if (x < 0 || x > 1 << 20) {
      error = "sizes must be in 0..2^20";
      return false;
    }
  if (static_cast<double>(p.h) * p.k * p.f > 1e9) {
    error = "the projection h * k * f > 1e9 values";
    return false;
  }
  if (static_cast<double>(p.b) * p.t * p.t * p.h * std::max(p.sk(), p.v) > 4e9) {
    error = "too large for the O(T^2) fp64 oracle (b * t^2 * h * max(k or f, v) > 4e9)";
    return false;
  }
  return true;
}

// The seeded inputs of a problem, in its dtype (q, k, v) and f32 (g, state, d_out, d_final).
struct linear_inputs {
  std::vector<std::uint16_t> q16, k16, v16;
  std::vector<float> q, k, v, g, head_g, s0, d_out, d_final, proj_w, proj_b;
  tensor qt, kt, vt;
  linear_spec spec;
  explicit linear_inputs(const linear_problem& p) {
    std::mt19937_64 rng(p.seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f), dec(-0.7f, 0.0f);
    const auto fill = [&](std::vector<float>& x, std::int64_t n, auto& dist) {
      x.resize(static_cast<std::size_t>(n));
      for (float& e : x) e = dist(rng);
    };
    fill(q, p.b * p.t * p.h * p.k, u);
    fill(k, p.b * p.t * p.h * p.k, u);
    fill(v, p.b * p.t * p.h * p.v, u);
    fill(g, p.b * p.t * p.h * (p.decay == linear_decay::channel ? p.sk() : 1), dec);
    fill(s0, p.b * p.h * p.sk() * p.v, u);
    fill(d_out, p.b * p.t * p.h * p.v, u);
    fill(d_final, p.b * p.h * p.sk() * p.v, u);
    if (p.f > 0) {  // per head, with a bias: Performer's directions, or a learned-looking projection
      if (p.phi == feature_map::performer) proj_w = performer_projection(p.h, p.k, p.f, p.seed);
      else fill(proj_w, p.h * p.k * p.f, u);
      for (float& x : proj_w) x *= p.phi == feature_map::performer ? 1.0f : std::sqrt(3.0f / static_cast<float>(std::max<std::int64_t>(p.k, 1)));
      fill(proj_b, p.h * p.f, u);
      spec.projection = {proj_w, proj_b, p.h, p.f};
    }
    head_g.resize(static_cast<std::size_t>(p.h));
    for (std::int64_t x = 0; x < p.h; ++x) head_g[static_cast<std::size_t>(x)] = std::log(1.0f - std::exp2(-2.0f - static_cast<float>(x % 6)));
    const auto view = [&](std::vector<float>& x, std::vector<std::uint16_t>& x16, std::int64_t dim) {
      if (p.type == dtype::f32) return make_bshd(x.data(), dtype::f32, p.b, p.t, p.h, dim);
      x16.resize(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) x16[i] = p.type == dtype::bf16 ? f32_to_bf16(x[i]) : f32_to_f16(x[i]);
      return make_bshd(x16.data(), p.type, p.b, p.t, p.h, dim);
    };
    qt = view(q, q16, p.k);
    kt = view(k, k16, p.k);
    vt = view(v, v16, p.v);
    spec.causal = p.causal;
    spec.prefix = p.prefix;
    spec.phi = p.phi;
    spec.normalize = p.normalize;
    spec.flow = p.flow;
    spec.decay = p.decay;
    spec.head_log_decay = head_g;
    spec.g = make_bshd(g.data(), dtype::f32, p.b, p.t, p.h, p.decay == linear_decay::channel ? p.sk() : 1);
  }
};

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float e : x) m = std::max(m, std::fabs(static_cast<double>(e)));
  return m;
}
double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return std::numeric_limits<double>::infinity();
    m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return m;
}

enum class who { kernel, oracle, naive };

struct forward_run {
  std::vector<float> out, state;
  status st;
  double ms = 0;
};

forward_run forward(const linear_problem& p, linear_inputs& in, who w, int threads) {
  forward_run r;
  r.out.assign(static_cast<std::size_t>(p.b * p.t * p.h * p.v), 0.0f);
  r.state.assign(static_cast<std::size_t>(p.b * p.h * p.sk() * p.v), 0.0f);
  const state_tensor s0 = make_state(in.s0.data(), p.b, p.h, p.sk(), p.v), fin = make_state(r.state.data(), p.b, p.h, p.sk(), p.v);
  linear_options o;
  o.threads = threads;
  o.chunk = p.chunk;
  o.initial_state = p.s0 ? &s0 : nullptr;
  o.final_state = p.stateless() ? nullptr : &fin;
  const tensor out = make_bshd(r.out.data(), dtype::f32, p.b, p.t, p.h, p.v);
  const auto t0 = std::chrono::steady_clock::now();
  r.st = w == who::kernel ? linear_attention(in.qt, in.kt, in.vt, out, in.spec, o)
                          : reference_linear_attention(in.qt, in.kt, in.vt, out, in.spec, o,
                                                       w == who::oracle ? linear_form::quadratic : linear_form::recurrent_f32);
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

struct backward_run {
  std::vector<std::vector<float>> grads;  // dq, dk, dv, decay, d_initial_state, d_projection_weight, d_projection_bias
  status st;
  double ms = 0;
};

backward_run backward(const linear_problem& p, linear_inputs& in, who w, int threads) {
  backward_run r;
  const std::int64_t gdim = p.decay == linear_decay::channel ? p.sk() : 1;
  r.grads = {std::vector<float>(static_cast<std::size_t>(p.b * p.t * p.h * p.k)), std::vector<float>(static_cast<std::size_t>(p.b * p.t * p.h * p.k)),
             std::vector<float>(static_cast<std::size_t>(p.b * p.t * p.h * p.v)),
             std::vector<float>(static_cast<std::size_t>(p.decay == linear_decay::fixed ? p.h : p.b * p.t * p.h * gdim)),
             std::vector<float>(static_cast<std::size_t>(p.b * p.h * p.sk() * p.v)), std::vector<float>(in.proj_w.size()),
             std::vector<float>(in.proj_b.size())};
  linear_grads g;
  g.dq = make_bshd(r.grads[0].data(), dtype::f32, p.b, p.t, p.h, p.k);
  g.dk = make_bshd(r.grads[1].data(), dtype::f32, p.b, p.t, p.h, p.k);
  g.dv = make_bshd(r.grads[2].data(), dtype::f32, p.b, p.t, p.h, p.v);
  if (p.decay == linear_decay::scalar || p.decay == linear_decay::channel) g.dg = make_bshd(r.grads[3].data(), dtype::f32, p.b, p.t, p.h, gdim);
  if (p.decay == linear_decay::fixed) g.d_head_log_decay = r.grads[3];
  const state_tensor s0 = make_state(in.s0.data(), p.b, p.h, p.sk(), p.v), dfin = make_state(in.d_final.data(), p.b, p.h, p.sk(), p.v),
                     ds0 = make_state(r.grads[4].data(), p.b, p.h, p.sk(), p.v);
  g.d_projection_weight = r.grads[5];
  g.d_projection_bias = r.grads[6];
  g.d_final_state = p.stateless() ? nullptr : &dfin;
  g.d_initial_state = p.stateless() ? nullptr : &ds0;
  linear_options o;
  o.threads = threads;
  o.chunk = p.chunk;
  o.initial_state = p.s0 ? &s0 : nullptr;
  const tensor d_out = make_bshd(in.d_out.data(), dtype::f32, p.b, p.t, p.h, p.v);
  const auto t0 = std::chrono::steady_clock::now();
  r.st = w == who::kernel ? linear_attention_backward(in.qt, in.kt, in.vt, d_out, in.spec, g, o)
                          : reference_linear_attention_backward(in.qt, in.kt, in.vt, d_out, in.spec, g, o,
                                                                w == who::oracle ? linear_form::recurrent : linear_form::recurrent_f32);
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

// The tolerance rules of tests/tolerance.h (linear forward: floor 8 units of f32 times the output's magnitude;
// gradients: 16 units times the call's largest gradient, times b * t for the fixed decay's).
constexpr double k_eps32 = 1.0 / (1 << 23);

}  // namespace

int run_linear_explain(const command_line& cl) {
  if (cl.problems.size() != 1) {
    std::cerr << "omniattn explain --linear: expected one linear problem (e.g. b=1,t=4096,h=8,k=128,v=128,decay=channel)\n";
    return k_exit_usage;
  }
  linear_problem p;
  std::string error;
  if (!parse_linear_problem(cl.problems[0], p, error)) {
    std::cerr << "omniattn explain --linear: problem '" << cl.problems[0] << "': " << error << "\n";
    return k_exit_usage;
  }
  linear_inputs in(p);
  std::vector<float> out(static_cast<std::size_t>(p.b * p.t * p.h * p.v));
  const state_tensor s0 = make_state(in.s0.data(), p.b, p.h, p.sk(), p.v);
  linear_options o;
  o.threads = cl.threads;
  o.chunk = p.chunk;
  o.initial_state = p.s0 ? &s0 : nullptr;
  std::printf("linear problem: %s\n", p.text.c_str());
  const std::vector<std::string> lines = explain_linear(in.qt, in.kt, in.vt, make_bshd(out.data(), dtype::f32, p.b, p.t, p.h, p.v), in.spec, o);
  for (const std::string& l : lines) std::printf("  %s\n", l.c_str());
  return !lines.empty() && lines[0].rfind("[", 0) == 0 ? k_exit_fail : k_exit_ok;
}

int run_linear_check(const command_line& cl) {
  std::vector<std::string> texts = cl.problems;
  if (texts.empty()) texts.assign(std::begin(k_linear_suite), std::end(k_linear_suite));
  std::vector<linear_problem> problems;
  for (const std::string& t : texts) {
    linear_problem p;
    std::string error;
    if (!parse_linear_problem(t, p, error)) {
      std::cerr << "omniattn check --linear: problem '" << t << "': " << error << "\n";
      return k_exit_usage;
    }
    problems.push_back(p);
  }
  std::printf("%-56s | %9s %10s %10s | %9s %10s %10s | %s\n", "linear problem", "fwd ms", "err", "naive err", "bwd ms", "grad err", "naive err",
              "verdict");
  bool all = true;
  for (const linear_problem& p : problems) {
    linear_inputs in(p);
    const forward_run k = forward(p, in, who::kernel, cl.threads);
    std::vector<std::string> notes;
    bool pass = k.st.ok();
    if (!k.st.ok()) notes.push_back(k.st.error);
    double err = NAN, naive_err = NAN, gerr = NAN, gnaive = NAN, bms = NAN;
    if (pass) {
      const forward_run o = forward(p, in, who::oracle, cl.threads), n = forward(p, in, who::naive, cl.threads);
      err = std::max(max_diff(k.out, o.out), max_diff(k.state, o.state));
      naive_err = std::max(max_diff(n.out, o.out), max_diff(n.state, o.state));
      const bool out_ok = max_diff(k.out, o.out) <= 2 * max_diff(n.out, o.out) + 8 * k_eps32 * max_abs(o.out);
      const bool state_ok = max_diff(k.state, o.state) <= 2 * max_diff(n.state, o.state) + 8 * k_eps32 * max_abs(o.state);
      if (!out_ok) notes.push_back("out outside the tolerance rule");
      if (!state_ok) notes.push_back("final_state outside the tolerance rule");
      pass = out_ok && state_ok;
      const backward_run kb = backward(p, in, who::kernel, cl.threads);
      if (!kb.st.ok()) {
        notes.push_back(kb.st.error);
        pass = false;
      } else {
        const backward_run ob = backward(p, in, who::oracle, cl.threads), nb = backward(p, in, who::naive, cl.threads);
        double M = 0, MW = 0;  // the projection's gradients (sums over every token) on their own scale
        for (std::size_t x = 0; x < ob.grads.size(); ++x) (x < 5 ? M : MW) = std::max(x < 5 ? M : MW, max_abs(ob.grads[x]));
        gerr = gnaive = 0;
        const char* names[] = {"dq", "dk", "dv", "d_decay", "d_initial_state", "d_projection_weight", "d_projection_bias"};
        for (std::size_t x = 0; x < kb.grads.size(); ++x) {
          const double e = max_diff(kb.grads[x], ob.grads[x]), ne = max_diff(nb.grads[x], ob.grads[x]);
          gerr = std::max(gerr, e);
          gnaive = std::max(gnaive, ne);
          // The fixed decay's gradient sums b * t per-token gradients of the running-sum identity: its floor grows with
          // them; the projection's sum b * t rows each, a floor of sqrt(b * t).
          const double walk = p.decay == linear_decay::fixed && x == 3 ? static_cast<double>(std::max<std::int64_t>(1, p.b * p.t))
                              : x >= 5                                 ? std::sqrt(static_cast<double>(std::max<std::int64_t>(1, p.b * p.t)))
                                                                       : 1.0;
          if (!(e <= 2 * ne + walk * 16 * k_eps32 * (x < 5 ? M : MW))) {
            notes.push_back(std::string(names[x]) + " outside the tolerance rule");
            pass = false;
          }
        }
        bms = kb.ms;
      }
    }
    all = all && pass;
    std::printf("%-56s | %9.3f %10.2e %10.2e | %9.3f %10.2e %10.2e | %s\n", p.text.substr(0, 56).c_str(), k.ms, err, naive_err, bms, gerr, gnaive,
                pass ? "PASS" : "FAIL");
    for (const std::string& note : notes) std::printf("    %s\n", note.c_str());
  }
  std::printf("%s\n", all ? "all PASS" : "some FAIL");
  return all ? k_exit_ok : k_exit_fail;
}

}  // namespace omniattn::cli
