// The public entry point: validate once, select once, run.
#include <omp.h>

#include <algorithm>

#include "core/backends.h"
#include "omniattn/attention.h"

namespace omniattn {

namespace detail {
int resolve_threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }
int max_threads() { return std::max(8, 4 * omp_get_num_procs()); }
}  // namespace detail

selection select(const attn_params& p, backend b) {
  if (b == backend::reference) return {reference_attention, "reference", {"reference: fp64 oracle, supports every spec"}};
  selection fast = cpu::select(p);
  if (b == backend::cpu || fast.ok()) return fast;
  // automatic: the oracle is the fallback for problems no fast kernel covers, and says so.
  selection ref{reference_attention, "reference", fast.reasons};
  ref.reasons.push_back("reference: chosen as fallback, no fast kernel fits (slow: fp64 plain loops)");
  return ref;
}

status attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, const options& opt) {
  attn_params p;
  if (status st = make_params(q, k, v, out, s, opt, p); !st) return st;
  const selection sel = select(p, opt.use);
  if (!sel.ok()) {
    std::string msg = "[attention] no ";
    msg += backend_name(opt.use);
    msg += " kernel fits:";
    for (const std::string& r : sel.reasons) msg += "\n  " + r;
    return {msg};
  }
  sel.run(p);
  return {};
}

}  // namespace omniattn
