// omniattn check: runs problems on a backend, on the fp64 oracle and on the naive f32 path, and compares; then the
// backward (attention_backward) of each problem the same way, against the fp64 oracle backward and the naive float one.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "cli.h"

namespace omniattn::cli {
namespace {

// The default suite: every feature at least once, sizes small enough that the fp64 oracle and the naive path
// (both O(Lq Lk D) plain loops) finish the whole suite in a few seconds on two cores.
const char* const k_default_suite[] = {
    "b=2,n=128,h=4,d=64",                                                    // f32 MHA
    "b=1,n=256,hq=8,hkv=2,d=64,dtype=bf16,causal=bottom_right",              // bf16 GQA causal
    "b=2,n=200,hq=4,hkv=1,d=80,dtype=f16,causal=top_left",                   // f16 MQA causal top_left
    "b=1,lq=97,lk=300,h=4,d=64,causal=bottom_right",                         // cross attention Lq < Lk
    "b=2,lq=150,lk=70,h=2,d=32,dtype=bf16,causal=bottom_right",              // Lq > Lk: fully masked rows
    "b=2,lq=64,lk=129,hq=6,hkv=3,d=96,dv=40",                                // dim_v != dim_qk
    "varlen=97:97/1:33/130:64/0:5/20:0,hq=4,hkv=2,d=64,dtype=bf16,causal=bottom_right",  // varlen, empty sequences
    "b=2,n=97,h=3,d=48,dtype=f16,layout=bhsd,causal=top_left",               // bhsd layout, odd length
    "b=3,lq=1,lk=97,h=2,d=17,dv=1",                                          // decode step, odd dims
    "b=1,n=65,h=2,d=256,dtype=bf16,out=f32,scale=0.3",                       // f32 output from bf16, custom scale
};

constexpr int k_min_runs = 3, k_max_runs = 5;
constexpr double k_time_budget_ms = 50.0, k_slow_ms = 250.0;

struct row_result {
  std::string kernel = "-";
  double ms = std::numeric_limits<double>::quiet_NaN();
  double err = std::numeric_limits<double>::quiet_NaN();
  double naive_err = std::numeric_limits<double>::quiet_NaN();
  double lse_err = std::numeric_limits<double>::quiet_NaN();
  bool pass = false;
  std::vector<std::string> notes;  // why it failed (printed after the table)
};

std::int64_t total_q(const problem& p) {
  if (!p.is_varlen()) return p.seq_q;
  std::int64_t t = 0;
  for (std::int64_t l : p.seqlens_q) t += l;
  return t;
}

struct out_compare {
  double max_err = 0.0;  // max |a - ref|, NaN if a holds a NaN
  double max_ref = 0.0;  // max |ref|
  std::int64_t nans = 0;
};

out_compare compare_out(const problem_data& a, const problem_data& ref) {
  const problem& p = a.prob;
  const std::int64_t tb = p.is_varlen() ? 1 : p.batch, tq = total_q(p);
  out_compare c;
  for (std::int64_t b = 0; b < tb; ++b)
    for (std::int64_t s = 0; s < tq; ++s)
      for (std::int64_t h = 0; h < p.heads_q; ++h)
        for (std::int64_t d = 0; d < p.dim_v; ++d) {
          const double x = a.out_at(b, s, h, d), r = ref.out_at(b, s, h, d);
          c.max_ref = std::max(c.max_ref, std::abs(r));
          if (std::isnan(x)) ++c.nans;
          else c.max_err = std::max(c.max_err, std::abs(x - r));
        }
  if (c.nans) c.max_err = std::numeric_limits<double>::quiet_NaN();
  return c;
}

enum class fp_class { finite, pos_inf, neg_inf, nan };

fp_class classify(float x) {
  if (std::isnan(x)) return fp_class::nan;
  if (std::isinf(x)) return x > 0 ? fp_class::pos_inf : fp_class::neg_inf;
  return fp_class::finite;
}

const char* class_name(fp_class c) {
  switch (c) {
    case fp_class::finite: return "finite";
    case fp_class::pos_inf: return "+inf";
    case fp_class::neg_inf: return "-inf";
    case fp_class::nan: return "NaN";
  }
  return "?";
}

// LSE: max error where both are finite; any difference in the finite/inf/NaN pattern is reported as a note.
double compare_lse(const problem_data& a, const problem_data& ref, std::vector<std::string>& notes) {
  const problem& p = a.prob;
  const std::int64_t tb = p.is_varlen() ? 1 : p.batch, tq = total_q(p);
  const auto n = static_cast<std::size_t>(tb * p.heads_q * tq);
  double err = 0.0;
  std::size_t mismatches = 0, first = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const fp_class ca = classify(a.lse[i]), cr = classify(ref.lse[i]);
    if (ca != cr) {
      if (mismatches++ == 0) first = i;
    } else if (ca == fp_class::finite) {
      err = std::max(err, std::abs(static_cast<double>(a.lse[i]) - static_cast<double>(ref.lse[i])));
    }
  }
  if (mismatches) {
    const std::size_t row = first % static_cast<std::size_t>(tq), rest = first / static_cast<std::size_t>(tq);
    char buf[200];
    std::snprintf(buf, sizeof buf, "LSE finite/inf/NaN pattern differs from the oracle in %zu of %zu rows (first: batch %zu, head %zu, row %zu: %s, oracle %s)",
                  mismatches, n, rest / static_cast<std::size_t>(p.heads_q), rest % static_cast<std::size_t>(p.heads_q),
                  row, class_name(classify(a.lse[first])), class_name(classify(ref.lse[first])));
    notes.emplace_back(buf);
  }
  return err;
}

status run_naive(problem_data& data, const spec& s, int threads) {
  options o = data.make_options(backend::reference, threads);
  const lse_tensor l = data.lse_view();
  if (data.prob.lse) o.lse = &l;
  attn_params p;
  if (status st = make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, o, p); !st) return st;
  naive_attention_f32(p);
  return {};
}

row_result check_problem(const problem& prob, backend use, int threads, const mask_expr& mask) {
  row_result r;
  if (const status st = check_footprint(prob); !st) {
    r.notes.push_back(st.error);
    return r;
  }
  const spec s = make_spec(prob, mask);

  problem_data data(prob);
  {  // the kernel name, as attention() will select it
    options o = data.make_options(use, threads);
    attn_params p;
    if (make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, o, p)) {
      p.threads = resolved_threads(threads);
      const selection sel = select(p, use);
      if (sel.ok()) r.kernel = sel.name;
    }
  }
  // Time: the best of a few runs, which hides thread start-up and a busy machine: at least k_min_runs unless the
  // first run alone exceeds k_slow_ms, then more while under k_time_budget_ms, at most k_max_runs.
  // The kernels are deterministic, so the last run's output is the one checked.
  double spent_ms = 0.0;
  const auto want_another = [&](int run) {
    if (run == 0) return true;
    if (run >= k_max_runs) return false;
    return spent_ms < k_time_budget_ms || (run < k_min_runs && r.ms < k_slow_ms);
  };
  for (int run = 0; want_another(run); ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    const status st = run_problem(data, s, use, threads);
    const auto t1 = std::chrono::steady_clock::now();
    if (!st) {
      r.notes.push_back(st.error);
      return r;
    }
    const double ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    r.ms = run == 0 ? ms : std::min(r.ms, ms);
    spent_ms += ms;
  }

  // The oracle writes f32 whatever the problem's output dtype, so the reference itself is not rounded to bf16/f16.
  problem oracle_prob = prob;
  oracle_prob.out_f32 = true;
  problem_data oracle(oracle_prob);
  if (oracle.q != data.q || oracle.k != data.k || oracle.v != data.v) {
    r.notes.emplace_back("internal: the oracle's seeded inputs differ from the kernel's");
    return r;
  }
  if (const status so = run_problem(oracle, s, backend::reference, 1); !so) {
    r.notes.push_back("oracle: " + so.error);
    return r;
  }
  problem_data naive(prob);
  if (const status sn = run_naive(naive, s, threads); !sn) {
    r.notes.push_back("naive: " + sn.error);
    return r;
  }

  const out_compare kc = compare_out(data, oracle), nc = compare_out(naive, oracle);
  r.err = kc.max_err;
  r.naive_err = nc.max_err;
  const double floor = dtype_epsilon(prob.out_f32 ? dtype::f32 : prob.type) * kc.max_ref;
  bool ok = true;
  if (kc.nans) {
    r.notes.push_back("output holds " + group_digits(kc.nans) + " NaN(s)");
    ok = false;
  } else if (!(kc.max_err <= 2.0 * nc.max_err + floor)) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "max error %.3e > 2 * naive %.3e + floor %.3e", kc.max_err, nc.max_err, floor);
    r.notes.emplace_back(buf);
    ok = false;
  }
  if (prob.lse) {
    const std::size_t before = r.notes.size();
    r.lse_err = compare_lse(data, oracle, r.notes);
    ok = ok && r.notes.size() == before;
  }
  r.pass = ok;
  return r;
}

// ---- backward ----

// Gradient tolerance, the tests' rule (tests/tolerance.h, check_backward): per gradient G of dq, dk, dv
//   max|kernel.G - oracle.G| <= 2 * max|naive.G - oracle.G| + k_grad_floor_eps * u * M
// with u the gradients' dtype unit and M the largest |oracle gradient| of the call (over dq, dk, dv).
constexpr double k_grad_floor_eps = 4.0;

struct backward_result {
  std::string kernel = "-";
  double ms = std::numeric_limits<double>::quiet_NaN();
  double err[3], naive_err[3];
  bool pass = false;
  std::vector<std::string> notes;
  backward_result() { std::fill(std::begin(err), std::end(err), ms), std::fill(std::begin(naive_err), std::end(naive_err), ms); }
};

struct grad_compare {
  double max_err = 0.0, max_ref = 0.0;  // max |a - ref| (NaN when a holds NaN or inf), max |ref|
  std::int64_t bad = 0;                 // non-finite values in a
};

grad_compare compare_grad(const backward_data& a, const backward_data& ref, int which) {
  const tensor t = which == 0 ? a.dq_view() : which == 1 ? a.dk_view() : a.dv_view();
  grad_compare c;
  for (std::int64_t b = 0; b < t.batch; ++b)
    for (std::int64_t s = 0; s < t.seq; ++s)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.dim; ++d) {
          const double x = a.grad_at(which, b, s, h, d), r = ref.grad_at(which, b, s, h, d);
          c.max_ref = std::max(c.max_ref, std::abs(r));
          if (!std::isfinite(x)) ++c.bad;
          else c.max_err = std::max(c.max_err, std::abs(x - r));
        }
  if (c.bad) c.max_err = std::numeric_limits<double>::quiet_NaN();
  return c;
}

// The backward of a problem: the backend's forward (out and lse), then its backward, against the oracle backward
// (fp64, f32 gradients) and the naive float backward (the problem's gradient dtype), all on the same seeded inputs
// and d_out.
backward_result check_backward_problem(const problem& prob0, backend use, int threads, const mask_expr& mask) {
  static const char* const names[3] = {"dq", "dk", "dv"};
  backward_result r;
  problem prob = prob0;
  prob.lse = true;  // the backward reads the forward's lse
  if (const status st = check_footprint(prob); !st) {
    r.notes.push_back(st.error);
    return r;
  }
  const spec s = make_spec(prob, mask);
  constexpr std::uint64_t grad_seed = 7;
  problem_data fwd(prob);
  if (const status st = run_problem(fwd, s, use, threads); !st) {
    r.notes.push_back("forward: " + st.error);
    return r;
  }
  backward_data got(prob, grad_seed);
  for (auto* g : {&got.dq, &got.dk, &got.dv}) std::fill(g->begin(), g->end(), std::uint8_t{0x7f});  // unwritten: NaN
  {
    options o = fwd.make_options(use, threads);
    attn_bwd_params p;
    if (make_backward_params(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(), got.d_out_view(),
                             got.grads(false), s, o, p)) {
      p.fwd.threads = resolved_threads(threads);
      const backward_selection sel = select_backward(p, use);
      if (sel.ok()) r.kernel = sel.name;
    }
  }
  for (int run = 0; run < k_min_runs; ++run) {  // deterministic: the last run's gradients are the ones checked
    const auto t0 = std::chrono::steady_clock::now();
    const status st = run_backward_problem(fwd, got, s, use, threads);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!st) {
      r.notes.push_back(st.error);
      return r;
    }
    r.ms = run == 0 ? ms : std::min(r.ms, ms);
    if (ms > k_slow_ms) break;
  }
  problem oracle_prob = prob;
  oracle_prob.out_f32 = true;  // f32 gradients: the oracle's result is not rounded to bf16 / f16
  const problem_data ofwd(oracle_prob);
  backward_data oracle(oracle_prob, grad_seed);
  if (const status so = run_backward_problem(ofwd, oracle, s, backend::reference, 1); !so) {
    r.notes.push_back("oracle backward: " + so.error);
    return r;
  }
  const problem_data nfwd(prob);
  backward_data naive(prob, grad_seed);
  if (const status sn = run_naive_backward(nfwd, naive, s); !sn) {
    r.notes.push_back("naive backward: " + sn.error);
    return r;
  }
  grad_compare kc[3], nc[3];
  double magnitude = 0.0;
  for (int w = 0; w < 3; ++w) {
    kc[w] = compare_grad(got, oracle, w);
    nc[w] = compare_grad(naive, oracle, w);
    magnitude = std::max(magnitude, nc[w].max_ref);
    r.err[w] = kc[w].max_err;
    r.naive_err[w] = nc[w].max_err;
  }
  bool ok = true;
  for (int w = 0; w < 3; ++w) {
    const double tol = 2.0 * nc[w].max_err + k_grad_floor_eps * dtype_epsilon(got.grad_type()) * magnitude;
    if (kc[w].bad) {
      r.notes.push_back(std::string(names[w]) + " holds " + group_digits(kc[w].bad) + " NaN or inf value(s)");
      ok = false;
    } else if (!(kc[w].max_err <= tol)) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "%s: max error %.3e > 2 * naive %.3e + floor %.3e", names[w], kc[w].max_err, nc[w].max_err,
                    tol - 2.0 * nc[w].max_err);
      r.notes.emplace_back(buf);
      ok = false;
    }
  }
  r.pass = ok;
  return r;
}

std::string fmt(const char* format, double x) {
  if (std::isnan(x)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, format, x);
  return buf;
}

std::string ratio(double err, double naive) {
  if (std::isnan(err) || std::isnan(naive)) return "-";
  if (naive == 0.0) return err == 0.0 ? "0.00" : "inf";
  return fmt("%.2f", err / naive);
}

}  // namespace

int run_check(const command_line& cl) {
  std::vector<std::string> texts = cl.problems;
  if (texts.empty()) texts.assign(std::begin(k_default_suite), std::end(k_default_suite));
  std::vector<problem> probs;
  std::string error;
  if (!parse_problems(texts, probs, error, cl.score)) {
    std::cerr << "omniattn check: " << error << "\n";
    return k_exit_usage;
  }

  std::size_t name_w = 7;
  std::vector<std::string> names;
  for (const problem& p : probs) {
    names.push_back(short_name(p));
    name_w = std::max(name_w, names.back().size());
  }
  const int nw = static_cast<int>(name_w);
  std::printf("omniattn check: %zu problem(s), backend %s, %d thread(s); oracle = fp64 reference\n\n", probs.size(),
              backend_name(cl.use), resolved_threads(cl.threads));
  std::printf("%3s  %-*s  %-20s %9s  %9s  %9s  %6s  %9s  %s\n", "#", nw, "problem", "kernel", "best ms", "max err",
              "naive err", "ratio", "lse err", "status");
  std::printf("%s\n", std::string(3 + 2 + name_w + 2 + 20 + 1 + 9 + 2 + 9 + 2 + 9 + 2 + 6 + 2 + 9 + 2 + 6, '-').c_str());
  std::fflush(stdout);

  std::size_t passed = 0;
  std::vector<std::pair<std::size_t, std::string>> notes;
  for (std::size_t i = 0; i < probs.size(); ++i) {
    const row_result r = check_problem(probs[i], cl.use, cl.threads, cl.mask);
    std::printf("%3zu  %-*s  %-20s %9s  %9s  %9s  %6s  %9s  %s\n", i + 1, nw, names[i].c_str(), r.kernel.c_str(),
                fmt("%.3f", r.ms).c_str(), fmt("%.2e", r.err).c_str(), fmt("%.2e", r.naive_err).c_str(),
                ratio(r.err, r.naive_err).c_str(), fmt("%.2e", r.lse_err).c_str(), r.pass ? "PASS" : "FAIL");
    std::fflush(stdout);
    passed += r.pass;
    for (const std::string& n : r.notes) notes.emplace_back(i + 1, n);
  }

  // The backward of every problem, same inputs.
  std::printf("\nbackward (attention_backward on the forward's out and lse): dq, dk, dv vs the fp64 oracle backward and\n"
              "the naive float backward\n\n");
  std::printf("%3s  %-*s  %-20s %9s  %9s  %9s  %9s  %9s  %6s  %s\n", "#", nw, "problem", "kernel", "best ms", "dq err", "dk err",
              "dv err", "naive err", "ratio", "status");
  std::printf("%s\n", std::string(3 + 2 + name_w + 2 + 20 + 1 + 9 + 2 + 9 + 2 + 9 + 2 + 9 + 2 + 9 + 2 + 6 + 2 + 6, '-').c_str());
  std::fflush(stdout);
  std::size_t bwd_passed = 0;
  std::vector<std::pair<std::size_t, std::string>> bwd_notes;
  for (std::size_t i = 0; i < probs.size(); ++i) {
    const backward_result r = check_backward_problem(probs[i], cl.use, cl.threads, cl.mask);
    // The naive path's largest error and the worst kernel / naive ratio over dq, dk, dv ("-" where one is missing).
    double naive = 0.0, worst = 0.0;
    bool missing = false, infinite = false;
    for (int w = 0; w < 3; ++w) {
      if (std::isnan(r.err[w]) || std::isnan(r.naive_err[w])) {
        missing = true;
        continue;
      }
      naive = std::max(naive, r.naive_err[w]);
      if (r.naive_err[w] == 0.0) infinite = infinite || r.err[w] != 0.0;
      else worst = std::max(worst, r.err[w] / r.naive_err[w]);
    }
    if (missing) naive = std::numeric_limits<double>::quiet_NaN();
    const std::string ratios = missing ? "-" : infinite ? "inf" : fmt("%.2f", worst);
    std::printf("%3zu  %-*s  %-20s %9s  %9s  %9s  %9s  %9s  %6s  %s\n", i + 1, nw, names[i].c_str(), r.kernel.c_str(),
                fmt("%.3f", r.ms).c_str(), fmt("%.2e", r.err[0]).c_str(), fmt("%.2e", r.err[1]).c_str(),
                fmt("%.2e", r.err[2]).c_str(), fmt("%.2e", naive).c_str(), ratios.c_str(), r.pass ? "PASS" : "FAIL");
    std::fflush(stdout);
    bwd_passed += r.pass;
    for (const std::string& n : r.notes) bwd_notes.emplace_back(i + 1, "backward: " + n);
  }
  notes.insert(notes.end(), bwd_notes.begin(), bwd_notes.end());
  std::stable_sort(notes.begin(), notes.end(), [](const auto& a, const auto& b) { return a.first < b.first; });

  std::printf("\n%zu/%zu passed (forward), %zu/%zu passed (backward)\n", passed, probs.size(), bwd_passed, probs.size());
  if (!notes.empty()) {
    std::printf("\nfailures:\n");
    std::size_t last = 0;
    for (const auto& [idx, text] : notes) {
      if (idx != last) std::printf("  #%zu %s\n", idx, probs[idx - 1].describe().c_str());
      last = idx;
      std::string indented = text;  // attention() errors may span lines
      for (std::size_t at = indented.find('\n'); at != std::string::npos; at = indented.find('\n', at + 1))
        indented.insert(at + 1, "      ");
      std::printf("      %s\n", indented.c_str());
    }
  }
  std::printf("\nlegend: LQxLK, hHQ:HKV, dDQK:DV, tl/br = causal top_left/bottom_right; errors are max abs vs the oracle;\n"
              "backward ratio = the largest of err / naive err over dq, dk, dv\n");
  return passed == probs.size() && bwd_passed == probs.size() ? k_exit_ok : k_exit_fail;
}

}  // namespace omniattn::cli
