// The built-in workload table, template expansion, selection globs and the workload file reader.
#include "bench/workloads.h"

#include <charconv>
#include <fstream>
#include <sstream>

#include "core/storage.h"

namespace omniattn::bench {
namespace {

// One row of the built-in table; every field is text so the table reads like the workload file.
struct table_row {
  const char* name;
  const char* problem;
  const char* mask;
  const char* ns;
  const char* quick_ns;
  const char* quick_problem;
  const char* refs;
  const char* note;
};

// Shapes: the CAB patterns and the mask catalogue use B=1, H=8, D=64 f32 (one shape, so every pattern compares with
// dense and causal at the same N); the model rows use the models' own shapes and dtype.
constexpr const char* k_catalogue_shape = "b=1,n={n},h=8,d=64";
constexpr const char* k_catalogue_ns = "128,256,512,1024,2048,4096";
constexpr const char* k_catalogue_quick_ns = "256,1024";
constexpr const char* k_catalogue_refs = "mask/full,mask/causal";
// Document lengths of the packed-sequence rows, as weights of N (6 documents of uneven length).
#define OMNIATTN_BENCH_DOCS "5:3:1:4:2:1"

const table_row k_table[] = {
    // CAB (Comprehensive Attention Benchmark): its four attention patterns. Cross attention reads N keys with N/4
    // queries; causal cross aligns bottom-right (the last query sees the last key, as in chunked prefill).
    {"cab/self-noncausal", "b=1,n={n},h=8,d=64", "", "1024,4096", "1024", "", "", "CAB non-causal self attention"},
    {"cab/self-causal", "b=1,n={n},h=8,d=64,causal=br", "", "1024,4096", "1024", "", "", "CAB causal self attention"},
    {"cab/cross-noncausal", "b=1,lq={n/4},lk={n},h=8,d=64", "", "1024,4096", "1024", "", "",
     "CAB non-causal cross attention (N/4 queries, N keys)"},
    {"cab/cross-causal", "b=1,lq={n/4},lk={n},h=8,d=64,causal=br", "", "1024,4096", "1024", "", "",
     "CAB causal cross attention (N/4 queries, N keys, bottom-right)"},

    // The mask catalogue, one shape, swept over N; efficiency lengths against mask/full and mask/causal.
    {"mask/full", k_catalogue_shape, "", k_catalogue_ns, k_catalogue_quick_ns, "", "", "dense (no mask)"},
    {"mask/causal", "b=1,n={n},h=8,d=64,causal=br", "", k_catalogue_ns, k_catalogue_quick_ns, "", "mask/full", "causal"},
    {"mask/window", k_catalogue_shape, "window(256,0)", k_catalogue_ns, k_catalogue_quick_ns, "", k_catalogue_refs,
     "causal sliding window of 256 keys (Mistral / Longformer local)"},
    {"mask/sinks-window", k_catalogue_shape, "window(256,0) | sinks(4)", k_catalogue_ns, k_catalogue_quick_ns, "",
     k_catalogue_refs, "StreamingLLM: 4 attention sinks + a 256-key window"},
    {"mask/local", k_catalogue_shape, "window(128,128)", k_catalogue_ns, k_catalogue_quick_ns, "", k_catalogue_refs,
     "bidirectional local window of 128 keys each side"},
    {"mask/document", k_catalogue_shape, "causal & document({docs:" OMNIATTN_BENCH_DOCS "})", k_catalogue_ns,
     k_catalogue_quick_ns, "", k_catalogue_refs, "packed causal documents as a mask (6 documents, uneven lengths)"},
    {"mask/varlen", "b=1,h=8,d=64,causal=br,varlen={varlen:" OMNIATTN_BENCH_DOCS "}", "", k_catalogue_ns,
     k_catalogue_quick_ns, "", k_catalogue_refs, "the same documents as a varlen batch (cu_seqlens)"},
    {"mask/prefix-lm", k_catalogue_shape, "prefix_lm({n/4})", k_catalogue_ns, k_catalogue_quick_ns, "", k_catalogue_refs,
     "prefix-LM: bidirectional first N/4 tokens, causal after"},
    {"mask/block-causal", k_catalogue_shape, "block_causal(128)", k_catalogue_ns, k_catalogue_quick_ns, "",
     k_catalogue_refs, "block-causal, blocks of 128 tokens"},
    {"mask/dilated", k_catalogue_shape, "dilated(4)", k_catalogue_ns, k_catalogue_quick_ns, "", k_catalogue_refs,
     "dilated by 4 (sparse inside every tile: no tile can be skipped)"},
    {"mask/bigbird", k_catalogue_shape, "global_tokens(64) | window(64,64) | random_blocks(64,10,7)", k_catalogue_ns,
     k_catalogue_quick_ns, "", k_catalogue_refs, "BigBird block-sparse: 64 global tokens, local window, 10% random blocks"},

    // Neighborhood attention (NATTEN's rule: a window shifted, not clipped, at the borders), issue #5's shapes. One
    // layer shape for all of them, B=1, H=4, D=64: a DiNAT / NAT stage has 2-16 heads of 32 and video DiTs with
    // neighborhood attention use heads of 64-128; 64 is the common head size, and 4 heads keep each row under a
    // second for the naive baseline. Every row also runs the naive per-query baseline (naive_local.cc) on the same
    // threads, for the fused / naive speedup.
    {"neighborhood/1d-8192-k127", "b=1,n=8192,h=4,d=64", "neighborhood(grid=8192, kernel=127)", "", "", "", "",
     "1D neighborhood, 8192 tokens, kernel 127"},
    {"neighborhood/2d-64x64-k7", "b=1,n=4096,h=4,d=64", "neighborhood(grid=64x64, kernel=7x7)", "", "", "", "",
     "2D neighborhood over a 64x64 feature map, 7x7 kernel (NAT / DiNAT)"},
    {"neighborhood/2d-64x64-k13", "b=1,n=4096,h=4,d=64", "neighborhood(grid=64x64, kernel=13x13)", "", "", "", "",
     "2D neighborhood over a 64x64 feature map, 13x13 kernel"},
    {"neighborhood/3d-16x32x32-k3x7x7", "b=1,n=16384,h=4,d=64", "neighborhood(grid=16x32x32, kernel=3x7x7)", "", "", "",
     "", "3D neighborhood over 16 frames of 32x32 latents, 3x7x7 kernel (video)"},
    {"neighborhood/1d-8192-k127-bf16", "b=1,n=8192,h=4,d=64,dtype=bf16", "neighborhood(grid=8192, kernel=127)", "", "",
     "", "", "the 1D row in bf16"},
    {"neighborhood/2d-64x64-k7-bf16", "b=1,n=4096,h=4,d=64,dtype=bf16", "neighborhood(grid=64x64, kernel=7x7)", "", "",
     "", "", "the 2D 7x7 row in bf16"},
    {"neighborhood/2d-64x64-k13-bf16", "b=1,n=4096,h=4,d=64,dtype=bf16", "neighborhood(grid=64x64, kernel=13x13)", "",
     "", "", "", "the 2D 13x13 row in bf16"},
    {"neighborhood/3d-16x32x32-k3x7x7-bf16", "b=1,n=16384,h=4,d=64,dtype=bf16", "neighborhood(grid=16x32x32, kernel=3x7x7)",
     "", "", "", "", "the 3D row in bf16"},

    // Named model shapes (the models' own head counts, head dims and dtype); --quick scales heads down.
    {"model/llama3-8b-prefill-8k", "b=1,n=8192,hq=32,hkv=8,d=128,causal=br,dtype=bf16", "", "", "", "hq=4,hkv=1", "",
     "Llama-3-8B prefill of 8k tokens: GQA 32:8, D=128, causal, bf16"},
    {"model/mistral-7b-swa-8k", "b=1,n=8192,hq=32,hkv=8,d=128,dtype=bf16", "window(4096,0)", "", "", "hq=4,hkv=1", "",
     "Mistral-7B v0.1 prefill of 8k tokens: GQA 32:8, D=128, sliding window 4096, bf16"},
    {"model/vit-b16-224", "b=8,n=197,h=12,d=64", "", "", "", "b=2", "",
     "ViT-B/16 at 224 px: 196 patches + CLS, 12 heads, D=64, batch 8, f32"},
    {"model/video-dit", "b=1,n=4096,h=16,d=72,dtype=bf16", "", "", "", "h=2", "",
     "video DiT block: 16x16x16 latent patches (16 frames of 256 px, VAE /8, patch 2), DiT-XL width 16x72, bf16"},
    {"model/video-dit-frame-causal", "b=1,n=4096,h=16,d=72,dtype=bf16", "block_causal(256)", "", "", "h=2", "",
     "the video DiT with frame-causal attention (256 tokens per frame), autoregressive video generation"},
};

// The backward rows (attention_backward; FLOPs 2.5 x the forward's): patterns of the mask catalogue and the 2D
// neighborhood, one N each (the fused backward takes about 2.5x the forward's time and the OpenBLAS baseline
// materializes two Lq x Lk matrices), each at D 64 and 128 in f32 and bf16.
struct backward_pattern {
  const char* name;
  const char* problem;  // without d= and dtype=
  const char* mask;
  const char* ns;
  const char* quick_ns;
  const char* note;
};

const backward_pattern k_backward_patterns[] = {
    {"dense", "b=1,n={n},h=8", "", "2048", "512", "dense (no mask)"},
    {"causal", "b=1,n={n},h=8,causal=br", "", "2048", "512", "causal"},
    {"window", "b=1,n={n},h=8", "window(256,0)", "2048", "512", "causal sliding window of 256 keys"},
    {"document", "b=1,n={n},h=8", "causal & document({docs:" OMNIATTN_BENCH_DOCS "})", "2048", "512",
     "packed causal documents (6, uneven lengths)"},
    {"neighborhood-2d", "b=1,n={n},h=4", "neighborhood(grid={n/64}x64, kernel=7x7)", "4096", "1024",
     "2D neighborhood, 7x7 kernel over a (N/64)x64 map"},
};

bool parse_i64(std::string_view s, std::int64_t& v) {
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  return ec == std::errc() && ptr == s.data() + s.size();
}

std::vector<std::string> split_list(std::string_view text, char sep) {
  std::vector<std::string> out;
  std::string item;
  std::stringstream ss{std::string(text)};
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

// Splits n into parts proportional to the weights; the last part takes the rounding remainder.
bool split_by_weights(std::string_view spec, std::int64_t n, std::vector<std::int64_t>& lengths, std::string& error) {
  std::vector<std::int64_t> w;
  std::int64_t total = 0;
  for (const std::string& s : split_list(spec, ':')) {
    std::int64_t x = 0;
    if (!parse_i64(s, x) || x <= 0) {
      error = "weight '" + s + "' is not a positive integer";
      return false;
    }
    w.push_back(x);
    total += x;
  }
  if (w.empty()) {
    error = "needs at least one weight";
    return false;
  }
  lengths.clear();
  std::int64_t used = 0;
  for (std::size_t i = 0; i < w.size(); ++i) {
    const std::int64_t len = i + 1 == w.size() ? n - used : n * w[i] / total;
    lengths.push_back(len);
    used += len;
  }
  return true;
}

// A view for validation only: make_params checks shapes, strides and overlaps and never reads the data, so each
// operand gets its own made-up address range (`slot` 1..4, 1 TiB apart: larger than any allowed buffer).
tensor shape_view(const problem& p, int slot, std::int64_t seq, std::int64_t heads, std::int64_t dim, dtype t) {
  void* fake = reinterpret_cast<void*>(static_cast<std::uintptr_t>(slot) << 40);
  const std::int64_t b = p.is_varlen() ? 1 : p.batch;
  return p.lay == layout::bshd ? make_bshd(fake, t, b, seq, heads, dim) : make_bhsd(fake, t, b, heads, seq, dim);
}

std::string validate(const problem& p, const mask_expr& mask) {
  std::int64_t tq = p.seq_q, tk = p.seq_k;
  std::vector<std::int64_t> cu_q{0}, cu_k{0};
  if (p.is_varlen()) {
    for (std::size_t s = 0; s < p.seqlens_q.size(); ++s) {
      cu_q.push_back(cu_q.back() + p.seqlens_q[s]);
      cu_k.push_back(cu_k.back() + p.seqlens_k[s]);
    }
    tq = cu_q.back();
    tk = cu_k.back();
  }
  const long double bytes = static_cast<long double>(p.is_varlen() ? 1 : p.batch) * dtype_size(p.type) *
                            (static_cast<long double>(tq) * p.heads_q * (p.dim_qk + p.dim_v) +
                             static_cast<long double>(tk) * p.heads_kv * (p.dim_qk + p.dim_v));
  if (bytes > 16.0L * (1LL << 30)) return "[problem] its buffers would need more than the benchmark's 16 GiB limit";
  spec s;
  s.causal = p.causal;
  s.scale = p.scale;
  s.mask = mask;
  options o;
  const varlen packed{cu_q.data(), cu_k.data(), static_cast<std::int64_t>(p.seqlens_q.size())};
  if (p.is_varlen()) o.packed = &packed;
  const dtype out_t = p.out_f32 ? dtype::f32 : p.type;
  attn_params params;
  const status st = make_params(shape_view(p, 1, tq, p.heads_q, p.dim_qk, p.type),
                                shape_view(p, 2, tk, p.heads_kv, p.dim_qk, p.type),
                                shape_view(p, 3, tk, p.heads_kv, p.dim_v, p.type),
                                shape_view(p, 4, tq, p.heads_q, p.dim_v, out_t), s, o, params);
  return st.error;
}

}  // namespace

const std::vector<workload>& built_in_workloads() {
  static const std::vector<workload> table = [] {
    std::vector<workload> out;
    for (const table_row& r : k_table) {
      workload w;
      w.name = r.name;
      w.problem = r.problem;
      w.mask = r.mask;
      if (*r.ns) parse_int_list(r.ns, w.ns);
      if (*r.quick_ns) parse_int_list(r.quick_ns, w.quick_ns);
      w.quick_problem = r.quick_problem;
      w.refs = split_list(r.refs, ',');
      w.note = r.note;
      out.push_back(std::move(w));
    }
    // The backward group: each pattern at D 64 and 128, in f32 and bf16 (bf16 inputs, output and gradients).
    for (const backward_pattern& bp : k_backward_patterns)
      for (const char* d : {"64", "128"})
        for (const bool bf16 : {false, true}) {
          workload w;
          w.name = std::string("bwd/") + bp.name + "-d" + d + (bf16 ? "-bf16" : "");
          w.problem = std::string(bp.problem) + ",d=" + d + (bf16 ? ",dtype=bf16" : "");
          w.mask = bp.mask;
          parse_int_list(bp.ns, w.ns);
          parse_int_list(bp.quick_ns, w.quick_ns);
          w.note = std::string("backward: ") + bp.note + ", D=" + d + (bf16 ? ", bf16" : ", f32");
          w.op = op_kind::backward;
          out.push_back(std::move(w));
        }
    return out;
  }();
  return table;
}

bool parse_int_list(std::string_view text, std::vector<std::int64_t>& out) {
  std::vector<std::int64_t> v;
  for (const std::string& s : split_list(text, ',')) {
    std::int64_t x = 0;
    if (!parse_i64(s, x) || x <= 0) return false;
    v.push_back(x);
  }
  if (v.empty()) return false;
  out = std::move(v);
  return true;
}

bool expand_templates(std::string_view text, std::int64_t n, bool has_n, std::string& out, std::string& error) {
  std::string result;
  std::size_t pos = 0;
  while (pos < text.size()) {
    const std::size_t open = text.find('{', pos);
    if (open == std::string_view::npos) {
      result.append(text.substr(pos));
      break;
    }
    result.append(text.substr(pos, open - pos));
    const std::size_t close = text.find('}', open);
    if (close == std::string_view::npos) {
      error = "unterminated template at '" + std::string(text.substr(open)) + "'";
      return false;
    }
    const std::string_view body = text.substr(open + 1, close - open - 1);
    const std::string shown = "{" + std::string(body) + "}";
    if (body.substr(0, 1) == "n") {
      if (!has_n) {
        error = "template " + shown + " needs an N sweep (give the workload n values, e.g. --n 1024,2048)";
        return false;
      }
      std::int64_t value = n;
      if (body.size() > 1) {
        std::int64_t k = 0;
        if ((body[1] != '/' && body[1] != '*') || !parse_i64(body.substr(2), k) || k <= 0) {
          error = "template " + shown + ": expected {n}, {n/K} or {n*K} with K a positive integer";
          return false;
        }
        value = body[1] == '/' ? n / k : n * k;
      }
      result += std::to_string(value);
    } else if (body.substr(0, 5) == "docs:" || body.substr(0, 7) == "varlen:") {
      if (!has_n) {
        error = "template " + shown + " needs an N sweep";
        return false;
      }
      const bool docs = body[0] == 'd';
      std::vector<std::int64_t> lengths;
      std::string why;
      if (!split_by_weights(body.substr(docs ? 5 : 7), n, lengths, why)) {
        error = "template " + shown + ": " + why;
        return false;
      }
      std::int64_t offset = 0;
      if (docs) result += "0";
      for (std::size_t i = 0; i < lengths.size(); ++i) {
        offset += lengths[i];
        result += docs ? "," + std::to_string(offset)
                       : (i ? "/" : "") + std::to_string(lengths[i]) + ":" + std::to_string(lengths[i]);
      }
    } else {
      error = "unknown template " + shown + " (known: {n} {n/K} {n*K} {docs:W:W:...} {varlen:W:W:...})";
      return false;
    }
    pos = close + 1;
  }
  out = std::move(result);
  return true;
}

std::vector<std::int64_t> sweep_points(const workload& w, bool quick) {
  std::vector<std::int64_t> points = w.ns;
  if (quick && !w.quick_ns.empty()) points = w.quick_ns;
  else if (quick && !points.empty()) points.resize(1);
  return points;
}

bool instantiate(const workload& w, bool quick, const std::string& overrides, std::vector<instance>& out, std::string& error) {
  out.clear();
  std::vector<std::int64_t> points = sweep_points(w, quick);
  const bool has_n = !points.empty();
  if (!has_n) points.push_back(0);
  std::string problem_text = w.problem;
  if (quick && !w.quick_problem.empty()) problem_text += "," + w.quick_problem;
  if (!overrides.empty()) problem_text += "," + overrides;
  for (const std::int64_t n : points) {
    const std::string at = "workload '" + w.name + "'" + (has_n ? " at n=" + std::to_string(n) : "") + ": ";
    instance inst;
    inst.workload = w.name;
    std::string text, why;
    if (!expand_templates(problem_text, n, has_n, text, why)) {
      error = at + "problem: " + why;
      return false;
    }
    if (const status st = parse_problem(text, inst.prob); !st) {
      error = at + "problem '" + text + "': " + st.error;
      return false;
    }
    if (!expand_templates(w.mask, n, has_n, inst.mask_text, why)) {
      error = at + "mask: " + why;
      return false;
    }
    if (!inst.mask_text.empty()) {
      if (const std::string err = parse_mask(inst.mask_text, inst.mask); !err.empty()) {
        error = at + "mask '" + inst.mask_text + "': " + err;
        return false;
      }
    }
    if (const std::string err = validate(inst.prob, inst.mask); !err.empty()) {
      error = at + err;
      return false;
    }
    std::int64_t total_k = inst.prob.seq_k;
    if (inst.prob.is_varlen()) {
      total_k = 0;
      for (const std::int64_t l : inst.prob.seqlens_k) total_k += l;
    }
    inst.n = has_n ? n : total_k;
    out.push_back(std::move(inst));
  }
  return true;
}

bool glob_match(std::string_view pattern, std::string_view name) {
  std::size_t p = 0, s = 0, star_p = std::string_view::npos, star_s = 0;
  while (s < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star_p = p++;
      star_s = s;
      continue;
    }
    bool match = false;
    std::size_t next = p + 1;
    if (p < pattern.size() && pattern[p] == '?') {
      match = true;
    } else if (p < pattern.size() && pattern[p] == '[') {
      const std::size_t close = pattern.find(']', p + 1);
      if (close != std::string_view::npos) {
        match = pattern.substr(p + 1, close - p - 1).find(name[s]) != std::string_view::npos;
        next = close + 1;
      } else {
        match = name[s] == '[';
      }
    } else if (p < pattern.size()) {
      match = pattern[p] == name[s];
    }
    if (match) {
      p = next;
      ++s;
    } else if (star_p != std::string_view::npos) {
      p = star_p + 1;
      s = ++star_s;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

namespace {

bool string_field(const json& obj, const char* key, std::string& out, const std::string& at, std::string& error) {
  const json* v = obj.find(key);
  if (!v) return true;
  if (!v->is_string()) {
    error = at + "\"" + key + "\" must be a string";
    return false;
  }
  out = v->as_string();
  return true;
}

bool int_list_field(const json& obj, const char* key, std::vector<std::int64_t>& out, const std::string& at,
                    std::string& error) {
  const json* v = obj.find(key);
  if (!v) return true;
  const std::string rule = at + "\"" + key + "\" must be a positive integer or an array of them";
  std::vector<json> items = v->is_array() ? v->items() : std::vector<json>{*v};
  out.clear();
  for (const json& x : items) {
    if (!x.is_number() || x.as_number() < 1 || x.as_number() != static_cast<double>(static_cast<std::int64_t>(x.as_number()))) {
      error = rule;
      return false;
    }
    out.push_back(static_cast<std::int64_t>(x.as_number()));
  }
  if (out.empty()) {
    error = rule;
    return false;
  }
  return true;
}

}  // namespace

bool parse_workload_json(const json& doc, const std::string& source, std::vector<workload>& out, std::string& error) {
  const json* list = &doc;
  if (doc.is_object()) {
    for (const auto& [key, value] : doc.members())
      if (key != "workloads") {
        error = source + ": unknown top-level key \"" + key + "\" (expected \"workloads\")";
        return false;
      }
    list = doc.find("workloads");
    if (!list) {
      error = source + ": missing \"workloads\"";
      return false;
    }
  }
  if (!list->is_array()) {
    error = source + ": \"workloads\" must be an array of workload objects";
    return false;
  }
  std::vector<workload> result;
  for (std::size_t i = 0; i < list->items().size(); ++i) {
    const json& item = list->items()[i];
    std::string at = source + ": workload " + std::to_string(i) + ": ";
    if (!item.is_object()) {
      error = at + "must be an object";
      return false;
    }
    workload w;
    w.origin = source;
    if (!string_field(item, "name", w.name, at, error)) return false;
    if (w.name.empty()) {
      error = at + "needs a non-empty \"name\"";
      return false;
    }
    at = source + ": workload '" + w.name + "': ";
    for (const auto& [key, value] : item.members()) {
      static const char* const known[] = {"name", "problem", "mask", "n", "quick_n", "quick_problem", "refs", "note", "op"};
      bool ok = false;
      for (const char* k : known) ok = ok || key == k;
      if (!ok) {
        error = at + "unknown key \"" + key + "\" (known: name problem mask n quick_n quick_problem refs note op)";
        return false;
      }
    }
    std::string op_text;
    if (!string_field(item, "op", op_text, at, error)) return false;
    if (!op_text.empty() && !parse_op(op_text, w.op)) {
      error = at + "\"op\" must be \"forward\" or \"backward\", not \"" + op_text + "\"";
      return false;
    }
    if (!item.find("problem")) {
      error = at + "needs \"problem\" (a problem string such as \"b=1,n={n},h=8,d=128,causal=br\")";
      return false;
    }
    if (!string_field(item, "problem", w.problem, at, error) || !string_field(item, "mask", w.mask, at, error) ||
        !string_field(item, "quick_problem", w.quick_problem, at, error) || !string_field(item, "note", w.note, at, error) ||
        !int_list_field(item, "n", w.ns, at, error) || !int_list_field(item, "quick_n", w.quick_ns, at, error))
      return false;
    if (const json* refs = item.find("refs")) {
      const json list_of = refs->is_array() ? *refs : json::array();
      if (!refs->is_array()) {
        error = at + "\"refs\" must be an array of workload names";
        return false;
      }
      for (const json& r : list_of.items()) {
        if (!r.is_string()) {
          error = at + "\"refs\" must be an array of workload names";
          return false;
        }
        w.refs.push_back(r.as_string());
      }
    }
    for (const workload& prev : result)
      if (prev.name == w.name) {
        error = at + "the name is used twice";
        return false;
      }
    result.push_back(std::move(w));
  }
  out.insert(out.end(), result.begin(), result.end());
  return true;
}

bool read_workload_file(const std::string& path, std::vector<workload>& out, std::string& error) {
  std::ifstream f(path);
  if (!f) {
    error = "--workloads " + path + ": cannot open the file";
    return false;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  json doc;
  std::string why;
  if (!json::parse(ss.str(), doc, why)) {
    error = "--workloads " + path + ": " + why;
    return false;
  }
  return parse_workload_json(doc, "--workloads " + path, out, error);
}

}  // namespace omniattn::bench
