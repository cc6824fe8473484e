// options::block: a call that computes one block (rows x keys) of a larger problem, with every spec feature at the
// block's positions in the whole problem. Checked three ways for each spec of a list that covers every kind of mask
// and score modifier, RoPE and a user block mask:
//   * the oracle on a block of rows with every key is bitwise the oracle's rows of the whole problem (same loops);
//   * the CPU kernel on each block against the oracle on the same block, under the tolerance rule (tolerance.h);
//   * the kernel's key blocks merged with merge_attention_states against the kernel on all keys (k_merge_eps).
// Plus the validation rules. Tolerances: tests/tolerance.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/problem.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

constexpr float k_nan = std::numeric_limits<float>::quiet_NaN();

// An f32 out [rows, heads, dim] of batch `batch` and its lse [batch, heads, rows], NaN until written.
struct block_result {
  std::int64_t batch, rows, heads, dim;
  std::vector<float> out, lse;
  block_result(std::int64_t b, std::int64_t r, std::int64_t h, std::int64_t d)
      : batch(b), rows(r), heads(h), dim(d), out(static_cast<std::size_t>(b * r * h * d), k_nan),
        lse(static_cast<std::size_t>(b * h * r), k_nan) {}
  tensor out_view() const { return make_bshd(const_cast<float*>(out.data()), dtype::f32, batch, rows, heads, dim); }
  lse_tensor lse_view() const { return make_lse(const_cast<float*>(lse.data()), heads, rows); }
};

// Rows [begin, end) of a BSHD view.
tensor rows_of(tensor t, std::int64_t begin, std::int64_t end) {
  t.data = static_cast<char*>(t.data) + begin * t.stride_seq * dtype_size(t.type);
  t.seq = end - begin;
  return t;
}

// Whole problem: the data, the spec and what the spec borrows (tables kept alive here).
struct whole {
  problem prob;
  std::unique_ptr<problem_data> data;
  spec s;
  std::vector<float> bias, sinks;
  std::vector<std::int64_t> ids;
  rope_spec rope;
  block_mask blocks;
};

enum class run_as { kernel, oracle, naive };

// Rows [q0, q1) against keys [k0, k1) of the whole problem w, as one block call.
// Sink logits join every block's normaliser (problem_block's contract); drop_sinks runs the block without them.
block_result run_block(const whole& w, std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1, run_as how,
                       bool drop_sinks = false) {
  spec s = w.s;
  if (drop_sinks) s.sink_logits = nullptr;
  const problem& p = w.prob;
  const problem_data& d = *w.data;
  block_result r(p.batch, q1 - q0, p.heads_q, p.dim_v);
  problem_block blk{q0, k0, p.seq_q, p.seq_k};
  options o = d.make_options(how == run_as::kernel ? backend::cpu : backend::reference, 1);
  const lse_tensor l = r.lse_view();
  o.lse = &l;
  o.block = &blk;
  const tensor q = rows_of(d.q_view(), q0, q1), k = rows_of(d.k_view(), k0, k1), v = rows_of(d.v_view(), k0, k1);
  if (how == run_as::naive) {
    attn_params prm;
    const status st = make_params(q, k, v, r.out_view(), s, o, prm);
    EXPECT_TRUE(st.ok()) << st.error;
    if (st.ok()) naive_attention_f32(prm);
    return r;
  }
  const status st = attention(q, k, v, r.out_view(), s, o);
  EXPECT_TRUE(st.ok()) << st.error;
  return r;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b, std::int64_t* hard) {
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i]) || std::isinf(a[i]) != std::isinf(b[i]) || (std::isinf(a[i]) && a[i] != b[i])) {
      ++*hard;
      continue;
    }
    if (!std::isinf(a[i])) worst = std::max(worst, static_cast<double>(std::fabs(a[i] - b[i])));
  }
  return worst;
}

double max_finite(const std::vector<float>& a) {
  double m = 0.0;
  for (float x : a)
    if (std::isfinite(x)) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

// The kernel-vs-oracle rule of tolerance.h on one block (the naive float loops give the 2x term).
void expect_block_near(const block_result& kernel, const block_result& oracle, const block_result& naive) {
  std::int64_t hard = 0;
  const double e_out = max_abs_diff(kernel.out, oracle.out, &hard), n_out = max_abs_diff(naive.out, oracle.out, &hard);
  const double e_lse = max_abs_diff(kernel.lse, oracle.lse, &hard), n_lse = max_abs_diff(naive.lse, oracle.lse, &hard);
  EXPECT_EQ(hard, 0) << "NaN or unmatched infinities";
  const double eps = test::dtype_eps(dtype::f32);
  EXPECT_LE(e_out, 2 * n_out + test::k_out_floor_eps * eps * max_finite(oracle.out)) << "out";
  EXPECT_LE(e_lse, 2 * n_lse + test::k_lse_floor_eps * eps * std::max(1.0, max_finite(oracle.lse))) << "lse";
}

struct spec_case {
  const char* name;
  std::function<void(whole&)> set;
};

// Every kind of pattern and modifier whose meaning depends on positions or lengths.
std::vector<spec_case> spec_cases() {
  return {
      {"none", [](whole&) {}},
      {"causal bottom_right", [](whole& w) { w.s.causal = causal_mode::bottom_right; }},
      {"causal top_left", [](whole& w) { w.s.causal = causal_mode::top_left; }},
      {"window | sinks", [](whole& w) { w.s.mask = mask_expr::window(9, 2, causal_mode::bottom_right) | mask_expr::sinks(3); }},
      {"document & causal",
       [](whole& w) {
         w.s.causal = causal_mode::top_left;
         const std::int64_t n = std::max(w.prob.seq_q, w.prob.seq_k);
         w.s.mask = mask_expr::document({0, n / 3, n / 3 + 1, n});
       }},
      {"prefix_lm", [](whole& w) { w.s.mask = mask_expr::prefix_lm(17, causal_mode::top_left); }},
      {"block_causal", [](whole& w) { w.s.mask = mask_expr::block_causal(7); }},
      {"dilated", [](whole& w) { w.s.mask = mask_expr::dilated(3); }},
      {"global_tokens | window", [](whole& w) { w.s.mask = mask_expr::global_tokens(2) | mask_expr::window(4, 4, causal_mode::top_left); }},
      {"random_blocks", [](whole& w) { w.s.mask = mask_expr::random_blocks(8, 0.5, 7); }},
      {"user predicate", [](whole& w) {
         w.s.mask = mask_expr::inlined([](auto, auto h, auto q, auto k) { return (q + 2 * k + h) % 3 != 0; }, "mod3");
       }},
      {"alibi causal",
       [](whole& w) {
         w.s.causal = causal_mode::bottom_right;
         w.s.score = scores::alibi(scores::alibi_slopes(w.prob.heads_q), w.prob.seq_q - w.prob.seq_k);
       }},
      {"softcap", [](whole& w) { w.s.score = scores::softcap(2.0); }},
      {"temperature per head + sink logits", [](whole& w) {
         w.s.score = scores::temperature({0.5, 1.0, 2.0, 0.75});
         w.sinks.resize(static_cast<std::size_t>(w.prob.heads_q));
         for (std::size_t h = 0; h < w.sinks.size(); ++h) w.sinks[h] = 0.4f * static_cast<float>(h) - 0.5f;
         w.s.sink_logits = w.sinks.data();
       }},
      {"relative_bias", [](whole& w) {
         std::vector<double> t(static_cast<std::size_t>(8 * w.prob.heads_q));
         for (std::size_t i = 0; i < t.size(); ++i) t[i] = 0.1 * static_cast<double>(i % 7) - 0.3;
         w.s.score = scores::relative_bias(t, 8, 20, true);
       }},
      {"logn then key_bias", [](whole& w) {
         std::vector<double> kb(static_cast<std::size_t>(w.prob.seq_k));
         for (std::size_t i = 0; i < kb.size(); ++i) kb[i] = 0.05 * static_cast<double>(i % 5);
         w.s.score = scores::then(scores::logn(8.0), scores::key_bias(kb));
       }},
      {"dense bias", [](whole& w) {
         w.bias.resize(static_cast<std::size_t>(w.prob.seq_q * w.prob.seq_k));
         for (std::size_t i = 0; i < w.bias.size(); ++i) w.bias[i] = static_cast<float>((i * 37) % 11) * 0.1f - 0.5f;
         w.s.score = scores::bias(w.bias.data(), {1, 1, w.prob.seq_q, w.prob.seq_k});
       }},
      {"user score functor", [](whole& w) {
         w.s.score = scores::inlined([](auto s, auto, auto, auto q, auto k) { return s + 0.01 * static_cast<double>(q - k); });
       }},
      {"rope", [](whole& w) {
         w.rope = rope_spec{};
         w.rope.rotary_dim = w.prob.dim_qk - w.prob.dim_qk % 2;  // partial RoPE on odd head dims
         if (w.rope.rotary_dim > 0) w.s.rope = &w.rope;
         w.s.causal = causal_mode::bottom_right;
       }},
      {"user block mask", [](whole& w) {
         w.blocks.q_tile = 8;
         w.blocks.kv_tile = 16;
         w.blocks.batch = w.blocks.heads = 1;
         w.blocks.q_tiles = (w.prob.seq_q + 7) / 8;
         w.blocks.kv_tiles = (w.prob.seq_k + 15) / 16;
         w.blocks.kinds.resize(static_cast<std::size_t>(w.blocks.q_tiles * w.blocks.kv_tiles));
         for (std::size_t i = 0; i < w.blocks.kinds.size(); ++i)
           w.blocks.kinds[i] = i % 3 == 0 ? tile_kind::empty : i % 3 == 1 ? tile_kind::full : tile_kind::partial;
         w.s.blocks = &w.blocks;
         w.s.mask = mask_expr::dilated(2);
       }},
  };
}

// Cut points of [0, n) into `parts` pieces of awkward sizes (at least one element each when n allows).
std::vector<std::int64_t> cuts(std::int64_t n, std::int64_t parts, std::mt19937_64& rng) {
  std::vector<std::int64_t> c = {0, n};
  for (std::int64_t i = 1; i < parts && i < n; ++i) c.push_back(1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(n - 1)));
  std::sort(c.begin(), c.end());
  c.erase(std::unique(c.begin(), c.end()), c.end());
  return c;
}

struct shape {
  std::int64_t batch, lq, lk, hq, hkv, d;
};
// Lq != Lk both ways, sizes across the 64-row tiles, head dims 1, 7 and 33.
const shape k_shapes[] = {{2, 37, 53, 2, 1, 7}, {1, 130, 70, 2, 2, 33}, {1, 29, 29, 3, 1, 1}};

whole make_whole(const shape& sh, std::uint64_t seed, const spec_case& sc) {
  whole w;
  w.prob = test::small_problem(sh.lq, sh.lk, sh.hq, sh.hkv, sh.d, dtype::f32, causal_mode::none, seed);
  w.prob.batch = sh.batch;
  w.data = std::make_unique<problem_data>(w.prob);
  sc.set(w);
  return w;
}

TEST(ProblemBlock, OracleRowsAreTheWholeProblemsRowsBitwise) {
  std::uint64_t seed = 3;
  for (const shape& sh : k_shapes)
    for (const spec_case& sc : spec_cases()) {
      const whole w = make_whole(sh, seed++, sc);
      SCOPED_TRACE(std::string(sc.name) + " " + w.prob.describe());
      const block_result all = run_block(w, 0, sh.lq, 0, sh.lk, run_as::oracle);
      std::mt19937_64 rng(seed);
      const std::vector<std::int64_t> c = cuts(sh.lq, 3, rng);
      for (std::size_t i = 0; i + 1 < c.size(); ++i) {
        const block_result part = run_block(w, c[i], c[i + 1], 0, sh.lk, run_as::oracle);
        for (std::int64_t b = 0; b < sh.batch; ++b)
          for (std::int64_t r = 0; r < part.rows; ++r)
            for (std::int64_t h = 0; h < sh.hq; ++h) {
              const float* got = &part.out[static_cast<std::size_t>(((b * part.rows + r) * sh.hq + h) * sh.d)];
              const float* want = &all.out[static_cast<std::size_t>(((b * sh.lq + c[i] + r) * sh.hq + h) * sh.d)];
              ASSERT_EQ(std::memcmp(got, want, static_cast<std::size_t>(sh.d) * sizeof(float)), 0)
                  << "out row " << c[i] + r << " head " << h;
              const float gl = part.lse[static_cast<std::size_t>((b * sh.hq + h) * part.rows + r)];
              const float wl = all.lse[static_cast<std::size_t>((b * sh.hq + h) * sh.lq + c[i] + r)];
              ASSERT_TRUE(gl == wl || (std::isnan(gl) && std::isnan(wl))) << "lse row " << c[i] + r << ": " << gl << " vs " << wl;
            }
      }
    }
}

TEST(ProblemBlock, KernelBlocksMatchTheOracleOnEveryTarget) {
  test::for_each_target("ProblemBlock.KernelBlocksMatchTheOracleOnEveryTarget", [&](const char* target) {
    std::uint64_t seed = 40;
    for (const shape& sh : k_shapes)
      for (const spec_case& sc : spec_cases()) {
        const whole w = make_whole(sh, seed++, sc);
        SCOPED_TRACE(std::string(target) + " " + sc.name + " " + w.prob.describe());
        std::mt19937_64 rng(seed);
        const std::vector<std::int64_t> cq = cuts(sh.lq, 2, rng), ck = cuts(sh.lk, 3, rng);
        for (std::size_t i = 0; i + 1 < cq.size(); ++i)
          for (std::size_t j = 0; j + 1 < ck.size(); ++j) {
            SCOPED_TRACE("rows [" + std::to_string(cq[i]) + ", " + std::to_string(cq[i + 1]) + ") keys [" +
                         std::to_string(ck[j]) + ", " + std::to_string(ck[j + 1]) + ")");
            expect_block_near(run_block(w, cq[i], cq[i + 1], ck[j], ck[j + 1], run_as::kernel),
                              run_block(w, cq[i], cq[i + 1], ck[j], ck[j + 1], run_as::oracle),
                              run_block(w, cq[i], cq[i + 1], ck[j], ck[j + 1], run_as::naive));
          }
      }
  });
}

TEST(ProblemBlock, MergedKeyBlocksMatchAllKeys) {
  std::uint64_t seed = 90;
  for (const shape& sh : k_shapes)
    for (const spec_case& sc : spec_cases()) {
      const whole w = make_whole(sh, seed++, sc);
      SCOPED_TRACE(std::string(sc.name) + " " + w.prob.describe());
      std::mt19937_64 rng(seed);
      const std::vector<std::int64_t> cq = cuts(sh.lq, 2, rng), ck = cuts(sh.lk, 4, rng);
      for (std::size_t i = 0; i + 1 < cq.size(); ++i) {
        std::vector<block_result> parts;
        // The sink logits join the first key block only, so the merge counts them once.
        for (std::size_t j = 0; j + 1 < ck.size(); ++j)
          parts.push_back(run_block(w, cq[i], cq[i + 1], ck[j], ck[j + 1], run_as::kernel, j > 0));
        std::vector<tensor> outs;
        std::vector<lse_tensor> lses;
        for (const block_result& r : parts) {
          outs.push_back(r.out_view());
          lses.push_back(r.lse_view());
        }
        block_result merged(sh.batch, cq[i + 1] - cq[i], sh.hq, sh.d);
        const lse_tensor ml = merged.lse_view();
        const status st = merge_attention_states(outs, lses, merged.out_view(), &ml, 1);
        ASSERT_TRUE(st.ok()) << st.error;
        const block_result want = run_block(w, cq[i], cq[i + 1], 0, sh.lk, run_as::kernel);
        std::int64_t hard = 0;
        const double l = std::max(1.0, max_finite(want.lse)), unit = test::k_merge_eps * test::dtype_eps(dtype::f32) * l;
        EXPECT_LE(max_abs_diff(merged.out, want.out, &hard), unit * w.prob.input_range) << "out";
        EXPECT_LE(max_abs_diff(merged.lse, want.lse, &hard), unit) << "lse";
        EXPECT_EQ(hard, 0) << "NaN or unmatched infinities";
      }
    }
}

// Heads [h0, h1) of rows [q0, q1) with every key as one block call (h_offset, heads_q): every per-head parameter,
// table, predicate and sink logit is the whole problem's head's, so both the oracle and the kernel give the whole
// call's bits for those heads (each row and head is computed on its own).
TEST(ProblemBlock, HeadBlocksAreTheWholeProblemsHeadsBitwise) {
  const shape sh{2, 45, 45, 4, 2, 9};
  std::uint64_t seed = 200;
  for (const spec_case& sc : spec_cases()) {
    const whole w = make_whole(sh, seed++, sc);
    SCOPED_TRACE(std::string(sc.name) + " " + w.prob.describe());
    for (run_as how : {run_as::oracle, run_as::kernel}) {
      const block_result all = run_block(w, 0, sh.lq, 0, sh.lk, how);
      for (const auto& [h0, h1, q0, q1] : {std::array<std::int64_t, 4>{0, 2, 0, 45}, {2, 4, 0, 45}, {2, 4, 13, 30}}) {
        const problem_data& d = *w.data;
        block_result r(sh.batch, q1 - q0, h1 - h0, sh.d);
        problem_block blk{q0, 0, sh.lq, sh.lk, h0, sh.hq};
        options o = d.make_options(how == run_as::kernel ? backend::cpu : backend::reference, 1);
        const lse_tensor l = r.lse_view();
        o.lse = &l;
        o.block = &blk;
        const auto heads = [](tensor t, std::int64_t a, std::int64_t b) {
          t.data = static_cast<char*>(t.data) + a * t.stride_head * dtype_size(t.type);
          t.heads = b - a;
          return t;
        };
        const std::int64_t g = sh.hq / sh.hkv;
        const status st = attention(heads(rows_of(d.q_view(), q0, q1), h0, h1), heads(d.k_view(), h0 / g, h1 / g),
                                    heads(d.v_view(), h0 / g, h1 / g), r.out_view(), w.s, o);
        ASSERT_TRUE(st.ok()) << st.error;
        for (std::int64_t b = 0; b < sh.batch; ++b)
          for (std::int64_t i = 0; i < q1 - q0; ++i)
            for (std::int64_t h = h0; h < h1; ++h) {
              const float* got = &r.out[static_cast<std::size_t>(((b * (q1 - q0) + i) * (h1 - h0) + h - h0) * sh.d)];
              const float* want = &all.out[static_cast<std::size_t>(((b * sh.lq + q0 + i) * sh.hq + h) * sh.d)];
              ASSERT_EQ(std::memcmp(got, want, static_cast<std::size_t>(sh.d) * sizeof(float)), 0)
                  << (how == run_as::kernel ? "kernel" : "oracle") << " out row " << q0 + i << " head " << h;
              const float gl = r.lse[static_cast<std::size_t>((b * (h1 - h0) + h - h0) * (q1 - q0) + i)];
              const float wl = all.lse[static_cast<std::size_t>((b * sh.hq + h) * sh.lq + q0 + i)];
              ASSERT_EQ(std::memcmp(&gl, &wl, sizeof(float)), 0) << "lse row " << q0 + i << " head " << h;
            }
      }
    }
  }
}

// Gradients of one block of the whole problem, f32: dq [B, rows, HQ, D], dk / dv [B, keys, HKV, D].
struct block_grads {
  std::vector<float> dq, dk, dv;
};

// The backward of rows [q0, q1) x keys [k0, k1) given the whole problem's out and lse (in `fwd`) and d_out.
block_grads run_block_backward(const whole& w, const problem_data& fwd, const backward_data& bwd, std::int64_t q0,
                               std::int64_t q1, std::int64_t k0, std::int64_t k1, run_as how) {
  const problem& p = w.prob;
  const std::int64_t rows = q1 - q0, keys = k1 - k0;
  block_grads g;
  g.dq.assign(static_cast<std::size_t>(p.batch * rows * p.heads_q * p.dim_qk), k_nan);
  g.dk.assign(static_cast<std::size_t>(p.batch * keys * p.heads_kv * p.dim_qk), k_nan);
  g.dv.assign(static_cast<std::size_t>(p.batch * keys * p.heads_kv * p.dim_v), k_nan);
  gradients gr;
  gr.dq = make_bshd(g.dq.data(), dtype::f32, p.batch, rows, p.heads_q, p.dim_qk);
  gr.dk = make_bshd(g.dk.data(), dtype::f32, p.batch, keys, p.heads_kv, p.dim_qk);
  gr.dv = make_bshd(g.dv.data(), dtype::f32, p.batch, keys, p.heads_kv, p.dim_v);
  lse_tensor l = fwd.lse_view();
  l.data += q0 * l.stride_seq;
  const problem_block blk{q0, k0, p.seq_q, p.seq_k};
  spec s = w.s;
  options o = fwd.make_options(how == run_as::kernel ? backend::cpu : backend::reference, 1);
  o.block = &blk;
  const tensor q = rows_of(fwd.q_view(), q0, q1), k = rows_of(fwd.k_view(), k0, k1), v = rows_of(fwd.v_view(), k0, k1);
  const tensor out = rows_of(fwd.out_view(), q0, q1), d_out = rows_of(bwd.d_out_view(), q0, q1);
  if (how == run_as::naive) {
    attn_bwd_params prm;
    const status st = make_backward_params(q, k, v, out, l, d_out, gr, s, o, prm);
    EXPECT_TRUE(st.ok()) << st.error;
    if (st.ok()) naive_attention_backward_f32(prm);
    return g;
  }
  const status st = attention_backward(q, k, v, out, l, d_out, gr, s, o);
  EXPECT_TRUE(st.ok()) << st.error;
  return g;
}

// The whole problem's gradients from its blocks: dq rows summed over key blocks, dk / dv keys over row blocks (double).
struct summed {
  std::vector<double> dq, dk, dv;
};

// Every row block x key block of the cuts on the oracle and the kernel: each block's kernel gradients against the
// oracle's under the backward tolerance rule (tolerance.h), and the blocks' sums against the whole call's gradients.
TEST(ProblemBlock, BackwardBlocksSumToTheWholeGradients) {
  std::uint64_t seed = 300;
  const shape shapes[] = {{2, 37, 53, 2, 1, 7}, {1, 70, 70, 2, 2, 16}};
  for (const shape& sh : shapes)
    for (const spec_case& sc : spec_cases()) {
      if (std::string(sc.name) == "user score functor") continue;  // no derivative: the backward refuses it (tested elsewhere)
      whole w = make_whole(sh, seed++, sc);
      SCOPED_TRACE(std::string(sc.name) + " " + w.prob.describe());
      // The whole forward on the oracle (f32 out and lse), then the whole backward on the oracle.
      problem_data& fwd = *w.data;
      ASSERT_TRUE(run_problem(fwd, w.s, backend::reference, 1).ok());
      backward_data whole_bwd(w.prob, seed);
      ASSERT_TRUE(run_backward_problem(fwd, whole_bwd, w.s, backend::reference, 1).ok());
      std::mt19937_64 rng(seed);
      const std::vector<std::int64_t> cq = cuts(sh.lq, 2, rng), ck = cuts(sh.lk, 3, rng);
      for (run_as how : {run_as::oracle, run_as::kernel}) {
        summed sum{std::vector<double>(static_cast<std::size_t>(sh.batch * sh.lq * sh.hq * sh.d), 0.0),
                   std::vector<double>(static_cast<std::size_t>(sh.batch * sh.lk * sh.hkv * sh.d), 0.0),
                   std::vector<double>(static_cast<std::size_t>(sh.batch * sh.lk * sh.hkv * sh.d), 0.0)};
        double worst_block = 0;
        for (std::size_t a = 0; a + 1 < cq.size(); ++a)
          for (std::size_t c = 0; c + 1 < ck.size(); ++c) {
            const block_grads got = run_block_backward(w, fwd, whole_bwd, cq[a], cq[a + 1], ck[c], ck[c + 1], how);
            if (how == run_as::kernel) {
              const block_grads ora = run_block_backward(w, fwd, whole_bwd, cq[a], cq[a + 1], ck[c], ck[c + 1], run_as::oracle);
              const block_grads nai = run_block_backward(w, fwd, whole_bwd, cq[a], cq[a + 1], ck[c], ck[c + 1], run_as::naive);
              std::int64_t hard = 0;
              double m = 0;
              for (const auto* x : {&ora.dq, &ora.dk, &ora.dv}) m = std::max(m, max_finite(*x));
              for (int gi = 0; gi < 3; ++gi) {
                const std::vector<float>& kg = gi == 0 ? got.dq : gi == 1 ? got.dk : got.dv;
                const std::vector<float>& og = gi == 0 ? ora.dq : gi == 1 ? ora.dk : ora.dv;
                const std::vector<float>& ng = gi == 0 ? nai.dq : gi == 1 ? nai.dk : nai.dv;
                const double e = max_abs_diff(kg, og, &hard), tol = 2 * max_abs_diff(ng, og, &hard) +
                                                                  test::k_grad_floor_eps * test::dtype_eps(dtype::f32) * m;
                worst_block = std::max(worst_block, e - tol);
                EXPECT_LE(e, tol) << "gradient " << gi << " of rows [" << cq[a] << ", " << cq[a + 1] << ") keys [" << ck[c] << ", " << ck[c + 1] << ")";
              }
              EXPECT_EQ(hard, 0);
            }
            for (std::int64_t b = 0; b < sh.batch; ++b) {
              const std::int64_t rows = cq[a + 1] - cq[a], keys = ck[c + 1] - ck[c];
              for (std::int64_t i = 0; i < rows; ++i)
                for (std::int64_t x = 0; x < sh.hq * sh.d; ++x)
                  sum.dq[static_cast<std::size_t>((b * sh.lq + cq[a] + i) * sh.hq * sh.d + x)] +=
                      got.dq[static_cast<std::size_t>((b * rows + i) * sh.hq * sh.d + x)];
              for (std::int64_t j = 0; j < keys; ++j)
                for (std::int64_t x = 0; x < sh.hkv * sh.d; ++x) {
                  const auto to = static_cast<std::size_t>((b * sh.lk + ck[c] + j) * sh.hkv * sh.d + x);
                  const auto from = static_cast<std::size_t>((b * keys + j) * sh.hkv * sh.d + x);
                  sum.dk[to] += got.dk[from];
                  sum.dv[to] += got.dv[from];
                }
            }
          }
        // The blocks' sums against the whole backward (oracle): each block rounds its sums to f32 once, and the kernel
        // blocks carry the kernel's error (bounded per block above), so a few units of the largest gradient per block.
        double m = 0, worst = 0;
        std::vector<double> want[3];
        for (int gi = 0; gi < 3; ++gi) {
          const tensor t = gi == 0 ? whole_bwd.dq_view() : gi == 1 ? whole_bwd.dk_view() : whole_bwd.dv_view();
          for (std::int64_t b = 0; b < t.batch; ++b)
            for (std::int64_t s2 = 0; s2 < t.seq; ++s2)
              for (std::int64_t h = 0; h < t.heads; ++h)
                for (std::int64_t x = 0; x < t.dim; ++x) {
                  want[gi].push_back(whole_bwd.grad_at(gi, b, s2, h, x));
                  m = std::max(m, std::fabs(want[gi].back()));
                }
        }
        const std::vector<double>* got3[3] = {&sum.dq, &sum.dk, &sum.dv};
        for (int gi = 0; gi < 3; ++gi)
          for (std::size_t x = 0; x < want[gi].size(); ++x) worst = std::max(worst, std::fabs((*got3[gi])[x] - want[gi][x]));
        const double blocks = static_cast<double>((cq.size() - 1) * (ck.size() - 1));
        const double tol = (how == run_as::oracle ? 2.0 : 64.0) * blocks * test::dtype_eps(dtype::f32) * std::max(m, 1.0);
        EXPECT_LE(worst, tol) << (how == run_as::oracle ? "oracle" : "kernel") << " blocks' sums vs the whole gradients";
        EXPECT_LE(worst_block, 0.0);
      }
    }
}

// A block whose keys the mask removes entirely: out 0 and lse -inf, never NaN.
TEST(ProblemBlock, FullyMaskedBlockGivesZeroAndMinusInf) {
  const shape sh{1, 64, 64, 2, 1, 8};
  const whole w = make_whole(sh, 5, {"causal", [](whole& x) { x.s.causal = causal_mode::top_left; }});
  for (run_as how : {run_as::kernel, run_as::oracle}) {
    const block_result r = run_block(w, 0, 16, 32, 64, how);  // rows 0..15 see keys <= 15 only
    for (float x : r.out) EXPECT_EQ(x, 0.0f);
    for (float x : r.lse) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
  }
}

TEST(ProblemBlock, Validation) {
  const problem p = test::small_problem(8, 8, 2, 2, 4, dtype::f32, causal_mode::none, 1);
  const problem grid_p = test::small_problem(12, 12, 2, 2, 4, dtype::f32, causal_mode::none, 1);
  problem_data d(p);
  std::vector<float> snapshot(reinterpret_cast<const float*>(d.out.data()),
                              reinterpret_cast<const float*>(d.out.data()) + d.out.size() / sizeof(float));
  const auto expect_error = [&](const problem_block& blk, const std::string& needle, const options* base = nullptr) {
    options o = base ? *base : d.make_options(backend::cpu, 1);
    o.block = &blk;
    const status st = attention(d.q_view(), d.k_view(), d.v_view(), d.out_view(), {}, o);
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.error.find(needle), std::string::npos) << st.error;
    EXPECT_EQ(std::memcmp(d.out.data(), snapshot.data(), d.out.size()), 0) << "a rejected call wrote out";
  };
  expect_error({-1, 0, 8, 8}, "[attention] options.block.q_offset -1 must be >= 0");
  expect_error({0, -2, 8, 8}, "[attention] options.block.k_offset -2 must be >= 0");
  expect_error({1, 0, 8, 8}, "[attention] options.block.q_offset 1 + q.seq 8 > options.block.seq_q 8");
  expect_error({0, 3, 8, 10}, "[attention] options.block.k_offset 3 + k.seq 8 > options.block.seq_k 10");
  expect_error({0, 0, -1, 8}, "[attention] options.block.seq_q -1 must be >= 0");
  expect_error({0, std::numeric_limits<std::int64_t>::max(), 8, 8}, "options.block.k_offset");
  expect_error({0, 0, 8, 8, -1, 0}, "[attention] options.block.h_offset -1 must be >= 0");
  expect_error({0, 0, 8, 8, 1, 2}, "[attention] options.block.h_offset 1 + q.heads 2 > options.block.heads_q 2");
  // Tables are checked against the whole problem: a key bias of 8 keys does not cover keys up to 20.
  {
    spec s;
    s.score = scores::reweight(std::vector<double>(8, 1.0));
    problem_block blk{0, 12, 8, 20};
    options o = d.make_options(backend::cpu, 1);
    o.block = &blk;
    const status st = attention(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, o);
    EXPECT_NE(st.error.find("fewer than seq_k 20"), std::string::npos) << st.error;
  }
  // The backward takes blocks, but not the sink's gradient (it is not a sum over key blocks).
  {
    backward_data bwd(p, 2);
    problem_block blk{0, 0, 8, 8};
    options o = d.make_options(backend::cpu, 1);
    o.block = &blk;
    const lse_tensor l = d.lse_view();
    spec s;
    std::vector<float> sinks = {0.5f, 0.25f};
    s.sink_logits = sinks.data();
    const status st = attention_backward(d.q_view(), d.k_view(), d.v_view(), d.out_view(), l, bwd.d_out_view(),
                                         bwd.grads(true), s, o);
    EXPECT_NE(st.error.find("[attention_backward] gradients.d_sink_logits with options.block"), std::string::npos) << st.error;
  }
  // A valid block of a larger problem is accepted; the grid kernel says why it does not take it.
  {
    const problem_block blk{4, 4, 12, 12};
    spec s;
    s.mask = mask_expr::neighborhood({3, 4}, {3, 3});
    const problem_data g(grid_p);
    options o = g.make_options(backend::cpu, 1);
    o.block = &blk;
    attn_params prm;
    const status st = make_params(rows_of(g.q_view(), 4, 12), rows_of(g.k_view(), 4, 12), rows_of(g.v_view(), 4, 12),
                                  rows_of(g.out_view(), 4, 12), s, o, prm);
    ASSERT_TRUE(st.ok()) << st.error;
    const selection sel = select(prm, backend::cpu);
    ASSERT_TRUE(sel.ok());
    std::string all;
    for (const std::string& r : sel.reasons) all += r + "\n";
    EXPECT_NE(all.find("options.block"), std::string::npos) << all;
  }
}

}  // namespace
}  // namespace omniattn
