// merge_attention_states: validate (core/validate.cc), then per (batch, seq, head) row load every part's values to
// fp32, merge them with merge_state_row (core/merge_states.h) and store the row in out's dtype.
#include "omniattn/merge.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "core/checked_math.h"
#include "core/merge_states.h"
#include "core/parallel.h"
#include "core/storage.h"
#include "core/validate.h"
#include "cpu/tiles.h"

namespace omniattn {
namespace {

std::int64_t row_offset(const tensor& t, std::int64_t b, std::int64_t s, std::int64_t h) {
  return b * t.stride_batch + s * t.stride_seq + h * t.stride_head;
}

std::int64_t lse_offset(const lse_tensor& l, std::int64_t b, std::int64_t s, std::int64_t h) {
  return b * l.stride_batch + h * l.stride_head + s * l.stride_seq;
}

// The validated call. Each thread owns a slice of the row buffers, allocated before any output is written, so a
// failed allocation leaves out and lse_out as they were; the row loop itself allocates nothing.
void merge_rows(std::span<const tensor> outs, std::span<const lse_tensor> lses, const tensor& out,
                const lse_tensor* lse_out, int threads) {
  const tensor& shape = outs[0];
  const std::int64_t rows = shape.batch * shape.seq * shape.heads;  // out's extent bounds it (validated)
  if (rows == 0) return;
  const auto n = static_cast<std::int64_t>(outs.size());
  const std::int64_t dim = shape.dim;
  const int team = static_cast<int>(std::min<std::int64_t>(threads, rows));
  std::int64_t values_per_thread = 0, values = 0;  // n part rows and the merged row
  if (!detail::product_fits({n + 1, dim}, &values_per_thread) || !detail::product_fits({values_per_thread, team}, &values))
    throw std::bad_alloc();
  std::vector<float> row_values(static_cast<std::size_t>(values));
  std::vector<float> row_lses(static_cast<std::size_t>(n * team));
  std::vector<const float*> row_parts(static_cast<std::size_t>(n * team));

  detail::parallel_errors errors;
#pragma omp parallel for num_threads(team) schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    errors.run([&] {
      const int t = omp_get_thread_num();
      float* part_values = row_values.data() + t * values_per_thread;
      float* merged = part_values + n * dim;
      float* part_lses = row_lses.data() + t * n;
      const float** parts = row_parts.data() + t * n;
      const std::int64_t h = r % shape.heads, s = r / shape.heads % shape.seq, b = r / shape.heads / shape.seq;
      for (std::int64_t i = 0; i < n; ++i) {
        const tensor& x = outs[static_cast<std::size_t>(i)];
        parts[i] = part_values + i * dim;
        cpu::load_row(x.data, x.type, row_offset(x, b, s, h), x.stride_dim, dim, part_values + i * dim);
        const lse_tensor& l = lses[static_cast<std::size_t>(i)];
        part_lses[i] = l.data[lse_offset(l, b, s, h)];
      }
      const float lse = detail::merge_state_row(parts, part_lses, n, dim, merged);
      const std::int64_t o = row_offset(out, b, s, h);
      for (std::int64_t d = 0; d < dim; ++d) detail::store_element(out.data, out.type, o + d * out.stride_dim, merged[d]);
      if (lse_out) lse_out->data[lse_offset(*lse_out, b, s, h)] = lse;
    });
  }
  errors.rethrow();
}

}  // namespace

status merge_attention_states(std::span<const tensor> outs, std::span<const lse_tensor> lses, const tensor& out,
                              const lse_tensor* lse_out, int threads) {
  const std::string tag = "[merge_attention_states] ";
  try {
    int team = 0;
    if (status st = detail::check_merge(outs, lses, out, lse_out, threads, team); !st) return st;
    merge_rows(outs, lses, out, lse_out, team);
    return {};
  } catch (const std::bad_alloc&) {
    return {tag + "out of memory: the row buffers for " + std::to_string(outs.size()) + " parts of head dim " +
            std::to_string(outs.empty() ? 0 : outs[0].dim) + " could not be allocated (output untouched)"};
  } catch (const std::exception& e) {
    return {tag + "failed: " + e.what()};
  } catch (...) {
    return {tag + "failed with an exception that is not a std::exception"};
  }
}

}  // namespace omniattn
