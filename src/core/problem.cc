// Problem descriptions, their parser and seeded data, shared by tests, CLI and benchmark.
#include "core/problem.h"

#include <algorithm>
#include <charconv>
#include <optional>
#include <random>
#include <sstream>
#include <vector>

#include "core/storage.h"
#include "omniattn/scores.h"

namespace omniattn {

std::string problem::describe() const {
  std::ostringstream os;
  if (!is_varlen()) os << "b=" << batch << ",lq=" << seq_q << ",lk=" << seq_k << ",";
  os << "hq=" << heads_q << ",hkv=" << heads_kv
     << ",d=" << dim_qk << ",dv=" << dim_v << ",dtype=" << dtype_name(type)
     << ",causal=" << (causal == causal_mode::none ? "none" : causal == causal_mode::top_left ? "top_left" : "bottom_right")
     << ",layout=" << (lay == layout::bshd ? "bshd" : "bhsd");
  if (is_varlen()) {
    os << ",varlen=";
    for (std::size_t s = 0; s < seqlens_q.size(); ++s) os << (s ? "/" : "") << seqlens_q[s] << ":" << seqlens_k[s];
  }
  if (out_f32) os << ",out=f32";
  if (scale) os << ",scale=" << *scale;
  os << ",seed=" << seed;
  if (!score_spec.empty()) os << ",score=" << score_spec;
  return os.str();
}

namespace {

bool parse_int(const std::string& s, std::int64_t& v) {
  const char* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(s.data(), end, v);
  return ec == std::errc() && ptr == end;
}

std::string problem_error(const std::string& key, const std::string& value, const char* rule) {
  return "[problem] " + key + "=" + value + ": " + rule;
}

// Items separated by commas outside parentheses ("score=alibi_slope(0.5, 2)" stays one item).
std::vector<std::string> split_items(const std::string& text) {
  std::vector<std::string> items(1);
  int depth = 0;
  for (char c : text) {
    depth += c == '(' ? 1 : c == ')' && depth > 0 ? -1 : 0;
    if (c == ',' && depth == 0) items.emplace_back();
    else items.back() += c;
  }
  return items;
}

}  // namespace

status set_problem_score(problem& p, const std::string& spec_text) {
  score_fn f;
  if (const std::string err = parse_score(spec_text, p.heads_q, f); !err.empty())
    return {problem_error("score", spec_text, err.c_str())};
  p.score = std::move(f);
  p.score_spec = p.score ? spec_text : std::string();
  return {};
}

status parse_problem(const std::string& text, problem& out) {
  problem p;
  bool lk_set = false, hkv_set = false, dv_set = false;
  std::optional<std::string> score_text;
  for (const std::string& item : split_items(text)) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    if (eq == std::string::npos) return {"[problem] '" + item + "' is not key=value"};
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    std::int64_t n = 0;
    std::int64_t* int_field = key == "b" ? &p.batch : key == "lq" ? &p.seq_q : key == "lk" ? &p.seq_k
                            : key == "hq" ? &p.heads_q : key == "hkv" ? &p.heads_kv : key == "d" ? &p.dim_qk
                            : key == "dv" ? &p.dim_v : nullptr;
    if (int_field) {
      if (!parse_int(value, n)) return {problem_error(key, value, "not an integer")};
      *int_field = n;
      lk_set |= key == "lk";
      hkv_set |= key == "hkv";
      dv_set |= key == "dv";
    } else if (key == "n") {
      if (!parse_int(value, n)) return {problem_error(key, value, "not an integer")};
      p.seq_q = p.seq_k = n;
      lk_set = true;
    } else if (key == "h") {
      if (!parse_int(value, n)) return {problem_error(key, value, "not an integer")};
      p.heads_q = p.heads_kv = n;
      hkv_set = true;
    } else if (key == "seed") {
      if (!parse_int(value, n) || n < 0) return {problem_error(key, value, "not a non-negative integer")};
      p.seed = static_cast<std::uint64_t>(n);
    } else if (key == "dtype") {
      if (value == "f32") p.type = dtype::f32;
      else if (value == "bf16") p.type = dtype::bf16;
      else if (value == "f16") p.type = dtype::f16;
      else return {problem_error(key, value, "expected f32, bf16 or f16")};
    } else if (key == "out") {
      if (value != "f32" && value != "input") return {problem_error(key, value, "expected f32 or input")};
      p.out_f32 = value == "f32";
    } else if (key == "causal") {
      if (value == "none" || value == "0") p.causal = causal_mode::none;
      else if (value == "top_left" || value == "tl") p.causal = causal_mode::top_left;
      else if (value == "bottom_right" || value == "br" || value == "1") p.causal = causal_mode::bottom_right;
      else return {problem_error(key, value, "expected none, top_left or bottom_right")};
    } else if (key == "layout") {
      if (value == "bshd") p.lay = layout::bshd;
      else if (value == "bhsd") p.lay = layout::bhsd;
      else return {problem_error(key, value, "expected bshd or bhsd")};
    } else if (key == "scale") {
      try {
        std::size_t used = 0;
        p.scale = std::stod(value, &used);
        if (used != value.size()) return {problem_error(key, value, "not a number")};
      } catch (...) {
        return {problem_error(key, value, "not a number")};
      }
    } else if (key == "varlen") {
      // varlen=lq0:lk0/lq1:lk1/...
      std::stringstream vs(value);
      std::string pair;
      while (std::getline(vs, pair, '/')) {
        const auto colon = pair.find(':');
        std::int64_t a = 0, c = 0;
        if (colon == std::string::npos || !parse_int(pair.substr(0, colon), a) || !parse_int(pair.substr(colon + 1), c) ||
            a < 0 || c < 0)
          return {problem_error(key, value, "expected lq:lk pairs of non-negative integers separated by '/'")};
        p.seqlens_q.push_back(a);
        p.seqlens_k.push_back(c);
      }
      if (p.seqlens_q.empty()) return {problem_error(key, value, "needs at least one lq:lk pair")};
    } else if (key == "score") {
      score_text = value;  // parsed once heads_q is known
    } else {
      return {"[problem] unknown key '" + key + "' (known: b n lq lk h hq hkv d dv dtype out causal layout scale varlen seed score)"};
    }
  }
  if (!lk_set) p.seq_k = p.seq_q;
  if (!hkv_set) p.heads_kv = p.heads_q;
  if (!dv_set) p.dim_v = p.dim_qk;
  if (p.is_varlen()) p.batch = static_cast<std::int64_t>(p.seqlens_q.size());
  if (score_text)
    if (const status st = set_problem_score(p, *score_text); !st) return st;
  out = p;
  return {};
}

namespace {

std::int64_t total_or(const std::vector<std::int64_t>& lens, std::int64_t fixed) {
  if (lens.empty()) return fixed;
  std::int64_t t = 0;
  for (std::int64_t l : lens) t += l;
  return t;
}

void fill(std::vector<std::uint8_t>& buf, dtype t, std::int64_t n, std::mt19937_64& rng, double range) {
  buf.assign(static_cast<std::size_t>(std::max<std::int64_t>(n, 1) * dtype_size(t)), 0);
  std::uniform_real_distribution<double> u(-range, range);
  for (std::int64_t i = 0; i < n; ++i) detail::store_element(buf.data(), t, i, u(rng));
}

tensor view(const problem& p, const std::vector<std::uint8_t>& buf, dtype t, std::int64_t seq, std::int64_t heads,
            std::int64_t dim) {
  void* data = const_cast<std::uint8_t*>(buf.data());
  const std::int64_t b = p.is_varlen() ? 1 : p.batch;
  return p.lay == layout::bshd ? make_bshd(data, t, b, seq, heads, dim) : make_bhsd(data, t, b, heads, seq, dim);
}

}  // namespace

problem_data::problem_data(const problem& p) : prob(p) {
  std::mt19937_64 rng(p.seed);
  const std::int64_t b = p.is_varlen() ? 1 : p.batch;
  const std::int64_t tq = total_or(p.seqlens_q, p.seq_q), tk = total_or(p.seqlens_k, p.seq_k);
  fill(q, p.type, b * tq * p.heads_q * p.dim_qk, rng, p.input_range);
  fill(k, p.type, b * tk * p.heads_kv * p.dim_qk, rng, p.input_range);
  fill(v, p.type, b * tk * p.heads_kv * p.dim_v, rng, p.input_range);
  const dtype ot = p.out_f32 ? dtype::f32 : p.type;
  out.assign(static_cast<std::size_t>(std::max<std::int64_t>(b * tq * p.heads_q * p.dim_v, 1) * dtype_size(ot)), 0);
  lse.assign(static_cast<std::size_t>(std::max<std::int64_t>(b * p.heads_q * tq, 1)), 0.0f);
  if (p.is_varlen()) {
    cu_q.assign(1, 0);
    cu_k.assign(1, 0);
    for (std::size_t s = 0; s < p.seqlens_q.size(); ++s) {
      cu_q.push_back(cu_q.back() + p.seqlens_q[s]);
      cu_k.push_back(cu_k.back() + p.seqlens_k[s]);
    }
    packed = {cu_q.data(), cu_k.data(), static_cast<std::int64_t>(p.seqlens_q.size())};
  }
}

tensor problem_data::q_view() const { return view(prob, q, prob.type, total_or(prob.seqlens_q, prob.seq_q), prob.heads_q, prob.dim_qk); }
tensor problem_data::k_view() const { return view(prob, k, prob.type, total_or(prob.seqlens_k, prob.seq_k), prob.heads_kv, prob.dim_qk); }
tensor problem_data::v_view() const { return view(prob, v, prob.type, total_or(prob.seqlens_k, prob.seq_k), prob.heads_kv, prob.dim_v); }
tensor problem_data::out_view() const {
  return view(prob, out, prob.out_f32 ? dtype::f32 : prob.type, total_or(prob.seqlens_q, prob.seq_q), prob.heads_q, prob.dim_v);
}
lse_tensor problem_data::lse_view() const {
  const std::int64_t tq = total_or(prob.seqlens_q, prob.seq_q);
  return make_lse(const_cast<float*>(lse.data()), prob.heads_q, tq);
}

options problem_data::make_options(backend b, int threads) const {
  options o;
  o.use = b;
  o.threads = threads;
  o.packed = prob.is_varlen() ? &packed : nullptr;
  return o;
}

double problem_data::out_at(std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) const {
  const tensor o = out_view();
  return detail::load_element(o.data, o.type, b * o.stride_batch + s * o.stride_seq + h * o.stride_head + d * o.stride_dim);
}

backward_data::backward_data(const problem& p, std::uint64_t seed) : prob(p) {
  std::mt19937_64 rng(seed);
  const std::int64_t b = p.is_varlen() ? 1 : p.batch;
  const std::int64_t tq = total_or(p.seqlens_q, p.seq_q), tk = total_or(p.seqlens_k, p.seq_k);
  // Drawn in the input dtype, so the oracle's f32 copy and a bf16 run see the same values.
  const dtype ot = p.out_f32 ? dtype::f32 : p.type;
  std::vector<std::uint8_t> drawn;
  const std::int64_t n = b * tq * p.heads_q * p.dim_v;
  fill(drawn, p.type, n, rng, 1.0);
  d_out.assign(static_cast<std::size_t>(std::max<std::int64_t>(n, 1) * dtype_size(ot)), 0);
  for (std::int64_t i = 0; i < n; ++i) detail::store_element(d_out.data(), ot, i, detail::load_element(drawn.data(), p.type, i));
  const auto zeros = [&](std::vector<std::uint8_t>& buf, std::int64_t n) {
    buf.assign(static_cast<std::size_t>(std::max<std::int64_t>(n, 1) * dtype_size(grad_type())), 0);
  };
  zeros(dq, b * tq * p.heads_q * p.dim_qk);
  zeros(dk, b * tk * p.heads_kv * p.dim_qk);
  zeros(dv, b * tk * p.heads_kv * p.dim_v);
  d_sink.assign(static_cast<std::size_t>(std::max<std::int64_t>(p.heads_q, 1)), 0.0f);
}

tensor backward_data::d_out_view() const {
  return view(prob, d_out, prob.out_f32 ? dtype::f32 : prob.type, total_or(prob.seqlens_q, prob.seq_q), prob.heads_q, prob.dim_v);
}
tensor backward_data::dq_view() const { return view(prob, dq, grad_type(), total_or(prob.seqlens_q, prob.seq_q), prob.heads_q, prob.dim_qk); }
tensor backward_data::dk_view() const { return view(prob, dk, grad_type(), total_or(prob.seqlens_k, prob.seq_k), prob.heads_kv, prob.dim_qk); }
tensor backward_data::dv_view() const { return view(prob, dv, grad_type(), total_or(prob.seqlens_k, prob.seq_k), prob.heads_kv, prob.dim_v); }

gradients backward_data::grads(bool with_sink) const {
  gradients g;
  g.dq = dq_view();
  g.dk = dk_view();
  g.dv = dv_view();
  g.d_sink_logits = with_sink ? const_cast<float*>(d_sink.data()) : nullptr;
  return g;
}

double backward_data::grad_at(int which, std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) const {
  const tensor t = which == 0 ? dq_view() : which == 1 ? dk_view() : dv_view();
  return detail::load_element(t.data, t.type, b * t.stride_batch + s * t.stride_seq + h * t.stride_head + d * t.stride_dim);
}

status run_backward_problem(const problem_data& fwd, backward_data& bwd, const spec& s, backend b, int threads) {
  const options o = fwd.make_options(b, threads);
  return attention_backward(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(), bwd.d_out_view(),
                            bwd.grads(s.sink_logits != nullptr), s, o);
}

status run_naive_backward(const problem_data& fwd, backward_data& bwd, const spec& s) {
  attn_bwd_params p;
  const options o = fwd.make_options(backend::reference, 1);
  if (status st = make_backward_params(fwd.q_view(), fwd.k_view(), fwd.v_view(), fwd.out_view(), fwd.lse_view(),
                                       bwd.d_out_view(), bwd.grads(s.sink_logits != nullptr), s, o, p);
      !st)
    return st;
  naive_attention_backward_f32(p);
  return {};
}

std::int64_t mask_area(const attn_params& p) {
  std::int64_t area = 0;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    if (!p.mask && !p.blocks) {
      // Causal alone: row i (position e.q_pos + i) sees the block's keys up to position i + offset.
      std::int64_t per_head = 0;
      for (std::int64_t i = 0; i < e.q_len; ++i) {
        if (p.causal == causal_mode::none) { per_head += e.k_len; continue; }
        const std::int64_t offset = p.causal == causal_mode::bottom_right ? e.k_total - e.q_total : 0;
        per_head += std::clamp<std::int64_t>(e.q_pos + i + offset + 1 - e.k_pos, 0, e.k_len);
      }
      area += per_head * p.heads_q;
      continue;
    }
    for (std::int64_t h = 0; h < p.heads_q; ++h)
      for (std::int64_t i = 0; i < e.q_len; ++i)
        for (std::int64_t j = 0; j < e.k_len; ++j)
          area += element_allowed(p, b, p.head0 + h, e.q_pos + i, e.k_pos + j, e.q_total, e.k_total);
  }
  return area;
}

status run_problem(problem_data& data, const spec& s, backend b, int threads) {
  options o = data.make_options(b, threads);
  const lse_tensor l = data.lse_view();
  if (data.prob.lse) o.lse = &l;
  return attention(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, o);
}

}  // namespace omniattn
