// The CPU backend's kernel list: every kernel of every op declared once, with the rule that rejects a call it cannot
// serve, what it says when chosen, and its entry point. select() / select_backward() (cpu/select.cc) walk the list
// of the op in order and take the first kernel that fits; the reasons of the rest say why not (omniattn explain).
// Adding a kernel is its family file plus one entry here.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "omniattn/attention.h"
#include "omniattn/kv_cache.h"

namespace omniattn::cpu {

// Entry points of the kernel families (each dispatches to the best compiled ISA once per call).
void run_flash_fwd(const attn_params& p);           // flash_fwd.cc: raster tiles, fp32 FMA
void run_flash_fwd_bf16_dot(const attn_params& p);  // flash_fwd.cc: raster tiles, AVX512-BF16 dot products
void run_flash_fwd_grid(const attn_params& p);      // flash_fwd.cc: query boxes of a neighborhood / halo grid
void run_flash_bwd(const attn_bwd_params& p);       // flash_bwd.cc: the backward, kv-major
void run_decode(const attn_decode_params& p);       // decode.cc: new queries against a paged KV cache

// What selection depends on besides the call: the ISA, environment overrides and measured probes. Resolved once per
// call, before select(), which is then a pure function of (params, config). The timed bf16 probe runs once per
// process, on first need.
struct config {
  std::string isa;                      // "ISA AVX3": the Highway target dispatch runs
  bool grid_enabled = true;             // OMNIATTN_GRID=0 turns the grid path off
  std::optional<bool> bf16_dot_forced;  // OMNIATTN_BF16_DOT=1 / =0
  bool has_bf16_dot = false;            // AVX512-BF16 on this CPU
  double machine_bytes = 0.0;           // physical memory (0: unknown)
};
config resolve_config();

template <class Params>
struct kernel {
  std::string (*name)(const Params&);
  std::string (*rejects)(const Params&, const config&);  // "" when the kernel serves the call, else why not
  void (*describe)(const Params&, const config&, std::vector<std::string>& reasons);  // why it runs, as it runs
  void (*run)(const Params&);
};

selection select(const attn_params& p, const config& cfg);
backward_selection select_backward(const attn_bwd_params& p, const config& cfg);
decode_selection select_decode(const attn_decode_params& p, const config& cfg);

}  // namespace omniattn::cpu
