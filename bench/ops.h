// The operations a benchmark row measures, the forward (attention) and the backward (attention_backward), behind one
// interface: the fused call, its sampled fp64 check, the fp64 oracle, the naive f32 path, the unfused OpenBLAS
// baseline and the dense run of the shape. The suite's measuring loop (suite.cc) runs either through it, and the kernel
// table's backward rows (kernel.cc) use it too.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "bench/measure.h"
#include "core/problem.h"

namespace omniattn::bench {

enum class op_kind : std::uint8_t { forward, backward };

const char* op_name(op_kind op);  // "forward", "backward"
bool parse_op(std::string_view text, op_kind& out);

// FLOPs of a row from its (query, key) pairs: the forward's 2 * pairs * (dqk + dv) (= 4 * mask area * D at dv = dqk);
// the backward as FlashAttention counts it, 2.5 x the forward's (five matrix products over the mask area: S, dP, dV,
// dQ, dK, against the forward's two).
constexpr double k_backward_flop_factor = 2.5;
double op_flops(op_kind op, std::int64_t pairs, std::int64_t dim_qk, std::int64_t dim_v);

// max |a.out - b.out| over every element (infinite where either holds a NaN); the same shape, any output dtypes.
double max_out_diff(const problem_data& a, const problem_data& b);

// All (query, key) pairs of a problem over its batches (varlen: sequences) and query heads.
std::int64_t dense_pairs_of(const problem& p);

// The unfused OpenBLAS baseline's result on a shape.
struct blas_result {
  double ms = NAN, workspace_mib = NAN, max_abs_err = NAN, disturbed_pct = NAN;
  std::int64_t heads = 0;  // heads measured (< heads_q: timed on fewer heads, the time scaled)
  std::string cost, note;  // what it computes ("dense", "causal", "dense, mask applied"); why it did not run
};

// How a caller times a call: fn, the threads it runs on (for the disturbance estimate), a hook before each attempt.
using measure_fn = std::function<steady_timing(const std::function<void()>& fn, int threads,
                                               const std::function<void()>& before_attempt)>;

class op_runner {
 public:
  virtual ~op_runner() = default;
  virtual op_kind kind() const = 0;
  // The forward's params of the problem (shape and spec): the FLOPs are counted on them.
  const attn_params& params() const { return p_; }
  std::size_t out_bytes() const { return out_bytes_; }  // the forward output buffer's size
  virtual std::string kernel() const = 0;                // what select() / select_backward() picks on the CPU
  virtual double inputs_mib() const = 0;                 // the call's tensors (inputs and outputs)
  // The fused call on `threads` threads. The forward fills `stats` (tile counts); the backward does not.
  virtual status fused(int threads, run_stats* stats) = 0;
  virtual bool has_tile_stats() const = 0;
  // The last fused call's output on sampled rows against fp64 (check_sampled_rows / check_backward_sampled).
  virtual check_result check() = 0;
  // The whole fp64 oracle on the same inputs; returns max |fused - oracle| over the last fused call's outputs (every
  // gradient for the backward) and the oracle's time in `seconds`. Small problems only (plain fp64 loops).
  virtual double oracle(double& seconds) = 0;
  virtual void naive() = 0;  // the naive f32 path (naive_attention_f32 / naive_attention_backward_f32), one thread
  // The fused call on the same shape without mask and causal flag (issue #4's dense run); overwrites the fused output.
  virtual status dense(int threads) = 0;
  // The unfused OpenBLAS baseline on the problem's shape in f32 (bf16 / f16 problems get an f32 copy), timed by
  // `measure`, checked on sampled rows against fp64. Above max_gflop it runs on fewer heads and the time is scaled.
  virtual blas_result openblas(const measure_fn& measure, int threads, double max_gflop) = 0;
  virtual std::string openblas_key(int threads) const = 0;  // rows of equal keys share one baseline run

 protected:
  attn_params p_;
  std::size_t out_bytes_ = 0;
};

// The runner of an op on a problem (seeded data made here; the backward also runs the forward once for its out and
// lse). nullptr with `error` when the problem or spec is rejected.
std::unique_ptr<op_runner> make_op(op_kind op, const problem& prob, const spec& s, const std::string& mask_text,
                                   std::string& error);

}  // namespace omniattn::bench
