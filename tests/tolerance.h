// THE tolerance policy of the omniattn tests. Every numerical comparison of a kernel against the fp64 oracle goes
// through this file; no test defines its own ad-hoc epsilon for kernel output.
//
// Rule (FlashAttention's: "the error of the fused kernel is at most a small multiple of the error of a straightforward
// implementation in the same precision"), for one problem and one spec:
//
//   oracle = backend::reference (fp64 accumulation) with an f32 output, i.e. the exact result rounded once to f32;
//   naive  = naive_attention_f32 (materialized scores, float softmax, float PV) writing the problem's output dtype;
//   kernel = the backend under test writing the problem's output dtype.
//
//   max|kernel.out - oracle.out| <= 2 * max|naive.out - oracle.out| + k_out_floor_eps * eps(out dtype) * max|oracle.out|
//   max|kernel.lse - oracle.lse| <= 2 * max|naive.lse - oracle.lse| + k_lse_floor_eps * eps(f32) * max(1, max|oracle.lse|)
//
//   eps(f32) = 2^-23, eps(bf16) = 2^-8, eps(f16) = 2^-11 (the per-dtype units of the absolute floor).
//   The output floor absorbs the case where the naive path happens to round every output exactly like the oracle
//   (its error, and thus the 2x term, is then ~0) while the kernel's different summation order legitimately lands on
//   the neighbouring value of the output dtype. The LSE is always f32 (computed from the same, already rounded
//   inputs), so its floor is in f32 units for every dtype.
//
// Closed forms (test_oracle.cc): the oracle accumulates in fp64 and rounds once to the output dtype, so against a
// value computed exactly in the test it may differ by one rounding of that dtype plus fp64 noise:
//   |oracle - want| <= eps(out dtype) * |want| + 2^-40 * magnitude         (magnitude: the largest |v| / |score| involved)
// and its LSE (f32) likewise with eps(f32). Oracle-vs-oracle identities that are exact in real arithmetic (GQA vs
// repeated heads, varlen vs separate runs, layouts, shift invariance, masked keys vs removed keys) use the same bound.
//
// Hard rules, independent of any tolerance:
//   * NaN anywhere (kernel, naive or oracle; out or lse) is a failure.
//   * an LSE of -inf (row with no allowed key) must be matched by exactly -inf, and a finite LSE by a finite one;
//     +inf is never valid.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include "core/problem.h"

namespace omniattn::test {

// Floors, in units of eps(dtype) times the output magnitude (see above).
inline constexpr double k_out_floor_eps = 1.0;
inline constexpr double k_lse_floor_eps = 4.0;
// Backward (attention_backward), per gradient G in dq, dk, dv (and d_sink):
//   max|kernel.G - oracle.G| <= 2 * max|naive.G - oracle.G| + k_grad_floor_eps * eps(G dtype) * M
//   M = the largest |oracle gradient| of the call, over dq, dk, dv (and d_sink)
// oracle = reference_attention_backward (fp64, f32 gradients), naive = naive_attention_backward_f32 (the same loops
// in float) writing the problem's gradient dtype. The floor scales with the call's gradients, not with G alone:
// dS = P (dP - D) cancels (to exactly 0 with a single key, where P = 1 and D = dP), and what is left is the rounding
// of the terms that cancel, while the naive loops may happen to cancel exactly. A gradient sums up to seq_q (dk, dv)
// or seq_k (dq) products in an order that differs between the kernel and the naive loops: 4 units, not 1.
inline constexpr double k_grad_floor_eps = 4.0;
// Linear attention (test_linear.cc), per output (out, and final_state in f32):
//   max|kernel - oracle| <= 2 * max|naive - oracle| + k_linear_floor_eps * eps(dtype) * M
// oracle = reference_linear_attention's quadratic form (fp64, rounded once), naive = its recurrence in float
// (linear_form::recurrent_f32), M = the largest |oracle| of that output. The chunked kernel sums a row's terms in
// another order than the recurrence (intra-chunk products, then the carried state): a few units, as for gradients.
// The oracle's two fp64 forms agree to k_linear_forms_eps * eps(f32) * M once rounded to f32 (closed-form rule).
inline constexpr double k_linear_floor_eps = 8.0;
inline constexpr double k_linear_forms_eps = 2.0;
// Linear-attention gradients (test_linear_backward.cc), per gradient G in dq, dk, dv, dg / d_head_log_decay,
// d_initial_state:
//   max|kernel.G - oracle.G| <= 2 * max|naive.G - oracle.G| + k_linear_grad_floor_eps * eps(f32) * M
// oracle = reference_linear_attention_backward in fp64, naive = the same recurrence in float (recurrent_f32), M = the
// largest |oracle gradient| of the call, over all of them. The kernel sums each gradient in chunks, and its dg by the
// running-sum identity sum (q dq - k dk), whose terms cancel to exactly 0 where the oracle's alpha (D . S) has a zero
// state (the first token without an initial state): what is left is the rounding of terms of the size of the call's
// other gradients, as for attention_backward's dS. A few units more than the forward's rule.
inline constexpr double k_linear_grad_floor_eps = 16.0;
// d_head_log_decay (the fixed decay's gradient) is the sum of every token's dg over the batch and the sequence, which
// the kernel forms from the running-sum identity sum_i (i + 1) (q_i dq_i - k_i dk_i): float terms weighted by up to
// seq that cancel to a much smaller sum. Its floor is the rule's times batch * seq (measured at seq 200: 256 units of
// M on the tiled path, 135 on the row path, where the naive recurrence's direct alpha (D . S) terms give 1). The
// data-dependent dg (scalar, channel) meets the plain rule.
inline double linear_fixed_decay_floor_factor(std::int64_t batch, std::int64_t seq) {
  return static_cast<double>(std::max<std::int64_t>(1, batch * seq));
}
// The projection's gradients (d_projection_weight, d_projection_bias) are sums over every row that shares them
// (batch * seq tokens, times the heads when W is shared), of terms of the size of dq and dk: the kernel sums them
// token by token in float, the naive recurrence per head. Their rule takes M = their own largest |oracle| value and the
// floor times sqrt(rows) (the rounding of a long float sum grows as its square root when the terms' errors are
// independent).
inline double linear_projection_floor_factor(std::int64_t rows) { return std::sqrt(static_cast<double>(std::max<std::int64_t>(1, rows))); }
// merge_attention_states (test_merge.cc): the merge of attention over disjoint key sets against attention over their
// union, every out and LSE f32 from the same kernel, with L = max(1, max|full.lse|) and V = max|v|:
//   max|merged.out - full.out| <= k_merge_eps * eps(f32) * L * V
//   max|merged.lse - full.lse| <= k_merge_eps * eps(f32) * L
// Each side carries the kernel's own rounding (a few units, relative to V); a part's weight exp(lse_i - m) carries the
// error of its LSE (units of eps * L) as a relative error; the merge itself rounds once or twice per part. Measured
// on the test's splits (2 to 5 parts, up to 150 keys): out within 1.5 units, lse within 2; 8 leaves room for other
// ISAs' exp. -inf must match -inf exactly, and NaN is a failure. Parts stored in bf16 or f16 add one rounding of that
// dtype to out: the merge is a convex combination, so eps(part dtype) * V more. The same bound holds for the merge
// against its fp64 formula and for a merge of the same parts in another order.
inline constexpr double k_merge_eps = 8.0;

// Decode on a KV cache (attention_decode), the CPU kernel against reference_attention_decode on the same cache, f32
// outputs:
//   max|kernel.out - oracle.out| <= k_decode_out_eps * eps(f32) * max(1, max|oracle.out|)
//   max|kernel.lse - oracle.lse| <= k_decode_lse_eps * eps(f32) * max(1, max|oracle.lse|)
// There is no naive decode path to scale with: a decode row is one softmax over at most a few thousand cached keys in
// the tests, accumulated in f32 in tiles of 64 and merged over split-K chunks in f32, so its error stays within a
// few tens of units (the cache's 16-bit storage is exact in f32: the inputs are what both read).
inline constexpr double k_decode_out_eps = 64.0;
inline constexpr double k_decode_lse_eps = 16.0;

inline double dtype_eps(dtype t) { return ::omniattn::dtype_epsilon(t); }

inline dtype out_dtype(const problem& p) { return p.out_f32 ? dtype::f32 : p.type; }

// Result of comparing one output (out or lse) of `got` against `ref`.
struct error_stats {
  double max_abs = 0.0;       // max |got - ref| over finite pairs
  double ref_max = 0.0;       // max |ref| over finite ref values (the magnitude the floor scales with)
  std::int64_t nan = 0;       // NaNs in got or ref
  std::int64_t inf_mismatch = 0;  // -inf vs finite, or any +inf
  std::int64_t count = 0;     // elements compared
  std::string worst;          // where max_abs (or the first hard failure) happened
  bool hard_ok() const { return nan == 0 && inf_mismatch == 0; }
};

// Max abs error of the outputs of two runs of the same problem shape (dtypes and out_f32 may differ).
inline error_stats out_error(const problem_data& got, const problem_data& ref) {
  error_stats e;
  const tensor o = got.out_view();
  for (std::int64_t b = 0; b < o.batch; ++b)
    for (std::int64_t s = 0; s < o.seq; ++s)
      for (std::int64_t h = 0; h < o.heads; ++h)
        for (std::int64_t d = 0; d < o.dim; ++d) {
          const double g = got.out_at(b, s, h, d), r = ref.out_at(b, s, h, d);
          ++e.count;
          std::ostringstream at;
          if (std::isnan(g) || std::isnan(r)) {
            if (e.hard_ok()) {
              at << "out[" << b << "," << s << "," << h << "," << d << "]: got " << g << ", ref " << r << " (NaN)";
              e.worst = at.str();
            }
            ++e.nan;
            continue;
          }
          if (std::isinf(g) || std::isinf(r)) {
            if (e.hard_ok()) {
              at << "out[" << b << "," << s << "," << h << "," << d << "]: got " << g << ", ref " << r << " (inf)";
              e.worst = at.str();
            }
            ++e.inf_mismatch;
            continue;
          }
          e.ref_max = std::max(e.ref_max, std::fabs(r));
          const double err = std::fabs(g - r);
          if (err > e.max_abs) {
            e.max_abs = err;
            if (e.hard_ok()) {
              at << "out[" << b << "," << s << "," << h << "," << d << "]: got " << g << ", ref " << r;
              e.worst = at.str();
            }
          }
        }
  return e;
}

// Max abs error of the LSEs ([batch, heads, seq_q] contiguous in problem_data). -inf must match -inf exactly.
inline error_stats lse_error(const problem_data& got, const problem_data& ref) {
  error_stats e;
  const std::size_t n = std::min(got.lse.size(), ref.lse.size());
  if (got.lse.size() != ref.lse.size()) {
    ++e.inf_mismatch;
    e.worst = "lse sizes differ";
  }
  for (std::size_t i = 0; i < n; ++i) {
    const double g = got.lse[i], r = ref.lse[i];
    ++e.count;
    std::ostringstream at;
    at << "lse[" << i << "]: got " << g << ", ref " << r;
    if (std::isnan(g) || std::isnan(r)) {
      if (e.hard_ok()) e.worst = at.str() + " (NaN)";
      ++e.nan;
      continue;
    }
    const bool g_ninf = g == -std::numeric_limits<double>::infinity(), r_ninf = r == -std::numeric_limits<double>::infinity();
    if (g == std::numeric_limits<double>::infinity() || r == std::numeric_limits<double>::infinity() || g_ninf != r_ninf) {
      if (e.hard_ok()) e.worst = at.str() + " (inf mismatch)";
      ++e.inf_mismatch;
      continue;
    }
    if (g_ninf) continue;  // both -inf: exact match
    e.ref_max = std::max(e.ref_max, std::fabs(r));
    const double err = std::fabs(g - r);
    if (err > e.max_abs) {
      e.max_abs = err;
      if (e.hard_ok()) e.worst = at.str();
    }
  }
  return e;
}

// The closed-form bound above, as a gtest predicate: EXPECT_TRUE(oracle_near(got, want, magnitude, dtype::f32)).
inline ::testing::AssertionResult oracle_near(double got, double want, double magnitude, dtype t = dtype::f32) {
  if (std::isnan(got) || std::isnan(want)) return ::testing::AssertionFailure() << "NaN: got " << got << ", want " << want;
  if (std::isinf(want) || std::isinf(got)) {
    if (got == want) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "got " << got << ", want " << want;
  }
  const double tol = dtype_eps(t) * std::fabs(want) + 0x1p-40 * std::fabs(magnitude);
  if (std::fabs(got - want) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << ", want " << want << " (|diff| " << std::fabs(got - want)
                                       << " > tol " << tol << ")";
}

// The two references of a problem: the fp64 oracle (f32 output) and the naive f32 path (problem's output dtype).
struct references {
  problem prob;
  problem_data oracle;
  problem_data naive;
  error_stats naive_out, naive_lse;  // naive vs oracle

  double out_tolerance() const {
    return 2.0 * naive_out.max_abs + k_out_floor_eps * dtype_eps(out_dtype(prob)) * naive_out.ref_max;
  }
  double lse_tolerance() const {
    return 2.0 * naive_lse.max_abs + k_lse_floor_eps * dtype_eps(dtype::f32) * std::max(1.0, naive_lse.ref_max);
  }
};

inline problem oracle_problem(problem p) {
  p.out_f32 = true;  // same seeded inputs (they are drawn before the output is sized), exact result rounded to f32
  p.lse = true;
  return p;
}

// Builds both references. Failures (a status error, NaN in the oracle) are reported through gtest.
inline references make_references(const problem& p, const spec& s) {
  problem pl = p;
  pl.lse = true;
  references r{pl, problem_data(oracle_problem(pl)), problem_data(pl), {}, {}};
  const status so = run_problem(r.oracle, s, backend::reference, 1);
  EXPECT_TRUE(so.ok()) << p.describe() << ": oracle: " << so.error;
  options o = r.naive.make_options(backend::reference, 1);
  const lse_tensor l = r.naive.lse_view();
  o.lse = &l;
  attn_params ap;
  const status sn = make_params(r.naive.q_view(), r.naive.k_view(), r.naive.v_view(), r.naive.out_view(), s, o, ap);
  EXPECT_TRUE(sn.ok()) << p.describe() << ": naive: " << sn.error;
  if (sn.ok()) naive_attention_f32(ap);
  r.naive_out = out_error(r.naive, r.oracle);
  r.naive_lse = lse_error(r.naive, r.oracle);
  EXPECT_TRUE(r.naive_out.hard_ok() && r.naive_lse.hard_ok())
      << p.describe() << ": naive f32 path vs oracle: " << r.naive_out.worst << " / " << r.naive_lse.worst;
  return r;
}

// The policy check: kernel output `got` (same problem as r.prob, LSE requested) against the references.
inline ::testing::AssertionResult within_tolerance(const problem_data& got, const references& r) {
  const error_stats eo = out_error(got, r.oracle), el = lse_error(got, r.oracle);
  const double to = r.out_tolerance(), tl = r.lse_tolerance();
  const bool ok = eo.hard_ok() && el.hard_ok() && eo.max_abs <= to && el.max_abs <= tl;
  std::ostringstream os;
  os << r.prob.describe() << "\n  out: max err " << eo.max_abs << " (tol " << to << " = 2 * naive " << r.naive_out.max_abs
     << " + floor; |ref| max " << eo.ref_max << "; NaN " << eo.nan << ", inf mismatch " << eo.inf_mismatch << "; worst "
     << eo.worst << ")\n  lse: max err " << el.max_abs << " (tol " << tl << " = 2 * naive " << r.naive_lse.max_abs
     << " + floor; NaN " << el.nan << ", inf mismatch " << el.inf_mismatch << "; worst " << el.worst << ")";
  if (ok) return ::testing::AssertionSuccess() << os.str();
  return ::testing::AssertionFailure() << os.str();
}

// Runs a problem on a backend and checks it against the policy. `threads` as in options (0: all cores).
inline ::testing::AssertionResult check_backend(const problem& p, const spec& s, backend b, int threads = 0) {
  const references r = make_references(p, s);
  problem pl = p;
  pl.lse = true;
  problem_data got(pl);
  // Poison the outputs so a row the kernel forgets to write cannot pass by accident.
  std::fill(got.out.begin(), got.out.end(), std::uint8_t{0x7f});
  std::int64_t tq = pl.seq_q;
  if (pl.is_varlen()) {
    tq = 0;
    for (std::int64_t l : pl.seqlens_q) tq += l;
  }
  const std::int64_t rows = (pl.is_varlen() ? 1 : pl.batch) * pl.heads_q * tq;  // the lse entries that exist
  std::fill(got.lse.begin(), got.lse.begin() + rows, std::numeric_limits<float>::quiet_NaN());
  const status st = run_problem(got, s, b, threads);
  if (!st.ok()) return ::testing::AssertionFailure() << p.describe() << ": " << backend_name(b) << ": " << st.error;
  return within_tolerance(got, r);
}

// ---- backward ----

inline error_stats grad_error(const backward_data& got, const backward_data& ref, int which) {
  static const char* const names[3] = {"dq", "dk", "dv"};
  error_stats e;
  const tensor t = which == 0 ? got.dq_view() : which == 1 ? got.dk_view() : got.dv_view();
  for (std::int64_t b = 0; b < t.batch; ++b)
    for (std::int64_t s = 0; s < t.seq; ++s)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.dim; ++d) {
          const double g = got.grad_at(which, b, s, h, d), r = ref.grad_at(which, b, s, h, d);
          ++e.count;
          if (!std::isfinite(g) || !std::isfinite(r)) {
            if (e.hard_ok()) {
              std::ostringstream at;
              at << names[which] << "[" << b << "," << s << "," << h << "," << d << "]: got " << g << ", ref " << r;
              e.worst = at.str();
            }
            ++(std::isnan(g) || std::isnan(r) ? e.nan : e.inf_mismatch);
            continue;
          }
          e.ref_max = std::max(e.ref_max, std::fabs(r));
          if (std::fabs(g - r) > e.max_abs) {
            e.max_abs = std::fabs(g - r);
            std::ostringstream at;
            at << names[which] << "[" << b << "," << s << "," << h << "," << d << "]: got " << g << ", ref " << r;
            e.worst = at.str();
          }
        }
  return e;
}

inline error_stats sink_error(const backward_data& got, const backward_data& ref) {
  error_stats e;
  for (std::size_t h = 0; h < got.d_sink.size(); ++h) {
    const double g = got.d_sink[h], r = ref.d_sink[h];
    ++e.count;
    if (!std::isfinite(g) || !std::isfinite(r)) {
      ++e.nan;
      e.worst = "d_sink[" + std::to_string(h) + "] not finite";
      continue;
    }
    e.ref_max = std::max(e.ref_max, std::fabs(r));
    e.max_abs = std::max(e.max_abs, std::fabs(g - r));
  }
  return e;
}

// The backward policy check: the backward on `b` (on the forward of the same backend, out and lse as it returned
// them) against the oracle's and the naive path's gradients of the same problem and d_out.
inline ::testing::AssertionResult check_backward(const problem& p, const spec& s, backend b, int threads = 0,
                                                 std::uint64_t grad_seed = 7) {
  problem pl = p;
  pl.lse = true;
  const problem po = oracle_problem(pl);
  problem_data ofwd(po), nfwd(pl), kfwd(pl);
  backward_data obwd(po, grad_seed), nbwd(pl, grad_seed), kbwd(pl, grad_seed);
  for (auto* g : {&kbwd.dq, &kbwd.dk, &kbwd.dv}) std::fill(g->begin(), g->end(), std::uint8_t{0x7f});  // poison
  std::ostringstream os;
  os << p.describe();
  const status sf = run_problem(kfwd, s, b, threads);
  if (!sf.ok()) return ::testing::AssertionFailure() << os.str() << ": forward: " << sf.error;
  const status so = run_backward_problem(ofwd, obwd, s, backend::reference, 1);
  if (!so.ok()) return ::testing::AssertionFailure() << os.str() << ": oracle backward: " << so.error;
  const status sn = run_naive_backward(nfwd, nbwd, s);
  if (!sn.ok()) return ::testing::AssertionFailure() << os.str() << ": naive backward: " << sn.error;
  const status sk = run_backward_problem(kfwd, kbwd, s, b, threads);
  if (!sk.ok()) return ::testing::AssertionFailure() << os.str() << ": " << backend_name(b) << " backward: " << sk.error;
  bool ok = true;
  const dtype gt = kbwd.grad_type();
  double magnitude = s.sink_logits ? sink_error(nbwd, obwd).ref_max : 0.0;
  for (int w = 0; w < 3; ++w) magnitude = std::max(magnitude, grad_error(nbwd, obwd, w).ref_max);
  const auto judge = [&](const char* name, const error_stats& ek, const error_stats& en) {
    const double tol = 2.0 * en.max_abs + k_grad_floor_eps * dtype_eps(gt) * magnitude;
    const bool pass = ek.hard_ok() && en.hard_ok() && ek.max_abs <= tol;
    ok &= pass;
    os << "\n  " << name << ": max err " << ek.max_abs << " (tol " << tol << " = 2 * naive " << en.max_abs
       << " + floor; |ref| max " << en.ref_max << ", call max " << magnitude << "; NaN " << ek.nan << ", inf " << ek.inf_mismatch << "; worst "
       << ek.worst << ")" << (pass ? "" : "  FAIL");
  };
  static const char* const names[3] = {"dq", "dk", "dv"};
  for (int w = 0; w < 3; ++w) judge(names[w], grad_error(kbwd, obwd, w), grad_error(nbwd, obwd, w));
  if (s.sink_logits) judge("d_sink", sink_error(kbwd, obwd), sink_error(nbwd, obwd));
  if (ok) return ::testing::AssertionSuccess() << os.str();
  return ::testing::AssertionFailure() << os.str();
}

}  // namespace omniattn::test
