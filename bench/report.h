// Results of `omniattn bench`: one row per (workload point, thread count), efficiency lengths, and their outputs:
// the aligned stdout table, the live progress line, results.json (schema in bench/README.md), report.md and the
// PNG plots drawn by bench/plot.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/json.h"
#include "bench/measure.h"
#include "bench/workloads.h"

namespace omniattn::bench {

// A measurement whose disturbance (CPU share others took) is above this is retried; a kept one above it is marked.
constexpr double k_max_disturbed_pct = 10.0;

struct result_row {
  // What ran.
  std::string workload, group, note;
  std::string op = "forward";  // "forward" (attention) or "backward" (attention_backward)
  std::string mask;     // expanded spec string; empty: none
  std::string problem;  // problem::describe()
  std::int64_t n = 0, batch = 0, seq_q = 0, seq_k = 0, heads_q = 0, heads_kv = 0, dim_qk = 0, dim_v = 0;
  std::string dtype, causal;
  bool varlen = false;
  int threads = 1;
  std::string kernel;
  // Work: useful pairs are the allowed (query, key) pairs over all batches and heads.
  std::int64_t useful_pairs = 0, dense_pairs = 0;
  double useful_flops = 0;  // 2 * useful_pairs * (dim_qk + dim_v); backward rows 2.5x that (ops.h op_flops)
  // The fused kernel.
  timing fused;
  double disturbed_pct = 0;  // CPU time others (processes, hypervisor steal) took during the kept attempt
  int attempts = 1;          // measurements made (more than one when the first ones were disturbed)
  double gflops = 0, peak_gflops = 0, pct_peak = 0;
  std::string peak_kind;  // "fp32_fma" or "bf16_dot"
  double tiles_skipped_pct = 0;  // NaN where the kernel does not count tiles (the backward)
  // The dense run of the same shape, dtype and threads (no mask, no causal flag; suite.h dense_key), on masked rows:
  // issue #4's "time against the dense run". x_dense = dense_ms / fused median (> 1: faster than dense); the ideal is
  // 1 / density. NaN on unmasked rows (they are the dense run) and where it was not measured (dense_note says why).
  double dense_ms = NAN, x_dense = NAN, dense_disturbed_pct = NAN;
  std::string dense_note;
  double inputs_mib = 0, peak_rss_mib = 0, workspace_mib = 0;
  check_result check;
  // Baselines; NaN when not run.
  double naive_ms = NAN, naive_gflops = NAN;
  // The naive neighborhood baseline (grid-local masks only; naive_local.cc), on the row's thread count.
  double naive_local_ms = NAN, naive_local_gflops = NAN;
  double naive_local_speedup = NAN;      // its time / the fused time
  double naive_local_max_abs_err = NAN;  // its own output on sampled rows vs fp64
  bool naive_local_check_ok = true;
  double naive_local_disturbed_pct = NAN;
  std::string naive_local_note;  // why it did not run on a grid-local row
  double openblas_ms = NAN, openblas_gflops = NAN, openblas_speedup = NAN, openblas_workspace_mib = NAN;
  std::string openblas_cost;  // "dense", "causal" or "dense (mask not applied)"; empty when not run
  double openblas_max_abs_err = NAN;
  double openblas_disturbed_pct = NAN;        // its own output (dense / causal spec) on sampled rows vs fp64
  std::int64_t openblas_heads_measured = 0;  // < heads_q: timed on fewer heads and scaled
  std::string openblas_note;                 // why it did not run, when it did not
  std::string error;                         // the row could not run

  // Useful pairs over all pairs of the shape (mask area / (Lq * Lk) per batch and head); NaN for an empty shape.
  double density() const {
    return dense_pairs > 0 ? static_cast<double>(useful_pairs) / static_cast<double>(dense_pairs) : NAN;
  }
};

// Where an efficient pattern becomes faster than a reference on the same shape, from the N sweep.
struct crossover {
  std::string reference;  // workload name, or "openblas" (the unfused OpenBLAS path at dense cost)
  std::string status;     // "crossed", "always_faster", "never_faster", "no_data"
  double n = NAN;         // crossed: interpolated in log N between the last slower and the first faster point
  std::int64_t n_min = 0, n_max = 0;  // the sweep range compared
};

struct efficiency_row {
  std::string workload;
  int threads = 1;
  std::vector<crossover> vs;
};

// "Faster" means at least 5% faster: below that, this benchmark's run-to-run noise decides (a VM's medians move by a
// few percent between runs).
constexpr double k_faster_ratio = 0.95;
// Crossover of t_eff below k_faster_ratio * t_ref over increasing ns (the pattern must stay faster from that point on;
// the crossing is interpolated linearly in the time ratio and in log N).
crossover find_crossover(const std::vector<std::int64_t>& ns, const std::vector<double>& t_eff,
                         const std::vector<double>& t_ref);
// For every workload with refs: crossovers against each ref (fused) and against its own OpenBLAS (dense cost) times.
std::vector<efficiency_row> efficiency_lengths(const std::vector<workload>& selected, const std::vector<result_row>& rows);

struct run_info {
  std::string version, command, started, cpu, isa, openblas_core;
  int cpus = 1;
  std::vector<machine_peak> peaks;
  std::string peak_cache, peak_note;
  bool quick = false, baselines = true;
  double budget_s = 0;
  std::vector<int> threads;
  std::vector<std::string> filters;
  double total_s = 0;
};

// The keys every element of results.json "rows" has, in order (the schema bench/README.md documents).
const std::vector<std::string>& row_keys();
json row_json(const result_row& r);
json results_json(const run_info& info, const std::vector<result_row>& rows, const std::vector<efficiency_row>& eff);
std::string report_markdown(const run_info& info, const std::vector<result_row>& rows, const std::vector<efficiency_row>& eff,
                            const std::vector<std::string>& plots);

// The stdout table.
void print_table_header(std::FILE* f);
void print_table_row(std::FILE* f, const result_row& r);
void print_efficiency(std::FILE* f, const std::vector<efficiency_row>& eff);
std::string shape_label(const result_row& r);  // e.g. "b1 h32:8 d128 bf16 br", "b1 1024x4096 h8 d64 f32"

// A one-line live status on stderr, only when stderr is a terminal.
class progress_line {
 public:
  progress_line();
  void set_total(int total) { total_ = total; }
  void show(int done, const std::string& what);
  void clear();  // before anything else is written to the terminal
  ~progress_line() { clear(); }

 private:
  bool enabled_ = false, shown_ = false;
  int total_ = 0;
  double start_ = 0;
};

// Writes results.json, runs bench/plot.py on it (skipped with a note when python3 or matplotlib is missing, never an
// error) and writes report.md. Returns false with `error` only when the directory or files cannot be written.
bool write_report(const std::string& dir, const run_info& info, const std::vector<result_row>& rows,
                  const std::vector<efficiency_row>& eff, bool plots, std::string& error);

}  // namespace omniattn::bench
