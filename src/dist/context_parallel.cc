// Context-parallel attention over MPI (contract in include/omniattn/dist.h): the sequence in C chunks over P ranks,
// each (query chunk, key chunk) block computed by the CPU kernel as a block of the whole problem (options::block),
// and the blocks of one query chunk folded in a fixed order, so the bits depend on C and the layout only.
#include "omniattn/dist.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
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
  std::vector<std::int64_t> order;  // the non-empty key chunks, in fold order
  std::size_t next = 0;
  std::vector<float> m, l, o;       // [batch][heads][rows], same, [batch][rows][heads][dim_v]
  std::map<std::int64_t, std::pair<std::vector<float>, std::vector<float>>> pending;  // key chunk -> (out, lse)
};

void fold_part(const shapes& sh, chunk_fold& f, const std::vector<float>& out, const std::vector<float>& lse) {
  for (std::int64_t b = 0; b < sh.batch; ++b)
    for (std::int64_t h = 0; h < sh.heads_q; ++h)
      for (std::int64_t r = 0; r < f.rows; ++r) {
        const std::size_t at = static_cast<std::size_t>((b * sh.heads_q + h) * f.rows + r);
        const float lp = lse[at];
        if (lp == k_neg_inf) continue;  // an empty row of the block: weight 0, exactly nothing to add
        const float m_new = std::max(f.m[at], lp);
        const float a = f.m[at] == k_neg_inf ? 0.0f : std::exp(f.m[at] - m_new), w = std::exp(lp - m_new);
        f.m[at] = std::isnan(lp) ? lp : m_new;
        f.l[at] = f.l[at] * a + w;
        float* o = f.o.data() + ((b * f.rows + r) * sh.heads_q + h) * sh.dim_v;
        const float* src = out.data() + ((b * f.rows + r) * sh.heads_q + h) * sh.dim_v;
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

void pack(const tensor& x, std::vector<std::uint8_t>& dst) {
  const int es = dtype_size(x.type);
  dst.resize(static_cast<std::size_t>(x.batch * x.seq * x.heads * x.dim * es));
  std::size_t at = 0;
  for (std::int64_t b = 0; b < x.batch; ++b)
    for (std::int64_t s = 0; s < x.seq; ++s)
      for (std::int64_t h = 0; h < x.heads; ++h)
        for (std::int64_t d = 0; d < x.dim; ++d, at += static_cast<std::size_t>(es)) {
          const std::int64_t off = b * x.stride_batch + s * x.stride_seq + h * x.stride_head + d * x.stride_dim;
          std::memcpy(dst.data() + at, static_cast<const std::uint8_t*>(x.data) + off * es, static_cast<std::size_t>(es));
        }
}

// Everything one call needs on this rank.
struct call {
  call(const tensor& q_, const tensor& k_, const tensor& v_, const tensor& out_, const spec& s_, const cp_options& o_)
      : q(q_), k(k_), v(v_), out(out_), s(s_), o(o_) {}
  const tensor &q, &k, &v, &out;
  const spec& s;
  const cp_options& o;
  shapes sh{};
  layout_info li;
  spec local;                        // the spec without sink logits (they join the fold once, at its end)
  std::vector<chunk_fold> folds;     // this rank's query chunks
  cp_report rep;
  std::int64_t most_pending = 0;
  attn_params base{};                // params of one representative block, for the emptiness test
};

// Whether the block (query chunk i, key chunk j) has an allowed pair: the kernel's own block classification, exact.
bool block_nonempty(const call& c, std::int64_t i, std::int64_t j) {
  attn_params p = c.base;
  p.seq_q = p.seq_rows_q = c.li.len(i);
  p.seq_k = p.seq_rows_k = c.li.len(j);
  p.pos_q0 = c.li.begin(i);
  p.pos_k0 = c.li.begin(j);
  if (p.seq_q == 0 || p.seq_k == 0) return false;
  const block_mask bm = build_block_mask(p, p.seq_q, p.seq_k);
  return std::any_of(bm.kinds.begin(), bm.kinds.end(), [](tile_kind t) { return t != tile_kind::empty; });
}

// The partial result of one block: out [batch][rows][heads][dim_v] and lse [batch][heads][rows], f32.
struct partial {
  std::vector<float> out, lse;
};

// The block (query chunk i, key chunk j) on the CPU kernel. qv: chunk i's query rows; blk: the K/V of j's owner.
status block_partial(call& c, const tensor& qv, std::int64_t i, std::int64_t j, const kv_block& blk, partial& r) {
  const shapes& sh = c.sh;
  const std::int64_t owner = c.li.owner[static_cast<std::size_t>(j)];
  const std::int64_t total = c.li.rows[static_cast<std::size_t>(owner)];
  const std::int64_t row0 = c.li.local_row[static_cast<std::size_t>(j)], len = c.li.len(j), rows = c.li.len(i);
  r.out.assign(static_cast<std::size_t>(sh.batch * rows * sh.heads_q * sh.dim_v), 0.0f);
  r.lse.assign(static_cast<std::size_t>(sh.batch * sh.heads_q * rows), 0.0f);
  const lse_tensor l = make_lse(r.lse.data(), sh.heads_q, rows);
  const problem_block pb{c.li.begin(i), c.li.begin(j), c.li.n, c.li.n};
  options opt;
  opt.use = backend::cpu;
  opt.allow_fallback = false;
  opt.threads = c.o.threads;
  opt.lse = &l;
  opt.block = &pb;
  const double t0 = now();
  const status st = omniattn::attention(qv, packed_view(blk.k, sh.type, sh.batch, total, sh.heads_kv, sh.dim, row0, len),
                                        packed_view(blk.v, sh.type, sh.batch, total, sh.heads_kv, sh.dim_v, row0, len),
                                        make_bshd(r.out.data(), dtype::f32, sh.batch, rows, sh.heads_q, sh.dim_v), c.local, opt);
  c.rep.compute_seconds += now() - t0;
  if (st.ok()) ++c.rep.pairs_computed;
  return st;
}

// The block (query chunk f.chunk of this rank, key chunk j) offered to the fold.
status compute_pair(call& c, chunk_fold& f, std::int64_t j, const kv_block& blk) {
  partial r;
  if (status st = block_partial(c, rows_of(c.q, f.local_row, f.rows), f.chunk, j, blk, r); !st.ok()) return st;
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

status run_ring(call& c, kv_block& mine) {
  const int P = c.li.ranks, r = c.li.rank;
  // A K/V block travels to the farthest rank along the ring whose queries meet it.
  const need_matrix need = rank_needs(c);
  std::vector<int> hops(static_cast<std::size_t>(P), 0);
  for (int b = 0; b < P; ++b)
    for (int s = 1; s < P; ++s)
      if (need[static_cast<std::size_t>((b + s) % P)][static_cast<std::size_t>(b)]) hops[static_cast<std::size_t>(b)] = s;
  const int es = dtype_size(c.sh.type);
  MPI_Datatype k_row = row_type(static_cast<int>(c.sh.dim * es)), v_row = row_type(static_cast<int>(c.sh.dim_v * es));
  const auto rows_of_rank = [&](int b) { return static_cast<int>(c.sh.batch * c.li.rows[static_cast<std::size_t>(b)] * c.sh.heads_kv); };
  kv_block other, next;
  kv_block* cur = &mine;
  status result;
  for (int s = 0; s < P; ++s) {
    const int cur_owner = ((r - s) % P + P) % P, next_owner = ((r - s - 1) % P + P) % P;
    MPI_Request req[4];
    int n_req = 0;
    const bool send = s + 1 < P && hops[static_cast<std::size_t>(cur_owner)] >= s + 1;
    const bool recv = s + 1 < P && hops[static_cast<std::size_t>(next_owner)] >= s + 1;
    if (s + 1 < P) c.rep.messages_skipped += !send;
    if (recv) {
      next.k.resize(static_cast<std::size_t>(rows_of_rank(next_owner)) * static_cast<std::size_t>(c.sh.dim * es));
      next.v.resize(static_cast<std::size_t>(rows_of_rank(next_owner)) * static_cast<std::size_t>(c.sh.dim_v * es));
      MPI_Irecv(next.k.data(), rows_of_rank(next_owner), k_row, (r - 1 + P) % P, 2 * s, c.o.comm, &req[n_req++]);
      MPI_Irecv(next.v.data(), rows_of_rank(next_owner), v_row, (r - 1 + P) % P, 2 * s + 1, c.o.comm, &req[n_req++]);
      c.rep.bytes_received += static_cast<std::int64_t>(next.k.size() + next.v.size());
    }
    if (send) {
      MPI_Isend(cur->k.data(), rows_of_rank(cur_owner), k_row, (r + 1) % P, 2 * s, c.o.comm, &req[n_req++]);
      MPI_Isend(cur->v.data(), rows_of_rank(cur_owner), v_row, (r + 1) % P, 2 * s + 1, c.o.comm, &req[n_req++]);
      c.rep.bytes_sent += static_cast<std::int64_t>(cur->k.size() + cur->v.size());
    }
    // The local tiles run while the transfers are in flight. A failed kernel still completes the exchange, so no
    // rank is left waiting.
    if (result.ok() && need[static_cast<std::size_t>(r)][static_cast<std::size_t>(cur_owner)])
      result = compute_block(c, *cur, cur_owner);
    const double t0 = now();
    MPI_Waitall(n_req, req, MPI_STATUSES_IGNORE);
    c.rep.wait_seconds += now() - t0;
    if (recv) {
      std::swap(other, next);
      cur = &other;
    }
  }
  MPI_Type_free(&k_row);
  MPI_Type_free(&v_row);
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
  // The blocks (i of q_owner, j of kv_owner) that are not empty, in the order both sides pack them.
  const auto pairs_of = [&](int q_owner, int kv_owner) {
    std::vector<std::pair<std::int64_t, std::int64_t>> v;
    for (std::int64_t i : c.li.held[static_cast<std::size_t>(q_owner)])
      for (std::int64_t j : c.li.held[static_cast<std::size_t>(kv_owner)])
        if (block_nonempty(c, i, j)) v.emplace_back(i, j);
    return v;
  };
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
          result = block_partial(c, rows_of(qv_all, c.li.local_row[static_cast<std::size_t>(i)], c.li.len(i)), i, j, mine, pt);
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
  MPI_Type_free(&q_row);
  return result;
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
  if (total_k > INT_MAX || total_v > INT_MAX) return {"[dist::attention] allgather: the gathered K/V exceed 2 GiB; use the ring"};
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

// Local checks of this rank's arguments (shapes, dtypes, the spec on a representative block); "" when fine.
std::string check_local(call& c) {
  const tensor &q = c.q, &k = c.k, &v = c.v, &out = c.out;
  if (c.o.use != mechanism::automatic && c.o.use != mechanism::ring && c.o.use != mechanism::allgather &&
      c.o.use != mechanism::token_ring)
    return "options.use " + std::to_string(static_cast<int>(c.o.use)) + " is not a mechanism";
  if (c.o.shards != layout::contiguous && c.o.shards != layout::zigzag)
    return "options.shards " + std::to_string(static_cast<int>(c.o.shards)) + " is not a layout";
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

void write_outputs(const call& c) {
  const shapes& sh = c.sh;
  for (const chunk_fold& f : c.folds)
    for (std::int64_t b = 0; b < sh.batch; ++b)
      for (std::int64_t r = 0; r < f.rows; ++r)
        for (std::int64_t h = 0; h < sh.heads_q; ++h) {
          const std::size_t at = static_cast<std::size_t>((b * sh.heads_q + h) * f.rows + r);
          float m = f.m[at], l = f.l[at];
          const float* o = f.o.data() + ((b * f.rows + r) * sh.heads_q + h) * sh.dim_v;
          float sink_w = 0.0f;
          if (c.s.sink_logits) {  // the sink: one more part, lse = sink, out = 0
            const float sk = c.s.sink_logits[h];
            const float m_new = std::max(m, sk);
            const float a = m == k_neg_inf ? 0.0f : std::exp(m - m_new);
            sink_w = a;
            l = l * a + std::exp(sk - m_new);
            m = m_new;
          }
          const float scale = c.s.sink_logits ? sink_w : 1.0f;
          const float inv = l == 0.0f ? 0.0f : scale / l;
          const std::int64_t row = f.local_row + r;
          const std::int64_t base = b * c.out.stride_batch + row * c.out.stride_seq + h * c.out.stride_head;
          for (std::int64_t d = 0; d < sh.dim_v; ++d)
            detail::store_element(c.out.data, c.out.type, base + d * c.out.stride_dim, static_cast<double>(o[d] * inv));
          if (c.o.lse)
            c.o.lse->data[b * c.o.lse->stride_batch + h * c.o.lse->stride_head + row * c.o.lse->stride_seq] =
                l == 0.0f ? k_neg_inf : m + std::log(l);
        }
}

}  // namespace

const char* mechanism_name(mechanism m) {
  switch (m) {
    case mechanism::automatic: return "automatic";
    case mechanism::ring: return "ring";
    case mechanism::allgather: return "allgather";
    case mechanism::token_ring: return "token_ring";
  }
  return "?";
}

const char* layout_name(layout l) { return l == layout::zigzag ? "zigzag" : "contiguous"; }

std::vector<std::int64_t> rank_chunks(layout l, std::int64_t chunks, int ranks, int rank) {
  std::vector<std::int64_t> held;
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

status attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, const cp_options& o) {
  const double t_start = now();
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return {"[dist::attention] MPI is not initialized (call MPI_Init first)"};
  call c(q, k, v, out, s, o);
  MPI_Comm_size(o.comm, &c.li.ranks);
  MPI_Comm_rank(o.comm, &c.li.rank);
  const int P = c.li.ranks;
  // Every rank's shard length and shapes, so the layout and its checks are the same everywhere.
  std::int64_t mine[7] = {q.seq, q.batch, q.heads, k.heads, q.dim, v.dim, static_cast<std::int64_t>(q.type)};
  std::vector<std::int64_t> every(static_cast<std::size_t>(7 * P));
  MPI_Allgather(mine, 7, MPI_INT64_T, every.data(), 7, MPI_INT64_T, o.comm);
  std::string err;
  for (int b = 1; b < P && err.empty(); ++b)
    for (int f = 1; f < 7; ++f)
      if (every[static_cast<std::size_t>(7 * b + f)] != every[static_cast<std::size_t>(f)]) {
        static const char* const names[7] = {"seq", "q.batch", "q.heads", "k.heads", "q.dim", "v.dim", "q.type"};
        err = std::string(names[f]) + " differs between ranks (rank 0: " + std::to_string(every[static_cast<std::size_t>(f)]) +
              ", rank " + std::to_string(b) + ": " + std::to_string(every[static_cast<std::size_t>(7 * b + f)]) + ")";
        break;
      }
  if (!err.empty()) return {"[dist::attention] " + err};
  c.sh = {q.batch, q.heads, k.heads, q.dim, v.dim, q.type};
  c.li.chunks = o.chunks != 0 ? o.chunks : (o.shards == layout::zigzag ? 2 * P : P);
  const std::int64_t unit = o.shards == layout::zigzag ? 2 * P : P;
  if (c.li.chunks < 0 || c.li.chunks % unit != 0) {
    const std::string msg = "options.chunks " + std::to_string(c.li.chunks) + " must be a positive multiple of " +
                            std::to_string(unit) + " (" + (o.shards == layout::zigzag ? "2 x " : "") + std::to_string(P) +
                            " ranks, " + layout_name(o.shards) + ")";
    return {"[dist::attention] " + msg};
  }
  // The global length: the rows of every rank's chunks add up to n; solve for n from rank 0's layout.
  std::int64_t total_rows = 0;
  for (int b = 0; b < P; ++b) total_rows += every[static_cast<std::size_t>(7 * b)];
  c.li.n = total_rows;
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
  if (err = agree(o.comm, c.li.rank, check_local(c)); !err.empty()) return {err};
  c.local = s;
  c.local.sink_logits = nullptr;

  for (std::int64_t ch : c.li.held[static_cast<std::size_t>(c.li.rank)]) {
    chunk_fold f;
    f.chunk = ch;
    f.rows = c.li.len(ch);
    f.local_row = c.li.local_row[static_cast<std::size_t>(ch)];
    for (std::int64_t j : fold_order(ch, c.li.chunks)) {
      if (block_nonempty(c, ch, j)) f.order.push_back(j);
      else ++c.rep.pairs_skipped;
    }
    const auto n_rows = static_cast<std::size_t>(c.sh.batch * c.sh.heads_q * f.rows);
    f.m.assign(n_rows, k_neg_inf);
    f.l.assign(n_rows, 0.0f);
    f.o.assign(n_rows * static_cast<std::size_t>(c.sh.dim_v), 0.0f);
    c.folds.push_back(std::move(f));
  }
  kv_block mine_kv;
  pack(k, mine_kv.k);
  pack(v, mine_kv.v);
  const mechanism m = o.use == mechanism::automatic ? mechanism::ring : o.use;
  c.rep.mechanism = mechanism_name(m);
  c.rep.chunks = c.li.chunks;
  c.rep.reasons.push_back(o.use == mechanism::automatic ? "automatic: ring (K/V rotate, overlapped with the local tiles)"
                                                        : std::string("requested: ") + mechanism_name(m));
  c.rep.reasons.push_back(std::to_string(c.li.chunks) + " chunks of a sequence of " + std::to_string(c.li.n) + " tokens, " +
                          layout_name(o.shards) + " over " + std::to_string(P) + " ranks");
  const status st = m == mechanism::allgather    ? run_allgather(c, mine_kv)
                    : m == mechanism::token_ring ? run_token_ring(c, mine_kv)
                                                 : run_ring(c, mine_kv);
  // A kernel failure on one rank fails every rank, before anything is written.
  if (err = agree(o.comm, c.li.rank, st.ok() ? std::string{} : st.error); !err.empty()) return {err};
  for (const chunk_fold& f : c.folds)
    if (f.next != f.order.size()) return {"[dist::attention] internal: chunk " + std::to_string(f.chunk) + " folded " +
                                          std::to_string(f.next) + " of " + std::to_string(f.order.size()) + " parts"};
  write_outputs(c);
  c.rep.partials_buffered = c.most_pending;
  c.rep.seconds = now() - t_start;
  if (o.report) *o.report = c.rep;
  return {};
}

}  // namespace omniattn::dist
