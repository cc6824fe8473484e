// `omniattn bench` (the suite): its command line, workload selection and the run that produces the report.
// `omniattn bench --kernel` is the kernel table of kernel.cc.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/workloads.h"

namespace omniattn::bench {

struct suite_options {
  bool help = false, list = false, quick = false;
  bool baselines = true, plots = true, use_cache = true;
  double budget_s = 0.4;               // per measurement (--quick: 0.1)
  std::vector<int> threads;            // empty: every CPU this process may use
  std::vector<std::string> filters;    // name globs; empty: everything (or only the custom workloads when there are any)
  std::vector<workload> custom;        // --problem/--mask and --workloads FILE
  std::vector<std::int64_t> ns;        // --n: replaces the N sweep of swept and custom workloads
  std::string overrides;               // --set key=value,...: appended to every problem string
  std::vector<op_kind> ops;            // --op: only workloads of these ops; --problem workloads run as each (empty:
                                       // every workload, --problem ones as forward)
  std::string out_dir = "bench-report";  // --out; empty (--no-report): no report directory
  std::string command;                 // the command line, for the report
};

// Parses argv[first..argc). On failure returns false and `error` names the argument and the rule.
bool parse_suite_args(int argc, char** argv, int first, suite_options& out, std::string& error);

// The workloads to run: built-ins and custom ones matching the filters (only the custom ones when there are custom
// workloads and no filter), plus the references they name; --n applied. Errors for a filter that matches nothing and
// an unknown reference.
bool select_workloads(const suite_options& o, std::vector<workload>& out, std::string& error);

void print_suite_usage(std::FILE* f);
void print_workload_list(std::FILE* f, const std::vector<workload>& all, bool quick);

// The dense run a masked row is compared with ("x dense"): the same problem (shape, dtype, layout, varlen lengths)
// without its causal flag and mask, on the same thread count and op. dense_key names it, so rows of one shape share one
// measurement (the seed does not change the cost and is left out).
std::string dense_key(const problem& p, int threads, op_kind op = op_kind::forward);
// Dense runs estimated to take more than this many budgets each are not measured: a measurement is a warm-up and at
// least three runs, and the estimate (dense FLOPs at the fp32 FMA peak; bf16 kernels reach about that, far from the
// bf16 dot peak) is 1.5-3x below the real time, so a 1 s estimate costs 6-12 s. With 5 budgets the 3D neighborhood
// rows' dense runs (275 GFLOP, 2-3.7 s each) took 24 of 211 s of a default suite. Default budget 0.4 s: 1 s, which
// skips the 8k-token model rows and the 3D neighborhood rows; --budget 1 includes the latter.
constexpr double k_dense_max_budgets = 2.5;
// Why the dense run is not measured (its estimate is over the limit), or "" to measure it.
std::string dense_skip_reason(double dense_flops, double peak_gflops, double budget_s);

// Runs the suite; returns the exit code (0 ok, 1 a row failed or a check failed).
int run_suite(const suite_options& o);

// The kernel table (`omniattn bench --kernel ...`, kernel.cc); argv as given to bench_main.
int kernel_main(int argc, char** argv);

}  // namespace omniattn::bench
