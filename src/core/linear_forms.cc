// The linear-attention forms composed of kernel calls (core/linear_params.h): a projected call (Hedgehog, Performer)
// maps q and k in a pass and runs the kernels on the features; the bidirectional form (ViG's BiGLA: non-causal with a
// decay) runs the causal call and the causal call over the reversed tokens and sums them.
//
// Math contract of the bidirectional form (include/omniattn/linear.h), per (batch, head):
//   o_i = (f_i + b_i) / (normalize ? fd_i + bd_i : 1)   (0 where the sum of the denominators is 0)
//   f = the causal call with g on [v, 1] (the column of ones only under normalize), b = the same causal call over the
//   reversed tokens with g_backward (g when unset). Its backward is the two calls' backwards, each given the value-side
//   gradient [do / den, -(do . o) / den] (normalize) or do, summed (dg gets both directions unless g_backward has its
//   own). The reversed call is a view: every [B, T, H, *] pointer moved to the last token and its seq stride negated
//   (varlen: the offsets mirrored), so nothing is copied but the f32 results the sum reads.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/linear_params.h"
#include "core/storage.h"

namespace omniattn {
namespace cpu {
status run_linear_fwd(const detail::linear_params& p);
status run_linear_bwd(const detail::linear_bwd_params& p);
status map_linear_features(const detail::linear_params& p, float* qf, float* kf);
status chain_linear_features(const detail::linear_bwd_params& bp, const float* qf, const float* kf, float* dqf, float* dkf);
}  // namespace cpu

namespace detail {
namespace {

std::size_t at(std::int64_t i) { return static_cast<std::size_t>(i); }

// n zeroed floats per buffer, or false when they do not fit.
bool allocate(std::int64_t n, std::initializer_list<std::vector<float>*> buffers) {
  try {
    for (std::vector<float>* b : buffers) b->assign(at(n), 0.0f);
  } catch (const std::bad_alloc&) {
    return false;
  } catch (const std::length_error&) {
    return false;
  }
  return true;
}

// [B, T, H, w] contiguous element strides.
void contiguous(const linear_params& p, std::int64_t w, std::int64_t* st) {
  st[0] = p.seq * p.heads * w;
  st[1] = p.heads * w;
  st[2] = w;
  st[3] = 1;
}

// A [B, T, H, *] view read from its last token with its seq stride negated.
template <class Ptr>
void flip(Ptr& base, dtype t, std::int64_t* st, std::int64_t seq) {
  if (!base || seq == 0) return;
  base = static_cast<Ptr>(const_cast<void*>(advance(base, t, (seq - 1) * st[1])));
  st[1] = -st[1];
}

// The call over the reversed tokens: its decay is g_backward where the call has one; varlen offsets mirrored.
linear_params mirrored(const linear_params& p, std::vector<std::int64_t>& offsets) {
  linear_params m = p;
  flip(m.q, m.in_type, m.q_stride, p.seq);
  flip(m.k, m.in_type, m.k_stride, p.seq);
  flip(m.v, m.v_type, m.v_stride, p.seq);
  flip(m.out, m.out_type, m.out_stride, p.seq);
  if (p.gb) {
    m.g = p.gb;
    m.g_type = p.gb_type;
    std::copy(p.gb_stride, p.gb_stride + 4, m.g_stride);
  }
  m.gb = nullptr;
  flip(m.g, m.g_type, m.g_stride, p.seq);
  if (p.cu_seqlens) {
    offsets.resize(at(p.num_seqs + 1));
    for (std::int64_t s = 0; s <= p.num_seqs; ++s) offsets[at(s)] = p.seq - p.cu_seqlens[p.num_seqs - s];
    m.cu_seqlens = offsets.data();
  }
  return m;
}

linear_bwd_params mirrored(const linear_bwd_params& bp, std::vector<std::int64_t>& offsets) {
  linear_bwd_params m = bp;
  const std::int64_t T = bp.fwd.seq;
  m.fwd = mirrored(bp.fwd, offsets);
  flip(m.d_out, m.do_type, m.do_stride, T);
  flip(m.dq, m.dq_type, m.dq_stride, T);
  flip(m.dk, m.dk_type, m.dk_stride, T);
  flip(m.dv, m.dv_type, m.dv_stride, T);
  flip(m.dg, dtype::f32, m.dg_stride, T);
  m.dgb = nullptr;
  return m;
}

// The causal call of the forward direction, into `out` ([B, T, H, W] f32), on v or (normalize) on [v, 1] in `va`.
linear_params forward_direction(const linear_params& p, std::vector<float>& va, float* out) {
  const std::int64_t V = p.dim_v, W = V + (p.normalize ? 1 : 0);
  linear_params f = p;
  f.causal = true;
  f.prefix = 0;
  f.normalize = false;
  f.initial_state = f.final_state = nullptr;
  if (p.normalize) {
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t t = 0; t < p.seq; ++t)
        for (std::int64_t h = 0; h < p.heads; ++h) {
          float* row = &va[at(((b * p.seq + t) * p.heads + h) * W)];
          for (std::int64_t c = 0; c < V; ++c)
            row[c] = static_cast<float>(load_element(p.v, p.v_type, b * p.v_stride[0] + t * p.v_stride[1] + h * p.v_stride[2] + c * p.v_stride[3]));
          row[V] = 1.0f;
        }
    f.v = va.data();
    f.v_type = dtype::f32;
    contiguous(p, W, f.v_stride);
    f.dim_v = W;
  }
  f.out = out;
  f.out_type = dtype::f32;
  contiguous(p, W, f.out_stride);
  return f;
}

// Both directions of the forward into `of` and `ob` ([B, T, H, W] f32).
status both_directions(const linear_params& p, const linear_fwd_fn& causal_fwd, std::vector<float>& va, std::vector<float>& of,
                       std::vector<float>& ob) {
  linear_params f = forward_direction(p, va, of.data());
  f.gb = nullptr;
  if (status st = causal_fwd(f); !st.ok()) return st;
  linear_params r = f;
  r.gb = p.gb;
  r.gb_type = p.gb_type;
  std::copy(p.gb_stride, p.gb_stride + 4, r.gb_stride);
  r.out = ob.data();
  std::vector<std::int64_t> offsets;
  return causal_fwd(mirrored(r, offsets));
}

void store_row(void* base, dtype type, const std::int64_t* st, std::int64_t b, std::int64_t t, std::int64_t h, const float* x, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) store_element(base, type, b * st[0] + t * st[1] + h * st[2] + c * st[3], static_cast<double>(x[c]));
}

status out_of_memory(const char* what) { return {std::string("[linear_attention] out of memory (") + what + ")"}; }

// A projected call: the features phi(P(q)), phi(P(k)) first (cpu/linear_map.cc), then the kernel on them.
status run_projected_fwd(const linear_params& p) {
  std::vector<float> qf, kf;
  if (!allocate(p.batch * p.seq * p.heads * p.dim_k, {&qf, &kf})) return out_of_memory("the projected features");
  if (status st = cpu::map_linear_features(p, qf.data(), kf.data()); !st.ok()) return st;
  return run_linear_forward(features_view(p, qf.data(), kf.data()));
}

// Its backward: the features again, the backward on them into their gradients, then the chain through phi and P.
status run_projected_bwd(const linear_bwd_params& bp) {
  const linear_params& p = bp.fwd;
  std::vector<float> qf, kf, dqf, dkf;
  if (!allocate(p.batch * p.seq * p.heads * p.dim_k, {&qf, &kf, &dqf, &dkf}))
    return {"[linear_attention_backward] out of memory (the projected features)"};
  if (status st = cpu::map_linear_features(p, qf.data(), kf.data()); !st.ok()) return st;
  linear_bwd_params f = bp;
  f.fwd = features_view(p, qf.data(), kf.data());
  f.dq = dqf.data();
  f.dk = dkf.data();
  f.dq_type = f.dk_type = dtype::f32;
  std::copy(f.fwd.q_stride, f.fwd.q_stride + 4, f.dq_stride);
  std::copy(f.fwd.k_stride, f.fwd.k_stride + 4, f.dk_stride);
  f.d_proj_w = f.d_proj_b = nullptr;
  if (status st = run_linear_backward(f); !st.ok()) return st;
  return cpu::chain_linear_features(bp, qf.data(), kf.data(), dqf.data(), dkf.data());
}

}  // namespace

status run_bidirectional_fwd(const linear_params& p, const linear_fwd_fn& causal_fwd) {
  const std::int64_t V = p.dim_v, W = V + (p.normalize ? 1 : 0), rows = p.batch * p.seq * p.heads;
  std::vector<float> va, of, ob;
  if (!allocate(rows * W, {&of, &ob}) || (p.normalize && !allocate(rows * W, {&va}))) return out_of_memory("the bidirectional form's sums");
  if (status st = both_directions(p, causal_fwd, va, of, ob); !st.ok()) return st;
  std::vector<float> row(at(V));
  for (std::int64_t r = 0; r < rows; ++r) {
    const float *f = &of[at(r * W)], *b = &ob[at(r * W)];
    const float den = p.normalize ? f[V] + b[V] : 1.0f;
    for (std::int64_t c = 0; c < V; ++c) row[at(c)] = den == 0.0f ? 0.0f : (f[c] + b[c]) / den;
    store_row(p.out, p.out_type, p.out_stride, r / p.heads / p.seq, r / p.heads % p.seq, r % p.heads, row.data(), V);
  }
  return {};
}

status run_bidirectional_bwd(const linear_bwd_params& bp, const linear_fwd_fn& causal_fwd, const linear_bwd_fn& causal_bwd) {
  const linear_params& p = bp.fwd;
  const std::int64_t V = p.dim_v, W = V + (p.normalize ? 1 : 0), K = p.dim_in, rows = p.batch * p.seq * p.heads;
  const std::int64_t nb = p.decay == linear_decay::channel ? p.dim_k : 1;
  const bool want_dg = bp.dg || bp.dgb;
  std::vector<float> va, of, ob, d_out, dq[2], dk[2], dv[2], dg[2], dh[2];
  if (!allocate(rows * K, {&dq[0], &dq[1], &dk[0], &dk[1]}) || !allocate(rows * W, {&dv[0], &dv[1]}) ||
      !allocate(want_dg ? rows * nb : 0, {&dg[0], &dg[1]}) || !allocate(p.heads, {&dh[0], &dh[1]}) ||
      (p.normalize && !allocate(rows * W, {&va, &of, &ob, &d_out})))
    return {"[linear_attention_backward] out of memory (the bidirectional form's sums)"};
  linear_bwd_params f = bp;
  f.fwd = forward_direction(p, va, of.data());
  f.fwd.gb = nullptr;
  if (p.normalize) {  // o and the denominators of both directions, then the value-side gradient of [v, 1]
    if (status st = both_directions(p, causal_fwd, va, of, ob); !st.ok()) return st;
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t b = r / p.heads / p.seq, t = r / p.heads % p.seq, h = r % p.heads;
      const float *nf = &of[at(r * W)], *nr = &ob[at(r * W)];
      const float den = nf[V] + nr[V];
      float* w = &d_out[at(r * W)];
      if (den == 0.0f) continue;  // the forward wrote 0 whatever the inputs
      float dot = 0.0f;
      for (std::int64_t c = 0; c < V; ++c) {
        const auto g = static_cast<float>(load_element(bp.d_out, bp.do_type, b * bp.do_stride[0] + t * bp.do_stride[1] + h * bp.do_stride[2] + c * bp.do_stride[3]));
        w[c] = g / den;
        dot += g * (nf[c] + nr[c]) / den;
      }
      w[V] = -dot / den;
    }
    f.d_out = d_out.data();
    f.do_type = dtype::f32;
    contiguous(p, W, f.do_stride);
  }
  f.d_initial_state = f.d_final_state = nullptr;
  f.dgb = nullptr;
  // The oracle's projected calls give the projection's gradients per direction ([x][direction]: weight, bias).
  std::vector<float> dproj[2][2];
  const std::int64_t proj_sizes[2] = {p.proj_heads * p.dim_in * p.dim_k, p.proj_heads * p.dim_k};
  for (int x = 0; x < 2; ++x)
    if ((x == 0 ? bp.d_proj_w : bp.d_proj_b) && !allocate(proj_sizes[x], {&dproj[x][0], &dproj[x][1]}))
      return {"[linear_attention_backward] out of memory (the bidirectional form's sums)"};
  linear_bwd_params dirs[2] = {f, f};
  dirs[1].fwd.gb = p.gb;
  dirs[1].fwd.gb_type = p.gb_type;
  std::copy(p.gb_stride, p.gb_stride + 4, dirs[1].fwd.gb_stride);
  std::vector<std::int64_t> offsets;
  for (int d = 0; d < 2; ++d) {
    linear_bwd_params& x = dirs[d];
    x.dq = dq[d].data();
    x.dk = dk[d].data();
    x.dv = dv[d].data();
    x.dq_type = x.dk_type = x.dv_type = dtype::f32;
    contiguous(p, K, x.dq_stride);
    contiguous(p, K, x.dk_stride);
    contiguous(p, W, x.dv_stride);
    x.dg = want_dg ? dg[d].data() : nullptr;
    contiguous(p, nb, x.dg_stride);
    x.d_head_log_decay = bp.d_head_log_decay ? dh[d].data() : nullptr;
    x.d_proj_w = bp.d_proj_w ? dproj[0][d].data() : nullptr;
    x.d_proj_b = bp.d_proj_b ? dproj[1][d].data() : nullptr;
    if (status st = causal_bwd(d == 0 ? x : mirrored(x, offsets)); !st.ok()) return st;
  }
  std::vector<float> sum(at(std::max({K, W, nb})));
  // Rows of the sum of `parts` ([B, T, H, width] f32 each, the first n columns) into a [B, T, H, n] view.
  const auto store = [&](std::initializer_list<const std::vector<float>*> parts, std::int64_t width, std::int64_t n, void* base, dtype type,
                         const std::int64_t* st) {
    for (std::int64_t r = 0; r < rows; ++r) {
      std::fill(sum.begin(), sum.begin() + n, 0.0f);
      for (const std::vector<float>* x : parts)
        for (std::int64_t c = 0; c < n; ++c) sum[at(c)] += (*x)[at(r * width + c)];
      store_row(base, type, st, r / p.heads / p.seq, r / p.heads % p.seq, r % p.heads, sum.data(), n);
    }
  };
  store({&dq[0], &dq[1]}, K, K, bp.dq, bp.dq_type, bp.dq_stride);
  store({&dk[0], &dk[1]}, K, K, bp.dk, bp.dk_type, bp.dk_stride);
  store({&dv[0], &dv[1]}, W, V, bp.dv, bp.dv_type, bp.dv_stride);
  if (bp.dgb) {  // each direction its own decay
    if (bp.dg) store({&dg[0]}, nb, nb, bp.dg, dtype::f32, bp.dg_stride);
    store({&dg[1]}, nb, nb, bp.dgb, dtype::f32, bp.dgb_stride);
  } else if (bp.dg) {
    store({&dg[0], &dg[1]}, nb, nb, bp.dg, dtype::f32, bp.dg_stride);
  }
  for (int x = 0; x < 2; ++x) {  // the oracle's projection gradients (the kernels project outside this form)
    float* total = x == 0 ? bp.d_proj_w : bp.d_proj_b;
    if (!total) continue;
    for (std::size_t i = 0; i < dproj[x][0].size(); ++i) total[i] = dproj[x][0][i] + dproj[x][1][i];
  }
  if (bp.d_head_log_decay)
    for (std::int64_t h = 0; h < p.heads; ++h) bp.d_head_log_decay[h] = dh[0][at(h)] + dh[1][at(h)];
  return {};
}

status run_linear_forward(const linear_params& p) {
  if (p.proj_w) return run_projected_fwd(p);
  if (bidirectional(p)) return run_bidirectional_fwd(p, [](const linear_params& x) { return cpu::run_linear_fwd(x); });
  return cpu::run_linear_fwd(p);
}

status run_linear_backward(const linear_bwd_params& p) {
  if (p.fwd.proj_w) return run_projected_bwd(p);
  if (bidirectional(p.fwd))
    return run_bidirectional_bwd(p, [](const linear_params& x) { return cpu::run_linear_fwd(x); },
                                 [](const linear_bwd_params& x) { return cpu::run_linear_bwd(x); });
  return cpu::run_linear_bwd(p);
}

}  // namespace detail
}  // namespace omniattn
