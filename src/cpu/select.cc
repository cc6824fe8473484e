// Kernel selection of the CPU backend: the kernel list of each op (cpu/kernels.h) and the walk over it.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "core/backends.h"
#include "core/grid_tiles.h"
#include "core/score_kinds.h"
#include "cpu/bf16_dot.h"
#include "cpu/decode_plan.h"
#include "cpu/kernels.h"
#include "cpu/probe.h"
#include "cpu/tiles.h"

namespace omniattn::cpu {

namespace {

// Sizes the kernels cannot serve are refused before anything is allocated: the packed K/V of one kv head (the
// smallest chunk the kernels pack) and the tile map must fit this machine's physical memory. A broadcast K/V of a
// huge virtual length (stride 0) costs no input memory but would need all of it packed. Head dims have no limit:
// the micro-kernels loop over the head dim and the PV product over column blocks of the register plan.
std::string working_memory_blocker(const attn_params& p, const config& cfg) {
  constexpr double gib = 1024.0 * 1024.0 * 1024.0;
  double keys = 0, tiles = 0;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    keys += static_cast<double>(e.k_len) + static_cast<double>(k_bk);
    tiles += std::ceil(static_cast<double>(e.q_len) / k_bq) * std::ceil(static_cast<double>(e.k_len) / k_bk);
  }
  const double packed = keys * static_cast<double>(p.dim_qk + p.dim_v + 16) * 4.0;
  const double tile_map = tiles * static_cast<double>(p.heads_q);
  if (cfg.machine_bytes == 0.0 || packed + tile_map <= cfg.machine_bytes) return {};
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "needs %.1f GiB of working memory (packed K/V of one kv head %.1f GiB, tile map %.1f GiB), more than "
                "this machine's %.1f GiB",
                (packed + tile_map) / gib, packed / gib, tile_map / gib, cfg.machine_bytes / gib);
  return buf;
}

// What no CPU kernel serves: f64 (the kernels compute in f32; the oracle is the f64 path) and sizes beyond memory.
std::string cpu_blocker(const attn_params& p, const config& cfg) {
  if (p.in_type == dtype::f64 || p.out_type == dtype::f64)
    return "f64 inputs run on the reference backend only (the CPU kernels compute in f32)";
  return working_memory_blocker(p, cfg);
}

// bf16 inputs run on the bf16 dot product where it is faster than fp32 FMA on this CPU: vdpbf16ps does twice the
// FLOPs of an FMA, but some cores issue it on one port only, so both peaks are measured once per process and
// compared. OMNIATTN_BF16_DOT=1 / =0 forces the choice (tests run both kernels that way).
struct bf16_dot_choice {
  bool use = false;
  std::string why;
};

bf16_dot_choice bf16_dot_decision(const config& cfg) {
  if (!cfg.has_bf16_dot) return {false, "no AVX512-BF16 on this CPU"};
  if (cfg.bf16_dot_forced) return {*cfg.bf16_dot_forced, *cfg.bf16_dot_forced ? "OMNIATTN_BF16_DOT=1" : "OMNIATTN_BF16_DOT=0"};
  static const bf16_dot_choice measured = [] {
    const double dot = measure_bf16_dot_peak(1), fma = measure_fp32_peak(1);
    const std::string rates = "bf16 dot " + std::to_string(static_cast<int>(dot)) + " vs fp32 FMA " +
                              std::to_string(static_cast<int>(fma)) + " GFLOP/s per core";
    return bf16_dot_choice{dot > 1.25 * fma, rates};
  }();
  return measured;
}

// ---- forward: the grid path, the bf16 dot-product raster kernel, the fp32 raster kernel ----

std::string grid_name(const attn_params& p) { return std::string("cpu.flash_fwd_grid<") + dtype_name(p.in_type) + ">"; }

std::string grid_rejects(const attn_params& p, const config& cfg) {
  if (std::string no = cpu_blocker(p, cfg); !no.empty()) return no;
  const std::optional<detail::grid_local> g = p.mask ? detail::as_grid_local(*p.mask) : std::nullopt;
  if (!g) return "the mask is not a neighborhood / halo pattern on a grid";
  if (!cfg.grid_enabled) return "OMNIATTN_GRID=0";
  if (p.score) return "a score modifier sees raster positions of contiguous rows";
  if (p.blocks) return "a user block mask is given";
  if (p.causal != causal_mode::none) return "spec.causal is set (use the neighborhood's per-axis causal flag)";
  if (p.cu_seqlens_q) return "varlen batches";
  if (p.total_q || p.total_k || p.total_heads) return "options.block: the call is a block of a larger problem, not a whole grid";
  if (p.seq_q != g->tokens() || (g->extra_keys ? p.seq_k < g->tokens() : p.seq_k != g->tokens()))
    return "q/k lengths " + std::to_string(p.seq_q) + "/" + std::to_string(p.seq_k) + " do not match the grid's " +
           std::to_string(g->tokens()) + " tokens" + (g->extra_keys ? " (+ additional keys)" : "");
  return {};
}

void grid_describe(const attn_params& p, const config& cfg, std::vector<std::string>& r) {
  const std::string name = grid_name(p);
  const detail::grid_local g = *detail::as_grid_local(*p.mask);
  r.push_back(name + ": " + cfg.isa);
  r.push_back(name + ": " + p.mask->str() + " on query boxes of the grid, each reading the box of keys " +
              "its queries reach in place (16-key line segments of K/V packed once per call): " +
              detail::cached_grid_plan(g, k_bq, k_plan_row_block, g.extra_keys ? p.seq_k - g.tokens() : 0)->describe());
  if (p.rope)
    r.push_back(name + ": RoPE (rotary dim " + std::to_string(p.rope_dim) +
                ") applied to Q when loaded and to K while packing, from per-token cos/sin tables");
  if (p.in_type != dtype::f32) r.push_back(name + ": inputs widened to f32 while packing; compute in f32");
}

std::string raster_name(const attn_params& p, bool bf16_dot) {
  return std::string("cpu.flash_fwd<") + dtype_name(p.in_type) + (bf16_dot ? ",bf16dot>" : ">");
}

void raster_describe(const attn_params& p, const config& cfg, bool bf16_dot, std::vector<std::string>& r) {
  const std::string name = raster_name(p, bf16_dot);
  r.push_back(name + ": fused tiled online-softmax kernel over the sparse block plan, tiles " + std::to_string(k_bq) + "x" +
              std::to_string(k_bk) + ", " + std::to_string(p.threads) + " thread(s), " + cfg.isa);
  if (p.mask)
    r.push_back(name + ": mask " + p.mask->str() +
                " classified per tile; on PARTIAL tiles only, one allowed-key word per row (built-in patterns in "
                "closed form, a user mask functor called per element)");
  if (p.blocks)
    r.push_back(name + ": user block mask (" + std::to_string(p.blocks->q_tile) + "x" + std::to_string(p.blocks->kv_tile) +
                " tiles) honored as given: EMPTY tiles skipped, FULL tiles without the mask");
  if (p.rope)
    r.push_back(name + ": RoPE (rotary dim " + std::to_string(p.rope_dim) +
                ") applied to Q and K while packing, from per-token cos/sin tables");
  if (p.score) r.push_back(name + ": " + detail::describe_score(*p.score));
  if (bf16_dot)
    r.push_back(name + ": QK^T and PV on the AVX512-BF16 dot product (P rounded to bf16), fp32 softmax and accumulation (" +
                bf16_dot_decision(cfg).why + ")");
  else if (p.in_type != dtype::f32)
    r.push_back(name + ": inputs widened to f32 while packing; compute in f32" +
                (p.in_type == dtype::bf16 ? " (bf16 dot product not used: " + bf16_dot_decision(cfg).why + ")" : ""));
}

// The bf16-dot kernel rounds P to bf16, an error an f32 output would show: it serves bf16 outputs only. RoPE rotates
// in fp32 while packing, which the bf16 pair packing skips: such calls widen to fp32.
std::string bf16_dot_rejects(const attn_params& p, const config& cfg) {
  if (std::string no = cpu_blocker(p, cfg); !no.empty()) return no;
  if (p.in_type != dtype::bf16 || p.out_type != dtype::bf16) return "serves bf16 inputs with a bf16 output only";
  if (p.rope) return "RoPE rotates in fp32 while packing";
  if (const bf16_dot_choice c = bf16_dot_decision(cfg); !c.use) return c.why;
  return {};
}

std::string f32_rejects(const attn_params& p, const config& cfg) { return cpu_blocker(p, cfg); }

const kernel<attn_params> k_forward[] = {
    {grid_name, grid_rejects, grid_describe, run_flash_fwd_grid},
    {[](const attn_params& p) { return raster_name(p, true); }, bf16_dot_rejects,
     [](const attn_params& p, const config& c, std::vector<std::string>& r) { raster_describe(p, c, true, r); },
     run_flash_fwd_bf16_dot},
    {[](const attn_params& p) { return raster_name(p, false); }, f32_rejects,
     [](const attn_params& p, const config& c, std::vector<std::string>& r) { raster_describe(p, c, false, r); },
     run_flash_fwd},
};

// ---- backward ----

std::string bwd_name(const attn_bwd_params& p) { return std::string("cpu.flash_bwd<") + dtype_name(p.fwd.in_type) + ">"; }

std::string bwd_rejects(const attn_bwd_params& p, const config& cfg) {
  if (std::string no = cpu_blocker(p.fwd, cfg); !no.empty()) return no;
  if (p.d_bias) {
    // Each bias entry must have one writer (a work item owns a kv head, a range of key tiles and one sequence, or
    // every batch entry when the bias is broadcast over a fixed-length batch): a bias broadcast over the heads of
    // several kv heads, or over varlen sequences (their key tiles differ), would have several.
    std::vector<detail::score_step> steps;
    detail::lower_score(*p.fwd.score, steps);
    const detail::bias_score& bias = *steps[static_cast<std::size_t>(detail::dense_bias_step(steps))].bias;
    if (bias.shape[0] == 1 && p.fwd.batch > 1 && p.fwd.cu_seqlens_q)
      return "gradients.d_bias of a bias broadcast over the sequences of a varlen batch is computed by the reference "
             "backend only";
    if (bias.shape[1] == 1 && p.fwd.heads_kv > 1)
      return "gradients.d_bias of a bias broadcast over the heads of several kv heads is computed by the reference "
             "backend only";
  }
  return {};
}

void bwd_describe(const attn_bwd_params& bp, const config& cfg, std::vector<std::string>& r) {
  const attn_params& p = bp.fwd;
  const std::string name = bwd_name(bp);
  r.push_back(name + ": fused FlashAttention-2 backward, kv-major over the sparse block plan (tiles " + std::to_string(k_bq) +
              "x" + std::to_string(k_bk) + "), P recomputed from the LSE, " + std::to_string(p.threads) +
              " thread(s), deterministic, " + cfg.isa);
  if (p.mask) r.push_back(name + ": mask " + p.mask->str() + " classified per tile; row bits on PARTIAL tiles only");
  if (p.score) r.push_back(name + ": " + detail::describe_score(*p.score) + "; its derivative by the chain rule");
  if (p.rope) r.push_back(name + ": RoPE applied while packing; dq, dk rotated back");
  if (bp.d_bias) r.push_back(name + ": dense bias gradient accumulated per tile, one writer per entry");
  if (p.in_type != dtype::f32) r.push_back(name + ": inputs widened to f32 while packing; compute and accumulate in f32");
}

const kernel<attn_bwd_params> k_backward[] = {
    {bwd_name, bwd_rejects, bwd_describe, run_flash_bwd},
};

// The walk: the first kernel that fits runs; every kernel before it says why it did not.
// ---- decode on a KV cache ----

std::string decode_name(const attn_decode_params& p) {
  return std::string("cpu.decode<") + dtype_name(p.cache.storage) + (p.cache.page_size % 16 == 0 ? ">" : ",gathered>");
}

std::string decode_rejects(const attn_decode_params& p, const config&) {
  if (p.fwd.in_type == dtype::f64 || p.fwd.out_type == dtype::f64)
    return "f64 queries run on the reference backend only (the CPU kernels compute in f32)";
  return {};
}

void decode_describe(const attn_decode_params& p, const config& cfg, std::vector<std::string>& r) {
  const std::string name = decode_name(p);
  const decode_plan plan = make_decode_plan(p);
  r.push_back(name + ": " + cfg.isa + ", " + std::to_string(p.fwd.threads) + " thread(s)");
  r.push_back(name + ": " + std::to_string(p.fwd.group) + " q head(s) x " + std::to_string(p.fwd.seq_q) +
              " query row(s) per kv head stacked into one tile: each cached K/V byte is read once per GQA group");
  if (p.cache.page_size % 16 == 0)
    r.push_back(name + ": pages of " + std::to_string(p.cache.page_size) + " tokens read in place (" +
                dtype_name(p.cache.storage) + " widened in registers), no packing");
  else
    r.push_back(name + ": page size " + std::to_string(p.cache.page_size) +
                " is not a multiple of 16: each 64-slot tile is gathered into f32 first");
  r.push_back(name + ": " + std::to_string(plan.items.size()) + " items over " + std::to_string(plan.ranges) +
              " key range(s) (split-K into chunks of whole pages, fixed by the problem), merged per row in a fixed "
              "order: bitwise identical for any thread count");
  if (plan.cascade_ranges)
    r.push_back(name + ": cascade: " + std::to_string(plan.cascade_ranges) +
                " shared-prefix range(s) read once for every sequence that shares them");
  if (p.fwd.score) r.push_back(name + ": " + detail::describe_score(*p.fwd.score));
}

const kernel<attn_decode_params> k_decode[] = {
    {decode_name, decode_rejects, decode_describe, run_decode},
};

template <class Sel, class Params, std::size_t N>
Sel walk(const kernel<Params> (&list)[N], const Params& p, const config& cfg) {
  Sel sel;
  for (const kernel<Params>& k : list) {
    const std::string why = k.rejects(p, cfg);
    if (!why.empty()) {
      sel.reasons.push_back(k.name(p) + ": not used: " + why);
      continue;
    }
    sel.run = k.run;
    sel.name = k.name(p);
    k.describe(p, cfg, sel.reasons);
    return sel;
  }
  return sel;
}

}  // namespace

config resolve_config() {
  config c;
  c.isa = dispatch_isa();
  const char* grid = std::getenv("OMNIATTN_GRID");
  c.grid_enabled = !(grid && std::string(grid) == "0");
  if (const char* dot = std::getenv("OMNIATTN_BF16_DOT")) {
    if (std::string(dot) == "1") c.bf16_dot_forced = true;
    if (std::string(dot) == "0") c.bf16_dot_forced = false;
  }
  // CPU features and memory size do not change while the process runs; cpuid traps to the hypervisor on a VM (tens
  // of microseconds), a visible share of a decode step, so they are read once.
  static const bool bf16_dot = has_bf16_dot();
  static const double machine_bytes = [] {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0.0;
  }();
  c.has_bf16_dot = bf16_dot;
  c.machine_bytes = machine_bytes;
  return c;
}

selection select(const attn_params& p, const config& cfg) { return walk<selection>(k_forward, p, cfg); }
backward_selection select_backward(const attn_bwd_params& p, const config& cfg) { return walk<backward_selection>(k_backward, p, cfg); }

decode_selection select_decode(const attn_decode_params& p, const config& cfg) { return walk<decode_selection>(k_decode, p, cfg); }

selection select(const attn_params& p) { return select(p, resolve_config()); }
decode_selection select_decode(const attn_decode_params& p) { return select_decode(p, resolve_config()); }
backward_selection select_backward(const attn_bwd_params& p) { return select_backward(p, resolve_config()); }

}  // namespace omniattn::cpu
