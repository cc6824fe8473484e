// The naive neighborhood baseline: what a plain implementation of NATTEN-style local attention does, per query.
// It is the reference point of issue #5's "fused >= 10x naive" target, so it is written the way NATTEN's naive CPU
// backend is: straightforward loops over the query's own window (no tiles, no key boxes shared between queries, no
// blocking), fp32 arithmetic, OpenMP over (head, query). The dot and weighted-sum loops are plain loops the compiler
// vectorizes (the dot product's reduction is marked `omp simd`, which is what -ffast-math would allow anyway) for the
// running CPU (attend_row); nothing else is tuned.
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bench/bench.h"
#include "core/grid_local.h"
#include "core/storage.h"

namespace omniattn::bench {
namespace {

// One row of `n` elements (element stride `stride`) as f32. bf16 is widened inline (a shift): the library's
// out-of-line bf16_to_f32 would make the baseline's gather a function call per element, a cost no real naive kernel pays.
void load_row_f32(const void* base, dtype t, std::int64_t offset, std::int64_t stride, std::int64_t n, float* dst) {
  switch (t) {
    case dtype::f32: {
      const float* src = static_cast<const float*>(base) + offset;
      for (std::int64_t d = 0; d < n; ++d) dst[d] = src[d * stride];
      break;
    }
    case dtype::bf16: {
      const std::uint16_t* src = static_cast<const std::uint16_t*>(base) + offset;
      for (std::int64_t d = 0; d < n; ++d) dst[d] = std::bit_cast<float>(static_cast<std::uint32_t>(src[d * stride]) << 16);
      break;
    }
    case dtype::f16: {
      const std::uint16_t* src = static_cast<const std::uint16_t*>(base) + offset;
      for (std::int64_t d = 0; d < n; ++d) dst[d] = f16_to_f32(src[d * stride]);
      break;
    }
    case dtype::f64: {
      const double* src = static_cast<const double*>(base) + offset;
      for (std::int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d * stride]);
      break;
    }
  }
}

// One query's arithmetic over its gathered rows: scores, softmax, weighted sum into acc (unnormalized); returns the
// softmax denominator. Cloned per x86-64 level (GCC function multiversioning, picked at load time) so the plain loops
// get the running CPU's vector width as the fused kernel does through Highway: the library builds for baseline
// x86-64 (SSE2), and a naive baseline held to SSE2 would flatter the fused kernel's speedup.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) float attend_row(
    const float* q, const float* const* k_rows, const float* const* v_rows, std::int64_t count, std::int64_t dim_qk,
    std::int64_t dim_v, float scale, float* s, float* acc) {
  float mx = -INFINITY;
  for (std::int64_t t = 0; t < count; ++t) {
    const float* k = k_rows[t];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (std::int64_t d = 0; d < dim_qk; ++d) dot += q[d] * k[d];
    s[t] = scale * dot;
    mx = std::max(mx, s[t]);
  }
  float sum = 0.0f;
  for (std::int64_t t = 0; t < count; ++t) {
    s[t] = std::exp(s[t] - mx);
    sum += s[t];
  }
  for (std::int64_t d = 0; d < dim_v; ++d) acc[d] = 0.0f;
  for (std::int64_t t = 0; t < count; ++t) {
    const float w = s[t];
    const float* v = v_rows[t];
    for (std::int64_t d = 0; d < dim_v; ++d) acc[d] += w * v[d];
  }
  return sum;
}

}  // namespace

std::string naive_local_unsupported(const attn_params& p) {
  if (!p.mask || !detail::as_grid_local(*p.mask))
    return "the mask is not a single grid-local pattern (neighborhood or halo)";
  if (detail::as_grid_local(*p.mask)->extra_keys) return "additional keys (grid | ~sinks(tokens)) are not in the naive baseline";
  if (p.score || p.rope || p.sink_logits || p.blocks)
    return "score modifiers, RoPE, sinks and block masks are not in the naive neighborhood baseline";
  return {};
}

void naive_local_attention(const attn_params& p, int threads) {
  const detail::grid_local g = *detail::as_grid_local(*p.mask);
  const std::int64_t tokens = g.tokens();
  // The grid as three axes, unused leading axes of size 1, so one triple loop enumerates any rank's window.
  std::int64_t extent[3] = {1, 1, 1};
  for (int a = 0; a < g.rank; ++a) extent[3 - g.rank + a] = g.grid[a];
  const std::int64_t axis_stride[3] = {extent[1] * extent[2], extent[2], 1};
  // f32 rows with unit dim stride are read in place; anything else is gathered (and widened) into scratch rows.
  const bool k_direct = p.in_type == dtype::f32 && p.k_stride[3] == 1;
  const bool v_direct = p.in_type == dtype::f32 && p.v_stride[3] == 1;
  const bool o_direct = p.out_type == dtype::f32 && p.o_stride[3] == 1;
  const float scale = static_cast<float>(p.scale);

  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    const std::int64_t rows = p.heads_q * e.q_len;
#pragma omp parallel num_threads(std::max(1, threads))
    {
      std::vector<float> q(static_cast<std::size_t>(p.dim_qk)), acc(static_cast<std::size_t>(p.dim_v)), s;
      std::vector<float> k_rows, v_rows;
      std::vector<const float*> k_ptr, v_ptr;
      std::vector<std::int64_t> keys;
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t h = r / e.q_len, i = r % e.q_len, kvh = h / p.group;
        // The query's window: per axis, the keys grid_local::window gives (the same function the mask evaluates).
        keys.clear();
        if (i < tokens) {
          detail::axis_window w[3] = {{0, 1, 1}, {0, 1, 1}, {0, 1, 1}};
          std::int64_t rest = i;
          for (int a = g.rank - 1; a >= 0; --a) {
            w[3 - g.rank + a] = g.window(a, rest % g.grid[a]);
            rest /= g.grid[a];
          }
          for (std::int64_t x = 0; x < w[0].count; ++x)
            for (std::int64_t y = 0; y < w[1].count; ++y)
              for (std::int64_t z = 0; z < w[2].count; ++z) {
                const std::int64_t j = (w[0].first + x * w[0].step) * axis_stride[0] +
                                       (w[1].first + y * w[1].step) * axis_stride[1] + (w[2].first + z * w[2].step);
                if (j < e.k_len && causal_allows(p.causal, i, j, e.q_len, e.k_len)) keys.push_back(j);
              }
        }
        const std::size_t count = keys.size();
        const std::int64_t q_off = e.tensor_batch * p.q_stride[0] + (e.q_begin + i) * p.q_stride[1] + h * p.q_stride[2];
        load_row_f32(p.q, p.in_type, q_off, p.q_stride[3], p.dim_qk, q.data());
        // Gather the window's key and value rows.
        k_ptr.resize(count);
        v_ptr.resize(count);
        if (!k_direct) k_rows.resize(count * static_cast<std::size_t>(p.dim_qk));
        if (!v_direct) v_rows.resize(count * static_cast<std::size_t>(p.dim_v));
        for (std::size_t t = 0; t < count; ++t) {
          const std::int64_t row = e.k_begin + keys[t];
          const std::int64_t k_off = e.tensor_batch * p.k_stride[0] + row * p.k_stride[1] + kvh * p.k_stride[2];
          const std::int64_t v_off = e.tensor_batch * p.v_stride[0] + row * p.v_stride[1] + kvh * p.v_stride[2];
          if (k_direct) {
            k_ptr[t] = static_cast<const float*>(p.k) + k_off;
          } else {
            float* dst = k_rows.data() + t * static_cast<std::size_t>(p.dim_qk);
            load_row_f32(p.k, p.in_type, k_off, p.k_stride[3], p.dim_qk, dst);
            k_ptr[t] = dst;
          }
          if (v_direct) {
            v_ptr[t] = static_cast<const float*>(p.v) + v_off;
          } else {
            float* dst = v_rows.data() + t * static_cast<std::size_t>(p.dim_v);
            load_row_f32(p.v, p.in_type, v_off, p.v_stride[3], p.dim_v, dst);
            v_ptr[t] = dst;
          }
        }
        s.resize(count);
        const float sum = attend_row(q.data(), k_ptr.data(), v_ptr.data(), static_cast<std::int64_t>(count), p.dim_qk,
                                     p.dim_v, scale, s.data(), acc.data());
        // A query that sees no key (outside the grid) gets zeros, as in the oracle.
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const std::int64_t o_off = e.tensor_batch * p.o_stride[0] + (e.q_begin + i) * p.o_stride[1] + h * p.o_stride[2];
        if (o_direct) {
          float* o = static_cast<float*>(p.out) + o_off;
          for (std::int64_t d = 0; d < p.dim_v; ++d) o[d] = acc[static_cast<std::size_t>(d)] * inv;
        } else {
          for (std::int64_t d = 0; d < p.dim_v; ++d)
            detail::store_element(p.out, p.out_type, o_off + d * p.o_stride[3], acc[static_cast<std::size_t>(d)] * inv);
        }
      }
    }
  }
}

}  // namespace omniattn::bench
