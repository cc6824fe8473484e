// `omniattn bench`: command line, workload selection and the run (fused kernel, check, baselines) behind the report.
#include "bench/suite.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <map>
#include <memory>

#include "bench/bench.h"
#include "bench/measure.h"
#include "bench/ops.h"
#include "bench/report.h"
#include "core/grid_local.h"
#include "omniattn/version.h"

namespace omniattn::bench {
namespace {

// A --problem workload with --n gets the sweep; a problem string without {n} takes n from it (later keys win).
void apply_n_override(workload& w, const std::vector<std::int64_t>& ns) {
  if (ns.empty()) return;
  if (w.origin == "--problem") {
    if (w.problem.find("{n") == std::string::npos && w.problem.find("{varlen") == std::string::npos) w.problem += ",n={n}";
  } else if (w.ns.empty()) {
    return;  // fixed shapes (the model rows) keep their N
  }
  w.ns = ns;
  w.quick_ns = ns;
}

bool parse_threads(const std::string& text, std::vector<int>& out) {
  std::vector<std::int64_t> v;
  if (!parse_int_list(text, v)) return false;
  out.clear();
  for (const std::int64_t t : v) {
    if (t > 1024) return false;
    out.push_back(static_cast<int>(t));
  }
  return true;
}

}  // namespace

void print_suite_usage(std::FILE* f) {
  std::fprintf(f,
               "usage: omniattn bench [--quick] [--filter GLOB[,GLOB]]... [--list]\n"
               "                      [--problem SPEC [--mask SPEC]]... [--workloads FILE]... [--n N,N,...] [--set KEY=VALUE,...]\n"
               "                      [--threads T,T,...] [--budget SECONDS] [--out DIR | --no-report] [--no-plots]\n"
               "                      [--no-cache] [--no-baselines] [--op forward,backward]\n"
               "       omniattn bench --kernel [--help]      the kernel table (dense/causal x D x N x dtype x threads)\n"
               "\n"
               "Runs the workload suite (CAB's four patterns, the mask catalogue swept over N, neighborhood attention in\n"
               "1-3 D, model shapes, and the backward group bwd/: attention_backward on dense, causal, window, document and\n"
               "2D neighborhood masks) on the fused kernel with, in the same run, the unfused OpenBLAS path, the naive f32 path\n"
               "and, for neighborhood / halo masks, the naive per-query neighborhood baseline; checks sampled rows against\n"
               "an fp64 oracle, reports efficiency lengths, prints a table and writes DIR/results.json, DIR/report.md and\n"
               "PNG plots (bench/plot.py, matplotlib). bench/README.md documents the workloads and results.json.\n"
               "\n"
               "  --quick             CI-sized: short sweeps, fewer heads, 0.1 s per measurement\n"
               "  --filter GLOB       workloads whose name matches ('mask/*', 'neighborhood*', 'cab/*,mask/full'); repeatable\n"
               "  --list              print the workloads (with --quick: the quick sweep) and exit\n"
               "  --problem SPEC      a custom workload, e.g. \"b=1,n=2048,h=8,d=128,causal=br\" (keys: omniattn --help);\n"
               "                      templates {n} {n/K} {n*K} {docs:W:W..} {varlen:W:W..} take the --n sweep\n"
               "  --mask SPEC         mask spec string of the preceding --problem, e.g. \"causal & window(512,0)\"\n"
               "  --workloads FILE    workloads from a JSON file (format: bench/README.md); repeatable\n"
               "  --n N,N,...         N sweep for swept and custom workloads (replaces theirs)\n"
               "  --set KEY=VALUE,..  appended to every problem string, e.g. --set dtype=bf16 or --set d=128\n"
               "  --threads T,T,...   thread counts (default: every CPU available, here %d)\n"
               "  --budget SECONDS    time per measurement after one warm-up, at least 3 runs (default 0.4; --quick 0.1)\n"
               "  --out DIR           report directory (default bench-report)   --no-report  no report directory\n"
               "  --no-plots          skip the PNG plots              --no-cache  re-measure the peaks (and update the cache)\n"
               "  --no-baselines      fused kernel only (no OpenBLAS, no naive f32, no naive neighborhood)\n"
               "  --op OPS            forward, backward or forward,backward: only workloads of these ops (default: all);\n"
               "                      --problem workloads run as each (default forward; backward ones are custom-bwd/N)\n"
               "\n"
               "Exit codes: 0 ok, 1 a workload failed to run or failed its check, 2 bad command-line input.\n",
               available_cpus());
}

bool parse_suite_args(int argc, char** argv, int first, suite_options& o, std::string& error) {
  bool budget_set = false;
  int custom_problems = 0;
  o.command = "omniattn bench";
  for (int i = first; i < argc; ++i) o.command += " " + std::string(argv[i]);
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool inline_value = false;
    if (const auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      inline_value = true;
    }
    static const char* const flags[] = {"-h", "--help", "--list", "--quick", "--no-report", "--no-plots", "--no-cache",
                                        "--no-baselines"};
    static const char* const valued[] = {"--filter", "--problem", "--mask", "--workloads", "--n", "--set", "--threads",
                                         "--budget", "--out", "--op"};
    const auto named = [&](const char* f) { return arg == f; };
    const bool is_flag = std::any_of(std::begin(flags), std::end(flags), named);
    const bool is_valued = std::any_of(std::begin(valued), std::end(valued), named);
    if (!is_flag && !is_valued) {
      error = "unknown argument '" + std::string(argv[i]) + "'";
      return false;
    }
    if (is_flag && inline_value) {
      error = arg + " takes no value";
      return false;
    }
    if (is_valued && !inline_value) {
      if (i + 1 >= argc) {
        error = arg + " needs a value";
        return false;
      }
      value = argv[++i];
    }
    if (arg == "-h" || arg == "--help") o.help = true;
    else if (arg == "--list") o.list = true;
    else if (arg == "--quick") o.quick = true;
    else if (arg == "--no-report") o.out_dir.clear();
    else if (arg == "--no-plots") o.plots = false;
    else if (arg == "--no-cache") o.use_cache = false;
    else if (arg == "--no-baselines") o.baselines = false;
    else if (arg == "--filter") {
      std::size_t start = 0;
      bool any = false;
      while (start <= value.size()) {
        const std::size_t comma = value.find(',', start);
        const std::string glob = value.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        if (!glob.empty()) {
          o.filters.push_back(glob);
          any = true;
        }
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      if (!any) {
        error = "--filter expects name globs, e.g. 'mask/*'";
        return false;
      }
    } else if (arg == "--problem") {
      workload w;
      w.name = "custom/" + std::to_string(++custom_problems);
      w.problem = value;
      w.origin = "--problem";
      w.note = "--problem " + value;
      o.custom.push_back(std::move(w));
    } else if (arg == "--mask") {
      if (o.custom.empty() || o.custom.back().origin != "--problem") {
        error = "--mask '" + value + "' needs a --problem before it (it sets that problem's mask)";
        return false;
      }
      if (!o.custom.back().mask.empty()) {
        error = "--mask '" + value + "': the preceding --problem already has a mask";
        return false;
      }
      o.custom.back().mask = value;
      o.custom.back().note += " --mask " + value;
    } else if (arg == "--workloads") {
      if (!read_workload_file(value, o.custom, error)) return false;
    } else if (arg == "--n") {
      if (!parse_int_list(value, o.ns)) {
        error = "--n '" + value + "': expected positive integers separated by ','";
        return false;
      }
    } else if (arg == "--set") {
      if (value.empty() || value.find('=') == std::string::npos) {
        error = "--set '" + value + "': expected key=value[,key=value...] (problem keys, e.g. dtype=bf16)";
        return false;
      }
      o.overrides += (o.overrides.empty() ? "" : ",") + value;
    } else if (arg == "--threads") {
      if (!parse_threads(value, o.threads)) {
        error = "--threads '" + value + "': expected thread counts 1..1024 separated by ','";
        return false;
      }
    } else if (arg == "--budget") {
      char* end = nullptr;
      o.budget_s = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(o.budget_s > 0) || o.budget_s > 3600) {
        error = "--budget '" + value + "': expected seconds per measurement, > 0";
        return false;
      }
      budget_set = true;
    } else if (arg == "--op") {
      o.ops.clear();
      std::size_t start = 0;
      while (start <= value.size()) {
        const std::size_t comma = value.find(',', start);
        const std::string name = value.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        op_kind op;
        if (!parse_op(name, op)) {
          error = "--op '" + value + "': expected forward, backward or forward,backward";
          return false;
        }
        if (std::find(o.ops.begin(), o.ops.end(), op) == o.ops.end()) o.ops.push_back(op);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    } else if (arg == "--out") {
      if (value.empty()) {
        error = "--out needs a directory (or use --no-report)";
        return false;
      }
      o.out_dir = value;
    }
  }
  if (o.quick && !budget_set) o.budget_s = 0.1;
  // Validate the custom workloads now, so a bad --problem or file fails before anything runs.
  std::vector<std::string> names;
  for (const workload& w : built_in_workloads()) names.push_back(w.name);
  for (const workload& w0 : o.custom) {
    if (std::find(names.begin(), names.end(), w0.name) != names.end()) {
      error = w0.origin + ": workload name '" + w0.name + "' is already taken";
      return false;
    }
    names.push_back(w0.name);
    workload w = w0;
    apply_n_override(w, o.ns);
    std::vector<instance> inst;
    std::string why;
    if (!instantiate(w, o.quick, o.overrides, inst, why)) {
      if (w.origin == "--problem") {
        error = "--problem '" + w0.problem + "'" + (w0.mask.empty() ? "" : " --mask '" + w0.mask + "'") + ": " + why;
      } else {
        error = w.origin + ": " + why;
      }
      return false;
    }
  }
  if (!o.overrides.empty()) {  // a bad --set shows up on the first built-in too
    std::vector<instance> inst;
    std::string why;
    if (!instantiate(built_in_workloads().front(), o.quick, o.overrides, inst, why)) {
      error = "--set '" + o.overrides + "': " + why;
      return false;
    }
  }
  return true;
}

bool select_workloads(const suite_options& o, std::vector<workload>& out, std::string& error) {
  std::vector<workload> all = built_in_workloads();
  const auto wanted = [&](op_kind op) { return o.ops.empty() || std::find(o.ops.begin(), o.ops.end(), op) != o.ops.end(); };
  for (const workload& w : o.custom) {
    if (w.origin != "--problem") {
      all.push_back(w);
      continue;
    }
    // A --problem workload runs as each op of --op (forward by default); the backward one is custom-bwd/N.
    for (const op_kind op : o.ops.empty() ? std::vector<op_kind>{op_kind::forward} : o.ops) {
      workload c = w;
      c.op = op;
      if (op == op_kind::backward) c.name = "custom-bwd/" + w.name.substr(w.name.find('/') + 1);
      all.push_back(std::move(c));
    }
  }
  for (workload& w : all) apply_n_override(w, o.ns);
  std::vector<bool> chosen(all.size(), false);
  if (o.filters.empty()) {
    for (std::size_t i = 0; i < all.size(); ++i)
      chosen[i] = o.custom.empty() ? all[i].origin == "built-in" : all[i].origin != "built-in";
  } else {
    for (const std::string& f : o.filters) {
      bool any = false;
      for (std::size_t i = 0; i < all.size(); ++i)
        if (glob_match(f, all[i].name)) chosen[i] = any = true;
      if (!any) {
        error = "--filter '" + f + "' matches no workload (omniattn bench --list shows them)";
        return false;
      }
    }
  }
  for (std::size_t i = 0; i < all.size(); ++i) chosen[i] = chosen[i] && wanted(all[i].op);
  // The references of chosen workloads run too (efficiency lengths need them).
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (!chosen[i]) continue;
    for (const std::string& ref : all[i].refs) {
      const auto it = std::find_if(all.begin(), all.end(), [&](const workload& w) { return w.name == ref; });
      if (it == all.end()) {
        error = "workload '" + all[i].name + "' (" + all[i].origin + "): unknown reference '" + ref + "'";
        return false;
      }
      chosen[static_cast<std::size_t>(it - all.begin())] = true;
    }
  }
  out.clear();
  for (std::size_t i = 0; i < all.size(); ++i)
    if (chosen[i]) out.push_back(all[i]);
  return true;
}

void print_workload_list(std::FILE* f, const std::vector<workload>& all, bool quick) {
  for (const workload& w : all) {
    std::string ns;
    for (const std::int64_t n : sweep_points(w, quick)) {
      if (!ns.empty()) ns += ',';
      ns += std::to_string(n);
    }
    std::string problem = w.problem;
    if (quick && !w.quick_problem.empty()) problem += "," + w.quick_problem;
    std::fprintf(f, "%-36s %s%s%s%s%s\n", w.name.c_str(), problem.c_str(), w.mask.empty() ? "" : "  mask: ", w.mask.c_str(),
                 ns.empty() ? "" : "  N: ", ns.c_str());
    if (!w.note.empty()) std::fprintf(f, "%-36s %s\n", "", w.note.c_str());
  }
}

std::string dense_key(const problem& p, int threads, op_kind op) {
  problem d = p;
  d.causal = causal_mode::none;
  d.seed = 1;
  d.lse = false;
  return d.describe() + "|" + std::to_string(threads) + (op == op_kind::forward ? "" : "|" + std::string(op_name(op)));
}

std::string dense_skip_reason(double dense_flops, double peak_gflops, double budget_s) {
  if (!(peak_gflops > 0)) return "";
  const double estimate_s = dense_flops * 1e-9 / peak_gflops, limit_s = k_dense_max_budgets * budget_s;
  if (estimate_s <= limit_s) return "";
  char buf[160];
  std::snprintf(buf, sizeof buf, "not run: %.4g GFLOP take >= %.2g s at the %.0f GFLOP/s peak, over the %.2g s limit",
                dense_flops * 1e-9, estimate_s, peak_gflops, limit_s);
  return buf;
}

namespace {

// The dense run of a shape (dense_key): measured once per run, or taken from the row that is that run.
struct dense_result {
  double ms = NAN, disturbed_pct = NAN;
  std::string note;  // why it was not measured
};

struct run_context {
  const suite_options& opt;
  const std::vector<machine_peak>& peaks;
  measure_policy policy;
  std::map<std::string, blas_result> blas_cache;  // op_runner::openblas_key -> result
  std::map<std::string, dense_result> dense_cache;  // dense_key -> the fused kernel's dense time
  progress_line progress;
  int done = 0;
  int dense_runs = 0;   // dense runs measured for masked rows (not taken from an unmasked row)
  double dense_s = 0;   // wall time they took, warm-up included: what "x dense" adds to the run
  int busy_streak = 0;  // consecutive measurements still disturbed after their retries
  bool busy_noted = false;

  // measure_steady, retrying disturbed measurements while the disturbance looks passing; once three in a row stayed
  // disturbed the machine is busy for good, and each gets one attempt (its row shows dist%) until a quiet one.
  steady_timing measure(const std::function<void()>& fn, int threads, const std::function<void()>& before_attempt) {
    const int attempts = busy_streak >= 3 ? 1 : 3;
    const steady_timing t = measure_steady(fn, policy, threads, before_attempt, k_max_disturbed_pct, attempts);
    busy_streak = t.disturbed_pct > k_max_disturbed_pct ? busy_streak + 1 : 0;
    if (busy_streak == 3 && !busy_noted) {
      busy_noted = true;
      progress.clear();
      std::fprintf(stderr,
                   "omniattn bench: note: the machine is busy (others took %.0f%% of the CPU time of a measurement); "
                   "rows show it as dist%%, no retries while it lasts\n",
                   t.disturbed_pct);
    }
    return t;
  }
};

const char* causal_text(causal_mode c) {
  return c == causal_mode::none ? "none" : c == causal_mode::top_left ? "top_left" : "bottom_right";
}


// One workload point on every thread count: rows appended to `rows` and printed. The op (ops.h) is the forward or the
// backward of the point's problem; the loop is one for both: the fused call, its sampled fp64 check, the naive paths,
// the unfused OpenBLAS baseline (shared between rows of one shape) and the dense run of the shape.
void run_instance(run_context& ctx, const workload& w, const instance& inst, std::vector<result_row>& rows) {
  problem prob = inst.prob;
  prob.lse = false;
  result_row base;
  base.workload = w.name;
  base.group = w.group();
  base.note = w.note;
  base.op = op_name(w.op);
  base.mask = inst.mask_text;
  base.problem = prob.describe();
  base.n = inst.n;
  base.batch = prob.batch;
  base.seq_q = prob.seq_q;
  base.seq_k = prob.seq_k;
  base.heads_q = prob.heads_q;
  base.heads_kv = prob.heads_kv;
  base.dim_qk = prob.dim_qk;
  base.dim_v = prob.dim_v;
  base.dtype = dtype_name(prob.type);
  base.causal = causal_text(prob.causal);
  base.varlen = prob.is_varlen();
  const std::string label = w.name + " n=" + std::to_string(inst.n);

  ctx.progress.show(ctx.done, label + ": preparing inputs");
  spec s;
  s.causal = prob.causal;
  s.scale = prob.scale;
  s.mask = inst.mask;
  std::string made;
  const std::unique_ptr<op_runner> op = make_op(w.op, prob, s, inst.mask_text, made);
  if (!op) {
    for (const machine_peak& mp : ctx.peaks) {
      result_row r = base;
      r.threads = mp.threads;
      r.error = made;
      rows.push_back(r);
      ctx.progress.clear();
      print_table_row(stdout, r);
      ++ctx.done;
    }
    return;
  }
  const attn_params& p = op->params();
  base.kernel = op->kernel();
  base.useful_pairs = useful_pairs(p);
  base.dense_pairs = dense_pairs_of(prob);
  base.useful_flops = op_flops(w.op, base.useful_pairs, p.dim_qk, p.dim_v);
  base.inputs_mib = op->inputs_mib();
  // No mask and no causal flag: the row is itself the dense run of its shape, and masked rows of that shape reuse it.
  const bool is_dense = inst.mask_text.empty() && prob.causal == causal_mode::none;
  const bool bf16_dot = base.kernel.find("bf16dot") != std::string::npos;
  const bool local_mask = w.op == op_kind::forward && p.mask && detail::as_grid_local(*p.mask).has_value();
  const double dense_flops = op_flops(w.op, base.dense_pairs, p.dim_qk, p.dim_v);

  // The naive f32 path is single-threaded: run it once per point, where its work is small.
  double naive_ms = NAN;
  if (ctx.opt.baselines && dense_flops * 1e-9 <= 2.5 * ctx.opt.budget_s) {
    ctx.progress.show(ctx.done, label + ": naive f32");
    measure_policy once;
    once.budget_s = 0;
    once.min_reps = 1;
    once.warm_up = false;
    naive_ms = measure([&] { op->naive(); }, once).median_s * 1e3;
  }
  const measure_fn timed = [&](const std::function<void()>& fn, int threads, const std::function<void()>& before) {
    return ctx.measure(fn, threads, before);
  };

  for (const machine_peak& mp : ctx.peaks) {
    const int thr = mp.threads;
    result_row r = base;
    r.threads = thr;
    r.peak_kind = bf16_dot ? "bf16_dot" : "fp32_fma";
    r.peak_gflops = bf16_dot ? mp.bf16_dot_gflops : mp.fp32_fma_gflops;
    ctx.progress.show(ctx.done, label + " thr=" + std::to_string(thr) + ": fused kernel");
    run_stats stats;
    status st;
    double rss0 = 0;
    const steady_timing fused = ctx.measure([&] { st = op->fused(thr, &stats); }, thr, [&] {
      reset_peak_rss();
      rss0 = current_rss_mib();
    });
    r.fused = fused.t;
    r.disturbed_pct = fused.disturbed_pct;
    r.attempts = fused.attempts;
    r.peak_rss_mib = peak_rss_mib();
    r.workspace_mib = std::max(0.0, r.peak_rss_mib - rss0);
    if (!st) {
      r.error = st.error;
    } else {
      r.gflops = r.useful_flops / r.fused.median_s * 1e-9;
      r.pct_peak = r.peak_gflops > 0 ? 100.0 * r.gflops / r.peak_gflops : NAN;
      const double tiles = static_cast<double>(stats.tiles_full + stats.tiles_partial + stats.tiles_skipped);
      r.tiles_skipped_pct = !op->has_tile_stats() ? NAN
                            : tiles > 0           ? 100.0 * static_cast<double>(stats.tiles_skipped) / tiles
                                                  : 0.0;
      ctx.progress.show(ctx.done, label + " thr=" + std::to_string(thr) + ": checking sampled rows");
      r.check = op->check();
      if (std::isfinite(naive_ms)) {
        r.naive_ms = naive_ms;
        r.naive_gflops = r.useful_flops / naive_ms * 1e-6;
      }
      if (ctx.opt.baselines && local_mask) {
        if (const std::string why = naive_local_unsupported(p); !why.empty()) {
          r.naive_local_note = "not run: " + why;
        } else {
          // Same inputs and threads as the fused kernel, its own output buffer, timed the same way.
          ctx.progress.show(ctx.done, label + " thr=" + std::to_string(thr) + ": naive neighborhood baseline");
          std::vector<std::uint8_t> out(op->out_bytes());
          attn_params pl = p;
          pl.out = out.data();
          const steady_timing nl = ctx.measure([&] { naive_local_attention(pl, thr); }, thr, {});
          r.naive_local_ms = nl.t.median_s * 1e3;
          r.naive_local_disturbed_pct = nl.disturbed_pct;
          r.naive_local_gflops = r.useful_flops / r.naive_local_ms * 1e-6;
          r.naive_local_speedup = r.naive_local_ms / (r.fused.median_s * 1e3);
          const check_result c = check_sampled_rows(pl, 64);
          r.naive_local_max_abs_err = c.max_abs_err;
          r.naive_local_check_ok = c.ok;
        }
      }
      if (ctx.opt.baselines) {
        // The unfused path runs in f32 whatever the problem's dtype, so f32 and bf16 rows of a shape share it.
        const std::string key = op->openblas_key(thr);
        auto it = ctx.blas_cache.find(key);
        if (it == ctx.blas_cache.end()) {
          ctx.progress.show(ctx.done, label + " thr=" + std::to_string(thr) + ": OpenBLAS unfused");
          it = ctx.blas_cache.emplace(key, op->openblas(timed, thr, 100.0 * ctx.opt.budget_s)).first;
        }
        const blas_result& b = it->second;
        r.openblas_ms = b.ms;
        r.openblas_workspace_mib = b.workspace_mib;
        r.openblas_heads_measured = b.heads;
        r.openblas_note = b.note;
        r.openblas_max_abs_err = b.max_abs_err;
        r.openblas_disturbed_pct = b.disturbed_pct;
        if (std::isfinite(b.ms)) {
          // The forward baseline applies the causal flag only: any other mask costs it the dense work, unmasked.
          r.openblas_cost = w.op == op_kind::forward && !inst.mask_text.empty() ? "dense (mask not applied)" : b.cost;
          r.openblas_gflops = r.useful_flops / b.ms * 1e-6;
          r.openblas_speedup = b.ms / (r.fused.median_s * 1e3);
        }
      }
    }
    if (st) {
      const std::string key = dense_key(prob, thr, w.op);
      if (is_dense) {
        // Another unmasked row of the shape (cab/self-noncausal, mask/full) replaces a more disturbed measurement.
        const auto it = ctx.dense_cache.find(key);
        if (it == ctx.dense_cache.end() || !(it->second.disturbed_pct <= r.disturbed_pct))
          ctx.dense_cache[key] = dense_result{r.fused.median_s * 1e3, r.disturbed_pct, ""};
      } else {
        auto it = ctx.dense_cache.find(key);
        if (it == ctx.dense_cache.end()) {
          dense_result d;
          d.note = dense_skip_reason(dense_flops, mp.fp32_fma_gflops, ctx.opt.budget_s);
          if (d.note.empty()) {
            // Last in the row: it overwrites the fused output, which the check above has read. Same threads, timing.
            ctx.progress.show(ctx.done, label + " thr=" + std::to_string(thr) + ": dense run of the shape");
            status dst;
            const auto t0 = std::chrono::steady_clock::now();
            const steady_timing dt = ctx.measure([&] { dst = op->dense(thr); }, thr, {});
            ctx.dense_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            ++ctx.dense_runs;
            if (dst) {
              d.ms = dt.t.median_s * 1e3;
              d.disturbed_pct = dt.disturbed_pct;
            } else {
              d.note = "not run: " + dst.error;
            }
          }
          it = ctx.dense_cache.emplace(key, d).first;
        }
        r.dense_ms = it->second.ms;
        r.dense_disturbed_pct = it->second.disturbed_pct;
        r.dense_note = it->second.note;
        if (std::isfinite(r.dense_ms)) r.x_dense = r.dense_ms / (r.fused.median_s * 1e3);
      }
    }
    rows.push_back(r);
    ++ctx.done;
    ctx.progress.clear();
    print_table_row(stdout, r);
    std::fflush(stdout);
  }
}
}  // namespace

int run_suite(const suite_options& o) {
  const auto t_start = std::chrono::steady_clock::now();
  std::vector<workload> selected;
  std::string error;
  if (!select_workloads(o, selected, error)) {
    std::fprintf(stderr, "omniattn bench: %s\n", error.c_str());
    return 2;
  }
  if (o.list) {
    print_workload_list(stdout, selected, o.quick);
    return 0;
  }
  std::vector<std::pair<const workload*, std::vector<instance>>> plan;
  std::size_t points = 0;
  for (const workload& w : selected) {
    std::vector<instance> inst;
    if (!instantiate(w, o.quick, o.overrides, inst, error)) {
      std::fprintf(stderr, "omniattn bench: %s\n", error.c_str());
      return 2;
    }
    points += inst.size();
    plan.emplace_back(&w, std::move(inst));
  }

  run_info info;
  info.version = std::to_string(OMNIATTN_VERSION_MAJOR) + "." + std::to_string(OMNIATTN_VERSION_MINOR) + "." +
                 std::to_string(OMNIATTN_VERSION_PATCH);
  info.command = o.command;
  info.started = utc_now();
  info.cpu = cpu_model();
  info.cpus = available_cpus();
  info.isa = isa_name();
  info.openblas_core = openblas_core();
  info.threads = o.threads.empty() ? std::vector<int>{info.cpus} : o.threads;
  info.quick = o.quick;
  info.baselines = o.baselines;
  info.budget_s = o.budget_s;
  info.filters = o.filters;
  info.peak_cache = peak_cache_path();
  info.peaks = machine_peaks(info.threads, o.use_cache, info.isa, info.peak_note);

  std::printf("omniattn bench%s   cpu=\"%s\" (%d CPUs)   isa=%s   openblas=%s\n", o.quick ? " --quick" : "", info.cpu.c_str(),
              info.cpus, info.isa.c_str(), info.openblas_core.c_str());
  for (const machine_peak& mp : info.peaks)
    std::printf("peak with %d thread(s): fp32 FMA %.0f GFLOP/s, bf16 dot %.0f GFLOP/s (%s)\n", mp.threads, mp.fp32_fma_gflops,
                mp.bf16_dot_gflops, mp.source.c_str());
  if (!info.peak_note.empty()) std::fprintf(stderr, "omniattn bench: note: %s\n", info.peak_note.c_str());
  std::printf("GFLOP/s on useful pairs only; blas = unfused OpenBLAS (dense cost for masks; * = fewer heads, scaled);"
              " ws = workspace MiB; check = sampled rows vs fp64\n"
              "bwd/ and custom-bwd/ rows: attention_backward, FLOPs 2.5x the forward's (FlashAttention's count); blas = the\n"
              "unfused backward (P, dS materialized, mask applied)\n\n");
  print_table_header(stdout);
  std::fflush(stdout);

  run_context ctx{o, info.peaks, {}, {}, {}, {}, 0, 0, 0, 0, false};
  ctx.policy.budget_s = o.budget_s;
  ctx.policy.cap_s = 20.0 * o.budget_s;
  ctx.progress.set_total(static_cast<int>(points * info.peaks.size()));
  std::vector<result_row> rows;
  for (const auto& [w, instances] : plan)
    for (const instance& inst : instances) run_instance(ctx, *w, inst, rows);
  ctx.progress.clear();

  const std::vector<efficiency_row> eff = efficiency_lengths(selected, rows);
  print_efficiency(stdout, eff);
  info.total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();

  int failures = 0;
  for (const result_row& r : rows)
    failures += !r.error.empty() || (r.check.rows && !r.check.ok) || (std::isfinite(r.naive_local_ms) && !r.naive_local_check_ok);
  if (!o.out_dir.empty()) {
    ctx.progress.show(ctx.done, "writing the report");
    const bool ok = write_report(o.out_dir, info, rows, eff, o.plots, error);
    ctx.progress.clear();
    if (!ok) {
      std::fprintf(stderr, "omniattn bench: %s\n", error.c_str());
      return 1;
    }
  }
  info.total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("\n%zu rows in %.0f s (dense runs for x dense: %d, %.1f s)%s%s%s\n", rows.size(), info.total_s, ctx.dense_runs,
              ctx.dense_s, o.out_dir.empty() ? "" : "; report: ", o.out_dir.c_str(),
              o.out_dir.empty() ? "" : "/report.md, results.json");
  if (failures) std::printf("%d row(s) FAILED (error or check)\n", failures);
  return failures ? 1 : 0;
}

}  // namespace omniattn::bench
