// omniattn::dist under mpirun (ctest runs this binary on 1, 2 and 4 processes): every rank builds the same seeded
// global problem, takes its shards by the layout, runs dist::attention, and checks
//   * bitwise equality with the same problem on one process (dist::attention on MPI_COMM_SELF, all chunks local,
//     the same chunk count and layout), for every mechanism x layout x {full, causal, window, document, + sinks and
//     ALiBi, + RoPE};
//   * closeness to one attention() call over the whole problem (merge tolerance, tests/tolerance.h);
//   * that blocks no rank needs do not travel (causal, window), and that errors are collective and write nothing.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <random>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/problem.h"
#include "omniattn/dist.h"
#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn {
namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// Rows `rows` (global positions, in order) of a BSHD tensor, copied into a contiguous BSHD buffer.
std::vector<std::uint8_t> gather_rows(const tensor& t, const std::vector<std::int64_t>& rows) {
  const int es = dtype_size(t.type);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(t.batch * static_cast<std::int64_t>(rows.size()) * t.heads * t.dim * es));
  std::size_t at = 0;
  for (std::int64_t b = 0; b < t.batch; ++b)
    for (std::int64_t r : rows)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.dim; ++d, at += static_cast<std::size_t>(es))
          std::memcpy(out.data() + at,
                      static_cast<const std::uint8_t*>(t.data) +
                          (b * t.stride_batch + r * t.stride_seq + h * t.stride_head + d * t.stride_dim) * es,
                      static_cast<std::size_t>(es));
  return out;
}

// The global rows of the chunks a rank holds, in local order.
std::vector<std::int64_t> shard_rows(dist::layout l, std::int64_t chunks, int ranks, int rank, std::int64_t n) {
  std::vector<std::int64_t> rows;
  for (std::int64_t c : dist::rank_chunks(l, chunks, ranks, rank))
    for (std::int64_t t = c * n / chunks; t < (c + 1) * n / chunks; ++t) rows.push_back(t);
  return rows;
}

struct shard_result {
  std::vector<float> out, lse;  // [batch][rows][heads][dim_v] f32, [batch][heads][rows]
  dist::cp_report rep;
  status st;
};

// dist::attention of a problem's shards (rank `rank` of `ranks` on comm).
shard_result run_shard(const problem_data& d, const spec& s, MPI_Comm comm, dist::mechanism m, dist::layout l,
                       std::int64_t chunks, int ranks, int rank, int ulysses_degree = 0) {
  const problem& p = d.prob;
  const std::vector<std::int64_t> rows = shard_rows(l, chunks, ranks, rank, p.seq_q);
  const auto n = static_cast<std::int64_t>(rows.size());
  std::vector<std::uint8_t> q = gather_rows(d.q_view(), rows), k = gather_rows(d.k_view(), rows), v = gather_rows(d.v_view(), rows);
  shard_result r;
  r.out.assign(static_cast<std::size_t>(p.batch * n * p.heads_q * p.dim_v), std::numeric_limits<float>::quiet_NaN());
  r.lse.assign(static_cast<std::size_t>(p.batch * p.heads_q * n), std::numeric_limits<float>::quiet_NaN());
  const lse_tensor lv = make_lse(r.lse.data(), p.heads_q, n);
  dist::cp_options o;
  o.comm = comm;
  o.use = m;
  o.shards = l;
  o.chunks = chunks;
  o.ulysses_degree = ulysses_degree;
  o.threads = 1;
  o.lse = &lv;
  o.report = &r.rep;
  r.st = dist::attention(make_bshd(q.data(), p.type, p.batch, n, p.heads_q, p.dim_qk), make_bshd(k.data(), p.type, p.batch, n, p.heads_kv, p.dim_qk),
                         make_bshd(v.data(), p.type, p.batch, n, p.heads_kv, p.dim_v),
                         make_bshd(r.out.data(), dtype::f32, p.batch, n, p.heads_q, p.dim_v), s, o);
  return r;
}

struct spec_case {
  const char* name;
  std::function<void(spec&, std::vector<float>&, rope_spec&, std::int64_t n, std::int64_t heads)> set;
};

std::vector<spec_case> spec_cases() {
  return {
      {"full", [](spec&, auto&, auto&, auto, auto) {}},
      {"causal", [](spec& s, auto&, auto&, auto, auto) { s.causal = causal_mode::bottom_right; }},
      {"window", [](spec& s, auto&, auto&, auto, auto) { s.mask = mask_expr::window(11, 0, causal_mode::bottom_right); }},
      {"document", [](spec& s, auto&, auto&, std::int64_t n, auto) {
         s.causal = causal_mode::top_left;
         s.mask = mask_expr::document({0, n / 5, n / 2 + 3, n});
       }},
      {"causal + sinks + alibi", [](spec& s, std::vector<float>& sinks, auto&, auto, std::int64_t heads) {
         s.causal = causal_mode::bottom_right;
         sinks.assign(static_cast<std::size_t>(heads), 0.0f);
         for (std::size_t h = 0; h < sinks.size(); ++h) sinks[h] = 0.5f * static_cast<float>(h) - 0.3f;
         s.sink_logits = sinks.data();
         s.score = scores::alibi(scores::alibi_slopes(heads));
       }},
      {"causal + rope", [](spec& s, auto&, rope_spec& r, auto, auto) {
         s.causal = causal_mode::bottom_right;
         r = rope_spec{};
         s.rope = &r;
       }},
  };
}

std::int64_t chunks_for(dist::layout l, int ranks) { return l == dist::layout::zigzag ? 8 : 4 * ((ranks + 3) / 4); }

TEST(Dist, BitwiseEqualToOneProcessAndCloseToOneCall) {
  const int P = world_size(), rank = world_rank();
  for (dtype t : {dtype::f32, dtype::bf16}) {
    // 8 q heads over 4 kv heads: Ulysses splits them on 1, 2 and 4 ranks.
    problem p = test::small_problem(101, 101, 8, 4, 16, t, causal_mode::none, 7);
    p.batch = 2;
    p.dim_v = 12;
    const problem_data d(p);
    for (const spec_case& sc : spec_cases()) {
      spec s;
      std::vector<float> sinks;
      rope_spec rope;
      sc.set(s, sinks, rope, p.seq_q, p.heads_q);
      // One attention() call over the whole problem, f32 out.
      std::vector<float> full_out(static_cast<std::size_t>(p.batch * p.seq_q * p.heads_q * p.dim_v)), full_lse(static_cast<std::size_t>(p.batch * p.heads_q * p.seq_q));
      const lse_tensor fl = make_lse(full_lse.data(), p.heads_q, p.seq_q);
      options fo = d.make_options(backend::cpu, 1);
      fo.lse = &fl;
      ASSERT_TRUE(attention(d.q_view(), d.k_view(), d.v_view(), make_bshd(full_out.data(), dtype::f32, p.batch, p.seq_q, p.heads_q, p.dim_v), s, fo).ok());
      for (dist::layout l : {dist::layout::contiguous, dist::layout::zigzag})
        // The hybrid with groups of 1 (a ring through its path), 2 (on 4 ranks: 2 groups of 2) and the default.
        for (const auto& [m, degree] : std::vector<std::pair<dist::mechanism, int>>{
                 {dist::mechanism::ring, 0}, {dist::mechanism::allgather, 0}, {dist::mechanism::token_ring, 0},
                 {dist::mechanism::ulysses, 0}, {dist::mechanism::hybrid, 0}, {dist::mechanism::hybrid, 1},
                 {dist::mechanism::hybrid, 2}, {dist::mechanism::automatic, 0}}) {
          if (m == dist::mechanism::ulysses && (p.heads_q % P != 0 || p.heads_kv % P != 0)) continue;
          if (degree > 1 && P % degree != 0) continue;
          const std::int64_t chunks = chunks_for(l, P);
          SCOPED_TRACE(std::string(sc.name) + " " + dist::layout_name(l) + " " + dist::mechanism_name(m) + " U=" +
                       std::to_string(degree) + " " + dtype_name(t) + " P=" + std::to_string(P) + " rank " + std::to_string(rank));
          const shard_result got = run_shard(d, s, MPI_COMM_WORLD, m, l, chunks, P, rank, degree);
          ASSERT_TRUE(got.st.ok()) << got.st.error;  // errors are collective: every rank leaves here together
          if (m != dist::mechanism::automatic) EXPECT_EQ(got.rep.mechanism, dist::mechanism_name(m));
          // The same problem on one process: all chunks local, in this layout's order for one rank.
          const shard_result one = run_shard(d, s, MPI_COMM_SELF, m, l, chunks, 1, 0);
          EXPECT_TRUE(one.st.ok()) << one.st.error;
          if (!one.st.ok()) continue;
          const std::vector<std::int64_t> mine = shard_rows(l, chunks, P, rank, p.seq_q), all = shard_rows(l, chunks, 1, 0, p.seq_q);
          std::vector<std::int64_t> where(static_cast<std::size_t>(p.seq_q));  // global row -> row of the 1-process run
          for (std::size_t i = 0; i < all.size(); ++i) where[static_cast<std::size_t>(all[i])] = static_cast<std::int64_t>(i);
          const auto n = static_cast<std::int64_t>(mine.size());
          const double unit = test::k_merge_eps * test::dtype_eps(dtype::f32) * 8.0;  // |lse| <= ~8 here
          // No ASSERT inside: a rank leaving the test early would leave the others waiting in the next collective.
          double worst_out = 0, worst_lse = 0;
          std::int64_t out_diff = 0, lse_diff = 0, not_finite = 0;
          for (std::int64_t b = 0; b < p.batch; ++b)
            for (std::int64_t i = 0; i < n; ++i)
              for (std::int64_t h = 0; h < p.heads_q; ++h) {
                const std::int64_t g = mine[static_cast<std::size_t>(i)], w = where[static_cast<std::size_t>(g)];
                const float* a = &got.out[static_cast<std::size_t>(((b * n + i) * p.heads_q + h) * p.dim_v)];
                const float* e = &one.out[static_cast<std::size_t>(((b * p.seq_q + w) * p.heads_q + h) * p.dim_v)];
                out_diff += std::memcmp(a, e, static_cast<std::size_t>(p.dim_v) * sizeof(float)) != 0;
                const float la = got.lse[static_cast<std::size_t>((b * p.heads_q + h) * n + i)];
                const float le = one.lse[static_cast<std::size_t>((b * p.heads_q + h) * p.seq_q + w)];
                lse_diff += std::memcmp(&la, &le, sizeof(float)) != 0;
                const float lf = full_lse[static_cast<std::size_t>((b * p.heads_q + h) * p.seq_q + g)];
                not_finite += !(std::isfinite(la) && std::isfinite(lf));
                worst_lse = std::max(worst_lse, static_cast<double>(std::fabs(la - lf)));
                for (std::int64_t dd = 0; dd < p.dim_v; ++dd)
                  worst_out = std::max(worst_out, static_cast<double>(std::fabs(
                                                      a[dd] - full_out[static_cast<std::size_t>(((b * p.seq_q + g) * p.heads_q + h) * p.dim_v + dd)])));
              }
          EXPECT_EQ(out_diff, 0) << "out rows (x heads) not bitwise those of one process";
          EXPECT_EQ(lse_diff, 0) << "lse rows (x heads) not bitwise those of one process";
          EXPECT_EQ(not_finite, 0);
          EXPECT_LE(worst_out, unit * p.input_range) << "out against one attention() call";
          EXPECT_LE(worst_lse, unit) << "lse against one attention() call";
        }
    }
  }
}

// The backward on the ring, Ulysses and the planner's choice: every rank's dq, dk, dv shards are bitwise those of one
// process (same chunks and layout) and close to one attention_backward call of the whole problem. 8 q heads over 4
// kv heads, so Ulysses takes whole GQA groups on 1, 2 and 4 ranks.
void check_backward(const problem& p, const std::vector<spec_case>& cases) {
  const int P = world_size(), rank = world_rank();
  const problem_data d(p);
  for (const spec_case& sc : cases) {
    spec s;
    std::vector<float> sinks;
    rope_spec rope;
    sc.set(s, sinks, rope, p.seq_q, p.heads_q);
    // The whole problem on one call: forward (out, lse) and backward.
    const std::size_t nq = static_cast<std::size_t>(p.batch * p.seq_q * p.heads_q * p.dim_qk);
    const std::size_t nk = static_cast<std::size_t>(p.batch * p.seq_k * p.heads_kv * p.dim_qk);
    std::vector<float> full_out(nq), full_lse(static_cast<std::size_t>(p.batch * p.heads_q * p.seq_q)), d_out(nq);
    std::mt19937_64 rng(5);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& x : d_out) x = u(rng);
    const lse_tensor fl = make_lse(full_lse.data(), p.heads_q, p.seq_q);
    options fo = d.make_options(backend::cpu, 1);
    fo.lse = &fl;
    const tensor fout = make_bshd(full_out.data(), dtype::f32, p.batch, p.seq_q, p.heads_q, p.dim_v);
    ASSERT_TRUE(attention(d.q_view(), d.k_view(), d.v_view(), fout, s, fo).ok());
    std::vector<float> fdq(nq), fdk(nk), fdv(nk);
    gradients fg{make_bshd(fdq.data(), dtype::f32, p.batch, p.seq_q, p.heads_q, p.dim_qk),
                 make_bshd(fdk.data(), dtype::f32, p.batch, p.seq_k, p.heads_kv, p.dim_qk),
                 make_bshd(fdv.data(), dtype::f32, p.batch, p.seq_k, p.heads_kv, p.dim_v)};
    const tensor fdo = make_bshd(d_out.data(), dtype::f32, p.batch, p.seq_q, p.heads_q, p.dim_v);
    ASSERT_TRUE(attention_backward(d.q_view(), d.k_view(), d.v_view(), fout, fl, fdo, fg, s, d.make_options(backend::cpu, 1)).ok());
    for (dist::mechanism mech : {dist::mechanism::automatic, dist::mechanism::ring, dist::mechanism::ulysses})
    for (dist::layout l : {dist::layout::contiguous, dist::layout::zigzag}) {
      const std::int64_t chunks = chunks_for(l, P);
      SCOPED_TRACE(std::string(sc.name) + " " + dist::mechanism_name(mech) + " " + dist::layout_name(l) + " P=" + std::to_string(P) +
                   " rank " + std::to_string(rank));
      // This rank's shards (and those of the one-process run, on the ring) of everything.
      dist::cp_report rep;
      const auto run = [&](MPI_Comm comm, int ranks, int r, std::vector<float>& dq, std::vector<float>& dk, std::vector<float>& dv,
                           std::vector<std::int64_t>& rows) {
        rows = shard_rows(l, chunks, ranks, r, p.seq_q);
        const auto n = static_cast<std::int64_t>(rows.size());
        std::vector<std::uint8_t> q = gather_rows(d.q_view(), rows), k = gather_rows(d.k_view(), rows), v = gather_rows(d.v_view(), rows);
        std::vector<std::uint8_t> o = gather_rows(fout, rows), g_out = gather_rows(fdo, rows);
        std::vector<float> lse(static_cast<std::size_t>(p.batch * p.heads_q * n));
        for (std::int64_t b = 0; b < p.batch; ++b)
          for (std::int64_t h = 0; h < p.heads_q; ++h)
            for (std::int64_t i = 0; i < n; ++i)
              lse[static_cast<std::size_t>((b * p.heads_q + h) * n + i)] =
                  full_lse[static_cast<std::size_t>((b * p.heads_q + h) * p.seq_q + rows[static_cast<std::size_t>(i)])];
        dq.assign(static_cast<std::size_t>(p.batch * n * p.heads_q * p.dim_qk), 0.0f);
        dk.assign(static_cast<std::size_t>(p.batch * n * p.heads_kv * p.dim_qk), 0.0f);
        dv.assign(dk.size(), 0.0f);
        dist::cp_options co;
        co.comm = comm;
        co.shards = l;
        co.chunks = chunks;
        co.threads = 1;
        const bool reference = comm == MPI_COMM_SELF;
        co.use = reference ? dist::mechanism::ring : mech;
        co.report = reference ? nullptr : &rep;
        return dist::attention_backward(
            make_bshd(q.data(), p.type, p.batch, n, p.heads_q, p.dim_qk), make_bshd(k.data(), p.type, p.batch, n, p.heads_kv, p.dim_qk),
            make_bshd(v.data(), p.type, p.batch, n, p.heads_kv, p.dim_v), make_bshd(o.data(), dtype::f32, p.batch, n, p.heads_q, p.dim_v),
            make_lse(lse.data(), p.heads_q, n), make_bshd(g_out.data(), dtype::f32, p.batch, n, p.heads_q, p.dim_v),
            {make_bshd(dq.data(), dtype::f32, p.batch, n, p.heads_q, p.dim_qk), make_bshd(dk.data(), dtype::f32, p.batch, n, p.heads_kv, p.dim_qk),
             make_bshd(dv.data(), dtype::f32, p.batch, n, p.heads_kv, p.dim_v)},
            s, co);
      };
      std::vector<float> dq, dk, dv, odq, odk, odv;
      std::vector<std::int64_t> rows, all;
      const status st = run(MPI_COMM_WORLD, P, rank, dq, dk, dv, rows);
      ASSERT_TRUE(st.ok()) << st.error;  // errors are collective
      if (mech != dist::mechanism::automatic) EXPECT_EQ(rep.mechanism, dist::mechanism_name(mech));
      else EXPECT_FALSE(rep.reasons.empty());
      const status one = run(MPI_COMM_SELF, 1, 0, odq, odk, odv, all);
      EXPECT_TRUE(one.ok()) << one.error;
      if (!one.ok()) continue;
      std::vector<std::int64_t> where(static_cast<std::size_t>(p.seq_q));
      for (std::size_t i = 0; i < all.size(); ++i) where[static_cast<std::size_t>(all[i])] = static_cast<std::int64_t>(i);
      const auto n = static_cast<std::int64_t>(rows.size());
      std::int64_t diff = 0;
      double worst = 0, m = 0;
      for (float x : fdq) m = std::max(m, static_cast<double>(std::fabs(x)));
      for (float x : fdk) m = std::max(m, static_cast<double>(std::fabs(x)));
      for (float x : fdv) m = std::max(m, static_cast<double>(std::fabs(x)));
      const struct {
        const std::vector<float> &got, &one, &full;
        std::int64_t heads;
      } gs[3] = {{dq, odq, fdq, p.heads_q}, {dk, odk, fdk, p.heads_kv}, {dv, odv, fdv, p.heads_kv}};
      for (const auto& x : gs)
        for (std::int64_t b = 0; b < p.batch; ++b)
          for (std::int64_t i = 0; i < n; ++i) {
            const std::int64_t row = x.heads * p.dim_qk, g = rows[static_cast<std::size_t>(i)];
            const float* a = &x.got[static_cast<std::size_t>((b * n + i) * row)];
            const float* e = &x.one[static_cast<std::size_t>((b * p.seq_q + where[static_cast<std::size_t>(g)]) * row)];
            const float* f = &x.full[static_cast<std::size_t>((b * p.seq_q + g) * row)];
            diff += std::memcmp(a, e, static_cast<std::size_t>(row) * sizeof(float)) != 0;
            for (std::int64_t c = 0; c < row; ++c) worst = std::max(worst, static_cast<double>(std::fabs(a[c] - f[c])));
          }
      EXPECT_EQ(diff, 0) << "gradient rows not bitwise those of one process";
      // Causal: only the C (C + 1) / 2 blocks on and below the diagonal run (once each on the ring; Ulysses computes
      // every block for each rank's heads).
      std::int64_t pairs = 0;
      MPI_Allreduce(&rep.pairs_computed, &pairs, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
      if (std::string(sc.name) == "causal")
        EXPECT_EQ(pairs, (rep.mechanism == "ulysses" ? P : 1) * chunks * (chunks + 1) / 2) << rep.mechanism;
      // Chunked sums of the kernel's block gradients against one backward call: a few units per block of the largest.
      const double chunks_d = static_cast<double>(chunks);
      EXPECT_LE(worst, 16.0 * chunks_d * test::dtype_eps(dtype::f32) * std::max(m, 1.0)) << "against one attention_backward call";
    }
  }
}

TEST(Dist, BackwardBitwiseEqualToOneProcessAndCloseToOneCall) {
  problem p = test::small_problem(75, 75, 8, 4, 8, dtype::f32, causal_mode::none, 11);
  p.batch = 2;
  check_backward(p, spec_cases());
}

// Chunks of several key tiles (here 275 tokens: 5 tiles of 64): the backward kernel splits a block's dQ sum over key
// tile ranges, and a call over a group of heads (the ring's progress pieces, Ulysses' head shards) must split it as
// the call over every head does, or the bits would depend on the process count.
TEST(Dist, BackwardBitsHoldForChunksOfManyKeyTiles) {
  problem p = test::small_problem(1100, 1100, 8, 4, 8, dtype::f32, causal_mode::none, 13);
  std::vector<spec_case> cases;
  for (const spec_case& c : spec_cases())
    if (std::string(c.name) == "full" || std::string(c.name) == "causal") cases.push_back(c);
  check_backward(p, cases);
}

// A causal ring never sends the last rank's keys anywhere, and a short window sends each block one hop; the pairs
// the mask leaves empty are not computed.
TEST(Dist, RingSkipsBlocksNoLaterRankNeeds) {
  const int P = world_size(), rank = world_rank();
  problem p = test::small_problem(96, 96, 2, 1, 8, dtype::f32, causal_mode::none, 3);
  const problem_data d(p);
  spec causal;
  causal.causal = causal_mode::bottom_right;
  const shard_result c = run_shard(d, causal, MPI_COMM_WORLD, dist::mechanism::ring, dist::layout::contiguous, P, P, rank);
  ASSERT_TRUE(c.st.ok()) << c.st.error;
  // Rank r's queries see keys of ranks 0..r only.
  EXPECT_EQ(c.rep.pairs_computed, rank + 1);
  EXPECT_EQ(c.rep.pairs_skipped, P - 1 - rank);
  std::int64_t skipped = 0;
  MPI_Allreduce(&c.rep.messages_skipped, &skipped, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  // Block b travels P - 1 - b hops of the P - 1 steps: sum_b b hops are skipped.
  EXPECT_EQ(skipped, static_cast<std::int64_t>(P) * (P - 1) / 2);
  spec window;
  window.mask = mask_expr::window(5, 0, causal_mode::bottom_right);
  const shard_result w = run_shard(d, window, MPI_COMM_WORLD, dist::mechanism::ring, dist::layout::contiguous, P, P, rank);
  ASSERT_TRUE(w.st.ok()) << w.st.error;
  EXPECT_EQ(w.rep.pairs_computed, rank == 0 ? 1 : 2);
  const std::int64_t block_bytes = 2 * (96 / P) * 8 * 4;  // K and V of one rank
  EXPECT_EQ(w.rep.bytes_sent, P > 1 && rank + 1 < P ? block_bytes : 0);
  // TokenRing under causal sends each Q backward, only as far as rank 0: Q of rank t makes t hops of P - 1.
  const shard_result t = run_shard(d, causal, MPI_COMM_WORLD, dist::mechanism::token_ring, dist::layout::contiguous, P, P, rank);
  ASSERT_TRUE(t.st.ok()) << t.st.error;
  EXPECT_EQ(t.rep.pairs_computed, P - rank);  // rank r computes the queries of ranks r .. P - 1 against its keys
  std::int64_t q_skipped = 0;
  MPI_Allreduce(&t.rep.messages_skipped, &q_skipped, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(q_skipped, static_cast<std::int64_t>(P) * (P - 1) / 2);
}

// dist::explain (no MPI, the whole problem's shapes) predicts what a call on P ranks does: the mechanism, the blocks
// each rank computes (against the call's own report), the empty blocks and the ring hops a mask saves; and it reports
// the call's errors.
TEST(Dist, ExplainPredictsTheCall) {
  const int P = world_size(), rank = world_rank();
  problem p = test::small_problem(96, 96, 4, 4, 8, dtype::f32, causal_mode::none, 5);
  const problem_data d(p);
  for (const char* name : {"causal", "window"}) {
    spec s;
    if (std::string(name) == "causal") s.causal = causal_mode::bottom_right;
    else s.mask = mask_expr::window(5, 0, causal_mode::bottom_right);
    for (dist::mechanism m : {dist::mechanism::ring, dist::mechanism::token_ring, dist::mechanism::ulysses, dist::mechanism::automatic}) {
      if (m == dist::mechanism::ulysses && p.heads_q % P != 0) continue;
      SCOPED_TRACE(std::string(name) + " " + dist::mechanism_name(m) + " P=" + std::to_string(P));
      dist::cp_options o;
      o.use = m;
      o.shards = dist::layout::zigzag;
      const dist::cp_plan plan = dist::explain(d.q_view(), d.k_view(), d.v_view(), d.out_view(), s, P, o);
      ASSERT_TRUE(plan.st.ok()) << plan.st.error;
      const shard_result got = run_shard(d, s, MPI_COMM_WORLD, m, dist::layout::zigzag, 2 * P, P, rank);
      ASSERT_TRUE(got.st.ok()) << got.st.error;
      EXPECT_EQ(plan.mechanism, got.rep.mechanism);
      EXPECT_EQ(plan.chunks, 2 * P);
      ASSERT_EQ(plan.pairs_per_rank.size(), static_cast<std::size_t>(P));
      EXPECT_EQ(plan.pairs_per_rank[static_cast<std::size_t>(rank)], got.rep.pairs_computed);
      const std::int64_t C = 2 * P;
      if (std::string(name) == "causal") EXPECT_EQ(plan.pairs_nonempty, C * (C + 1) / 2);
      EXPECT_EQ(plan.pairs_total, C * C);
      std::int64_t skipped = 0;
      MPI_Allreduce(&got.rep.messages_skipped, &skipped, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
      if (plan.mechanism == "ring") EXPECT_EQ(plan.hops_skipped, skipped);
    }
  }
  // A contiguous causal ring on 4 ranks: shard b travels 3 - b hops, so 6 of the 12 are not taken.
  spec causal;
  causal.causal = causal_mode::bottom_right;
  dist::cp_options ring;
  ring.use = dist::mechanism::ring;
  const dist::cp_plan four = dist::explain(d.q_view(), d.k_view(), d.v_view(), d.out_view(), causal, 4, ring);
  EXPECT_EQ(four.hops_skipped, 6);
  EXPECT_EQ(four.pairs_per_rank, (std::vector<std::int64_t>{1, 2, 3, 4}));
  // Errors: the rules a call would report.
  dist::cp_options z;
  z.shards = dist::layout::zigzag;
  z.chunks = 3;
  EXPECT_NE(dist::explain(d.q_view(), d.k_view(), d.v_view(), d.out_view(), {}, 2, z).st.error.find(
                "[dist::explain] options.chunks 3 must be a positive multiple of 4"),
            std::string::npos);
  EXPECT_NE(dist::explain(d.q_view(), d.k_view(), d.v_view(), d.out_view(), {}, 0, {}).st.error.find("ranks 0 must be >= 1"),
            std::string::npos);
  dist::cp_options u;
  u.use = dist::mechanism::ulysses;
  EXPECT_NE(dist::explain(d.q_view(), d.k_view(), d.v_view(), d.out_view(), {}, 3, u).st.error.find("ulysses needs q.heads 4"),
            std::string::npos);
}

// The library talks on its own duplicate of the communicator: a caller's message in flight on the same communicator,
// with the tags the ring uses, is neither taken nor disturbed by a call.
TEST(Dist, CallerMessagesOnTheSameCommunicatorAreUntouched) {
  const int P = world_size(), rank = world_rank();
  if (P < 2) GTEST_SKIP() << "needs two ranks";
  problem p = test::small_problem(64, 64, 2, 2, 8, dtype::f32, causal_mode::none, 3);
  const problem_data d(p);
  std::vector<float> mine = {1.0f, 2.0f, 3.0f}, got(3, 0.0f);
  MPI_Request req[2];
  int n = 0;
  for (int tag = 0; tag < 2; ++tag) {  // the ring's first K and V tags
    if (rank == 0) MPI_Isend(mine.data(), 3, MPI_FLOAT, 1, tag, MPI_COMM_WORLD, &req[n++]);
  }
  spec s;
  s.causal = causal_mode::bottom_right;
  const shard_result r = run_shard(d, s, MPI_COMM_WORLD, dist::mechanism::ring, dist::layout::contiguous, P, P, rank);
  EXPECT_TRUE(r.st.ok()) << r.st.error;
  if (rank == 1)
    for (int tag = 0; tag < 2; ++tag) {
      std::fill(got.begin(), got.end(), 0.0f);
      MPI_Recv(got.data(), 3, MPI_FLOAT, 0, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      EXPECT_EQ(got, mine) << "tag " << tag;
    }
  if (rank == 0) MPI_Waitall(n, req, MPI_STATUSES_IGNORE);
  const shard_result one = run_shard(d, s, MPI_COMM_SELF, dist::mechanism::ring, dist::layout::contiguous, P, 1, 0);
  const std::vector<std::int64_t> rows = shard_rows(dist::layout::contiguous, P, P, rank, p.seq_q);
  std::int64_t diff = 0;
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::size_t i = 0; i < rows.size(); ++i)
      diff += std::memcmp(&r.out[(static_cast<std::size_t>(b) * rows.size() + i) * static_cast<std::size_t>(p.heads_q * p.dim_v)],
                          &one.out[(static_cast<std::size_t>(b * p.seq_q) + static_cast<std::size_t>(rows[i])) *
                                   static_cast<std::size_t>(p.heads_q * p.dim_v)],
                          static_cast<std::size_t>(p.heads_q * p.dim_v) * sizeof(float)) != 0;
  EXPECT_EQ(diff, 0);
}

TEST(Dist, ErrorsAreCollectiveAndWriteNothing) {
  const int P = world_size(), rank = world_rank();
  const std::int64_t n = 32 / P;
  std::vector<float> buf(static_cast<std::size_t>(n * 2 * 8), 0.5f), out(buf.size(), -7.0f);
  dist::cp_options o;
  o.threads = 1;
  if (P > 1) {
    // The last rank holds one token fewer than the others: the chunks of the 32 - 1 tokens do not match the shards.
    const std::int64_t mine = rank == P - 1 ? n - 1 : n;
    const tensor x = make_bshd(buf.data(), dtype::f32, 1, mine, 2, 8);
    const status st = dist::attention(x, x, x, make_bshd(out.data(), dtype::f32, 1, mine, 2, 8), {}, o);
    EXPECT_NE(st.error.find("[dist::attention] rank "), std::string::npos) << st.error;
    EXPECT_NE(st.error.find(": q.seq "), std::string::npos) << st.error;
    EXPECT_EQ(std::count(out.begin(), out.end(), -7.0f), static_cast<std::ptrdiff_t>(out.size())) << "a rejected call wrote out";
  }
  // Chunk counts the layout cannot split.
  const tensor y = make_bshd(buf.data(), dtype::f32, 1, n, 2, 8);
  o.shards = dist::layout::zigzag;
  o.chunks = 3;
  const status z = dist::attention(y, y, y, make_bshd(out.data(), dtype::f32, 1, n, 2, 8), {}, o);
  EXPECT_NE(z.error.find("options.chunks 3 must be a positive multiple of " + std::to_string(2 * P)), std::string::npos) << z.error;
  // Ulysses cannot split one head over several ranks.
  if (P > 1) {
    const tensor one_head = make_bshd(buf.data(), dtype::f32, 1, n, 1, 8);
    dist::cp_options u = o;
    u.shards = dist::layout::contiguous;
    u.chunks = 0;
    u.use = dist::mechanism::ulysses;
    const status us = dist::attention(one_head, one_head, one_head, make_bshd(out.data(), dtype::f32, 1, n, 1, 8), {}, u);
    EXPECT_NE(us.error.find("options.use: ulysses needs q.heads 1 and k.heads 1 to be multiples of the " + std::to_string(P) + " ranks"),
              std::string::npos) << us.error;
    // The hybrid's group size must divide the ranks and the heads.
    u.use = dist::mechanism::hybrid;
    u.ulysses_degree = P;
    const status hs = dist::attention(one_head, one_head, one_head, make_bshd(out.data(), dtype::f32, 1, n, 1, 8), {}, u);
    EXPECT_NE(hs.error.find("options.ulysses_degree " + std::to_string(P) + " must divide the " + std::to_string(P) +
                            " ranks, q.heads 1 and k.heads 1"),
              std::string::npos)
        << hs.error;
  }
  // One rank that could not build its call (a binding's translation error) fails every rank with its message.
  {
    const tensor z = make_bshd(buf.data(), dtype::f32, 1, n, 2, 8);
    dist::cp_options e = o;
    e.shards = dist::layout::contiguous;
    e.chunks = 0;
    const std::string why = "q has dtype int8";
    if (rank == P - 1) e.local_error = why.c_str();
    const status es = dist::attention(z, z, z, make_bshd(out.data(), dtype::f32, 1, n, 2, 8), {}, e);
    EXPECT_EQ(es.error, "[dist::attention] rank " + std::to_string(P - 1) + ": q has dtype int8");
  }
  // Options that differ between ranks: every rank says so (another rank's options would run another protocol).
  if (P > 1) {
    const tensor z = make_bshd(buf.data(), dtype::f32, 1, n, 2, 8);
    dist::cp_options e = o;
    e.shards = dist::layout::contiguous;
    e.chunks = 0;
    e.use = rank == 1 ? dist::mechanism::allgather : dist::mechanism::ring;
    const status es = dist::attention(z, z, z, make_bshd(out.data(), dtype::f32, 1, n, 2, 8), {}, e);
    EXPECT_NE(es.error.find("[dist::attention] options.use differs between ranks (rank 0: 1, rank 1: 2)"), std::string::npos)
        << es.error;
  }
  // Output dtypes that differ between ranks (the backward's message sizes depend on them): refused on every rank.
  if (P > 1) {
    const tensor z = make_bshd(buf.data(), dtype::f32, 1, n, 2, 8);
    std::vector<std::uint16_t> half(buf.size(), 0);
    dist::cp_options e = o;
    e.shards = dist::layout::contiguous;
    e.chunks = 0;
    const tensor o_mine = rank == 1 ? make_bshd(half.data(), dtype::bf16, 1, n, 2, 8) : make_bshd(out.data(), dtype::f32, 1, n, 2, 8);
    const status es = dist::attention(z, z, z, o_mine, {}, e);
    EXPECT_NE(es.error.find("[dist::attention] out.type differs between ranks"), std::string::npos) << es.error;
    EXPECT_EQ(std::count(half.begin(), half.end(), std::uint16_t{0}), static_cast<std::ptrdiff_t>(half.size()));
  }
  // RoPE position ids index a call's own rows, which are not the tokens' positions here: refused.
  {
    const tensor z = make_bshd(buf.data(), dtype::f32, 1, n, 2, 8);
    std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
    rope_spec rope;
    rope.pos_q = rope.pos_k = ids.data();
    spec rs;
    rs.rope = &rope;
    dist::cp_options e = o;
    e.shards = dist::layout::contiguous;
    e.chunks = 0;
    const status es = dist::attention(z, z, z, make_bshd(out.data(), dtype::f32, 1, n, 2, 8), rs, e);
    EXPECT_NE(es.error.find("spec.rope.pos_q / pos_k are not supported"), std::string::npos) << es.error;
  }
  EXPECT_EQ(std::count(out.begin(), out.end(), -7.0f), static_cast<std::ptrdiff_t>(out.size())) << "a rejected call wrote out";
  // The backward: mechanisms it does not have, and Ulysses on heads it cannot split; the gradients stay untouched.
  {
    std::vector<float> lse(static_cast<std::size_t>(2 * n), 0.0f), grads(buf.size() * 3, -7.0f);
    const std::int64_t heads = P > 1 ? 1 : 2;
    const tensor z = make_bshd(buf.data(), dtype::f32, 1, n, heads, 8), zo = make_bshd(out.data(), dtype::f32, 1, n, heads, 8);
    const dist::cp_gradients g{make_bshd(grads.data(), dtype::f32, 1, n, heads, 8),
                               make_bshd(grads.data() + buf.size(), dtype::f32, 1, n, heads, 8),
                               make_bshd(grads.data() + 2 * buf.size(), dtype::f32, 1, n, heads, 8)};
    dist::cp_options e = o;
    e.shards = dist::layout::contiguous;
    e.chunks = 0;
    e.use = dist::mechanism::token_ring;
    const status tr = dist::attention_backward(z, z, z, zo, make_lse(lse.data(), heads, n), zo, g, {}, e);
    EXPECT_NE(tr.error.find("options.use token_ring: the backward runs on the ring or Ulysses (or automatic)"), std::string::npos)
        << tr.error;
    if (P > 1) {
      e.use = dist::mechanism::ulysses;
      const status us = dist::attention_backward(z, z, z, zo, make_lse(lse.data(), heads, n), zo, g, {}, e);
      EXPECT_NE(us.error.find("options.use: ulysses needs q.heads 1 and k.heads 1 to be multiples of the " + std::to_string(P) +
                              " ranks"),
                std::string::npos)
          << us.error;
    }
    EXPECT_EQ(std::count(grads.begin(), grads.end(), -7.0f), static_cast<std::ptrdiff_t>(grads.size())) << "a rejected call wrote";
  }
  // A spec rule broken on every rank: the kernel's own message.
  spec bad;
  bad.scale = std::numeric_limits<double>::infinity();
  o.shards = dist::layout::contiguous;
  o.chunks = 0;
  const status sc = dist::attention(y, y, y, make_bshd(out.data(), dtype::f32, 1, n, 2, 8), bad, o);
  EXPECT_NE(sc.error.find("spec.scale inf must be finite"), std::string::npos) << sc.error;
  for (float f : out) ASSERT_EQ(f, -7.0f);
}

}  // namespace
}  // namespace omniattn

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int failed = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
