// `omniattn bench --kernel`: the fused kernel against the oracle, the naive f32 path and the OpenBLAS unfused path,
// all in one process, over op (forward, backward) x dense/causal (and --pattern masks) x D x N x dtype x threads.
// GFLOP/s use FLOPs = 2 * mask_area * (dim_qk + dim_v) (= 4 * mask_area * B * H * D for dim_v = dim_qk, mask_area
// counted over batches and heads) for the forward and 2.5x that for the backward (FlashAttention's count, ops.h);
// % of peak uses the fp32 FMA peak of the same thread count (measure.h, cached per machine). Time is the median of
// repetitions after one warm-up, run until a time budget is spent.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "bench/json.h"
#include "bench/measure.h"
#include "bench/ops.h"
#include "bench/suite.h"
#include "core/problem.h"
#include "core/storage.h"

namespace omniattn::bench {
namespace {

timing time_it(const std::function<void()>& fn, double budget_s, int min_reps) {
  measure_policy policy;
  policy.budget_s = budget_s;
  policy.min_reps = min_reps;
  policy.max_reps = 50;
  policy.cap_s = 1e9;
  return measure(fn, policy);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) if (!item.empty()) out.push_back(item);
  return out;
}

bool parse_ints(const std::string& s, std::vector<std::int64_t>& out) {
  out.clear();
  for (const std::string& x : split(s)) {
    char* end = nullptr;
    const long long v = std::strtoll(x.c_str(), &end, 10);
    if (*end != '\0' || v <= 0) return false;
    out.push_back(v);
  }
  return !out.empty();
}

// JSON has no NaN: a value that was not measured is null.
std::string number_or_null(double x) {
  if (!std::isfinite(x)) return "null";
  std::ostringstream ss;
  ss << x;
  return ss.str();
}

// One row of the table (and of --json); NaN: not measured.
struct kernel_row {
  op_kind op = op_kind::forward;
  std::string label, dtype, kernel, naive_kind;
  std::int64_t d = 0, n = 0;
  int threads = 1;
  timing fused;
  double flops = 0, gflops = 0, peak = 0, skipped = NAN, mem = 0, density = NAN, dense_ms = NAN;
  double oracle_gflops = NAN, naive_gflops = NAN, blas_gflops = NAN, err = NAN, blas_err = NAN;
  double x_dense() const { return dense_ms / (fused.median_s * 1e3); }
};

std::string cell(const char* format, double x) {
  if (!std::isfinite(x)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, format, x);
  return buf;
}

void print_row(const kernel_row& r, int label_width, bool against_dense) {
  std::printf("%-*s %-3s %-5s %4lld %6lld %3d | %9.2f %8.1f %5.0f%% %6s %8.0f |", label_width, r.label.c_str(),
              r.op == op_kind::backward ? "bwd" : "fwd", r.dtype.c_str(), static_cast<long long>(r.d),
              static_cast<long long>(r.n), r.threads, r.fused.median_s * 1e3, r.gflops, 100.0 * r.gflops / r.peak,
              (cell("%.1f", r.skipped) + (std::isfinite(r.skipped) ? "%" : "")).c_str(), r.mem);
  if (against_dense) {
    if (std::isnan(r.dense_ms)) std::printf(" %7.4f %9s %7s |", r.density, "-", "-");
    else std::printf(" %7.4f %9.2f %6.2fx |", r.density, r.dense_ms, r.x_dense());
  }
  std::printf(" %8s %8s %8s %7s | %9s %9s\n", cell("%.2f", r.oracle_gflops).c_str(), cell("%.2f", r.naive_gflops).c_str(),
              cell("%.1f", r.blas_gflops).c_str(), cell("%.2f", r.gflops / r.blas_gflops).c_str(), cell("%.2e", r.err).c_str(),
              cell("%.2e", r.blas_err).c_str());
  std::fflush(stdout);
}

void row_json(std::ostringstream& json, const kernel_row& r) {
  json << "    {\"op\": \"" << op_name(r.op) << "\", \"mask\": \"" << r.label << "\", \"tiles_skipped_pct\": " << number_or_null(r.skipped)
       << ", \"useful_flops\": " << json_number(r.flops) << ", \"dtype\": \"" << r.dtype << "\", \"d\": " << r.d << ", \"n\": " << r.n
       << ", \"threads\": " << r.threads << ", \"median_ms\": " << r.fused.median_s * 1e3 << ", \"min_ms\": " << r.fused.min_s * 1e3
       << ", \"max_ms\": " << r.fused.max_s * 1e3 << ", \"reps\": " << r.fused.reps << ", \"kernel\": \"" << r.kernel
       << "\", \"gflops\": " << r.gflops << ", \"peak_gflops\": " << r.peak << ", \"pct_peak\": " << number_or_null(100.0 * r.gflops / r.peak)
       << ", \"peak_rss_mib\": " << r.mem << ", \"openblas_gflops\": " << (std::isnan(r.blas_gflops) ? 0.0 : r.blas_gflops)
       << ", \"openblas_speedup\": " << number_or_null(r.gflops / r.blas_gflops)
       << ", \"naive_gflops\": " << (std::isnan(r.naive_gflops) ? 0.0 : r.naive_gflops) << ", \"naive_kind\": \"" << r.naive_kind
       << "\", \"oracle_gflops\": " << number_or_null(r.oracle_gflops) << ", \"max_abs_err\": " << number_or_null(r.err)
       << ", \"openblas_max_abs_err\": " << number_or_null(r.blas_err) << ", \"density\": " << r.density
       << ", \"dense_ms\": " << number_or_null(r.dense_ms) << ", \"x_dense\": " << number_or_null(r.x_dense()) << "}";
}

int usage(const char* msg) {
  if (msg) std::fprintf(stderr, "omniattn bench: %s\n", msg);
  std::fprintf(stderr,
               "usage: omniattn bench --kernel [--quick] [--op forward,backward] [--n 512,1024,...] [--d 64,128]\n"
               "                      [--dtype f32,bf16] [--threads 1,2] [--mask dense,causal|none] [--pattern SPEC]...\n"
               "                      [--heads 8] [--batch 1]\n"
               "                      [--budget SECONDS] [--no-baselines] [--no-cache] [--json FILE]\n");
  return 2;
}

}  // namespace

int kernel_main(int argc, char** argv) {
  std::vector<std::int64_t> ns = {512, 1024, 2048, 4096, 8192, 16384}, ds = {64, 128}, threads = {1, 2};
  std::vector<std::int64_t> heads = {8}, batch = {1};
  std::vector<std::string> dtypes = {"f32", "bf16"}, masks = {"dense", "causal"};
  std::vector<op_kind> ops = {op_kind::forward};
  double budget = 1.0;
  bool baselines = true, use_cache = true;
  std::string json_path;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--kernel") continue;
    if (a == "--help" || a == "-h") {
      usage(nullptr);
      return 0;
    }
    if (a == "--quick") {
      ns = {256, 1024};
      ds = {64, 128};
      budget = 0.2;
    } else if (a == "--no-cache") {
      use_cache = false;
    } else if (a == "--no-baselines") {
      baselines = false;
    } else if (a == "--n" && has_value) {
      if (!parse_ints(argv[++i], ns)) return usage("--n expects positive integers separated by ','");
    } else if (a == "--d" && has_value) {
      if (!parse_ints(argv[++i], ds)) return usage("--d expects positive integers separated by ','");
    } else if (a == "--threads" && has_value) {
      if (!parse_ints(argv[++i], threads)) return usage("--threads expects positive integers separated by ','");
    } else if (a == "--heads" && has_value) {
      if (!parse_ints(argv[++i], heads) || heads.size() != 1) return usage("--heads expects one positive integer");
    } else if (a == "--batch" && has_value) {
      if (!parse_ints(argv[++i], batch) || batch.size() != 1) return usage("--batch expects one positive integer");
    } else if (a == "--op" && has_value) {
      // forward (attention), backward (attention_backward) or both, in the order given.
      ops.clear();
      for (const std::string& o : split(argv[++i])) {
        op_kind op;
        if (!parse_op(o, op)) return usage("--op expects forward, backward or forward,backward");
        if (std::find(ops.begin(), ops.end(), op) == ops.end()) ops.push_back(op);
      }
      if (ops.empty()) return usage("--op expects forward, backward or forward,backward");
    } else if (a == "--dtype" && has_value) {
      dtypes = split(argv[++i]);
      for (const auto& t : dtypes) if (t != "f32" && t != "bf16" && t != "f16") return usage("--dtype expects f32, bf16, f16");
    } else if (a == "--mask" && has_value) {
      // "none": only the --pattern rows (a neighborhood pattern at N = its grid's tokens needs no dense row).
      masks = split(argv[++i]);
      if (masks.size() == 1 && masks[0] == "none") masks.clear();
      for (const auto& m : masks) if (m != "dense" && m != "causal") return usage("--mask expects dense, causal or none");
    } else if (a == "--pattern" && has_value) {
      // Any mask spec string (README grammar); repeatable. Its rows report useful GFLOP/s (mask area only), the
      // share of key tiles skipped, the time against the dense run of the shape, and OpenBLAS at the dense cost an
      // unfused path pays for any mask.
      mask_expr m;
      if (const std::string err = parse_mask(argv[++i], m); !err.empty()) return usage(("--pattern: " + err).c_str());
      masks.push_back(std::string("spec:") + argv[i]);
    } else if (a == "--budget" && has_value) {
      budget = std::strtod(argv[++i], nullptr);
      if (!(budget > 0)) return usage("--budget expects a positive number of seconds");
    } else if (a == "--json" && has_value) {
      json_path = argv[++i];
    } else {
      return usage(("unknown or incomplete argument '" + a + "'").c_str());
    }
  }

  // The same peaks as the suite: measured once per machine and thread count, cached (measure.h).
  std::vector<int> thread_counts;
  for (const std::int64_t t : threads) thread_counts.push_back(static_cast<int>(t));
  std::string peak_note;
  const std::vector<machine_peak> machine = machine_peaks(thread_counts, use_cache, isa_name(), peak_note);
  if (!peak_note.empty()) std::fprintf(stderr, "omniattn bench: note: %s\n", peak_note.c_str());
  std::vector<double> peaks, bf16_peaks;
  for (const machine_peak& mp : machine) {
    peaks.push_back(mp.fp32_fma_gflops);
    bf16_peaks.push_back(mp.bf16_dot_gflops);
  }
  // With --pattern rows the table compares every masked row (patterns, causal) with the dense run of its shape (issue
  // #4: time against the dense run); the dense row's time is reused when the table has it, else it is measured.
  const bool against_dense = std::any_of(masks.begin(), masks.end(), [](const std::string& m) { return m.rfind("spec:", 0) == 0; });
  std::printf("omniattn bench --kernel   isa=%s   openblas=%s\n", isa_name(), openblas_core());
  for (std::size_t i = 0; i < threads.size(); ++i)
    std::printf("peak with %lld thread(s): fp32 FMA %.0f GFLOP/s, bf16 dot %.0f GFLOP/s (%s)\n", static_cast<long long>(threads[i]),
                peaks[i], bf16_peaks[i], machine[i].source.c_str());
  std::printf("\nB=%lld H=%lld; GFLOP/s = 4*mask_area*B*H*D / median time; %%peak against the peak of the kernel's arithmetic\n"
              "(bf16 dot for bf16dot kernels, fp32 FMA otherwise); naive f32 for N<=1024 (for neighborhood / halo patterns:\n"
              "the naive per-query neighborhood baseline on the same threads, every N), oracle for N<=512\n",
              static_cast<long long>(batch[0]), static_cast<long long>(heads[0]));
  if (std::find(ops.begin(), ops.end(), op_kind::backward) != ops.end())
    std::printf("bwd rows: attention_backward; FLOPs 2.5x the forward's (FlashAttention's count: 10*mask_area*B*H*D); openblas =\n"
                "the unfused backward (sgemm S, softmax P, sgemm dV dP dQ dK, P and dS materialized, mask applied); max err =\n"
                "max |dq, dk, dv - fp64 oracle| (the whole oracle for N<=512, else sampled rows)\n");
  std::printf("blas err = the OpenBLAS path's own output (bwd: gradients) on sampled rows vs fp64\n");
  if (against_dense)
    std::printf("density = useful pairs / N^2; dense ms = the same shape without mask or causal flag (the dense row's, else "
                "run);\nx dense = dense ms / fused ms (> 1: faster than dense; ideal 1 / density)\n");
  std::printf("\n");
  // The mask column fits the longest label (pattern spec strings such as neighborhood(...) are long).
  int label_width = 22;
  for (const std::string& m : masks) label_width = std::max(label_width, static_cast<int>(m.size()) - (m.rfind("spec:", 0) == 0 ? 5 : 0));
  std::map<std::string, double> dense_ms_of;  // dtype|D|N|threads -> fused median ms without mask or causal flag
  std::printf("%-*s %-3s %-5s %4s %6s %3s | %9s %8s %6s %6s %8s |", label_width, "mask", "op", "dtype", "D", "N", "thr",
              "fused ms", "GFLOP/s", "%peak", "skip%", "mem MiB");
  if (against_dense) std::printf(" %7s %9s %7s |", "density", "dense ms", "x dense");
  std::printf(" %8s %8s %8s %7s | %9s %9s\n", "oracle", "naive", "openblas", "x blas", "max err", "blas err");
  std::ostringstream json;
  json << "{\n  \"isa\": \"" << isa_name() << "\",\n  \"rows\": [";
  bool first_row = true;
  const auto emit = [&](const kernel_row& r) {
    print_row(r, label_width, against_dense);
    json << (first_row ? "\n" : ",\n");
    row_json(json, r);
    first_row = false;
  };
  // The fused kernel's time on the shape without mask or causal flag: the dense row's when the table has it (dense
  // rows come first), else measured by `run_dense`.
  const auto dense_time = [&](const kernel_row& r, const std::string& mask, const std::function<double()>& run_dense) -> double {
    const std::string key = std::string(op_name(r.op)) + "|" + r.dtype + "|" + std::to_string(r.d) + "|" + std::to_string(r.n) +
                            "|" + std::to_string(r.threads);
    if (mask == "dense") {
      dense_ms_of.emplace(key, r.fused.median_s * 1e3);
      return NAN;
    }
    if (!against_dense) return NAN;
    auto it = dense_ms_of.find(key);
    if (it == dense_ms_of.end()) it = dense_ms_of.emplace(key, run_dense()).first;
    return it->second;
  };

  for (const op_kind op : ops)
  for (const std::string& mask : masks)
    for (const std::string& dt : dtypes)
      for (std::int64_t d : ds)
        for (std::int64_t n : ns) {
          problem pr;
          pr.batch = batch[0];
          pr.seq_q = pr.seq_k = n;
          pr.heads_q = pr.heads_kv = heads[0];
          pr.dim_qk = pr.dim_v = d;
          pr.type = dt == "f32" ? dtype::f32 : dt == "bf16" ? dtype::bf16 : dtype::f16;
          pr.causal = mask == "causal" ? causal_mode::bottom_right : causal_mode::none;
          pr.lse = false;
          spec s;
          s.causal = pr.causal;
          const bool is_pattern = mask.rfind("spec:", 0) == 0;
          if (is_pattern) (void)parse_mask(mask.substr(5), s.mask);
          kernel_row row;
          row.op = op;
          row.label = is_pattern ? mask.substr(5) : mask;
          row.dtype = dt;
          row.d = d;
          row.n = n;
          if (op == op_kind::backward) {
            // The backward rows: one op_runner (ops.h) for the fused call, its oracle and check, the naive backward
            // and the unfused OpenBLAS backward, as in the suite.
            std::string error;
            const std::unique_ptr<op_runner> bwd = make_op(op_kind::backward, pr, s, is_pattern ? row.label : "", error);
            if (!bwd) {
              std::fprintf(stderr, "%s\n", error.c_str());
              return 1;
            }
            const attn_params& p = bwd->params();
            row.kernel = bwd->kernel();
            row.flops = op_flops(op, useful_pairs(p), p.dim_qk, p.dim_v);
            row.density = static_cast<double>(useful_pairs(p)) / static_cast<double>(pr.batch * pr.heads_q * n * n);
            const bool on_bf16_dot = row.kernel.find("bf16dot") != std::string::npos;
            for (std::size_t ti = 0; ti < threads.size(); ++ti) {
              kernel_row r = row;
              r.threads = static_cast<int>(threads[ti]);
              reset_peak_rss();
              status st;
              r.fused = time_it([&] { st = bwd->fused(r.threads, nullptr); }, budget, 3);
              if (!st) {
                std::fprintf(stderr, "%s\n", st.error.c_str());
                return 1;
              }
              r.mem = peak_rss_mib();
              r.gflops = r.flops / r.fused.median_s * 1e-9;
              r.peak = on_bf16_dot ? bf16_peaks[ti] : peaks[ti];
              // The fused gradients against fp64: the whole oracle for N <= 512, else sampled rows (dq; dk and dv
              // where a kv head's recomputation is affordable).
              if (n <= 512) {
                double oracle_s = 0;
                r.err = bwd->oracle(oracle_s);
                r.oracle_gflops = baselines ? r.flops / oracle_s * 1e-9 : NAN;
              } else {
                r.err = bwd->check().max_abs_err;
              }
              if (baselines) {
                if (n <= 1024) {
                  const timing t = time_it([&] { bwd->naive(); }, 0.0, 1);
                  r.naive_gflops = r.flops / t.median_s * 1e-9;
                  r.naive_kind = "f32";
                }
                set_openblas_threads(r.threads);
                const blas_result b = bwd->openblas(
                    [&](const std::function<void()>& fn, int, const std::function<void()>&) {
                      steady_timing t;
                      t.t = time_it(fn, budget, 3);
                      return t;
                    },
                    r.threads, 1e9);
                r.blas_gflops = r.flops / b.ms * 1e-6;
                r.blas_err = b.max_abs_err;
              }
              r.dense_ms = dense_time(r, mask, [&] {
                return time_it([&] { (void)bwd->dense(r.threads); }, budget, 3).median_s * 1e3;
              });
              emit(r);
            }
            continue;
          }
          problem_data data(pr);
          attn_params p;
          if (status st = make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p); !st) {
            std::fprintf(stderr, "%s\n", st.error.c_str());
            return 1;
          }
          const selection sel = select(p, backend::cpu);
          const bool on_bf16_dot = sel.name.find("bf16dot") != std::string::npos;
          row.kernel = sel.name;
          row.flops = op_flops(op, useful_pairs(p), p.dim_qk, p.dim_v);
          row.density = static_cast<double>(useful_pairs(p)) / static_cast<double>(pr.batch * pr.heads_q * n * n);
          for (std::size_t ti = 0; ti < threads.size(); ++ti) {
            const int thr = static_cast<int>(threads[ti]);
            kernel_row r = row;
            r.threads = thr;
            reset_peak_rss();
            run_stats stats;
            const auto run_fused = [&] {
              options o = data.make_options(backend::cpu, thr);
              o.stats = &stats;
              (void)attention(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, o);
            };
            r.fused = time_it(run_fused, budget, 3);
            const double tiles = static_cast<double>(stats.tiles_full + stats.tiles_partial + stats.tiles_skipped);
            r.skipped = tiles > 0 ? 100.0 * static_cast<double>(stats.tiles_skipped) / tiles : 0.0;
            r.mem = peak_rss_mib();
            r.gflops = r.flops / r.fused.median_s * 1e-9;
            r.peak = on_bf16_dot ? bf16_peaks[ti] : peaks[ti];
            if (baselines) {
              if (n <= 512) {
                problem_data ref(pr);
                const timing t = time_it([&] { (void)run_problem(ref, s, backend::reference, 1); }, 0.0, 1);
                r.oracle_gflops = r.flops / t.median_s * 1e-9;
                r.err = max_out_diff(data, ref);
              }
              if (naive_local_unsupported(p).empty()) {
                // Grid-local patterns: the naive neighborhood baseline on the same threads, at any N (its work is
                // the mask area, not N^2).
                problem_data nv(pr);
                attn_params pn = p;
                pn.out = nv.out.data();
                const timing t = time_it([&] { naive_local_attention(pn, thr); }, budget, 3);
                r.naive_gflops = r.flops / t.median_s * 1e-9;
                r.naive_kind = "local";
                if (std::isnan(r.err)) r.err = max_out_diff(data, nv);
              } else if (n <= 1024) {
                problem_data nv(pr);
                attn_params pn = p;
                pn.out = nv.out.data();
                const timing t = time_it([&] { naive_attention_f32(pn); }, 0.0, 1);
                r.naive_gflops = r.flops / t.median_s * 1e-9;
                r.naive_kind = "f32";
                if (std::isnan(r.err)) r.err = max_out_diff(data, nv);
              }
              // OpenBLAS runs in f32: bf16/f16 problems get an f32 copy of the same inputs.
              problem f32p = pr;
              f32p.type = dtype::f32;
              problem_data fb(f32p);
              attn_params pb;
              spec blas_spec;  // the unfused path handles dense and causal; any other mask costs it the dense work
              blas_spec.causal = s.causal;
              (void)make_params(fb.q_view(), fb.k_view(), fb.v_view(), fb.out_view(), blas_spec, fb.make_options(backend::cpu), pb);
              set_openblas_threads(thr);
              const timing t = time_it([&] { openblas_unfused(pb, thr); }, budget, 3);
              r.blas_gflops = r.flops / t.median_s * 1e-9;
              r.blas_err = check_sampled_rows(pb, 16).max_abs_err;  // its own output against fp64
            }
            // After the baselines: a dense run overwrites data.out, which their error comparison has read.
            spec dense_spec;
            r.dense_ms = dense_time(r, mask, [&] {
              const auto run_dense = [&] {
                (void)attention(data.q_view(), data.k_view(), data.v_view(), data.out_view(), dense_spec,
                                data.make_options(backend::cpu, thr));
              };
              return time_it(run_dense, budget, 3).median_s * 1e3;
            });
            emit(r);
          }
        }
  json << "\n  ]\n}\n";
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << json.str();
    if (!f) {
      std::fprintf(stderr, "omniattn bench: cannot write %s\n", json_path.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace omniattn::bench
