// libFuzzer target for the public entry point attention(). The fuzz bytes describe a small call: shapes (batch 0-3,
// seq 0-80, GQA head ratios, head dims 0-140), dtype, strided / broadcast / packed layouts (negative strides too),
// causal mode (invalid values too), scale (NaN, inf, huge, zero, negative), a mask spec string and a score spec
// string, sink logits, optional LSE, varlen cu_seqlens (malformed ones too), threads 0-3 and the backend (invalid
// values too), the SIMD target (AVX2 or EMU128). Input values come from a seeded generator (finite, magnitude set by the bytes), so inputs stay small.
//
// Every call must end in one of two ways:
//   * an error status, and then out and lse byte for byte as they were before the call;
//   * success, and then every output element equals the fp64 oracle (backend::reference, run on the same inputs into
//     separate buffers) within a bound derived from the float error of the logits (below); a row with no allowed key
//     is exactly 0 with lse -inf (or the sink logit); no NaN where the oracle has none; and no byte of the output or
//     LSE buffers outside the views is written.
// A violation calls __builtin_trap() so that libFuzzer reports it with the input.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "hwy/targets.h"
#include "omniattn/omniattn.h"

namespace {

using namespace omniattn;

// Reads the fuzz bytes front to back; past the end it yields zeros, so every input (even an empty one) is a call.
class byte_reader {
 public:
  byte_reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  std::uint8_t u8() { return pos_ < size_ ? data_[pos_++] : 0; }
  std::uint64_t u64() {
    std::uint64_t x = 0;
    for (int i = 0; i < 8; ++i) x |= std::uint64_t{u8()} << (8 * i);
    return x;
  }
  std::string_view rest() const {
    return pos_ < size_ ? std::string_view(reinterpret_cast<const char*>(data_ + pos_), size_ - pos_) : std::string_view();
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_, pos_ = 0;
};

[[noreturn]] void violation() { __builtin_trap(); }

double load(const void* base, dtype t, std::int64_t offset) {
  switch (t) {
    case dtype::f32: return static_cast<const float*>(base)[offset];
    case dtype::bf16: return bf16_to_f32(static_cast<const std::uint16_t*>(base)[offset]);
    case dtype::f16: return f16_to_f32(static_cast<const std::uint16_t*>(base)[offset]);
    case dtype::f64: return static_cast<const double*>(base)[offset];
  }
  return 0.0;
}

void store(void* base, dtype t, std::int64_t offset, double x) {
  const float f = static_cast<float>(x);
  switch (t) {
    case dtype::f32: static_cast<float*>(base)[offset] = f; break;
    case dtype::bf16: static_cast<std::uint16_t*>(base)[offset] = f32_to_bf16(f); break;
    case dtype::f16: static_cast<std::uint16_t*>(base)[offset] = f32_to_f16(f); break;
    case dtype::f64: static_cast<double*>(base)[offset] = x; break;
  }
}

// A buffer behind a strided view: it spans every element offset the sizes and strides reach, negative strides
// included (validation rejects those today, but if it ever accepts one the call still reads memory we own), so the
// library can only touch memory outside it through a bug, which ASan reports.
struct strided_buffer {
  std::vector<std::uint8_t> bytes;
  std::int64_t origin = 0;  // element index of offset 0 in `bytes`
  int elem = 1;

  void* base() { return bytes.data() + origin * elem; }
  void allocate(const std::int64_t* sizes, const std::int64_t* strides, int rank, int elem_bytes) {
    std::int64_t lo = 0, hi = 0;
    for (int d = 0; d < rank; ++d) {
      if (sizes[d] <= 0) continue;  // an empty view reads nothing
      const std::int64_t reach = (sizes[d] - 1) * strides[d];
      (reach < 0 ? lo : hi) += reach;
    }
    elem = elem_bytes;
    origin = -lo;
    bytes.assign(static_cast<std::size_t>((hi - lo + 1) * elem_bytes), 0);
  }
};

// One of the layouts the bytes pick for a [batch, seq, heads, dim] view (strides in elements, order b, s, h, d).
std::array<std::int64_t, 4> layout_strides(std::uint8_t mode, byte_reader& in, std::int64_t b, std::int64_t s,
                                           std::int64_t h, std::int64_t d) {
  (void)b;
  switch (mode % 4) {
    case 0: return {s * h * d, h * d, d, 1};          // BSHD
    case 1: return {h * s * d, d, s * d, 1};          // BHSD
    case 2: {                                         // padded rows and heads
      const std::int64_t pd = d + in.u8() % 5, ph = h * pd + in.u8() % 3;
      return {s * ph + in.u8() % 7, ph, pd, 1};
    }
    default: {  // arbitrary small strides: overlapping, broadcast (0) and negative ones
      std::array<std::int64_t, 4> st{};
      for (std::int64_t& x : st) x = static_cast<std::int8_t>(in.u8()) / 2;
      return st;
    }
  }
}

tensor view_of(strided_buffer& buf, dtype t, std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d,
               const std::array<std::int64_t, 4>& st) {
  tensor v;
  v.data = buf.base();
  v.type = t;
  v.batch = b;
  v.seq = s;
  v.heads = h;
  v.dim = d;
  v.stride_batch = st[0];
  v.stride_seq = st[1];
  v.stride_head = st[2];
  v.stride_dim = st[3];
  return v;
}

// Fills every element of the buffer (not only the view's) with seeded finite values of the dtype.
void fill_values(strided_buffer& buf, dtype t, std::mt19937_64& rng, double magnitude) {
  std::uniform_real_distribution<double> u(-magnitude, magnitude);
  const std::int64_t n = static_cast<std::int64_t>(buf.bytes.size()) / buf.elem;
  for (std::int64_t i = 0; i < n; ++i) store(buf.bytes.data(), t, i, u(rng));
}

void fill_garbage(std::vector<std::uint8_t>& bytes, std::mt19937_64& rng) {
  for (std::uint8_t& x : bytes) x = static_cast<std::uint8_t>(rng());
}

double special_scale(std::uint8_t mode, std::uint8_t x) {
  switch (mode % 10) {
    case 0: return std::numeric_limits<double>::quiet_NaN();
    case 1: return std::numeric_limits<double>::infinity();
    case 2: return -std::numeric_limits<double>::infinity();
    case 3: return 1e300;    // finite as a double, not as a float
    case 4: return 1e30;
    case 5: return 0.0;
    case 6: return -0.5;
    case 7: return std::ldexp(1.0, static_cast<int>(x % 64) - 40);
    default: return static_cast<double>(static_cast<std::int8_t>(x)) / 16.0;
  }
}

float sink_value(std::uint8_t x) {
  switch (x % 16) {
    case 0: return std::numeric_limits<float>::quiet_NaN();
    case 1: return std::numeric_limits<float>::infinity();
    case 2: return -std::numeric_limits<float>::infinity();
    case 3: return 3e38f;
    default: return static_cast<float>(static_cast<std::int8_t>(x)) / 8.0f;
  }
}

struct call {
  dtype in = dtype::f32, out = dtype::f32;
  std::int64_t batch = 0, seq_q = 0, seq_k = 0, heads_q = 0, heads_kv = 0, dim_qk = 0, dim_v = 0;
  bool varlen = false;
  std::vector<std::int64_t> cu_q, cu_k;  // num_seqs + 1 entries each
  std::int64_t num_seqs = 0;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  byte_reader in(data, size);
  call c;
  const std::uint8_t flags = in.u8();
  // f32, bf16, f16: the dtypes the fused kernels serve (f64 runs on the oracle only, so it has nothing to check here).
  c.in = static_cast<dtype>(flags % 3);
  c.out = (flags & 4) ? dtype::f32 : c.in;
  const bool want_lse = flags & 8, want_sinks = flags & 16, want_stats = flags & 32;
  c.varlen = flags & 64;
  const std::uint8_t shape = in.u8();
  c.batch = shape % 4;
  const std::uint8_t causal_byte = (shape >> 2) % 4;
  const causal_mode causal = causal_byte == 3 ? static_cast<causal_mode>(3 + (shape >> 4)) : static_cast<causal_mode>(causal_byte);
  c.seq_q = in.u8() % 81;
  c.seq_k = in.u8() % 81;
  const std::uint8_t heads = in.u8();
  c.heads_kv = heads % 5;                                                  // 0 is invalid
  c.heads_q = c.heads_kv * (1 + (heads >> 3) % 4) + ((heads & 0x80) ? 1 : 0);  // +1: not a multiple
  c.dim_qk = in.u8() % 141;
  const std::uint8_t dv = in.u8();
  c.dim_v = dv % 2 ? c.dim_qk : (dv / 2) % 141;
  const std::uint8_t layouts = in.u8();
  const std::uint8_t broadcast = in.u8();
  const std::uint8_t threads_byte = in.u8();
  const int threads = threads_byte % 4;
  // The library is built for AVX2 and EMU128 here (CMakeLists.txt): bit 2 pins dispatch to the portable EMU128 code.
  struct target_guard {
    explicit target_guard(bool emu) {
      if (emu) hwy::SetSupportedTargetsForTest(HWY_EMU128);
    }
    ~target_guard() { hwy::SetSupportedTargetsForTest(0); }
  } const target(threads_byte & 4);
  const std::uint8_t scale_mode = in.u8(), scale_byte = in.u8();
  const std::uint8_t backend_byte = in.u8();
  const backend use = backend_byte % 4 == 3 ? static_cast<backend>(3 + backend_byte / 4) : static_cast<backend>(backend_byte % 4);
  const std::uint8_t magnitude_byte = in.u8();
  const std::uint64_t seed = in.u64();

  // Keep each execution fast: the oracle and the bound below cost B * Hq * Lq * Lk * (Dqk + Dv) each.
  while (std::max<std::int64_t>(c.batch, 1) * c.heads_q * c.seq_q * c.seq_k * (c.dim_qk + c.dim_v) > 600000) {
    c.seq_q = c.seq_q * 2 / 3;
    c.seq_k = c.seq_k * 2 / 3;
  }

  // Varlen: batch sequences packed along seq; malformed offsets on request (validation must reject them).
  std::int64_t rows_q = c.seq_q, rows_k = c.seq_k, tensor_batch = c.batch;
  if (c.varlen) {
    c.num_seqs = c.batch;
    c.cu_q.assign(static_cast<std::size_t>(c.num_seqs + 1), 0);
    c.cu_k.assign(static_cast<std::size_t>(c.num_seqs + 1), 0);
    for (std::int64_t s = 0; s < c.num_seqs; ++s) {
      c.cu_q[static_cast<std::size_t>(s + 1)] = c.cu_q[static_cast<std::size_t>(s)] + in.u8() % (c.seq_q + 1);
      c.cu_k[static_cast<std::size_t>(s + 1)] = c.cu_k[static_cast<std::size_t>(s)] + in.u8() % (c.seq_k + 1);
    }
    rows_q = c.cu_q.back();
    rows_k = c.cu_k.back();
    const std::uint8_t malformed = in.u8();
    switch (malformed % 8) {
      case 4: c.cu_q[0] = 1; break;
      case 5: c.cu_k.back() -= 1; break;                                    // total no longer the tensor's rows
      case 6: if (c.num_seqs > 1) std::swap(c.cu_q[1], c.cu_q[2]); break;  // decreasing
      case 7: c.cu_k[static_cast<std::size_t>(c.num_seqs / 2)] = -5; break;
      default: break;
    }
    tensor_batch = 1;
  }

  // Views. K and V may share one interleaved buffer (packed KV), inputs may broadcast over batch or heads.
  std::array<std::int64_t, 4> sq = layout_strides(layouts, in, tensor_batch, rows_q, c.heads_q, c.dim_qk);
  std::array<std::int64_t, 4> sk = layout_strides(layouts >> 2, in, tensor_batch, rows_k, c.heads_kv, c.dim_qk);
  std::array<std::int64_t, 4> sv = layout_strides(layouts >> 4, in, tensor_batch, rows_k, c.heads_kv, c.dim_v);
  std::array<std::int64_t, 4> so = layout_strides(layouts >> 6, in, tensor_batch, rows_q, c.heads_q, c.dim_v);
  if (broadcast & 1) sk[0] = sv[0] = 0;  // one K/V for every batch
  if (broadcast & 2) sk[2] = sv[2] = 0;  // one K/V head for every kv head
  if (broadcast & 4) sq[0] = 0;
  if (broadcast & 8) so[1] = 0;          // an output that overlaps itself: must be rejected
  if (broadcast & 16) sk[1] = -sk[1];    // a negative stride
  const bool packed_kv = (broadcast & 32) && c.dim_qk == c.dim_v;
  if (packed_kv) {  // [batch, seq, heads, 2, dim]: v starts one head dim after k
    sk = sv = {rows_k * c.heads_kv * 2 * c.dim_qk, c.heads_kv * 2 * c.dim_qk, 2 * c.dim_qk, 1};
  }
  const int es = dtype_size(c.in), os = dtype_size(c.out);
  strided_buffer bq, bk, bv, bo;
  const std::int64_t size_q[4] = {tensor_batch, rows_q, c.heads_q, c.dim_qk};
  const std::int64_t size_k[4] = {tensor_batch, rows_k, c.heads_kv, c.dim_qk};
  const std::int64_t size_v[4] = {tensor_batch, rows_k, c.heads_kv, c.dim_v};
  const std::int64_t size_kv[4] = {tensor_batch, rows_k, c.heads_kv, 2 * c.dim_qk};
  bq.allocate(size_q, sq.data(), 4, es);
  if (packed_kv) bk.allocate(size_kv, sk.data(), 4, es);
  else bk.allocate(size_k, sk.data(), 4, es);
  bv.allocate(size_v, sv.data(), 4, es);
  const std::int64_t size_o[4] = {tensor_batch, rows_q, c.heads_q, c.dim_v};
  bo.allocate(size_o, so.data(), 4, os);
  std::mt19937_64 rng(seed);
  const double magnitude = std::ldexp(1.0, static_cast<int>(magnitude_byte % 16) - 6);  // 2^-6 .. 2^9
  fill_values(bq, c.in, rng, magnitude);
  fill_values(bk, c.in, rng, magnitude);
  fill_values(bv, c.in, rng, magnitude);
  fill_garbage(bo.bytes, rng);
  const tensor q = view_of(bq, c.in, tensor_batch, rows_q, c.heads_q, c.dim_qk, sq);
  const tensor k = view_of(bk, c.in, tensor_batch, rows_k, c.heads_kv, c.dim_qk, sk);
  tensor v = view_of(packed_kv ? bk : bv, c.in, tensor_batch, rows_k, c.heads_kv, c.dim_v, sv);
  if (packed_kv) v.data = static_cast<std::uint8_t*>(bk.base()) + c.dim_qk * es;
  const tensor out = view_of(bo, c.out, tensor_batch, rows_q, c.heads_q, c.dim_v, so);

  // LSE [batch, heads, seq_q] (batch 1 and total rows for varlen): contiguous, seq-major, padded or overlapping.
  strided_buffer bl;
  const std::uint8_t lse_mode = in.u8();
  std::array<std::int64_t, 3> sl{};
  switch (lse_mode % 4) {
    case 0: sl = {c.heads_q * rows_q, rows_q, 1}; break;
    case 1: sl = {rows_q * c.heads_q, 1, c.heads_q}; break;
    case 2: sl = {c.heads_q * (rows_q + 3) + 1, rows_q + 3, 1}; break;
    default: sl = {0, 1, 1}; break;  // overlaps itself once there are two heads or two rows
  }
  const std::int64_t size_l[3] = {tensor_batch, c.heads_q, rows_q};
  bl.allocate(size_l, sl.data(), 3, 4);
  fill_garbage(bl.bytes, rng);
  lse_tensor lse;
  lse.data = static_cast<float*>(bl.base());
  lse.stride_batch = sl[0];
  lse.stride_head = sl[1];
  lse.stride_seq = sl[2];

  std::vector<float> sinks(static_cast<std::size_t>(std::max<std::int64_t>(c.heads_q, 1)));
  if (want_sinks)
    for (float& x : sinks) x = sink_value(in.u8());

  spec s;
  if (scale_mode % 3 != 0) s.scale = special_scale(scale_mode / 3, scale_byte);
  s.causal = causal;
  if (want_sinks) s.sink_logits = sinks.data();
  // The rest of the input: a mask spec, then (after a newline) a score spec. Unparsable text means "no mask" /
  // "no score": the parsers have their own fuzzer.
  const std::string_view text = in.rest();
  const std::size_t nl = text.find('\n');
  const std::string_view mask_text = text.substr(0, nl), score_text = nl == std::string_view::npos ? "" : text.substr(nl + 1);
  if (!mask_text.empty()) {
    mask_expr m;
    if (parse_mask(mask_text, m).empty()) s.mask = m;
  }
  if (!score_text.empty()) {
    score_fn f;
    if (parse_score(score_text, std::max<std::int64_t>(c.heads_q, 1), f).empty()) s.score = f;
  }

  varlen packed;
  packed.cu_seqlens_q = c.cu_q.data();
  packed.cu_seqlens_k = c.cu_k.data();
  packed.num_seqs = c.num_seqs;
  run_stats stats;
  options opt;
  opt.use = use;
  opt.threads = threads;
  opt.lse = want_lse ? &lse : nullptr;
  opt.packed = c.varlen ? &packed : nullptr;
  opt.stats = want_stats ? &stats : nullptr;

  const std::vector<std::uint8_t> out_before = bo.bytes, lse_before = bl.bytes;
  const status st = attention(q, k, v, out, s, opt);
  if (!st.ok()) {
    if (st.error.empty() || bo.bytes != out_before || bl.bytes != lse_before) violation();
    return 0;
  }

  // Success: the oracle on the same inputs, into its own contiguous f32 output and LSE.
  const std::int64_t ref_rows = tensor_batch * rows_q * c.heads_q;
  std::vector<float> ref_out(static_cast<std::size_t>(std::max<std::int64_t>(ref_rows * c.dim_v, 1)));
  std::vector<float> ref_lse(static_cast<std::size_t>(std::max<std::int64_t>(ref_rows, 1)));
  const tensor rout = make_bshd(ref_out.data(), dtype::f32, tensor_batch, rows_q, c.heads_q, c.dim_v);
  const lse_tensor rlse = make_lse(ref_lse.data(), c.heads_q, rows_q);
  options ropt = opt;
  ropt.use = backend::reference;
  ropt.threads = 1;
  ropt.lse = &rlse;
  ropt.stats = nullptr;
  attn_params p;
  if (!attention(q, k, v, rout, s, ropt).ok() || !make_params(q, k, v, rout, s, ropt, p).ok()) violation();

  // Bytes outside the output and LSE views stay as they were.
  std::vector<std::uint8_t> inside_out(bo.bytes.size(), 0), inside_lse(bl.bytes.size(), 0);
  for (std::int64_t b = 0; b < tensor_batch; ++b)
    for (std::int64_t i = 0; i < rows_q; ++i)
      for (std::int64_t h = 0; h < c.heads_q; ++h) {
        for (std::int64_t d = 0; d < c.dim_v; ++d) {
          const std::int64_t e = bo.origin + b * so[0] + i * so[1] + h * so[2] + d * so[3];
          std::fill_n(inside_out.begin() + e * os, os, 1);
        }
        if (want_lse) std::fill_n(inside_lse.begin() + (bl.origin + b * sl[0] + h * sl[1] + i * sl[2]) * 4, 4, 1);
      }
  for (std::size_t i = 0; i < bo.bytes.size(); ++i)
    if (!inside_out[i] && bo.bytes[i] != out_before[i]) violation();
  for (std::size_t i = 0; i < bl.bytes.size(); ++i)
    if (!inside_lse[i] && bl.bytes[i] != lse_before[i]) violation();

  // The bound. The kernel forms each logit s' = score(scale * q.k) in float: its error is at most about
  //   delta = eps32 * ((D + 4) * |scale| * sum_d |q_d k_d| * |d score / d s| + |scale q.k| + |s'|)
  // and a softmax-weighted mean of V moves by at most 2 max|v| * delta (capped at 2 max|v|: any two weightings of the
  // same rows with total weight <= 1). Exponentials, the online rescaling and a bf16 P (the vdpbf16ps kernel) add a
  // few roundings of max|v|; the output dtype one rounding of the result.
  const double eps32 = 0x1p-23, eps_in = dtype_epsilon(c.in), eps_out = dtype_epsilon(c.out);
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    for (std::int64_t h = 0; h < p.heads_q; ++h) {
      const std::int64_t kvh = h / p.group;
      for (std::int64_t i = 0; i < e.q_len; ++i) {
        const std::int64_t qrow = e.q_begin + i;
        double delta = 0.0, vmax = 0.0;
        bool any_allowed = false, beyond_float = false;
        for (std::int64_t j = 0; j < e.k_len; ++j) {
          const std::int64_t krow = e.k_begin + j;
          double dot = 0.0, abs_dot = 0.0;
          for (std::int64_t d = 0; d < p.dim_qk; ++d) {
            const double x = load(q.data, c.in, e.tensor_batch * sq[0] + qrow * sq[1] + h * sq[2] + d * sq[3]);
            const double y = load(k.data, c.in, e.tensor_batch * sk[0] + krow * sk[1] + kvh * sk[2] + d * sk[3]);
            dot += x * y;
            abs_dot += std::fabs(x * y);
          }
          const double logit = p.scale * dot;
          double modified = logit, slope = 1.0;
          if (p.score) {
            modified = (*p.score)(logit, b, h, i, j);
            const double step = std::max(std::fabs(logit) * 0x1p-20, 0x1p-30);
            slope = std::fabs((*p.score)(logit + step, b, h, i, j) - (*p.score)(logit - step, b, h, i, j)) / (2 * step);
          }
          if (!element_allowed(p, b, h, i, j, e.q_len, e.k_len)) continue;
          if (modified == -std::numeric_limits<double>::infinity()) continue;  // masked by the score
          any_allowed = true;
          const double term = eps32 * (static_cast<double>(p.dim_qk + 4) * std::fabs(p.scale) * abs_dot * slope +
                                       std::fabs(logit) + std::fabs(modified));
          delta = std::max(delta, std::isfinite(term) ? term : std::numeric_limits<double>::infinity());
          // A logit past the float range cannot be formed by a float kernel: outside the contract (finite inputs
          // whose logits are floats), so the row is not compared. The scale itself must be a float (validation's job).
          beyond_float |= std::max(std::fabs(p.scale) * abs_dot, std::fabs(modified)) > 0x1p126;
          for (std::int64_t d = 0; d < p.dim_v; ++d)
            vmax = std::max(vmax, std::fabs(load(v.data, c.in, e.tensor_batch * sv[0] + krow * sv[1] + kvh * sv[2] + d * sv[3])));
        }
        const double tol = std::min(2.0 * vmax, vmax * (4.0 * delta + 64.0 * eps32)) +
                           3.0 * std::max(eps_in, eps_out) * vmax + 1e-30;
        if (beyond_float && std::fabs(p.scale) <= std::numeric_limits<float>::max()) continue;
        const std::int64_t ref_row = (e.tensor_batch * rows_q + qrow) * c.heads_q + h;
        for (std::int64_t d = 0; d < p.dim_v; ++d) {
          const double got = load(out.data, c.out, e.tensor_batch * so[0] + qrow * so[1] + h * so[2] + d * so[3]);
          const double want = ref_out[static_cast<std::size_t>(ref_row * c.dim_v + d)];
          if (std::isnan(want)) continue;  // the math itself gives NaN (e.g. an infinite logit): nothing to compare
          if (!any_allowed && got != 0.0) violation();
          if (!(std::fabs(got - want) <= tol + eps_out * std::fabs(want))) violation();
        }
        if (!want_lse) continue;
        const double got = lse.data[e.tensor_batch * sl[0] + h * sl[1] + qrow * sl[2]];
        const double want = ref_lse[static_cast<std::size_t>((e.tensor_batch * c.heads_q + h) * rows_q + qrow)];
        if (std::isnan(want)) continue;
        if (want == -std::numeric_limits<double>::infinity() || !any_allowed) {
          if (!(got == want || (want_sinks && std::fabs(got - want) <= 4 * eps32 * std::max(1.0, std::fabs(want)))))
            violation();
          continue;
        }
        if (!(std::fabs(got - want) <= delta + 2.0 * eps_in + 16.0 * eps32 * std::max(1.0, std::fabs(want)))) violation();
      }
    }
  }
  return 0;
}
