// Outputs of `omniattn bench`: stdout table, progress line, efficiency lengths, results.json, report.md, plots.
#include "bench/report.h"

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "bench/suite.h"

extern char** environ;

namespace omniattn::bench {
namespace {

std::string fmt(const char* f, double x) {
  if (!std::isfinite(x)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

// A markdown table cell: '|' would end the cell, even inside a code span.
std::string md_cell(const std::string& text) {
  std::string out;
  for (const char c : text) {
    if (c == '|') out += '\\';
    out += c;
  }
  return out;
}

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------------
// Efficiency lengths.

crossover find_crossover(const std::vector<std::int64_t>& ns, const std::vector<double>& t_eff,
                         const std::vector<double>& t_ref) {
  crossover c;
  std::vector<std::int64_t> n;
  std::vector<double> ratio;
  for (std::size_t i = 0; i < ns.size() && i < t_eff.size() && i < t_ref.size(); ++i)
    if (std::isfinite(t_eff[i]) && std::isfinite(t_ref[i]) && t_ref[i] > 0) {
      n.push_back(ns[i]);
      ratio.push_back(t_eff[i] / t_ref[i]);
    }
  if (n.empty()) {
    c.status = "no_data";
    return c;
  }
  c.n_min = n.front();
  c.n_max = n.back();
  std::size_t k = n.size();  // first index from which the pattern stays faster
  while (k > 0 && ratio[k - 1] < k_faster_ratio) --k;
  if (k == n.size()) {
    c.status = "never_faster";
  } else if (k == 0) {
    c.status = "always_faster";
    c.n = static_cast<double>(n.front());
  } else {
    const double x0 = std::log(static_cast<double>(n[k - 1])), x1 = std::log(static_cast<double>(n[k]));
    const double r0 = ratio[k - 1], r1 = ratio[k];
    c.status = "crossed";
    c.n = std::exp(x0 + (x1 - x0) * (r0 - k_faster_ratio) / (r0 - r1));
  }
  return c;
}

std::vector<efficiency_row> efficiency_lengths(const std::vector<workload>& selected, const std::vector<result_row>& rows) {
  std::vector<efficiency_row> out;
  const auto rows_of = [&](const std::string& name, int threads) {
    std::map<std::int64_t, const result_row*> m;
    for (const result_row& r : rows)
      if (r.workload == name && r.threads == threads && r.error.empty()) m[r.n] = &r;
    return m;
  };
  for (const workload& w : selected) {
    if (w.refs.empty()) continue;
    std::vector<int> threads;
    for (const result_row& r : rows)
      if (r.workload == w.name && std::find(threads.begin(), threads.end(), r.threads) == threads.end())
        threads.push_back(r.threads);
    for (const int t : threads) {
      const auto mine = rows_of(w.name, t);
      if (mine.size() < 2) continue;
      efficiency_row e;
      e.workload = w.name;
      e.threads = t;
      std::vector<std::int64_t> ns;
      std::vector<double> t_eff;
      for (const auto& [n, r] : mine) {
        ns.push_back(n);
        t_eff.push_back(r->fused.median_s);
      }
      for (const std::string& ref : w.refs) {
        const auto theirs = rows_of(ref, t);
        std::vector<double> t_ref;
        for (const std::int64_t n : ns) t_ref.push_back(theirs.count(n) ? theirs.at(n)->fused.median_s : NAN);
        crossover c = find_crossover(ns, t_eff, t_ref);
        c.reference = ref;
        e.vs.push_back(c);
      }
      // The unfused OpenBLAS path on the first reference's shape (the dense one for the catalogue); the pattern's own
      // OpenBLAS time (dense cost as well) when the reference has none.
      const auto first_ref = rows_of(w.refs.front(), t);
      std::vector<double> t_blas;
      for (const auto& [n, r] : mine) {
        const double theirs = first_ref.count(n) ? first_ref.at(n)->openblas_ms : NAN;
        t_blas.push_back((std::isfinite(theirs) ? theirs : r->openblas_ms) * 1e-3);
      }
      crossover c = find_crossover(ns, t_eff, t_blas);
      c.reference = "openblas";
      e.vs.push_back(c);
      out.push_back(std::move(e));
    }
  }
  return out;
}

namespace {

std::string crossover_text(const crossover& c) {
  if (c.status == "crossed") return "N~" + std::to_string(static_cast<std::int64_t>(std::lround(c.n)));
  if (c.status == "always_faster") return "<=" + std::to_string(c.n_min);
  if (c.status == "never_faster") return "never<=" + std::to_string(c.n_max);
  return "-";
}

std::string reference_label(const std::string& ref) { return ref == "openblas" ? "OpenBLAS unfused" : ref; }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------------
// The stdout table.

std::string shape_label(const result_row& r) {
  std::string s;
  if (r.varlen) s = "varlen" + std::to_string(r.batch);
  else s = "b" + std::to_string(r.batch);
  if (!r.varlen && r.seq_q != r.seq_k) s += " " + std::to_string(r.seq_q) + "x" + std::to_string(r.seq_k);
  s += " h" + std::to_string(r.heads_q);
  if (r.heads_kv != r.heads_q) s += ":" + std::to_string(r.heads_kv);
  s += " d" + std::to_string(r.dim_qk);
  if (r.dim_v != r.dim_qk) s += ":" + std::to_string(r.dim_v);
  s += " " + r.dtype;
  if (r.causal == "bottom_right") s += " br";
  else if (r.causal == "top_left") s += " tl";
  return s;
}

void print_table_header(std::FILE* f) {
  std::fprintf(f, "%-36s %6s %-26s %3s | %9s %5s %5s %8s %5s %5s %7s | %7s %9s %7s | %9s %7s %7s | %7s %9s %7s | %-10s\n",
               "workload", "N", "shape", "thr", "fused ms", "iqr%", "dist%", "GFLOP/s", "%peak", "skip%", "wsMiB", "density",
               "dense ms", "x dense", "blas ms", "x blas", "blasMiB", "naiveGF", "nloc ms", "x nloc", "check");
}

void print_table_row(std::FILE* f, const result_row& r) {
  if (!r.error.empty()) {
    std::fprintf(f, "%-36s %6lld %-26s %3d | ERROR %s\n", r.workload.c_str(), static_cast<long long>(r.n), shape_label(r).c_str(),
                 r.threads, r.error.c_str());
    return;
  }
  std::string check = r.check.rows ? fmt("%.1e", r.check.max_abs_err) + (r.check.ok ? " ok" : " FAIL") : "-";
  // '?': the dense time came from a disturbed measurement (possibly another row's), so the ratio is suspect.
  const std::string x_dense = fmt("%.2fx", r.x_dense) + (r.dense_disturbed_pct > k_max_disturbed_pct ? "?" : "");
  std::string blas_ms = fmt("%.2f", r.openblas_ms);
  if (std::isfinite(r.openblas_ms) && r.openblas_heads_measured < r.heads_q) blas_ms += "*";
  if (std::isfinite(r.naive_local_ms) && !r.naive_local_check_ok) check += " nloc FAIL";
  std::fprintf(f,
               "%-36s %6lld %-26s %3d | %9.2f %5.1f %5.0f %8.1f %4.0f%% %5s %7.1f | %7s %9s %7s | %9s %7s %7s | %7s %9s %7s | "
               "%-10s\n",
               r.workload.c_str(), static_cast<long long>(r.n), shape_label(r).c_str(), r.threads, r.fused.median_s * 1e3,
               r.fused.iqr_pct(), r.disturbed_pct, r.gflops, r.pct_peak, fmt("%.1f", r.tiles_skipped_pct).c_str(), r.workspace_mib,
               fmt("%.4f", r.density()).c_str(), fmt("%.2f", r.dense_ms).c_str(), x_dense.c_str(), blas_ms.c_str(),
               fmt("%.2fx", r.openblas_speedup).c_str(), fmt("%.0f", r.openblas_workspace_mib).c_str(),
               fmt("%.2f", r.naive_gflops).c_str(), fmt("%.2f", r.naive_local_ms).c_str(),
               fmt("%.1fx", r.naive_local_speedup).c_str(), check.c_str());
}

void print_efficiency(std::FILE* f, const std::vector<efficiency_row>& eff) {
  if (eff.empty()) return;
  std::fprintf(f, "\nefficiency length (CAB): the N from which the pattern's fused time stays >= 5%% below the reference's\n");
  for (const efficiency_row& e : eff) {
    std::fprintf(f, "  %-36s thr %d:", e.workload.c_str(), e.threads);
    for (const crossover& c : e.vs)
      std::fprintf(f, "  vs %s %s", reference_label(c.reference).c_str(), crossover_text(c).c_str());
    std::fprintf(f, "\n");
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Progress line.

progress_line::progress_line() : enabled_(isatty(STDERR_FILENO) == 1), start_(now_s()) {}

void progress_line::show(int done, const std::string& what) {
  if (!enabled_) return;
  const int elapsed = static_cast<int>(now_s() - start_);
  std::fprintf(stderr, "\r\033[K[%d/%d %d:%02d] %s", done, total_, elapsed / 60, elapsed % 60, what.c_str());
  std::fflush(stderr);
  shown_ = true;
}

void progress_line::clear() {
  if (!enabled_ || !shown_) return;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
  shown_ = false;
}

// ---------------------------------------------------------------------------------------------------------------------
// results.json

const std::vector<std::string>& row_keys() {
  static const std::vector<std::string> keys = {
      "workload", "group", "note", "op", "problem", "mask", "n", "batch", "seq_q", "seq_k", "heads_q", "heads_kv", "dim_qk",
      "dim_v", "dtype", "causal", "varlen", "threads", "kernel", "useful_pairs", "dense_pairs", "density",
      "useful_flops", "median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "iqr_pct", "reps", "disturbed_pct",
      "attempts", "gflops", "peak_gflops", "peak_kind", "pct_peak", "tiles_skipped_pct", "dense_ms", "x_dense",
      "dense_disturbed_pct", "dense_note", "inputs_mib", "peak_rss_mib",
      "workspace_mib", "check_rows", "check_max_abs_err", "check_tolerance", "check_ok", "check_skipped", "check_grads", "naive_ms",
      "naive_gflops", "naive_local_ms", "naive_local_gflops", "naive_local_speedup", "naive_local_max_abs_err",
      "naive_local_check_ok", "naive_local_disturbed_pct", "naive_local_note", "openblas_ms", "openblas_gflops", "openblas_speedup", "openblas_workspace_mib",
      "openblas_max_abs_err", "openblas_disturbed_pct", "openblas_cost", "openblas_heads_measured", "openblas_note",
      "error"};
  return keys;
}

json row_json(const result_row& r) {
  json j = json::object();
  const auto opt_string = [](const std::string& s) { return s.empty() ? json() : json(s); };
  j.set("workload", r.workload);
  j.set("group", r.group);
  j.set("note", r.note);
  j.set("op", r.op);
  j.set("problem", r.problem);
  j.set("mask", opt_string(r.mask));
  j.set("n", r.n);
  j.set("batch", r.batch);
  j.set("seq_q", r.seq_q);
  j.set("seq_k", r.seq_k);
  j.set("heads_q", r.heads_q);
  j.set("heads_kv", r.heads_kv);
  j.set("dim_qk", r.dim_qk);
  j.set("dim_v", r.dim_v);
  j.set("dtype", r.dtype);
  j.set("causal", r.causal);
  j.set("varlen", r.varlen);
  j.set("threads", r.threads);
  j.set("kernel", r.kernel);
  j.set("useful_pairs", r.useful_pairs);
  j.set("dense_pairs", r.dense_pairs);
  j.set("density", r.density());
  j.set("useful_flops", r.useful_flops);
  const bool ran = r.error.empty();
  j.set("median_ms", ran ? r.fused.median_s * 1e3 : NAN);
  j.set("min_ms", ran ? r.fused.min_s * 1e3 : NAN);
  j.set("max_ms", ran ? r.fused.max_s * 1e3 : NAN);
  j.set("q1_ms", ran ? r.fused.q1_s * 1e3 : NAN);
  j.set("q3_ms", ran ? r.fused.q3_s * 1e3 : NAN);
  j.set("iqr_pct", ran ? r.fused.iqr_pct() : NAN);
  j.set("reps", r.fused.reps);
  j.set("disturbed_pct", ran ? r.disturbed_pct : NAN);
  j.set("attempts", r.attempts);
  j.set("gflops", ran ? r.gflops : NAN);
  j.set("peak_gflops", r.peak_gflops);
  j.set("peak_kind", r.peak_kind);
  j.set("pct_peak", ran ? r.pct_peak : NAN);
  j.set("tiles_skipped_pct", ran ? r.tiles_skipped_pct : NAN);
  j.set("dense_ms", r.dense_ms);
  j.set("x_dense", r.x_dense);
  j.set("dense_disturbed_pct", r.dense_disturbed_pct);
  j.set("dense_note", opt_string(r.dense_note));
  j.set("inputs_mib", r.inputs_mib);
  j.set("peak_rss_mib", ran ? r.peak_rss_mib : NAN);
  j.set("workspace_mib", ran ? r.workspace_mib : NAN);
  j.set("check_rows", r.check.rows);
  j.set("check_max_abs_err", r.check.rows ? r.check.max_abs_err : NAN);
  j.set("check_tolerance", r.check.rows ? r.check.tolerance : NAN);
  j.set("check_ok", r.check.rows ? json(r.check.ok) : json());
  j.set("check_skipped", opt_string(r.check.skipped));
  j.set("check_grads", opt_string(r.check.grads));
  j.set("naive_ms", r.naive_ms);
  j.set("naive_gflops", r.naive_gflops);
  const bool local_ran = std::isfinite(r.naive_local_ms);
  j.set("naive_local_ms", r.naive_local_ms);
  j.set("naive_local_gflops", r.naive_local_gflops);
  j.set("naive_local_speedup", r.naive_local_speedup);
  j.set("naive_local_max_abs_err", r.naive_local_max_abs_err);
  j.set("naive_local_check_ok", local_ran ? json(r.naive_local_check_ok) : json());
  j.set("naive_local_disturbed_pct", r.naive_local_disturbed_pct);
  j.set("naive_local_note", opt_string(r.naive_local_note));
  j.set("openblas_ms", r.openblas_ms);
  j.set("openblas_gflops", r.openblas_gflops);
  j.set("openblas_speedup", r.openblas_speedup);
  j.set("openblas_workspace_mib", r.openblas_workspace_mib);
  j.set("openblas_max_abs_err", r.openblas_max_abs_err);
  j.set("openblas_disturbed_pct", r.openblas_disturbed_pct);
  j.set("openblas_cost", opt_string(r.openblas_cost));
  j.set("openblas_heads_measured", r.openblas_heads_measured ? json(r.openblas_heads_measured) : json());
  j.set("openblas_note", opt_string(r.openblas_note));
  j.set("error", opt_string(r.error));
  return j;
}

json results_json(const run_info& info, const std::vector<result_row>& rows, const std::vector<efficiency_row>& eff) {
  json doc = json::object();
  doc.set("schema", "omniattn-bench/1");
  doc.set("version", info.version);
  doc.set("command", info.command);
  doc.set("started", info.started);
  doc.set("total_s", info.total_s);
  json machine = json::object();
  machine.set("cpu", info.cpu);
  machine.set("cpus", info.cpus);
  machine.set("isa", info.isa);
  machine.set("openblas_core", info.openblas_core);
  machine.set("peak_cache", info.peak_cache);
  json peaks = json::array();
  for (const machine_peak& p : info.peaks) {
    json e = json::object();
    e.set("threads", p.threads);
    e.set("fp32_fma_gflops", p.fp32_fma_gflops);
    e.set("bf16_dot_gflops", p.bf16_dot_gflops);
    e.set("source", p.source);
    peaks.push(std::move(e));
  }
  machine.set("peaks", std::move(peaks));
  doc.set("machine", std::move(machine));
  json settings = json::object();
  settings.set("quick", info.quick);
  settings.set("baselines", info.baselines);
  settings.set("budget_s", info.budget_s);
  json threads = json::array(), filters = json::array();
  for (const int t : info.threads) threads.push(t);
  for (const std::string& f : info.filters) filters.push(f);
  settings.set("threads", std::move(threads));
  settings.set("filters", std::move(filters));
  doc.set("settings", std::move(settings));
  json jrows = json::array();
  for (const result_row& r : rows) jrows.push(row_json(r));
  doc.set("rows", std::move(jrows));
  json jeff = json::array();
  for (const efficiency_row& e : eff) {
    json je = json::object();
    je.set("workload", e.workload);
    je.set("threads", e.threads);
    json vs = json::array();
    for (const crossover& c : e.vs) {
      json jc = json::object();
      jc.set("reference", c.reference);
      jc.set("status", c.status);
      jc.set("n", c.n);
      jc.set("n_min", c.n_min);
      jc.set("n_max", c.n_max);
      vs.push(std::move(jc));
    }
    je.set("vs", std::move(vs));
    jeff.push(std::move(je));
  }
  doc.set("efficiency_lengths", std::move(jeff));
  return doc;
}

// ---------------------------------------------------------------------------------------------------------------------
// report.md

std::string report_markdown(const run_info& info, const std::vector<result_row>& rows, const std::vector<efficiency_row>& eff,
                            const std::vector<std::string>& plots) {
  std::ostringstream md;
  md << "# omniattn bench report\n\n"
     << "`" << info.command << "` - " << info.started << ", " << fmt("%.0f", info.total_s) << " s"
     << (info.quick ? " (--quick)" : "") << "\n\n"
     << "- machine: " << info.cpu << ", " << info.cpus << " CPUs, ISA " << info.isa << ", OpenBLAS kernel " << info.openblas_core
     << "\n";
  for (const machine_peak& p : info.peaks)
    md << "- peak with " << p.threads << " thread(s): fp32 FMA " << fmt("%.0f", p.fp32_fma_gflops) << " GFLOP/s, bf16 dot "
       << fmt("%.0f", p.bf16_dot_gflops) << " GFLOP/s (" << p.source << ", src/cpu/probe.h)\n";
  md << "- timing: one warm-up run, then repetitions until " << info.budget_s
     << " s are spent (at least 3); median, interquartile range and min-max\n\n"
     << "GFLOP/s = 2 * useful pairs * (dqk + dv) / median time (= 4 * mask area * B * H * D for dv = dqk): only the "
        "(query, key) pairs the mask allows count. % of peak is against the fp32 FMA peak for the same thread count (the "
        "bf16 dot peak for bf16dot kernels). Workspace is the peak resident memory a call adds over its inputs "
        "(VmHWM after a reset minus VmRSS before it). `check` recomputes sampled query rows in fp64 and compares. "
        "`disturbed %` is the share of the CPU time the measurement could have had that other processes or the "
        "hypervisor (steal) took; above 10% the measurement is repeated (up to 3 tries) and the least disturbed kept, "
        "so a high value marks a number to distrust.\n\n"
     << "OpenBLAS unfused: sgemm S = scale Q K^T, vectorized masked softmax, sgemm O = P V per (batch, head), in f32. It "
        "handles dense and causal only; for any other mask it is timed at the dense cost (every pair computed, the mask "
        "not applied), the least an unfused implementation pays. `x OpenBLAS` = OpenBLAS time / fused time. Times "
        "marked * ran on fewer heads and were scaled by the head count (the unfused path runs heads one after another). "
        "The naive f32 path (single thread) runs only where its work is small.\n\n"
     << "Against dense: on masked rows (a mask or the causal flag), `dense ms` is the fused kernel on the same shape, "
        "dtype and threads with no mask and no causal flag, timed the same way (measured once per shape, or the "
        "unmasked row of that shape); `x dense` = dense time / fused time (> 1: faster than dense), to compare with the "
        "ideal 1 / `density` (useful pairs / all pairs); `?` marks a dense time whose measurement was disturbed "
        "(over 10%). Dense runs estimated at over "
     << fmt("%.2g", k_dense_max_budgets * info.budget_s)
     << " s each at the fp32 FMA peak are not measured (the note says so).\n\n"
     << "Naive local (grid-local masks: neighborhood, halo): the per-query baseline of bench/naive_local.cc, on the "
        "row's thread count: each query's window from grid_local::window per axis, its K/V rows gathered, fp32 dot "
        "products, softmax, weighted sum. `x naive local` = its time / the fused time (issue #5's target: >= 10 for 2D "
        "7x7); its own output is checked against fp64 like the kernel's.\n";
  if (std::any_of(rows.begin(), rows.end(), [](const result_row& r) { return r.op == "backward"; }))
    md << "\nBackward rows (`op` backward: the bwd/ group, custom-bwd/): attention_backward on the forward's out and lse "
          "(the forward runs once, untimed). GFLOP/s count FlashAttention's backward FLOPs, 2.5 x the forward's over "
          "the mask area (10 * mask area * B * H * D at dv = dqk). The OpenBLAS column is the unfused backward per "
          "(batch, head): sgemm S = scale Q K^T, masked pairs -inf, row softmax P, sgemm dV = P^T dO, sgemm dP = dO V^T, "
          "dS = P (dP - rowsum(dO * O)), sgemm dQ = scale dS K and dK = scale dS^T Q, with P and dS materialized "
          "(Lq x Lk f32 each) and the mask applied (always the dense cost). `check` compares dq on sampled query rows "
          "and dk, dv on sampled key rows of one kv head with fp64 (`check_grads` in results.json; dk, dv only where "
          "that kv head's recomputation is affordable); the baseline's gradients are checked the same way "
          "(`openblas_max_abs_err`). The backward counts no tiles (`tiles skipped` -).\n";
  std::vector<std::string> groups;
  for (const result_row& r : rows)
    if (std::find(groups.begin(), groups.end(), r.group) == groups.end()) groups.push_back(r.group);
  for (const std::string& g : groups) {
    // Groups with grid-local masks get the naive neighborhood baseline's columns; the others stay as they were.
    const bool local = std::any_of(rows.begin(), rows.end(), [&](const result_row& r) {
      return r.group == g && (std::isfinite(r.naive_local_ms) || !r.naive_local_note.empty());
    });
    md << "\n## " << g << "\n\n"
       << "| workload | N | shape | mask | kernel | thr | median ms | IQR % | min-max ms | reps | disturbed % | GFLOP/s | % "
          "peak | tiles skipped | density | dense ms | x dense | workspace MiB | OpenBLAS ms | x OpenBLAS | OpenBLAS MiB | naive GFLOP/s | "
       << (local ? "naive local ms | naive local GFLOP/s | x naive local | " : "") << "check |\n"
       << "|---|---:|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
       << (local ? "---:|---:|---:|" : "") << "---|\n";
    for (const result_row& r : rows) {
      if (r.group != g) continue;
      md << "| " << r.workload << " | " << r.n << " | " << shape_label(r) << " | "
         << (r.mask.empty() ? "-" : "`" + md_cell(r.mask) + "`") << " | ";
      if (!r.error.empty()) {  // the remaining columns empty
        md << "ERROR: " << md_cell(r.error) << " |" << std::string(local ? 21 : 18, '|') << "\n";
        continue;
      }
      std::string local_cells;
      if (local) {
        local_cells = r.naive_local_note.empty() ? fmt("%.2f", r.naive_local_ms) : md_cell(r.naive_local_note);
        local_cells += " | " + fmt("%.2f", r.naive_local_gflops) + " | " + fmt("%.1f", r.naive_local_speedup) + " | ";
      }
      std::string check = r.check.rows ? fmt("%.1e", r.check.max_abs_err) + (r.check.ok ? " ok" : " **FAIL**") : "-";
      if (std::isfinite(r.naive_local_ms) && !r.naive_local_check_ok)
        check += ", naive local **FAIL** (" + fmt("%.1e", r.naive_local_max_abs_err) + ")";
      std::string blas = fmt("%.2f", r.openblas_ms);
      if (std::isfinite(r.openblas_ms) && r.openblas_heads_measured < r.heads_q) blas += "*";
      if (!r.openblas_note.empty()) blas = md_cell(r.openblas_note);
      const std::string dense = r.dense_note.empty() ? fmt("%.3f", r.dense_ms) : md_cell(r.dense_note);
      md << "`" << r.kernel << "` | " << r.threads << " | " << fmt("%.3f", r.fused.median_s * 1e3) << " | "
         << fmt("%.1f", r.fused.iqr_pct()) << " | " << fmt("%.3f", r.fused.min_s * 1e3) << "-" << fmt("%.3f", r.fused.max_s * 1e3)
         << " | " << r.fused.reps << " | " << fmt("%.0f", r.disturbed_pct)
         << (r.attempts > 1 ? " (" + std::to_string(r.attempts) + " tries)" : "") << " | " << fmt("%.1f", r.gflops) << " | " << fmt("%.0f", r.pct_peak) << " | "
         << fmt("%.1f", r.tiles_skipped_pct) << " | " << fmt("%.4f", r.density()) << " | " << dense << " | "
         << fmt("%.2f", r.x_dense) << (r.dense_disturbed_pct > k_max_disturbed_pct ? "?" : "") << " | "
         << fmt("%.1f", r.workspace_mib) << " | " << blas << " | "
         << fmt("%.2f", r.openblas_speedup) << " | " << fmt("%.0f", r.openblas_workspace_mib) << " | "
         << fmt("%.2f", r.naive_gflops) << " | " << local_cells << check << " |\n";
    }
  }
  if (!eff.empty()) {
    md << "\n## Efficiency lengths\n\n"
       << "CAB's efficiency length: the sequence length from which the pattern's fused kernel stays at least 5% faster "
          "than the reference on the same shape (5%: above the run-to-run noise; interpolated in log N between sweep "
          "points; `<=N` faster at every measured N, `never<=N` not faster up to the largest N). The OpenBLAS reference "
          "is the unfused path at the dense cost of the first reference's shape.\n\n"
       << "| pattern | thr |";
    std::vector<std::string> refs;  // one column per reference, in order of appearance
    for (const efficiency_row& e : eff)
      for (const crossover& c : e.vs)
        if (std::find(refs.begin(), refs.end(), c.reference) == refs.end()) refs.push_back(c.reference);
    for (const std::string& ref : refs) md << " vs " << reference_label(ref) << " |";
    md << "\n|---|---:|";
    for (std::size_t i = 0; i < refs.size(); ++i) md << "---:|";
    md << "\n";
    for (const efficiency_row& e : eff) {
      md << "| " << e.workload << " | " << e.threads << " |";
      for (const std::string& ref : refs) {
        std::string cell = "-";
        for (const crossover& c : e.vs)
          if (c.reference == ref) cell = crossover_text(c);
        md << " " << cell << " |";
      }
      md << "\n";
    }
  }
  if (!plots.empty()) {
    md << "\n## Plots\n\n";
    for (const std::string& p : plots) md << "![" << p << "](" << p << ")\n\n";
  }
  return md.str();
}

// ---------------------------------------------------------------------------------------------------------------------
// Report directory and plots.

namespace {

const char* const k_plot_files[] = {"throughput.png", "peak_pct.png", "memory.png", "efficiency.png", "naive_local.png"};

std::string find_plot_script() {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (const char* env = std::getenv("OMNIATTN_BENCH_PLOT"); env && *env) return env;
  const fs::path here = fs::path(__FILE__).parent_path() / "plot.py";  // the source tree this binary was built from
  if (fs::exists(here, ec)) return here.string();
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const char* rel : {"../../bench/plot.py", "../bench/plot.py", "../share/omniattn/plot.py"}) {
      const fs::path candidate = exe.parent_path() / rel;
      if (fs::exists(candidate, ec)) return candidate.lexically_normal().string();
    }
  }
  return "";
}

// Runs python on the script; returns its exit status, or -1 when python could not be started.
int run_python(const std::string& script, const std::string& json_path, const std::string& dir) {
  std::string python = "python3";
  if (const char* env = std::getenv("OMNIATTN_PYTHON"); env && *env) python = env;
  else if (access("/usr/bin/python3", X_OK) == 0) python = "/usr/bin/python3";  // Debian's, with python3-matplotlib
  std::vector<std::string> args = {python, script, json_path, dir};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawnp(&pid, python.c_str(), nullptr, nullptr, argv.data(), environ) != 0) return -1;
  int st = 0;
  if (waitpid(pid, &st, 0) < 0) return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

bool write_file(const std::string& path, const std::string& text, std::string& error) {
  std::ofstream f(path);
  f << text;
  f.close();
  if (!f) {
    error = "cannot write " + path;
    return false;
  }
  return true;
}

}  // namespace

bool write_report(const std::string& dir, const run_info& info, const std::vector<result_row>& rows,
                  const std::vector<efficiency_row>& eff, bool plots, std::string& error) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    error = "--out " + dir + ": " + ec.message();
    return false;
  }
  const std::string json_path = (fs::path(dir) / "results.json").string();
  if (!write_file(json_path, results_json(info, rows, eff).dump() + "\n", error)) return false;
  for (const char* f : k_plot_files) fs::remove(fs::path(dir) / f, ec);
  std::vector<std::string> made;
  if (plots) {
    const std::string script = find_plot_script();
    const int rc = script.empty() ? -2 : run_python(script, json_path, dir);
    if (rc == -2)
      std::fprintf(stderr, "omniattn bench: note: bench/plot.py not found (set OMNIATTN_BENCH_PLOT); plots skipped\n");
    else if (rc == -1) std::fprintf(stderr, "omniattn bench: note: python3 not found; plots skipped\n");
    else if (rc == 3)
      std::fprintf(stderr, "omniattn bench: note: matplotlib is missing (apt-get install python3-matplotlib); plots skipped\n");
    else if (rc != 0) std::fprintf(stderr, "omniattn bench: note: %s failed (exit %d); plots skipped\n", script.c_str(), rc);
    for (const char* f : k_plot_files)
      if (fs::exists(fs::path(dir) / f, ec)) made.emplace_back(f);
  }
  return write_file((fs::path(dir) / "report.md").string(), report_markdown(info, rows, eff, made), error);
}

}  // namespace omniattn::bench
