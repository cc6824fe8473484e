// Local attention over an N-d token grid (neighborhood, blocked / halo), seen as per-axis windows.
//
// A grid-local mask allows query i to see key j iff, on every axis a, j's coordinate lies in window(a, i's coordinate):
// the keys first, first + step, ..., (count of them). Tokens are numbered row-major over the grid (the last axis is
// contiguous), for the flattened [batch, seq, heads, dim] layout and NATTEN's [batch, *spatial, heads, dim] alike.
// The kernels use this form to gather each query tile's keys (a box of the grid) instead of scanning raster tiles,
// and the naive baselines to enumerate a query's keys; masks.cc evaluates the very same windows.
#pragma once

#include <cstdint>
#include <optional>

#include "omniattn/masks.h"

namespace omniattn::detail {

struct axis_window {
  std::int64_t first = 0, step = 1, count = 0;
};

struct grid_local {
  enum class kind : std::uint8_t { neighborhood, halo } type = kind::neighborhood;
  int rank = 1;
  std::int64_t grid[3] = {1, 1, 1};
  // neighborhood (NATTEN): kernel, dilation, stride, causal per axis
  std::int64_t kernel[3] = {1, 1, 1}, dilation[3] = {1, 1, 1}, stride[3] = {1, 1, 1};
  bool causal[3] = {false, false, false};
  // halo (HaloNet): query blocks of `block` tokens per axis see their block widened by `halo` on each side (clipped)
  std::int64_t block[3] = {1, 1, 1}, halo[3] = {0, 0, 0};

  bool extra_keys = false;  // keys at or past tokens() are seen by every query (their count is Lk - tokens())

  std::int64_t tokens() const { return grid[0] * (rank > 1 ? grid[1] : 1) * (rank > 2 ? grid[2] : 1); }
  // The keys a query at coordinate qc (0 <= qc < grid[axis]) sees on `axis`.
  axis_window window(int axis, std::int64_t qc) const;
};

// The grid-local pattern when the mask is exactly one neighborhood or halo pattern, or one of them | ~sinks(t) with
// t = the grid's tokens (NATTEN's additional KV: keys past the grid that every query sees; extra_keys is then set);
// nullopt otherwise.
std::optional<grid_local> as_grid_local(const mask_expr& m);

}  // namespace omniattn::detail
