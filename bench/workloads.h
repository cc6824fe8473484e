// The benchmark's workloads as data: a name, a problem string (parse_problem), a mask spec string (parse_mask) and an
// N sweep. The built-in table lives in workloads.cc; `--problem/--mask` and `--workloads FILE` add workloads of the
// same form. Problem and mask strings may hold templates expanded per sweep point:
//   {n}  {n/K}  {n*K}       the sweep value (integer arithmetic)
//   {docs:W1:W2:...}        document offsets 0,o1,...,n splitting n in proportion to the weights (for document(...))
//   {varlen:W1:W2:...}      the same split as varlen lq:lk pairs L1:L1/L2:L2/... (for varlen=...)
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "bench/json.h"
#include "bench/ops.h"
#include "core/problem.h"

namespace omniattn::bench {

struct workload {
  std::string name;                    // "group/name", e.g. "mask/window"; the group is the text before '/'
  std::string problem;                 // parse_problem text, may hold templates
  std::string mask;                    // parse_mask text, may hold templates; empty: no mask
  std::vector<std::int64_t> ns;        // N sweep; empty: the problem is fixed (no {n} allowed)
  std::vector<std::int64_t> quick_ns;  // sweep under --quick; empty: the first point of ns
  std::string quick_problem;           // appended to the problem under --quick (later keys win), e.g. "hq=4,hkv=1"
  std::vector<std::string> refs;       // workloads of the same shape to report efficiency lengths against
  std::string note;                    // one line for the report
  std::string origin = "built-in";     // "built-in", "--problem" or the workload file
  op_kind op = op_kind::forward;       // what its rows measure: attention() or attention_backward()

  std::string group() const { return name.substr(0, name.find('/')); }
};

// One point of a workload: the concrete problem and mask.
struct instance {
  std::string workload;
  std::int64_t n = 0;  // the sweep value; for fixed problems the key length (total key tokens for varlen)
  problem prob;
  std::string mask_text;  // expanded; empty: no mask
  mask_expr mask;
};

// The built-in table: CAB's four patterns, the mask catalogue, neighborhood attention, named model shapes (forward), and
// the backward group bwd/ (dense, causal, sliding window, documents, 2D neighborhood x D 64, 128 x f32, bf16).
const std::vector<workload>& built_in_workloads();

// Expands the templates above for sweep value n (has_n false: any {n...} template is an error).
bool expand_templates(std::string_view text, std::int64_t n, bool has_n, std::string& out, std::string& error);

// The N values a workload runs at (quick: quick_ns, else the first point of ns); empty for fixed problems.
std::vector<std::int64_t> sweep_points(const workload& w, bool quick);

// Concrete problems of a workload: one per sweep point (quick: quick_ns), with `overrides` ("key=value,...")
// appended to every problem string. Each problem is validated (parse_problem, parse_mask, make_params on the shape,
// a 16 GiB limit on its buffers); errors name the workload, the sweep point and the rule.
bool instantiate(const workload& w, bool quick, const std::string& overrides, std::vector<instance>& out, std::string& error);

// Shell-style glob over workload names: '*' any run (including '/'), '?' one character, [abc] a set.
bool glob_match(std::string_view pattern, std::string_view name);

// "256,1024" -> {256, 1024}; every value a positive integer.
bool parse_int_list(std::string_view text, std::vector<std::int64_t>& out);

// A workload file (format in bench/README.md): {"workloads": [{"name": ..., "problem": ..., ...}, ...]} or a bare
// array of workload objects. Errors name the source, the workload and the key.
bool parse_workload_json(const json& doc, const std::string& source, std::vector<workload>& out, std::string& error);
bool read_workload_file(const std::string& path, std::vector<workload>& out, std::string& error);

}  // namespace omniattn::bench
