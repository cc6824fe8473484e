// The paged KV cache (contract in include/omniattn/kv_cache.h): page pool with reference counts, per (sequence,
// kv head) page tables, copy-on-write, eviction. No SIMD here: appends convert and scatter rows; the kernels read
// the pages.
#include "omniattn/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <stdexcept>
#include <string>

#include "core/storage.h"
#include "omniattn/params.h"

namespace omniattn {

namespace {

constexpr std::int64_t k_max_page_size = 4096;
constexpr std::int64_t k_max_index = std::numeric_limits<std::int32_t>::max();

std::string fmt_i(std::int64_t x) { return std::to_string(x); }

struct page_rec {
  // page_bytes of K / V, 64-byte aligned, then the page_size token indices of its slots (-1: no token), in one
  // allocation: the metadata of a page is its indices and these 24 bytes.
  unsigned char* data = nullptr;
  std::int32_t used = 0;            // slots written (appends go to slot `used`)
  std::int32_t live = 0;            // slots holding a token
  std::int32_t refs = 0;            // page tables that list the page; 0: free
};

struct page_deleter {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{64}); }
};

}  // namespace

struct kv_cache::impl {
  kv_cache_config cfg;
  std::int64_t dim_vp = 0, v_offset = 0, page_bytes = 0, elem = 4;
  std::int64_t rope_dim = 0;
  std::vector<page_rec> pages;
  std::vector<std::int32_t> free_ids;
  // Mirrors of the page pool and page tables for kv_cache_view, kept current by every change.
  std::vector<const void*> page_data;
  std::vector<const std::int32_t*> page_index;
  std::vector<std::vector<std::int32_t>> lists;  // [seq * heads_kv + h]
  std::vector<const std::int32_t*> list_ptr;
  std::vector<std::int64_t> list_count;
  std::vector<std::int64_t> lengths;
  std::vector<char> alive;
  std::vector<eviction_policy> policy;  // per kv head

  std::int64_t heads() const { return cfg.heads_kv; }
  std::int32_t* index_of(std::int32_t id) const {
    return reinterpret_cast<std::int32_t*>(pages[static_cast<std::size_t>(id)].data + page_bytes);
  }
  std::int64_t P() const { return cfg.page_size; }

  void sync(std::int64_t slot) {
    list_ptr[static_cast<std::size_t>(slot)] = lists[static_cast<std::size_t>(slot)].data();
    list_count[static_cast<std::size_t>(slot)] = static_cast<std::int64_t>(lists[static_cast<std::size_t>(slot)].size());
  }

  std::int32_t alloc_page() {
    std::int32_t id;
    if (!free_ids.empty()) {
      id = free_ids.back();
      free_ids.pop_back();
    } else {
      if (pages.size() >= static_cast<std::size_t>(k_max_index)) throw std::length_error("[kv_cache] page pool is full");
      id = static_cast<std::int32_t>(pages.size());
      pages.emplace_back();
      page_data.push_back(nullptr);
      page_index.push_back(nullptr);
    }
    page_rec& pg = pages[static_cast<std::size_t>(id)];
    if (!pg.data)
      pg.data = static_cast<unsigned char*>(::operator new[](static_cast<std::size_t>(page_bytes + 4 * P()), std::align_val_t{64}));
    // Zeroed: the kernels read whole 16-slot segments, so empty slots and V's padding must hold finite values.
    std::memset(pg.data, 0, static_cast<std::size_t>(page_bytes));
    std::fill(index_of(id), index_of(id) + P(), -1);
    pg.used = pg.live = 0;
    pg.refs = 1;
    page_data[static_cast<std::size_t>(id)] = pg.data;
    page_index[static_cast<std::size_t>(id)] = index_of(id);
    return id;
  }

  void unref(std::int32_t id) {
    page_rec& pg = pages[static_cast<std::size_t>(id)];
    if (--pg.refs == 0) free_ids.push_back(id);
  }

  // The page at list position at of a table, made private to it (copied if shared).
  std::int32_t own(std::int64_t slot, std::size_t at) {
    std::int32_t& id = lists[static_cast<std::size_t>(slot)][at];
    if (pages[static_cast<std::size_t>(id)].refs == 1) return id;
    const std::int32_t fresh = alloc_page();
    page_rec& src = pages[static_cast<std::size_t>(id)];
    page_rec& dst = pages[static_cast<std::size_t>(fresh)];
    std::memcpy(dst.data, src.data, static_cast<std::size_t>(page_bytes + 4 * P()));
    dst.used = src.used;
    dst.live = src.live;
    unref(id);
    id = fresh;
    return fresh;
  }

  // Writes one token's K (dim_qk floats, already rotated) and V into slot s of page id.
  void write_slot(std::int32_t id, std::int64_t s, const float* k, const float* v) {
    page_rec& pg = pages[static_cast<std::size_t>(id)];
    const dtype t = cfg.storage;
    for (std::int64_t d = 0; d < cfg.dim_qk; ++d) detail::store_element(pg.data, t, d * P() + s, k[d]);
    for (std::int64_t d = 0; d < cfg.dim_v; ++d) detail::store_element(pg.data, t, v_offset + s * dim_vp + d, v[d]);
  }

  void read_slot(std::int32_t id, std::int64_t s, float* k, float* v) const {
    const page_rec& pg = pages[static_cast<std::size_t>(id)];
    const dtype t = cfg.storage;
    for (std::int64_t d = 0; d < cfg.dim_qk; ++d) k[d] = static_cast<float>(detail::load_element(pg.data, t, d * P() + s));
    for (std::int64_t d = 0; d < cfg.dim_v; ++d)
      v[d] = static_cast<float>(detail::load_element(pg.data, t, v_offset + s * dim_vp + d));
  }

  void push_token(std::int64_t slot, std::int64_t index, const float* k, const float* v) {
    std::vector<std::int32_t>& list = lists[static_cast<std::size_t>(slot)];
    if (list.empty() || pages[static_cast<std::size_t>(list.back())].used == P()) list.push_back(alloc_page());
    const std::int32_t id = own(slot, list.size() - 1);
    page_rec& pg = pages[static_cast<std::size_t>(id)];
    write_slot(id, pg.used, k, v);
    index_of(id)[pg.used] = static_cast<std::int32_t>(index);
    ++pg.used;
    ++pg.live;
  }

  // Drops every cached token of table `slot` whose index satisfies drop(index): slots are cleared in place (the page
  // is copied first if shared), pages left without a token leave the table.
  template <class Drop>
  void drop_tokens(std::int64_t slot, Drop&& drop) {
    std::vector<std::int32_t>& list = lists[static_cast<std::size_t>(slot)];
    std::vector<std::int32_t> kept;
    kept.reserve(list.size());
    for (std::size_t at = 0; at < list.size(); ++at) {
      const page_rec& pg = pages[static_cast<std::size_t>(list[at])];
      const std::int32_t* idx = index_of(list[at]);
      std::int32_t n_drop = 0;
      for (std::int32_t s = 0; s < pg.used; ++s)
        if (idx[s] >= 0 && drop(idx[s])) ++n_drop;
      if (n_drop == 0) {
        kept.push_back(list[at]);
      } else if (n_drop == pg.live) {
        unref(list[at]);
      } else {
        const std::int32_t id = own(slot, at);
        page_rec& w = pages[static_cast<std::size_t>(id)];
        std::int32_t* widx = index_of(id);
        for (std::int32_t s = 0; s < w.used; ++s)
          if (widx[s] >= 0 && drop(widx[s])) {
            widx[s] = -1;
            --w.live;
          }
        kept.push_back(id);
      }
    }
    list.swap(kept);
    sync(slot);
  }

  std::string bad_seq(const char* op, std::int64_t seq) const {
    if (seq < 0 || seq >= static_cast<std::int64_t>(alive.size()))
      return std::string("[kv_cache.") + op + "] sequence " + fmt_i(seq) + " does not exist (ids 0 .. " +
             fmt_i(static_cast<std::int64_t>(alive.size()) - 1) + ")";
    if (!alive[static_cast<std::size_t>(seq)]) return std::string("[kv_cache.") + op + "] sequence " + fmt_i(seq) + " was freed";
    return {};
  }
};

status kv_cache::validate(const kv_cache_config& c) {
  const auto fail = [](const std::string& m) { return status{"[kv_cache] " + m}; };
  if (c.heads_kv <= 0) return fail("config.heads_kv " + fmt_i(c.heads_kv) + " must be > 0");
  if (c.dim_qk <= 0) return fail("config.dim_qk " + fmt_i(c.dim_qk) + " must be > 0");
  if (c.dim_v < 0) return fail("config.dim_v " + fmt_i(c.dim_v) + " must be >= 0 (0: dim_qk)");
  if (c.page_size < 1 || c.page_size > k_max_page_size)
    return fail("config.page_size " + fmt_i(c.page_size) + " must be in 1 .. " + fmt_i(k_max_page_size));
  if (c.storage != dtype::f32 && c.storage != dtype::bf16 && c.storage != dtype::f16)
    return fail(std::string("config.storage ") + dtype_name(c.storage) + " must be f32, bf16 or f16");
  if (c.heads_kv > 65536 || c.dim_qk > 65536 || c.dim_v > 65536)
    return fail("config.heads_kv / dim_qk / dim_v must be <= 65536");
  if (c.rope) {
    const rope_spec& r = *c.rope;
    if (!(r.theta > 0.0)) return fail("config.rope.theta must be > 0");
    const std::int64_t rd = r.rotary_dim == 0 ? c.dim_qk : r.rotary_dim;
    if (rd <= 0 || rd % 2 != 0 || rd > c.dim_qk)
      return fail("config.rope.rotary_dim " + fmt_i(r.rotary_dim) + " must be even and in 2 .. dim_qk " + fmt_i(c.dim_qk));
    if (!r.sections.empty()) {
      std::int64_t sum = 0;
      for (std::int64_t s : r.sections) {
        if (s <= 0) return fail("config.rope.sections must be > 0");
        sum += s;
      }
      if (sum != rd / 2) return fail("config.rope.sections sum " + fmt_i(sum) + " != rotary_dim / 2 " + fmt_i(rd / 2));
    }
  }
  return {};
}

kv_cache::kv_cache(const kv_cache_config& config) : d_(std::make_unique<impl>()) {
  if (const status st = validate(config); !st) throw std::invalid_argument(st.error);
  impl& m = *d_;
  m.cfg = config;
  if (m.cfg.dim_v == 0) m.cfg.dim_v = m.cfg.dim_qk;
  if (m.cfg.rope) {
    m.cfg.rope->pos_q = m.cfg.rope->pos_k = nullptr;
    m.rope_dim = m.cfg.rope->rotary_dim == 0 ? m.cfg.dim_qk : m.cfg.rope->rotary_dim;
  }
  m.elem = dtype_size(m.cfg.storage);
  m.dim_vp = (m.cfg.dim_v + 15) / 16 * 16;
  // The V block starts on a 64-byte boundary, so V rows are as aligned as the page.
  const std::int64_t k_bytes = (m.cfg.dim_qk * m.cfg.page_size * m.elem + 63) / 64 * 64;
  m.v_offset = k_bytes / m.elem;
  m.page_bytes = k_bytes + (m.cfg.page_size * m.dim_vp * m.elem + 63) / 64 * 64;
  m.policy.assign(static_cast<std::size_t>(m.cfg.heads_kv), eviction_policy{});
}

kv_cache::~kv_cache() {
  for (page_rec& pg : d_->pages) page_deleter{}(pg.data);
}

const kv_cache_config& kv_cache::config() const { return d_->cfg; }

std::int64_t kv_cache::add_sequence() {
  impl& m = *d_;
  const auto seq = static_cast<std::int64_t>(m.alive.size());
  m.alive.push_back(1);
  m.lengths.push_back(0);
  for (std::int64_t h = 0; h < m.heads(); ++h) {
    m.lists.emplace_back();
    m.list_ptr.push_back(nullptr);
    m.list_count.push_back(0);
  }
  // Growing `lists` may move the inner vectors (their buffers stay): refresh every pointer.
  for (std::int64_t s = 0; s < static_cast<std::int64_t>(m.lists.size()); ++s) m.sync(s);
  return seq;
}

status kv_cache::fork(std::int64_t seq, std::int64_t& new_seq) {
  if (std::string e = d_->bad_seq("fork", seq); !e.empty()) return {e};
  new_seq = add_sequence();
  impl& m = *d_;
  m.lengths[static_cast<std::size_t>(new_seq)] = m.lengths[static_cast<std::size_t>(seq)];
  for (std::int64_t h = 0; h < m.heads(); ++h) {
    const std::int64_t src = seq * m.heads() + h, dst = new_seq * m.heads() + h;
    m.lists[static_cast<std::size_t>(dst)] = m.lists[static_cast<std::size_t>(src)];
    for (std::int32_t id : m.lists[static_cast<std::size_t>(dst)]) ++m.pages[static_cast<std::size_t>(id)].refs;
    m.sync(dst);
  }
  return {};
}

status kv_cache::free_sequence(std::int64_t seq) {
  impl& m = *d_;
  if (std::string e = m.bad_seq("free_sequence", seq); !e.empty()) return {e};
  for (std::int64_t h = 0; h < m.heads(); ++h) {
    const std::int64_t slot = seq * m.heads() + h;
    for (std::int32_t id : m.lists[static_cast<std::size_t>(slot)]) m.unref(id);
    m.lists[static_cast<std::size_t>(slot)].clear();
    m.sync(slot);
  }
  m.alive[static_cast<std::size_t>(seq)] = 0;
  m.lengths[static_cast<std::size_t>(seq)] = 0;
  return {};
}

status kv_cache::append(std::int64_t seq, const tensor& k, const tensor& v, const std::int64_t* positions) {
  impl& m = *d_;
  if (std::string e = m.bad_seq("append", seq); !e.empty()) return {e};
  const auto fail = [](const std::string& msg) { return status{"[kv_cache.append] " + msg}; };
  for (const auto& [name, t, dim] : {std::tuple<const char*, const tensor*, std::int64_t>{"k", &k, m.cfg.dim_qk},
                                     std::tuple<const char*, const tensor*, std::int64_t>{"v", &v, m.cfg.dim_v}}) {
    if (t->batch != 1) return fail(std::string(name) + ".batch " + fmt_i(t->batch) + " must be 1 (one sequence per append)");
    if (t->heads != m.heads()) return fail(std::string(name) + ".heads " + fmt_i(t->heads) + " != cache heads_kv " + fmt_i(m.heads()));
    if (t->dim != dim) return fail(std::string(name) + ".dim " + fmt_i(t->dim) + " != cache dim " + fmt_i(dim));
    if (t->seq < 0) return fail(std::string(name) + ".seq " + fmt_i(t->seq) + " must be >= 0");
    if (t->seq > 0 && !t->data) return fail(std::string(name) + ".data is null");
    if (t->type == dtype::f32 && reinterpret_cast<std::uintptr_t>(t->data) % 4 != 0)
      return fail(std::string(name) + ".data must be 4-byte aligned for f32");
    if (t->type == dtype::f64 && reinterpret_cast<std::uintptr_t>(t->data) % 8 != 0)
      return fail(std::string(name) + ".data must be 8-byte aligned for f64");
  }
  if (k.seq != v.seq) return fail("k.seq " + fmt_i(k.seq) + " != v.seq " + fmt_i(v.seq));
  const std::int64_t n = k.seq, start = m.lengths[static_cast<std::size_t>(seq)];
  if (start + n > k_max_index) return fail("sequence length " + fmt_i(start + n) + " exceeds " + fmt_i(k_max_index));
  if (n == 0) return {};
  // Eviction first: the tokens no query at index >= start may see under each head's policy.
  for (std::int64_t h = 0; h < m.heads(); ++h) {
    const eviction_policy& pol = m.policy[static_cast<std::size_t>(h)];
    if (pol.window < 0) continue;
    const std::int64_t lo = pol.sinks, hi = start - pol.window;  // drop indices in [lo, hi]
    if (hi >= lo) m.drop_tokens(seq * m.heads() + h, [&](std::int32_t idx) { return idx >= lo && idx <= hi; });
  }
  attn_params rp;
  rope_spec rope;
  if (m.cfg.rope) {
    rope = *m.cfg.rope;
    rope.pos_k = positions;
    rp.rope = &rope;
    rp.rope_dim = m.rope_dim;
    rp.batch = 1;
    rp.seq_rows_k = n;
  }
  std::vector<float> krow(static_cast<std::size_t>(m.cfg.dim_qk)), vrow(static_cast<std::size_t>(m.cfg.dim_v));
  // Head by head: a head's new pages are allocated one after another, so a long append (a prompt) leaves each page
  // table's pages mostly adjacent in memory and decoding reads them as long streams.
  for (std::int64_t h = 0; h < m.heads(); ++h)
    for (std::int64_t t = 0; t < n; ++t) {
      const std::int64_t kb = t * k.stride_seq + h * k.stride_head, vb = t * v.stride_seq + h * v.stride_head;
      for (std::int64_t d = 0; d < m.cfg.dim_qk; ++d)
        krow[static_cast<std::size_t>(d)] = static_cast<float>(detail::load_element(k.data, k.type, kb + d * k.stride_dim));
      for (std::int64_t d = 0; d < m.cfg.dim_v; ++d)
        vrow[static_cast<std::size_t>(d)] = static_cast<float>(detail::load_element(v.data, v.type, vb + d * v.stride_dim));
      if (m.cfg.rope) rope_rotate(rp, false, 0, t, start + t, 0, 0, krow.data());
      m.push_token(seq * m.heads() + h, start + t, krow.data(), vrow.data());
    }
  for (std::int64_t h = 0; h < m.heads(); ++h) m.sync(seq * m.heads() + h);
  m.lengths[static_cast<std::size_t>(seq)] = start + n;
  return {};
}

status kv_cache::truncate(std::int64_t seq, std::int64_t length) {
  impl& m = *d_;
  if (std::string e = m.bad_seq("truncate", seq); !e.empty()) return {e};
  const std::int64_t cur = m.lengths[static_cast<std::size_t>(seq)];
  if (length < 0 || length > cur)
    return {"[kv_cache.truncate] length " + fmt_i(length) + " must be in 0 .. the sequence's length " + fmt_i(cur)};
  for (std::int64_t h = 0; h < m.heads(); ++h) {
    const std::int64_t slot = seq * m.heads() + h;
    m.drop_tokens(slot, [&](std::int32_t idx) { return idx >= length; });
    // Appends continue after the last remaining slot of the last page.
    std::vector<std::int32_t>& list = m.lists[static_cast<std::size_t>(slot)];
    if (!list.empty()) {
      const std::int32_t id = m.own(slot, list.size() - 1);
      page_rec& pg = m.pages[static_cast<std::size_t>(id)];
      while (pg.used > 0 && m.index_of(id)[pg.used - 1] < 0) --pg.used;
      m.sync(slot);
    }
  }
  m.lengths[static_cast<std::size_t>(seq)] = length;
  return {};
}

status kv_cache::set_eviction(std::int64_t kv_head, const eviction_policy& policy) {
  impl& m = *d_;
  if (kv_head < -1 || kv_head >= m.heads())
    return {"[kv_cache.set_eviction] kv_head " + fmt_i(kv_head) + " must be -1 (every head) or in 0 .. " + fmt_i(m.heads() - 1)};
  if (policy.sinks < 0) return {"[kv_cache.set_eviction] policy.sinks " + fmt_i(policy.sinks) + " must be >= 0"};
  if (policy.window == 0) return {"[kv_cache.set_eviction] policy.window 0 keeps no recent token (the new token itself); use >= 1, or < 0 to keep everything"};
  for (std::int64_t h = 0; h < m.heads(); ++h)
    if (kv_head == -1 || kv_head == h) m.policy[static_cast<std::size_t>(h)] = policy;
  return {};
}

status kv_cache::keep_top_k(std::int64_t seq, std::int64_t kv_head, std::span<const float> mass, std::int64_t k) {
  impl& m = *d_;
  if (std::string e = m.bad_seq("keep_top_k", seq); !e.empty()) return {e};
  if (kv_head < 0 || kv_head >= m.heads())
    return {"[kv_cache.keep_top_k] kv_head " + fmt_i(kv_head) + " must be in 0 .. " + fmt_i(m.heads() - 1)};
  const std::int64_t slot = seq * m.heads() + kv_head;
  const std::int64_t n = cached(seq, kv_head);
  if (static_cast<std::int64_t>(mass.size()) != n)
    return {"[kv_cache.keep_top_k] mass has " + fmt_i(static_cast<std::int64_t>(mass.size())) + " entries != cached slots " + fmt_i(n)};
  if (k < 0) return {"[kv_cache.keep_top_k] k " + fmt_i(k) + " must be >= 0"};
  for (float x : mass)
    if (std::isnan(x)) return {"[kv_cache.keep_top_k] mass holds a NaN"};
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return mass[static_cast<std::size_t>(a)] > mass[static_cast<std::size_t>(b)];
  });
  std::vector<char> keep(static_cast<std::size_t>(n), 0);
  for (std::int64_t i = 0; i < std::min(k, n); ++i) keep[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = 1;
  // Compact the kept slots, in slot order, into fresh pages.
  std::vector<std::int32_t> old;
  old.swap(m.lists[static_cast<std::size_t>(slot)]);
  std::vector<float> krow(static_cast<std::size_t>(m.cfg.dim_qk)), vrow(static_cast<std::size_t>(m.cfg.dim_v));
  std::int64_t at = 0;
  for (std::int32_t id : old) {
    // By id on every slot: push_token may grow the pool, which moves the page records.
    const std::int32_t used = m.pages[static_cast<std::size_t>(id)].used;
    for (std::int32_t s = 0; s < used; ++s) {
      const std::int32_t idx = m.index_of(id)[s];
      if (idx < 0) continue;
      if (keep[static_cast<std::size_t>(at++)]) {
        m.read_slot(id, s, krow.data(), vrow.data());
        m.push_token(slot, idx, krow.data(), vrow.data());
      }
    }
  }
  for (std::int32_t id : old) m.unref(id);
  m.sync(slot);
  return {};
}

status kv_cache::shrink() {
  impl& m = *d_;
  for (std::int32_t id : m.free_ids) {
    page_rec& pg = m.pages[static_cast<std::size_t>(id)];
    page_deleter{}(pg.data);
    pg.data = nullptr;
    m.page_data[static_cast<std::size_t>(id)] = nullptr;
    m.page_index[static_cast<std::size_t>(id)] = nullptr;
  }
  return {};
}

std::int64_t kv_cache::sequences() const { return static_cast<std::int64_t>(d_->alive.size()); }

bool kv_cache::alive(std::int64_t seq) const {
  return seq >= 0 && seq < sequences() && d_->alive[static_cast<std::size_t>(seq)];
}

std::int64_t kv_cache::length(std::int64_t seq) const { return alive(seq) ? d_->lengths[static_cast<std::size_t>(seq)] : -1; }

std::int64_t kv_cache::cached(std::int64_t seq, std::int64_t kv_head) const {
  if (!alive(seq) || kv_head < 0 || kv_head >= d_->heads()) return -1;
  std::int64_t n = 0;
  for (std::int32_t id : d_->lists[static_cast<std::size_t>(seq * d_->heads() + kv_head)]) n += d_->pages[static_cast<std::size_t>(id)].live;
  return n;
}

std::vector<std::int64_t> kv_cache::cached_tokens(std::int64_t seq, std::int64_t kv_head) const {
  std::vector<std::int64_t> out;
  if (!alive(seq) || kv_head < 0 || kv_head >= d_->heads()) return out;
  for (std::int32_t id : d_->lists[static_cast<std::size_t>(seq * d_->heads() + kv_head)]) {
    const page_rec& pg = d_->pages[static_cast<std::size_t>(id)];
    for (std::int32_t s = 0; s < pg.used; ++s)
      if (d_->index_of(id)[s] >= 0) out.push_back(d_->index_of(id)[s]);
  }
  return out;
}

status kv_cache::read(std::int64_t seq, std::int64_t kv_head, std::vector<float>& k, std::vector<float>& v) const {
  const impl& m = *d_;
  if (std::string e = m.bad_seq("read", seq); !e.empty()) return {e};
  if (kv_head < 0 || kv_head >= m.heads()) return {"[kv_cache.read] kv_head " + fmt_i(kv_head) + " must be in 0 .. " + fmt_i(m.heads() - 1)};
  k.clear();
  v.clear();
  std::vector<float> krow(static_cast<std::size_t>(m.cfg.dim_qk)), vrow(static_cast<std::size_t>(m.cfg.dim_v));
  for (std::int32_t id : m.lists[static_cast<std::size_t>(seq * m.heads() + kv_head)]) {
    const page_rec& pg = m.pages[static_cast<std::size_t>(id)];
    for (std::int32_t s = 0; s < pg.used; ++s) {
      if (m.index_of(id)[s] < 0) continue;
      m.read_slot(id, s, krow.data(), vrow.data());
      k.insert(k.end(), krow.begin(), krow.end());
      v.insert(v.end(), vrow.begin(), vrow.end());
    }
  }
  return {};
}

kv_cache_memory kv_cache::memory() const {
  const impl& m = *d_;
  kv_cache_memory r;
  r.page_bytes = m.page_bytes;
  for (const page_rec& pg : m.pages) {
    if (pg.refs > 0) {
      ++r.pages_in_use;
      r.tokens += pg.live;
    } else if (pg.data) {
      ++r.pages_free;
    }
  }
  r.data_bytes = r.pages_in_use * m.page_bytes;
  std::int64_t entries = 0;
  for (const auto& list : m.lists) entries += static_cast<std::int64_t>(list.size());
  r.metadata_bytes = r.pages_in_use * (m.P() * 4 + static_cast<std::int64_t>(sizeof(page_rec))) + entries * 4 +
                     static_cast<std::int64_t>(m.lists.size()) * 32;
  return r;
}

kv_cache_view kv_cache::view() const {
  const impl& m = *d_;
  kv_cache_view w;
  w.storage = m.cfg.storage;
  w.page_size = m.P();
  w.heads_kv = m.heads();
  w.dim_qk = m.cfg.dim_qk;
  w.dim_v = m.cfg.dim_v;
  w.dim_vp = m.dim_vp;
  w.v_offset = m.v_offset;
  w.page_data = m.page_data.data();
  w.page_index = m.page_index.data();
  w.pages = m.list_ptr.data();
  w.page_count = m.list_count.data();
  w.length = m.lengths.data();
  w.sequences = sequences();
  w.rope = m.cfg.rope ? &*m.cfg.rope : nullptr;
  return w;
}

}  // namespace omniattn
