// `omniattn bench --linear`: the linear-attention family (linear.h) at fla's shapes, against the softmax forward kernel
// of the same length, heads and head dim (causal), on the same threads.
//   tokens/s = B * N / median forward time ("constant speed": flat across N);
//   GFLOP/s  = the chunked algorithm's FLOPs / time, per (batch, head) and chunk of n tokens: n (n + 1) (K + V) for
//              the masked intra-chunk products (QK^T and AV over the causal pairs) + 4 n K V for the inter-chunk read
//              (Q S) and the state update (K^T V); %peak against the fp32 FMA peak of the thread count;
//   bwd      = linear_attention_backward (dq, dk, dv and dg) on the same inputs, x fwd its time over the forward's;
//   softmax  = attention() causal on [B, N, H, K] (FlashAttention's FLOPs would be 4 * N (N + 1) / 2 * B * H * K),
//              x = its time over the linear forward's (> 1: linear is faster); the crossover is the first N where
//              linear wins (CAB's efficiency length);
//   decode   = one token advanced with the state read and written in place (linear_attention with T = 1 and
//              initial_state = final_state), median latency, and the state bytes it streams (read + write) per second.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "bench/measure.h"
#include "omniattn/omniattn.h"

namespace omniattn::bench {
namespace {

bool parse_list(const std::string& s, std::vector<std::int64_t>& out) {
  out.clear();
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(x.c_str(), &end, 10);
    if (x.empty() || *end != '\0' || v <= 0) return false;
    out.push_back(v);
  }
  return !out.empty();
}

int usage(const std::string& msg) {
  if (!msg.empty()) std::fprintf(stderr, "omniattn bench --linear: %s\n", msg.c_str());
  std::fprintf(stderr,
               "usage: omniattn bench --linear [--n 256,1024,4096,16384,65536] [--threads 2] [--batch 1] [--heads 8] [--k 128]\n"
               "                      [--v 128] [--decay none,scalar,channel] [--chunk 64] [--softmax-max N] [--no-backward]\n"
               "                      [--budget SECONDS] [--no-cache]\n"
               "Ends with the composed forms (Hedgehog, Performer, ViG, Flowformer) at N = min(4096, largest N) against the\n"
               "plain causal call.\n");
  return 2;
}

timing time_call(const std::function<void()>& fn, double budget, int min_reps = 3) {
  measure_policy policy;
  policy.budget_s = budget;
  policy.min_reps = min_reps;
  policy.max_reps = 50;
  policy.cap_s = 120;
  return measure(fn, policy);
}

linear_decay parse_decay(const std::string& s, bool& ok) {
  ok = true;
  for (linear_decay d : {linear_decay::none, linear_decay::fixed, linear_decay::scalar, linear_decay::channel})
    if (s == linear_decay_name(d)) return d;
  ok = false;
  return linear_decay::none;
}

}  // namespace

double linear_chunked_flops(std::int64_t batch, std::int64_t heads, std::int64_t n, std::int64_t chunk, std::int64_t K, std::int64_t V) {
  double f = 0;
  for (std::int64_t t0 = 0; t0 < n; t0 += chunk) {
    const double c = static_cast<double>(std::min(chunk, n - t0));
    f += c * (c + 1) * static_cast<double>(K + V) + 4.0 * c * static_cast<double>(K * V);
  }
  return f * static_cast<double>(batch * heads);
}

int linear_main(int argc, char** argv) {
  std::vector<std::int64_t> ns = {256, 1024, 4096, 16384, 65536}, threads = {2};
  std::int64_t batch = 1, heads = 8, K = 128, V = 128, chunk = 64, softmax_max = 16384;
  std::vector<linear_decay> decays = {linear_decay::none, linear_decay::scalar, linear_decay::channel};
  double budget = 1.0;
  bool backward = true, use_cache = true;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has = i + 1 < argc;
    std::vector<std::int64_t> one;
    if (a == "--linear") continue;
    if (a == "--n" && has) {
      if (!parse_list(argv[++i], ns)) return usage("--n expects positive integers separated by ','");
    } else if (a == "--threads" && has) {
      if (!parse_list(argv[++i], threads)) return usage("--threads expects positive integers separated by ','");
    } else if ((a == "--batch" || a == "--heads" || a == "--k" || a == "--v" || a == "--chunk" || a == "--softmax-max") && has) {
      if (!parse_list(argv[++i], one) || one.size() != 1) return usage(a + " expects one positive integer");
      (a == "--batch" ? batch : a == "--heads" ? heads : a == "--k" ? K : a == "--v" ? V : a == "--chunk" ? chunk : softmax_max) = one[0];
    } else if (a == "--decay" && has) {
      decays.clear();
      std::stringstream ss(argv[++i]);
      std::string x;
      while (std::getline(ss, x, ',')) {
        bool ok = false;
        decays.push_back(parse_decay(x, ok));
        if (!ok) return usage("--decay expects none, fixed, scalar or channel");
      }
    } else if (a == "--budget" && has) {
      budget = std::strtod(argv[++i], nullptr);
      if (!(budget > 0)) return usage("--budget expects a positive number of seconds");
    } else if (a == "--no-backward") {
      backward = false;
    } else if (a == "--no-cache") {
      use_cache = false;
    } else {
      return usage("unknown or incomplete argument '" + a + "'");
    }
  }
  std::vector<int> thread_counts;
  for (std::int64_t t : threads) thread_counts.push_back(static_cast<int>(t));
  std::string note;
  const std::vector<machine_peak> peaks = machine_peaks(thread_counts, use_cache, isa_name(), note);
  if (!note.empty()) std::fprintf(stderr, "omniattn bench: note: %s\n", note.c_str());
  std::printf("omniattn bench --linear   isa=%s   cpu=%s   B=%lld H=%lld K=%lld V=%lld chunk=%lld f32\n", isa_name(), cpu_model().c_str(),
              static_cast<long long>(batch), static_cast<long long>(heads), static_cast<long long>(K), static_cast<long long>(V),
              static_cast<long long>(chunk));
  for (std::size_t i = 0; i < peaks.size(); ++i)
    std::printf("peak with %d thread(s): fp32 FMA %.0f GFLOP/s (%s)\n", peaks[i].threads, peaks[i].fp32_fma_gflops, peaks[i].source.c_str());
  std::printf("\ntokens/s = B*N / median forward time; GFLOP/s = the chunked algorithm's FLOPs (n(n+1)(K+V) + 4nKV per chunk of n\n"
              "tokens, per head) / time; bwd = linear_attention_backward, x fwd = its time / the forward's; softmax = attention()\n"
              "causal on the same [B, N, H, K] (up to --softmax-max), x = softmax time / linear forward time (> 1: linear wins)\n\n");
  std::printf("%-7s %6s %3s | %9s %10s %8s %6s | %9s %6s | %10s %7s | %8s\n", "decay", "N", "thr", "fwd ms", "tokens/s", "GFLOP/s", "%peak",
              "bwd ms", "x fwd", "softmax ms", "x", "mem MiB");
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(-0.1f, 0.0f);
  const std::int64_t nmax = *std::max_element(ns.begin(), ns.end());
  std::vector<float> q(static_cast<std::size_t>(batch * nmax * heads * K)), k(q.size()), v(static_cast<std::size_t>(batch * nmax * heads * V)),
      g(q.size());
  for (float& x : q) x = 0.1f * nd(rng);
  for (float& x : k) x = 0.1f * nd(rng);
  for (float& x : v) x = nd(rng);
  for (float& x : g) x = ud(rng);
  std::vector<float> head_g(static_cast<std::size_t>(heads));
  for (std::int64_t h = 0; h < heads; ++h) head_g[static_cast<std::size_t>(h)] = std::log(1.0f - std::exp2(-5.0f - static_cast<float>(h)));
  std::vector<double> softmax_ms(ns.size() * threads.size(), NAN);
  for (std::size_t ti = 0; ti < threads.size(); ++ti) {
    const int thr = static_cast<int>(threads[ti]);
    for (linear_decay decay : decays) {
      std::int64_t crossover = 0;
      for (std::size_t ni = 0; ni < ns.size(); ++ni) {
        const std::int64_t n = ns[ni];
        const tensor tq = make_bshd(q.data(), dtype::f32, batch, n, heads, K), tk = make_bshd(k.data(), dtype::f32, batch, n, heads, K),
                     tv = make_bshd(v.data(), dtype::f32, batch, n, heads, V);
        std::vector<float> out(static_cast<std::size_t>(batch * n * heads * V));
        const tensor to = make_bshd(out.data(), dtype::f32, batch, n, heads, V);
        linear_spec s;
        s.decay = decay;
        s.head_log_decay = head_g;
        s.g = make_bshd(g.data(), dtype::f32, batch, n, heads, decay == linear_decay::channel ? K : 1);
        linear_options o;
        o.threads = thr;
        o.chunk = chunk;
        reset_peak_rss();
        if (const status st = linear_attention(tq, tk, tv, to, s, o); !st.ok()) {
          std::fprintf(stderr, "%s\n", st.error.c_str());
          return 1;
        }
        const timing tf = time_call([&] { linear_attention(tq, tk, tv, to, s, o); }, budget);
        const double gflops = linear_chunked_flops(batch, heads, n, chunk, K, V) / tf.median_s / 1e9;
        std::printf("%-7s %6lld %3d | %9.2f %10.0f %8.1f %5.1f%% |", linear_decay_name(decay), static_cast<long long>(n), thr, tf.median_s * 1e3,
                    static_cast<double>(batch * n) / tf.median_s, gflops, 100.0 * gflops / peaks[ti].fp32_fma_gflops);
        if (backward) {
          std::vector<float> dq(q.size()), dk(q.size()), dv(out.size()), dg(q.size());
          linear_grads gr;
          gr.dq = make_bshd(dq.data(), dtype::f32, batch, n, heads, K);
          gr.dk = make_bshd(dk.data(), dtype::f32, batch, n, heads, K);
          gr.dv = make_bshd(dv.data(), dtype::f32, batch, n, heads, V);
          std::vector<float> d_head(static_cast<std::size_t>(heads));
          if (decay == linear_decay::scalar || decay == linear_decay::channel)
            gr.dg = make_bshd(dg.data(), dtype::f32, batch, n, heads, decay == linear_decay::channel ? K : 1);
          if (decay == linear_decay::fixed) gr.d_head_log_decay = d_head;
          const tensor d_out = make_bshd(v.data(), dtype::f32, batch, n, heads, V);  // any upstream gradient
          if (const status st = linear_attention_backward(tq, tk, tv, d_out, s, gr, o); !st.ok()) {
            std::fprintf(stderr, "%s\n", st.error.c_str());
            return 1;
          }
          const timing tb = time_call([&] { linear_attention_backward(tq, tk, tv, d_out, s, gr, o); }, budget, 1);
          std::printf(" %9.2f %5.2fx |", tb.median_s * 1e3, tb.median_s / tf.median_s);
        } else {
          std::printf(" %9s %6s |", "-", "-");
        }
        double& sm = softmax_ms[ti * ns.size() + ni];
        if (n <= softmax_max) {
          if (std::isnan(sm)) {
            spec sp;
            sp.causal = causal_mode::bottom_right;
            options so;
            so.threads = thr;
            const tensor sv = make_bshd(v.data(), dtype::f32, batch, n, heads, V);
            if (const status st = attention(tq, tk, sv, to, sp, so); !st.ok()) {
              std::fprintf(stderr, "%s\n", st.error.c_str());
              return 1;
            }
            sm = time_call([&] { attention(tq, tk, sv, to, sp, so); }, budget, 1).median_s * 1e3;
          }
          const double x = sm / (tf.median_s * 1e3);
          if (x > 1.0 && crossover == 0) crossover = n;
          std::printf(" %10.2f %6.2fx |", sm, x);
        } else {
          std::printf(" %10s %7s |", "-", "-");
        }
        std::printf(" %8.0f\n", peak_rss_mib());
        std::fflush(stdout);
      }
      if (crossover) std::printf("  -> decay %s, %d thread(s): linear beats softmax from N = %lld on (of the lengths run)\n",
                                 linear_decay_name(decay), thr, static_cast<long long>(crossover));
      else std::printf("  -> decay %s, %d thread(s): softmax is faster at every length run up to --softmax-max\n", linear_decay_name(decay), thr);
    }
    // The decode step: one token, the state advanced in place.
    std::vector<float> state(static_cast<std::size_t>(batch * heads * K * V), 0.0f), out(static_cast<std::size_t>(batch * heads * V));
    const state_tensor st = make_state(state.data(), batch, heads, K, V);
    for (linear_decay decay : decays) {
      linear_spec s;
      s.decay = decay;
      s.head_log_decay = head_g;
      s.g = make_bshd(g.data(), dtype::f32, batch, 1, heads, decay == linear_decay::channel ? K : 1);
      linear_options o;
      o.threads = thr;
      o.chunk = chunk;
      o.initial_state = &st;
      o.final_state = &st;
      const tensor tq = make_bshd(q.data(), dtype::f32, batch, 1, heads, K), tk = make_bshd(k.data(), dtype::f32, batch, 1, heads, K),
                   tv = make_bshd(v.data(), dtype::f32, batch, 1, heads, V), to = make_bshd(out.data(), dtype::f32, batch, 1, heads, V);
      if (const status e = linear_attention(tq, tk, tv, to, s, o); !e.ok()) {
        std::fprintf(stderr, "%s\n", e.error.c_str());
        return 1;
      }
      const timing td = time_call([&] { linear_attention(tq, tk, tv, to, s, o); }, std::min(budget, 0.5));
      const double bytes = 2.0 * static_cast<double>(state.size()) * 4.0;
      std::printf("decode step, decay %-7s %d thread(s): %8.1f us per token (B=%lld, H=%lld), state %.1f GB/s read + write\n",
                  linear_decay_name(decay), thr, td.median_s * 1e6, static_cast<long long>(batch), static_cast<long long>(heads),
                  bytes / td.median_s / 1e9);
    }
    // The composed forms at one length, against the plain causal call: Hedgehog's and Performer's projected maps
    // (K -> K features), ViG's bidirectional form, Flowformer's flow form.
    const std::int64_t n = std::min<std::int64_t>(4096, nmax);
    std::vector<float> hedgehog(static_cast<std::size_t>(heads * K * K));
    for (float& x : hedgehog) x = nd(rng) / std::sqrt(static_cast<float>(K));
    const std::vector<float> performer = performer_projection(heads, K, K, 1);
    struct form {
      const char* name;
      linear_spec s;
    };
    std::vector<form> forms(5);
    forms[0].name = "causal (the plain call)";
    forms[1] = {"hedgehog: exp after a K -> K projection", {}};
    forms[1].s.phi = feature_map::exp;
    forms[1].s.projection = {hedgehog, {}, heads, K};
    forms[2] = {"performer: K random features, normalized", {}};
    forms[2].s.phi = feature_map::performer;
    forms[2].s.projection = {performer, {}, heads, K};
    forms[2].s.causal = false;
    forms[2].s.normalize = true;
    forms[2].s.scale = 1.0;
    forms[3] = {"vig: bidirectional, scalar gates each way", {}};
    forms[3].s.causal = false;
    forms[3].s.decay = linear_decay::scalar;
    forms[3].s.g = make_bshd(g.data(), dtype::f32, batch, n, heads, 1);
    forms[3].s.g_backward = make_bshd(g.data() + batch * n * heads, dtype::f32, batch, n, heads, 1);
    forms[4] = {"flowformer: sigmoid features, flow", {}};
    forms[4].s.causal = false;
    forms[4].s.flow = true;
    forms[4].s.phi = feature_map::sigmoid;
    forms[4].s.scale = 1.0;
    std::printf("\ncomposed forms, N=%lld, %d thread(s) (x = time / the plain causal call's)\n", static_cast<long long>(n), thr);
    std::printf("%-42s | %9s %6s | %9s %6s\n", "form", "fwd ms", "x", "bwd ms", "x");
    const tensor tq = make_bshd(q.data(), dtype::f32, batch, n, heads, K), tk = make_bshd(k.data(), dtype::f32, batch, n, heads, K),
                 tv = make_bshd(v.data(), dtype::f32, batch, n, heads, V);
    std::vector<float> fo(static_cast<std::size_t>(batch * n * heads * V)), dq(static_cast<std::size_t>(batch * n * heads * K)), dk(dq.size()),
        dv(fo.size());
    const tensor to = make_bshd(fo.data(), dtype::f32, batch, n, heads, V);
    linear_grads gr;
    gr.dq = make_bshd(dq.data(), dtype::f32, batch, n, heads, K);
    gr.dk = make_bshd(dk.data(), dtype::f32, batch, n, heads, K);
    gr.dv = make_bshd(dv.data(), dtype::f32, batch, n, heads, V);
    linear_options o;
    o.threads = thr;
    o.chunk = chunk;
    double base_f = 0, base_b = 0;
    for (const form& f : forms) {
      if (const status st = linear_attention(tq, tk, tv, to, f.s, o); !st.ok()) {
        std::fprintf(stderr, "%s\n", st.error.c_str());
        return 1;
      }
      const double tf = time_call([&] { linear_attention(tq, tk, tv, to, f.s, o); }, budget).median_s;
      const double tb = backward ? time_call([&] { linear_attention_backward(tq, tk, tv, to, f.s, gr, o); }, budget).median_s : NAN;
      if (base_f == 0) {
        base_f = tf;
        base_b = tb;
      }
      std::printf("%-42s | %9.2f %5.2fx | %9.2f %5.2fx\n", f.name, tf * 1e3, tf / base_f, tb * 1e3, tb / base_b);
    }
  }
  return 0;
}

}  // namespace omniattn::bench
