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

// Runs the suite; returns the exit code (0 ok, 1 a row failed or a check failed).
int run_suite(const suite_options& o);

// The kernel table (`omniattn bench --kernel ...`, kernel.cc); argv as given to bench_main.
int kernel_main(int argc, char** argv);

}  // namespace omniattn::bench
