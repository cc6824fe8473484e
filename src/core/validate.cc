// Validation of an attention call and construction of its params struct, of a decode call on a KV cache and of a
// merge_attention_states call. Every rule reports "[<call>] <argument> <what is wrong>" (e.g. "[attention] k.dim 96
// != q.dim 128") and nothing is written to the output.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <omp.h>

#include "core/backends.h"
#include "core/checked_math.h"
#include "core/checks.h"
#include "core/score_kinds.h"
#include "core/validate.h"
#include "omniattn/attention.h"
#include "omniattn/kv_cache.h"

namespace omniattn {
namespace {

using detail::array_range;
using detail::byte_range;
using detail::check_no_alias;
using detail::check_no_self_overlap;
using detail::check_same_shape;
using detail::check_tensor;
using detail::check_threads;
using detail::extent;
using detail::fail;
using detail::failure;
using detail::input_range;
using detail::kernel_strides;
using detail::overlaps;

// Every buffer the spec and options make the kernels read besides q, k and v: varlen offsets, block mask kinds, sink
// logits, RoPE position ids, score tables (dense bias, key bias / reweight) and dense mask tables. Sizes are validated.
void spec_inputs(const tensor& q, const tensor& k, const spec& s, const options& opt, const attn_params& p,
                 std::vector<input_range>& in) {
  if (opt.packed) {
    const std::int64_t n = opt.packed->num_seqs + 1;
    in.push_back({"varlen.cu_seqlens_q", array_range("varlen.cu_seqlens_q", opt.packed->cu_seqlens_q, n, 8)});
    in.push_back({"varlen.cu_seqlens_k", array_range("varlen.cu_seqlens_k", opt.packed->cu_seqlens_k, n, 8)});
  }
  if (s.blocks)
    in.push_back({"spec.blocks.kinds", array_range("spec.blocks.kinds", s.blocks->kinds.data(),
                                                   static_cast<std::int64_t>(s.blocks->kinds.size()), 1)});
  if (s.sink_logits) in.push_back({"spec.sink_logits", array_range("spec.sink_logits", s.sink_logits, total_heads(p), 4)});
  if (s.rope) {
    const rope_spec& r = *s.rope;
    const std::int64_t axes = r.sections.empty() ? 1 : static_cast<std::int64_t>(r.sections.size());
    const std::int64_t batches = opt.packed ? 1 : q.batch;
    const struct {
      const char* name;
      const std::int64_t* ids;
      std::int64_t rows;
    } pos[2] = {{"spec.rope.pos_q", r.pos_q, q.seq}, {"spec.rope.pos_k", r.pos_k, k.seq}};
    for (const auto& x : pos) {
      std::int64_t n = 0;
      if (!x.ids) continue;
      if (!detail::product_fits({axes, batches, x.rows}, &n)) fail(x.name, ": axes * batch * seq overflows int64");
      in.push_back({x.name, array_range(x.name, x.ids, n, 8)});
    }
  }
  if (s.score) {
    std::vector<detail::score_step> steps;
    detail::lower_score(s.score, steps);
    for (const detail::score_step& st : steps) {
      if (st.op == detail::score_step::kind::bias) {
        const detail::bias_score& b = *st.bias;
        in.push_back({"spec.score bias", extent("spec.score bias", b.data, 4, b.shape.data(), b.strides.data(), 4)});
      } else if (st.op == detail::score_step::kind::key_table) {
        const char* name = st.table->reweight ? "spec.score reweight table" : "spec.score key_bias table";
        const std::vector<double>& d = *st.table->values;
        const std::vector<float>& f = *st.table->values_f;
        in.push_back({name, array_range(name, d.data(), static_cast<std::int64_t>(d.size()), 8)});
        in.push_back({name, array_range(name, f.data(), static_cast<std::int64_t>(f.size()), 4)});
      }
    }
  }
  if (p.mask) {
    for (const mask_expr::dense_view& d : p.mask->dense_tables()) {
      const std::string name = "spec.mask dense '" + d.name + "'";
      in.push_back({name, extent(name.c_str(), d.data, 1, d.shape.data(), d.strides.data(), 4)});
    }
  }
}

const char* const k_lse_dims[3] = {"batch", "head", "seq"};

// A float32 LSE view of sizes [batch, heads, seq]: the bytes it spans.
byte_range check_lse(const char* name, const lse_tensor& l, const std::int64_t* sizes) {
  if (!l.data && sizes[0] != 0 && sizes[1] != 0 && sizes[2] != 0) fail(name, ".data is null");
  if (reinterpret_cast<std::uintptr_t>(l.data) % 4 != 0)
    fail(name, ".data ", static_cast<const void*>(l.data), " is not aligned to 4 bytes");
  const std::int64_t strides[3] = {l.stride_batch, l.stride_head, l.stride_seq};
  return extent(name, l.data, 4, sizes, strides, 3);
}

void check_no_self_overlap(const char* name, const lse_tensor& l, const std::int64_t* sizes) {
  const std::int64_t strides[3] = {l.stride_batch, l.stride_head, l.stride_seq};
  check_no_self_overlap(name, sizes, strides, k_lse_dims, 3);
}

// The LSE output of q's rows, [batch, heads, seq]: checked against itself, the inputs and out, then recorded in p.
byte_range lse_output(const lse_tensor& l, const tensor& q, const std::vector<input_range>& inputs, byte_range ro,
                      attn_params& p) {
  const std::int64_t sizes[3] = {q.batch, q.heads, q.seq};
  const byte_range rl = check_lse("lse", l, sizes);
  check_no_self_overlap("lse", l, sizes);
  check_no_alias("lse", rl, inputs);
  if (overlaps(rl, ro)) fail("lse aliases out");
  p.lse = l.data;
  p.lse_stride[0] = l.stride_batch;
  p.lse_stride[1] = l.stride_head;
  p.lse_stride[2] = l.stride_seq;
  return rl;
}

void check_varlen(const varlen& vl, const tensor& q, const tensor& k, attn_params& p) {
  if (vl.num_seqs < 0) fail("varlen.num_seqs ", vl.num_seqs, " must be >= 0");
  if (!vl.cu_seqlens_q) fail("varlen.cu_seqlens_q is null");
  if (!vl.cu_seqlens_k) fail("varlen.cu_seqlens_k is null");
  if (q.batch != 1) fail("q.batch ", q.batch, " must be 1 with varlen (sequences are packed along seq)");
  const struct {
    const char* name;
    const std::int64_t* cu;
    std::int64_t total;
    std::int64_t* max_len;
  } lists[2] = {{"varlen.cu_seqlens_q", vl.cu_seqlens_q, q.seq, &p.seq_q}, {"varlen.cu_seqlens_k", vl.cu_seqlens_k, k.seq, &p.seq_k}};
  for (const auto& l : lists) {
    if (l.cu[0] != 0) fail(l.name, "[0] ", l.cu[0], " must be 0");
    std::int64_t longest = 0;
    for (std::int64_t s = 0; s < vl.num_seqs; ++s) {
      if (l.cu[s + 1] < l.cu[s]) fail(l.name, "[", s + 1, "] ", l.cu[s + 1], " < [", s, "] ", l.cu[s], ": must be non-decreasing");
      longest = std::max(longest, l.cu[s + 1] - l.cu[s]);
    }
    if (l.cu[vl.num_seqs] != l.total)
      fail(l.name, "[", vl.num_seqs, "] ", l.cu[vl.num_seqs], " != total tokens ", l.total);
    *l.max_len = longest;
  }
  p.batch = vl.num_seqs;
  p.cu_seqlens_q = vl.cu_seqlens_q;
  p.cu_seqlens_k = vl.cu_seqlens_k;
}

void check_problem_block(const problem_block& blk, const options& opt, attn_params& p) {
  if (opt.packed) fail("options.block with options.packed: a block of a varlen batch is not supported");
  const struct {
    const char* side;
    std::int64_t offset, total, rows;
  } sides[2] = {{"q", blk.q_offset, blk.seq_q, p.seq_q}, {"k", blk.k_offset, blk.seq_k, p.seq_k}};
  for (const auto& x : sides) {
    if (x.offset < 0) fail("options.block.", x.side, "_offset ", x.offset, " must be >= 0");
    if (x.total < 0) fail("options.block.seq_", x.side, " ", x.total, " must be >= 0");
    std::int64_t end = 0;
    if (!detail::add_fits(x.offset, x.rows, &end) || end > x.total)
      fail("options.block.", x.side, "_offset ", x.offset, " + ", x.side, ".seq ", x.rows, " > options.block.seq_", x.side, " ",
           x.total, " (the block must lie inside the problem)");
  }
  p.pos_q0 = blk.q_offset;
  p.pos_k0 = blk.k_offset;
  p.total_q = blk.seq_q;
  p.total_k = blk.seq_k;
  if (blk.h_offset < 0) fail("options.block.h_offset ", blk.h_offset, " must be >= 0");
  if (blk.heads_q < 0) fail("options.block.heads_q ", blk.heads_q, " must be >= 0 (0 = q.heads)");
  if (blk.heads_q != 0 || blk.h_offset != 0) {
    const std::int64_t total = blk.heads_q != 0 ? blk.heads_q : p.heads_q;
    std::int64_t end = 0;
    if (!detail::add_fits(blk.h_offset, p.heads_q, &end) || end > total)
      fail("options.block.h_offset ", blk.h_offset, " + q.heads ", p.heads_q, " > options.block.heads_q ", total,
           " (the heads must lie inside the problem)");
    p.head0 = blk.h_offset;
    p.total_heads = total;
  }
}

void check_block_mask(const block_mask& bm, const attn_params& p) {
  if (bm.q_tile <= 0) fail("spec.blocks.q_tile ", bm.q_tile, " must be > 0");
  if (bm.kv_tile <= 0) fail("spec.blocks.kv_tile ", bm.kv_tile, " must be > 0");
  // Over the whole problem (options::block): the tiles are of positions.
  const std::int64_t tq = total_q(p), tk = total_k(p);
  const std::int64_t want_q = detail::ceil_div(tq, bm.q_tile), want_k = detail::ceil_div(tk, bm.kv_tile);
  if (bm.q_tiles != want_q) fail("spec.blocks.q_tiles ", bm.q_tiles, " != ceil(seq_q ", tq, " / q_tile ", bm.q_tile, ") = ", want_q);
  if (bm.kv_tiles != want_k) fail("spec.blocks.kv_tiles ", bm.kv_tiles, " != ceil(seq_k ", tk, " / kv_tile ", bm.kv_tile, ") = ", want_k);
  if (bm.batch != 1 && bm.batch != p.batch) fail("spec.blocks.batch ", bm.batch, " must be 1 or ", p.batch);
  if (bm.heads != 1 && bm.heads != total_heads(p)) fail("spec.blocks.heads ", bm.heads, " must be 1 or ", total_heads(p));
  // Each factor is at most the call's size, but their product can still leave int64.
  std::int64_t want = 0;
  if (!detail::product_fits({bm.batch, bm.heads, bm.q_tiles, bm.kv_tiles}, &want))
    fail("spec.blocks: batch * heads * q_tiles * kv_tiles overflows int64");
  if (bm.kinds.size() != static_cast<std::size_t>(want)) fail("spec.blocks.kinds has ", bm.kinds.size(), " entries, expected ", want);
  for (tile_kind t : bm.kinds)
    if (t != tile_kind::empty && t != tile_kind::partial && t != tile_kind::full)
      fail("spec.blocks.kinds holds ", static_cast<int>(t), ", not a tile_kind");
}

void build_spec(const tensor& q, const tensor& k, const spec& s, const options& opt, attn_params& p, byte_range ro,
                const byte_range* rl);

void build(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, const options& opt,
           attn_params& p) {
  const byte_range rq = check_tensor("q", q), rk = check_tensor("k", k), rv = check_tensor("v", v),
                   ro = check_tensor("out", out);
  if (k.type != q.type) fail("k.type ", dtype_name(k.type), " != q.type ", dtype_name(q.type));
  if (v.type != q.type) fail("v.type ", dtype_name(v.type), " != q.type ", dtype_name(q.type));
  if (out.type != q.type && out.type != dtype::f32)
    fail("out.type ", dtype_name(out.type), " must be q.type ", dtype_name(q.type), " or f32");
  if (k.dim != q.dim) fail("k.dim ", k.dim, " != q.dim ", q.dim);
  if (k.batch != q.batch) fail("k.batch ", k.batch, " != q.batch ", q.batch);
  if (v.batch != k.batch) fail("v.batch ", v.batch, " != k.batch ", k.batch);
  if (v.seq != k.seq) fail("v.seq ", v.seq, " != k.seq ", k.seq);
  if (v.heads != k.heads) fail("v.heads ", v.heads, " != k.heads ", k.heads);
  if (k.heads == 0 ? q.heads != 0 : q.heads % k.heads != 0)
    fail("q.heads ", q.heads, " is not a multiple of k.heads ", k.heads);
  if (out.batch != q.batch) fail("out.batch ", out.batch, " != q.batch ", q.batch);
  if (out.seq != q.seq) fail("out.seq ", out.seq, " != q.seq ", q.seq);
  if (out.heads != q.heads) fail("out.heads ", out.heads, " != q.heads ", q.heads);
  if (out.dim != v.dim) fail("out.dim ", out.dim, " != v.dim ", v.dim);
  check_no_self_overlap("out", out);
  std::vector<input_range> inputs = {{"q", rq}, {"k", rk}, {"v", rv}};
  check_no_alias("out", ro, inputs);

  p = attn_params{};
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.in_type = q.type;
  p.out_type = out.type;
  p.batch = q.batch;
  p.seq_q = q.seq;
  p.seq_k = k.seq;
  p.heads_q = q.heads;
  p.heads_kv = k.heads;
  p.group = k.heads == 0 ? 1 : q.heads / k.heads;
  p.dim_qk = q.dim;
  p.seq_rows_q = q.seq;
  p.seq_rows_k = k.seq;
  p.dim_v = v.dim;
  kernel_strides(q, p.q_stride);
  kernel_strides(k, p.k_stride);
  kernel_strides(v, p.v_stride);
  kernel_strides(out, p.o_stride);
  if (opt.packed) check_varlen(*opt.packed, q, k, p);
  if (opt.block) check_problem_block(*opt.block, opt, p);

  byte_range rl;
  if (opt.lse) rl = lse_output(*opt.lse, q, inputs, ro, p);

  build_spec(q, k, s, opt, p, ro, opt.lse ? &rl : nullptr);
}

// The spec's rules against the problem in p (its sizes are what masks, score tables and block masks are checked
// against), and the outputs (ranges ro, rl) against every buffer the spec makes the kernels read.
void build_spec(const tensor& q, const tensor& k, const spec& s, const options& opt, attn_params& p, byte_range ro,
                const byte_range* rl) {
  const double scale = s.scale ? *s.scale : 1.0 / std::sqrt(static_cast<double>(q.dim));
  if (!std::isfinite(scale)) fail("spec.scale ", scale, " must be finite");
  // The kernels use scale * log2(e) as a float.
  if (std::fabs(scale) * 1.4426950408889634 > std::numeric_limits<float>::max())
    fail("spec.scale ", scale, " is out of float range (|scale| * log2(e) must be <= 3.40282e+38)");
  p.scale = scale;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  if (s.causal != causal_mode::none && s.causal != causal_mode::top_left && s.causal != causal_mode::bottom_right)
    fail("spec.causal ", static_cast<int>(s.causal), " is not a causal_mode");
  p.causal = s.causal;
  if (s.mask) {
    if (const std::string why = s.mask.check(p.batch, total_heads(p), total_q(p), total_k(p)); !why.empty()) fail("spec.mask ", why);
  }
  p.mask = s.mask ? &s.mask : nullptr;
  p.score = s.score ? &s.score : nullptr;
  if (s.score) {
    if (const std::string why = detail::check_score(s.score, p); !why.empty()) fail("spec.score ", why);
  }
  if (s.blocks) check_block_mask(*s.blocks, p);
  p.blocks = s.blocks;
  if (s.sink_logits)
    for (std::int64_t h = 0; h < total_heads(p); ++h)
      if (!std::isfinite(s.sink_logits[h]) ||
          std::fabs(static_cast<double>(s.sink_logits[h])) * 1.4426950408889634 > std::numeric_limits<float>::max())
        fail("spec.sink_logits[", h, "] ", s.sink_logits[h], " must be finite with |sink| * log2(e) <= 3.40282e+38");
  p.sink_logits = s.sink_logits ? s.sink_logits + p.head0 : nullptr;  // the kernels index by the call's heads
  if (s.rope) {
    const rope_spec& r = *s.rope;
    const std::int64_t dim = r.rotary_dim == 0 ? q.dim : r.rotary_dim;
    if (dim <= 0 || dim % 2 != 0 || dim > q.dim)
      fail("spec.rope.rotary_dim ", r.rotary_dim, " must be even and in 2..q.dim ", q.dim, " (0 = q.dim)");
    if (!(r.theta > 0.0) || !std::isfinite(r.theta)) fail("spec.rope.theta ", r.theta, " must be finite and > 0");
    if (!r.sections.empty()) {
      std::int64_t pairs = 0;
      for (std::int64_t sec : r.sections) {
        if (sec < 0) fail("spec.rope.sections holds ", sec, ": must be >= 0");
        if (!detail::add_fits(pairs, sec, &pairs)) fail("spec.rope.sections sum overflows int64");
      }
      if (pairs != dim / 2) fail("spec.rope.sections sum to ", pairs, " != rotary pairs ", dim / 2);
      if (!r.pos_q || !r.pos_k) fail("spec.rope.sections needs pos_q and pos_k (one id array per axis)");
    }
    if ((r.pos_q == nullptr) != (r.pos_k == nullptr)) fail("spec.rope: give both pos_q and pos_k, or neither");
    p.rope = &r;
    p.rope_dim = dim;
  }
  p.stats = opt.stats;
  p.threads = check_threads("options.threads", opt.threads);
  if (opt.use != backend::automatic && opt.use != backend::reference && opt.use != backend::cpu)
    fail("options.use ", static_cast<int>(opt.use), " is not a backend");
  // Last, once every size is known: no output may overlap any other buffer the call reads.
  std::vector<input_range> spec_buffers;
  spec_inputs(q, k, s, opt, p, spec_buffers);
  check_no_alias("out", ro, spec_buffers);
  if (rl) check_no_alias("lse", *rl, spec_buffers);
}

// The backward call: the forward's rules (out, lse and the spec), then d_out and the gradient outputs, which must
// not overlap any buffer the call reads nor each other.
void build_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const lse_tensor& lse,
                    const tensor& d_out, const gradients& g, const spec& s, const options& opt, attn_bwd_params& p) {
  // A block's gradients are partial sums over its keys; the sink's and the bias's would be counted once per block.
  if (opt.block && g.d_sink_logits) fail("gradients.d_sink_logits with options.block: the sink's gradient is not a sum over key blocks");
  if (opt.block && g.d_bias) fail("gradients.d_bias with options.block is not supported (the bias gradient of a block)");
  options fo = opt;
  fo.lse = &lse;
  fo.stats = nullptr;
  p = attn_bwd_params{};
  build(q, k, v, out, s, fo, p.fwd);
  const byte_range rq = check_tensor("q", q), rk = check_tensor("k", k), rv = check_tensor("v", v),
                   ro = check_tensor("out", out);
  const std::int64_t lse_sizes[3] = {q.batch, q.heads, q.seq};
  const byte_range rl = check_lse("lse", lse, lse_sizes);

  const byte_range rdo = check_tensor("d_out", d_out);
  if (d_out.type != q.type && d_out.type != dtype::f32)
    fail("d_out.type ", dtype_name(d_out.type), " must be q.type ", dtype_name(q.type), " or f32");
  const struct {
    const char* name;
    const tensor& t;
    const tensor& like;
    const char* like_name;
  } shaped[4] = {{"d_out", d_out, out, "out"}, {"dq", g.dq, q, "q"}, {"dk", g.dk, k, "k"}, {"dv", g.dv, v, "v"}};
  for (const auto& x : shaped) check_same_shape(x.name, x.t, x.like_name, x.like);
  std::vector<input_range> inputs = {{"q", rq}, {"k", rk}, {"v", rv}, {"out", ro}, {"lse", rl}, {"d_out", rdo}};
  spec_inputs(q, k, s, fo, p.fwd, inputs);
  std::vector<input_range> written;
  const struct {
    const char* name;
    const tensor& t;
    void** data;
    dtype* type;
    std::int64_t* strides;
  } grads[3] = {{"dq", g.dq, &p.dq, &p.dq_type, p.dq_stride},
                {"dk", g.dk, &p.dk, &p.dk_type, p.dk_stride},
                {"dv", g.dv, &p.dv, &p.dv_type, p.dv_stride}};
  for (const auto& x : grads) {
    const byte_range r = check_tensor(x.name, x.t);
    if (x.t.type != q.type && x.t.type != dtype::f32)
      fail(x.name, ".type ", dtype_name(x.t.type), " must be q.type ", dtype_name(q.type), " or f32");
    check_no_self_overlap(x.name, x.t);
    check_no_alias(x.name, r, inputs);
    check_no_alias(x.name, r, written);
    written.push_back({x.name, r});
    *x.data = x.t.data;
    *x.type = x.t.type;
    kernel_strides(x.t, x.strides);
  }
  kernel_strides(d_out, p.do_stride);
  p.d_out = d_out.data;
  p.d_out_type = d_out.type;

  if (g.d_sink_logits) {
    if (!s.sink_logits) fail("gradients.d_sink_logits is set but spec.sink_logits is not");
    if (reinterpret_cast<std::uintptr_t>(g.d_sink_logits) % 4 != 0) fail("gradients.d_sink_logits is not aligned to 4 bytes");
    const byte_range r = array_range("gradients.d_sink_logits", g.d_sink_logits, q.heads, 4);
    check_no_alias("gradients.d_sink_logits", r, inputs);
    check_no_alias("gradients.d_sink_logits", r, written);
    written.push_back({"gradients.d_sink_logits", r});
    p.d_sink = g.d_sink_logits;
  }
  if (s.score) {
    if (const std::string why = detail::score_derivative_missing(s.score); !why.empty()) fail("spec.score ", why);
  }
  if (g.d_bias) {
    std::vector<detail::score_step> steps;
    if (s.score) detail::lower_score(s.score, steps);
    const detail::bias_score* bias = nullptr;
    for (const detail::score_step& st : steps) {
      if (st.op != detail::score_step::kind::bias) continue;
      if (bias) fail("gradients.d_bias is set but spec.score has more than one bias tensor");
      bias = st.bias;
    }
    if (!bias) fail("gradients.d_bias is set but spec.score has no bias tensor (scores::bias)");
    if (reinterpret_cast<std::uintptr_t>(g.d_bias) % 4 != 0) fail("gradients.d_bias is not aligned to 4 bytes");
    std::int64_t n = 0;
    if (!detail::product_fits({bias->shape[0], bias->shape[1], bias->shape[2], bias->shape[3]}, &n))
      fail("gradients.d_bias: the bias shape overflows int64");
    const byte_range r = array_range("gradients.d_bias", g.d_bias, n, 4);
    check_no_alias("gradients.d_bias", r, inputs);
    check_no_alias("gradients.d_bias", r, written);
    p.d_bias = g.d_bias;
  }
}

// A decode call: q / out against the cache's sequences; the spec checked as for a full sequence of the longest
// length in the call (masks, score tables and block masks index absolute token positions), RoPE against the cache's.
void build_decode(const tensor& q, const kv_cache& cache, std::span<const std::int64_t> seqs, const tensor& out,
                  const spec& s, const decode_options& dopt, attn_decode_params& dp) {
  const kv_cache_config& cc = cache.config();
  const byte_range rq = check_tensor("q", q), ro = check_tensor("out", out);
  if (out.type != q.type && out.type != dtype::f32)
    fail("out.type ", dtype_name(out.type), " must be q.type ", dtype_name(q.type), " or f32");
  if (q.dim != cc.dim_qk) fail("q.dim ", q.dim, " != cache dim_qk ", cc.dim_qk);
  if (q.heads % cc.heads_kv != 0) fail("q.heads ", q.heads, " is not a multiple of the cache's heads_kv ", cc.heads_kv);
  if (out.batch != q.batch) fail("out.batch ", out.batch, " != q.batch ", q.batch);
  if (out.seq != q.seq) fail("out.seq ", out.seq, " != q.seq ", q.seq);
  if (out.heads != q.heads) fail("out.heads ", out.heads, " != q.heads ", q.heads);
  if (out.dim != cc.dim_v) fail("out.dim ", out.dim, " != cache dim_v ", cc.dim_v);
  check_no_self_overlap("out", out);
  std::vector<input_range> inputs = {{"q", rq}};
  check_no_alias("out", ro, inputs);
  const std::int64_t* cu = dopt.cu_seqlens_q;
  const auto n_seqs = static_cast<std::int64_t>(seqs.size());
  std::int64_t most_new = q.seq;
  if (cu) {
    if (q.batch != 1) fail("q.batch ", q.batch, " must be 1 with options.cu_seqlens_q (sequences are packed along seq)");
    inputs.push_back({"options.cu_seqlens_q", array_range("options.cu_seqlens_q", cu, n_seqs + 1, 8)});
    if (cu[0] != 0) fail("options.cu_seqlens_q[0] ", cu[0], " must be 0");
    most_new = 0;
    for (std::int64_t b = 0; b < n_seqs; ++b) {
      if (cu[b + 1] < cu[b]) fail("options.cu_seqlens_q decreases at ", b + 1, " (", cu[b], " then ", cu[b + 1], ")");
      most_new = std::max(most_new, cu[b + 1] - cu[b]);
    }
    if (cu[n_seqs] != q.seq) fail("options.cu_seqlens_q[", n_seqs, "] ", cu[n_seqs], " != q.seq ", q.seq, " (the total of new queries)");
  } else if (n_seqs != q.batch) {
    fail("seqs has ", seqs.size(), " ids != q.batch ", q.batch);
  }
  std::int64_t longest = 0, most_cached = 0;
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    if (!cache.alive(seqs[b])) fail("seqs[", b, "] ", seqs[b], " is not a sequence of the cache");
    for (std::size_t c = 0; c < b; ++c)
      if (seqs[c] == seqs[b]) fail("seqs[", c, "] and seqs[", b, "] are both sequence ", seqs[b], " (ids must be distinct)");
    const std::int64_t len = cache.length(seqs[b]);
    const std::int64_t n_new = cu ? cu[b + 1] - cu[b] : q.seq;
    if (len < n_new)
      fail(cu ? "sequence " : "q.seq ", cu ? std::to_string(seqs[b]) + "'s " + std::to_string(n_new) + " new queries" : std::to_string(n_new),
           " > length ", len, " of sequence ", seqs[b], " (the queries are the sequence's last tokens: append their K / V first)");
    longest = std::max(longest, len);
    for (std::int64_t h = 0; h < cc.heads_kv; ++h) most_cached = std::max(most_cached, cache.cached(seqs[b], h));
  }
  if (seqs.data()) inputs.push_back({"seqs", array_range("seqs", seqs.data(), static_cast<std::int64_t>(seqs.size()), 8)});

  attn_params& p = dp.fwd;
  p = attn_params{};
  p.q = q.data;
  p.out = out.data;
  p.in_type = q.type;
  p.out_type = out.type;
  p.batch = n_seqs;
  p.cu_seqlens_q = cu;
  p.cu_seqlens_k = cu;  // sequence(p, b)'s query rows only: the keys live in the cache (see attn_decode_params)
  p.heads_q = q.heads;
  p.heads_kv = cc.heads_kv;
  p.group = q.heads / cc.heads_kv;
  p.dim_qk = q.dim;
  p.dim_v = cc.dim_v;
  p.seq_rows_q = q.seq;
  kernel_strides(q, p.q_stride);
  kernel_strides(out, p.o_stride);
  byte_range rl;
  if (dopt.lse) rl = lse_output(*dopt.lse, q, inputs, ro, p);
  if (dopt.key_mass) {
    if (dopt.key_mass_slots < most_cached)
      fail("options.key_mass_slots ", dopt.key_mass_slots, " < the most cached slots of a (sequence, kv head) in the call ", most_cached);
    std::int64_t n = 0;
    if (!detail::product_fits({n_seqs, cc.heads_kv, dopt.key_mass_slots}, &n)) fail("options.key_mass size overflows int64");
    const byte_range rm = array_range("options.key_mass", dopt.key_mass, n, 4);
    if (reinterpret_cast<std::uintptr_t>(dopt.key_mass) % 4 != 0) fail("options.key_mass is not aligned to 4 bytes");
    check_no_alias("options.key_mass", rm, inputs);
    if (overlaps(rm, ro)) fail("options.key_mass aliases out");
    if (dopt.lse && overlaps(rm, rl)) fail("options.key_mass aliases lse");
    dp.key_mass = dopt.key_mass;
    dp.key_mass_slots = dopt.key_mass_slots;
  }
  // The spec's rules for the full sequences: query and key positions run over 0 .. longest - 1.
  options opt;
  opt.use = dopt.use;
  opt.threads = dopt.threads;
  opt.stats = dopt.stats;
  spec plain = s;
  plain.rope = nullptr;
  p.seq_q = p.seq_k = longest;
  build_spec(q, q, plain, opt, p, ro, dopt.lse ? &rl : nullptr);
  p.mask = s.mask ? &s.mask : nullptr;  // the caller's, not the local copy's
  p.score = s.score ? &s.score : nullptr;
  p.seq_q = most_new;
  p.seq_k = longest;
  if (s.rope) {
    const rope_spec& r = *s.rope;
    if (!cc.rope) fail("spec.rope is set but the cache stores keys without RoPE (set kv_cache_config.rope)");
    const rope_spec& c = *cc.rope;
    const std::int64_t dim = r.rotary_dim == 0 ? q.dim : r.rotary_dim, cdim = c.rotary_dim == 0 ? q.dim : c.rotary_dim;
    if (r.theta != c.theta || dim != cdim || r.interleaved != c.interleaved || r.sections != c.sections)
      fail("spec.rope (theta ", r.theta, ", rotary_dim ", dim, ", interleaved ", r.interleaved,
           ") differs from the cache's keys' rotation (theta ", c.theta, ", rotary_dim ", cdim, ", interleaved ",
           c.interleaved, ") or its sections");
    if (r.pos_k) fail("spec.rope.pos_k must be null: cached keys were rotated on append, at the positions given there");
    if (!r.sections.empty() && !r.pos_q) fail("spec.rope.sections needs pos_q (one id array per axis)");
    if (r.pos_q) {
      const std::int64_t axes = r.sections.empty() ? 1 : static_cast<std::int64_t>(r.sections.size());
      std::int64_t n = 0;
      if (!detail::product_fits({axes, q.batch, q.seq}, &n)) fail("spec.rope.pos_q: axes * batch * seq overflows int64");
      const byte_range rp = array_range("spec.rope.pos_q", r.pos_q, n, 8);
      if (overlaps(rp, ro)) fail("out aliases spec.rope.pos_q");
    }
    p.rope = &r;
    p.rope_dim = dim;
  } else if (cc.rope) {
    fail("spec.rope is null but the cache stores keys rotated by RoPE (kv_cache_config.rope): pass the same rope_spec");
  }
  dp.cache = cache.view();
  dp.seqs = seqs.data();
}

// merge_attention_states: n >= 1 parts of one shape, one LSE per part; out of that shape and lse_out written once
// each, overlapping no part, no LSE nor each other.
int build_merge(std::span<const tensor> outs, std::span<const lse_tensor> lses, const tensor& out,
                const lse_tensor* lse_out, int threads) {
  if (outs.empty()) fail("outs is empty: at least one part is needed");
  if (lses.size() != outs.size()) fail("lses has ", lses.size(), " entries, outs ", outs.size(), ": one LSE per part");
  const tensor& first = outs[0];
  std::vector<input_range> inputs;
  for (std::size_t i = 0; i < outs.size(); ++i) {
    const std::string name = "outs[" + std::to_string(i) + "]";
    inputs.push_back({name, check_tensor(name.c_str(), outs[i])});
    if (i > 0) check_same_shape(name.c_str(), outs[i], "outs[0]", first);
  }
  const std::int64_t lse_sizes[3] = {first.batch, first.heads, first.seq};
  for (std::size_t i = 0; i < lses.size(); ++i) {
    const std::string name = "lses[" + std::to_string(i) + "]";
    inputs.push_back({name, check_lse(name.c_str(), lses[i], lse_sizes)});
  }
  const byte_range ro = check_tensor("out", out);
  check_same_shape("out", out, "outs[0]", first);
  check_no_self_overlap("out", out);
  check_no_alias("out", ro, inputs);
  if (lse_out) {
    const byte_range rl = check_lse("lse_out", *lse_out, lse_sizes);
    check_no_self_overlap("lse_out", *lse_out, lse_sizes);
    check_no_alias("lse_out", rl, inputs);
    if (overlaps(rl, ro)) fail("lse_out aliases out");
  }
  return check_threads("threads", threads);
}

}  // namespace

status detail::check_merge(std::span<const tensor> outs, std::span<const lse_tensor> lses, const tensor& out,
                           const lse_tensor* lse_out, int threads, int& resolved_threads) {
  try {
    resolved_threads = build_merge(outs, lses, out, lse_out, threads);
    return {};
  } catch (const failure& f) {
    return {"[merge_attention_states] " + f.message};
  }
}

status make_backward_params(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const lse_tensor& lse,
                            const tensor& d_out, const gradients& g, const spec& s, const options& opt,
                            attn_bwd_params& p) {
  try {
    attn_bwd_params built;
    build_backward(q, k, v, out, lse, d_out, g, s, opt, built);
    p = built;
    return {};
  } catch (const failure& f) {
    return {"[attention_backward] " + f.message};
  }
}

status make_decode_params(const tensor& q, const kv_cache& cache, std::span<const std::int64_t> seqs, const tensor& out,
                          const spec& s, const decode_options& opt, attn_decode_params& p) {
  try {
    attn_decode_params built;
    build_decode(q, cache, seqs, out, s, opt, built);
    p = built;
    return {};
  } catch (const failure& f) {
    return {"[attention_decode] " + f.message};
  }
}

status make_params(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s,
                   const options& opt, attn_params& p) {
  try {
    attn_params built;
    build(q, k, v, out, s, opt, built);
    p = built;
    return {};
  } catch (const failure& f) {
    return {"[attention] " + f.message};
  }
}

}  // namespace omniattn
