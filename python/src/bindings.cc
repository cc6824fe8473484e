// The omniattn Python extension (_omniattn): a thin translation layer, no math.
//
// Operands arrive either as objects exporting the buffer protocol (numpy arrays: pointer, byte strides and format
// straight from the buffer, converted to element strides, never copied) or as plain descriptions
// (data_ptr, dtype name, shape, element strides) that the Python layer makes from torch tensors, so the extension
// never links torch. They become omniattn::tensor views, the call's spec and options are built from plain Python
// values, and omniattn::attention (or omniattn::attention_backward, given d_out and the gradient buffers; or
// omniattn::merge_attention_states over lists of outs and LSEs; or omniattn::attention_decode on a KVCache, a bound
// omniattn::kv_cache) runs with the GIL released. A status error becomes ValueError (TypeError when it is about a dtype) carrying the C++ message
// unchanged.
//
// Masks arrive as a small expression tree of tuples (python/omniattn/masks.py lowers its objects to it): built-in
// patterns map onto omniattn::mask_expr's closed forms, and a ("table", array, name) leaf, the result of evaluating
// a Python predicate or a boolean array once, becomes a predicate reading that table. Scores arrive as a list of
// stages: the built-in omniattn::scores modifiers ("alibi", "softcap", "temperature", "key_bias") and ("affine", a, c),
// a[b,h,i,j] * s + c[b,h,i,j] read from tables (a Python score function evaluated once; its derivative, a, is the
// table too, so it runs backward), ("reweight", weights,
// keys_per_head), ("bias", float32 4-d array: omniattn::scores::bias over the array, no copy) and ("spec", text), a
// score spec string parsed by omniattn::parse_score, chained in order.
#ifdef OMNIATTN_HAVE_MPI
#include <mpi.h>
#endif
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#ifdef OMNIATTN_HAVE_MPI
#include "omniattn/dist.h"
#endif
#include "omniattn/omniattn.h"

namespace py = pybind11;
using namespace py::literals;

namespace {

using omniattn::causal_mode;
using omniattn::dtype;

// ---------------------------------------------------------------------------------------------------------------
// Strided arrays

enum class elem : std::uint8_t { f32, bf16, f16, f64, boolean, u8, u16, i64, other };

const char* elem_name(elem e) {
  switch (e) {
    case elem::f32: return "float32";
    case elem::bf16: return "bfloat16";
    case elem::f16: return "float16";
    case elem::f64: return "float64";
    case elem::boolean: return "bool";
    case elem::u8: return "uint8";
    case elem::u16: return "uint16";
    case elem::i64: return "int64";
    case elem::other: break;
  }
  return "unsupported";
}

// Names used by the Python layer's torch descriptions.
elem elem_from_name(const std::string& s) {
  if (s == "f32") return elem::f32;
  if (s == "bf16") return elem::bf16;
  if (s == "f16") return elem::f16;
  if (s == "f64") return elem::f64;
  if (s == "bool") return elem::boolean;
  if (s == "u8") return elem::u8;
  if (s == "i64") return elem::i64;
  return elem::other;
}

// A buffer-protocol format ("f", "<e", "?", ...) on this little-endian host.
elem elem_from_format(std::string f, py::ssize_t itemsize) {
  if (!f.empty() && (f[0] == '@' || f[0] == '=' || f[0] == '<')) f.erase(0, 1);
  if (f.size() != 1) return elem::other;  // big-endian ('>', '!'), structured and other formats
  switch (f[0]) {
    case 'f': return itemsize == 4 ? elem::f32 : elem::other;
    case 'd': return itemsize == 8 ? elem::f64 : elem::other;
    case 'e': return itemsize == 2 ? elem::f16 : elem::other;
    case '?': return itemsize == 1 ? elem::boolean : elem::other;
    case 'B': return itemsize == 1 ? elem::u8 : elem::other;
    case 'H': return itemsize == 2 ? elem::u16 : elem::other;
    case 'l':
    case 'q': return itemsize == 8 ? elem::i64 : elem::other;
    default: return elem::other;
  }
}

struct array {
  void* data = nullptr;
  elem type = elem::other;
  std::string format;                          // as received, for messages
  std::vector<std::int64_t> shape, strides;  // strides in elements
};

// Buffer views held until the C++ side is done reading: a held view also keeps numpy from reallocating the data.
struct buffers {
  std::deque<py::buffer_info> views;
};

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>(); }

std::string shape_str(const std::vector<std::int64_t>& v) {
  std::string s = "(";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// Describes obj without copying it. as_bf16: uint16 buffers hold bf16 bits (numpy has no bfloat16).
array describe(py::handle obj, const std::string& name, bool writable, bool as_bf16, buffers& keep) {
  array a;
  if (py::isinstance<py::tuple>(obj)) {  // (data_ptr, dtype name, shape, element strides) from a torch tensor
    const auto t = py::reinterpret_borrow<py::tuple>(obj);
    if (t.size() != 4) throw py::value_error("omniattn: " + name + ": a tensor description is (data_ptr, dtype, shape, strides)");
    a.data = reinterpret_cast<void*>(t[0].cast<std::uintptr_t>());
    a.format = t[1].cast<std::string>();
    a.type = elem_from_name(a.format);
    a.shape = t[2].cast<std::vector<std::int64_t>>();
    a.strides = t[3].cast<std::vector<std::int64_t>>();
    if (a.shape.size() != a.strides.size())
      throw py::value_error("omniattn: " + name + ": shape and strides differ in length");
    return a;
  }
  if (!PyObject_CheckBuffer(obj.ptr()))
    throw py::type_error("omniattn: " + name + " must be a numpy array or a torch tensor, not " + type_name(obj));
  const auto buf = py::reinterpret_borrow<py::buffer>(obj);
  try {
    keep.views.push_back(buf.request(writable));
  } catch (py::error_already_set& e) {
    if (writable && (e.matches(PyExc_BufferError) || e.matches(PyExc_ValueError)))  // numpy raises ValueError
      throw py::value_error("omniattn: " + name + " is read-only; the output must be writable");
    throw;
  }
  const py::buffer_info& info = keep.views.back();
  a.data = info.ptr;
  a.format = info.format;
  a.type = elem_from_format(info.format, info.itemsize);
  if (as_bf16 && a.type == elem::u16) a.type = elem::bf16;
  for (py::ssize_t d = 0; d < info.ndim; ++d) {
    if (info.strides[d] % info.itemsize != 0)
      throw py::value_error("omniattn: " + name + " has a stride of " + std::to_string(info.strides[d]) +
                            " bytes along axis " + std::to_string(d) + ", not a multiple of its " +
                            std::to_string(info.itemsize) + "-byte elements");
    a.shape.push_back(info.shape[d]);
    a.strides.push_back(info.strides[d] / info.itemsize);
  }
  return a;
}

std::string format_desc(const array& a) {
  return a.type == elem::other ? "format '" + a.format + "'" : std::string(elem_name(a.type));
}

bool is_bhsd(const std::string& layout) {
  if (layout != "bshd" && layout != "bhsd")
    throw py::value_error("omniattn: layout must be 'bshd' or 'bhsd', got '" + layout + "'");
  return layout == "bhsd";
}

// An attention operand: 4-d [batch, seq, heads, dim] ("bshd") or [batch, heads, seq, dim] ("bhsd"); 3-d for varlen
// ([total, heads, dim] or [heads, total, dim]) with batch 1.
omniattn::tensor to_tensor(const std::string& name, const array& a, bool bhsd) {
  omniattn::tensor t;
  switch (a.type) {
    case elem::f32: t.type = dtype::f32; break;
    case elem::bf16: t.type = dtype::bf16; break;
    case elem::f16: t.type = dtype::f16; break;
    case elem::f64: t.type = dtype::f64; break;  // the reference backend's (the C++ selection says so)
    default:
      throw py::type_error("omniattn: " + name + " has dtype " + format_desc(a) +
                           "; supported: float32, float16, bfloat16 (torch.bfloat16, or numpy uint16 holding bf16 "
                           "bits with dtype='bf16'), float64 (reference backend)");
  }
  t.data = a.data;
  const auto& s = a.shape;
  const auto& st = a.strides;
  if (s.size() == 4) {
    const int seq = bhsd ? 2 : 1, head = bhsd ? 1 : 2;
    t.batch = s[0], t.seq = s[seq], t.heads = s[head], t.dim = s[3];
    t.stride_batch = st[0], t.stride_seq = st[seq], t.stride_head = st[head], t.stride_dim = st[3];
  } else if (s.size() == 3) {
    const int seq = bhsd ? 1 : 0, head = bhsd ? 0 : 1;
    t.batch = 1, t.seq = s[seq], t.heads = s[head], t.dim = s[2];
    t.stride_batch = 0, t.stride_seq = st[seq], t.stride_head = st[head], t.stride_dim = st[2];
  } else {
    throw py::value_error("omniattn: " + name + " must be 4-d (3-d with cu_seqlens), got shape " + shape_str(s));
  }
  return t;
}

// A log-sum-exp: float32 [batch, heads, seq_q], or [heads, total_q] for varlen.
omniattn::lse_tensor to_lse(const std::string& name, const array& a) {
  if (a.type != elem::f32) throw py::type_error("omniattn: " + name + " has dtype " + format_desc(a) + ", expected float32");
  omniattn::lse_tensor l;
  l.data = static_cast<float*>(a.data);
  if (a.shape.size() == 3) {
    l.stride_batch = a.strides[0], l.stride_head = a.strides[1], l.stride_seq = a.strides[2];
  } else if (a.shape.size() == 2) {
    l.stride_batch = 0, l.stride_head = a.strides[0], l.stride_seq = a.strides[1];
  } else {
    throw py::value_error("omniattn: " + name + " must be [batch, heads, seq_q] (or [heads, total_q] with cu_seqlens)");
  }
  return l;
}

// ---------------------------------------------------------------------------------------------------------------
// Tables: [batch, heads, seq_q, seq_k] views (broadcast dims have stride 0) read by masks and scores.

struct table4 {
  const void* data = nullptr;
  bool f64 = true;
  std::int64_t s[4] = {};

  explicit operator bool() const { return data != nullptr; }
  std::int64_t offset(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    return b * s[0] + h * s[1] + i * s[2] + j * s[3];
  }
  double at(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    const std::int64_t o = offset(b, h, i, j);
    return f64 ? static_cast<const double*>(data)[o] : static_cast<const float*>(data)[o];
  }
};

using shape4 = std::array<std::int64_t, 4>;

table4 make_table(const std::string& name, const array& a, bool boolean, shape4& shape) {
  if (a.shape.size() != 4)
    throw py::value_error("omniattn: " + name + " table must be 4-d [batch, heads, seq_q, seq_k], got shape " + shape_str(a.shape));
  for (int d = 0; d < 4; ++d) {
    if (a.strides[static_cast<std::size_t>(d)] < 0) throw py::value_error("omniattn: " + name + " table has a negative stride");
    shape[static_cast<std::size_t>(d)] = a.shape[static_cast<std::size_t>(d)];
  }
  table4 t;
  if (boolean) {
    if (a.type != elem::boolean && a.type != elem::u8)
      throw py::type_error("omniattn: " + name + " table has dtype " + format_desc(a) + ", expected bool");
  } else {
    if (a.type != elem::f64 && a.type != elem::f32)
      throw py::type_error("omniattn: " + name + " table has dtype " + format_desc(a) + ", expected float64 or float32");
    t.f64 = a.type == elem::f64;
  }
  t.data = a.data;
  for (int d = 0; d < 4; ++d) t.s[d] = shape[static_cast<std::size_t>(d)] == 1 ? 0 : a.strides[static_cast<std::size_t>(d)];
  return t;
}

// A table dimension must match the call's or be 1 (broadcast: make_table gave it stride 0).
void check_table_shape(const std::string& name, const shape4& got, const shape4& want) {
  bool ok = true;
  for (std::size_t d = 0; d < 4; ++d) ok = ok && (got[d] == want[d] || got[d] == 1);
  if (!ok)
    throw py::value_error("omniattn: " + name + " table has shape " + shape_str({got.begin(), got.end()}) +
                          ", the call needs [batch, heads_q, seq_q, seq_k] = " + shape_str({want.begin(), want.end()}));
}

causal_mode parse_causal(const std::string& s) {
  if (s == "none") return causal_mode::none;
  if (s == "top_left") return causal_mode::top_left;
  if (s == "bottom_right") return causal_mode::bottom_right;
  throw py::value_error("omniattn: causal must be 'none', 'top_left' or 'bottom_right', got '" + s + "'");
}

// ---------------------------------------------------------------------------------------------------------------
// Masks: an omniattn::mask_expr built once from the Python tree; owns the views of its table leaves.

struct py_mask {
  omniattn::mask_expr expr;
  buffers keep;
  std::vector<std::pair<std::string, shape4>> tables;  // name and shape of every table leaf

  void check_shapes(const shape4& want) const {
    for (const auto& [name, shape] : tables) check_table_shape("mask '" + name + "'", shape, want);
  }
};

std::int64_t int_at(const py::tuple& t, std::size_t i) { return t[i].cast<std::int64_t>(); }

omniattn::mask_expr build_mask(py::handle node, py_mask& m) {
  if (!py::isinstance<py::tuple>(node) || py::len(node) == 0)
    throw py::type_error("omniattn: a mask node is a tuple (op, args...), got " + type_name(node));
  const auto t = py::reinterpret_borrow<py::tuple>(node);
  const std::string op = t[0].cast<std::string>();
  const auto need = [&](std::size_t n) {
    if (t.size() != n) throw py::value_error("omniattn: mask node '" + op + "' takes " + std::to_string(n - 1) + " arguments");
  };
  using omniattn::mask_expr;
  if (op == "full") return need(1), mask_expr::full();
  if (op == "causal") return need(2), mask_expr::causal(parse_causal(t[1].cast<std::string>()));
  if (op == "window") return need(4), mask_expr::window(int_at(t, 1), int_at(t, 2), parse_causal(t[3].cast<std::string>()));
  if (op == "sinks") return need(2), mask_expr::sinks(int_at(t, 1));
  if (op == "prefix_lm") return need(3), mask_expr::prefix_lm(int_at(t, 1), parse_causal(t[2].cast<std::string>()));
  if (op == "document") return need(2), mask_expr::document(t[1].cast<std::vector<std::int64_t>>());
  if (op == "block_causal") return need(2), mask_expr::block_causal(int_at(t, 1));
  if (op == "dilated") return need(2), mask_expr::dilated(int_at(t, 1));
  if (op == "segments") return need(2), mask_expr::segments(t[1].cast<std::vector<std::int64_t>>());
  if (op == "neighborhood")  // ("neighborhood", grid, kernel, dilation, stride, causal), NATTEN's argument order
    return need(6), mask_expr::neighborhood(t[1].cast<std::vector<std::int64_t>>(), t[2].cast<std::vector<std::int64_t>>(),
                                            t[3].cast<std::vector<std::int64_t>>(), t[5].cast<std::vector<bool>>(),
                                            t[4].cast<std::vector<std::int64_t>>());
  if (op == "halo")
    return need(4), mask_expr::halo(t[1].cast<std::vector<std::int64_t>>(), t[2].cast<std::vector<std::int64_t>>(),
                                    t[3].cast<std::vector<std::int64_t>>());
  if (op == "spec") {  // a spec string, parsed by the library (errors name the position)
    need(2);
    mask_expr parsed;
    if (const std::string err = omniattn::parse_mask(t[1].cast<std::string>(), parsed); !err.empty()) throw py::value_error(err);
    return parsed;
  }
  if (op == "and") return need(3), build_mask(t[1], m) & build_mask(t[2], m);
  if (op == "or") return need(3), build_mask(t[1], m) | build_mask(t[2], m);
  if (op == "not") return need(2), ~build_mask(t[1], m);
  if (op == "table") {
    need(3);
    const std::string name = t[2].cast<std::string>();
    shape4 shape{};
    const table4 tab = make_table("mask '" + name + "'", describe(t[1], "mask table", false, false, m.keep), true, shape);
    m.tables.emplace_back(name, shape);
    // A dense mask reading the array in place (m.keep holds the buffer view as long as the mask lives): its rows are
    // read 8 bytes at a time and its tiles classified exactly, and only tables with a batch / head axis are per head.
    return mask_expr::dense(static_cast<const std::uint8_t*>(tab.data), shape, {tab.s[0], tab.s[1], tab.s[2], tab.s[3]}, name);
  }
  throw py::value_error("omniattn: unknown mask node '" + op + "'");
}

std::unique_ptr<py_mask> make_mask(py::handle tree) {
  auto m = std::make_unique<py_mask>();
  m->expr = build_mask(tree, *m);
  return m;
}

// ---------------------------------------------------------------------------------------------------------------
// Scores: a chain of stages, each a built-in omniattn::scores modifier or a table-driven affine map.

struct affine_table {  // a[b, h, i, j] * s + c[b, h, i, j] (absent a = 1, absent c = 0)
  table4 a, c;
  double operator()(double s, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    const double av = a ? a.at(b, h, i, j) : 1.0, cv = c ? c.at(b, h, i, j) : 0.0;
    return av == 0.0 ? cv : av * s + cv;  // a = 0 keeps a masking c = -inf exact
  }
};

struct affine_slope {  // d (a s + c) / d s = a: the derivative attention_backward multiplies by
  table4 a;
  double operator()(double, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    return a ? a.at(b, h, i, j) : 1.0;
  }
};

std::vector<double> finite_values(py::handle obj, const std::string& what, bool positive) {
  auto v = obj.cast<std::vector<double>>();
  if (v.empty()) throw py::value_error("omniattn: " + what + " is empty");
  for (double x : v)
    if (!std::isfinite(x) || (positive && !(x > 0)))
      throw py::value_error("omniattn: " + what + " must be finite" + (positive ? " and > 0" : ""));
  return v;
}

// shapes: every table's (checked against the call); bias_shapes: every dense bias stage's (sizes d_bias).
omniattn::score_fn make_score(py::handle stages, buffers& keep, std::vector<shape4>& shapes, std::vector<shape4>& bias_shapes,
                              std::int64_t heads) {
  namespace sc = omniattn::scores;
  omniattn::score_fn chain;
  for (py::handle item : stages) {
    const auto t = item.cast<py::tuple>();
    const std::string kind = t[0].cast<std::string>();
    omniattn::score_fn f;
    if (kind == "softcap" && t.size() == 2) {
      const double cap = t[1].cast<double>();
      if (!(cap > 0) || !std::isfinite(cap))
        throw py::value_error("omniattn: softcap cap must be a finite number > 0, got " + py::repr(t[1]).cast<std::string>());
      f = sc::softcap(cap);
    } else if (kind == "alibi" && t.size() == 3) {
      f = sc::alibi(finite_values(t[1], "alibi slopes", false), t[2].cast<std::int64_t>());
    } else if (kind == "temperature" && t.size() == 2) {
      f = sc::temperature(finite_values(t[1], "temperature", true));
    } else if (kind == "key_bias" && t.size() == 2) {
      f = sc::key_bias(t[1].cast<std::vector<double>>());
    } else if (kind == "affine" && t.size() == 3) {
      affine_table at;
      for (int x = 0; x < 2; ++x) {
        py::handle tab = t[static_cast<std::size_t>(1 + x)];
        if (tab.is_none()) continue;
        shape4 shape{};
        (x == 0 ? at.a : at.c) = make_table("score", describe(tab, "score table", false, false, keep), false, shape);
        shapes.push_back(shape);
      }
      f = sc::differentiable(at, affine_slope{at.a});
    } else if (kind == "spec" && t.size() == 2) {  // a spec string, parsed by the library (errors name the position)
      if (const std::string err = omniattn::parse_score(t[1].cast<std::string>(), heads, f); !err.empty())
        throw py::value_error(err);
      if (!f) continue;  // "none"
    } else if (kind == "reweight" && t.size() == 3) {  // std::invalid_argument from the constructor -> ValueError
      f = sc::reweight(t[1].cast<std::vector<double>>(), t[2].cast<std::int64_t>());
    } else if (kind == "bias" && t.size() == 2) {  // a float32 4-d view, borrowed for the call (held by `keep`)
      const array a = describe(t[1], "score bias", false, false, keep);
      if (a.type != elem::f32 || a.shape.size() != 4)
        throw py::type_error("omniattn: a score bias stage is a 4-d float32 array, got " + format_desc(a));
      f = sc::bias(static_cast<const float*>(a.data), {a.shape[0], a.shape[1], a.shape[2], a.shape[3]},
                   {a.strides[0], a.strides[1], a.strides[2], a.strides[3]});
      bias_shapes.push_back({a.shape[0], a.shape[1], a.shape[2], a.shape[3]});
    } else {
      throw py::value_error("omniattn: unknown score stage '" + kind + "'");
    }
    chain = chain ? sc::then(std::move(chain), std::move(f)) : std::move(f);
  }
  return chain;
}

// ---------------------------------------------------------------------------------------------------------------
// Errors

[[noreturn]] void raise_status(const std::string& error) {
  // "[attention] k.type bf16 != q.type f32" (or "[attention_backward] ..."): a dtype problem, TypeError; everything
  // else is a ValueError.
  for (const std::string prefix : {"[attention] ", "[attention_backward] ", "[attention_decode] ", "[merge_attention_states] ",
                                   "[linear_attention] ", "[reference_linear_attention] ", "[linear_attention_backward] ",
                                   "[reference_linear_attention_backward] "}) {
    if (error.rfind(prefix, 0) != 0) continue;
    const std::size_t end = error.find(' ', prefix.size());
    const std::string subject = error.substr(prefix.size(), end == std::string::npos ? std::string::npos : end - prefix.size());
    if (subject.size() > 5 && subject.compare(subject.size() - 5, 5, ".type") == 0) throw py::type_error(error);
  }
  throw py::value_error(error);
}

omniattn::backend parse_backend(const std::string& s) {
  if (s == "auto") return omniattn::backend::automatic;
  if (s == "reference") return omniattn::backend::reference;
  if (s == "cpu") return omniattn::backend::cpu;
  throw py::value_error("omniattn: backend must be 'auto', 'cpu' or 'reference', got '" + s + "'");
}

// Cumulative sequence lengths as int64: a 1-d array (or sequence) of integers. Other dtypes are refused rather than
// cast, since forcecast truncates floats (cu_seqlens=[0, 4.7] would silently become [0, 4]).
py::array_t<std::int64_t> cu_seqlens_array(py::handle obj, const std::string& name) {
  const py::array any = py::array::ensure(obj);
  if (!any) throw py::type_error("omniattn: " + name + " must be a 1-d integer array, not " + type_name(obj));
  const char kind = any.dtype().kind();
  if (kind != 'i' && kind != 'u' && any.size() != 0)  // [] is float64 to numpy, and has nothing to truncate
    throw py::type_error("omniattn: " + name + " has dtype " + py::str(any.dtype()).cast<std::string>() +
                         "; cumulative sequence lengths must be integers (e.g. int32 or int64)");
  if (any.ndim() != 1)
    throw py::value_error("omniattn: " + name + " must be 1-d, got " + std::to_string(any.ndim()) + " dimensions");
  return py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(any);
}

std::vector<std::int64_t> cu_seqlens(py::handle obj, const char* name) {
  const py::array_t<std::int64_t> a = cu_seqlens_array(obj, name);
  return {a.data(), a.data() + a.size()};
}

// ---------------------------------------------------------------------------------------------------------------
// The spec's plain values, shared by attention and decode calls.

// RoPE from the dict the Python layer normalized (theta, rotary_dim, interleaved, pos_q, pos_k, sections); the id
// arrays are copied into pos_q / pos_k, which rs then points into.
void rope_from_dict(py::handle rope, omniattn::rope_spec& rs, std::vector<std::int64_t>& pos_q, std::vector<std::int64_t>& pos_k) {
  const auto d = rope.cast<py::dict>();
  rs.theta = d["theta"].cast<double>();
  rs.rotary_dim = d["rotary_dim"].cast<std::int64_t>();
  rs.interleaved = d["interleaved"].cast<bool>();
  rs.sections = d["sections"].cast<std::vector<std::int64_t>>();
  if (!d["pos_q"].is_none()) pos_q = d["pos_q"].cast<std::vector<std::int64_t>>();
  if (!d["pos_k"].is_none()) pos_k = d["pos_k"].cast<std::vector<std::int64_t>>();
  rs.pos_q = pos_q.empty() ? nullptr : pos_q.data();
  rs.pos_k = pos_k.empty() ? nullptr : pos_k.data();
}

std::int64_t rope_axes(const omniattn::rope_spec& rs) {
  return rs.sections.empty() ? 1 : static_cast<std::int64_t>(rs.sections.size());
}

// A spec and the storage its pointers read (sink logits, RoPE and its ids): made in place, never moved.
struct spec_values {
  omniattn::spec s;
  py::array_t<float, py::array::c_style | py::array::forcecast> sinks;
  omniattn::rope_spec rope;
  std::vector<std::int64_t> pos_q, pos_k;

  spec_values() = default;
  spec_values(const spec_values&) = delete;
  spec_values& operator=(const spec_values&) = delete;
};

// scale, causal, sink logits and RoPE of a call with heads_q query heads; the RoPE ids are sized [axes, batches, seq]
// (seq_k < 0: pos_k is not sized here, the library's rules decide about it).
void fill_spec(spec_values& sv, std::optional<double> scale, const std::string& causal, py::handle sinks, py::handle rope,
               std::int64_t heads_q, std::int64_t batches, std::int64_t seq_q, std::int64_t seq_k) {
  omniattn::spec& s = sv.s;
  s.scale = scale;
  s.causal = parse_causal(causal);
  // Sink logits: float32, one per query head (the C++ side checks they are finite).
  if (!sinks.is_none()) {
    sv.sinks = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(sinks);
    if (!sv.sinks || sv.sinks.ndim() != 1 || sv.sinks.shape(0) != heads_q)
      throw py::value_error("omniattn: sink_logits must be a 1-d float array with one logit per query head (" +
                            std::to_string(heads_q) + ")");
    s.sink_logits = sv.sinks.data();
  }
  if (rope.is_none()) return;
  rope_from_dict(rope, sv.rope, sv.pos_q, sv.pos_k);
  const std::int64_t axes = rope_axes(sv.rope);
  if (!sv.pos_q.empty() && static_cast<std::int64_t>(sv.pos_q.size()) != axes * batches * seq_q)
    throw py::value_error("omniattn: rope pos_q has " + std::to_string(sv.pos_q.size()) + " ids, expected " +
                          std::to_string(axes * batches * seq_q) + " ([axes, batch, seq_q])");
  if (seq_k >= 0 && !sv.pos_k.empty() && static_cast<std::int64_t>(sv.pos_k.size()) != axes * batches * seq_k)
    throw py::value_error("omniattn: rope pos_k has " + std::to_string(sv.pos_k.size()) + " ids, expected " +
                          std::to_string(axes * batches * seq_k) + " ([axes, batch, seq_k])");
  s.rope = &sv.rope;
}

// The call's mask and score onto s, their tables checked against want = [batch, heads_q, seq_q, seq_k]; bias_shapes:
// every dense bias stage's shape.
void attach_mask_score(omniattn::spec& s, py::handle mask, py::handle score, const shape4& want, buffers& keep,
                       std::vector<shape4>& bias_shapes) {
  if (!mask.is_none()) {
    const py_mask& m = mask.cast<const py_mask&>();
    m.check_shapes(want);
    s.mask = m.expr;
  }
  if (!score.is_none()) {
    std::vector<shape4> score_shapes;
    s.score = make_score(score, keep, score_shapes, bias_shapes, want[1]);  // empty when there are no stages
    for (const shape4& sh : score_shapes) check_table_shape("score", sh, want);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// One call: validate, explain, or run; the forward, or the backward when d_out is given (then out and lse are the
// forward's results, read; d_out, dq, dk, dv are described like q, k, v; d_sink_logits and d_bias are allocated here,
// since their sizes come from the spec, and returned).

py::object call(const std::string& mode, py::handle q, py::handle k, py::handle v, py::handle out, const std::string& layout,
                bool as_bf16, std::optional<double> scale, const std::string& causal, py::handle mask,
                py::handle score, py::handle blocks, py::handle lse, const std::string& backend, int threads,
                py::handle cu_q, py::handle cu_k, py::handle sinks, py::handle rope, py::handle d_out, py::handle dq,
                py::handle dk, py::handle dv, bool want_d_sink, bool want_d_bias) {
  const bool bhsd = is_bhsd(layout);
  const bool backward = !d_out.is_none();
  buffers keep;
  const omniattn::tensor tq = to_tensor("q", describe(q, "q", false, as_bf16, keep), bhsd);
  const omniattn::tensor tk = to_tensor("k", describe(k, "k", false, as_bf16, keep), bhsd);
  const omniattn::tensor tv = to_tensor("v", describe(v, "v", false, as_bf16, keep), bhsd);
  const omniattn::tensor to = to_tensor("out", describe(out, "out", !backward, as_bf16, keep), bhsd);
  omniattn::tensor tdo;
  omniattn::gradients g;
  py::array_t<float> d_sink_array, d_bias_array;
  if (backward) {
    if (dq.is_none() || dk.is_none() || dv.is_none()) throw py::value_error("omniattn: the backward needs dq, dk and dv");
    tdo = to_tensor("d_out", describe(d_out, "d_out", false, as_bf16, keep), bhsd);
    g.dq = to_tensor("dq", describe(dq, "dq", true, as_bf16, keep), bhsd);
    g.dk = to_tensor("dk", describe(dk, "dk", true, as_bf16, keep), bhsd);
    g.dv = to_tensor("dv", describe(dv, "dv", true, as_bf16, keep), bhsd);
    if (want_d_sink) {  // one float per query head (the C++ side checks that spec.sink_logits is set)
      d_sink_array = py::array_t<float>(static_cast<py::ssize_t>(tq.heads));
      g.d_sink_logits = d_sink_array.mutable_data();
    }
  }

  spec_values sv;
  fill_spec(sv, scale, causal, sinks, rope, tq.heads, cu_q.is_none() ? tq.batch : 1, tq.seq, tk.seq);
  omniattn::spec& s = sv.s;
  if (!blocks.is_none()) s.blocks = &blocks.cast<const omniattn::block_mask&>();
  omniattn::options opt;
  opt.use = parse_backend(backend);
  opt.threads = threads;

  omniattn::lse_tensor l;
  if (!lse.is_none()) {
    l = to_lse("lse", describe(lse, "lse", !backward, false, keep));
    opt.lse = &l;
  }

  omniattn::varlen vl;
  std::vector<std::int64_t> cuq, cuk;
  if (!cu_q.is_none() || !cu_k.is_none()) {
    if (cu_q.is_none() || cu_k.is_none()) throw py::value_error("omniattn: pass both cu_seqlens_q and cu_seqlens_k");
    cuq = cu_seqlens(cu_q, "cu_seqlens_q");
    cuk = cu_seqlens(cu_k, "cu_seqlens_k");
    if (cuq.size() < 2 || cuq.size() != cuk.size())
      throw py::value_error("omniattn: cu_seqlens_q and cu_seqlens_k must both have num_seqs + 1 >= 2 entries, got " +
                            std::to_string(cuq.size()) + " and " + std::to_string(cuk.size()));
    vl.cu_seqlens_q = cuq.data();
    vl.cu_seqlens_k = cuk.data();
    vl.num_seqs = static_cast<std::int64_t>(cuq.size()) - 1;
    opt.packed = &vl;
  }

  // Everything but the mask and the score first: their tables are shaped after the validated problem.
  omniattn::attn_bwd_params bp;
  omniattn::attn_params& p = bp.fwd;
  const auto make = [&] {
    const omniattn::status st = backward ? omniattn::make_backward_params(tq, tk, tv, to, l, tdo, g, s, opt, bp)
                                         : omniattn::make_params(tq, tk, tv, to, s, opt, p);
    if (!st) raise_status(st.error);
  };
  make();
  if (mode == "validate")
    return py::dict("batch"_a = p.batch, "heads_q"_a = p.heads_q, "heads_kv"_a = p.heads_kv, "seq_q"_a = p.seq_q,
                    "seq_k"_a = p.seq_k, "dim_qk"_a = p.dim_qk, "dim_v"_a = p.dim_v, "scale"_a = p.scale,
                    "threads"_a = p.threads);

  std::vector<shape4> bias_shapes;
  attach_mask_score(s, mask, score, {p.batch, p.heads_q, p.seq_q, p.seq_k}, keep, bias_shapes);
  if (backward && want_d_bias) {
    // Shaped like the chain's dense bias; with none (or several) the C++ rules refuse the call before writing.
    const shape4 sh = bias_shapes.empty() ? shape4{1, 1, 1, 1} : bias_shapes.front();
    d_bias_array = py::array_t<float>(std::vector<py::ssize_t>(sh.begin(), sh.end()));
    g.d_bias = d_bias_array.mutable_data();
  }

  if (mode == "explain") {
    make();
    const auto explained = [&](const auto& sel) {
      return py::dict("ok"_a = sel.ok(), "name"_a = sel.name, "reasons"_a = sel.reasons, "threads"_a = p.threads,
                      "mask"_a = p.mask ? p.mask->str() : std::string("none"));
    };
    return backward ? explained(omniattn::select_backward(bp, opt.use)) : explained(omniattn::select(p, opt.use));
  }
  if (mode != "run") throw py::value_error("omniattn: unknown mode '" + mode + "'");
  omniattn::status st;
  {
    py::gil_scoped_release release;
    st = backward ? omniattn::attention_backward(tq, tk, tv, to, l, tdo, g, s, opt) : omniattn::attention(tq, tk, tv, to, s, opt);
  }
  if (!st) raise_status(st.error);
  if (!backward) return py::none();
  return py::make_tuple(want_d_sink ? py::object(d_sink_array) : py::none(), want_d_bias ? py::object(d_bias_array) : py::none());
}

// ---------------------------------------------------------------------------------------------------------------
// The paged KV cache (omniattn::kv_cache) and attention_decode on it.

// A cache and the lock that keeps it unchanged while decode calls read it with the GIL released: those share the
// lock (taken after releasing the GIL, dropped before taking it back), every change takes it alone.
struct py_kv_cache {
  std::unique_ptr<omniattn::kv_cache> cache;

  std::unique_lock<std::shared_mutex> exclusive() const {
    py::gil_scoped_release release;  // a decode in flight finishes without the GIL
    return std::unique_lock<std::shared_mutex>(lock);
  }
  std::shared_mutex& shared() const { return lock; }

 private:
  mutable std::shared_mutex lock;
};

dtype storage_from_name(const std::string& s) {
  if (s == "f32") return dtype::f32;
  if (s == "bf16") return dtype::bf16;
  if (s == "f16") return dtype::f16;
  if (s == "f64") return dtype::f64;  // refused by kv_cache::validate, with its message
  throw py::type_error("omniattn: KVCache dtype must be 'f32', 'bf16' or 'f16' (or the numpy / torch dtypes), got '" + s + "'");
}

std::unique_ptr<py_kv_cache> make_kv_cache(std::int64_t heads_kv, std::int64_t dim_qk, std::int64_t dim_v,
                                           std::int64_t page_size, const std::string& storage, py::handle rope) {
  omniattn::kv_cache_config cfg;
  cfg.heads_kv = heads_kv, cfg.dim_qk = dim_qk, cfg.dim_v = dim_v, cfg.page_size = page_size;
  cfg.storage = storage_from_name(storage);
  if (!rope.is_none()) {
    omniattn::rope_spec rs;
    std::vector<std::int64_t> pos_q, pos_k;
    rope_from_dict(rope, rs, pos_q, pos_k);
    if (!pos_q.empty() || !pos_k.empty())
      throw py::value_error("omniattn: a KVCache's rope takes no pos_q / pos_k: positions come with each append");
    rs.pos_q = rs.pos_k = nullptr;
    cfg.rope = rs;
  }
  if (const omniattn::status st = omniattn::kv_cache::validate(cfg); !st) raise_status(st.error);
  auto c = std::make_unique<py_kv_cache>();
  c->cache = std::make_unique<omniattn::kv_cache>(cfg);
  return c;
}

void check(const omniattn::status& st) {
  if (!st) raise_status(st.error);
}

void cache_append(const py_kv_cache& c, std::int64_t seq, py::handle k, py::handle v, py::handle positions, bool as_bf16) {
  buffers keep;
  const omniattn::tensor tk = to_tensor("k", describe(k, "k", false, as_bf16, keep), false);
  const omniattn::tensor tv = to_tensor("v", describe(v, "v", false, as_bf16, keep), false);
  std::vector<std::int64_t> pos;
  const omniattn::kv_cache_config& cfg = c.cache->config();
  if (!positions.is_none()) {
    pos = positions.cast<std::vector<std::int64_t>>();
    const std::int64_t axes = cfg.rope ? rope_axes(*cfg.rope) : 1;
    if (static_cast<std::int64_t>(pos.size()) != axes * tk.seq)
      throw py::value_error("omniattn: positions has " + std::to_string(pos.size()) + " ids, expected " +
                            std::to_string(axes * tk.seq) + " ([axes, n] for the " + std::to_string(tk.seq) + " tokens)");
  }
  const auto lock = c.exclusive();
  check(c.cache->append(seq, tk, tv, pos.empty() ? nullptr : pos.data()));
}

py::tuple cache_read(const py_kv_cache& c, std::int64_t seq, std::int64_t kv_head) {
  std::vector<float> k, v;
  check(c.cache->read(seq, kv_head, k, v));
  const omniattn::kv_cache_config& cfg = c.cache->config();
  const std::int64_t dv = cfg.dim_v ? cfg.dim_v : cfg.dim_qk;
  const auto n = static_cast<py::ssize_t>(k.size()) / cfg.dim_qk;
  py::array_t<float> ka({n, static_cast<py::ssize_t>(cfg.dim_qk)}), va({n, static_cast<py::ssize_t>(dv)});
  std::copy(k.begin(), k.end(), ka.mutable_data());
  std::copy(v.begin(), v.end(), va.mutable_data());
  return py::make_tuple(ka, va);
}

py::dict cache_config(const py_kv_cache& c) {
  const omniattn::kv_cache_config& cfg = c.cache->config();
  py::object rope = py::none();
  if (cfg.rope)
    rope = py::dict("theta"_a = cfg.rope->theta, "rotary_dim"_a = cfg.rope->rotary_dim,
                    "interleaved"_a = cfg.rope->interleaved, "sections"_a = cfg.rope->sections);
  return py::dict("heads_kv"_a = cfg.heads_kv, "head_dim"_a = cfg.dim_qk, "head_dim_v"_a = cfg.dim_v ? cfg.dim_v : cfg.dim_qk,
                  "page_size"_a = cfg.page_size, "dtype"_a = omniattn::dtype_name(cfg.storage), "rope"_a = rope);
}

py::dict cache_memory(const py_kv_cache& c) {
  const omniattn::kv_cache_memory m = c.cache->memory();
  return py::dict("pages_in_use"_a = m.pages_in_use, "pages_free"_a = m.pages_free, "page_bytes"_a = m.page_bytes,
                  "data_bytes"_a = m.data_bytes, "metadata_bytes"_a = m.metadata_bytes, "tokens"_a = m.tokens);
}

// One decode call: 'validate' (the problem's sizes, for the Python layer's tables and key mass buffer), 'explain'
// (select_decode's kernel and reasons) or 'run'. q / out are [batch, Lq, heads, dim] (bshd); key_mass, when given,
// a writable float32 [batch, heads_kv, slots] buffer.
py::object decode(const std::string& mode, const py_kv_cache& c, py::handle q, py::handle out, const std::vector<std::int64_t>& seqs,
                  bool as_bf16, std::optional<double> scale, const std::string& causal, py::handle mask, py::handle score,
                  py::handle lse, py::handle key_mass, const std::string& backend, int threads, py::handle sinks,
                  py::handle rope, py::handle cu_seqlens_q) {
  buffers keep;
  const omniattn::tensor tq = to_tensor("q", describe(q, "q", false, as_bf16, keep), false);
  const omniattn::tensor to = to_tensor("out", describe(out, "out", true, as_bf16, keep), false);
  spec_values sv;
  fill_spec(sv, scale, causal, sinks, rope, tq.heads, tq.batch, tq.seq, -1);
  omniattn::spec& s = sv.s;
  omniattn::decode_options opt;
  opt.use = parse_backend(backend);
  opt.threads = threads;
  omniattn::lse_tensor l;
  if (!lse.is_none()) {
    l = to_lse("lse", describe(lse, "lse", true, false, keep));
    opt.lse = &l;
  }
  if (!key_mass.is_none()) {
    const array a = describe(key_mass, "key_mass", true, false, keep);
    if (a.type != elem::f32 || a.shape.size() != 3 || a.strides[2] != 1 || a.strides[1] != a.shape[2] ||
        a.strides[0] != a.shape[1] * a.shape[2])
      throw py::value_error("omniattn: key_mass must be a contiguous float32 [batch, heads_kv, slots] array");
    opt.key_mass = static_cast<float*>(a.data);
    opt.key_mass_slots = a.shape[2];
  }
  py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> cu;
  if (!cu_seqlens_q.is_none()) {
    cu = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(cu_seqlens_q);
    if (!cu || cu.ndim() != 1) throw py::value_error("omniattn: cu_seqlens_q must be a 1-d array of int64 offsets");
    if (cu.shape(0) != static_cast<py::ssize_t>(seqs.size()) + 1)
      throw py::value_error("omniattn: cu_seqlens_q has " + std::to_string(cu.shape(0)) + " entries, need len(seqs) + 1 = " +
                            std::to_string(seqs.size() + 1));
    opt.cu_seqlens_q = cu.data();
  }
  const omniattn::kv_cache& cache = *c.cache;
  omniattn::attn_decode_params p;
  check(omniattn::make_decode_params(tq, cache, seqs, to, s, opt, p));
  const omniattn::attn_params& f = p.fwd;
  if (mode == "validate") {
    std::vector<std::int64_t> lengths;
    std::int64_t slots = 0;
    for (const std::int64_t seq : seqs) {
      lengths.push_back(cache.length(seq));
      for (std::int64_t h = 0; h < f.heads_kv; ++h) slots = std::max(slots, cache.cached(seq, h));
    }
    return py::dict("batch"_a = f.batch, "heads_q"_a = f.heads_q, "heads_kv"_a = f.heads_kv, "seq_q"_a = f.seq_q,
                    "seq_k"_a = f.seq_k, "lengths"_a = lengths, "key_mass_slots"_a = slots, "scale"_a = f.scale,
                    "threads"_a = f.threads);
  }
  // Masks, scores and their tables index absolute token positions: [batch, heads_q, longest, longest].
  std::vector<shape4> bias_shapes;
  attach_mask_score(s, mask, score, {f.batch, f.heads_q, f.seq_k, f.seq_k}, keep, bias_shapes);
  if (mode == "explain") {
    check(omniattn::make_decode_params(tq, cache, seqs, to, s, opt, p));
    const omniattn::decode_selection sel = omniattn::select_decode(p, opt.use);
    return py::dict("ok"_a = sel.ok(), "name"_a = sel.name, "reasons"_a = sel.reasons, "threads"_a = p.fwd.threads,
                    "mask"_a = p.fwd.mask ? p.fwd.mask->str() : std::string("none"));
  }
  if (mode != "run") throw py::value_error("omniattn: unknown mode '" + mode + "'");
  omniattn::status st;
  {
    py::gil_scoped_release release;
    const std::shared_lock<std::shared_mutex> reading(c.shared());
    st = omniattn::attention_decode(tq, cache, seqs, to, s, opt);
  }
  check(st);
  return py::none();
}

// omniattn::merge_attention_states over operands laid out like attention's out and lse: outs[i] and out as q in
// `layout`, lses[i] and lse_out (None: not returned) as lse. out is None only when outs is empty (Python had nothing to
// shape it after); the C++ rules then report the empty outs.
void merge(const py::sequence& outs, const py::sequence& lses, py::handle out, py::handle lse_out,
           const std::string& layout, bool as_bf16, int threads) {
  const bool bhsd = is_bhsd(layout);
  buffers keep;
  std::vector<omniattn::tensor> parts;
  std::vector<omniattn::lse_tensor> part_lses;
  for (std::size_t i = 0; i < outs.size(); ++i) {
    const std::string name = "outs[" + std::to_string(i) + "]";
    parts.push_back(to_tensor(name, describe(py::object(outs[i]), name, false, as_bf16, keep), bhsd));
  }
  for (std::size_t i = 0; i < lses.size(); ++i) {
    const std::string name = "lses[" + std::to_string(i) + "]";
    part_lses.push_back(to_lse(name, describe(py::object(lses[i]), name, false, false, keep)));
  }
  const omniattn::tensor to = out.is_none() ? omniattn::tensor{} : to_tensor("out", describe(out, "out", true, as_bf16, keep), bhsd);
  omniattn::lse_tensor lo;
  if (!lse_out.is_none()) lo = to_lse("lse_out", describe(lse_out, "lse_out", true, false, keep));
  omniattn::status st;
  {
    py::gil_scoped_release release;
    st = omniattn::merge_attention_states(parts, part_lses, to, lse_out.is_none() ? nullptr : &lo, threads);
  }
  if (!st) raise_status(st.error);
}

// Tile classification of a mask (and causal flag) for a problem size, by omniattn::build_block_mask.
omniattn::block_mask build_blocks(py::handle mask, const std::string& causal, std::int64_t batch, std::int64_t heads,
                                  std::int64_t seq_q, std::int64_t seq_k, std::int64_t q_tile, std::int64_t kv_tile,
                                  py::handle cu_q, py::handle cu_k) {
  if (q_tile <= 0 || kv_tile <= 0)
    throw py::value_error("omniattn: q_tile and kv_tile must be > 0, got " + std::to_string(q_tile) + " and " + std::to_string(kv_tile));
  omniattn::attn_params p;
  std::vector<std::int64_t> cuq, cuk;
  p.batch = batch, p.heads_q = heads, p.heads_kv = heads, p.seq_q = seq_q, p.seq_k = seq_k;
  if (!cu_q.is_none()) {
    cuq = cu_seqlens(cu_q, "cu_seqlens_q");
    cuk = cu_seqlens(cu_k, "cu_seqlens_k");
    if (cuq.size() < 2 || cuq.size() != cuk.size())
      throw py::value_error("omniattn: cu_seqlens_q and cu_seqlens_k must both have num_seqs + 1 >= 2 entries");
    p.batch = static_cast<std::int64_t>(cuq.size()) - 1;
    p.seq_q = p.seq_k = 0;
    for (std::size_t x = 0; x + 1 < cuq.size(); ++x) {
      if (cuq[x + 1] < cuq[x] || cuk[x + 1] < cuk[x] || cuq[0] != 0 || cuk[0] != 0)
        throw py::value_error("omniattn: cu_seqlens must start at 0 and be non-decreasing");
      p.seq_q = std::max(p.seq_q, cuq[x + 1] - cuq[x]);
      p.seq_k = std::max(p.seq_k, cuk[x + 1] - cuk[x]);
    }
    p.cu_seqlens_q = cuq.data();
    p.cu_seqlens_k = cuk.data();
  }
  if (p.batch < 0 || p.heads_q < 0 || p.seq_q < 0 || p.seq_k < 0)
    throw py::value_error("omniattn: batch, heads, seq_q and seq_k must be >= 0");
  p.causal = parse_causal(causal);
  if (!mask.is_none()) {
    const py_mask& m = mask.cast<const py_mask&>();  // its rules: omniattn::build_block_mask (invalid_argument -> ValueError)
    m.check_shapes({p.batch, p.heads_q, p.seq_q, p.seq_k});
    p.mask = &m.expr;
  }
  py::gil_scoped_release release;
  return omniattn::build_block_mask(p, q_tile, kv_tile);
}

py::array_t<std::uint8_t> kinds_array(const omniattn::block_mask& bm) {
  py::array_t<std::uint8_t> a({bm.batch, bm.heads, bm.q_tiles, bm.kv_tiles});
  auto* d = a.mutable_data();
  for (std::size_t x = 0; x < bm.kinds.size(); ++x) d[x] = static_cast<std::uint8_t>(bm.kinds[x]);
  return a;
}

// ---------------------------------------------------------------------------------------------------------------
// Linear attention (omniattn/linear.h).

// A float32 [batch, heads, K, V] state array.
omniattn::state_tensor to_state(const std::string& name, const array& a) {
  if (a.type != elem::f32) throw py::type_error("omniattn: " + name + " must be float32, not " + format_desc(a));
  if (a.shape.size() != 4) throw py::value_error("omniattn: " + name + " must be 4-d [batch, heads, K, V], got shape " + shape_str(a.shape));
  return {static_cast<float*>(a.data), a.shape[0], a.shape[1], a.shape[2], a.shape[3], a.strides[0], a.strides[1], a.strides[2], a.strides[3]};
}

// g (or dg) of [B, T, H] as [B, T, H, 1]: one log decay per token and head.
array per_token_decay(array a) {
  if (a.shape.size() == 3) {
    a.shape.push_back(1);
    a.strides.push_back(1);
  }
  return a;
}

// The float32 copies a linear spec points into: head_log_decay, the projection's weight and bias.
struct linear_arrays {
  py::array_t<float, py::array::c_style | py::array::forcecast> decays, weight, bias;
};

// A contiguous float32 copy (or view) of x, kept in `into`; its values as a span.
std::span<const float> float_values(py::handle x, const char* name, py::array_t<float, py::array::c_style | py::array::forcecast>& into) {
  into = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(x);
  if (!into) throw py::type_error(std::string("omniattn: ") + name + " must be a float array");
  return {into.data(), static_cast<std::size_t>(into.size())};
}

// The spec of a linear call: the decay is fixed with head_log_decay, scalar with a g of [B, T, H] (or [B, T, H, 1]),
// per channel with a g of [B, T, H, K]; the projection is [heads, K, F] (or [K, F]: shared), its bias [heads, F] (or
// [F]); their heads and F are read from the weight's shape, the counts checked by the library. `arrays` keeps the
// float32 copies alive.
omniattn::linear_spec linear_spec_of(std::int64_t heads, bool as_bf16, std::optional<double> scale, const std::string& phi, bool normalize,
                                     bool causal, std::int64_t prefix, py::handle g, py::handle g_backward, py::handle head_log_decay,
                                     py::handle projection, py::handle projection_bias, bool flow, buffers& keep, linear_arrays& arrays) {
  omniattn::linear_spec s;
  auto& decays = arrays.decays;
  if (scale && !(*scale > 0.0)) throw py::value_error("omniattn: scale must be > 0 (None: K ** -0.5), got " + std::to_string(*scale));
  s.scale = scale ? *scale : -1.0;
  s.normalize = normalize;
  s.flow = flow;
  s.causal = causal;
  s.prefix = prefix;
  if (!omniattn::parse_feature_map(phi, s.phi)) {
    std::string names;
    for (omniattn::feature_map f : omniattn::k_feature_maps) names += std::string(names.empty() ? "'" : ", '") + omniattn::feature_map_name(f) + "'";
    throw py::value_error("omniattn: feature_map must be one of " + names + ", not '" + phi + "'");
  }
  if (!projection.is_none()) {
    s.projection.weight = float_values(projection, "projection", arrays.weight);
    if (arrays.weight.ndim() != 2 && arrays.weight.ndim() != 3)
      throw py::value_error("omniattn: projection must be [heads, K, F] or [K, F] (shared by the heads), got " +
                            std::to_string(arrays.weight.ndim()) + " dims");
    s.projection.heads = arrays.weight.ndim() == 3 ? arrays.weight.shape(0) : 1;
    s.projection.features = arrays.weight.shape(arrays.weight.ndim() - 1);
    if (!projection_bias.is_none()) {  // its shape is the weight's without the K axis: [heads, F] or [F]
      s.projection.bias = float_values(projection_bias, "projection_bias", arrays.bias);
      const auto& w = arrays.weight;
      const auto& b = arrays.bias;
      if (b.ndim() != w.ndim() - 1 || b.shape(b.ndim() - 1) != s.projection.features || (w.ndim() == 3 && b.shape(0) != w.shape(0)))
        throw py::value_error(std::string("omniattn: projection_bias must be ") + (w.ndim() == 3 ? "[heads, F]" : "[F]") +
                              " like the projection's " + (w.ndim() == 3 ? "[heads, K, F]" : "[K, F]"));
    }
  } else if (!projection_bias.is_none()) {
    throw py::value_error("omniattn: projection_bias without projection");
  }
  if (!head_log_decay.is_none()) {
    decays = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(head_log_decay);
    if (!decays || decays.ndim() != 1 || decays.shape(0) != heads)
      throw py::value_error("omniattn: head_log_decay must be a 1-d float array with one log decay per head (" + std::to_string(heads) + ")");
    s.decay = omniattn::linear_decay::fixed;
    s.head_log_decay = std::span<const float>(decays.data(), static_cast<std::size_t>(decays.shape(0)));
  }
  if (!g.is_none()) {
    if (s.decay != omniattn::linear_decay::none) throw py::value_error("omniattn: pass g or head_log_decay, not both");
    s.g = to_tensor("g", per_token_decay(describe(g, "g", false, as_bf16, keep)), false);
    s.decay = s.g.dim == 1 ? omniattn::linear_decay::scalar : omniattn::linear_decay::channel;
  }
  if (!g_backward.is_none()) s.g_backward = to_tensor("g_backward", per_token_decay(describe(g_backward, "g_backward", false, as_bf16, keep)), false);
  return s;
}

// omniattn::linear_attention (or its oracle) of q, k [B, T, H, K], v [B, T, H, V] into out.
void linear(py::handle q, py::handle k, py::handle v, py::handle out, bool as_bf16, std::optional<double> scale,
            const std::string& phi, bool normalize, bool causal, py::handle g, py::handle head_log_decay,
            py::handle initial_state, py::handle final_state, std::int64_t chunk, int threads, bool reference,
            std::int64_t prefix, py::handle cu, py::handle projection, py::handle projection_bias, py::handle g_backward, bool flow) {
  buffers keep;
  const omniattn::tensor tq = to_tensor("q", describe(q, "q", false, as_bf16, keep), false);
  const omniattn::tensor tk = to_tensor("k", describe(k, "k", false, as_bf16, keep), false);
  const omniattn::tensor tv = to_tensor("v", describe(v, "v", false, as_bf16, keep), false);
  const omniattn::tensor to = to_tensor("out", describe(out, "out", true, as_bf16, keep), false);
  linear_arrays arrays;
  const omniattn::linear_spec s =
      linear_spec_of(tq.heads, as_bf16, scale, phi, normalize, causal, prefix, g, g_backward, head_log_decay, projection, projection_bias,
                     flow, keep, arrays);
  omniattn::state_tensor s0, s1;
  omniattn::linear_options o;
  o.threads = threads;
  o.chunk = chunk;
  const std::vector<std::int64_t> offsets = cu.is_none() ? std::vector<std::int64_t>{} : cu_seqlens(cu, "cu_seqlens");
  o.cu_seqlens = offsets;
  if (!initial_state.is_none()) {
    s0 = to_state("initial_state", describe(initial_state, "initial_state", false, false, keep));
    o.initial_state = &s0;
  }
  if (!final_state.is_none()) {
    s1 = to_state("final_state", describe(final_state, "final_state", true, false, keep));
    o.final_state = &s1;
  }
  omniattn::status st;
  {
    py::gil_scoped_release release;
    st = reference ? omniattn::reference_linear_attention(tq, tk, tv, to, s, o) : omniattn::linear_attention(tq, tk, tv, to, s, o);
  }
  check(st);
}

// omniattn::linear_attention_backward (or its oracle): the gradients into dq, dk, dv (and dg [B, T, H(, K)],
// d_head_log_decay [H] float32, d_initial_state [B, H, K, V] float32 where given).
void linear_backward(py::handle q, py::handle k, py::handle v, py::handle d_out, py::handle dq, py::handle dk, py::handle dv, bool as_bf16,
                     std::optional<double> scale, const std::string& phi, bool normalize, bool causal, py::handle g,
                     py::handle head_log_decay, py::handle initial_state, py::handle d_final_state, py::handle dg,
                     py::handle d_head_log_decay, py::handle d_initial_state, std::int64_t chunk, int threads, bool reference,
                     std::int64_t prefix, py::handle cu, py::handle projection, py::handle projection_bias,
                     py::handle d_projection, py::handle d_projection_bias, py::handle g_backward, py::handle dg_backward, bool flow) {
  buffers keep;
  const omniattn::tensor tq = to_tensor("q", describe(q, "q", false, as_bf16, keep), false);
  const omniattn::tensor tk = to_tensor("k", describe(k, "k", false, as_bf16, keep), false);
  const omniattn::tensor tv = to_tensor("v", describe(v, "v", false, as_bf16, keep), false);
  const omniattn::tensor tdo = to_tensor("d_out", describe(d_out, "d_out", false, as_bf16, keep), false);
  linear_arrays arrays;
  const omniattn::linear_spec s =
      linear_spec_of(tq.heads, as_bf16, scale, phi, normalize, causal, prefix, g, g_backward, head_log_decay, projection, projection_bias,
                     flow, keep, arrays);
  omniattn::linear_grads gr;
  gr.dq = to_tensor("dq", describe(dq, "dq", true, as_bf16, keep), false);
  gr.dk = to_tensor("dk", describe(dk, "dk", true, as_bf16, keep), false);
  gr.dv = to_tensor("dv", describe(dv, "dv", true, as_bf16, keep), false);
  if (!dg.is_none()) gr.dg = to_tensor("dg", per_token_decay(describe(dg, "dg", true, false, keep)), false);
  if (!dg_backward.is_none()) gr.dg_backward = to_tensor("dg_backward", per_token_decay(describe(dg_backward, "dg_backward", true, false, keep)), false);
  // Written float32 arrays of any shape, contiguous: their values as one span (the library checks the count).
  const auto written_values = [&](py::handle x, const char* name) {
    const array a = describe(x, name, true, false, keep);
    std::int64_t n = 1, expect = 1;
    bool contiguous = a.type == elem::f32;
    for (std::size_t d = a.shape.size(); d-- > 0;) {
      contiguous &= a.shape[d] == 1 || a.strides[d] == expect;
      expect *= a.shape[d];
      n *= a.shape[d];
    }
    if (!contiguous) throw py::value_error(std::string("omniattn: ") + name + " must be a contiguous float32 array");
    return std::span<float>(static_cast<float*>(a.data), static_cast<std::size_t>(n));
  };
  if (!d_head_log_decay.is_none()) {
    const array a = describe(d_head_log_decay, "d_head_log_decay", true, false, keep);
    if (a.shape.size() != 1) throw py::value_error("omniattn: d_head_log_decay must be a contiguous 1-d float32 array");
    gr.d_head_log_decay = written_values(d_head_log_decay, "d_head_log_decay");
  }
  if (!d_projection.is_none()) gr.d_projection_weight = written_values(d_projection, "d_projection");
  if (!d_projection_bias.is_none()) gr.d_projection_bias = written_values(d_projection_bias, "d_projection_bias");
  omniattn::state_tensor s0, ds1, ds0;
  omniattn::linear_options o;
  o.threads = threads;
  o.chunk = chunk;
  const std::vector<std::int64_t> offsets = cu.is_none() ? std::vector<std::int64_t>{} : cu_seqlens(cu, "cu_seqlens");
  o.cu_seqlens = offsets;
  if (!initial_state.is_none()) {
    s0 = to_state("initial_state", describe(initial_state, "initial_state", false, false, keep));
    o.initial_state = &s0;
  }
  if (!d_final_state.is_none()) {
    ds1 = to_state("d_final_state", describe(d_final_state, "d_final_state", false, false, keep));
    gr.d_final_state = &ds1;
  }
  if (!d_initial_state.is_none()) {
    ds0 = to_state("d_initial_state", describe(d_initial_state, "d_initial_state", true, false, keep));
    gr.d_initial_state = &ds0;
  }
  omniattn::status st;
  {
    py::gil_scoped_release release;
    st = reference ? omniattn::reference_linear_attention_backward(tq, tk, tv, tdo, s, gr, o)
                   : omniattn::linear_attention_backward(tq, tk, tv, tdo, s, gr, o);
  }
  check(st);
}

#ifdef OMNIATTN_HAVE_MPI
// A rank that could not prepare its call: every rank of the communicator fails with its message (collective).
std::string dist_fail(std::int64_t comm, const std::string& message) {
  omniattn::dist::cp_options o;
  o.comm = MPI_Comm_f2c(static_cast<MPI_Fint>(comm));
  o.local_error = message.c_str();
  omniattn::status st;
  {
    py::gil_scoped_release release;
    st = omniattn::dist::attention({}, {}, {}, {}, {}, o);
  }
  return st.error;
}

// omniattn::dist::attention of this rank's shards q, k, v (bshd) into out (and lse); comm is the Fortran handle of an
// mpi4py communicator (Comm.py2f()), n the global sequence length the mask and score tables were lowered for. With
// d_out: omniattn::dist::attention_backward instead (out and lse the forward's, into dq, dk, dv).
// A local translation error (an exception here) reaches every rank through dist_fail before it is raised, so no rank
// waits for this one. Returns the report as a dict.
py::dict dist_attention(std::int64_t comm, py::handle q, py::handle k, py::handle v, py::handle out, bool as_bf16,
                        std::optional<double> scale, const std::string& causal, py::handle mask, py::handle score,
                        py::handle lse, int threads, py::handle sinks, py::handle rope, const std::string& mechanism,
                        const std::string& layout, std::int64_t chunks, std::int64_t n, py::handle d_out, py::handle dq,
                        py::handle dk, py::handle dv, int ulysses_degree) {
  namespace d = omniattn::dist;
  buffers keep;
  spec_values sv;
  omniattn::tensor tq, tk, tv, to, tdo;
  d::cp_gradients g;
  omniattn::lse_tensor l;
  const bool backward = !d_out.is_none();
  d::cp_options o;
  o.comm = MPI_Comm_f2c(static_cast<MPI_Fint>(comm));
  try {
    tq = to_tensor("q", describe(q, "q", false, as_bf16, keep), false);
    tk = to_tensor("k", describe(k, "k", false, as_bf16, keep), false);
    tv = to_tensor("v", describe(v, "v", false, as_bf16, keep), false);
    to = to_tensor("out", describe(out, "out", !backward, as_bf16, keep), false);
    if (backward) {
      tdo = to_tensor("d_out", describe(d_out, "d_out", false, as_bf16, keep), false);
      g.dq = to_tensor("dq", describe(dq, "dq", true, as_bf16, keep), false);
      g.dk = to_tensor("dk", describe(dk, "dk", true, as_bf16, keep), false);
      g.dv = to_tensor("dv", describe(dv, "dv", true, as_bf16, keep), false);
      if (lse.is_none()) throw py::value_error("omniattn: the backward needs the forward's lse");
    }
    fill_spec(sv, scale, causal, sinks, rope, tq.heads, tq.batch, tq.seq, tk.seq);
    std::vector<shape4> bias_shapes;
    attach_mask_score(sv.s, mask, score, {tq.batch, tq.heads, n, n}, keep, bias_shapes);
    if (!d::parse_mechanism(mechanism, o.use))
      throw py::value_error("omniattn: mechanism must be 'auto', 'ring', 'allgather', 'token_ring', 'ulysses' or 'hybrid', "
                            "not '" + mechanism + "'");
    if (!d::parse_layout(layout, o.shards))
      throw py::value_error("omniattn: layout must be 'contiguous' or 'zigzag', not '" + layout + "'");
    o.chunks = chunks;
    o.ulysses_degree = ulysses_degree;
    o.threads = threads;
    if (!lse.is_none()) {
      l = to_lse("lse", describe(lse, "lse", !backward, false, keep));
      o.lse = &l;
    }
  } catch (const std::exception& e) {
    dist_fail(comm, e.what());
    throw;
  }
  d::cp_report rep;
  o.report = &rep;
  omniattn::status st;
  {
    py::gil_scoped_release release;
    if (backward) {
      o.lse = nullptr;
      st = d::attention_backward(tq, tk, tv, to, l, tdo, g, sv.s, o);
    } else {
      st = d::attention(tq, tk, tv, to, sv.s, o);
    }
  }
  check(st);
  return py::dict("mechanism"_a = rep.mechanism, "reasons"_a = rep.reasons, "chunks"_a = rep.chunks,
                  "pairs_computed"_a = rep.pairs_computed, "pairs_skipped"_a = rep.pairs_skipped,
                  "bytes_sent"_a = rep.bytes_sent, "bytes_received"_a = rep.bytes_received,
                  "messages_skipped"_a = rep.messages_skipped, "partials_buffered"_a = rep.partials_buffered,
                  "seconds"_a = rep.seconds, "compute_seconds"_a = rep.compute_seconds, "wait_seconds"_a = rep.wait_seconds);
}

std::vector<std::int64_t> rank_chunks(const std::string& layout, std::int64_t chunks, int ranks, int rank) {
  omniattn::dist::layout l = omniattn::dist::layout::contiguous;
  if (!omniattn::dist::parse_layout(layout, l))
    throw py::value_error("omniattn: layout must be 'contiguous' or 'zigzag', not '" + layout + "'");
  return omniattn::dist::rank_chunks(l, chunks, ranks, rank);
}
#endif

}  // namespace

PYBIND11_MODULE(_omniattn, m) {
  m.doc() = "omniattn C++ binding (use the omniattn package, not this module)";
  m.attr("__version__") = std::to_string(OMNIATTN_VERSION_MAJOR) + "." + std::to_string(OMNIATTN_VERSION_MINOR) + "." +
                          std::to_string(OMNIATTN_VERSION_PATCH);

  m.def("call", &call, "mode"_a, "q"_a, "k"_a, "v"_a, "out"_a, py::kw_only(), "layout"_a = "bshd", "as_bf16"_a = false,
        "scale"_a = py::none(), "causal"_a = "none", "mask"_a = py::none(), "score"_a = py::none(),
        "blocks"_a = py::none(), "lse"_a = py::none(), "backend"_a = "auto", "threads"_a = 0,
        "cu_seqlens_q"_a = py::none(), "cu_seqlens_k"_a = py::none(), "sink_logits"_a = py::none(), "rope"_a = py::none(),
        "d_out"_a = py::none(), "dq"_a = py::none(), "dk"_a = py::none(), "dv"_a = py::none(), "want_d_sink"_a = false,
        "want_d_bias"_a = false,
        "Validates ('validate': returns the problem's sizes), explains ('explain': select()'s kernel and reasons) or runs "
        "('run') one attention call; with d_out (and dq, dk, dv) the attention_backward call, whose 'run' returns "
        "(d_sink_logits or None, d_bias or None).");

  py::class_<py_kv_cache>(m, "KVCache", "omniattn::kv_cache (use omniattn.KVCache)")
      .def(py::init(&make_kv_cache), "heads_kv"_a, "head_dim"_a, "head_dim_v"_a, "page_size"_a, "dtype"_a, "rope"_a)
      .def_property_readonly("config", &cache_config)
      .def("add_sequence", [](const py_kv_cache& c) {
        const auto lock = c.exclusive();
        return c.cache->add_sequence();
      })
      .def("fork", [](const py_kv_cache& c, std::int64_t seq) {
        const auto lock = c.exclusive();
        std::int64_t id = -1;
        check(c.cache->fork(seq, id));
        return id;
      }, "seq"_a)
      .def("free", [](const py_kv_cache& c, std::int64_t seq) {
        const auto lock = c.exclusive();
        check(c.cache->free_sequence(seq));
      }, "seq"_a)
      .def("append", &cache_append, "seq"_a, "k"_a, "v"_a, "positions"_a, "as_bf16"_a)
      .def("truncate", [](const py_kv_cache& c, std::int64_t seq, std::int64_t length) {
        const auto lock = c.exclusive();
        check(c.cache->truncate(seq, length));
      }, "seq"_a, "length"_a)
      .def("set_eviction", [](const py_kv_cache& c, std::int64_t kv_head, std::int64_t sinks, std::int64_t window) {
        const auto lock = c.exclusive();
        check(c.cache->set_eviction(kv_head, {sinks, window}));
      }, "kv_head"_a, "sinks"_a, "window"_a)
      .def("keep_top_k", [](const py_kv_cache& c, std::int64_t seq, std::int64_t kv_head,
                            const py::array_t<float, py::array::c_style | py::array::forcecast>& mass, std::int64_t k) {
        if (mass.ndim() != 1) throw py::value_error("omniattn: mass must be 1-d (one float per cached slot)");
        const auto lock = c.exclusive();
        check(c.cache->keep_top_k(seq, kv_head, std::span<const float>(mass.data(), static_cast<std::size_t>(mass.size())), k));
      }, "seq"_a, "kv_head"_a, "mass"_a, "k"_a)
      .def("shrink", [](const py_kv_cache& c) {
        const auto lock = c.exclusive();
        check(c.cache->shrink());
      })
      .def("sequences", [](const py_kv_cache& c) { return c.cache->sequences(); })
      .def("alive", [](const py_kv_cache& c, std::int64_t seq) { return c.cache->alive(seq); }, "seq"_a)
      .def("length", [](const py_kv_cache& c, std::int64_t seq) { return c.cache->length(seq); }, "seq"_a)
      .def("cached", [](const py_kv_cache& c, std::int64_t seq, std::int64_t h) { return c.cache->cached(seq, h); },
           "seq"_a, "kv_head"_a)
      .def("cached_tokens", [](const py_kv_cache& c, std::int64_t seq, std::int64_t h) {
        const std::vector<std::int64_t> t = c.cache->cached_tokens(seq, h);
        return py::array_t<std::int64_t>(static_cast<py::ssize_t>(t.size()), t.data());
      }, "seq"_a, "kv_head"_a)
      .def("read", &cache_read, "seq"_a, "kv_head"_a)
      .def("memory", &cache_memory);

  m.def("decode", &decode, "mode"_a, "cache"_a, "q"_a, "out"_a, "seqs"_a, py::kw_only(), "as_bf16"_a = false,
        "scale"_a = py::none(), "causal"_a = "none", "mask"_a = py::none(), "score"_a = py::none(), "lse"_a = py::none(),
        "key_mass"_a = py::none(), "backend"_a = "auto", "threads"_a = 0, "sink_logits"_a = py::none(),
        "rope"_a = py::none(), "cu_seqlens_q"_a = py::none(),
        "Validates, explains or runs one omniattn::attention_decode call of q [batch, Lq, heads_q, dim] (ragged: [1, "
        "total, heads_q, dim] with cu_seqlens_q) on the cache.");

  m.def("linear_attention", &linear, "q"_a, "k"_a, "v"_a, "out"_a, py::kw_only(), "as_bf16"_a = false, "scale"_a = py::none(),
        "feature_map"_a = "identity", "normalize"_a = false, "causal"_a = true, "g"_a = py::none(),
        "head_log_decay"_a = py::none(), "initial_state"_a = py::none(), "final_state"_a = py::none(), "chunk"_a = 64,
        "threads"_a = 0, "reference"_a = false, "prefix"_a = 0, "cu_seqlens"_a = py::none(), "projection"_a = py::none(),
        "projection_bias"_a = py::none(), "g_backward"_a = py::none(), "flow"_a = false,
        "omniattn::linear_attention (reference=True: its fp64 oracle) of q, k, v into out (and final_state).");
  m.def(
      "performer_projection",
      [](std::int64_t heads, std::int64_t dim, std::int64_t features, std::uint64_t seed, bool orthogonal) {
        if (heads < 1 || dim < 1 || features < 1)
          throw py::value_error("omniattn: performer_projection needs heads, dim and features >= 1");
        const std::vector<float> w = omniattn::performer_projection(heads, dim, features, seed, orthogonal);
        py::array_t<float> a({heads, dim, features});
        std::copy(w.begin(), w.end(), a.mutable_data());
        return a;
      },
      "heads"_a, "dim"_a, "features"_a, "seed"_a = 0, "orthogonal"_a = true,
      "omniattn::performer_projection: Performer's random directions [heads, dim, features], float32.");
  m.def("linear_attention_backward", &linear_backward, "q"_a, "k"_a, "v"_a, "d_out"_a, "dq"_a, "dk"_a, "dv"_a, py::kw_only(),
        "as_bf16"_a = false, "scale"_a = py::none(), "feature_map"_a = "identity", "normalize"_a = false, "causal"_a = true,
        "g"_a = py::none(), "head_log_decay"_a = py::none(), "initial_state"_a = py::none(), "d_final_state"_a = py::none(),
        "dg"_a = py::none(), "d_head_log_decay"_a = py::none(), "d_initial_state"_a = py::none(), "chunk"_a = 64, "threads"_a = 0,
        "reference"_a = false, "prefix"_a = 0, "cu_seqlens"_a = py::none(), "projection"_a = py::none(),
        "projection_bias"_a = py::none(), "d_projection"_a = py::none(), "d_projection_bias"_a = py::none(),
        "g_backward"_a = py::none(), "dg_backward"_a = py::none(), "flow"_a = false,
        "omniattn::linear_attention_backward (reference=True: its fp64 oracle): the gradients of q, k, v (and of g, "
        "head_log_decay and initial_state where their arrays are given) from d_out (and d_final_state).");

#ifdef OMNIATTN_HAVE_MPI
  m.attr("has_dist") = true;
  m.def("dist_attention", &dist_attention, "comm"_a, "q"_a, "k"_a, "v"_a, "out"_a, py::kw_only(), "as_bf16"_a = false,
        "scale"_a = py::none(), "causal"_a = "none", "mask"_a = py::none(), "score"_a = py::none(), "lse"_a = py::none(),
        "threads"_a = 0, "sink_logits"_a = py::none(), "rope"_a = py::none(), "mechanism"_a = "auto",
        "layout"_a = "contiguous", "chunks"_a = 0, "n"_a = 0, "d_out"_a = py::none(), "dq"_a = py::none(),
        "dk"_a = py::none(), "dv"_a = py::none(), "ulysses_degree"_a = 0,
        "omniattn::dist::attention (with d_out: attention_backward into dq, dk, dv) of this rank's shards over the "
        "communicator with Fortran handle comm.");
  m.def("dist_fail", &dist_fail, "comm"_a, "message"_a,
        "Fails the collective call on every rank of comm with this rank's message; returns the agreed error.");
  m.def("rank_chunks", &rank_chunks, "layout"_a, "chunks"_a, "ranks"_a, "rank"_a,
        "The chunks a rank holds, in local order (omniattn::dist::rank_chunks).");
#else
  m.attr("has_dist") = false;
#endif

  m.def("merge_attention_states", &merge, "outs"_a, "lses"_a, "out"_a, "lse_out"_a, py::kw_only(), "layout"_a = "bshd",
        "as_bf16"_a = false, "threads"_a = 0,
        "Merges partial attention results over disjoint key sets into out and lse_out (omniattn::merge_attention_states).");

  py::class_<py_mask>(m, "Mask", "A mask expression built from a lowered omniattn.masks tree.")
      .def(py::init(&make_mask), "tree"_a)
      .def("__str__", [](const py_mask& self) { return self.expr.str(); })
      .def("check", [](const py_mask& self) { return self.expr.check(); })
      .def("allows", [](const py_mask& self, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, std::int64_t lq,
                        std::int64_t lk) { return self.expr.allows(b, h, i, j, lq, lk); },
           "b"_a, "h"_a, "i"_a, "j"_a, "lq"_a, "lk"_a)
      .def_property_readonly("table_shapes", [](const py_mask& self) {
        std::vector<shape4> out;
        for (const auto& t : self.tables) out.push_back(t.second);
        return out;
      });

  py::class_<omniattn::block_mask>(m, "BlockMask", "omniattn::block_mask: tile kinds [batch, heads, q_tiles, kv_tiles]")
      .def(py::init([](const py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>& kinds, std::int64_t q_tile,
                       std::int64_t kv_tile) {
             if (kinds.ndim() != 4) throw py::value_error("omniattn: block mask kinds must be 4-d [batch, heads, q_tiles, kv_tiles]");
             omniattn::block_mask bm;
             bm.q_tile = q_tile, bm.kv_tile = kv_tile;
             bm.batch = kinds.shape(0), bm.heads = kinds.shape(1), bm.q_tiles = kinds.shape(2), bm.kv_tiles = kinds.shape(3);
             bm.kinds.resize(static_cast<std::size_t>(kinds.size()));
             for (std::size_t x = 0; x < bm.kinds.size(); ++x)
               bm.kinds[x] = static_cast<omniattn::tile_kind>(kinds.data()[x]);  // values are validated per call
             return bm;
           }),
           "kinds"_a, "q_tile"_a, "kv_tile"_a)
      .def_readonly("q_tile", &omniattn::block_mask::q_tile)
      .def_readonly("kv_tile", &omniattn::block_mask::kv_tile)
      .def_readonly("batch", &omniattn::block_mask::batch)
      .def_readonly("heads", &omniattn::block_mask::heads)
      .def_readonly("q_tiles", &omniattn::block_mask::q_tiles)
      .def_readonly("kv_tiles", &omniattn::block_mask::kv_tiles)
      .def_property_readonly("kinds", &kinds_array);

  m.def("build_block_mask", &build_blocks, "mask"_a, "causal"_a, "batch"_a, "heads"_a, "seq_q"_a, "seq_k"_a, "q_tile"_a,
        "kv_tile"_a, "cu_seqlens_q"_a = py::none(), "cu_seqlens_k"_a = py::none());

  m.def("describe", [](py::handle obj, bool as_bf16) {
    buffers keep;
    const array a = describe(obj, "array", false, as_bf16, keep);
    return py::dict("data"_a = reinterpret_cast<std::uintptr_t>(a.data), "dtype"_a = elem_name(a.type),
                    "shape"_a = a.shape, "strides"_a = a.strides);
  }, "obj"_a, "as_bf16"_a = false, "What the binding sees of an array: pointer, dtype, shape, element strides (no copy).");

  m.def("cu_seqlens", &cu_seqlens_array, "values"_a, "name"_a,
        "cu_seqlens as a contiguous int64 array; TypeError for non-integer dtypes, ValueError unless 1-d.");

  m.def("alibi_slopes", &omniattn::scores::alibi_slopes, "heads"_a, "The ALiBi paper's slopes for `heads` heads.");

  m.def("score_eval", [](const std::string& text, std::int64_t heads, const py::array_t<double, py::array::c_style | py::array::forcecast>& s,
                         const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& b,
                         const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& h,
                         const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& q,
                         const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& k) {
    omniattn::score_fn f;
    if (const std::string err = omniattn::parse_score(text, heads, f); !err.empty()) throw py::value_error(err);
    const py::ssize_t n = s.size();
    if (b.size() != n || h.size() != n || q.size() != n || k.size() != n)
      throw py::value_error("omniattn: score_eval needs s, b, h, q, k of one size (broadcast them first)");
    py::array_t<double> out(n);
    double* o = out.mutable_data();
    for (py::ssize_t x = 0; x < n; ++x)
      o[x] = f ? f(s.data()[x], b.data()[x], h.data()[x], q.data()[x], k.data()[x]) : s.data()[x];
    return out;
  }, "text"_a, "heads"_a, "s"_a, "b"_a, "h"_a, "q"_a, "k"_a,
        "Evaluates a score spec string in float64 on flat arrays of logits and indices (the oracle's formula).");

  m.def("f32_to_bf16", py::vectorize(omniattn::f32_to_bf16), "Round float32 to bf16 bits (nearest even).");
  m.def("bf16_to_f32", py::vectorize(omniattn::bf16_to_f32), "Widen bf16 bits to float32.");
}
