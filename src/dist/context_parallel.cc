// Context-parallel attention over MPI (contract in include/omniattn/dist.h): the sequence in C chunks over P ranks,
// each (query chunk, key chunk) block computed by the CPU kernel as a block of the whole problem (options::block),
// and the blocks of one query chunk folded in a fixed order, so the bits depend on C and the layout only.
#include "omniattn/dist.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <sstream>
#include <utility>

#include "core/storage.h"

namespace omniattn::dist {
namespace {

constexpr float k_neg_inf = -std::numeric_limits<float>::infinity();

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Chunk c of a sequence of n tokens in `chunks` pieces: [c n / C, (c + 1) n / C).
std::int64_t chunk_begin(std::int64_t n, std::int64_t chunks, std::int64_t c) { return c * n / chunks; }

// The fold order of query chunk i: i, i - 1, ..., 0, C - 1, ..., i + 1 (the order K/V arrive on a ring).
std::vector<std::int64_t> fold_order(std::int64_t i, std::int64_t chunks) {
  std::vector<std::int64_t> o;
  for (std::int64_t s = 0; s < chunks; ++s) o.push_back(((i - s) % chunks + chunks) % chunks);
  return o;
}

// One rank's K or V shard (or a copy of another rank's) packed as [batch][rows][heads][dim] in the input dtype.
struct kv_block {
  std::vector<std::uint8_t> k, v;
};

struct layout_info {
  int ranks = 1, rank = 0;
  std::int64_t n = 0, chunks = 0;
  std::vector<std::vector<std::int64_t>> held;   // per rank: its chunks in local order
  std::vector<std::int64_t> owner, local_row;    // per chunk: its rank and first row in that rank's shard
  std::vector<std::int64_t> rows;                // per rank: shard rows
  std::int64_t begin(std::int64_t c) const { return chunk_begin(n, chunks, c); }
  std::int64_t len(std::int64_t c) const { return begin(c + 1) - begin(c); }
};

// The call's shapes, the same on every rank.
struct shapes {
  std::int64_t batch, heads_q, heads_kv, dim, dim_v;
  dtype type;
};

// The (m, l, o) running state of one query chunk's fold, f32, and its pending out-of-turn partials.
struct chunk_fold {
  std::int64_t chunk = 0, rows = 0, local_row = 0;
  std::int64_t heads = 0, head0 = 0;  // the q heads folded here (all, or a Ulysses rank's group) and the first one
  std::vector<std::int64_t> order;  // the non-empty key chunks, in fold order
  std::size_t next = 0;
  std::vector<float> m, l, o;       // [batch][heads][rows], same, [batch][rows][heads][dim_v]
  std::map<std::int64_t, std::pair<std::vector<float>, std::vector<float>>> pending;  // key chunk -> (out, lse)
};

void fold_part(const shapes& sh, chunk_fold& f, const std::vector<float>& out, const std::vector<float>& lse) {
  for (std::int64_t b = 0; b < sh.batch; ++b)
    for (std::int64_t h = 0; h < f.heads; ++h)
      for (std::int64_t r = 0; r < f.rows; ++r) {
        const std::size_t at = static_cast<std::size_t>((b * f.heads + h) * f.rows + r);
        const float lp = lse[at];
        if (lp == k_neg_inf) continue;  // an empty row of the block: weight 0, exactly nothing to add
        const float m_new = std::max(f.m[at], lp);
        const float a = f.m[at] == k_neg_inf ? 0.0f : std::exp(f.m[at] - m_new), w = std::exp(lp - m_new);
        f.m[at] = std::isnan(lp) ? lp : m_new;
        f.l[at] = f.l[at] * a + w;
        float* o = f.o.data() + ((b * f.rows + r) * f.heads + h) * sh.dim_v;
        const float* src = out.data() + ((b * f.rows + r) * f.heads + h) * sh.dim_v;
        for (std::int64_t d = 0; d < sh.dim_v; ++d) o[d] = o[d] * a + w * src[d];
      }
}

// Folds the partial of key chunk j now if it is next in the order (then whatever waited behind it), else keeps it.
void offer(const shapes& sh, chunk_fold& f, std::int64_t j, std::vector<float> out, std::vector<float> lse, std::int64_t& most_pending) {
  if (f.next < f.order.size() && f.order[f.next] == j) {
    fold_part(sh, f, out, lse);
    ++f.next;
    while (f.next < f.order.size()) {
      const auto it = f.pending.find(f.order[f.next]);
      if (it == f.pending.end()) break;
      fold_part(sh, f, it->second.first, it->second.second);
      f.pending.erase(it);
      ++f.next;
    }
    return;
  }
  f.pending.emplace(j, std::make_pair(std::move(out), std::move(lse)));
  most_pending = std::max(most_pending, static_cast<std::int64_t>(f.pending.size()));
}

// A BSHD view of rows [row0, row0 + rows) of a packed [batch][total][heads][dim] buffer.
tensor packed_view(const std::vector<std::uint8_t>& buf, dtype t, std::int64_t batch, std::int64_t total, std::int64_t heads,
                   std::int64_t dim, std::int64_t row0, std::int64_t rows) {
  tensor x = make_bshd(const_cast<std::uint8_t*>(buf.data()), t, batch, total, heads, dim);
  x.data = const_cast<std::uint8_t*>(buf.data()) + row0 * x.stride_seq * dtype_size(t);
  x.seq = rows;
  return x;
}

// Rows [row0, row0 + rows) of a BSHD tensor with its own strides.
tensor rows_of(tensor x, std::int64_t row0, std::int64_t rows) {
  x.data = static_cast<char*>(x.data) + row0 * x.stride_seq * dtype_size(x.type);
  x.seq = rows;
  return x;
}

// Heads [h0, h0 + n) of a BSHD tensor.
tensor heads_of(tensor x, std::int64_t h0, std::int64_t n) {
  x.data = static_cast<std::uint8_t*>(x.data) + h0 * x.stride_head * dtype_size(x.type);
  x.heads = n;
  return x;
}

void pack(const tensor& x, std::vector<std::uint8_t>& dst) {
  const int es = dtype_size(x.type);
  dst.resize(static_cast<std::size_t>(x.batch * x.seq * x.heads * x.dim * es));
  std::size_t at = 0;
  const auto* src = static_cast<const std::uint8_t*>(x.data);
  for (std::int64_t b = 0; b < x.batch; ++b)
    for (std::int64_t s = 0; s < x.seq; ++s)
      for (std::int64_t h = 0; h < x.heads; ++h) {
        const std::int64_t off = b * x.stride_batch + s * x.stride_seq + h * x.stride_head;
        if (x.stride_dim == 1) {  // a row at a time: the common layouts
          std::memcpy(dst.data() + at, src + off * es, static_cast<std::size_t>(x.dim * es));
          at += static_cast<std::size_t>(x.dim * es);
          continue;
        }
        for (std::int64_t d = 0; d < x.dim; ++d, at += static_cast<std::size_t>(es))
          std::memcpy(dst.data() + at, src + (off + d * x.stride_dim) * es, static_cast<std::size_t>(es));
      }
}

// Everything one call needs on this rank.
struct call {
  call(const tensor& q_, const tensor& k_, const tensor& v_, const tensor& out_, const spec& s_, const cp_options& o_)
      : q(q_), k(k_), v(v_), out(out_), s(s_), o(o_) {}
  const tensor &q, &k, &v, &out;
  const spec& s;
  cp_options o;                      // the caller's, on the library's private duplicate of its communicator
  shapes sh{};
  layout_info li;
  spec local;                        // the spec without sink logits (they join the fold once, at its end)
  std::vector<chunk_fold> folds;     // this rank's query chunks
  cp_report rep;
  std::int64_t most_pending = 0;
  std::vector<std::vector<std::uint8_t>> returned;  // Ulysses: each rank's finished chunks for its heads, to store
  std::vector<char> nonempty;        // [C][C]: the block (query chunk i, key chunk j) has an allowed pair
  std::int64_t head0 = 0, heads_total = 0;  // the hybrid's ring stage: its q heads are head0.. of heads_total (0: all)
  MPI_Request* inflight = nullptr;   // the transfers flying while the local blocks run (ring, TokenRing), polled
  const int* n_inflight = nullptr;   //   between head groups of a block (see progress())
  attn_params base{};                // params of one representative block, for the emptiness test
};

// Whether the block (query chunk i, key chunk j) has an allowed pair: the kernel's own block classification, exact.
// Computed once per call (classify_blocks) and then read from call::nonempty.
bool classify_block(const call& c, std::int64_t i, std::int64_t j) {
  attn_params p = c.base;
  p.seq_q = p.seq_rows_q = c.li.len(i);
  p.seq_k = p.seq_rows_k = c.li.len(j);
  p.pos_q0 = c.li.begin(i);
  p.pos_k0 = c.li.begin(j);
  if (p.seq_q == 0 || p.seq_k == 0) return false;
  const block_mask bm = build_block_mask(p, p.seq_q, p.seq_k);
  return std::any_of(bm.kinds.begin(), bm.kinds.end(), [](tile_kind t) { return t != tile_kind::empty; });
}

void classify_blocks(call& c) {
  const std::int64_t n = c.li.chunks;
  c.nonempty.assign(static_cast<std::size_t>(n * n), 0);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j) c.nonempty[static_cast<std::size_t>(i * n + j)] = classify_block(c, i, j) ? 1 : 0;
}

bool block_nonempty(const call& c, std::int64_t i, std::int64_t j) {
  return c.nonempty[static_cast<std::size_t>(i * c.li.chunks + j)] != 0;
}

// Open MPI (as most MPIs without an asynchronous progress thread) moves a large message only inside MPI calls of
// its two ranks: over shared memory the sender pushes its fragments as the receiver drains them. A block computed
// in one kernel call would leave the transfers of its step waiting for the final MPI_Waitall. So while transfers fly
// a block runs as a few calls over groups of heads (bitwise the one call: rows of a head do not depend on the other
// heads, the tested options::block contract), with an MPI_Testall between them.
bool transfers_in_flight(const call& c) { return c.inflight != nullptr && c.n_inflight != nullptr && *c.n_inflight > 0; }

void progress(call& c) {
  if (!transfers_in_flight(c)) return;
  int done = 0;
  MPI_Testall(*c.n_inflight, c.inflight, &done, MPI_STATUSES_IGNORE);
}

// The kv-head groups [g0, g0 + gn) a block is computed in: one group without transfers in flight, else about 8.
template <class Piece>
status by_head_groups(call& c, std::int64_t kv_heads, Piece&& piece) {
  const std::int64_t groups = transfers_in_flight(c) ? std::min<std::int64_t>(kv_heads, 8) : 1;
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t g0 = g * kv_heads / groups, g1 = (g + 1) * kv_heads / groups;
    if (status st = piece(g0, g1 - g0); !st.ok()) return st;
    if (g + 1 < groups) progress(c);
  }
  return {};
}

// The partial result of one block: out [batch][rows][heads][dim_v] and lse [batch][heads][rows], f32.
struct partial {
  std::vector<float> out, lse;
};

// The block (query chunk i, key chunk j) on the CPU kernel. qv: chunk i's query rows (heads qv.heads, the first of
// them head0 of the problem); blk: the K/V of j's owner with kv_heads heads.
status block_partial(call& c, const tensor& qv, std::int64_t i, std::int64_t j, const kv_block& blk, partial& r,
                     std::int64_t kv_heads, std::int64_t head0) {
  const shapes& sh = c.sh;
  const std::int64_t owner = c.li.owner[static_cast<std::size_t>(j)], heads = qv.heads;
  const std::int64_t total = c.li.rows[static_cast<std::size_t>(owner)];
  const std::int64_t row0 = c.li.local_row[static_cast<std::size_t>(j)], len = c.li.len(j), rows = c.li.len(i);
  try {
    r.out.assign(static_cast<std::size_t>(sh.batch * rows * heads * sh.dim_v), 0.0f);
    r.lse.assign(static_cast<std::size_t>(sh.batch * heads * rows), 0.0f);
  } catch (const std::bad_alloc&) {  // fail this rank's call, collectively, instead of leaving the others waiting
    return {"[dist::attention] out of memory for a block's partial result"};
  }
  const std::int64_t group = heads / kv_heads;
  const tensor k_all = packed_view(blk.k, sh.type, sh.batch, total, kv_heads, sh.dim, row0, len);
  const tensor v_all = packed_view(blk.v, sh.type, sh.batch, total, kv_heads, sh.dim_v, row0, len);
  const tensor out_all = make_bshd(r.out.data(), dtype::f32, sh.batch, rows, heads, sh.dim_v);
  const double t0 = now();
  const status st = by_head_groups(c, kv_heads, [&](std::int64_t g0, std::int64_t gn) {
    lse_tensor l = make_lse(r.lse.data(), heads, rows);
    l.data += g0 * group * l.stride_head;
    const problem_block pb{c.li.begin(i), c.li.begin(j), c.li.n, c.li.n, head0 + g0 * group, c.heads_total ? c.heads_total : sh.heads_q};
    options opt;
    opt.use = backend::cpu;
    opt.allow_fallback = false;
    opt.threads = c.o.threads;
    opt.lse = &l;
    opt.block = &pb;
    return omniattn::attention(heads_of(qv, g0 * group, gn * group), heads_of(k_all, g0, gn), heads_of(v_all, g0, gn),
                               heads_of(out_all, g0 * group, gn * group), c.local, opt);
  });
  c.rep.compute_seconds += now() - t0;
  if (st.ok()) ++c.rep.pairs_computed;
  return st;
}

// The block (query chunk f.chunk of this rank, key chunk j) offered to the fold.
status compute_pair(call& c, chunk_fold& f, std::int64_t j, const kv_block& blk) {
  partial r;
  if (status st = block_partial(c, rows_of(c.q, f.local_row, f.rows), f.chunk, j, blk, r, c.sh.heads_kv, c.head0); !st.ok()) return st;
  offer(c.sh, f, j, std::move(r.out), std::move(r.lse), c.most_pending);
  return {};
}

// Every pair of this rank's query chunks with the key chunks of `owner`'s block that is not empty.
status compute_block(call& c, const kv_block& blk, std::int64_t owner) {
  for (chunk_fold& f : c.folds)
    for (std::int64_t j : c.li.held[static_cast<std::size_t>(owner)])
      if (std::find(f.order.begin(), f.order.end(), j) != f.order.end())
        if (status st = compute_pair(c, f, j, blk); !st.ok()) return st;
  return {};
}

// The fold's result: out [batch][rows][heads][dim_v] = o / l and lse = m + log l, after the sink logit of each head
// (one more part: lse = sink, out = 0); rows that met nothing give 0 and -inf.
void finish_fold(const call& c, const chunk_fold& f, std::vector<float>& out, std::vector<float>& lse) {
  const shapes& sh = c.sh;
  out.assign(static_cast<std::size_t>(sh.batch * f.rows * f.heads * sh.dim_v), 0.0f);
  lse.assign(static_cast<std::size_t>(sh.batch * f.heads * f.rows), k_neg_inf);
  for (std::int64_t b = 0; b < sh.batch; ++b)
    for (std::int64_t r = 0; r < f.rows; ++r)
      for (std::int64_t h = 0; h < f.heads; ++h) {
        const std::size_t at = static_cast<std::size_t>((b * f.heads + h) * f.rows + r);
        float m = f.m[at], l = f.l[at], scale = 1.0f;
        if (c.s.sink_logits) {
          const float sk = c.s.sink_logits[f.head0 + h];
          const float m_new = std::max(m, sk);
          scale = m == k_neg_inf ? 0.0f : std::exp(m - m_new);
          l = l * scale + std::exp(sk - m_new);
          m = m_new;
        }
        const float inv = l == 0.0f ? 0.0f : scale / l;
        const std::size_t o_at = static_cast<std::size_t>(((b * f.rows + r) * f.heads + h) * sh.dim_v);
        for (std::int64_t d = 0; d < sh.dim_v; ++d) out[o_at + static_cast<std::size_t>(d)] = f.o[o_at + static_cast<std::size_t>(d)] * inv;
        lse[at] = l == 0.0f ? k_neg_inf : m + std::log(l);
      }
}

// Stores a finished chunk (rows local_row.., heads head0 .. head0 + heads - 1) into the caller's out and lse.
void store_chunk(const call& c, std::int64_t local_row, std::int64_t rows, std::int64_t head0, std::int64_t heads,
                 const float* out, const float* lse) {
  const shapes& sh = c.sh;
  for (std::int64_t b = 0; b < sh.batch; ++b)
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t row = local_row + r, hh = head0 + h;
        const std::int64_t base = b * c.out.stride_batch + row * c.out.stride_seq + hh * c.out.stride_head;
        const float* o = out + ((b * rows + r) * heads + h) * sh.dim_v;
        if (c.out.type == dtype::f32 && c.out.stride_dim == 1) {
          std::memcpy(static_cast<float*>(c.out.data) + base, o, static_cast<std::size_t>(sh.dim_v) * sizeof(float));
        } else {
          for (std::int64_t d = 0; d < sh.dim_v; ++d)
            detail::store_element(c.out.data, c.out.type, base + d * c.out.stride_dim, static_cast<double>(o[d]));
        }
        if (c.o.lse)
          c.o.lse->data[b * c.o.lse->stride_batch + hh * c.o.lse->stride_head + row * c.o.lse->stride_seq] =
              lse[(b * heads + h) * rows + r];
      }
}

void write_outputs(const call& c) {
  std::vector<float> out, lse;
  for (const chunk_fold& f : c.folds) {
    finish_fold(c, f, out, lse);
    store_chunk(c, f.local_row, f.rows, f.head0, f.heads, out.data(), lse.data());
  }
}

// Row datatype of a packed block: one (token, head) row of dim elements, so counts stay far below INT_MAX.
MPI_Datatype row_type(int bytes) {
  MPI_Datatype t;
  MPI_Type_contiguous(bytes, MPI_BYTE, &t);
  MPI_Type_commit(&t);
  return t;
}

// need[t][b]: some query chunk of rank t meets some key chunk of rank b (the same answer on every rank).
using need_matrix = std::vector<std::vector<bool>>;
need_matrix rank_needs(const call& c) {
  const int P = c.li.ranks;
  need_matrix need(static_cast<std::size_t>(P), std::vector<bool>(static_cast<std::size_t>(P), false));
  for (int t = 0; t < P; ++t)
    for (int b = 0; b < P; ++b)
      for (std::int64_t i : c.li.held[static_cast<std::size_t>(t)])
        for (std::int64_t j : c.li.held[static_cast<std::size_t>(b)])
          if (!need[static_cast<std::size_t>(t)][static_cast<std::size_t>(b)] && block_nonempty(c, i, j))
            need[static_cast<std::size_t>(t)][static_cast<std::size_t>(b)] = true;
  return need;
}

// The blocks (i of q_owner's chunks, j of kv_owner's) that are not empty, in the order both sides of a message of
// their partial results pack them.
std::vector<std::pair<std::int64_t, std::int64_t>> nonempty_pairs(const call& c, int q_owner, int kv_owner) {
  std::vector<std::pair<std::int64_t, std::int64_t>> v;
  for (std::int64_t i : c.li.held[static_cast<std::size_t>(q_owner)])
    for (std::int64_t j : c.li.held[static_cast<std::size_t>(kv_owner)])
      if (block_nonempty(c, i, j)) v.emplace_back(i, j);
  return v;
}

// The K/V ring the forward and the backward share: at step s this rank holds the shard of rank r - s (a shard travels
// as far as the last rank whose queries meet it, need[t][b]); the transfers of step s (to r + 1, from r - 1, tags
// tag_stride s and + 1) are posted, then work(s, owner, shard, requests, count) runs while they fly (it may post its
// own requests, at most 4), then every request completes and done(s) runs. A failed work step must still post what
// the other ranks wait for.
template <class Work, class Done>
void kv_ring(call& c, kv_block& mine, const need_matrix& need, int tag_stride, Work&& work, Done&& done) {
  const int P = c.li.ranks, r = c.li.rank;
  std::vector<int> hops(static_cast<std::size_t>(P), 0);
  for (int b = 0; b < P; ++b)
    for (int s = 1; s < P; ++s)
      if (need[static_cast<std::size_t>((b + s) % P)][static_cast<std::size_t>(b)]) hops[static_cast<std::size_t>(b)] = s;
  const int es = dtype_size(c.sh.type);
  MPI_Datatype k_row = row_type(static_cast<int>(c.sh.dim * es)), v_row = row_type(static_cast<int>(c.sh.dim_v * es));
  const auto rows_of_rank = [&](int b) { return static_cast<int>(c.sh.batch * c.li.rows[static_cast<std::size_t>(b)] * c.sh.heads_kv); };
  kv_block other, next;
  kv_block* cur = &mine;
  for (int s = 0; s < P; ++s) {
    const int cur_owner = ((r - s) % P + P) % P, next_owner = ((r - s - 1) % P + P) % P;
    MPI_Request req[8];
    int n_req = 0;
    const bool send = s + 1 < P && hops[static_cast<std::size_t>(cur_owner)] >= s + 1;
    const bool recv = s + 1 < P && hops[static_cast<std::size_t>(next_owner)] >= s + 1;
    if (s + 1 < P) c.rep.messages_skipped += !send;
    if (recv) {
      next.k.resize(static_cast<std::size_t>(rows_of_rank(next_owner)) * static_cast<std::size_t>(c.sh.dim * es));
      next.v.resize(static_cast<std::size_t>(rows_of_rank(next_owner)) * static_cast<std::size_t>(c.sh.dim_v * es));
      MPI_Irecv(next.k.data(), rows_of_rank(next_owner), k_row, (r - 1 + P) % P, tag_stride * s, c.o.comm, &req[n_req++]);
      MPI_Irecv(next.v.data(), rows_of_rank(next_owner), v_row, (r - 1 + P) % P, tag_stride * s + 1, c.o.comm, &req[n_req++]);
      c.rep.bytes_received += static_cast<std::int64_t>(next.k.size() + next.v.size());
    }
    if (send) {
      MPI_Isend(cur->k.data(), rows_of_rank(cur_owner), k_row, (r + 1) % P, tag_stride * s, c.o.comm, &req[n_req++]);
      MPI_Isend(cur->v.data(), rows_of_rank(cur_owner), v_row, (r + 1) % P, tag_stride * s + 1, c.o.comm, &req[n_req++]);
      c.rep.bytes_sent += static_cast<std::int64_t>(cur->k.size() + cur->v.size());
    }
    c.inflight = req;
    c.n_inflight = &n_req;
    work(s, cur_owner, *cur, req, n_req);
    c.inflight = nullptr;
    c.n_inflight = nullptr;
    const double t0 = now();
    MPI_Waitall(n_req, req, MPI_STATUSES_IGNORE);
    c.rep.wait_seconds += now() - t0;
    done(s);
    if (recv) {
      std::swap(other, next);
      cur = &other;
    }
  }
  MPI_Type_free(&k_row);
  MPI_Type_free(&v_row);
}

status run_ring(call& c, kv_block& mine) {
  const need_matrix need = rank_needs(c);
  const int r = c.li.rank;
  status result;
  // The local tiles run while the transfers are in flight. A failed kernel still completes the exchange, so no rank
  // is left waiting.
  kv_ring(c, mine, need, 2, [&](int, int owner, const kv_block& blk, MPI_Request*, int&) {
    if (result.ok() && need[static_cast<std::size_t>(r)][static_cast<std::size_t>(owner)]) result = compute_block(c, blk, owner);
  }, [](int) {});
  return result;
}

// TokenRing: the K/V stay; each rank's Q travels forward along the ring (to the farthest rank whose keys it meets),
// and the partial (out, lse) of every block goes straight back to the Q's owner, so both directions of each link carry
// traffic. Step s: rank r holds Q of rank r - d s, forwards it, computes it against its own K/V and returns the
// partials, while it receives the partials of its own Q against the K/V of rank r + d s.
status run_token_ring(call& c, kv_block& mine) {
  const int P = c.li.ranks, r = c.li.rank;
  const need_matrix need = rank_needs(c);
  // Q travels in the direction d (+1: to rank r + 1) that needs fewer hops in all: backward for causal masks (a
  // query meets the keys of earlier ranks), so its partials also come back in the fold's order.
  const auto hops_in = [&](int d) {
    std::vector<int> h(static_cast<std::size_t>(P), 0);
    for (int t = 0; t < P; ++t)
      for (int s = 1; s < P; ++s)
        if (need[static_cast<std::size_t>(t)][static_cast<std::size_t>(((t + d * s) % P + P) % P)]) h[static_cast<std::size_t>(t)] = s;
    return h;
  };
  const std::vector<int> fwd = hops_in(1), bwd = hops_in(-1);
  const bool back = std::accumulate(bwd.begin(), bwd.end(), 0) < std::accumulate(fwd.begin(), fwd.end(), 0);
  const int d = back ? -1 : 1;
  const std::vector<int>& hops = back ? bwd : fwd;  // hops of the Q of rank t
  const auto ring = [P](int x) { return (x % P + P) % P; };
  c.rep.reasons.push_back(std::string("token_ring: Q travels ") + (back ? "backward (to rank r - 1)" : "forward (to rank r + 1)") +
                          ", " + std::to_string(std::accumulate(hops.begin(), hops.end(), 0)) + " Q hops in all");
  const shapes& sh = c.sh;
  const int es = dtype_size(sh.type);
  const auto q_rows = [&](int t) { return sh.batch * c.li.rows[static_cast<std::size_t>(t)] * sh.heads_q; };
  const auto pairs_of = [&](int q_owner, int kv_owner) { return nonempty_pairs(c, q_owner, kv_owner); };
  const auto partial_floats = [&](std::int64_t i) { return sh.batch * c.li.len(i) * sh.heads_q * (sh.dim_v + 1); };
  MPI_Datatype q_row = row_type(static_cast<int>(sh.dim * es));
  std::vector<std::uint8_t> q_cur, q_next;
  pack(c.q, q_cur);
  // Q hop s moves the Q of rank r - d (s - 1) (held here) to r + d and brings that of r - d s from r - d; it is
  // posted one step ahead, so it flies while this rank computes.
  MPI_Request q_req[2];
  int n_q = 0;
  const auto post_q_hop = [&](int s) {
    n_q = 0;
    if (s > P - 1) return;
    const int cur_owner = ring(r - d * (s - 1)), next_owner = ring(r - d * s);
    if (hops[static_cast<std::size_t>(next_owner)] >= s) {
      q_next.resize(static_cast<std::size_t>(q_rows(next_owner) * sh.dim * es));
      MPI_Irecv(q_next.data(), static_cast<int>(q_rows(next_owner)), q_row, ring(r - d), 4 * s, c.o.comm, &q_req[n_q++]);
      c.rep.bytes_received += static_cast<std::int64_t>(q_next.size());
    }
    if (hops[static_cast<std::size_t>(cur_owner)] >= s) {
      MPI_Isend(q_cur.data(), static_cast<int>(q_rows(cur_owner)), q_row, ring(r + d), 4 * s, c.o.comm, &q_req[n_q++]);
      c.rep.bytes_sent += static_cast<std::int64_t>(q_cur.size());
    } else {
      ++c.rep.messages_skipped;
    }
  };
  post_q_hop(1);
  c.inflight = q_req;  // the Q hop of the next step flies while the blocks of this one run
  c.n_inflight = &n_q;
  status result;
  if (need[static_cast<std::size_t>(r)][static_cast<std::size_t>(r)]) result = compute_block(c, mine, r);
  for (int s = 1; s < P; ++s) {
    const int q_owner = ring(r - d * s), kv_from = ring(r + d * s);
    double t0 = now();
    MPI_Waitall(n_q, q_req, MPI_STATUSES_IGNORE);
    c.rep.wait_seconds += now() - t0;
    const bool have_q = hops[static_cast<std::size_t>(q_owner)] >= s;
    if (have_q) std::swap(q_cur, q_next);
    post_q_hop(s + 1);
    // Partials of q_owner's Q against this rank's K/V go back to q_owner; this rank's Q against kv_from's K/V come
    // back from kv_from.
    const auto out_pairs = pairs_of(q_owner, r), in_pairs = pairs_of(r, kv_from);
    MPI_Request req[2];
    int n_req = 0;
    std::vector<float> send_buf, recv_buf;
    std::int64_t in_floats = 0;
    for (const auto& pr : in_pairs) in_floats += partial_floats(pr.first);
    if (!in_pairs.empty()) {
      recv_buf.resize(static_cast<std::size_t>(in_floats));
      MPI_Irecv(recv_buf.data(), static_cast<int>(in_floats), MPI_FLOAT, kv_from, 4 * s + 1, c.o.comm, &req[n_req++]);
      c.rep.bytes_received += in_floats * 4;
    }
    if (!out_pairs.empty()) {
      const tensor qv_all = make_bshd(q_cur.data(), sh.type, sh.batch, c.li.rows[static_cast<std::size_t>(q_owner)], sh.heads_q, sh.dim);
      for (const auto& [i, j] : out_pairs) {
        partial pt;
        // A failed kernel still sends (zeros), so no rank waits forever; the failure is reported collectively.
        if (result.ok())
          result = block_partial(c, rows_of(qv_all, c.li.local_row[static_cast<std::size_t>(i)], c.li.len(i)), i, j, mine, pt,
                                 sh.heads_kv, 0);
        pt.out.resize(static_cast<std::size_t>(sh.batch * c.li.len(i) * sh.heads_q * sh.dim_v), 0.0f);
        pt.lse.resize(static_cast<std::size_t>(sh.batch * sh.heads_q * c.li.len(i)), 0.0f);
        send_buf.insert(send_buf.end(), pt.out.begin(), pt.out.end());
        send_buf.insert(send_buf.end(), pt.lse.begin(), pt.lse.end());
      }
      MPI_Isend(send_buf.data(), static_cast<int>(send_buf.size()), MPI_FLOAT, q_owner, 4 * s + 1, c.o.comm, &req[n_req++]);
      c.rep.bytes_sent += static_cast<std::int64_t>(send_buf.size()) * 4;
    }
    t0 = now();
    MPI_Waitall(n_req, req, MPI_STATUSES_IGNORE);
    c.rep.wait_seconds += now() - t0;
    std::size_t at = 0;
    for (const auto& [i, j] : in_pairs) {
      const auto n_out = static_cast<std::size_t>(sh.batch * c.li.len(i) * sh.heads_q * sh.dim_v);
      const auto n_lse = static_cast<std::size_t>(sh.batch * sh.heads_q * c.li.len(i));
      const auto first = recv_buf.begin() + static_cast<std::ptrdiff_t>(at);
      std::vector<float> out(first, first + static_cast<std::ptrdiff_t>(n_out));
      std::vector<float> lse(first + static_cast<std::ptrdiff_t>(n_out), first + static_cast<std::ptrdiff_t>(n_out + n_lse));
      at += n_out + n_lse;
      for (chunk_fold& f : c.folds)
        if (f.chunk == i) offer(sh, f, j, std::move(out), std::move(lse), c.most_pending);
    }
  }
  c.inflight = nullptr;
  c.n_inflight = nullptr;
  MPI_Type_free(&q_row);
  return result;
}

// Rows of x (all of them) and heads [h0, h0 + n), appended to dst as [batch][rows][n][dim].
void pack_heads(const tensor& x, std::int64_t h0, std::int64_t n, std::vector<std::uint8_t>& dst) {
  std::vector<std::uint8_t> part;
  pack(heads_of(x, h0, n), part);
  dst.insert(dst.end(), part.begin(), part.end());
}

// One all-to-all of byte buffers: send[t] to rank t; returns what each rank sent here. The sizes were checked
// against MPI's int counts for every rank before the exchanges (message_limits).
std::vector<std::vector<std::uint8_t>> all_to_all_on(call& c, MPI_Comm comm, int self,
                                                     const std::vector<std::vector<std::uint8_t>>& send,
                                                     const std::vector<std::int64_t>& recv_bytes) {
  const int P = static_cast<int>(send.size());
  std::vector<int> sc(static_cast<std::size_t>(P)), sd(sc.size()), rc(sc.size()), rd(sc.size());
  std::int64_t so = 0, ro = 0;
  for (int t = 0; t < P; ++t) {
    const auto ti = static_cast<std::size_t>(t);
    sc[ti] = static_cast<int>(send[ti].size());
    rc[ti] = static_cast<int>(recv_bytes[ti]);
    sd[ti] = static_cast<int>(so);
    rd[ti] = static_cast<int>(ro);
    so += static_cast<std::int64_t>(send[ti].size());
    ro += recv_bytes[ti];
  }
  std::vector<std::vector<std::uint8_t>> got(static_cast<std::size_t>(P));
  std::vector<std::uint8_t> sbuf, rbuf(static_cast<std::size_t>(ro));
  for (const auto& s : send) sbuf.insert(sbuf.end(), s.begin(), s.end());
  const double t0 = now();
  MPI_Alltoallv(sbuf.data(), sc.data(), sd.data(), MPI_BYTE, rbuf.data(), rc.data(), rd.data(), MPI_BYTE, comm);
  c.rep.wait_seconds += now() - t0;
  for (int t = 0; t < P; ++t) {
    const auto ti = static_cast<std::size_t>(t);
    if (t != self) {
      c.rep.bytes_sent += sc[ti];
      c.rep.bytes_received += rc[ti];
    }
    got[ti].assign(rbuf.begin() + rd[ti], rbuf.begin() + rd[ti] + rc[ti]);
  }
  return got;
}

std::vector<std::vector<std::uint8_t>> all_to_all(call& c, const std::vector<std::vector<std::uint8_t>>& send,
                                                  const std::vector<std::int64_t>& recv_bytes) {
  return all_to_all_on(c, c.o.comm, c.li.rank, send, recv_bytes);
}

// Ulysses (DeepSpeed): an all-to-all turns the sequence shards into head shards (rank t: q heads t H / P .., every
// token), each rank computes every chunk pair for its heads (the same blocks and fold as the other mechanisms: the
// kernel's rows do not depend on the other heads of a call), and a second all-to-all returns each chunk's out and
// lse to the rank that holds its tokens.
status run_ulysses(call& c) {
  const int P = c.li.ranks, r = c.li.rank;
  const shapes& sh = c.sh;
  const std::int64_t gq = sh.heads_q / P, gkv = sh.heads_kv / P, es = dtype_size(sh.type);
  status st;
  std::vector<std::vector<std::uint8_t>> sq(static_cast<std::size_t>(P)), sk(sq.size()), sv(sq.size());
  std::vector<std::int64_t> rq(sq.size()), rk(sq.size()), rv(sq.size());
  for (int t = 0; t < P; ++t) {
    const auto ti = static_cast<std::size_t>(t);
    pack_heads(c.q, t * gq, gq, sq[ti]);
    pack_heads(c.k, t * gkv, gkv, sk[ti]);
    pack_heads(c.v, t * gkv, gkv, sv[ti]);
    const std::int64_t rows = sh.batch * c.li.rows[ti];
    rq[ti] = rows * gq * sh.dim * es;
    rk[ti] = rows * gkv * sh.dim * es;
    rv[ti] = rows * gkv * sh.dim_v * es;
  }
  const auto q_from = all_to_all(c, sq, rq);
  const auto k_from = all_to_all(c, sk, rk);
  const auto v_from = all_to_all(c, sv, rv);
  std::vector<kv_block> kv(static_cast<std::size_t>(P));
  for (int t = 0; t < P; ++t) {
    kv[static_cast<std::size_t>(t)].k = k_from[static_cast<std::size_t>(t)];
    kv[static_cast<std::size_t>(t)].v = v_from[static_cast<std::size_t>(t)];
  }
  // Every chunk pair for this rank's heads, each chunk's keys in its fold order: nothing waits.
  for (chunk_fold& f : c.folds) {
    const std::int64_t owner = c.li.owner[static_cast<std::size_t>(f.chunk)];
    const tensor q_all = make_bshd(const_cast<std::uint8_t*>(q_from[static_cast<std::size_t>(owner)].data()), sh.type, sh.batch,
                                   c.li.rows[static_cast<std::size_t>(owner)], gq, sh.dim);
    const std::vector<std::int64_t> order = f.order;
    for (std::int64_t j : order) {
      partial pt;
      st = block_partial(c, rows_of(q_all, f.local_row, f.rows), f.chunk, j, kv[static_cast<std::size_t>(c.li.owner[static_cast<std::size_t>(j)])],
                         pt, gkv, r * gq);
      if (!st.ok()) break;
      offer(sh, f, j, std::move(pt.out), std::move(pt.lse), c.most_pending);
    }
    if (!st.ok()) break;
  }
  // Back: to each rank t, its chunks (in its local order) for this rank's heads, out then lse, f32. A failed kernel
  // still takes part (zeros), and the caller reports the failure on every rank.
  std::vector<std::vector<std::uint8_t>> so(static_cast<std::size_t>(P));
  std::vector<std::int64_t> ro(static_cast<std::size_t>(P), 0);
  std::vector<float> out, lse;
  for (int t = 0; t < P; ++t)
    for (std::int64_t ch : c.li.held[static_cast<std::size_t>(t)]) {
      const chunk_fold& f = c.folds[static_cast<std::size_t>(ch)];
      finish_fold(c, f, out, lse);
      auto& dst = so[static_cast<std::size_t>(t)];
      const auto* ob = reinterpret_cast<const std::uint8_t*>(out.data());
      const auto* lb = reinterpret_cast<const std::uint8_t*>(lse.data());
      dst.insert(dst.end(), ob, ob + out.size() * 4);
      dst.insert(dst.end(), lb, lb + lse.size() * 4);
    }
  for (int t = 0; t < P; ++t)
    for (std::int64_t ch : c.li.held[static_cast<std::size_t>(r)])
      ro[static_cast<std::size_t>(t)] += sh.batch * c.li.len(ch) * gq * (sh.dim_v + 1) * 4;
  c.returned = all_to_all(c, so, ro);
  return st;
}

// Stores what the return all-to-all brought: from member t of this rank's group of `members` ranks (Ulysses: every
// rank), this rank's chunks for t's heads.
void store_returned(const call& c, int members) {
  const shapes& sh = c.sh;
  const std::int64_t gq = sh.heads_q / members;
  for (int t = 0; t < members; ++t) {
    const auto* at = reinterpret_cast<const float*>(c.returned[static_cast<std::size_t>(t)].data());
    for (std::int64_t ch : c.li.held[static_cast<std::size_t>(c.li.rank)]) {
      const std::int64_t rows = c.li.len(ch), n_out = sh.batch * rows * gq * sh.dim_v;
      store_chunk(c, c.li.local_row[static_cast<std::size_t>(ch)], rows, t * gq, gq, at, at + n_out);
      at += n_out + sh.batch * rows * gq;
    }
  }
}

status run_allgather(call& c, kv_block& mine) {
  const int P = c.li.ranks;
  const int es = dtype_size(c.sh.type);
  std::vector<kv_block> all(static_cast<std::size_t>(P));
  std::vector<int> counts_k(static_cast<std::size_t>(P)), counts_v(counts_k.size()), displ_k(counts_k.size()), displ_v(counts_k.size());
  std::int64_t total_k = 0, total_v = 0;
  for (int b = 0; b < P; ++b) {
    const std::int64_t rows = c.sh.batch * c.li.rows[static_cast<std::size_t>(b)] * c.sh.heads_kv;
    counts_k[static_cast<std::size_t>(b)] = static_cast<int>(rows * c.sh.dim * es);
    counts_v[static_cast<std::size_t>(b)] = static_cast<int>(rows * c.sh.dim_v * es);
    displ_k[static_cast<std::size_t>(b)] = static_cast<int>(total_k);
    displ_v[static_cast<std::size_t>(b)] = static_cast<int>(total_v);
    total_k += counts_k[static_cast<std::size_t>(b)];
    total_v += counts_v[static_cast<std::size_t>(b)];
  }
  std::vector<std::uint8_t> gk(static_cast<std::size_t>(total_k)), gv(static_cast<std::size_t>(total_v));
  const double t0 = now();
  MPI_Allgatherv(mine.k.data(), static_cast<int>(mine.k.size()), MPI_BYTE, gk.data(), counts_k.data(), displ_k.data(), MPI_BYTE, c.o.comm);
  MPI_Allgatherv(mine.v.data(), static_cast<int>(mine.v.size()), MPI_BYTE, gv.data(), counts_v.data(), displ_v.data(), MPI_BYTE, c.o.comm);
  c.rep.wait_seconds += now() - t0;
  c.rep.bytes_sent += static_cast<std::int64_t>(mine.k.size() + mine.v.size()) * (P - 1);
  c.rep.bytes_received += total_k + total_v - static_cast<std::int64_t>(mine.k.size() + mine.v.size());
  for (int b = 0; b < P; ++b) {
    const auto bi = static_cast<std::size_t>(b);
    all[bi].k.assign(gk.begin() + displ_k[bi], gk.begin() + displ_k[bi] + counts_k[bi]);
    all[bi].v.assign(gv.begin() + displ_v[bi], gv.begin() + displ_v[bi] + counts_v[bi]);
  }
  // Each query chunk in its fold order: nothing waits.
  for (chunk_fold& f : c.folds) {
    const std::vector<std::int64_t> order = f.order;
    for (std::int64_t j : order) {
      const std::int64_t owner = c.li.owner[static_cast<std::size_t>(j)];
      if (status st = compute_pair(c, f, j, all[static_cast<std::size_t>(owner)]); !st.ok()) return st;
    }
  }
  return {};
}

// A fold of query chunk ch over `heads` q heads from head0, its order the non-empty key chunks.
chunk_fold make_fold(call& c, std::int64_t ch, std::int64_t heads, std::int64_t head0) {
  chunk_fold f;
  f.chunk = ch;
  f.rows = c.li.len(ch);
  f.local_row = c.li.local_row[static_cast<std::size_t>(ch)];
  f.heads = heads;
  f.head0 = head0;
  for (std::int64_t j : fold_order(ch, c.li.chunks)) {
    if (block_nonempty(c, ch, j)) f.order.push_back(j);
    else ++c.rep.pairs_skipped;
  }
  const auto n_rows = static_cast<std::size_t>(c.sh.batch * heads * f.rows);
  f.m.assign(n_rows, k_neg_inf);
  f.l.assign(n_rows, 0.0f);
  f.o.assign(n_rows * static_cast<std::size_t>(c.sh.dim_v), 0.0f);
  return f;
}

// The hybrid's Ulysses degree U: the requested one, or the largest divisor of P that divides both head counts.
int hybrid_degree(const call& c) {
  if (c.o.ulysses_degree > 0) return c.o.ulysses_degree;
  int u = 1;
  for (int d = 1; d <= c.li.ranks; ++d)
    if (c.li.ranks % d == 0 && c.sh.heads_q % d == 0 && c.sh.heads_kv % d == 0) u = d;
  return u;
}

// The hybrid (USP: Ulysses inside a group, ring across groups). Rank r is member u = r % U of group g = r / U (U
// consecutive ranks, as the ranks of one node usually are). An all-to-all inside the group gives member u the q
// heads u Hq / U.. (and kv heads u Hkv / U..) of every token the group holds; the members with the same u form a
// ring of R = P / U ranks, each holding its group's chunks, over which K/V rotate as in the ring mechanism (the same
// blocks, the same fold: the bits of one process); a last all-to-all inside the group returns each chunk's out and
// lse for those heads to the member that holds its tokens.
status run_hybrid(call& c) {
  const int P = c.li.ranks, r = c.li.rank, U = hybrid_degree(c), R = P / U, g = r / U, u = r % U;
  const shapes& sh = c.sh;
  const std::int64_t gq = sh.heads_q / U, gkv = sh.heads_kv / U, es = dtype_size(sh.type);
  MPI_Comm group_comm = MPI_COMM_NULL, ring_comm = MPI_COMM_NULL;
  MPI_Comm_split(c.o.comm, g, u, &group_comm);
  MPI_Comm_split(c.o.comm, u, g, &ring_comm);
  const auto member = [&](int t) { return static_cast<std::size_t>(g * U + t); };
  // Inside the group: to member t, this rank's rows for t's heads.
  const auto nu = static_cast<std::size_t>(U);
  std::vector<std::vector<std::uint8_t>> sq(nu), sk(nu), sv(nu);
  std::vector<std::int64_t> rq(nu), rk(nu), rv(nu);
  for (int t = 0; t < U; ++t) {
    const auto ti = static_cast<std::size_t>(t);
    pack_heads(c.q, t * gq, gq, sq[ti]);
    pack_heads(c.k, t * gkv, gkv, sk[ti]);
    pack_heads(c.v, t * gkv, gkv, sv[ti]);
    const std::int64_t rows = sh.batch * c.li.rows[member(t)];
    rq[ti] = rows * gq * sh.dim * es;
    rk[ti] = rows * gkv * sh.dim * es;
    rv[ti] = rows * gkv * sh.dim_v * es;
  }
  const auto q_from = all_to_all_on(c, group_comm, u, sq, rq), k_from = all_to_all_on(c, group_comm, u, sk, rk),
             v_from = all_to_all_on(c, group_comm, u, sv, rv);
  // The ring's layout: ring rank gg holds the chunks of group gg's members, in member order.
  layout_info li;
  li.ranks = R;
  li.rank = g;
  li.n = c.li.n;
  li.chunks = c.li.chunks;
  li.owner.assign(static_cast<std::size_t>(li.chunks), 0);
  li.local_row.assign(static_cast<std::size_t>(li.chunks), 0);
  li.rows.assign(static_cast<std::size_t>(R), 0);
  for (int gg = 0; gg < R; ++gg) {
    li.held.emplace_back();
    for (int t = 0; t < U; ++t)
      for (std::int64_t ch : c.li.held[static_cast<std::size_t>(gg * U + t)]) {
        li.held.back().push_back(ch);
        li.owner[static_cast<std::size_t>(ch)] = gg;
        li.local_row[static_cast<std::size_t>(ch)] = li.rows[static_cast<std::size_t>(gg)];
        li.rows[static_cast<std::size_t>(gg)] += li.len(ch);
      }
  }
  // The group's rows, concatenated per batch in member order.
  const std::int64_t rows = li.rows[static_cast<std::size_t>(g)];
  const auto concat = [&](const std::vector<std::vector<std::uint8_t>>& parts, std::int64_t row_bytes) {
    std::vector<std::uint8_t> out(static_cast<std::size_t>(sh.batch * rows * row_bytes));
    auto at = out.begin();
    for (std::int64_t b = 0; b < sh.batch; ++b)
      for (int t = 0; t < U; ++t) {
        const std::int64_t n = c.li.rows[member(t)] * row_bytes;
        const auto from = parts[static_cast<std::size_t>(t)].begin() + static_cast<std::ptrdiff_t>(b * n);
        at = std::copy(from, from + static_cast<std::ptrdiff_t>(n), at);
      }
    return out;
  };
  std::vector<std::uint8_t> q = concat(q_from, gq * sh.dim * es);
  kv_block mine{concat(k_from, gkv * sh.dim * es), concat(v_from, gkv * sh.dim_v * es)};
  cp_options o = c.o;
  o.comm = ring_comm;
  o.lse = nullptr;
  o.report = nullptr;
  const tensor tq = make_bshd(q.data(), sh.type, sh.batch, rows, gq, sh.dim);
  const tensor tk = make_bshd(mine.k.data(), sh.type, sh.batch, rows, gkv, sh.dim);
  const tensor tv = make_bshd(mine.v.data(), sh.type, sh.batch, rows, gkv, sh.dim_v);
  call ring(tq, tk, tv, c.out, c.s, o);
  ring.sh = {sh.batch, gq, gkv, sh.dim, sh.dim_v, sh.type};
  ring.li = li;
  ring.local = c.local;
  ring.nonempty = c.nonempty;
  ring.base = c.base;
  ring.head0 = u * gq;
  ring.heads_total = sh.heads_q;
  for (std::int64_t ch : li.held[static_cast<std::size_t>(g)]) ring.folds.push_back(make_fold(ring, ch, gq, u * gq));
  status st = run_ring(ring, mine);
  for (const chunk_fold& f : ring.folds)
    if (st.ok() && f.next != f.order.size()) st = {"internal: chunk " + std::to_string(f.chunk) + " incomplete in the hybrid's ring"};
  // Back inside the group: to member t, its chunks for this rank's heads, out then lse, f32.
  std::vector<std::vector<std::uint8_t>> back(nu);
  std::vector<std::int64_t> back_bytes(nu, 0);
  std::vector<float> out, lse;
  for (int t = 0; t < U; ++t)
    for (std::int64_t ch : c.li.held[member(t)]) {
      const auto f = std::find_if(ring.folds.begin(), ring.folds.end(), [ch](const chunk_fold& x) { return x.chunk == ch; });
      finish_fold(ring, *f, out, lse);
      auto& dst = back[static_cast<std::size_t>(t)];
      const auto* ob = reinterpret_cast<const std::uint8_t*>(out.data());
      const auto* lb = reinterpret_cast<const std::uint8_t*>(lse.data());
      dst.insert(dst.end(), ob, ob + out.size() * 4);
      dst.insert(dst.end(), lb, lb + lse.size() * 4);
    }
  for (std::size_t t = 0; t < nu; ++t)
    for (std::int64_t ch : c.li.held[static_cast<std::size_t>(r)]) back_bytes[t] += sh.batch * c.li.len(ch) * gq * (sh.dim_v + 1) * 4;
  c.returned = all_to_all_on(c, group_comm, u, back, back_bytes);
  c.rep.bytes_sent += ring.rep.bytes_sent;
  c.rep.bytes_received += ring.rep.bytes_received;
  c.rep.pairs_computed += ring.rep.pairs_computed;
  c.rep.pairs_skipped += ring.rep.pairs_skipped;
  c.rep.messages_skipped += ring.rep.messages_skipped;
  c.rep.compute_seconds += ring.rep.compute_seconds;
  c.rep.wait_seconds += ring.rep.wait_seconds;
  c.most_pending = std::max(c.most_pending, ring.most_pending);
  c.rep.reasons.push_back("hybrid: Ulysses inside groups of " + std::to_string(U) + " ranks (" + std::to_string(gq) +
                          " q heads each), ring across " + std::to_string(R) + " groups");
  MPI_Comm_free(&group_comm);
  MPI_Comm_free(&ring_comm);
  return st;
}

std::string megabytes(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", bytes / 1e6);
  return buf;
}

// Ulysses needs every rank to take a whole group of q heads with its kv heads.
std::string ulysses_blocker(const call& c) {
  const int P = c.li.ranks;
  if (c.sh.heads_q % P != 0 || c.sh.heads_kv % P != 0)
    return "ulysses needs q.heads " + std::to_string(c.sh.heads_q) + " and k.heads " + std::to_string(c.sh.heads_kv) +
           " to be multiples of the " + std::to_string(P) + " ranks";
  return {};
}

std::string hybrid_blocker(const call& c) {
  const int P = c.li.ranks, u = c.o.ulysses_degree;
  if (u < 0 || (u > 0 && (P % u != 0 || c.sh.heads_q % u != 0 || c.sh.heads_kv % u != 0)))
    return "options.ulysses_degree " + std::to_string(u) + " must divide the " + std::to_string(P) + " ranks, q.heads " +
           std::to_string(c.sh.heads_q) + " and k.heads " + std::to_string(c.sh.heads_kv) + " (0: the largest that does)";
  return {};
}

// The mechanism: the requested one, or (automatic) the one that moves the fewest bytes per rank by the model in
// bench/README.md: ring (P - 1) K/V shards; TokenRing (P - 1) Q shards and f32 partials; Ulysses (P - 1) / P of
// q, k, v and the f32 out. The estimates and the choice go to the report.
mechanism plan(call& c) {
  const int P = c.li.ranks;
  if (c.o.use != mechanism::automatic) {
    c.rep.reasons.push_back(std::string("requested: ") + mechanism_name(c.o.use));
    return c.o.use;
  }
  const double rows = static_cast<double>(c.sh.batch) * static_cast<double>(c.li.n) / P, es = dtype_size(c.sh.type);
  const double hq = static_cast<double>(c.sh.heads_q), hkv = static_cast<double>(c.sh.heads_kv);
  const double kv = rows * hkv * static_cast<double>(c.sh.dim + c.sh.dim_v) * es, q = rows * hq * static_cast<double>(c.sh.dim) * es;
  const double part = rows * hq * static_cast<double>(c.sh.dim_v + 1) * 4.0;
  const double ring = (P - 1) * kv, token = (P - 1) * (q + part), uly = (P - 1) / static_cast<double>(P) * (q + kv + part);
  const std::string blocked = ulysses_blocker(c);
  // The hybrid: Ulysses inside groups of U ranks, then (P / U - 1) hops of a K/V shard of the same size as a rank's.
  const int U = hybrid_degree(c);
  const double hyb = (U - 1) / static_cast<double>(U) * (q + kv + part) + (P / U - 1) * kv;
  const bool hybrid_fits = hybrid_blocker(c).empty() && U > 1 && U < P;
  std::ostringstream os;
  os << "automatic: MB per rank (upper bounds): ring " << megabytes(ring) << ", token_ring " << megabytes(token) << ", ulysses "
     << (blocked.empty() ? megabytes(uly) : "- (" + blocked + ")") << ", hybrid "
     << (hybrid_fits ? megabytes(hyb) + " (groups of " + std::to_string(U) + ")"
         : U == P ? std::string("- (its largest group is all the ranks: Ulysses)")
                  : std::string("- (no group of more than 1 rank divides the ranks and both head counts)"));
  c.rep.reasons.push_back(os.str());
  mechanism m = token < ring ? mechanism::token_ring : mechanism::ring;
  double best = std::min(ring, token);
  if (hybrid_fits && hyb < best) m = mechanism::hybrid, best = hyb;
  if (blocked.empty() && P > 1 && uly < best) m = mechanism::ulysses;
  c.rep.reasons.push_back(std::string("automatic: ") + mechanism_name(m));
  return m;
}

// The backward's mechanism: the requested one, or (automatic) the ring or Ulysses, whichever moves fewer bytes per
// rank by a dense estimate: the ring sends (P - 1) K/V shards and returns (P - 1) f32 dK / dV shares; Ulysses moves
// (P - 1) / P of q, k, v, out, d_out and lse there and of the f32 dq, dk, dv back.
mechanism plan_backward(call& c) {
  const int P = c.li.ranks;
  if (c.o.use != mechanism::automatic) {
    c.rep.reasons.push_back(std::string("requested: ") + mechanism_name(c.o.use));
    return c.o.use;
  }
  const double rows = static_cast<double>(c.sh.batch) * static_cast<double>(c.li.n) / P, es = dtype_size(c.sh.type);
  const double eo = dtype_size(c.out.type), hq = static_cast<double>(c.sh.heads_q), hkv = static_cast<double>(c.sh.heads_kv);
  const double d = static_cast<double>(c.sh.dim), dv = static_cast<double>(c.sh.dim_v);
  const double ring = (P - 1) * rows * hkv * (d + dv) * (es + 4.0);
  const double uly = (P - 1) / static_cast<double>(P) * rows * (hq * (d * es + 2.0 * dv * eo + 4.0 + 4.0 * d) + hkv * (d + dv) * (es + 4.0));
  const std::string blocked = ulysses_blocker(c);
  std::ostringstream os;
  os << "automatic: MB per rank (upper bounds): ring " << megabytes(ring) << ", ulysses "
     << (blocked.empty() ? megabytes(uly) : "- (" + blocked + ")");
  c.rep.reasons.push_back(os.str());
  const mechanism m = blocked.empty() && P > 1 && uly < ring ? mechanism::ulysses : mechanism::ring;
  c.rep.reasons.push_back(std::string("automatic: ") + mechanism_name(m));
  return m;
}

// MPI counts are ints: the largest message (in its datatype's units) of the mechanism, from every rank's sizes (the
// same answer everywhere, so a refusal is collective without a word exchanged). "" when every message fits.
std::string message_limits(const call& c, mechanism m, bool backward = false) {
  const shapes& sh = c.sh;
  const std::int64_t es = dtype_size(sh.type);
  std::int64_t rows_max = 0;
  for (std::int64_t r : c.li.rows) rows_max = std::max(rows_max, r);
  const double rows = static_cast<double>(sh.batch) * static_cast<double>(rows_max);
  const double all = static_cast<double>(sh.batch) * static_cast<double>(c.li.n);
  double most = 0.0;
  const char* what = "";
  switch (m) {
    case mechanism::automatic:
    case mechanism::ring: most = rows * static_cast<double>(sh.heads_kv); what = "K/V rows of a shard"; break;
    case mechanism::token_ring:
      most = rows * static_cast<double>(sh.heads_q) * static_cast<double>(sh.dim_v + 1);
      what = "floats of a shard's partial results";
      break;
    case mechanism::allgather:
      most = all * static_cast<double>(sh.heads_kv) * static_cast<double>(sh.dim + sh.dim_v) * static_cast<double>(es);
      what = "bytes of the gathered K/V";
      break;
    case mechanism::hybrid:  // bounded by Ulysses over every rank (its all-to-alls) and the ring (its K/V shards)
    case mechanism::ulysses:
      most = all * (static_cast<double>(sh.heads_q) * static_cast<double>(sh.dim + sh.dim_v + 1) * 4.0 +
                    static_cast<double>(sh.heads_kv) * static_cast<double>(sh.dim + sh.dim_v) * static_cast<double>(es));
      what = "bytes of one rank's all-to-all";
      break;
  }
  if (backward && m == mechanism::ring) {  // and the dK / dV shares of a shard's keys for all of a rank's query chunks
    const double per = static_cast<double>(c.li.chunks) / c.li.ranks;
    most = std::max(most, rows * static_cast<double>(sh.heads_kv) * static_cast<double>(sh.dim + sh.dim_v) * per);
    what = "floats of a shard's dK / dV shares";
  }
  if (backward && m == mechanism::ulysses) {  // q, k, v, out, d_out, lse there; dq, dk, dv back (f32 bounds)
    most = all * (static_cast<double>(sh.heads_q) * static_cast<double>(2 * sh.dim + 2 * sh.dim_v + 1) * 4.0 +
                  static_cast<double>(sh.heads_kv) * static_cast<double>(sh.dim + sh.dim_v) * 8.0);
    what = "bytes of one rank's all-to-alls";
  }
  if (most <= static_cast<double>(INT_MAX)) return {};
  std::ostringstream os;
  os << mechanism_name(m) << ": a message of " << most << " " << what << " exceeds MPI's int counts (2^31 - 1); use more "
     << "ranks" << (m == mechanism::ring ? "" : " or the ring");
  return os.str();
}

// Local checks of this rank's arguments (shapes, dtypes, the spec on a representative block); "" when fine.
// The options' own rules (mechanism, layout, group size) for the call's shapes and ranks; "" when fine.
std::string check_mechanism(const call& c) {
  if (c.o.use != mechanism::automatic && c.o.use != mechanism::ring && c.o.use != mechanism::allgather &&
      c.o.use != mechanism::token_ring && c.o.use != mechanism::ulysses && c.o.use != mechanism::hybrid)
    return "options.use " + std::to_string(static_cast<int>(c.o.use)) + " is not a mechanism";
  if (c.o.use == mechanism::hybrid)
    if (std::string why = hybrid_blocker(c); !why.empty()) return why;
  if (c.o.use == mechanism::ulysses)
    if (std::string why = ulysses_blocker(c); !why.empty()) return "options.use: " + why;
  if (c.o.shards != layout::contiguous && c.o.shards != layout::zigzag)
    return "options.shards " + std::to_string(static_cast<int>(c.o.shards)) + " is not a layout";
  return {};
}

std::string check_local(call& c) {
  const tensor &q = c.q, &k = c.k, &v = c.v, &out = c.out;
  if (std::string why = check_mechanism(c); !why.empty()) return why;
  if (k.seq != q.seq) return "k.seq " + std::to_string(k.seq) + " != q.seq " + std::to_string(q.seq) + " (self-attention shards)";
  const std::int64_t want = c.li.rows[static_cast<std::size_t>(c.li.rank)];
  if (q.seq != want)
    return "q.seq " + std::to_string(q.seq) + " != the " + std::to_string(want) + " tokens of this rank's chunks (" +
           layout_name(c.o.shards) + ", " + std::to_string(c.li.chunks) + " chunks of a sequence of " + std::to_string(c.li.n) + ")";
  // The kernel's own validation, on this rank's first query rows against its own keys as a block of the problem.
  const problem_block pb{0, 0, c.li.n, c.li.n};
  options opt;
  opt.use = backend::cpu;
  opt.threads = c.o.threads;
  opt.block = &pb;
  opt.lse = c.o.lse;
  if (const status st = make_params(q, k, v, out, c.s, opt, c.base); !st.ok()) {
    // "[attention] ..." -> the rule, under this entry point's name.
    return st.error.rfind("[attention] ", 0) == 0 ? st.error.substr(12) : st.error;
  }
  if (c.o.lse && c.o.lse->data == nullptr && q.seq > 0) return "options.lse.data is null";
  // Position ids index the call's own rows, which differ per block here: positions come from the layout instead.
  if (c.s.rope && (c.s.rope->pos_q || c.s.rope->pos_k))
    return "spec.rope.pos_q / pos_k are not supported: RoPE positions are the tokens' global positions";
  return {};
}

// The first failing rank's message on every rank (collective), or "" when every rank is fine.
std::string agree(MPI_Comm comm, int rank, const std::string& local) {
  int mine = local.empty() ? INT_MAX : rank, first = INT_MAX;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == INT_MAX) return {};
  int len = static_cast<int>(local.size());
  MPI_Bcast(&len, 1, MPI_INT, first, comm);
  std::string msg = rank == first ? local : std::string(static_cast<std::size_t>(len), ' ');
  MPI_Bcast(msg.data(), len, MPI_CHAR, first, comm);
  return "[dist::attention] rank " + std::to_string(first) + ": " + msg;
}

}  // namespace

const char* mechanism_name(mechanism m) {
  switch (m) {
    case mechanism::automatic: return "automatic";
    case mechanism::ring: return "ring";
    case mechanism::allgather: return "allgather";
    case mechanism::token_ring: return "token_ring";
    case mechanism::ulysses: return "ulysses";
    case mechanism::hybrid: return "hybrid";
  }
  return "?";
}

const char* layout_name(layout l) { return l == layout::zigzag ? "zigzag" : "contiguous"; }

bool parse_mechanism(const std::string& name, mechanism& m) {
  for (mechanism x : {mechanism::automatic, mechanism::ring, mechanism::allgather, mechanism::token_ring, mechanism::ulysses,
                      mechanism::hybrid})
    if (name == mechanism_name(x) || (x == mechanism::automatic && name == "auto")) {
      m = x;
      return true;
    }
  return false;
}

bool parse_layout(const std::string& name, layout& l) {
  for (layout x : {layout::contiguous, layout::zigzag})
    if (name == layout_name(x)) {
      l = x;
      return true;
    }
  return false;
}

std::vector<std::int64_t> rank_chunks(layout l, std::int64_t chunks, int ranks, int rank) {
  std::vector<std::int64_t> held;
  if (ranks <= 0 || rank < 0 || rank >= ranks || chunks <= 0) return held;  // nothing is held outside a valid layout
  if (l == layout::contiguous) {
    const std::int64_t per = chunks / ranks;
    for (std::int64_t c = rank * per; c < (rank + 1) * per; ++c) held.push_back(c);
  } else {
    for (std::int64_t m = rank; m < chunks / 2; m += ranks) {
      held.push_back(m);
      held.push_back(chunks - 1 - m);
    }
  }
  return held;
}

// Runs a mechanism's exchange. A kernel's failure there is a status, and the exchange goes on (zeros travel) so the
// failure is agreed on afterwards; but an exception (out of memory for a buffer) leaves this rank outside MPI calls
// the others are already in, with no way back into the protocol: rather than leave them waiting forever, it says why
// and aborts the communicator's processes.
template <class Run>
status during_exchange(const call& c, Run&& run) {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dist::attention] rank %d: %s during the exchange: aborting (the other ranks would wait forever)\n",
                 c.li.rank, e.what());
    std::fflush(stderr);
    MPI_Abort(c.o.comm, 1);
    return {"[dist::attention] aborted"};  // MPI_Abort does not return
  }
}

// The library's own duplicate of a caller's communicator, made on first use and cached on it (MPI attribute
// caching; freed with it), so the library's messages and tags never meet the caller's on the same communicator.
int free_private_comm(MPI_Comm, int, void* attr, void*) {
  auto* dup = static_cast<MPI_Comm*>(attr);
  MPI_Comm_free(dup);
  delete dup;
  return MPI_SUCCESS;
}

MPI_Comm private_comm(MPI_Comm user) {
  static int keyval = MPI_KEYVAL_INVALID;  // collective calls run on one thread per process (see dist.h)
  if (keyval == MPI_KEYVAL_INVALID) MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, free_private_comm, &keyval, nullptr);
  MPI_Comm* dup = nullptr;
  int found = 0;
  MPI_Comm_get_attr(user, keyval, &dup, &found);
  if (found) return *dup;
  dup = new MPI_Comm;
  MPI_Comm_dup(user, dup);  // collective: the first call on a communicator is on every rank (dist calls are collective)
  MPI_Comm_set_attr(user, keyval, dup);
  return *dup;
}

// The chunk layout of a sequence of n tokens over c.li.ranks ranks (options.chunks, options.shards); "" or the rule
// the options break.
std::string make_layout(call& c, std::int64_t n) {
  const int P = c.li.ranks;
  const cp_options& o = c.o;
  c.li.chunks = o.chunks != 0 ? o.chunks : (o.shards == layout::zigzag ? 2 * P : P);
  const std::int64_t unit = o.shards == layout::zigzag ? 2 * P : P;
  if (c.li.chunks < 0 || c.li.chunks % unit != 0)
    return "options.chunks " + std::to_string(c.li.chunks) + " must be a positive multiple of " + std::to_string(unit) + " (" +
           (o.shards == layout::zigzag ? "2 x " : "") + std::to_string(P) + " ranks, " + layout_name(o.shards) + ")";
  c.li.n = n;
  c.li.held.clear();
  c.li.owner.assign(static_cast<std::size_t>(c.li.chunks), 0);
  c.li.local_row.assign(static_cast<std::size_t>(c.li.chunks), 0);
  c.li.rows.assign(static_cast<std::size_t>(P), 0);
  for (int b = 0; b < P; ++b) {
    c.li.held.push_back(rank_chunks(o.shards, c.li.chunks, P, b));
    for (std::int64_t ch : c.li.held.back()) {
      c.li.owner[static_cast<std::size_t>(ch)] = b;
      c.li.local_row[static_cast<std::size_t>(ch)] = c.li.rows[static_cast<std::size_t>(b)];
      c.li.rows[static_cast<std::size_t>(b)] += c.li.len(ch);
    }
  }
  return {};
}

// The steps every collective call takes first, the same on every rank: MPI is up, a rank's local error, shapes,
// dtypes (the backward's d_out too: Ulysses' message sizes depend on them) and options compared between ranks, the
// chunk layout. On failure every rank returns the same error.
status setup(call& c, std::int64_t d_out_type = -1) {
  const tensor &q = c.q, &k = c.k, &v = c.v;
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return {"[dist::attention] MPI is not initialized (call MPI_Init first)"};
  if (c.o.comm == MPI_COMM_NULL) return {"[dist::attention] options.comm is MPI_COMM_NULL"};
  c.o.comm = private_comm(c.o.comm);
  const cp_options& o = c.o;
  MPI_Comm_size(o.comm, &c.li.ranks);
  MPI_Comm_rank(o.comm, &c.li.rank);
  const int P = c.li.ranks;
  // A rank whose caller could not even build its arguments (e.g. a binding's translation) fails every rank first.
  std::string err = agree(c.o.comm, c.li.rank, o.local_error ? std::string(o.local_error) : std::string{});
  if (!err.empty()) return {err};
  // Every rank's shard length, shapes and options, so the layout and every later decision are the same everywhere
  // (a rank with other options would run another protocol and hang the others).
  constexpr int k_fields = 13;
  std::int64_t mine[k_fields] = {q.seq, q.batch, q.heads, k.heads, q.dim, v.dim, static_cast<std::int64_t>(q.type),
                                 static_cast<std::int64_t>(o.use), static_cast<std::int64_t>(o.shards), o.chunks,
                                 o.ulysses_degree, static_cast<std::int64_t>(c.out.type), d_out_type};
  std::vector<std::int64_t> every(static_cast<std::size_t>(k_fields * P));
  MPI_Allgather(mine, k_fields, MPI_INT64_T, every.data(), k_fields, MPI_INT64_T, o.comm);
  for (int b = 1; b < P && err.empty(); ++b)
    for (int f = 1; f < k_fields; ++f)
      if (every[static_cast<std::size_t>(k_fields * b + f)] != every[static_cast<std::size_t>(f)]) {
        static const char* const names[k_fields] = {"seq", "q.batch", "q.heads", "k.heads", "q.dim", "v.dim", "q.type",
                                                    "options.use", "options.shards", "options.chunks",
                                                    "options.ulysses_degree", "out.type", "d_out.type"};
        err = std::string(names[f]) + " differs between ranks (rank 0: " + std::to_string(every[static_cast<std::size_t>(f)]) +
              ", rank " + std::to_string(b) + ": " + std::to_string(every[static_cast<std::size_t>(k_fields * b + f)]) + ")";
        break;
      }
  if (!err.empty()) return {"[dist::attention] " + err};
  c.sh = {q.batch, q.heads, k.heads, q.dim, v.dim, q.type};
  std::int64_t total_rows = 0;  // the global length: the rows of every rank's chunks add up to n
  for (int b = 0; b < P; ++b) total_rows += every[static_cast<std::size_t>(k_fields * b)];
  if (const std::string why = make_layout(c, total_rows); !why.empty()) return {"[dist::attention] " + why};
  return {};
}

cp_plan explain(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, int ranks, const cp_options& o) {
  cp_plan e;
  const auto fail = [&e](const std::string& why) {
    e.st = {"[dist::explain] " + why};
    return e;
  };
  if (ranks < 1) return fail("ranks " + std::to_string(ranks) + " must be >= 1");
  call c(q, k, v, out, s, o);
  c.li.ranks = ranks;
  c.sh = {q.batch, q.heads, k.heads, q.dim, v.dim, q.type};
  if (k.seq != q.seq) return fail("k.seq " + std::to_string(k.seq) + " != q.seq " + std::to_string(q.seq) + " (self-attention)");
  if (std::string why = make_layout(c, q.seq); !why.empty()) return fail(why);
  if (std::string why = check_mechanism(c); !why.empty()) return fail(why);
  // The kernel's rules on the first chunk against itself, as a block of the whole problem.
  const problem_block pb{0, 0, c.li.n, c.li.n};
  options opt;
  opt.use = backend::cpu;
  opt.block = &pb;
  const std::int64_t len = c.li.len(0);
  if (const status st = make_params(rows_of(q, 0, len), rows_of(k, 0, len), rows_of(v, 0, len), rows_of(out, 0, len), s, opt, c.base); !st.ok())
    return fail(st.error.rfind("[attention] ", 0) == 0 ? st.error.substr(12) : st.error);
  if (s.rope && (s.rope->pos_q || s.rope->pos_k))
    return fail("spec.rope.pos_q / pos_k are not supported: RoPE positions are the tokens' global positions");
  try {
    classify_blocks(c);  // a user mask predicate may throw
  } catch (const std::exception& x) {
    return fail(std::string("classifying the blocks: ") + x.what());
  }
  const mechanism m = plan(c);
  if (std::string why = message_limits(c, m); !why.empty()) return fail(why);
  e.mechanism = mechanism_name(m);
  e.reasons = c.rep.reasons;
  e.reasons.push_back(std::to_string(c.li.chunks) + " chunks of a sequence of " + std::to_string(c.li.n) + " tokens, " +
                      layout_name(o.shards) + " over " + std::to_string(ranks) + " ranks");
  e.chunks = c.li.chunks;
  const std::int64_t C = c.li.chunks;
  for (std::int64_t i = 0; i < C; ++i)
    for (std::int64_t j = 0; j < C; ++j) e.pairs_nonempty += block_nonempty(c, i, j);
  e.pairs_total = C * C;
  // The blocks each rank computes: its query chunks (ring, all-gather), its key chunks (TokenRing), every block for
  // its heads (Ulysses), its group's query chunks for its heads (hybrid).
  const int U = m == mechanism::hybrid ? hybrid_degree(c) : 1;
  for (int r = 0; r < ranks; ++r) {
    std::int64_t n = 0;
    for (std::int64_t i = 0; i < C; ++i)
      for (std::int64_t j = 0; j < C; ++j) {
        const int qo = static_cast<int>(c.li.owner[static_cast<std::size_t>(i)]), ko = static_cast<int>(c.li.owner[static_cast<std::size_t>(j)]);
        const bool mine = m == mechanism::ulysses ? true : m == mechanism::token_ring ? ko == r : m == mechanism::hybrid ? qo / U == r / U : qo == r;
        n += mine && block_nonempty(c, i, j);
      }
    e.pairs_per_rank.push_back(n);
  }
  if (m == mechanism::ring) {
    const need_matrix need = rank_needs(c);
    for (int b = 0; b < ranks; ++b) {
      int last = 0;  // the farthest hop a later rank needs this shard
      for (int h = 1; h < ranks; ++h)
        if (need[static_cast<std::size_t>((b + h) % ranks)][static_cast<std::size_t>(b)]) last = h;
      e.hops_skipped += ranks - 1 - last;
    }
  }
  return e;
}

status attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, const cp_options& o) {
  const double t_start = now();
  call c(q, k, v, out, s, o);
  if (status st = setup(c); !st.ok()) return st;
  const int P = c.li.ranks;
  std::string err;
  if (err = agree(c.o.comm, c.li.rank, check_local(c)); !err.empty()) return {err};
  c.local = s;
  c.local.sink_logits = nullptr;

  const mechanism m = plan(c);
  if (const std::string why = message_limits(c, m); !why.empty()) return {"[dist::attention] " + why};
  kv_block mine_kv;
  // What can throw (allocation; a user mask predicate classifying the blocks) is caught here and agreed on, so an
  // exception on one rank fails every rank instead of leaving them waiting.
  std::string local;
  try {
    classify_blocks(c);
    if (m == mechanism::ulysses) {
      // Every chunk of the sequence, for this rank's group of heads.
      const std::int64_t group = c.sh.heads_q / P;
      for (std::int64_t ch = 0; ch < c.li.chunks; ++ch) c.folds.push_back(make_fold(c, ch, group, c.li.rank * group));
    } else if (m != mechanism::hybrid) {  // the hybrid folds in its ring stage
      for (std::int64_t ch : c.li.held[static_cast<std::size_t>(c.li.rank)]) c.folds.push_back(make_fold(c, ch, c.sh.heads_q, 0));
    }
    pack(k, mine_kv.k);
    pack(v, mine_kv.v);
  } catch (const std::exception& e) {
    local = std::string("preparing the call: ") + e.what();
  }
  if (err = agree(c.o.comm, c.li.rank, local); !err.empty()) return {err};
  c.rep.mechanism = mechanism_name(m);
  c.rep.chunks = c.li.chunks;
  c.rep.reasons.push_back(std::to_string(c.li.chunks) + " chunks of a sequence of " + std::to_string(c.li.n) + " tokens, " +
                          layout_name(o.shards) + " over " + std::to_string(P) + " ranks");
  const status st = during_exchange(c, [&] {
    return m == mechanism::allgather    ? run_allgather(c, mine_kv)
           : m == mechanism::token_ring ? run_token_ring(c, mine_kv)
           : m == mechanism::ulysses    ? run_ulysses(c)
           : m == mechanism::hybrid     ? run_hybrid(c)
                                        : run_ring(c, mine_kv);
  });
  std::string failed = st.ok() ? std::string{} : st.error;
  for (const chunk_fold& f : c.folds)
    if (failed.empty() && f.next != f.order.size())
      failed = "internal: chunk " + std::to_string(f.chunk) + " folded " + std::to_string(f.next) + " of " +
               std::to_string(f.order.size()) + " parts";
  // A kernel failure on one rank fails every rank, before anything is written.
  if (err = agree(c.o.comm, c.li.rank, failed); !err.empty()) return {err};
  if (m == mechanism::ulysses || m == mechanism::hybrid) store_returned(c, m == mechanism::ulysses ? P : hybrid_degree(c));
  else write_outputs(c);
  c.rep.partials_buffered = c.most_pending;
  c.rep.seconds = now() - t_start;
  if (o.report) *o.report = c.rep;
  return {};
}

namespace {

// A sum of partial results taken in a fixed order of keys (chunk ids); parts that come early wait their turn.
struct ordered_sum {
  std::vector<std::int64_t> order;
  std::size_t next = 0;
  std::vector<float> acc;
  std::map<std::int64_t, std::vector<float>> pending;
};

void add_in_order(ordered_sum& a, std::int64_t key, std::vector<float> part, std::int64_t& most_pending) {
  const auto add = [&a](const std::vector<float>& x) {
    for (std::size_t i = 0; i < x.size(); ++i) a.acc[i] += x[i];
  };
  if (a.next < a.order.size() && a.order[a.next] == key) {
    add(part);
    ++a.next;
    while (a.next < a.order.size()) {
      const auto it = a.pending.find(a.order[a.next]);
      if (it == a.pending.end()) break;
      add(it->second);
      a.pending.erase(it);
      ++a.next;
    }
    return;
  }
  a.pending.emplace(key, std::move(part));
  most_pending = std::max(most_pending, static_cast<std::int64_t>(a.pending.size()));
}

// The backward's operands beyond the forward's call.
struct bwd_call {
  const lse_tensor& lse;
  const tensor& d_out;
  const cp_gradients& g;
  std::map<std::int64_t, ordered_sum> dq, dkv;  // by chunk: this rank's query chunks, and its key chunks (dk then dv)
};

// The order a key chunk's gradient sums its query chunks: j, j + 1, ..., j - 1 (the order a forward ring meets them).
std::vector<std::int64_t> key_order(std::int64_t j, std::int64_t chunks) {
  std::vector<std::int64_t> o;
  for (std::int64_t s = 0; s < chunks; ++s) o.push_back((j + s) % chunks);
  return o;
}

// The rows of query chunk i a block's backward reads (heads: the block's q heads): q, the forward's out, d_out, lse.
struct bwd_rows {
  tensor q, out, d_out;
  lse_tensor lse;
};

// This rank's rows of query chunk i (every head).
bwd_rows own_rows(const call& c, const bwd_call& w, std::int64_t i) {
  const std::int64_t row0 = c.li.local_row[static_cast<std::size_t>(i)], rows = c.li.len(i);
  lse_tensor l = w.lse;
  l.data += row0 * l.stride_seq;
  return {rows_of(c.q, row0, rows), rows_of(c.out, row0, rows), rows_of(w.d_out, row0, rows), l};
}

// The block (query chunk i, key chunk j in blk, whose K/V have kv_heads heads)'s share of the gradients for the q
// heads head0 .. head0 + x.q.heads - 1: dq [B][len_i][heads][D] and dk then dv [B][len_j][kv_heads][D | Dv], f32.
status block_backward(call& c, std::int64_t i, std::int64_t j, const bwd_rows& x, const kv_block& blk, std::int64_t kv_heads,
                      std::int64_t head0, std::vector<float>& dq, std::vector<float>& dkv) {
  const shapes& sh = c.sh;
  const std::int64_t owner = c.li.owner[static_cast<std::size_t>(j)], total = c.li.rows[static_cast<std::size_t>(owner)];
  const std::int64_t row0 = c.li.local_row[static_cast<std::size_t>(j)], len = c.li.len(j), rows = c.li.len(i);
  const std::int64_t heads = x.q.heads;
  const std::int64_t nk = sh.batch * len * kv_heads * sh.dim, nv = sh.batch * len * kv_heads * sh.dim_v;
  try {
    dq.assign(static_cast<std::size_t>(sh.batch * rows * heads * sh.dim), 0.0f);
    dkv.assign(static_cast<std::size_t>(nk + nv), 0.0f);
  } catch (const std::bad_alloc&) {
    return {"[dist::attention_backward] out of memory for a block's gradients"};
  }
  gradients gr;
  gr.dq = make_bshd(dq.data(), dtype::f32, sh.batch, rows, heads, sh.dim);
  gr.dk = make_bshd(dkv.data(), dtype::f32, sh.batch, len, kv_heads, sh.dim);
  gr.dv = make_bshd(dkv.data() + nk, dtype::f32, sh.batch, len, kv_heads, sh.dim_v);
  const std::int64_t group = heads / kv_heads;
  const tensor k_all = packed_view(blk.k, sh.type, sh.batch, total, kv_heads, sh.dim, row0, len);
  const tensor v_all = packed_view(blk.v, sh.type, sh.batch, total, kv_heads, sh.dim_v, row0, len);
  const double t0 = now();
  const status st = by_head_groups(c, kv_heads, [&](std::int64_t g0, std::int64_t gn) {
    const std::int64_t h0 = g0 * group, hn = gn * group;
    lse_tensor l = x.lse;
    l.data += h0 * l.stride_head;
    const gradients part{heads_of(gr.dq, h0, hn), heads_of(gr.dk, g0, gn), heads_of(gr.dv, g0, gn)};
    const problem_block pb{c.li.begin(i), c.li.begin(j), c.li.n, c.li.n, head0 + h0, sh.heads_q};
    options opt;
    opt.use = backend::cpu;
    opt.allow_fallback = false;
    opt.threads = c.o.threads;
    opt.block = &pb;
    return omniattn::attention_backward(heads_of(x.q, h0, hn), heads_of(k_all, g0, gn), heads_of(v_all, g0, gn), heads_of(x.out, h0, hn),
                                        l, heads_of(x.d_out, h0, hn), part, c.local, opt);
  });
  c.rep.compute_seconds += now() - t0;
  if (st.ok()) ++c.rep.pairs_computed;
  return st;
}

// The ring backward: K/V rotate as in the forward (a shard travels as far as a rank needs it); at step s this rank
// computes its query chunks against the shard of rank r - s, keeps the dq shares and sends the dK / dV shares to
// that rank, while it receives the shares of its own keys from rank r + s.
status run_ring_backward(call& c, bwd_call& w, kv_block& mine) {
  const int P = c.li.ranks, r = c.li.rank;
  const need_matrix need = rank_needs(c);
  const shapes& sh = c.sh;
  const auto kv_floats = [&](std::int64_t j) { return sh.batch * c.li.len(j) * sh.heads_kv * (sh.dim + sh.dim_v); };
  const auto pairs_of = [&](int q_owner, int kv_owner) { return nonempty_pairs(c, q_owner, kv_owner); };
  status result;
  std::vector<std::pair<std::int64_t, std::int64_t>> in_pairs;
  std::vector<float> in_buf, out_buf;
  kv_ring(c, mine, need, 3, [&](int s, int owner, const kv_block& blk, MPI_Request* req, int& n_req) {
    // The dK / dV shares of this rank's keys that rank r + s computes at this step (tag 3 s + 2).
    const int from = (r + s) % P;
    in_pairs = s == 0 ? decltype(in_pairs){} : pairs_of(from, r);
    std::int64_t in_floats = 0;
    for (const auto& pr : in_pairs) in_floats += kv_floats(pr.second);
    in_buf.assign(static_cast<std::size_t>(in_floats), 0.0f);
    out_buf.clear();
    if (!in_pairs.empty()) {
      MPI_Irecv(in_buf.data(), static_cast<int>(in_floats), MPI_FLOAT, from, 3 * s + 2, c.o.comm, &req[n_req++]);
      c.rep.bytes_received += in_floats * 4;
    }
    // This rank's query chunks against the shard in hand: dq shares stay, dK / dV shares go to the shard's owner. A
    // failed block still sends (zeros), so no rank waits.
    const auto out_pairs = need[static_cast<std::size_t>(r)][static_cast<std::size_t>(owner)] ? pairs_of(r, owner) : decltype(in_pairs){};
    for (const auto& [i, j] : out_pairs) {
      std::vector<float> dq, dkv;
      if (result.ok()) result = block_backward(c, i, j, own_rows(c, w, i), blk, c.sh.heads_kv, 0, dq, dkv);
      dkv.resize(static_cast<std::size_t>(kv_floats(j)), 0.0f);
      if (result.ok()) add_in_order(w.dq[i], j, std::move(dq), c.most_pending);
      if (owner == r) {
        if (result.ok()) add_in_order(w.dkv[j], i, std::move(dkv), c.most_pending);
      } else {
        out_buf.insert(out_buf.end(), dkv.begin(), dkv.end());
      }
    }
    if (owner != r && !out_pairs.empty()) {
      MPI_Isend(out_buf.data(), static_cast<int>(out_buf.size()), MPI_FLOAT, owner, 3 * s + 2, c.o.comm, &req[n_req++]);
      c.rep.bytes_sent += static_cast<std::int64_t>(out_buf.size()) * 4;
    }
  }, [&](int) {
    std::size_t at = 0;
    for (const auto& [i, j] : in_pairs) {
      const auto nf = static_cast<std::size_t>(kv_floats(j));
      std::vector<float> part(in_buf.begin() + static_cast<std::ptrdiff_t>(at), in_buf.begin() + static_cast<std::ptrdiff_t>(at + nf));
      at += nf;
      if (result.ok()) add_in_order(w.dkv[j], i, std::move(part), c.most_pending);
    }
  });
  return result;
}

// Stores f32 rows [batch][rows][heads][dim] at rows row0.. of x.
void store_rows(const tensor& x, std::int64_t row0, std::int64_t batch, std::int64_t rows, std::int64_t heads, std::int64_t dim,
                const float* src) {
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t base = b * x.stride_batch + (row0 + r) * x.stride_seq + h * x.stride_head;
        const float* s = src + ((b * rows + r) * heads + h) * dim;
        if (x.type == dtype::f32 && x.stride_dim == 1) {  // a row at a time: the common layout
          std::memcpy(static_cast<float*>(x.data) + base, s, static_cast<std::size_t>(dim) * sizeof(float));
          continue;
        }
        for (std::int64_t d = 0; d < dim; ++d) detail::store_element(x.data, x.type, base + d * x.stride_dim, static_cast<double>(s[d]));
      }
}

// Appends a [batch][rows][heads][dim] f32 sum to a message.
void append_floats(std::vector<std::uint8_t>& dst, const std::vector<float>& x) {
  const auto* b = reinterpret_cast<const std::uint8_t*>(x.data());
  dst.insert(dst.end(), b, b + x.size() * sizeof(float));
}

// The Ulysses backward: one all-to-all per operand (q, k, v, out, d_out, lse) turns the sequence shards into head
// shards, each rank computes every non-empty block for its heads (rank t: q heads t Hq / P.., kv heads t Hkv / P..,
// a whole GQA group), taking the pairs by diagonals s = 0 .. C - 1 (query chunk i, key chunk i - s) so every dq sum
// meets its key chunks in the forward's fold order and every dk / dv sum its query chunks in key order without
// waiting; a last all-to-all returns each chunk's dq, dk, dv for these heads to the rank that holds its tokens.
status run_ulysses_backward(call& c, bwd_call& w) {
  const int P = c.li.ranks, r = c.li.rank;
  const shapes& sh = c.sh;
  const std::int64_t gq = sh.heads_q / P, gkv = sh.heads_kv / P, C = c.li.chunks;
  const std::int64_t es = dtype_size(sh.type), eo = dtype_size(c.out.type), ed = dtype_size(w.d_out.type);
  const auto n = static_cast<std::size_t>(P);
  std::vector<std::vector<std::uint8_t>> sq(n), sk(n), sv(n), so(n), sd(n), sl(n);
  std::vector<std::int64_t> rq(n), rk(n), rv(n), ro(n), rd(n), rl(n);
  const std::int64_t mine = c.q.seq;
  for (int t = 0; t < P; ++t) {
    const auto ti = static_cast<std::size_t>(t);
    pack_heads(c.q, t * gq, gq, sq[ti]);
    pack_heads(c.k, t * gkv, gkv, sk[ti]);
    pack_heads(c.v, t * gkv, gkv, sv[ti]);
    pack_heads(c.out, t * gq, gq, so[ti]);
    pack_heads(w.d_out, t * gq, gq, sd[ti]);
    std::vector<float> l(static_cast<std::size_t>(sh.batch * gq * mine));  // [batch][gq][rows] of this rank's rows
    for (std::int64_t b = 0; b < sh.batch; ++b)
      for (std::int64_t h = 0; h < gq; ++h)
        for (std::int64_t i = 0; i < mine; ++i)
          l[static_cast<std::size_t>((b * gq + h) * mine + i)] =
              w.lse.data[b * w.lse.stride_batch + (t * gq + h) * w.lse.stride_head + i * w.lse.stride_seq];
    append_floats(sl[ti], l);
    const std::int64_t rows = sh.batch * c.li.rows[ti];
    rq[ti] = rows * gq * sh.dim * es;
    rk[ti] = rows * gkv * sh.dim * es;
    rv[ti] = rows * gkv * sh.dim_v * es;
    ro[ti] = rows * gq * sh.dim_v * eo;
    rd[ti] = rows * gq * sh.dim_v * ed;
    rl[ti] = rows * gq * 4;
  }
  const auto q_from = all_to_all(c, sq, rq), k_from = all_to_all(c, sk, rk), v_from = all_to_all(c, sv, rv);
  const auto o_from = all_to_all(c, so, ro), d_from = all_to_all(c, sd, rd), l_from = all_to_all(c, sl, rl);
  std::vector<kv_block> kv(n);
  for (std::size_t t = 0; t < n; ++t) {
    kv[t].k = k_from[t];
    kv[t].v = v_from[t];
  }
  // The rows of query chunk i (held by its owner) for this rank's heads.
  const auto rows_for = [&](std::int64_t i) {
    const auto t = static_cast<std::size_t>(c.li.owner[static_cast<std::size_t>(i)]);
    const std::int64_t total = c.li.rows[t], row0 = c.li.local_row[static_cast<std::size_t>(i)], len = c.li.len(i);
    auto* lp = reinterpret_cast<float*>(const_cast<std::uint8_t*>(l_from[t].data()));
    const lse_tensor l{lp + row0, gq * total, total, 1};
    const auto view = [&](const std::vector<std::uint8_t>& buf, dtype type, std::int64_t dim) {
      return packed_view(buf, type, sh.batch, total, gq, dim, row0, len);
    };
    return bwd_rows{view(q_from[t], sh.type, sh.dim), view(o_from[t], c.out.type, sh.dim_v), view(d_from[t], w.d_out.type, sh.dim_v), l};
  };
  std::map<std::int64_t, ordered_sum> dq, dkv;
  for (std::int64_t ch = 0; ch < C; ++ch) {
    for (std::int64_t j : fold_order(ch, C))
      if (block_nonempty(c, ch, j)) dq[ch].order.push_back(j);
    dq[ch].acc.assign(static_cast<std::size_t>(sh.batch * c.li.len(ch) * gq * sh.dim), 0.0f);
    for (std::int64_t i : key_order(ch, C))
      if (block_nonempty(c, i, ch)) dkv[ch].order.push_back(i);
    dkv[ch].acc.assign(static_cast<std::size_t>(sh.batch * c.li.len(ch) * gkv * (sh.dim + sh.dim_v)), 0.0f);
  }
  status result;
  for (std::int64_t s = 0; s < C && result.ok(); ++s)
    for (std::int64_t i = 0; i < C && result.ok(); ++i) {
      const std::int64_t j = ((i - s) % C + C) % C;
      if (!block_nonempty(c, i, j)) continue;
      std::vector<float> pq, pkv;
      result = block_backward(c, i, j, rows_for(i), kv[static_cast<std::size_t>(c.li.owner[static_cast<std::size_t>(j)])], gkv,
                              r * gq, pq, pkv);
      if (!result.ok()) break;
      add_in_order(dq[i], j, std::move(pq), c.most_pending);
      add_in_order(dkv[j], i, std::move(pkv), c.most_pending);
    }
  // Back: to each rank t, its chunks (in its local order) for this rank's heads, dq then dk and dv, f32. A failed
  // kernel still takes part (partial sums), and the caller reports the failure on every rank before storing.
  std::vector<std::vector<std::uint8_t>> back(n);
  std::vector<std::int64_t> back_bytes(n, 0);
  for (int t = 0; t < P; ++t)
    for (std::int64_t ch : c.li.held[static_cast<std::size_t>(t)]) {
      append_floats(back[static_cast<std::size_t>(t)], dq[ch].acc);
      append_floats(back[static_cast<std::size_t>(t)], dkv[ch].acc);
    }
  for (std::size_t t = 0; t < n; ++t)
    for (std::int64_t ch : c.li.held[static_cast<std::size_t>(r)])
      back_bytes[t] += sh.batch * c.li.len(ch) * (gq * sh.dim + gkv * (sh.dim + sh.dim_v)) * 4;
  c.returned = all_to_all(c, back, back_bytes);
  for (const auto& [ch, a] : dq)
    if (result.ok() && a.next != a.order.size()) result = {"internal: dq of chunk " + std::to_string(ch) + " incomplete"};
  for (const auto& [ch, a] : dkv)
    if (result.ok() && a.next != a.order.size()) result = {"internal: dk / dv of chunk " + std::to_string(ch) + " incomplete"};
  return result;
}

// Stores what the Ulysses backward's return brought: from rank t, this rank's chunks' dq, dk, dv for t's heads.
void store_returned_gradients(const call& c, const cp_gradients& g) {
  const shapes& sh = c.sh;
  const int P = c.li.ranks;
  const std::int64_t gq = sh.heads_q / P, gkv = sh.heads_kv / P;
  for (int t = 0; t < P; ++t) {
    const auto* at = reinterpret_cast<const float*>(c.returned[static_cast<std::size_t>(t)].data());
    for (std::int64_t ch : c.li.held[static_cast<std::size_t>(c.li.rank)]) {
      const std::int64_t row0 = c.li.local_row[static_cast<std::size_t>(ch)], len = c.li.len(ch);
      store_rows(heads_of(g.dq, t * gq, gq), row0, sh.batch, len, gq, sh.dim, at);
      at += sh.batch * len * gq * sh.dim;
      store_rows(heads_of(g.dk, t * gkv, gkv), row0, sh.batch, len, gkv, sh.dim, at);
      at += sh.batch * len * gkv * sh.dim;
      store_rows(heads_of(g.dv, t * gkv, gkv), row0, sh.batch, len, gkv, sh.dim_v, at);
      at += sh.batch * len * gkv * sh.dim_v;
    }
  }
}

}  // namespace

status attention_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const lse_tensor& lse,
                          const tensor& d_out, const cp_gradients& g, const spec& s, const cp_options& o) {
  const double t_start = now();
  call c(q, k, v, out, s, o);
  if (status st = setup(c, static_cast<std::int64_t>(d_out.type)); !st.ok()) return st;
  bwd_call w{lse, d_out, g, {}, {}};
  // The backward's own rules, on this rank's rows against its own keys as a block of the problem.
  std::string local;
  {
    const problem_block pb{0, 0, c.li.n, c.li.n};
    options opt;
    opt.use = backend::cpu;
    opt.threads = o.threads;
    opt.block = &pb;
    attn_bwd_params p;
    gradients gr{g.dq, g.dk, g.dv};
    if (const status st = make_backward_params(q, k, v, out, lse, d_out, gr, s, opt, p); !st.ok())
      local = st.error.rfind("[attention_backward] ", 0) == 0 ? st.error.substr(21) : st.error;
    else
      c.base = p.fwd;  // the representative block classify_blocks reads
    if (local.empty() && o.use != mechanism::automatic && o.use != mechanism::ring && o.use != mechanism::ulysses)
      local = std::string("options.use ") + mechanism_name(o.use) + ": the backward runs on the ring or Ulysses (or automatic)";
    if (local.empty() && o.use == mechanism::ulysses)
      if (std::string why = ulysses_blocker(c); !why.empty()) local = "options.use: " + why;
    if (local.empty() && s.rope && (s.rope->pos_q || s.rope->pos_k))
      local = "spec.rope.pos_q / pos_k are not supported: RoPE positions are the tokens' global positions";
  }
  const mechanism m = local.empty() ? plan_backward(c) : mechanism::ring;
  if (local.empty()) local = message_limits(c, m, true);
  std::string err = agree(c.o.comm, c.li.rank, local);
  if (!err.empty()) return {err};
  c.local = s;
  c.local.sink_logits = nullptr;  // P comes from the whole rows' lse, which holds the sink already
  kv_block mine_kv;
  try {
    classify_blocks(c);
    const std::int64_t C = c.li.chunks;
    // The ring's sums (Ulysses keeps its own, for every chunk of its heads).
    if (m == mechanism::ring)
      for (std::int64_t ch : c.li.held[static_cast<std::size_t>(c.li.rank)]) {
        ordered_sum& dq = w.dq[ch];
        for (std::int64_t j : fold_order(ch, C))
          if (block_nonempty(c, ch, j)) dq.order.push_back(j);
        dq.acc.assign(static_cast<std::size_t>(c.sh.batch * c.li.len(ch) * c.sh.heads_q * c.sh.dim), 0.0f);
        ordered_sum& dkv = w.dkv[ch];
        for (std::int64_t i : key_order(ch, C))
          if (block_nonempty(c, i, ch)) dkv.order.push_back(i);
        dkv.acc.assign(static_cast<std::size_t>(c.sh.batch * c.li.len(ch) * c.sh.heads_kv * (c.sh.dim + c.sh.dim_v)), 0.0f);
      }
    pack(k, mine_kv.k);
    pack(v, mine_kv.v);
  } catch (const std::exception& e) {
    local = std::string("preparing the call: ") + e.what();
  }
  if (err = agree(c.o.comm, c.li.rank, local); !err.empty()) return {err};
  c.rep.mechanism = mechanism_name(m);
  c.rep.chunks = c.li.chunks;
  const status st = during_exchange(c, [&] { return m == mechanism::ulysses ? run_ulysses_backward(c, w) : run_ring_backward(c, w, mine_kv); });
  std::string failed = st.ok() ? std::string{} : st.error;
  for (const auto& [ch, a] : w.dq)
    if (failed.empty() && a.next != a.order.size()) failed = "internal: dq of chunk " + std::to_string(ch) + " incomplete";
  for (const auto& [ch, a] : w.dkv)
    if (failed.empty() && a.next != a.order.size()) failed = "internal: dk / dv of chunk " + std::to_string(ch) + " incomplete";
  if (err = agree(c.o.comm, c.li.rank, failed); !err.empty()) return {err};
  const shapes& sh = c.sh;
  if (m == mechanism::ulysses) store_returned_gradients(c, g);
  for (const auto& [ch, a] : w.dq)
    store_rows(g.dq, c.li.local_row[static_cast<std::size_t>(ch)], sh.batch, c.li.len(ch), sh.heads_q, sh.dim, a.acc.data());
  for (const auto& [ch, a] : w.dkv) {
    const std::int64_t nk = sh.batch * c.li.len(ch) * sh.heads_kv * sh.dim;
    store_rows(g.dk, c.li.local_row[static_cast<std::size_t>(ch)], sh.batch, c.li.len(ch), sh.heads_kv, sh.dim, a.acc.data());
    store_rows(g.dv, c.li.local_row[static_cast<std::size_t>(ch)], sh.batch, c.li.len(ch), sh.heads_kv, sh.dim_v, a.acc.data() + nk);
  }
  c.rep.partials_buffered = c.most_pending;
  c.rep.seconds = now() - t_start;
  if (o.report) *o.report = c.rep;
  return {};
}

}  // namespace omniattn::dist
