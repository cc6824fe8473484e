// omniattn CLI: argument parsing, shared helpers and subcommand dispatch.
#include <charconv>
#include <cstdio>
#include <exception>
#include <iostream>
#include <new>
#include <sstream>
#include <cstdlib>
#include <string_view>

#include "bench/bench.h"
#include "cli.h"
#include "core/backends.h"
#include "omniattn/version.h"

namespace omniattn::cli {
namespace {

constexpr int k_max_threads = 1024;
// Largest total buffer size (q, k, v, out, lse) one problem_data may allocate; `check` allocates three of them.
constexpr std::int64_t k_max_problem_bytes = std::int64_t{4} << 30;

bool parse_threads(std::string_view text, int& out) {
  int n = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (ec != std::errc() || ptr != text.data() + text.size() || n < 0 || n > k_max_threads) return false;
  out = n;
  return true;
}

bool parse_backend(std::string_view text, backend& out) {
  if (text == "auto" || text == "automatic") out = backend::automatic;
  else if (text == "cpu") out = backend::cpu;
  else if (text == "reference" || text == "ref") out = backend::reference;
  else return false;
  return true;
}

// Product of absolute values with overflow detection.
bool checked_product(std::initializer_list<std::int64_t> factors, std::int64_t& out) {
  std::int64_t r = 1;
  for (std::int64_t f : factors) {
    if (f < 0) f = -f;  // negative sizes are rejected later by make_params; only guard the allocation here
    if (__builtin_mul_overflow(r, f, &r)) return false;
  }
  out = r;
  return true;
}

}  // namespace

bool parse_command_line(int argc, char** argv, int first, command_line& out, std::string& error) {
  for (int i = first; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      out.help = true;
      continue;
    }
    if (arg == "--linear") {  // check: the problems are linear-attention problems (cli_linear.cc)
      out.linear = true;
      continue;
    }
    if (arg.size() > 1 && arg[0] == '-') {
      std::string_view name = arg, value;
      bool has_value = false;
      if (const auto eq = arg.find('='); eq != std::string_view::npos) {
        name = arg.substr(0, eq);
        value = arg.substr(eq + 1);
        has_value = true;
      }
      if (name != "--backend" && name != "--threads" && name != "--mask" && name != "--score" && name != "--cp" &&
          name != "--cp-use" && name != "--cp-layout" && name != "--cp-chunks") {
        error = "unknown option '" + std::string(arg) + "'";
        return false;
      }
      if (!has_value) {
        if (i + 1 >= argc) {
          error = "option " + std::string(name) + " needs a value";
          return false;
        }
        value = argv[++i];
      }
      if (name == "--backend" && !parse_backend(value, out.use)) {
        error = "--backend '" + std::string(value) + "': expected auto, cpu or reference";
        return false;
      }
      if (name == "--mask") {
        if (const std::string err = parse_mask(value, out.mask); !err.empty()) {
          error = "--mask: " + err;
          return false;
        }
        continue;
      }
      if (name == "--cp" || name == "--cp-chunks") {
        const std::string text(value);
        char* end = nullptr;
        const long long x = std::strtoll(text.c_str(), &end, 10);
        if (text.empty() || *end != '\0' || x < (name == "--cp" ? 1 : 0) || x > (1 << 20)) {
          error = std::string(name) + " '" + text + "': expected an integer in " + (name == "--cp" ? "1" : "0") + "..1048576";
          return false;
        }
        if (name == "--cp") out.cp_ranks = static_cast<int>(x);
        else out.cp_chunks = x;
        continue;
      }
      if (name == "--cp-use" || name == "--cp-layout") {
        (name == "--cp-use" ? out.cp_use : out.cp_layout) = std::string(value);
        continue;
      }
      if (name == "--score") {
        score_fn syntax_only;  // the real parse is per problem (ALiBi slopes depend on its heads)
        if (const std::string err = parse_score(value, 1, syntax_only); !err.empty()) {
          error = "--score: " + err;
          return false;
        }
        out.score = std::string(value);
        continue;
      }
      if (name == "--threads" && !parse_threads(value, out.threads)) {
        error = "--threads '" + std::string(value) + "': expected an integer in 0.." + std::to_string(k_max_threads) +
                " (0 = all cores)";
        return false;
      }
      continue;
    }
    out.problems.emplace_back(arg);
  }
  return true;
}

bool parse_problems(const std::vector<std::string>& texts, std::vector<problem>& out, std::string& error,
                    const std::string& score) {
  out.clear();
  for (const std::string& text : texts) {
    problem p;
    status st = parse_problem(text, p);
    if (st && !score.empty()) st = set_problem_score(p, score);
    if (!st) {
      error = "cannot parse problem '" + text + "': " + st.error;
      return false;
    }
    out.push_back(p);
  }
  return true;
}

spec make_spec(const problem& p, const mask_expr& mask) {
  spec s;
  s.mask = mask;
  s.score = p.score;
  s.scale = p.scale;
  s.causal = p.causal;
  return s;
}

status check_footprint(const problem& p) {
  std::int64_t tq = p.seq_q, tk = p.seq_k;
  if (p.is_varlen()) {
    tq = tk = 0;
    for (std::size_t s = 0; s < p.seqlens_q.size(); ++s)
      if (__builtin_add_overflow(tq, p.seqlens_q[s], &tq) || __builtin_add_overflow(tk, p.seqlens_k[s], &tk))
        return {"[problem] varlen lengths overflow int64"};
  }
  const std::int64_t b = p.is_varlen() ? 1 : p.batch;
  const int in_bytes = dtype_size(p.type), out_bytes = p.out_f32 ? 4 : in_bytes;
  std::int64_t q = 0, k = 0, v = 0, o = 0, l = 0;
  if (!checked_product({b, tq, p.heads_q, p.dim_qk, in_bytes}, q) || !checked_product({b, tk, p.heads_kv, p.dim_qk, in_bytes}, k) ||
      !checked_product({b, tk, p.heads_kv, p.dim_v, in_bytes}, v) || !checked_product({b, tq, p.heads_q, p.dim_v, out_bytes}, o) ||
      !checked_product({b, p.heads_q, tq, 4}, l))
    return {"[problem] tensor sizes overflow int64"};
  const long double total = static_cast<long double>(q) + k + v + o + l;
  if (total > static_cast<long double>(k_max_problem_bytes)) {
    std::ostringstream os;
    os.setf(std::ios::fixed);
    os.precision(1);
    os << "[problem] needs " << static_cast<double>(total) / (1 << 30) << " GiB of buffers; this tool allows at most "
       << (k_max_problem_bytes >> 30) << " GiB per problem";
    return {os.str()};
  }
  return {};
}

int resolved_threads(int requested) { return detail::resolve_threads(requested); }

const char* causal_name(causal_mode c) {
  switch (c) {
    case causal_mode::none: return "none";
    case causal_mode::top_left: return "top_left";
    case causal_mode::bottom_right: return "bottom_right";
  }
  return "?";
}

std::string short_name(const problem& p) {
  std::ostringstream os;
  os << dtype_name(p.type);
  if (p.out_f32 && p.type != dtype::f32) os << ">f32";
  if (p.is_varlen()) os << " varlen[" << p.seqlens_q.size() << "]";
  else os << " b" << p.batch << " " << p.seq_q << "x" << p.seq_k;
  os << " h" << p.heads_q;
  if (p.heads_kv != p.heads_q) os << ":" << p.heads_kv;
  os << " d" << p.dim_qk;
  if (p.dim_v != p.dim_qk) os << ":" << p.dim_v;
  if (p.causal == causal_mode::top_left) os << " tl";
  if (p.causal == causal_mode::bottom_right) os << " br";
  if (p.lay == layout::bhsd) os << " bhsd";
  if (p.scale) os << " scale=" << *p.scale;
  return os.str();
}

std::string group_digits(std::int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

void print_usage(std::ostream& os) {
  os << "omniattn " << OMNIATTN_VERSION_MAJOR << "." << OMNIATTN_VERSION_MINOR << "." << OMNIATTN_VERSION_PATCH
     << " - CPU attention library tool\n"
        "\n"
        "usage: omniattn <command> [arguments]\n"
        "\n"
        "commands:\n"
        "  explain <problem> [--backend B] [--threads N] [--mask SPEC] [--score SPEC]\n"
        "      Which kernel runs the problem, forward and backward, on each backend and why (or why none fits), and\n"
        "      its tile structure.\n"
        "  check [<problem>...] [--backend B] [--threads N] [--mask SPEC] [--score SPEC]\n"
        "      Runs each problem (default: a built-in suite) on the backend, the fp64 oracle and the naive f32 path\n"
        "      and prints errors and timings with a PASS/FAIL verdict per problem; then its backward (dq, dk, dv) the\n"
        "      same way against the fp64 oracle backward and the naive float backward.\n"
        "  bench [--quick] [--filter GLOB] [--problem SPEC [--mask SPEC]] [--workloads FILE] [--out DIR] ...\n"
        "      Benchmark suite (CAB's patterns, the mask catalogue over N, model shapes): the fused kernel against\n"
        "      the unfused OpenBLAS and naive f32 paths in the same run, % of the measured peak, memory, a sampled\n"
        "      fp64 check and efficiency lengths; a table and a report directory (results.json, report.md, plots).\n"
        "      `bench --kernel` is the kernel table (dense/causal x D x N x dtype x threads). `omniattn bench --help`.\n"
        "  help\n"
        "      This text. `omniattn <command> --help` describes one command.\n"
        "\n"
        "options:\n"
        "  --backend auto|cpu|reference   backend to select (default auto)\n"
        "  --threads N                    threads, 0 = all cores (default 0)\n"
        "  --mask SPEC                    a mask spec string for every problem, e.g. \"causal & window(256,0) | sinks(4)\"\n"
        "  --score SPEC                   a score modifier spec string for every problem, e.g. \"alibi + softcap(30)\"\n"
        "\n"
        "problem: comma-separated key=value, unspecified keys take defaults, e.g.\n"
        "  b=2,lq=128,lk=96,hq=8,hkv=2,d=64,dv=32,dtype=bf16,causal=bottom_right,layout=bhsd,seed=3\n"
        "  keys: b n(=lq=lk) lq lk h(=hq=hkv) hq hkv d dv dtype=f32|bf16|f16 out=f32|input\n"
        "        causal=none|top_left|tl|bottom_right|br layout=bshd|bhsd scale=X varlen=LQ:LK/LQ:LK/... seed=N\n"
        "        score=SPEC (commas inside parentheses allowed, e.g. score=alibi_slope(0.5, 2) + softcap(30))\n"
        "  defaults: b=1,n=128,h=8,d=64,dtype=f32,causal=none,layout=bshd,seed=1 (lk=lq, hkv=hq, dv=d)\n"
        "\n"
        "exit codes: 0 ok / all PASS, 1 a problem cannot run or FAILs, 2 bad command-line input\n";
}

void print_explain_usage(std::ostream& os) {
  os << "usage: omniattn explain <problem> [--backend auto|cpu|reference] [--threads N]\n"
        "                        [--cp P [--cp-use auto|ring|token_ring|ulysses|hybrid|allgather]\n"
        "                                [--cp-layout contiguous|zigzag] [--cp-chunks C]]\n"
        "\n"
        "Prints the problem, per op the kernel the backend picks with every reason (forward: select(), backward:\n"
        "select_backward(), i.e. what attention_backward runs on this call's out and lse), what each says for\n"
        "each backend, the allowed (query, key) pairs with the forward and backward FLOPs and the 64x64 tile\n"
        "structure (FULL/PARTIAL/EMPTY).\n"
        "With --cp P (builds with MPI): what omniattn::dist::attention would do on P processes (no MPI needed):\n"
        "the planner's mechanism and reasons, the blocks each rank computes, those the mask leaves empty.\n"
        "Exits 1 when no forward kernel of the backend fits the problem or the problem is invalid, 2 on bad input.\n"
        "explain --linear <linear problem> (the keys of check --linear): the linear-attention path (decode recurrence\n"
        "or chunks, factored or pair-by-pair decays per chunk, the backward's path, work items and threads).\n"
        "Example: omniattn explain b=1,n=1000,h=8,d=128,causal=br\n"
        "         omniattn explain n=65536,hq=32,hkv=8,d=128,causal=br --cp 8 --cp-layout zigzag\n";
}

void print_check_usage(std::ostream& os) {
  os << "usage: omniattn check [<problem>...] [--backend auto|cpu|reference] [--threads N]\n"
        "\n"
        "Runs each problem (default: a built-in suite of diverse problems) on the backend, on the fp64 oracle\n"
        "(backend reference, f32 output) and on the naive f32 path, all on the same seeded inputs.\n"
        "A problem PASSes when max|out - oracle| <= 2 * max|naive - oracle| + u * max|oracle|, where u is the\n"
        "output dtype's rounding unit (f32 2^-23, bf16 2^-8, f16 2^-11), the output holds no NaN and the LSE is\n"
        "finite exactly where the oracle's is. Errors returned by attention() are printed and count as FAIL.\n"
        "'best ms' is the fastest of 3 to 5 runs of the backend (one run when it takes over 250 ms).\n"
        "\n"
        "Then the backward of each problem: attention_backward on the backend's forward out and lse, with a seeded\n"
        "d_out, against the fp64 oracle backward (f32 gradients) and the naive float backward\n"
        "(naive_attention_backward_f32), by the tests' rule (tests/tolerance.h): each of dq, dk, dv PASSes when\n"
        "max|grad - oracle| <= 2 * max|naive - oracle| + 4 * u * M, u the gradients' dtype unit and M the largest\n"
        "|oracle gradient| of the call, and holds no NaN or inf. 'best ms' is the fastest of 3 backward runs.\n"
        "Exits 0 when every problem passes forward and backward, 1 otherwise, 2 on bad input.\n"
        "\n"
        "check --linear [<problem>...] [--threads N]: the same for linear attention (linear.h): the chunked kernel\n"
        "against the fp64 quadratic form and the naive f32 recurrence (out, final_state), and its backward against\n"
        "the fp64 and float recurrences (dq, dk, dv, the decay's gradient, d_initial_state, the projection's), by\n"
        "tests/tolerance.h's linear rules. problem: b t h k v dtype=f32|bf16|f16 decay=none|fixed|scalar|channel\n"
        "phi=identity|elu_plus_one|relu|softmax|exp|performer|sigmoid normalize=0|1 causal=0|1 (0 with a decay: ViG's\n"
        "bidirectional form, no states) flow=0|1 (Flowformer, causal=0) prefix=P chunk=C s0=0|1 seed=N\n"
        "f=F (a seeded projection K -> F per head, with a bias, before phi: Hedgehog; Performer's random directions\n"
        "with phi=performer) (defaults b=1,t=128,h=2,k=64,v=64,dtype=f32,decay=none,phi=identity,causal=1,chunk=64,\n"
        "s0=0,seed=1,f=0).\n";
}

}  // namespace omniattn::cli

int main(int argc, char** argv) {
  using namespace omniattn::cli;
  try {
    if (argc < 2) {
      print_usage(std::cerr);
      return k_exit_usage;
    }
    const std::string_view command = argv[1];
    if (command == "-h" || command == "--help" || command == "help") {
      print_usage(std::cout);
      return k_exit_ok;
    }
    if (command == "--version" || command == "version") {
      std::cout << "omniattn " << OMNIATTN_VERSION_MAJOR << "." << OMNIATTN_VERSION_MINOR << "." << OMNIATTN_VERSION_PATCH
                << "\n";
      return k_exit_ok;
    }
    if (command == "bench") return omniattn::bench::bench_main(argc, argv);
    if (command != "explain" && command != "check") {
      std::cerr << "omniattn: unknown command '" << command << "' (try 'omniattn --help')\n";
      return k_exit_usage;
    }
    command_line cl;
    std::string error;
    if (!parse_command_line(argc, argv, 2, cl, error)) {
      std::cerr << "omniattn " << command << ": " << error << " (try 'omniattn " << command << " --help')\n";
      return k_exit_usage;
    }
    if (command == "explain") {
      if (cl.help) {
        print_explain_usage(std::cout);
        return k_exit_ok;
      }
      return cl.linear ? run_linear_explain(cl) : run_explain(cl);
    }
    if (cl.help) {
      print_check_usage(std::cout);
      return k_exit_ok;
    }
    return cl.linear ? run_linear_check(cl) : run_check(cl);
  } catch (const std::bad_alloc&) {
    std::cerr << "omniattn: out of memory\n";
    return k_exit_fail;
  } catch (const std::exception& e) {
    std::cerr << "omniattn: internal error: " << e.what() << "\n";
    return k_exit_fail;
  }
}
