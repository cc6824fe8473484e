// The forward and backward ops of a benchmark row (ops.h): seeded data, the fused call, checks, oracle, naive path,
// OpenBLAS baseline and dense run.
#include "bench/ops.h"

#include <algorithm>
#include <chrono>

#include "bench/bench.h"
#include "core/storage.h"

namespace omniattn::bench {

const char* op_name(op_kind op) { return op == op_kind::backward ? "backward" : "forward"; }

bool parse_op(std::string_view text, op_kind& out) {
  if (text == "forward" || text == "fwd") out = op_kind::forward;
  else if (text == "backward" || text == "bwd") out = op_kind::backward;
  else return false;
  return true;
}

double op_flops(op_kind op, std::int64_t pairs, std::int64_t dim_qk, std::int64_t dim_v) {
  const double forward = 2.0 * static_cast<double>(pairs) * static_cast<double>(dim_qk + dim_v);
  return op == op_kind::backward ? k_backward_flop_factor * forward : forward;
}

std::int64_t dense_pairs_of(const problem& p) {
  if (!p.is_varlen()) return p.batch * p.seq_q * p.seq_k * p.heads_q;
  std::int64_t pairs = 0;
  for (std::size_t s = 0; s < p.seqlens_q.size(); ++s) pairs += p.seqlens_q[s] * p.seqlens_k[s];
  return pairs * p.heads_q;
}

namespace {

constexpr double k_mib = 1 << 20;
constexpr std::uint64_t k_grad_seed = 7;  // d_out's seed (the tests' default)

// The largest score matrix a problem's unfused path materializes (one sequence), in GiB per matrix.
double score_matrix_gib(const problem& prob) {
  std::int64_t lq = prob.seq_q, lk = prob.seq_k;
  if (prob.is_varlen()) {
    lq = *std::max_element(prob.seqlens_q.begin(), prob.seqlens_q.end());
    lk = *std::max_element(prob.seqlens_k.begin(), prob.seqlens_k.end());
  }
  return static_cast<double>(lq) * static_cast<double>(lk) * 4.0 / (1 << 30);
}

// The f32 problem the unfused baseline runs: the shape in f32, on fewer heads (one kv head) when the whole problem
// is over max_gflop (its cost per head does not depend on the head). r.heads says how many.
problem baseline_problem(const problem& prob, double gflop, double max_gflop, blas_result& r) {
  problem bp = prob;
  bp.type = dtype::f32;
  bp.out_f32 = false;
  r.heads = prob.heads_q;
  if (gflop > max_gflop) {
    const double per_head = gflop / static_cast<double>(prob.heads_q);
    r.heads = std::clamp<std::int64_t>(static_cast<std::int64_t>(max_gflop / per_head), 1, prob.heads_q);
    bp.heads_q = r.heads;
    bp.heads_kv = 1;
  }
  return bp;
}

// The key shared by rows whose baseline is the same run: the f32 shape (any seed), the mask where it is applied.
std::string baseline_key(const problem& prob, const std::string& tail) {
  problem key = prob;
  key.seed = 1;
  key.type = dtype::f32;
  key.out_f32 = false;
  key.lse = false;
  return key.describe() + "|" + tail;
}

// Times a baseline call (the peak memory reset before each attempt: its workspace), then checks its own output against
// fp64; the time is scaled from r.heads measured heads to heads_q.
void time_baseline(const measure_fn& measure, int threads, const std::function<void()>& run,
                   const std::function<check_result()>& check, std::int64_t heads_q, blas_result& r) {
  double rss0 = 0;
  const steady_timing st = measure(run, threads, [&] {
    reset_peak_rss();
    rss0 = current_rss_mib();
  });
  r.disturbed_pct = st.disturbed_pct;
  r.workspace_mib = std::max(0.0, peak_rss_mib() - rss0);
  if (const check_result c = check(); c.rows) r.max_abs_err = c.max_abs_err;
  r.ms = st.t.median_s * 1e3 * static_cast<double>(heads_q) / static_cast<double>(r.heads);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

double max_out_diff(const problem_data& a, const problem_data& b) {
  const tensor o = a.out_view();
  const std::size_t n = a.out.size() / static_cast<std::size_t>(dtype_size(o.type));
  const tensor ob = b.out_view();
  double err = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double x = detail::load_element(a.out.data(), o.type, static_cast<std::int64_t>(i));
    const double y = detail::load_element(b.out.data(), ob.type, static_cast<std::int64_t>(i));
    err = std::isnan(x) || std::isnan(y) ? INFINITY : std::max(err, std::fabs(x - y));
  }
  return err;
}

namespace {

double max_grad_diff(const backward_data& a, const backward_data& b) {
  double err = 0.0;
  for (int which = 0; which < 3; ++which) {
    const tensor t = which == 0 ? a.dq_view() : which == 1 ? a.dk_view() : a.dv_view();
    for (std::int64_t bi = 0; bi < t.batch; ++bi)
      for (std::int64_t s = 0; s < t.seq; ++s)
        for (std::int64_t h = 0; h < t.heads; ++h)
          for (std::int64_t d = 0; d < t.dim; ++d) {
            const double x = a.grad_at(which, bi, s, h, d), y = b.grad_at(which, bi, s, h, d);
            err = std::isnan(x) || std::isnan(y) ? INFINITY : std::max(err, std::fabs(x - y));
          }
  }
  return err;
}

// ---------------------------------------------------------------------------------------------------------------------

class forward_op final : public op_runner {
 public:
  forward_op(const problem& prob, const spec& s) : prob_(prob), s_(s), data_(prob) { out_bytes_ = data_.out.size(); }

  status init() {
    return make_params(data_.q_view(), data_.k_view(), data_.v_view(), data_.out_view(), s_, data_.make_options(backend::cpu), p_);
  }

  op_kind kind() const override { return op_kind::forward; }
  std::string kernel() const override { return select(p_, backend::cpu).name; }
  double inputs_mib() const override {
    return static_cast<double>(data_.q.size() + data_.k.size() + data_.v.size() + data_.out.size()) / k_mib;
  }
  status fused(int threads, run_stats* stats) override {
    options o = data_.make_options(backend::cpu, threads);
    o.stats = stats;
    return attention(data_.q_view(), data_.k_view(), data_.v_view(), data_.out_view(), s_, o);
  }
  bool has_tile_stats() const override { return true; }
  check_result check() override { return check_sampled_rows(p_, 64); }
  double oracle(double& seconds) override {
    problem_data ref(prob_);
    const auto t0 = std::chrono::steady_clock::now();
    (void)run_problem(ref, s_, backend::reference, 1);
    seconds = seconds_since(t0);
    return max_out_diff(data_, ref);
  }
  void naive() override {
    naive_out_.resize(data_.out.size());
    attn_params pn = p_;
    pn.out = naive_out_.data();
    naive_attention_f32(pn);
  }
  status dense(int threads) override {
    spec ds;
    ds.scale = prob_.scale;
    return attention(data_.q_view(), data_.k_view(), data_.v_view(), data_.out_view(), ds, data_.make_options(backend::cpu, threads));
  }
  // S = scale Q K^T, softmax, O = P V with the causal flag and no mask: for any other mask the dense cost.
  blas_result openblas(const measure_fn& measure, int threads, double max_gflop) override {
    blas_result r;
    if (const double gib = score_matrix_gib(prob_); gib > 4.0) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "not run: its score matrix needs %.1f GiB", gib);
      r.note = buf;
      return r;
    }
    const double gflop = op_flops(op_kind::forward, dense_pairs_of(prob_), prob_.dim_qk, prob_.dim_v) * 1e-9;
    problem bp = baseline_problem(prob_, gflop, max_gflop, r);
    bp.lse = false;
    problem_data fb(bp);
    spec s;
    s.causal = prob_.causal;
    s.scale = prob_.scale;
    attn_params p;
    const status made = make_params(fb.q_view(), fb.k_view(), fb.v_view(), fb.out_view(), s, fb.make_options(backend::cpu), p);
    if (!made) {
      r.note = "not run: " + made.error;
      return r;
    }
    time_baseline(measure, threads, [&] { openblas_unfused(p, threads); }, [&] { return check_sampled_rows(p, 16); },
                  prob_.heads_q, r);
    r.cost = prob_.causal == causal_mode::none ? "dense" : "causal";
    return r;
  }
  std::string openblas_key(int threads) const override { return baseline_key(prob_, std::to_string(threads)); }

 private:
  problem prob_;
  spec s_;
  problem_data data_;
  std::vector<std::uint8_t> naive_out_;
};

// ---------------------------------------------------------------------------------------------------------------------

problem with_lse(problem p) {
  p.lse = true;  // the backward reads the forward's lse
  return p;
}

class backward_op final : public op_runner {
 public:
  backward_op(const problem& prob, const spec& s, const std::string& mask_text)
      : prob_(with_lse(prob)), s_(s), mask_text_(mask_text), data_(prob_), grads_(prob_, k_grad_seed) {
    out_bytes_ = data_.out.size();
  }

  status init() {
    // The forward's out and lse, which every backward call reads: the fused kernel's, once.
    if (const status st = run_problem(data_, s_, backend::cpu, 0); !st) return st;
    if (const status st = params_for(grads_, bp_); !st) return st;
    p_ = bp_.fwd;
    return {};
  }

  op_kind kind() const override { return op_kind::backward; }
  std::string kernel() const override { return select_backward(bp_, backend::cpu).name; }
  double inputs_mib() const override {
    return static_cast<double>(data_.q.size() + data_.k.size() + data_.v.size() + data_.out.size() + data_.lse.size() * 4 +
                               grads_.d_out.size() + grads_.dq.size() + grads_.dk.size() + grads_.dv.size()) /
           k_mib;
  }
  status fused(int threads, run_stats*) override {
    return attention_backward(data_.q_view(), data_.k_view(), data_.v_view(), data_.out_view(), data_.lse_view(),
                              grads_.d_out_view(), grads_.grads(false), s_, data_.make_options(backend::cpu, threads));
  }
  bool has_tile_stats() const override { return false; }
  check_result check() override { return check_backward_sampled(bp_, 64); }
  double oracle(double& seconds) override {
    // The oracle's gradients in f32 (out_f32: the same seeded inputs and d_out values), from its own fp64 forward.
    problem po = prob_;
    po.out_f32 = true;
    const problem_data ofwd(po);
    backward_data obwd(po, k_grad_seed);
    const auto t0 = std::chrono::steady_clock::now();
    (void)run_backward_problem(ofwd, obwd, s_, backend::reference, 1);
    seconds = seconds_since(t0);
    return max_grad_diff(grads_, obwd);
  }
  void naive() override {
    if (!naive_) {
      naive_ = std::make_unique<backward_data>(prob_, k_grad_seed);
      (void)params_for(*naive_, naive_params_);
    }
    naive_attention_backward_f32(naive_params_);
  }
  status dense(int threads) override {
    spec ds;
    ds.scale = prob_.scale;
    if (!dense_fwd_) {  // the dense forward's own out and lse, so the dense backward reads consistent ones
      dense_fwd_ = std::make_unique<problem_data>(prob_);
      if (const status st = run_problem(*dense_fwd_, ds, backend::cpu, 0); !st) return st;
    }
    const problem_data& f = *dense_fwd_;
    return attention_backward(f.q_view(), f.k_view(), f.v_view(), f.out_view(), f.lse_view(), grads_.d_out_view(),
                              grads_.grads(false), ds, f.make_options(backend::cpu, threads));
  }
  // The materialized backward (openblas_unfused_backward), with the spec's causal flag and mask applied on the dense
  // matrices: always the dense cost.
  blas_result openblas(const measure_fn& measure, int threads, double max_gflop) override {
    blas_result r;
    if (const double gib = 2.0 * score_matrix_gib(prob_); gib > 4.0) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "not run: its P and dS matrices need %.1f GiB", gib);
      r.note = buf;
      return r;
    }
    const double gflop = op_flops(op_kind::backward, dense_pairs_of(prob_), prob_.dim_qk, prob_.dim_v) * 1e-9;
    const problem bp = baseline_problem(prob_, gflop, max_gflop, r);
    problem_data fb(bp);
    if (const status st = run_problem(fb, s_, backend::cpu, 0); !st) {  // O, which D = rowsum(dO * O) reads
      r.note = "not run: " + st.error;
      return r;
    }
    backward_data gb(bp, k_grad_seed);
    attn_bwd_params p;
    const status made = make_backward_params(fb.q_view(), fb.k_view(), fb.v_view(), fb.out_view(), fb.lse_view(), gb.d_out_view(),
                                             gb.grads(false), s_, fb.make_options(backend::cpu), p);
    if (!made) {
      r.note = "not run: " + made.error;
      return r;
    }
    time_baseline(measure, threads, [&] { openblas_unfused_backward(p, threads); },
                  [&] { return check_backward_sampled(p, 16); }, prob_.heads_q, r);
    r.cost = mask_text_.empty() && prob_.causal == causal_mode::none ? "dense" : "dense, mask applied";
    return r;
  }
  std::string openblas_key(int threads) const override {
    return baseline_key(prob_, "backward|" + mask_text_ + "|" + std::to_string(threads));
  }

 private:
  status params_for(const backward_data& g, attn_bwd_params& out) const {
    return make_backward_params(data_.q_view(), data_.k_view(), data_.v_view(), data_.out_view(), data_.lse_view(), g.d_out_view(),
                                g.grads(false), s_, data_.make_options(backend::cpu), out);
  }

  problem prob_;
  spec s_;
  std::string mask_text_;
  problem_data data_;
  backward_data grads_;
  attn_bwd_params bp_;
  std::unique_ptr<backward_data> naive_;
  attn_bwd_params naive_params_;
  std::unique_ptr<problem_data> dense_fwd_;
};

template <class Op>
std::unique_ptr<op_runner> made(std::unique_ptr<Op> op, std::string& error) {
  if (const status st = op->init(); !st) {
    error = st.error;
    return nullptr;
  }
  return op;
}

}  // namespace

std::unique_ptr<op_runner> make_op(op_kind op, const problem& prob, const spec& s, const std::string& mask_text,
                                   std::string& error) {
  if (op == op_kind::backward) return made(std::make_unique<backward_op>(prob, s, mask_text), error);
  return made(std::make_unique<forward_op>(prob, s), error);
}

}  // namespace omniattn::bench
