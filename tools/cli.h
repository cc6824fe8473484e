// The omniattn command-line tool: what the subcommands share.
//
//   omniattn explain <problem> [--backend B] [--threads N] [--mask SPEC]     which kernel runs (forward, backward), why,
//                                                                          and the tile structure
//   omniattn check [<problem>...] [--backend B] [--threads N] [--mask SPEC]  backend vs fp64 oracle vs naive f32, PASS/FAIL table,
//                                                                          forward and backward
//
// Exit codes: 0 success / all PASS, 1 a problem cannot run or fails, 2 bad command-line input.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "core/problem.h"

namespace omniattn::cli {

constexpr int k_exit_ok = 0;
constexpr int k_exit_fail = 1;
constexpr int k_exit_usage = 2;

// Options shared by the subcommands, plus the positional arguments (problem strings) in order.
struct command_line {
  backend use = backend::automatic;
  int threads = 0;  // 0: all cores
  bool help = false;
  mask_expr mask;  // --mask "causal & window(256, 0) | sinks(4)": applied to every problem
  std::string score;  // --score "alibi + softcap(30)": applied to every problem (parsed per problem for its heads)
  std::vector<std::string> problems;
  // explain --cp P: what omniattn::dist would do on P processes (--cp-use, --cp-layout, --cp-chunks as cp_options).
  int cp_ranks = 0;
  std::string cp_use = "auto", cp_layout = "contiguous";
  std::int64_t cp_chunks = 0;
  bool linear = false;  // check --linear: the problems are linear-attention problems
};

// Parses argv[first..argc): --backend auto|cpu|reference, --threads N, --mask SPEC (also --opt=value), -h/--help,
// positionals.
// On failure returns false with a message naming the offending argument.
bool parse_command_line(int argc, char** argv, int first, command_line& out, std::string& error);

// Parses every problem string; on failure the message names the argument and carries parse_problem's error.
// A non-empty `score` spec replaces every problem's score modifier.
bool parse_problems(const std::vector<std::string>& texts, std::vector<problem>& out, std::string& error,
                    const std::string& score = "");

// The spec a problem describes (scale, causal mode, score modifier), with the command line's mask.
spec make_spec(const problem& p, const mask_expr& mask);

// Refuses problems whose buffers would overflow int64 or exceed the tool's memory limit, before allocating them.
status check_footprint(const problem& p);

// Threads a call with options.threads = requested will use.
int resolved_threads(int requested);

// Short single-line labels.
const char* causal_name(causal_mode c);
std::string short_name(const problem& p);  // e.g. "bf16 b2 128x96 h8:2 d64:32 br bhsd"
std::string group_digits(std::int64_t n);  // 1234567 -> "1,234,567"

void print_usage(std::ostream& os);
void print_explain_usage(std::ostream& os);
void print_check_usage(std::ostream& os);

int run_explain(const command_line& cl);
int run_check(const command_line& cl);
int run_linear_check(const command_line& cl);    // cli_linear.cc
int run_linear_explain(const command_line& cl);  // cli_linear.cc

}  // namespace omniattn::cli
