// The CPU tile engine's scheduler, shared by every op: one OpenMP parallel region per call (or per K/V chunk) that runs
// the op's phases in order with a barrier between them (pack, then compute; or prologue, items, epilogue), so a call
// pays one thread wake-up, not one per phase. Each iteration runs under parallel_errors: the first exception is
// rethrown on the caller after the region, never escaping an OpenMP construct.
//   even:    a static split of equal-cost iterations (packing, zeroing, per-row prologues)
//   by_cost: dynamic, one iteration at a time, over items sorted heaviest first (sort_by_cost), so no thread idles at
//            the end of a skewed (causal, local) workload
// Which thread runs which item never changes what an item computes: each output element is written by exactly one
// item in a fixed order (or by fixed per-split partials reduced in order), so results do not depend on the thread
// count. Phase bodies call only out-of-line (HWY_NOINLINE) kernel code: the region's outlined function carries no
// Highway target attribute, so vector code inlined into it would not compile for the vector ISA under clang.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/parallel.h"

namespace omniattn::cpu {

enum class sched : std::uint8_t { even, by_cost };

template <class Body>
struct phase {
  std::int64_t count;
  sched how;
  Body body;  // body(iteration, thread id)
};

template <class Body>
phase<Body> make_phase(std::int64_t count, sched how, Body body) {
  return {count, how, std::move(body)};
}

template <class Body>
void run_phase(const phase<Body>& ph, int tid, detail::parallel_errors& errors) {
  if (ph.how == sched::even) {
#pragma omp for schedule(static)
    for (std::int64_t it = 0; it < ph.count; ++it) errors.run([&] { ph.body(it, tid); });
  } else {
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t it = 0; it < ph.count; ++it) errors.run([&] { ph.body(it, tid); });
  }
}

// Runs the phases in one parallel region of `threads` threads (the implicit barrier of each omp for separates them).
template <class... Bodies>
void run_phases(int threads, detail::parallel_errors& errors, const phase<Bodies>&... phases) {
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    (run_phase(phases, tid, errors), ...);
  }
}

// Heaviest first; equal costs keep their order (stable), so the item list is a function of the problem only.
template <class Item>
void sort_by_cost(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
}

}  // namespace omniattn::cpu
