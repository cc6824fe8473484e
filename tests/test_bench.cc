// The benchmark harness (bench/): FLOP counts per mask, the JSON reader and results.json schema, workload templates,
// the built-in table, the workload file, command-line parsing and its errors, crossovers, timing and the peak cache.
// Needs the omniattn_bench library (CMake: target_link_libraries(omniattn_tests PRIVATE omniattn_bench)); without it
// this file compiles to one skipped test.
#include <gtest/gtest.h>

#if __has_include("bench/suite.h")

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "bench/json.h"
#include "bench/measure.h"
#include "bench/ops.h"
#include "bench/report.h"
#include "bench/suite.h"
#include "bench/workloads.h"
#include "core/grid_local.h"
#include "core/problem.h"
#include "core/storage.h"
#include "tolerance.h"

namespace omniattn::bench {
namespace {

// A scratch directory removed at the end of the test.
class scratch_dir {
 public:
  scratch_dir() {
    char tmpl[] = "/tmp/omniattn_test_bench_XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string write(const std::string& name, const std::string& text) const {
    const std::string p = path_ + "/" + name;
    std::ofstream(p) << text;
    return p;
  }

 private:
  std::string path_;
};

class env_guard {
 public:
  env_guard(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) {
      had_ = true;
      old_ = old;
    }
    setenv(name, value.c_str(), 1);
  }
  ~env_guard() {
    if (had_) setenv(name_.c_str(), old_.c_str(), 1);
    else unsetenv(name_.c_str());
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

// argv from strings ("omniattn", "bench", args...); parse_suite_args reads from index 2.
bool parse_args(const std::vector<std::string>& args, suite_options& o, std::string& error) {
  std::vector<std::string> all = {"omniattn", "bench"};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : all) argv.push_back(a.data());
  return parse_suite_args(static_cast<int>(argv.size()), argv.data(), 2, o, error);
}

std::string parse_error(const std::vector<std::string>& args) {
  suite_options o;
  std::string error;
  EXPECT_FALSE(parse_args(args, o, error)) << "accepted: " << args.front();
  return error;
}

const workload* find_workload(const std::vector<workload>& ws, const std::string& name) {
  for (const workload& w : ws)
    if (w.name == name) return &w;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------------------------
// FLOP counts: the harness's fast count (row words) against the library's brute-force mask_area.

struct area_case {
  const char* problem;
  const char* mask;
  // The problem and its spec (the causal flag, the mask if any); false when either does not parse.
  bool parse(omniattn::problem& pr, spec& s) const {
    if (!parse_problem(problem, pr).ok()) return false;
    s.causal = pr.causal;
    return !*mask || parse_mask(mask, s.mask).empty();
  }
};

TEST(BenchFlops, UsefulPairsMatchBruteForceMaskArea) {
  const area_case cases[] = {
      {"b=2,n=300,hq=4,hkv=2,d=16", "window(64,0)"},
      {"b=1,n=257,h=2,d=16", "window(32,0) | sinks(4)"},
      {"b=1,n=200,h=2,d=16", "window(17,9)"},
      {"b=1,n=256,h=2,d=16", "prefix_lm(64)"},
      {"b=1,n=300,h=2,d=16", "document(0,50,51,170,300)"},
      {"b=1,n=300,h=2,d=16", "causal & document(0,50,51,170,300)"},
      {"b=1,n=333,h=2,d=16", "block_causal(128)"},
      {"b=1,n=190,h=2,d=16", "dilated(4)"},
      {"b=1,n=256,h=2,d=16", "global_tokens(16) | window(32,32) | random_blocks(32,20,7)"},
      {"b=1,lq=64,lk=300,h=2,d=16,causal=br", "window(100,0)"},
      {"b=1,lq=300,lk=64,h=2,d=16,causal=tl", ""},
      {"b=1,lq=70,lk=300,h=3,d=16,causal=br", ""},
      {"h=2,d=16,causal=br,varlen=100:100/37:37/130:130", ""},
      {"h=2,d=16,varlen=100:120/37:5/130:64", "window(20,0)"},
  };
  for (const area_case& c : cases) {
    problem pr;
    spec s;
    ASSERT_TRUE(c.parse(pr, s)) << c.problem << " " << c.mask;
    problem_data data(pr);
    attn_params p;
    ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p).ok());
    std::int64_t brute = 0;  // element by element, independent of row_bits and the closed forms
    for (std::int64_t b = 0; b < p.batch; ++b) {
      const seq_extent e = sequence(p, b);
      for (std::int64_t h = 0; h < p.heads_q; ++h)
        for (std::int64_t i = 0; i < e.q_len; ++i)
          for (std::int64_t j = 0; j < e.k_len; ++j) brute += element_allowed(p, b, h, i, j, e.q_len, e.k_len);
    }
    EXPECT_EQ(useful_pairs(p), brute) << c.problem << " mask " << c.mask;
    EXPECT_EQ(mask_area(p), brute) << c.problem << " mask " << c.mask;
  }
}

TEST(BenchFlops, DenseFlopsAreFourNSquaredBHD) {
  problem pr;
  ASSERT_TRUE(parse_problem("b=3,n=128,hq=4,hkv=2,d=32", pr).ok());
  problem_data data(pr);
  attn_params p;
  ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), {}, data.make_options(backend::cpu), p).ok());
  const double flops = 2.0 * static_cast<double>(useful_pairs(p)) * static_cast<double>(p.dim_qk + p.dim_v);
  EXPECT_EQ(flops, 4.0 * 128 * 128 * 3 * 4 * 32);
  // Causal bottom-right with lq = lk: N (N + 1) / 2 pairs per head.
  spec s;
  s.causal = causal_mode::bottom_right;
  ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p).ok());
  EXPECT_EQ(useful_pairs(p), 128 * 129 / 2 * 3 * 4);
  // A window of w keys left of the diagonal: min(i, w) + 1 keys for row i.
  ASSERT_EQ(parse_mask("window(16,0)", s.mask), "");
  s.causal = causal_mode::none;
  ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p).ok());
  std::int64_t per_head = 0;
  for (std::int64_t i = 0; i < 128; ++i) per_head += std::min<std::int64_t>(i, 16) + 1;
  EXPECT_EQ(useful_pairs(p), per_head * 3 * 4);
}

// ---------------------------------------------------------------------------------------------------------------------
// JSON reader and writer.

// Token i of a chunk meets i + 1 keys of its chunk (2 (K + V) FLOPs each: a QK^T and an AV multiply-add) and reads and
// updates the K x V state (2 K V each): the formula of the --linear table, counted token by token.
TEST(BenchFlops, LinearChunkedFlopsCountPairsAndStateTerms) {
  for (std::int64_t n : {1, 63, 64, 65, 200})
    for (std::int64_t chunk : {1, 16, 64}) {
      double want = 0;
      for (std::int64_t t = 0; t < n; ++t) want += 2.0 * 5 * static_cast<double>(t % chunk + 1) + 4.0 * 2 * 3;
      EXPECT_DOUBLE_EQ(bench::linear_chunked_flops(3, 2, n, chunk, 2, 3), want * 6) << "n " << n << " chunk " << chunk;
    }
}

TEST(BenchJson, ParsesValuesEscapesAndNesting) {
  json doc;
  std::string error;
  ASSERT_TRUE(json::parse(R"( {"a": [1, -2.5e3, true, false, null], "s": "x\"y\\z\n\u00e9\ud83d\ude00", "o": {}} )", doc, error))
      << error;
  ASSERT_TRUE(doc.is_object());
  const json* a = doc.find("a");
  ASSERT_TRUE(a && a->is_array());
  ASSERT_EQ(a->items().size(), 5u);
  EXPECT_EQ(a->items()[1].as_number(), -2500.0);
  EXPECT_TRUE(a->items()[2].as_bool());
  EXPECT_TRUE(a->items()[4].is_null());
  EXPECT_EQ(doc.find("s")->as_string(), "x\"y\\z\n\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_TRUE(doc.find("o")->is_object());
  json back;
  ASSERT_TRUE(json::parse(doc.dump(), back, error)) << error;
  EXPECT_EQ(back.dump(), doc.dump());
}

TEST(BenchJson, ErrorsNameLineAndColumn) {
  json doc;
  std::string error;
  EXPECT_FALSE(json::parse("{\n  \"a\": 1,\n  \"b\": ]\n}", doc, error));
  EXPECT_NE(error.find("line 3"), std::string::npos) << error;
  EXPECT_FALSE(json::parse("{\"a\": 1} x", doc, error));
  EXPECT_NE(error.find("after the document"), std::string::npos) << error;
  EXPECT_FALSE(json::parse("{\"a\": 1, \"a\": 2}", doc, error));
  EXPECT_NE(error.find("duplicate key \"a\""), std::string::npos) << error;
  EXPECT_FALSE(json::parse("[1, 2", doc, error));
  EXPECT_FALSE(json::parse("\"abc", doc, error));
  EXPECT_FALSE(json::parse("01x", doc, error));
}

TEST(BenchJson, NumbersAreExactIntegersOrSixDigitsAndNonFiniteIsNull) {
  EXPECT_EQ(json_number(549755813888.0), "549755813888");
  EXPECT_EQ(json_number(0.1234567), "0.123457");
  EXPECT_EQ(json_number(NAN), "null");
  EXPECT_EQ(json_number(INFINITY), "null");
}

result_row sample_row(const std::string& name, std::int64_t n, double ms, double blas_ms) {
  result_row r;
  r.workload = name;
  r.group = name.substr(0, name.find('/'));
  r.mask = name == "mask/window" ? "window(256,0) | sinks(4)" : "";
  r.problem = "b=1,lq=" + std::to_string(n);
  r.n = n;
  r.batch = 1;
  r.seq_q = r.seq_k = n;
  r.heads_q = r.heads_kv = 8;
  r.dim_qk = r.dim_v = 64;
  r.dtype = "f32";
  r.causal = "none";
  r.threads = 2;
  r.kernel = "cpu.flash_fwd<f32>";
  r.useful_pairs = n * n * 8;
  r.dense_pairs = n * n * 8;
  r.useful_flops = 2.0 * static_cast<double>(r.useful_pairs) * 128;
  r.fused.median_s = r.fused.min_s = r.fused.max_s = r.fused.q1_s = r.fused.q3_s = ms * 1e-3;
  r.fused.reps = 3;
  r.gflops = r.useful_flops / r.fused.median_s * 1e-9;
  r.peak_gflops = 340;
  r.pct_peak = 100 * r.gflops / 340;
  r.peak_kind = "fp32_fma";
  r.check.rows = 8;
  r.check.tolerance = 1e-4;
  r.openblas_ms = blas_ms;
  r.openblas_speedup = blas_ms / ms;
  r.openblas_heads_measured = 8;
  r.openblas_cost = "dense";
  return r;
}

run_info sample_info() {
  run_info info;
  info.version = "9.9.9";
  info.command = "omniattn bench --quick";
  info.started = "2025-01-01T00:00:00Z";
  info.cpu = "Test CPU";
  info.isa = "AVX3";
  info.openblas_core = "Cooperlake";
  info.cpus = 2;
  info.peaks = {{2, 340.0, 168.0, "cache"}};
  info.threads = {2};
  info.budget_s = 0.1;
  return info;
}

TEST(BenchReport, ResultsJsonHasTheDocumentedSchema) {
  const std::vector<result_row> rows = {sample_row("mask/full", 256, 1.0, 2.0), sample_row("mask/window", 256, 1.5, 2.0),
                                        sample_row("mask/full", 1024, 10.0, 20.0), sample_row("mask/window", 1024, 4.0, 20.0)};
  workload w;
  w.name = "mask/window";
  w.refs = {"mask/full"};
  const std::vector<efficiency_row> eff = efficiency_lengths({w}, rows);
  json doc;
  std::string error;
  ASSERT_TRUE(json::parse(results_json(sample_info(), rows, eff).dump(), doc, error)) << error;
  for (const char* key : {"schema", "version", "command", "started", "total_s", "machine", "settings", "rows", "efficiency_lengths"})
    EXPECT_TRUE(doc.find(key)) << key;
  EXPECT_EQ(doc.find("schema")->as_string(), "omniattn-bench/1");
  const json& machine = *doc.find("machine");
  for (const char* key : {"cpu", "cpus", "isa", "openblas_core", "peak_cache", "peaks"}) EXPECT_TRUE(machine.find(key)) << key;
  const json& peak = machine.find("peaks")->items().at(0);
  EXPECT_EQ(peak.find("threads")->as_number(), 2);
  EXPECT_EQ(peak.find("fp32_fma_gflops")->as_number(), 340);
  EXPECT_EQ(peak.find("bf16_dot_gflops")->as_number(), 168);
  for (const char* key : {"quick", "baselines", "budget_s", "threads", "filters"}) EXPECT_TRUE(doc.find("settings")->find(key)) << key;
  const json& jrows = *doc.find("rows");
  ASSERT_EQ(jrows.items().size(), rows.size());
  for (const json& r : jrows.items()) {
    std::vector<std::string> keys;
    for (const auto& [k, v] : r.members()) keys.push_back(k);
    EXPECT_EQ(keys, row_keys());
  }
  const json& r1 = jrows.items()[1];
  EXPECT_EQ(r1.find("workload")->as_string(), "mask/window");
  EXPECT_EQ(r1.find("mask")->as_string(), "window(256,0) | sinks(4)");
  EXPECT_TRUE(jrows.items()[0].find("mask")->is_null());
  EXPECT_EQ(r1.find("useful_flops")->as_number(), 2.0 * 256 * 256 * 8 * 128);
  EXPECT_EQ(r1.find("median_ms")->as_number(), 1.5);
  EXPECT_TRUE(r1.find("naive_ms")->is_null());  // not run: null, never NaN
  EXPECT_TRUE(r1.find("check_ok")->as_bool());
  const json& e = doc.find("efficiency_lengths")->items().at(0);
  EXPECT_EQ(e.find("workload")->as_string(), "mask/window");
  const json& vs0 = e.find("vs")->items().at(0);
  EXPECT_EQ(vs0.find("reference")->as_string(), "mask/full");
  EXPECT_EQ(vs0.find("status")->as_string(), "crossed");
  EXPECT_GT(vs0.find("n")->as_number(), 256);
  EXPECT_LT(vs0.find("n")->as_number(), 1024);
  EXPECT_EQ(e.find("vs")->items().at(1).find("reference")->as_string(), "openblas");
}

TEST(BenchReport, WriteReportWritesJsonAndMarkdownWithoutPlots) {
  scratch_dir dir;
  const std::vector<result_row> rows = {sample_row("mask/full", 256, 1.0, 2.0), sample_row("mask/window", 256, 1.5, 2.0)};
  std::string error;
  ASSERT_TRUE(write_report(dir.path() + "/out", sample_info(), rows, {}, false, error)) << error;
  std::ifstream j(dir.path() + "/out/results.json"), m(dir.path() + "/out/report.md");
  ASSERT_TRUE(j && m);
  std::stringstream js, ms;
  js << j.rdbuf();
  ms << m.rdbuf();
  json doc;
  ASSERT_TRUE(json::parse(js.str(), doc, error)) << error;
  EXPECT_EQ(doc.find("rows")->items().size(), 2u);
  EXPECT_NE(ms.str().find("| mask/window | 256 |"), std::string::npos);
  EXPECT_NE(ms.str().find("window(256,0) \\| sinks(4)"), std::string::npos);  // '|' escaped inside the table
}

TEST(BenchReport, CrossoverInterpolatesAndClassifies) {
  const std::vector<std::int64_t> ns = {256, 512, 1024, 2048};
  crossover c = find_crossover(ns, {2, 2, 1, 1}, {1, 1, 2, 4});
  EXPECT_EQ(c.status, "crossed");
  EXPECT_GT(c.n, 512);
  EXPECT_LT(c.n, 1024);
  // Ratio 2 at 512 and 0.5 at 1024: linear in the ratio, the 0.95 threshold is 70% of the way (in log N).
  EXPECT_NEAR(std::log2(c.n), 9.7, 1e-9);
  EXPECT_EQ(find_crossover(ns, {1, 1, 1, 1}, {2, 2, 2, 2}).status, "always_faster");
  EXPECT_EQ(find_crossover(ns, {3, 3, 3, 3}, {2, 2, 2, 2}).status, "never_faster");
  EXPECT_EQ(find_crossover(ns, {1.97, 1.97, 1.97, 1.97}, {2, 2, 2, 2}).status, "never_faster");  // within the noise margin
  // Faster once, then slower again: not crossed until it stays faster.
  c = find_crossover(ns, {1, 3, 1, 1}, {2, 2, 2, 2});
  EXPECT_EQ(c.status, "crossed");
  EXPECT_GT(c.n, 512);
  EXPECT_EQ(find_crossover(ns, {NAN, NAN, NAN, NAN}, {1, 1, 1, 1}).status, "no_data");
}

// The row printed by print_table_row, as text.
std::string table_text(const result_row& r) {
  std::FILE* f = std::tmpfile();
  print_table_header(f);
  print_table_row(f, r);
  std::rewind(f);
  std::string out;
  for (int c; (c = std::fgetc(f)) != EOF;) out += static_cast<char>(c);
  std::fclose(f);
  return out;
}

TEST(BenchReport, MaskedRowsCarryTheDenseRunInJsonTableAndMarkdown) {
  result_row masked = sample_row("mask/window", 1024, 2.0, 20.0);
  masked.useful_pairs = masked.dense_pairs / 8;  // density 0.125: the ideal x dense is 8
  masked.useful_flops = 2.0 * static_cast<double>(masked.useful_pairs) * 128;
  masked.dense_ms = 10.0;
  masked.x_dense = 5.0;
  masked.dense_disturbed_pct = 1.0;
  result_row skipped = sample_row("mask/window", 4096, 3.0, 20.0);
  skipped.dense_note = "not run: 2199 GFLOP take >= 6.5 s at the 340 GFLOP/s peak, over the 2.0 s limit";
  const std::vector<result_row> rows = {sample_row("mask/full", 1024, 10.0, 20.0), masked, skipped};
  json doc;
  std::string error;
  ASSERT_TRUE(json::parse(results_json(sample_info(), rows, {}).dump(), doc, error)) << error;
  const json& full = doc.find("rows")->items().at(0);
  EXPECT_TRUE(full.find("dense_ms")->is_null());  // the unmasked row is the dense run itself
  EXPECT_TRUE(full.find("x_dense")->is_null());
  EXPECT_TRUE(full.find("dense_note")->is_null());
  EXPECT_EQ(full.find("density")->as_number(), 1.0);
  const json& w = doc.find("rows")->items().at(1);
  EXPECT_EQ(w.find("dense_ms")->as_number(), 10.0);
  EXPECT_EQ(w.find("x_dense")->as_number(), 5.0);
  EXPECT_EQ(w.find("dense_disturbed_pct")->as_number(), 1.0);
  EXPECT_EQ(w.find("density")->as_number(), 0.125);
  const json& s = doc.find("rows")->items().at(2);
  EXPECT_TRUE(s.find("dense_ms")->is_null());
  EXPECT_TRUE(s.find("x_dense")->is_null());
  EXPECT_NE(s.find("dense_note")->as_string().find("over the 2.0 s limit"), std::string::npos);

  const std::string table = table_text(masked);
  EXPECT_NE(table.find("density"), std::string::npos) << table;
  EXPECT_NE(table.find("x dense"), std::string::npos) << table;
  EXPECT_NE(table.find(" 0.1250     10.00   5.00x |"), std::string::npos) << table;
  EXPECT_NE(table_text(skipped).find(" 1.0000         -       - |"), std::string::npos) << table_text(skipped);

  const std::string md = report_markdown(sample_info(), rows, {}, {});
  EXPECT_NE(md.find("| tiles skipped | density | dense ms | x dense |"), std::string::npos);
  EXPECT_NE(md.find("| 0.0 | 0.1250 | 10.000 | 5.00 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| 0.0 | 1.0000 | not run: 2199 GFLOP"), std::string::npos) << md;
  EXPECT_NE(md.find("over 0.25 s each at the fp32 FMA peak"), std::string::npos);  // 2.5 budgets of 0.1 s
  // A dense time from a disturbed measurement is marked.
  masked.dense_disturbed_pct = 40.0;
  EXPECT_NE(table_text(masked).find("  5.00x? |"), std::string::npos) << table_text(masked);
  EXPECT_NE(report_markdown(sample_info(), {masked}, {}, {}).find("| 10.000 | 5.00? |"), std::string::npos);
}

TEST(BenchSuite, DenseRunIsKeyedByShapeDtypeAndThreadsAndSkippedWhenTooLong) {
  problem causal, plain, other_seed, bf16, longer;
  ASSERT_TRUE(parse_problem("b=1,n=1024,hq=8,hkv=2,d=64,causal=br", causal).ok());
  ASSERT_TRUE(parse_problem("b=1,n=1024,hq=8,hkv=2,d=64", plain).ok());
  ASSERT_TRUE(parse_problem("b=1,n=1024,hq=8,hkv=2,d=64,seed=7", other_seed).ok());
  ASSERT_TRUE(parse_problem("b=1,n=1024,hq=8,hkv=2,d=64,dtype=bf16", bf16).ok());
  ASSERT_TRUE(parse_problem("b=1,n=2048,hq=8,hkv=2,d=64", longer).ok());
  EXPECT_EQ(dense_key(causal, 2), dense_key(plain, 2));  // the causal flag is what the dense run leaves out
  EXPECT_EQ(dense_key(other_seed, 2), dense_key(plain, 2));
  EXPECT_NE(dense_key(plain, 1), dense_key(plain, 2));
  EXPECT_NE(dense_key(bf16, 2), dense_key(plain, 2));
  EXPECT_NE(dense_key(longer, 2), dense_key(plain, 2));
  EXPECT_NE(dense_key(plain, 2, op_kind::backward), dense_key(plain, 2));  // the backward's dense run is its own
  EXPECT_EQ(dense_key(causal, 2, op_kind::backward), dense_key(plain, 2, op_kind::backward));
  // The 8k-token model shape: 1100 GFLOP at a 215 GFLOP/s peak is >= 5.1 s a run, over 2.5 budgets of 0.4 s.
  const double llama = 4.0 * 8192.0 * 8192.0 * 32 * 128;
  const std::string why = dense_skip_reason(llama, 215, 0.4);
  EXPECT_NE(why.find("not run: 1100 GFLOP take >= 5.1 s at the 215 GFLOP/s peak, over the 1 s limit"), std::string::npos)
      << why;
  EXPECT_EQ(dense_skip_reason(llama, 215, 2.4), "");  // 6 s allowed
  // The 3D neighborhood shape (275 GFLOP, 1.3 s at the peak): skipped at the default budget, run with --budget 1.
  const double video = 4.0 * 16384.0 * 16384.0 * 4 * 64;
  EXPECT_NE(dense_skip_reason(video, 215, 0.4), "");
  EXPECT_EQ(dense_skip_reason(video, 215, 1.0), "");
  EXPECT_EQ(dense_skip_reason(4.0 * 4096.0 * 4096.0 * 8 * 64, 215, 0.4), "");
  EXPECT_EQ(dense_skip_reason(llama, 0, 0.4), "");  // no peak: no estimate, run it
}

// A peak cache entry for this machine (1 thread) with a made-up peak, so a test run needs no probe and its dense-run
// estimates are predictable.
void write_fake_peak(const std::string& path, double gflops) {
  json entry = json::object();
  entry.set("cpu", cpu_model());
  entry.set("isa", std::string(isa_name()));
  entry.set("threads", 1);
  entry.set("fp32_fma_gflops", gflops);
  entry.set("bf16_dot_gflops", gflops);
  json entries = json::array();
  entries.push(std::move(entry));
  json doc = json::object();
  doc.set("schema", "omniattn-peak-cache/1");
  doc.set("entries", std::move(entries));
  std::ofstream(path) << doc.dump() << "\n";
}

json read_json_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  json doc;
  std::string error;
  EXPECT_TRUE(json::parse(ss.str(), doc, error)) << path << ": " << error;
  return doc;
}

TEST(BenchSuite, MaskedRowsShareOneDenseRunPerShapeAndSkipTooLongOnes) {
  scratch_dir dir;
  env_guard env("OMNIATTN_PEAK_CACHE", dir.path() + "/peak.json");
  // A 1 GFLOP/s peak and a 2 ms budget: dense runs estimated over 5 ms are skipped, i.e. 4 * N^2 * H * D > 5e6.
  write_fake_peak(dir.path() + "/peak.json", 1.0);
  suite_options o;
  std::string error;
  ASSERT_TRUE(parse_args({"--problem", "n=256,h=2,d=32", "--problem", "n=256,h=2,d=32,causal=br", "--problem", "n=256,h=2,d=32",
                          "--mask", "window(32,0)", "--problem", "n=128,h=2,d=32", "--mask", "window(16,0)", "--problem",
                          "n=512,h=2,d=32", "--mask", "window(16,0)", "--threads", "1", "--budget", "0.002", "--no-baselines",
                          "--no-plots", "--out", dir.path() + "/out"},
                         o, error))
      << error;
  ASSERT_EQ(run_suite(o), 0);
  const json doc = read_json_file(dir.path() + "/out/results.json");
  const std::vector<json>& rows = doc.find("rows")->items();
  ASSERT_EQ(rows.size(), 5u);
  const auto num = [&](std::size_t i, const char* key) { return rows[i].find(key)->as_number(); };
  // custom/1 is the dense run of its shape; custom/2 (causal) and custom/3 (window) reuse its time exactly, although
  // a fresh dense run of that shape (4 * 256^2 * 2 * 32 = 16.8 MFLOP, 16.8 ms at 1 GFLOP/s) would be over the limit.
  EXPECT_TRUE(rows[0].find("dense_ms")->is_null());
  for (const std::size_t i : {1u, 2u}) {
    EXPECT_EQ(num(i, "dense_ms"), num(0, "median_ms")) << i;
    EXPECT_NEAR(num(i, "x_dense"), num(i, "dense_ms") / num(i, "median_ms"), 1e-5 * num(i, "x_dense")) << i;
    EXPECT_TRUE(rows[i].find("dense_note")->is_null()) << i;
  }
  EXPECT_NEAR(num(1, "density"), (256.0 * 257 / 2) / (256.0 * 256), 1e-6);
  // custom/4: a shape of its own, measured (4.2 MFLOP, under the limit).
  EXPECT_GT(num(3, "dense_ms"), 0.0);
  EXPECT_NEAR(num(3, "x_dense"), num(3, "dense_ms") / num(3, "median_ms"), 1e-5 * num(3, "x_dense"));
  EXPECT_LT(num(3, "density"), 0.2);
  // custom/5: 67 MFLOP, >= 67 ms at 1 GFLOP/s: not run, with the reason.
  EXPECT_TRUE(rows[4].find("dense_ms")->is_null());
  EXPECT_TRUE(rows[4].find("x_dense")->is_null());
  EXPECT_NE(rows[4].find("dense_note")->as_string().find("over the 0.005 s limit"), std::string::npos)
      << rows[4].find("dense_note")->as_string();
}

TEST(BenchKernelTable, PatternRowsGetTheDenseRunOfTheirShape) {
  scratch_dir dir;
  env_guard env("OMNIATTN_PEAK_CACHE", dir.path() + "/peak.json");
  write_fake_peak(dir.path() + "/peak.json", 100.0);
  const auto run_table = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {"omniattn", "bench", "--kernel", "--n", "128,256", "--d", "32", "--heads", "2", "--threads", "1",
                               "--dtype", "f32", "--budget", "0.002", "--no-baselines", "--json", dir.path() + "/k.json"});
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    EXPECT_EQ(kernel_main(static_cast<int>(argv.size()), argv.data()), 0);
    return read_json_file(dir.path() + "/k.json");
  };
  // With the dense rows in the table: the pattern rows reuse their times.
  json doc = run_table({"--mask", "dense", "--pattern", "window(16,0)"});
  std::vector<json> rows = doc.find("rows")->items();
  ASSERT_EQ(rows.size(), 4u);  // dense 128, dense 256, pattern 128, pattern 256
  for (const std::size_t i : {0u, 1u}) {
    EXPECT_EQ(rows[i].find("mask")->as_string(), "dense");
    EXPECT_TRUE(rows[i].find("dense_ms")->is_null());
    EXPECT_EQ(rows[i].find("density")->as_number(), 1.0);
    const json& pat = rows[i + 2];
    EXPECT_EQ(pat.find("mask")->as_string(), "window(16,0)");
    EXPECT_EQ(pat.find("n")->as_number(), rows[i].find("n")->as_number());
    EXPECT_EQ(pat.find("dense_ms")->as_number(), rows[i].find("median_ms")->as_number());
    EXPECT_NEAR(pat.find("x_dense")->as_number(), pat.find("dense_ms")->as_number() / pat.find("median_ms")->as_number(),
                1e-4 * pat.find("x_dense")->as_number());
    EXPECT_LT(pat.find("density")->as_number(), 0.15);
  }
  // --mask none: no dense row, so the table runs the dense shape itself.
  doc = run_table({"--mask", "none", "--pattern", "window(16,0)"});
  rows = doc.find("rows")->items();
  ASSERT_EQ(rows.size(), 2u);
  for (const json& r : rows) {
    EXPECT_GT(r.find("dense_ms")->as_number(), 0.0);
    EXPECT_GT(r.find("x_dense")->as_number(), 0.0);
  }
  // No pattern: the plain dense/causal table, no comparison.
  doc = run_table({"--mask", "causal"});
  EXPECT_TRUE(doc.find("rows")->items().at(0).find("dense_ms")->is_null());
}

// ---------------------------------------------------------------------------------------------------------------------
// Workloads: templates, the built-in table, globs, the workload file.

TEST(BenchWorkloads, TemplatesExpand) {
  std::string out, error;
  ASSERT_TRUE(expand_templates("n={n},lq={n/4},lk={n*2}", 1000, true, out, error)) << error;
  EXPECT_EQ(out, "n=1000,lq=250,lk=2000");
  ASSERT_TRUE(expand_templates("document({docs:1:1:2})", 1000, true, out, error)) << error;
  EXPECT_EQ(out, "document(0,250,500,1000)");
  ASSERT_TRUE(expand_templates("varlen={varlen:1:3}", 100, true, out, error)) << error;
  EXPECT_EQ(out, "varlen=25:25/75:75");
  ASSERT_TRUE(expand_templates("b=1,n=64", 0, false, out, error));
  EXPECT_EQ(out, "b=1,n=64");
  EXPECT_FALSE(expand_templates("n={n}", 0, false, out, error));
  EXPECT_NE(error.find("needs an N sweep"), std::string::npos) << error;
  EXPECT_FALSE(expand_templates("n={m}", 8, true, out, error));
  EXPECT_NE(error.find("unknown template {m}"), std::string::npos) << error;
  EXPECT_FALSE(expand_templates("n={n/0}", 8, true, out, error));
  EXPECT_FALSE(expand_templates("n={n", 8, true, out, error));
  EXPECT_FALSE(expand_templates("{docs:1:x}", 8, true, out, error));
}

TEST(BenchWorkloads, BuiltInTableInstantiatesInBothModes) {
  const std::vector<workload>& all = built_in_workloads();
  std::vector<std::string> names;
  for (const workload& w : all) {
    EXPECT_EQ(std::count(names.begin(), names.end(), w.name), 0) << "duplicate " << w.name;
    names.push_back(w.name);
    for (const std::string& ref : w.refs) EXPECT_TRUE(find_workload(all, ref)) << w.name << " -> " << ref;
    for (const bool quick : {false, true}) {
      std::vector<instance> inst;
      std::string error;
      EXPECT_TRUE(instantiate(w, quick, "", inst, error)) << error;
      EXPECT_EQ(inst.size(), std::max<std::size_t>(1, sweep_points(w, quick).size())) << w.name;
    }
  }
  for (const char* group : {"cab/", "mask/", "model/", "neighborhood/", "bwd/"})
    EXPECT_TRUE(std::any_of(names.begin(), names.end(), [&](const std::string& n) { return n.rfind(group, 0) == 0; })) << group;
  // The catalogue's templated shapes: prefix_lm(N/4) and 6 documents summing to N.
  std::vector<instance> inst;
  std::string error;
  ASSERT_TRUE(instantiate(*find_workload(all, "mask/prefix-lm"), false, "", inst, error)) << error;
  EXPECT_EQ(inst.back().mask_text, "prefix_lm(" + std::to_string(inst.back().n / 4) + ")");
  ASSERT_TRUE(instantiate(*find_workload(all, "mask/varlen"), true, "", inst, error)) << error;
  std::int64_t total = 0;
  for (const std::int64_t l : inst.front().prob.seqlens_q) total += l;
  EXPECT_EQ(total, inst.front().n);
  EXPECT_EQ(inst.front().prob.seqlens_q.size(), 6u);
  // --quick scales the Llama heads down, keeping N.
  ASSERT_TRUE(instantiate(*find_workload(all, "model/llama3-8b-prefill-8k"), true, "", inst, error)) << error;
  EXPECT_EQ(inst.front().prob.heads_q, 4);
  EXPECT_EQ(inst.front().prob.seq_q, 8192);
  ASSERT_TRUE(instantiate(*find_workload(all, "model/llama3-8b-prefill-8k"), false, "", inst, error)) << error;
  EXPECT_EQ(inst.front().prob.heads_q, 32);
  EXPECT_EQ(inst.front().prob.heads_kv, 8);
}

TEST(BenchWorkloads, GlobMatching) {
  EXPECT_TRUE(glob_match("mask/*", "mask/window"));
  EXPECT_FALSE(glob_match("mask/*", "model/vit"));
  EXPECT_TRUE(glob_match("*", "cab/self-causal"));
  EXPECT_TRUE(glob_match("*/self-*", "cab/self-causal"));
  EXPECT_TRUE(glob_match("mask/?indow", "mask/window"));
  EXPECT_TRUE(glob_match("model/[lm]*", "model/llama3"));
  EXPECT_FALSE(glob_match("model/[v]*", "model/llama3"));
  EXPECT_FALSE(glob_match("mask/full", "mask/full2"));
  EXPECT_TRUE(glob_match("mask/full*", "mask/full"));
}

TEST(BenchWorkloads, WorkloadFileParses) {
  scratch_dir dir;
  const std::string path = dir.write("w.json", R"J({"workloads": [
    {"name": "mine/swa", "problem": "b=1,n={n},hq=8,hkv=2,d=64", "mask": "window(128,0)", "n": [256, 512],
     "quick_n": 256, "refs": ["mine/dense"], "note": "a test"},
    {"name": "mine/dense", "problem": "b=1,n={n},hq=8,hkv=2,d=64", "n": [256, 512]},
    {"name": "mine/fixed", "problem": "b=2,n=100,h=2,d=32,causal=br"}
  ]})J");
  std::vector<workload> ws;
  std::string error;
  ASSERT_TRUE(read_workload_file(path, ws, error)) << error;
  ASSERT_EQ(ws.size(), 3u);
  EXPECT_EQ(ws[0].mask, "window(128,0)");
  EXPECT_EQ(ws[0].ns, (std::vector<std::int64_t>{256, 512}));
  EXPECT_EQ(ws[0].quick_ns, (std::vector<std::int64_t>{256}));
  EXPECT_EQ(ws[0].refs, (std::vector<std::string>{"mine/dense"}));
  EXPECT_EQ(ws[0].note, "a test");
  EXPECT_TRUE(ws[2].ns.empty());
  std::vector<instance> inst;
  ASSERT_TRUE(instantiate(ws[2], false, "", inst, error)) << error;
  EXPECT_EQ(inst.front().n, 100);
  // A bare array is accepted too.
  ws.clear();
  ASSERT_TRUE(read_workload_file(dir.write("a.json", R"([{"name": "x/y", "problem": "n=64"}])"), ws, error)) << error;
  EXPECT_EQ(ws.size(), 1u);
}

TEST(BenchWorkloads, TheExampleFileInBenchIsValid) {
  const std::string path = (std::filesystem::path(__FILE__).parent_path().parent_path() / "bench/workloads.example.json").string();
  std::vector<workload> ws;
  std::string error;
  ASSERT_TRUE(read_workload_file(path, ws, error)) << error;
  ASSERT_FALSE(ws.empty());
  suite_options o;
  ASSERT_TRUE(parse_args({"--workloads", path}, o, error)) << error;  // validates every workload (instantiate)
  std::vector<workload> sel;
  ASSERT_TRUE(select_workloads(o, sel, error)) << error;
  EXPECT_EQ(sel.size(), ws.size());
}

TEST(BenchWorkloads, WorkloadFileErrorsNameFileWorkloadAndKey) {
  scratch_dir dir;
  std::vector<workload> ws;
  std::string error;
  const auto bad = [&](const std::string& text) {
    const std::string p = dir.write("bad.json", text);
    EXPECT_FALSE(read_workload_file(p, ws, error)) << text;
    EXPECT_NE(error.find("bad.json"), std::string::npos) << error;
    return error;
  };
  EXPECT_NE(bad(R"({"workloads": [{"name": "a/b", "problem": "n=64", "maks": "causal"}]})").find("unknown key \"maks\""),
            std::string::npos);
  EXPECT_NE(bad(R"({"workloads": [{"name": "a/b"}]})").find("workload 'a/b': needs \"problem\""), std::string::npos);
  EXPECT_NE(bad(R"({"workloads": [{"name": "a/b", "problem": "n=64", "n": [0]}]})").find("\"n\""), std::string::npos);
  EXPECT_NE(bad(R"({"workloads": [{"problem": "n=64"}]})").find("workload 0"), std::string::npos);
  EXPECT_NE(bad(R"({"workload": []})").find("unknown top-level key \"workload\""), std::string::npos);
  EXPECT_NE(bad("{\"workloads\": [\n{\"name\": \"a\",}\n]}").find("line 2"), std::string::npos);
  EXPECT_FALSE(read_workload_file(dir.path() + "/missing.json", ws, error));
  EXPECT_NE(error.find("cannot open"), std::string::npos) << error;
}

// ---------------------------------------------------------------------------------------------------------------------
// Neighborhood workloads and the naive neighborhood baseline.

// The benchmark's mask areas are exact: NATTEN's windows are shifted, not clipped, so without dilation or causal axes
// every query sees exactly prod(kernel) keys.
TEST(BenchNeighborhood, WorkloadsCountExactlyKernelKeysPerQuery) {
  const std::vector<workload>& all = built_in_workloads();
  int found = 0;
  for (const workload& w : all) {
    if (w.group() != "neighborhood") continue;
    ++found;
    std::vector<instance> inst;
    std::string error;
    ASSERT_TRUE(instantiate(w, false, "", inst, error)) << error;
    ASSERT_EQ(inst.size(), 1u);
    const std::optional<detail::grid_local> g = detail::as_grid_local(inst[0].mask);
    ASSERT_TRUE(g) << w.name;
    EXPECT_EQ(g->tokens(), inst[0].prob.seq_q) << w.name;  // the grid covers the sequence
    if (w.name.find("bf16") != std::string::npos) continue;  // the same masks as the f32 rows: counted once
    std::int64_t kernel_keys = 1;
    for (int a = 0; a < g->rank; ++a) kernel_keys *= g->kernel[a];
    problem pr = inst[0].prob;
    pr.heads_q = pr.heads_kv = 1;  // the count is per head; one head keeps the buffers small
    problem_data data(pr);
    spec s;
    s.mask = inst[0].mask;
    attn_params p;
    ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p).ok());
    EXPECT_EQ(useful_pairs(p), g->tokens() * kernel_keys) << w.name;
  }
  EXPECT_EQ(found, 8);
  // --filter 'neighborhood*' selects exactly these rows (they have no references).
  suite_options o;
  std::string error;
  ASSERT_TRUE(parse_args({"--filter", "neighborhood*"}, o, error)) << error;
  std::vector<workload> sel;
  ASSERT_TRUE(select_workloads(o, sel, error)) << error;
  EXPECT_EQ(sel.size(), 8u);
  for (const workload& w : sel) EXPECT_EQ(w.group(), "neighborhood") << w.name;
}

// The naive baseline against the fp64 oracle on small grids: every rank, dilation, a causal axis, GQA, bf16, the BHSD
// layout, the spec's causal flag on top, a grid smaller than the sequence, varlen, one and two threads.
TEST(BenchNeighborhood, NaiveBaselineMatchesTheOracle) {
  struct local_case {
    const char* problem;
    mask_expr mask;
  };
  std::vector<local_case> cases = {
      {"b=2,n=30,hq=4,hkv=2,d=16", mask_expr::neighborhood({30}, {7})},
      {"b=1,n=48,h=2,d=16", mask_expr::neighborhood({6, 8}, {3, 5})},
      {"b=1,n=90,h=2,d=16", mask_expr::neighborhood({9, 10}, {3, 3}, {2, 3})},
      {"b=1,n=36,h=2,d=16", mask_expr::neighborhood({6, 6}, {3, 3}, {1, 1}, {true, false})},
      {"b=1,n=120,h=2,d=16", mask_expr::neighborhood({4, 5, 6}, {3, 3, 5})},
      {"b=1,n=120,h=2,d=16", mask_expr::neighborhood({4, 5, 6}, {1, 5, 3}, {1, 1, 2}, {true, false, false})},
      {"b=1,n=64,h=2,d=32,dtype=bf16", mask_expr::neighborhood({8, 8}, {5, 5})},
      {"b=1,n=64,h=2,d=32,dtype=bf16,out=f32", mask_expr::neighborhood({8, 8}, {3, 7})},
      {"b=2,n=64,h=2,d=16,layout=bhsd", mask_expr::neighborhood({8, 8}, {5, 3})},
      {"b=1,n=64,h=2,d=16,causal=br", mask_expr::neighborhood({8, 8}, {5, 5})},
      {"b=1,n=30,h=2,d=16", mask_expr::neighborhood({5, 5}, {3, 3})},  // rows 25..29 are outside the grid: zeros
      {"h=2,d=16,varlen=25:25/20:20", mask_expr::neighborhood({5, 5}, {3, 3})},
      {"b=1,n=64,h=2,d=16", mask_expr::halo({8, 8}, {4, 4}, {1, 1})},
  };
  for (const local_case& c : cases) {
    problem pr;
    ASSERT_TRUE(parse_problem(c.problem, pr).ok()) << c.problem;
    pr.lse = false;
    spec s;
    s.causal = pr.causal;
    s.mask = c.mask;
    const std::string what = std::string(c.problem) + " " + c.mask.str();
    problem_data oracle(pr);
    ASSERT_TRUE(run_problem(oracle, s, backend::reference).ok()) << what;
    for (const int threads : {1, 2}) {
      problem_data data(pr);
      attn_params p;
      ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p).ok())
          << what;
      ASSERT_EQ(naive_local_unsupported(p), "") << what;
      std::fill(data.out.begin(), data.out.end(), std::uint8_t{0xff});  // every element must be written
      naive_local_attention(p, threads);
      const tensor o = data.out_view();
      const std::int64_t total_q = pr.is_varlen() ? oracle.cu_q.back() : pr.seq_q;
      double max_err = 0.0, max_ref = 0.0;
      for (std::int64_t b = 0; b < (pr.is_varlen() ? 1 : pr.batch); ++b)
        for (std::int64_t i = 0; i < total_q; ++i)
          for (std::int64_t h = 0; h < pr.heads_q; ++h)
            for (std::int64_t d = 0; d < pr.dim_v; ++d) {
              const double ref = oracle.out_at(b, i, h, d), got = data.out_at(b, i, h, d);
              max_err = std::max(max_err, std::isnan(got) ? INFINITY : std::fabs(got - ref));
              max_ref = std::max(max_ref, std::fabs(ref));
            }
      EXPECT_LE(max_err, 1e-5 + 2.0 * dtype_epsilon(o.type) * max_ref) << what << " threads " << threads;
    }
  }
  // Masks it does not cover say so instead of running.
  problem pr;
  ASSERT_TRUE(parse_problem("b=1,n=16,h=1,d=8", pr).ok());
  problem_data data(pr);
  spec s;
  s.mask = mask_expr::window(3, 0, causal_mode::bottom_right);
  attn_params p;
  ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p).ok());
  EXPECT_NE(naive_local_unsupported(p), "");
  s.mask = mask_expr::neighborhood({4, 4}, {3, 3}) & mask_expr::causal(causal_mode::bottom_right);  // not a single pattern
  ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p).ok());
  EXPECT_NE(naive_local_unsupported(p), "");
}

TEST(BenchNeighborhood, ReportShowsTheNaiveBaselineColumns) {
  scratch_dir dir;
  result_row local = sample_row("neighborhood/2d-64x64-k7", 4096, 2.0, 20.0);
  local.mask = "neighborhood(grid=64x64, kernel=7x7)";
  local.naive_local_ms = 30.0;
  local.naive_local_gflops = local.useful_flops / 30.0 * 1e-6;
  local.naive_local_speedup = 15.0;
  local.naive_local_max_abs_err = 1e-7;
  const std::vector<result_row> rows = {sample_row("mask/full", 256, 1.0, 2.0), local};
  std::string error;
  ASSERT_TRUE(write_report(dir.path() + "/out", sample_info(), rows, {}, false, error)) << error;
  std::ifstream m(dir.path() + "/out/report.md"), j(dir.path() + "/out/results.json");
  std::stringstream ms, js;
  ms << m.rdbuf();
  js << j.rdbuf();
  const std::string md = ms.str();
  const std::size_t section = md.find("## neighborhood");
  ASSERT_NE(section, std::string::npos);
  EXPECT_NE(md.find("x naive local", section), std::string::npos);
  EXPECT_NE(md.find("| 30.00 |", section), std::string::npos);
  EXPECT_NE(md.find("| 15.0 |", section), std::string::npos);
  EXPECT_EQ(md.substr(md.find("## mask"), section - md.find("## mask")).find("x naive local"), std::string::npos);
  json doc;
  ASSERT_TRUE(json::parse(js.str(), doc, error)) << error;
  const json& r = doc.find("rows")->items().at(1);
  EXPECT_EQ(r.find("naive_local_speedup")->as_number(), 15.0);
  EXPECT_TRUE(r.find("naive_local_check_ok")->as_bool());
  EXPECT_TRUE(doc.find("rows")->items().at(0).find("naive_local_ms")->is_null());
  EXPECT_TRUE(doc.find("rows")->items().at(0).find("naive_local_check_ok")->is_null());
}

// ---------------------------------------------------------------------------------------------------------------------
// Command line.

TEST(BenchArgs, CustomProblemsMasksSweepsAndFilters) {
  suite_options o;
  std::string error;
  ASSERT_TRUE(parse_args({"--problem", "b=1,n=2048,h=8,d=128", "--mask", "causal & window(512,0)", "--problem=b=2,h=4,d=64",
                          "--n", "256,512", "--quick", "--filter", "custom/*,mask/full", "--threads", "1,2", "--out", "/tmp/x",
                          "--set", "dtype=bf16", "--no-plots"},
                         o, error))
      << error;
  ASSERT_EQ(o.custom.size(), 2u);
  EXPECT_EQ(o.custom[0].name, "custom/1");
  EXPECT_EQ(o.custom[0].mask, "causal & window(512,0)");
  EXPECT_EQ(o.custom[1].problem, "b=2,h=4,d=64");
  EXPECT_TRUE(o.custom[1].mask.empty());
  EXPECT_EQ(o.ns, (std::vector<std::int64_t>{256, 512}));
  EXPECT_TRUE(o.quick);
  EXPECT_DOUBLE_EQ(o.budget_s, 0.1);
  EXPECT_EQ(o.filters, (std::vector<std::string>{"custom/*", "mask/full"}));
  EXPECT_EQ(o.threads, (std::vector<int>{1, 2}));
  EXPECT_EQ(o.out_dir, "/tmp/x");
  EXPECT_EQ(o.overrides, "dtype=bf16");
  EXPECT_FALSE(o.plots);
  std::vector<workload> sel;
  ASSERT_TRUE(select_workloads(o, sel, error)) << error;
  ASSERT_EQ(sel.size(), 3u);  // mask/full, custom/1, custom/2
  const workload* c2 = find_workload(sel, "custom/2");
  ASSERT_TRUE(c2);
  std::vector<instance> inst;
  ASSERT_TRUE(instantiate(*c2, o.quick, o.overrides, inst, error)) << error;
  ASSERT_EQ(inst.size(), 2u);  // --n gives the custom problem its sweep
  EXPECT_EQ(inst[1].prob.seq_q, 512);
  EXPECT_EQ(inst[1].prob.batch, 2);
  EXPECT_EQ(inst[1].prob.type, dtype::bf16);
}

TEST(BenchArgs, SelectionAddsReferencesAndDefaultsToCustomWorkloads) {
  suite_options o;
  std::string error;
  ASSERT_TRUE(parse_args({"--filter", "mask/window"}, o, error)) << error;
  std::vector<workload> sel;
  ASSERT_TRUE(select_workloads(o, sel, error)) << error;
  std::vector<std::string> names;
  for (const workload& w : sel) names.push_back(w.name);
  EXPECT_EQ(names, (std::vector<std::string>{"mask/full", "mask/causal", "mask/window"}));
  suite_options custom;
  ASSERT_TRUE(parse_args({"--problem", "n=64,h=2,d=16"}, custom, error)) << error;
  ASSERT_TRUE(select_workloads(custom, sel, error)) << error;
  ASSERT_EQ(sel.size(), 1u);
  EXPECT_EQ(sel[0].name, "custom/1");
  suite_options none;
  ASSERT_TRUE(parse_args({"--filter", "nothing/*"}, none, error)) << error;
  EXPECT_FALSE(select_workloads(none, sel, error));
  EXPECT_NE(error.find("--filter 'nothing/*' matches no workload"), std::string::npos) << error;
  suite_options defaults;
  ASSERT_TRUE(parse_args({}, defaults, error)) << error;
  ASSERT_TRUE(select_workloads(defaults, sel, error)) << error;
  EXPECT_EQ(sel.size(), built_in_workloads().size());
}

TEST(BenchArgs, BadInputNamesTheArgument) {
  std::string e = parse_error({"--problem", "b=1,n=x,h=8"});
  EXPECT_NE(e.find("--problem 'b=1,n=x,h=8'"), std::string::npos) << e;
  EXPECT_NE(e.find("n=x: not an integer"), std::string::npos) << e;
  e = parse_error({"--problem", "n=64,h=2,d=16", "--mask", "window(3"});
  EXPECT_NE(e.find("--mask 'window(3'"), std::string::npos) << e;
  EXPECT_NE(e.find("[spec]"), std::string::npos) << e;
  e = parse_error({"--problem", "n=64,hq=6,hkv=4,d=16"});
  EXPECT_NE(e.find("--problem"), std::string::npos) << e;
  e = parse_error({"--mask", "causal"});
  EXPECT_NE(e.find("--mask 'causal' needs a --problem before it"), std::string::npos) << e;
  e = parse_error({"--problem", "b=1,n={n},h=2,d=16"});
  EXPECT_NE(e.find("{n}"), std::string::npos) << e;
  EXPECT_NE(parse_error({"--frobnicate"}).find("unknown argument '--frobnicate'"), std::string::npos);
  EXPECT_NE(parse_error({"--budget", "-1"}).find("--budget '-1'"), std::string::npos);
  EXPECT_NE(parse_error({"--budget"}).find("--budget needs a value"), std::string::npos);
  EXPECT_NE(parse_error({"--threads", "0"}).find("--threads '0'"), std::string::npos);
  EXPECT_NE(parse_error({"--n", "1,x"}).find("--n '1,x'"), std::string::npos);
  EXPECT_NE(parse_error({"--set", "nonsense"}).find("--set 'nonsense'"), std::string::npos);
  EXPECT_NE(parse_error({"--set", "q=1"}).find("unknown key 'q'"), std::string::npos);
  EXPECT_NE(parse_error({"--quick=yes"}).find("--quick takes no value"), std::string::npos);
  EXPECT_NE(parse_error({"--workloads", "/nonexistent/w.json"}).find("--workloads /nonexistent/w.json: cannot open"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------------------------------
// Measurement.

TEST(BenchMeasure, TimingRespectsRepsAndOrdersStatistics) {
  int calls = 0;
  measure_policy p;
  p.budget_s = 0;
  p.min_reps = 5;
  const timing t = measure([&] { ++calls; }, p);
  EXPECT_EQ(t.reps, 5);
  EXPECT_EQ(calls, 6);  // one warm-up
  EXPECT_LE(t.min_s, t.q1_s);
  EXPECT_LE(t.q1_s, t.median_s);
  EXPECT_LE(t.median_s, t.q3_s);
  EXPECT_LE(t.q3_s, t.max_s);
  p.warm_up = false;
  p.min_reps = 1000;
  p.max_reps = 7;
  calls = 0;
  EXPECT_EQ(measure([&] { ++calls; }, p).reps, 7);
  EXPECT_EQ(calls, 7);
}

TEST(BenchMeasure, DisturbanceCountsOthersAndStealBeyondIdleCpus) {
  const int cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  cpu_sample a, b;
  b.wall_s = 1.0;
  EXPECT_EQ(disturbed_pct(a, b, cpus), 0.0);  // a quiet machine
  b.busy_s = 2.0;
  b.self_s = 2.0;
  EXPECT_EQ(disturbed_pct(a, b, cpus), 0.0);  // all the busy time was ours
  b.busy_s = 2.5;
  EXPECT_NEAR(disturbed_pct(a, b, cpus), 50.0 / cpus, 1e-9);  // others took 0.5 CPU-seconds of cpus
  b.steal_s = 0.5;
  EXPECT_NEAR(disturbed_pct(a, b, cpus), 100.0 / cpus, 1e-9);  // and the hypervisor as much again
  if (cpus >= 2) {
    EXPECT_EQ(disturbed_pct(a, b, 1), 0.0);  // one thread: an idle CPU absorbed it
  }
  const cpu_sample now = sample_cpu();
  EXPECT_GT(now.wall_s, 0.0);
  EXPECT_GE(now.self_s, 0.0);
}

TEST(BenchMeasure, SampledCheckPassesTheKernelAndCatchesACorruptOutput) {
  problem pr;
  ASSERT_TRUE(parse_problem("b=2,n=150,hq=4,hkv=2,d=32,causal=br", pr).ok());
  problem_data data(pr);
  spec s;
  s.causal = pr.causal;
  ASSERT_EQ(parse_mask("window(40,0) | sinks(2)", s.mask), "");
  ASSERT_TRUE(run_problem(data, s, backend::cpu).ok());
  attn_params p;
  ASSERT_TRUE(make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, data.make_options(backend::cpu), p).ok());
  check_result c = check_sampled_rows(p, 64);
  EXPECT_EQ(c.rows, 64);
  EXPECT_TRUE(c.ok) << c.max_abs_err;
  EXPECT_LT(c.max_abs_err, 1e-5);
  std::fill(data.out.begin(), data.out.end(), std::uint8_t{0});
  c = check_sampled_rows(p, 64);
  EXPECT_FALSE(c.ok);
}

TEST(BenchMeasure, PeaksAreCachedPerMachineAndThreads) {
  scratch_dir dir;
  const std::string path = dir.path() + "/sub/peak.json";
  env_guard env("OMNIATTN_PEAK_CACHE", path);
  EXPECT_EQ(peak_cache_path(), path);
  std::string note;
  const std::vector<machine_peak> first = machine_peaks({1}, true, "TESTISA", note);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0].source, "measured");
  EXPECT_GT(first[0].fp32_fma_gflops, 0);
  ASSERT_TRUE(std::filesystem::exists(path));
  const std::vector<machine_peak> second = machine_peaks({1}, true, "TESTISA", note);
  EXPECT_EQ(second[0].source, "cache");
  EXPECT_NEAR(second[0].fp32_fma_gflops, first[0].fp32_fma_gflops, 1e-3 * first[0].fp32_fma_gflops);
  EXPECT_EQ(machine_peaks({1}, false, "TESTISA", note)[0].source, "measured");  // --no-cache
  EXPECT_EQ(machine_peaks({1}, true, "OTHERISA", note)[0].source, "measured");  // keyed by ISA too
  std::ofstream(path) << "{ not json";
  EXPECT_EQ(machine_peaks({1}, true, "TESTISA", note)[0].source, "measured");
  EXPECT_NE(note.find("unreadable"), std::string::npos) << note;
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward rows: FLOPs, the unfused OpenBLAS backward against the oracle, the sampled gradient check, the suite's and
// the kernel table's rows.

TEST(BenchBackward, FlopsAreTwoAndAHalfTimesTheForward) {
  EXPECT_EQ(op_flops(op_kind::forward, 1000, 64, 64), 4.0 * 1000 * 64);
  EXPECT_EQ(op_flops(op_kind::backward, 1000, 64, 64), 2.5 * 4.0 * 1000 * 64);  // 10 * mask area * D
  EXPECT_EQ(op_flops(op_kind::backward, 7, 96, 40), 2.5 * op_flops(op_kind::forward, 7, 96, 40));
  op_kind op = op_kind::forward;
  EXPECT_TRUE(parse_op("backward", op));
  EXPECT_EQ(op, op_kind::backward);
  EXPECT_TRUE(parse_op("fwd", op));
  EXPECT_EQ(op, op_kind::forward);
  EXPECT_FALSE(parse_op("sideways", op));
  EXPECT_STREQ(op_name(op_kind::backward), "backward");
}

// The baseline's gradients against the fp64 oracle, under the tests' backward rule (tests/tolerance.h: at most twice
// the naive float backward's error plus the floor): dense, causal both ways, masks, GQA, cross lengths, rows with
// no allowed key, varlen with empty sequences, and 3 threads splitting rows that do not divide evenly.
TEST(BenchBackward, UnfusedOpenBlasBackwardMatchesTheOracle) {
  const area_case cases[] = {
      {"b=2,n=96,h=2,d=32", ""},
      {"b=1,n=130,hq=4,hkv=2,d=48,causal=br", ""},
      {"b=1,lq=70,lk=150,h=2,d=16,causal=tl", ""},
      {"b=1,lq=90,lk=40,h=2,d=32,causal=br", ""},  // Lq > Lk: the first 50 rows see no key
      {"b=1,n=200,hq=6,hkv=2,d=64", "window(32,0)"},
      {"b=1,n=150,h=2,d=32", "causal & document(0,40,41,100,150)"},
      {"b=1,n=64,h=2,d=16", "neighborhood(grid=8x8, kernel=3x3)"},
      {"h=2,d=32,causal=br,varlen=50:50/0:7/33:33/20:0", ""},
  };
  for (const area_case& c : cases) {
    problem pr;
    spec s;
    ASSERT_TRUE(c.parse(pr, s)) << c.problem << " " << c.mask;
    pr.lse = true;
    problem po = pr;
    po.out_f32 = true;
    problem_data fwd(pr), ofwd(po), nfwd(pr);
    ASSERT_TRUE(run_problem(fwd, s, backend::cpu).ok());  // O for D = rowsum(dO * O)
    backward_data got(pr, 7), oracle(po, 7), naive(pr, 7);
    for (auto* g : {&got.dq, &got.dk, &got.dv}) std::fill(g->begin(), g->end(), std::uint8_t{0x7f});  // poison
    ASSERT_TRUE(run_backward_problem(ofwd, oracle, s, backend::reference, 1).ok());
    ASSERT_TRUE(run_naive_backward(nfwd, naive, s).ok());
    attn_bwd_params bp;
    ASSERT_TRUE(make_backward_params(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(), got.d_out_view(),
                                     got.grads(false), s, fwd.make_options(backend::cpu), bp)
                    .ok());
    openblas_unfused_backward(bp, 3);
    double magnitude = 0;
    for (int w = 0; w < 3; ++w) magnitude = std::max(magnitude, test::grad_error(naive, oracle, w).ref_max);
    for (int w = 0; w < 3; ++w) {
      const test::error_stats eb = test::grad_error(got, oracle, w), en = test::grad_error(naive, oracle, w);
      const double tol = 2.0 * en.max_abs + test::k_grad_floor_eps * dtype_epsilon(dtype::f32) * magnitude;
      EXPECT_TRUE(eb.hard_ok()) << c.problem << " " << c.mask << ": " << eb.worst;
      EXPECT_LE(eb.max_abs, tol) << c.problem << " " << c.mask << " grad " << w << ": " << eb.worst << " (naive " << en.max_abs << ")";
    }
  }
}

TEST(BenchBackward, SampledCheckPassesTheKernelAndCatchesCorruptGradients) {
  problem pr;
  ASSERT_TRUE(parse_problem("b=2,n=150,hq=4,hkv=2,d=32,causal=br", pr).ok());
  pr.lse = true;
  problem_data data(pr);
  spec s;
  s.causal = pr.causal;
  ASSERT_EQ(parse_mask("window(40,0)", s.mask), "");
  ASSERT_TRUE(run_problem(data, s, backend::cpu).ok());
  backward_data g(pr, 7);
  ASSERT_TRUE(run_backward_problem(data, g, s, backend::cpu).ok());
  attn_bwd_params bp;
  ASSERT_TRUE(make_backward_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), data.lse_view(), g.d_out_view(),
                                   g.grads(false), s, data.make_options(backend::cpu), bp)
                  .ok());
  check_result c = check_backward_sampled(bp, 64);
  EXPECT_EQ(c.rows, 64 + 16);  // 64 query rows (dq), 16 key rows (dk, dv)
  EXPECT_EQ(c.grads, "dq,dk,dv");
  EXPECT_TRUE(c.ok) << c.max_abs_err << " tol " << c.tolerance;
  EXPECT_LT(c.max_abs_err, 1e-5);
  // The work is counted on the mask area: 2 heads x ~5,300 allowed pairs x 64 fits 1e6 (the dense 2 x 150^2 x 64
  // would not). Over the limit only dq is compared, and the reason is given.
  EXPECT_EQ(check_backward_sampled(bp, 64, 1e6).grads, "dq,dk,dv");
  c = check_backward_sampled(bp, 64, 1000.0);
  EXPECT_EQ(c.rows, 64);
  EXPECT_EQ(c.grads.rfind("dq (dk, dv not checked", 0), 0u) << c.grads;
  // Key 0 and the last key of the sampled kv head, and query row 0 of batch 0, are always compared: corrupt one of each
  // gradient there in every head and each is caught on its own.
  for (int which = 0; which < 3; ++which) {
    std::vector<std::uint8_t>& buf = which == 0 ? g.dq : which == 1 ? g.dk : g.dv;
    const std::vector<std::uint8_t> saved = buf;
    const tensor t = which == 0 ? g.dq_view() : which == 1 ? g.dk_view() : g.dv_view();
    for (std::int64_t h = 0; h < t.heads; ++h) detail::store_element(t.data, t.type, h * t.stride_head, 5.0);
    EXPECT_FALSE(check_backward_sampled(bp, 64).ok) << which;
    buf = saved;
  }
  EXPECT_TRUE(check_backward_sampled(bp, 64).ok);
}

TEST(BenchBackward, SuiteRowsCarryTheOpTheBackwardFlopsAndTheBaselineError) {
  scratch_dir dir;
  env_guard env("OMNIATTN_PEAK_CACHE", dir.path() + "/peak.json");
  write_fake_peak(dir.path() + "/peak.json", 100.0);
  suite_options o;
  std::string error;
  ASSERT_TRUE(parse_args({"--problem", "n=128,h=2,d=32", "--problem", "n=128,h=2,d=32", "--mask", "window(16,0)", "--op",
                          "forward,backward", "--threads", "1", "--budget", "0.002", "--no-plots", "--out", dir.path() + "/out"},
                         o, error))
      << error;
  std::vector<workload> sel;
  ASSERT_TRUE(select_workloads(o, sel, error)) << error;
  ASSERT_EQ(sel.size(), 4u);
  EXPECT_EQ(sel[1].name, "custom-bwd/1");
  EXPECT_EQ(sel[1].op, op_kind::backward);
  ASSERT_EQ(run_suite(o), 0);
  const json doc = read_json_file(dir.path() + "/out/results.json");
  const std::vector<json>& rows = doc.find("rows")->items();
  ASSERT_EQ(rows.size(), 4u);
  const auto num = [&](std::size_t i, const char* key) { return rows[i].find(key)->as_number(); };
  const auto str = [&](std::size_t i, const char* key) { return rows[i].find(key)->as_string(); };
  EXPECT_EQ(str(0, "workload"), "custom/1");
  EXPECT_EQ(str(0, "op"), "forward");
  EXPECT_EQ(str(1, "workload"), "custom-bwd/1");
  EXPECT_EQ(str(1, "op"), "backward");
  EXPECT_EQ(str(1, "group"), "custom-bwd");
  EXPECT_EQ(num(0, "useful_flops"), 4.0 * 128 * 128 * 2 * 32);
  EXPECT_EQ(num(1, "useful_flops"), 2.5 * num(0, "useful_flops"));
  EXPECT_EQ(str(1, "kernel").rfind("cpu.flash_bwd", 0), 0u) << str(1, "kernel");
  EXPECT_TRUE(rows[1].find("tiles_skipped_pct")->is_null());  // the backward counts no tiles
  EXPECT_TRUE(rows[0].find("check_grads")->is_null());
  for (const std::size_t i : {1u, 3u}) {
    EXPECT_EQ(str(i, "check_grads"), "dq,dk,dv") << i;
    EXPECT_TRUE(rows[i].find("check_ok")->as_bool()) << i;
    EXPECT_LT(num(i, "check_max_abs_err"), 1e-5) << i;
    EXPECT_GT(num(i, "openblas_ms"), 0.0) << i;
    EXPECT_LT(num(i, "openblas_max_abs_err"), 1e-5) << i;  // the baseline's own gradients against fp64
  }
  EXPECT_EQ(str(1, "openblas_cost"), "dense");
  // The masked backward row: useful FLOPs on the mask area, the baseline with the mask applied, the dense backward
  // row's time as its dense run.
  EXPECT_EQ(str(3, "workload"), "custom-bwd/2");
  EXPECT_EQ(num(3, "useful_flops"), 2.5 * num(2, "useful_flops"));
  EXPECT_LT(num(3, "useful_flops"), 0.2 * num(1, "useful_flops"));
  EXPECT_EQ(str(3, "openblas_cost"), "dense, mask applied");
  EXPECT_EQ(str(2, "openblas_cost"), "dense (mask not applied)");
  EXPECT_EQ(num(3, "dense_ms"), num(1, "median_ms"));
  EXPECT_EQ(num(2, "dense_ms"), num(0, "median_ms"));
  // --op backward alone: no forward row, the backward group's built-ins selected by a filter.
  suite_options ob;
  ASSERT_TRUE(parse_args({"--filter", "bwd/causal-d64,mask/full", "--op", "backward"}, ob, error)) << error;
  ASSERT_TRUE(select_workloads(ob, sel, error)) << error;
  ASSERT_EQ(sel.size(), 1u);
  EXPECT_EQ(sel[0].name, "bwd/causal-d64");
  EXPECT_NE(parse_error({"--op", "sideways"}).find("--op 'sideways'"), std::string::npos);
}

TEST(BenchBackward, BuiltInGroupCoversFivePatternsTwoHeadDimsTwoDtypes) {
  std::vector<const workload*> bwd;
  for (const workload& w : built_in_workloads())
    if (w.group() == "bwd") bwd.push_back(&w);
  ASSERT_EQ(bwd.size(), 20u);
  for (const workload* w : bwd) EXPECT_EQ(w->op, op_kind::backward) << w->name;
  for (const char* pattern : {"dense", "causal", "window", "document", "neighborhood-2d"})
    for (const char* d : {"64", "128"})
      for (const char* t : {"", "-bf16"}) {
        const std::string name = std::string("bwd/") + pattern + "-d" + d + t;
        const workload* w = find_workload(built_in_workloads(), name);
        ASSERT_TRUE(w) << name;
        std::vector<instance> inst;
        std::string error;
        ASSERT_TRUE(instantiate(*w, true, "", inst, error)) << error;
        EXPECT_EQ(inst[0].prob.dim_qk, std::stoll(d)) << name;
        EXPECT_EQ(inst[0].prob.type, *t ? dtype::bf16 : dtype::f32) << name;
      }
  std::vector<instance> inst;
  std::string error;
  ASSERT_TRUE(instantiate(*find_workload(built_in_workloads(), "bwd/neighborhood-2d-d64"), false, "", inst, error)) << error;
  EXPECT_EQ(inst[0].mask_text, "neighborhood(grid=64x64, kernel=7x7)");
  ASSERT_TRUE(instantiate(*find_workload(built_in_workloads(), "bwd/causal-d128"), false, "", inst, error)) << error;
  EXPECT_EQ(inst[0].prob.causal, causal_mode::bottom_right);
  // A workload file may ask for the backward.
  scratch_dir dir;
  std::vector<workload> ws;
  ASSERT_TRUE(read_workload_file(dir.write("b.json", R"([{"name": "x/b", "problem": "n=64", "op": "backward"}])"), ws, error))
      << error;
  EXPECT_EQ(ws[0].op, op_kind::backward);
  EXPECT_FALSE(read_workload_file(dir.write("c.json", R"([{"name": "x/b", "problem": "n=64", "op": "up"}])"), ws, error));
  EXPECT_NE(error.find("\"op\" must be \"forward\" or \"backward\""), std::string::npos) << error;
}

TEST(BenchKernelTable, BackwardRowsCountTwoAndAHalfForwardFlopsAndCheckTheBaseline) {
  scratch_dir dir;
  env_guard env("OMNIATTN_PEAK_CACHE", dir.path() + "/peak.json");
  write_fake_peak(dir.path() + "/peak.json", 100.0);
  std::vector<std::string> args = {"omniattn", "bench", "--kernel", "--op", "forward,backward", "--n", "128", "--d", "32",
                                   "--heads", "2", "--threads", "1", "--dtype", "f32", "--budget", "0.002", "--json",
                                   dir.path() + "/k.json"};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  ASSERT_EQ(kernel_main(static_cast<int>(argv.size()), argv.data()), 0);
  const json doc = read_json_file(dir.path() + "/k.json");
  const std::vector<json>& rows = doc.find("rows")->items();
  ASSERT_EQ(rows.size(), 4u);  // forward dense, causal; backward dense, causal
  for (std::size_t i = 0; i < 4; ++i) {
    const json& r = rows[i];
    EXPECT_EQ(r.find("op")->as_string(), i < 2 ? "forward" : "backward");
    EXPECT_EQ(r.find("mask")->as_string(), i % 2 ? "causal" : "dense");
    EXPECT_EQ(r.find("useful_flops")->as_number(), rows[i % 2].find("useful_flops")->as_number() * (i < 2 ? 1.0 : 2.5));
    EXPECT_LT(r.find("max_abs_err")->as_number(), 1e-5) << i;  // N <= 512: the whole oracle
    EXPECT_LT(r.find("openblas_max_abs_err")->as_number(), 1e-5) << i;
    EXPECT_GT(r.find("openblas_gflops")->as_number(), 0.0) << i;
  }
  EXPECT_EQ(rows[2].find("useful_flops")->as_number(), 2.5 * 4.0 * 128 * 128 * 2 * 32);
  EXPECT_EQ(rows[2].find("kernel")->as_string().rfind("cpu.flash_bwd", 0), 0u);
  EXPECT_TRUE(rows[2].find("tiles_skipped_pct")->is_null());
}

}  // namespace
}  // namespace omniattn::bench


#else

TEST(BenchHarness, NotLinked) {
  GTEST_SKIP() << "tests/test_bench.cc needs omniattn_bench: target_link_libraries(omniattn_tests PRIVATE omniattn_bench)";
}

#endif
