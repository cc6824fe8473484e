// linear_attention(): validation of the call (one set of rules for the kernel and the oracle) and the entry points.
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "core/backends.h"
#include "core/linear_params.h"
#include "core/storage.h"
#include "omniattn/linear.h"

namespace omniattn {

const char* feature_map_name(feature_map f) {
  switch (f) {
    case feature_map::identity: return "identity";
    case feature_map::elu_plus_one: return "elu_plus_one";
    case feature_map::relu: return "relu";
    case feature_map::softmax: return "softmax";
  }
  return "?";
}

bool parse_feature_map(const std::string& name, feature_map& f) {
  for (feature_map x : {feature_map::identity, feature_map::elu_plus_one, feature_map::relu, feature_map::softmax})
    if (name == feature_map_name(x)) {
      f = x;
      return true;
    }
  return false;
}

const char* linear_decay_name(linear_decay d) {
  switch (d) {
    case linear_decay::none: return "none";
    case linear_decay::fixed: return "fixed";
    case linear_decay::scalar: return "scalar";
    case linear_decay::channel: return "channel";
  }
  return "?";
}

state_tensor make_state(float* data, std::int64_t batch, std::int64_t heads, std::int64_t dim_k, std::int64_t dim_v) {
  return {data, batch, heads, dim_k, dim_v, heads * dim_k * dim_v, dim_k * dim_v, dim_v, 1};
}

namespace detail {
namespace {

void strides_of(const tensor& t, std::int64_t* s) {
  s[0] = t.stride_batch;
  s[1] = t.stride_seq;
  s[2] = t.stride_head;
  s[3] = t.stride_dim;
}

// The byte range [lo, hi) a view touches (empty views touch nothing).
struct extent {
  std::intptr_t lo = 0, hi = 0;
};
extent extent_of(const void* data, int elem, const std::int64_t* dims, const std::int64_t* strides, int rank) {
  std::int64_t lo = 0, hi = 0;
  for (int d = 0; d < rank; ++d) {
    if (dims[d] == 0) return {};
    const std::int64_t span = (dims[d] - 1) * strides[d];
    (span < 0 ? lo : hi) += span;
  }
  const auto base = reinterpret_cast<std::intptr_t>(data);
  return {base + static_cast<std::intptr_t>(lo) * elem, base + (static_cast<std::intptr_t>(hi) + 1) * elem};
}
extent extent_of(const tensor& t) {
  const std::int64_t dims[4] = {t.batch, t.seq, t.heads, t.dim}, st[4] = {t.stride_batch, t.stride_seq, t.stride_head, t.stride_dim};
  return extent_of(t.data, dtype_size(t.type), dims, st, 4);
}
extent extent_of(const state_tensor& t) {
  const std::int64_t dims[4] = {t.batch, t.heads, t.dim_k, t.dim_v}, st[4] = {t.stride_batch, t.stride_head, t.stride_k, t.stride_v};
  return extent_of(t.data, 4, dims, st, 4);
}
bool overlaps(extent a, extent b) { return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi; }

}  // namespace

status make_linear_params(const char* entry, const tensor& q, const tensor& k, const tensor& v, const tensor& out,
                          const linear_spec& s, const linear_options& o, linear_params& p) {
  std::ostringstream err;
  const auto fail = [&](auto&&... parts) {
    err << "[" << entry << "] ";
    (err << ... << parts);
    return status{err.str()};
  };
  const struct {
    const char* name;
    const tensor& t;
  } ops[] = {{"q", q}, {"k", k}, {"v", v}, {"out", out}};
  for (const auto& x : ops) {
    if (x.t.batch < 0 || x.t.seq < 0 || x.t.heads < 0 || x.t.dim < 0) return fail(x.name, " has a negative size");
    if (x.t.data == nullptr && x.t.batch * x.t.seq * x.t.heads * x.t.dim > 0) return fail(x.name, ".data is null");
  }
  if (q.type == dtype::f64) return fail("q.type f64: the linear kernels take f32, bf16 or f16");
  if (k.type != q.type) return fail("k.type ", dtype_name(k.type), " != q.type ", dtype_name(q.type));
  if (v.type != q.type) return fail("v.type ", dtype_name(v.type), " != q.type ", dtype_name(q.type));
  if (out.type != q.type && out.type != dtype::f32) return fail("out.type ", dtype_name(out.type), " must be q.type ", dtype_name(q.type), " or f32");
  if (q.dim == 0) return fail("q.dim must be >= 1");
  if (v.dim == 0) return fail("v.dim must be >= 1");
  const struct {
    const char* what;
    std::int64_t got, want;
  } same[] = {{"k.batch", k.batch, q.batch}, {"v.batch", v.batch, q.batch}, {"out.batch", out.batch, q.batch},
              {"k.seq", k.seq, q.seq},       {"v.seq", v.seq, q.seq},       {"out.seq", out.seq, q.seq},
              {"k.heads", k.heads, q.heads}, {"v.heads", v.heads, q.heads}, {"out.heads", out.heads, q.heads},
              {"k.dim", k.dim, q.dim},       {"out.dim", out.dim, v.dim}};
  for (const auto& x : same)
    if (x.got != x.want) {
      const std::string what = x.what;
      return fail(what, " ", x.got, " != ", what == "out.dim" ? "v.dim" : "q." + what.substr(what.find('.') + 1), " ", x.want);
    }
  for (const auto& x : ops)
    if (x.name != std::string("out") && overlaps(extent_of(out), extent_of(x.t))) return fail("out aliases ", x.name, ": the output must not overlap an input");
  if (!std::isfinite(s.scale)) return fail("spec.scale ", s.scale, " must be finite (< 0: 1 / sqrt(K))");
  if (s.phi != feature_map::identity && s.phi != feature_map::elu_plus_one && s.phi != feature_map::relu && s.phi != feature_map::softmax)
    return fail("spec.phi ", static_cast<int>(s.phi), " is not a feature map");
  if (o.chunk < 1 || o.chunk > 1024) return fail("options.chunk ", o.chunk, " must be in 1..1024");
  if (o.threads < 0) return fail("options.threads ", o.threads, " must be >= 0 (0 = all cores)");
  p = {};
  switch (s.decay) {
    case linear_decay::none: break;
    case linear_decay::fixed:
      if (static_cast<std::int64_t>(s.head_log_decay.size()) != q.heads)
        return fail("spec.head_log_decay has ", s.head_log_decay.size(), " values, expected one per head (", q.heads, ")");
      for (std::int64_t h = 0; h < q.heads; ++h)
        if (!(std::isfinite(s.head_log_decay[h]) && s.head_log_decay[h] <= 0.0f))
          return fail("spec.head_log_decay[", h, "] ", s.head_log_decay[h], " must be finite and <= 0 (log of a decay in (0, 1])");
      break;
    case linear_decay::scalar:
    case linear_decay::channel: {
      const tensor& g = s.g;
      const std::int64_t want = s.decay == linear_decay::scalar ? 1 : q.dim;
      if (g.data == nullptr && q.batch * q.seq * q.heads > 0) return fail("spec.g.data is null (decay ", linear_decay_name(s.decay), ")");
      if (g.type == dtype::f64) return fail("spec.g.type f64: f32, bf16 or f16");
      if (g.batch != q.batch || g.seq != q.seq || g.heads != q.heads || g.dim != want)
        return fail("spec.g is [", g.batch, ", ", g.seq, ", ", g.heads, ", ", g.dim, "], expected [", q.batch, ", ", q.seq, ", ",
                    q.heads, ", ", want, "] (decay ", linear_decay_name(s.decay), ")");
      if (overlaps(extent_of(out), extent_of(g))) return fail("out aliases spec.g: the output must not overlap an input");
      for (std::int64_t b = 0; b < g.batch; ++b)
        for (std::int64_t t = 0; t < g.seq; ++t)
          for (std::int64_t h = 0; h < g.heads; ++h)
            for (std::int64_t c = 0; c < g.dim; ++c) {
              const double x = load_element(g.data, g.type, b * g.stride_batch + t * g.stride_seq + h * g.stride_head + c * g.stride_dim);
              if (!(std::isfinite(x) && x <= 0.0))
                return fail("spec.g[", b, ", ", t, ", ", h, ", ", c, "] ", x, " must be finite and <= 0 (log of a decay in (0, 1])");
            }
      p.g = g.data;
      p.g_type = g.type;
      strides_of(g, p.g_stride);
      break;
    }
    default: return fail("spec.decay ", static_cast<int>(s.decay), " is not a decay kind");
  }
  if (s.normalize && o.initial_state)
    return fail("spec.normalize with options.initial_state: the key-sum state z is not carried between calls yet");
  if (s.prefix < 0 || s.prefix > q.seq) return fail("spec.prefix ", s.prefix, " must be in 0..q.seq ", q.seq);
  if (s.prefix > 0 && !s.causal) return fail("spec.prefix ", s.prefix, " with causal = false: the whole sequence is the prefix already");
  if (s.prefix > 0 && s.decay != linear_decay::none)
    return fail("spec.prefix with decay ", linear_decay_name(s.decay), ": the prefix form with a decay is not supported yet");
  if (!s.causal && s.decay != linear_decay::none)
    return fail("spec.decay ", linear_decay_name(s.decay), " with causal = false: the bidirectional decayed form is not supported yet");
  const struct {
    const char* name;
    const state_tensor* st;
  } states[] = {{"options.initial_state", o.initial_state}, {"options.final_state", o.final_state}};
  for (const auto& x : states) {
    if (!x.st) continue;
    if (x.st->batch != q.batch || x.st->heads != q.heads || x.st->dim_k != q.dim || x.st->dim_v != v.dim)
      return fail(x.name, " is [", x.st->batch, ", ", x.st->heads, ", ", x.st->dim_k, ", ", x.st->dim_v, "], expected [", q.batch, ", ",
                  q.heads, ", ", q.dim, ", ", v.dim, "]");
    if (x.st->data == nullptr && q.batch * q.heads > 0) return fail(x.name, ".data is null");
    if (overlaps(extent_of(out), extent_of(*x.st))) return fail(x.name, " overlaps out");
  }
  if (o.final_state) {
    for (const auto& x : ops)
      if (x.name != std::string("out") && overlaps(extent_of(*o.final_state), extent_of(x.t)))
        return fail("options.final_state aliases ", x.name, ": it must not overlap an input");
    if (s.decay == linear_decay::scalar || s.decay == linear_decay::channel)
      if (overlaps(extent_of(*o.final_state), extent_of(s.g))) return fail("options.final_state aliases spec.g: it must not overlap an input");
    // The same view is a state advanced in place (each head reads its slice before it writes it); any other overlap
    // would let one head's final state overwrite another head's initial state before it is read.
    if (const state_tensor* i = o.initial_state; i && overlaps(extent_of(*o.final_state), extent_of(*i))) {
      const state_tensor* f = o.final_state;
      const bool same = f->data == i->data && f->stride_batch == i->stride_batch && f->stride_head == i->stride_head &&
                        f->stride_k == i->stride_k && f->stride_v == i->stride_v;
      if (!same) return fail("options.final_state overlaps options.initial_state without being the same view");
    }
  }
  // Written views must not overlap themselves (a zero stride on an axis of more than one element).
  const struct {
    const char* name;
    std::int64_t dims[4], strides[4];
  } written[] = {{"out", {out.batch, out.seq, out.heads, out.dim}, {out.stride_batch, out.stride_seq, out.stride_head, out.stride_dim}},
                 {"options.final_state",
                  {o.final_state ? o.final_state->batch : 0, o.final_state ? o.final_state->heads : 0, o.final_state ? o.final_state->dim_k : 0,
                   o.final_state ? o.final_state->dim_v : 0},
                  {o.final_state ? o.final_state->stride_batch : 1, o.final_state ? o.final_state->stride_head : 1,
                   o.final_state ? o.final_state->stride_k : 1, o.final_state ? o.final_state->stride_v : 1}}};
  for (const auto& x : written)
    for (int d = 0; d < 4; ++d)
      if (x.dims[d] > 1 && x.strides[d] == 0) return fail(x.name, " has stride 0 on axis ", d, ": an output must not overlap itself");
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.in_type = q.type;
  p.out_type = out.type;
  strides_of(q, p.q_stride);
  strides_of(k, p.k_stride);
  strides_of(v, p.v_stride);
  strides_of(out, p.out_stride);
  p.batch = q.batch;
  p.seq = q.seq;
  p.heads = q.heads;
  p.dim_k = q.dim;
  p.dim_v = v.dim;
  p.scale = s.scale < 0 ? 1.0 / std::sqrt(static_cast<double>(q.dim)) : s.scale;
  p.phi = s.phi;
  p.causal = s.causal;
  p.prefix = s.causal ? s.prefix : q.seq;
  p.normalize = s.normalize;
  p.decay = s.decay;
  p.head_log_decay = s.head_log_decay.data();
  p.initial_state = o.initial_state;
  p.final_state = o.final_state;
  p.chunk = o.chunk;
  p.threads = resolve_threads(o.threads);
  return {};
}

}  // namespace detail

namespace cpu {
status run_linear_fwd(const detail::linear_params& p);
}
namespace ref {
status run_linear_ref(const detail::linear_params& p, linear_form form);
}

status linear_attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s,
                        const linear_options& o) {
  detail::linear_params p;
  if (status st = detail::make_linear_params("linear_attention", q, k, v, out, s, o, p); !st.ok()) return st;
  return cpu::run_linear_fwd(p);
}

status reference_linear_attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const linear_spec& s,
                                  const linear_options& o, linear_form form) {
  detail::linear_params p;
  if (status st = detail::make_linear_params("reference_linear_attention", q, k, v, out, s, o, p); !st.ok()) return st;
  if (form != linear_form::quadratic && form != linear_form::recurrent && form != linear_form::recurrent_f32)
    return {"[reference_linear_attention] form " + std::to_string(static_cast<int>(form)) + " is not a linear_form"};
  return ref::run_linear_ref(p, form);
}

}  // namespace omniattn
