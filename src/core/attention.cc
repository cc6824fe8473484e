// The public entry point: validate once, select once, run; whatever goes wrong comes back as a status.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "core/backends.h"
#include "core/grid_tiles.h"
#include "core/parallel.h"
#include "core/score_kinds.h"
#include "omniattn/attention.h"
#include "omniattn/kv_cache.h"

namespace omniattn {

namespace detail {
int resolve_threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

namespace {
std::int64_t default_retention() {
  constexpr std::int64_t mib = std::int64_t{1} << 20;
  if (const char* env = std::getenv("OMNIATTN_SCRATCH_RETAIN_MB")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && v >= 0 && v <= (std::int64_t{1} << 20)) return static_cast<std::int64_t>(v) * mib;
  }
  return 32 * mib;
}
std::atomic<std::int64_t>& retention() {
  static std::atomic<std::int64_t> bytes{default_retention()};
  return bytes;
}
}  // namespace

std::int64_t scratch_retention() { return retention().load(std::memory_order_relaxed); }
int max_threads() { return std::max(8, 4 * omp_get_num_procs()); }
}  // namespace detail

std::int64_t set_scratch_retention(std::int64_t bytes) {
  return detail::retention().exchange(bytes < 0 ? 0 : bytes, std::memory_order_relaxed);
}

selection select(const attn_params& p, backend b) {
  if (b == backend::reference) return {reference_attention, "reference", {"reference: fp64 oracle, supports every spec"}};
  selection fast = cpu::select(p);
  if (b == backend::cpu || fast.ok()) return fast;
  // automatic: the oracle is the fallback for problems no fast kernel covers, and says so.
  selection ref{reference_attention, "reference", fast.reasons};
  ref.reasons.push_back("reference: chosen as fallback, no fast kernel fits (slow: fp64 plain loops)");
  return ref;
}

namespace {

// A call whose spec runs user code (a mask predicate, a score functor) may fail half-way; it writes into staging
// buffers that are copied to out / lse only when the kernel returns, so a failing call leaves both untouched. The copy
// is O(output), small against the O(Lq Lk D) kernel.
class output_stage {
 public:
  explicit output_stage(attn_params& p) : p_(p), user_out_(p.out), user_lse_(p.lse) {
    std::memcpy(o_stride_, p.o_stride, sizeof o_stride_);
    std::memcpy(lse_stride_, p.lse_stride, sizeof lse_stride_);
    const std::int64_t tb = tensor_batches(p);
    out_.resize(static_cast<std::size_t>(tb * p.seq_rows_q * p.heads_q * p.dim_v) * static_cast<std::size_t>(dtype_size(p.out_type)));
    p.out = out_.data();
    const std::int64_t st[4] = {p.seq_rows_q * p.heads_q * p.dim_v, p.heads_q * p.dim_v, p.dim_v, 1};
    std::memcpy(p.o_stride, st, sizeof st);
    if (p.lse) {
      lse_.resize(static_cast<std::size_t>(tb * p.heads_q * p.seq_rows_q));
      p.lse = lse_.data();
      const std::int64_t ls[3] = {p.heads_q * p.seq_rows_q, p.seq_rows_q, 1};
      std::memcpy(p.lse_stride, ls, sizeof ls);
    }
  }

  // Copies the staged rows the kernel wrote (every row of every sequence) to the caller's tensors.
  void commit() const {
    const auto es = static_cast<std::size_t>(dtype_size(p_.out_type));
    for (std::int64_t b = 0; b < p_.batch; ++b) {
      const seq_extent e = sequence(p_, b);
      for (std::int64_t i = e.q_begin; i < e.q_begin + e.q_len; ++i)
        for (std::int64_t h = 0; h < p_.heads_q; ++h) {
          const std::int64_t src = e.tensor_batch * p_.o_stride[0] + i * p_.o_stride[1] + h * p_.o_stride[2];
          const std::int64_t dst = e.tensor_batch * o_stride_[0] + i * o_stride_[1] + h * o_stride_[2];
          for (std::int64_t d = 0; d < p_.dim_v; ++d)
            std::memcpy(static_cast<char*>(user_out_) + (dst + d * o_stride_[3]) * static_cast<std::int64_t>(es),
                        out_.data() + static_cast<std::size_t>(src + d) * es, es);
          if (user_lse_)
            user_lse_[e.tensor_batch * lse_stride_[0] + h * lse_stride_[1] + i * lse_stride_[2]] =
                lse_[static_cast<std::size_t>(e.tensor_batch * p_.lse_stride[0] + h * p_.lse_stride[1] + i)];
        }
    }
  }

  static bool needed(const attn_params& p) {
    return (p.mask && p.mask->has_user_code()) || (p.score && detail::score_has_user_code(*p.score));
  }

 private:
  static std::int64_t tensor_batches(const attn_params& p) { return p.cu_seqlens_q ? 1 : p.batch; }

  const attn_params& p_;
  void* user_out_;
  float* user_lse_;
  std::int64_t o_stride_[4], lse_stride_[3];
  std::vector<unsigned char> out_;
  std::vector<float> lse_;
};

std::string shape_of(const tensor& t) {
  return std::string(dtype_name(t.type)) + "[" + std::to_string(t.batch) + ", " + std::to_string(t.seq) + ", " +
         std::to_string(t.heads) + ", " + std::to_string(t.dim) + "]";
}

// The backward's gradient outputs staged the same way when user code runs (dq, dk, dv, d_sink, d_bias).
class gradient_stage {
 public:
  explicit gradient_stage(attn_bwd_params& p) {
    const std::int64_t tb = p.fwd.cu_seqlens_q ? 1 : p.fwd.batch;
    stage(p.dq, p.dq_type, p.dq_stride, tb, p.fwd.seq_rows_q, p.fwd.heads_q, p.fwd.dim_qk, 0);
    stage(p.dk, p.dk_type, p.dk_stride, tb, p.fwd.seq_rows_k, p.fwd.heads_kv, p.fwd.dim_qk, 1);
    stage(p.dv, p.dv_type, p.dv_stride, tb, p.fwd.seq_rows_k, p.fwd.heads_kv, p.fwd.dim_v, 2);
    if (p.d_sink) {
      user_sink_ = p.d_sink;
      sink_.resize(static_cast<std::size_t>(p.fwd.heads_q));
      p.d_sink = sink_.data();
    }
    if (p.d_bias) {
      std::vector<detail::score_step> steps;
      detail::lower_score(*p.fwd.score, steps);
      bias_.resize(static_cast<std::size_t>(steps[static_cast<std::size_t>(detail::dense_bias_step(steps))].bias->elements()));
      user_bias_ = p.d_bias;
      p.d_bias = bias_.data();
    }
  }

  void commit() const {
    for (const staged& s : staged_) {
      const auto es = static_cast<std::int64_t>(dtype_size(s.type));
      std::int64_t src = 0;
      for (std::int64_t b = 0; b < s.sizes[0]; ++b)
        for (std::int64_t i = 0; i < s.sizes[1]; ++i)
          for (std::int64_t h = 0; h < s.sizes[2]; ++h)
            for (std::int64_t d = 0; d < s.sizes[3]; ++d, ++src) {
              const std::int64_t dst = b * s.strides[0] + i * s.strides[1] + h * s.strides[2] + d * s.strides[3];
              std::memcpy(static_cast<char*>(s.user) + dst * es, s.data.data() + src * es, static_cast<std::size_t>(es));
            }
    }
    if (user_sink_) std::copy(sink_.begin(), sink_.end(), user_sink_);
    if (user_bias_) std::copy(bias_.begin(), bias_.end(), user_bias_);
  }

 private:
  struct staged {
    void* user;
    dtype type;
    std::int64_t strides[4], sizes[4];
    std::vector<unsigned char> data;
  };
  void stage(void*& data, dtype type, std::int64_t* strides, std::int64_t tb, std::int64_t rows, std::int64_t heads,
             std::int64_t dim, int slot) {
    staged& s = staged_[slot];
    s.user = data;
    s.type = type;
    std::memcpy(s.strides, strides, sizeof s.strides);
    const std::int64_t sizes[4] = {tb, rows, heads, dim};
    std::memcpy(s.sizes, sizes, sizeof s.sizes);
    s.data.resize(static_cast<std::size_t>(tb * rows * heads * dim * dtype_size(type)));
    data = s.data.data();
    const std::int64_t st[4] = {rows * heads * dim, heads * dim, dim, 1};
    std::memcpy(strides, st, sizeof st);
  }

  staged staged_[3];
  float* user_sink_ = nullptr;
  float* user_bias_ = nullptr;
  std::vector<float> sink_, bias_;
};

// Runs the selected kernel, staging the outputs when user code runs (it may throw half-way), or says why no kernel
// may run: none fits, or only the oracle does and options.allow_fallback is false.
template <class Stage, class Selection, class Params>
status run_selected(const char* call, const options& opt, const Selection& sel, bool is_fallback, Params& p, bool stage) {
  const bool refused_fallback = opt.use == backend::automatic && !opt.allow_fallback && is_fallback;
  if (!sel.ok() || refused_fallback) {
    std::string msg = std::string("[") + call + "] no ";
    msg += refused_fallback ? "fast" : backend_name(opt.use);
    msg += refused_fallback ? " kernel fits and options.allow_fallback is false:" : " kernel fits:";
    for (const std::string& r : sel.reasons) msg += "\n  " + r;
    return {msg};
  }
  if (stage) {
    const Stage st(p);
    sel.run(p);
    st.commit();
  } else {
    sel.run(p);
  }
  return {};
}

status run(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, const options& opt) {
  attn_params p;
  if (status st = make_params(q, k, v, out, s, opt, p); !st) return st;
  const detail::call_plan_scope plans;  // select() and the kernel share one grid plan
  const selection sel = select(p, opt.use);
  return run_selected<output_stage>("attention", opt, sel, sel.run == &reference_attention, p, output_stage::needed(p));
}

status run_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const lse_tensor& lse,
                    const tensor& d_out, const gradients& g, const spec& s, const options& opt) {
  attn_bwd_params p;
  if (status st = make_backward_params(q, k, v, out, lse, d_out, g, s, opt, p); !st) return st;
  const backward_selection sel = select_backward(p, opt.use);
  return run_selected<gradient_stage>("attention_backward", opt, sel, sel.run == &reference_attention_backward, p,
                                      output_stage::needed(p.fwd));
}

// Decoding stages out and lse as the forward does (key_mass is staged by the kernels themselves).
struct decode_stage {
  explicit decode_stage(attn_decode_params& p) : out(p.fwd) {}
  void commit() const { out.commit(); }
  output_stage out;
};

status run_decode(const tensor& q, const kv_cache& cache, std::span<const std::int64_t> seqs, const tensor& out,
                  const spec& s, const decode_options& dopt) {
  attn_decode_params p;
  if (status st = make_decode_params(q, cache, seqs, out, s, dopt, p); !st) return st;
  const decode_selection sel = select_decode(p, dopt.use);
  options opt;
  opt.use = dopt.use;
  opt.allow_fallback = dopt.allow_fallback;
  return run_selected<decode_stage>("attention_decode", opt, sel, sel.run == &reference_attention_decode, p,
                                    output_stage::needed(p.fwd));
}

// Every failure as a status naming the call (see attention()).
template <class Run>
status guarded(const char* call, const tensor& q, const tensor& k, const tensor& v, Run&& run) {
  const std::string tag = std::string("[") + call + "] ";
  try {
    return run();
  } catch (const detail::callback_error& e) {
    return {tag + e.what() + " (output untouched)"};
  } catch (const std::bad_alloc&) {
    return {tag + "out of memory: the working buffers for q " + shape_of(q) + ", k " + shape_of(k) + ", v " + shape_of(v) +
            " could not be allocated"};
  } catch (const std::exception& e) {
    return {tag + "failed: " + e.what()};
  } catch (...) {
    return {tag + "failed with an exception that is not a std::exception"};
  }
}

}  // namespace

backward_selection select_backward(const attn_bwd_params& p, backend b) {
  backward_selection ref{reference_attention_backward, "reference", {"reference: fp64 oracle, supports every spec"}};
  if (b == backend::reference) return ref;
  backward_selection fast = cpu::select_backward(p);
  if (b == backend::cpu || fast.ok()) return fast;
  ref.reasons = fast.reasons;
  ref.reasons.push_back("reference: chosen as fallback, no fast kernel fits (slow: fp64 plain loops)");
  return ref;
}

status attention_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const lse_tensor& lse,
                          const tensor& d_out, const gradients& g, const spec& s, const options& opt) {
  return guarded("attention_backward", q, k, v, [&] { return run_backward(q, k, v, out, lse, d_out, g, s, opt); });
}

decode_selection select_decode(const attn_decode_params& p, backend b) {
  decode_selection ref{reference_attention_decode, "reference", {"reference: fp64 oracle on the cache view"}};
  if (b == backend::reference) return ref;
  decode_selection fast = cpu::select_decode(p);
  if (b == backend::cpu || fast.ok()) return fast;
  ref.reasons = fast.reasons;
  ref.reasons.push_back("reference: chosen as fallback, no fast kernel fits (slow: fp64 plain loops)");
  return ref;
}

status attention_decode(const tensor& q, const kv_cache& cache, std::span<const std::int64_t> seqs, const tensor& out,
                        const spec& s, const decode_options& opt) {
  return guarded("attention_decode", q, q, q, [&] { return run_decode(q, cache, seqs, out, s, opt); });
}

status attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, const options& opt) {
  // Nothing may escape: a throwing user callback, a failed allocation or a size the machine cannot serve all become
  // a status naming what happened.
  return guarded("attention", q, k, v, [&] { return run(q, k, v, out, s, opt); });
}

}  // namespace omniattn
