// Measurement for `omniattn bench`: timing with warm-up and a time budget, peak resident memory, the machine's peaks
// (measured by src/cpu/probe.h, cached per machine), useful-work counts and a sampled-row check against an fp64 oracle.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "omniattn/params.h"

namespace omniattn::bench {

struct measure_policy {
  double budget_s = 0.5;  // keep repeating until this much time is spent (and min_reps are done)
  int min_reps = 3;
  int max_reps = 100;
  double cap_s = 10.0;    // stop after this much time even before min_reps (at least one timed run)
  bool warm_up = true;    // one untimed run first (page faults, thread pool start)
};

struct timing {
  double median_s = 0, min_s = 0, max_s = 0, q1_s = 0, q3_s = 0;  // q1/q3: lower and upper quartile
  int reps = 0;
  double iqr_pct() const { return median_s > 0 ? 100.0 * (q3_s - q1_s) / median_s : 0.0; }
};

timing measure(const std::function<void()>& fn, const measure_policy& policy);

// CPU time of the whole machine (Linux /proc/stat) and of this process, to tell how much of a measurement other
// processes or the hypervisor (steal time) took.
struct cpu_sample {
  double wall_s = 0, busy_s = 0, steal_s = 0, self_s = 0;  // busy: user + nice + system + irq + softirq, all CPUs
};
cpu_sample sample_cpu();
// Share of the CPU time `threads` threads could have had between a and b that others took: their busy time plus steal,
// beyond what the CPUs the measurement left idle could absorb; in percent (0 when the machine was quiet).
double disturbed_pct(const cpu_sample& a, const cpu_sample& b, int threads);

// measure(), repeated (after a short pause, at most max_attempts in all) while others took more than
// max_disturbed_pct of the CPU time; the least disturbed attempt is kept. `before_attempt` runs before each (e.g. to
// reset the peak memory).
struct steady_timing {
  timing t;
  double disturbed_pct = 0;
  int attempts = 0;
};
steady_timing measure_steady(const std::function<void()>& fn, const measure_policy& policy, int threads,
                             const std::function<void()>& before_attempt = {}, double max_disturbed_pct = 10.0,
                             int max_attempts = 3);

// Peak resident memory of the process since the last reset (Linux VmHWM, reset through /proc/self/clear_refs), and
// the resident memory now (VmRSS); MiB.
void reset_peak_rss();
double peak_rss_mib();
double current_rss_mib();

// "model name" of /proc/cpuinfo (the cache key of the peaks), and the CPUs this process may run on.
std::string cpu_model();
// The current time as ISO 8601 UTC, e.g. "2026-11-23T13:47:57Z".
std::string utc_now();
int available_cpus();

struct machine_peak {
  int threads = 1;
  double fp32_fma_gflops = 0;  // cpu::measure_fp32_peak
  double bf16_dot_gflops = 0;  // cpu::measure_bf16_dot_peak (0 without AVX512-BF16)
  std::string source;          // "measured" or "cache"
};

// The peak cache file: $OMNIATTN_PEAK_CACHE, else $XDG_CACHE_HOME/omniattn/peak.json, else ~/.cache/omniattn/peak.json;
// empty when none of these can be formed.
std::string peak_cache_path();

// Peaks for each thread count: from the cache when it holds an entry for (cpu model, ISA, threads) and use_cache is
// set, measured otherwise (and then written to the cache). `note` says what happened to the cache, if anything.
std::vector<machine_peak> machine_peaks(const std::vector<int>& threads, bool use_cache, const std::string& isa,
                                        std::string& note);

// (query, key) pairs the spec allows over all batches and heads, counted with the kernels' row words (one mask
// evaluation per 64 keys, one head / batch when the mask does not depend on them). Equals mask_area(p).
std::int64_t useful_pairs(const attn_params& p);

struct check_result {
  std::int64_t rows = 0;   // query rows compared (0: not checked)
  double max_abs_err = 0;  // max |out - oracle| over their elements
  double tolerance = 0;
  bool ok = true;
  std::string skipped;  // why no row was checked
  std::string grads;    // backward checks: the gradients compared ("dq,dk,dv", or "dq" with the reason); forward: empty
};

// Recomputes up to `max_rows` query rows (spread over batches, heads and positions, first and last row included)
// in fp64 from p's inputs and compares with p.out. Supports masks, causal and varlen; a spec with score modifiers,
// RoPE, sinks or a block mask is not checked (skipped says so).
check_result check_sampled_rows(const attn_params& p, int max_rows);

// The backward's counterpart, against fp64 recomputed from p's inputs and d_out (the forward included: lse_i and D_i
// in fp64, never p.fwd.lse or p.fwd.out): dq on up to `max_rows` sampled query rows (first and last included), dk and dv
// on up to max_rows / 4 sampled key rows of one (sequence, kv head). A key row needs lse_i and D_i of every query row
// of its GQA group: (the allowed pairs of those rows) x (dqk + dv) multiply-adds; above max_key_work (default 2^30:
// dense N = 2048 at D = 128, any N for sparse masks such as a neighborhood) only dq is checked and `grads` says so. Tolerance as in check_sampled_rows, with max|ref| over every checked
// gradient element and the gradients' dtype. Same limits (no score modifiers, RoPE, sinks, block masks).
check_result check_backward_sampled(const attn_bwd_params& p, int max_rows, double max_key_work = 1073741824.0);

}  // namespace omniattn::bench
