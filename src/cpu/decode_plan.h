// The work plan of attention on a KV cache (no per-ISA code): which rows meet which cached pages, in items a thread
// runs on its own, and where each row's partial results go for the LSE merge.
//   rows:  per (kv head, key range) the rows that read it, sequence-major, then q head of the GQA group, then query:
//          the q heads of one kv head share every K/V tile they read (each cached byte is read once per group).
//   key ranges: sequences that share their first pages (fork: a common prompt) read those pages in one range with
//          all their rows stacked (cascade attention: a shared prefix is read once per step), then their own pages.
//   items: a key range is split into chunks of whole pages (split-K, flash-decoding) so that a call has at least
//          k_target_items items, and the rows into tiles of at most BQ; an item's partial (out, lse) rows are merged
//          per row in item-creation order. The plan depends on the problem only, never on the thread count, so
//          results are bitwise identical for any number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/tiles.h"
#include "omniattn/kv_cache.h"

namespace omniattn::cpu {

struct decode_row {
  std::int64_t b, h, i, t;  // sequence of the call, q head, its i-th new query, token index (L_b - n_b + i)
  std::int64_t tb, row;     // where the query sits in q / out: tensor batch and row
};

struct decode_item {
  std::int64_t kvh, table;  // the kv head and the cache page table whose pages [page0, page1) the item reads
  std::int64_t page0, page1;
  std::int64_t row0, row1;  // rows [row0, row1) of decode_plan::rows
  std::int64_t part0;       // its partial rows are part0 .. part0 + row1 - row0
  std::int64_t cost;
};

struct decode_plan {
  std::vector<decode_row> rows;
  std::vector<decode_item> items;            // in creation order (the merge order)
  std::vector<std::int64_t> part_begin;      // per call row: CSR into part_rows
  std::vector<std::int64_t> part_rows;
  std::int64_t parts = 0;                    // partial rows in all
  std::int64_t cascade_ranges = 0, ranges = 0;
  // live_before[table][page]: cached slots before each page of each (sequence, kv head) table of the call, so a
  // slot's ordinal (the key_mass index) is live_before + its rank in the page.
  std::vector<std::vector<std::int64_t>> live_before;  // [b * heads_kv + kvh][page]
};

// Items a call is split into at least (when its keys allow): enough for every core of a large machine to get work
// and for the merge to stay a small share; fixed, so the result does not depend on threads.
constexpr std::int64_t k_decode_target_items = 16;
// The smallest chunk worth an item of its own (slots).
constexpr std::int64_t k_decode_min_chunk = 512;

// Call rows are (q tensor row, q head) pairs: (tensor batch * rows + row) * heads_q + h.
inline std::int64_t call_rows(const attn_params& p) { return (p.cu_seqlens_q ? 1 : p.batch) * p.seq_rows_q * p.heads_q; }
inline std::int64_t call_row(const attn_params& p, const decode_row& r) { return (r.tb * p.seq_rows_q + r.row) * p.heads_q + r.h; }

inline decode_plan make_decode_plan(const attn_decode_params& dp) {
  const attn_params& p = dp.fwd;
  const kv_cache_view& c = dp.cache;
  decode_plan plan;
  struct range {
    std::int64_t kvh, table, page0, page1;
    std::vector<std::int64_t> members;  // batch entries whose rows read it
    bool cascade;
  };
  std::vector<range> ranges;
  const auto table_of = [&](std::int64_t b, std::int64_t kvh) { return dp.seqs[b] * c.heads_kv + kvh; };
  for (std::int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
    std::vector<char> done(static_cast<std::size_t>(p.batch), 0);
    for (std::int64_t b = 0; b < p.batch; ++b) {
      if (done[static_cast<std::size_t>(b)]) continue;
      done[static_cast<std::size_t>(b)] = 1;
      const std::int64_t tb = table_of(b, kvh), nb = c.page_count[tb];
      if (nb == 0) continue;
      std::vector<std::int64_t> group = {b};
      std::int64_t shared = nb;
      for (std::int64_t b2 = b + 1; b2 < p.batch; ++b2) {
        const std::int64_t t2 = table_of(b2, kvh), n2 = c.page_count[t2];
        if (done[static_cast<std::size_t>(b2)] || n2 == 0 || c.pages[t2][0] != c.pages[tb][0]) continue;
        std::int64_t common = 0;
        while (common < std::min(nb, n2) && c.pages[t2][common] == c.pages[tb][common]) ++common;
        group.push_back(b2);
        shared = std::min(shared, common);
        done[static_cast<std::size_t>(b2)] = 1;
      }
      if (group.size() > 1) {
        ranges.push_back({kvh, tb, 0, shared, group, true});
        for (std::int64_t m : group) {
          const std::int64_t tm = table_of(m, kvh);
          if (c.page_count[tm] > shared) ranges.push_back({kvh, tm, shared, c.page_count[tm], {m}, false});
        }
      } else {
        ranges.push_back({kvh, tb, 0, nb, {b}, false});
      }
    }
  }
  plan.ranges = static_cast<std::int64_t>(ranges.size());
  const std::int64_t want = ranges.empty() ? 1 : (k_decode_target_items + plan.ranges - 1) / plan.ranges;
  std::vector<std::vector<std::int64_t>> parts_of(static_cast<std::size_t>(call_rows(p)));
  for (const range& r : ranges) {
    if (r.cascade) ++plan.cascade_ranges;
    const std::int64_t row0 = static_cast<std::int64_t>(plan.rows.size());
    for (std::int64_t b : r.members) {
      const std::int64_t L = c.length[dp.seqs[b]];
      const seq_extent e = sequence(p, b);
      for (std::int64_t h = r.kvh * p.group; h < (r.kvh + 1) * p.group; ++h)
        for (std::int64_t i = 0; i < e.q_len; ++i) plan.rows.push_back({b, h, i, L - e.q_len + i, e.tensor_batch, e.q_begin + i});
    }
    const std::int64_t row1 = static_cast<std::int64_t>(plan.rows.size());
    if (row1 == row0) continue;  // sequences without new queries in a ragged call read nothing
    const std::int64_t pages = r.page1 - r.page0;
    const std::int64_t by_size = std::max<std::int64_t>(1, pages * c.page_size / k_decode_min_chunk);
    const std::int64_t chunks = std::clamp<std::int64_t>(want, 1, std::min(by_size, pages));
    const std::int64_t per = (pages + chunks - 1) / chunks;
    for (std::int64_t pg = r.page0; pg < r.page1; pg += per)
      for (std::int64_t r0 = row0; r0 < row1; r0 += k_bq) {
        decode_item it{r.kvh, r.table, pg, std::min(r.page1, pg + per), r0, std::min(row1, r0 + k_bq), plan.parts, 0};
        it.cost = (it.page1 - it.page0) * (it.row1 - it.row0 + 8);
        for (std::int64_t x = it.row0; x < it.row1; ++x) {
          const decode_row& dr = plan.rows[static_cast<std::size_t>(x)];
          parts_of[static_cast<std::size_t>(call_row(p, dr))].push_back(plan.parts + x - it.row0);
        }
        plan.parts += it.row1 - it.row0;
        plan.items.push_back(it);
      }
  }
  plan.part_begin.push_back(0);
  for (const auto& v : parts_of) {
    plan.part_rows.insert(plan.part_rows.end(), v.begin(), v.end());
    plan.part_begin.push_back(static_cast<std::int64_t>(plan.part_rows.size()));
  }
  if (dp.key_mass) {
    plan.live_before.resize(static_cast<std::size_t>(p.batch * p.heads_kv));
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
        const std::int64_t t = table_of(b, kvh);
        std::vector<std::int64_t>& lb = plan.live_before[static_cast<std::size_t>(b * p.heads_kv + kvh)];
        std::int64_t n = 0;
        for (std::int64_t pg = 0; pg < c.page_count[t]; ++pg) {
          lb.push_back(n);
          const std::int32_t* idx = c.page_index[c.pages[t][pg]];
          for (std::int64_t s = 0; s < c.page_size; ++s) n += idx[s] >= 0;
        }
      }
  }
  return plan;
}

}  // namespace omniattn::cpu
