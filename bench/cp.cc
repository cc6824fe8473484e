// `mpirun -np P omniattn bench --cp`: context-parallel attention (omniattn::dist) per mechanism, layout and mask
// against one attention() call of the whole problem on one process with the same threads, with the communication
// volume, the time ranks spent blocked in MPI and the model of bench/README.md ("Context parallelism"):
//   link   = the point-to-point bandwidth rank 0 <-> 1 measured here (ping-pong of 16 MiB, best of 5);
//   rate   = the useful FLOP/s of the one-process call (FLOPs = 2 * mask_area * (d + d_v));
//   ring   sum over steps s of max(max over ranks of compute(s), shard K/V bytes / link), compute(s) = the FLOPs of
//          the blocks a rank computes at step s / rate;
//   token  the same with Q shards, plus the partials' return (not overlapped);
//   ulysses / allgather: their all-to-all / all-gather bytes / link, plus the largest rank's FLOPs / rate;
//   hybrid the Ulysses all-to-all inside groups of U, then the ring across the P / U groups for 1 / U of the heads.
// local = the same blocks each rank computes under that mechanism, run without any MPI (the slowest rank): the time
// the call would take if communication were free; exposed = ms - local (communication and everything else the
// distribution adds: packing, folding, waiting for a slower neighbour); transfer = the bytes a rank received / link;
// wait = the longest time a rank was blocked in MPI waits (cp_report::wait_seconds: transfers the local blocks did
// not hide, and waiting for a slower neighbour); overlap = 1 - min(wait, transfer) / transfer, the share of the
// transfer time hidden behind the local blocks (blocking collectives, Ulysses' all-to-alls and the all-gather, hide
// nothing by construction).
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "bench/measure.h"
#include "core/problem.h"
#include "omniattn/dist.h"
#include "omniattn/omniattn.h"

namespace omniattn::bench {
namespace {

double wall() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<std::string> words(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ',')) out.push_back(x);
  return out;
}

int usage(int rank, const char* msg) {
  if (rank == 0) {
    if (msg) std::fprintf(stderr, "omniattn bench --cp: %s\n", msg);
    std::fprintf(stderr,
                 "usage: mpirun -np P omniattn bench --cp [--n 8192] [--heads 8:8] [--d 128] [--threads 1]\n"
                 "           [--masks full,causal,window,document] [--mechanisms ring,token_ring,ulysses,allgather,hybrid]\n"
                 "           [--layouts contiguous,zigzag] [--chunks C] [--ulysses-degree U] [--reps 3] [--backward]\n");
  }
  return 2;
}

// Bytes per second between ranks 0 and 1 (16 MiB ping-pong, best of 5); 0 with one rank.
double link_bandwidth(MPI_Comm comm, int rank, int size) {
  if (size < 2) return 0.0;
  std::vector<char> buf(16 << 20);
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    MPI_Barrier(comm);
    const double t0 = wall();
    if (rank == 0) {
      MPI_Send(buf.data(), static_cast<int>(buf.size()), MPI_BYTE, 1, 0, comm);
      MPI_Recv(buf.data(), static_cast<int>(buf.size()), MPI_BYTE, 1, 0, comm, MPI_STATUS_IGNORE);
    } else if (rank == 1) {
      MPI_Recv(buf.data(), static_cast<int>(buf.size()), MPI_BYTE, 0, 0, comm, MPI_STATUS_IGNORE);
      MPI_Send(buf.data(), static_cast<int>(buf.size()), MPI_BYTE, 0, 0, comm);
    }
    const double s = wall() - t0;
    if (s > 0) best = std::max(best, 2.0 * static_cast<double>(buf.size()) / s);
  }
  MPI_Bcast(&best, 1, MPI_DOUBLE, 0, comm);
  return best;
}

struct mask_case {
  std::string name;
  spec s;
};

spec make_spec(const std::string& name, std::int64_t n) {
  spec s;
  if (name == "causal") s.causal = causal_mode::bottom_right;
  else if (name == "window") s.mask = mask_expr::window(n / 16, 0, causal_mode::bottom_right);
  else if (name == "document") s.mask = mask_expr::document({0, n / 8, n / 4, n / 2, n}) & mask_expr::causal(causal_mode::bottom_right);
  return s;
}

// Useful pairs of the block (rows of chunk i, keys of chunk j) of the whole problem, per (batch, head).
std::int64_t block_area(const problem_data& d, const spec& s, std::int64_t n, std::int64_t chunks, std::int64_t i, std::int64_t j) {
  const std::int64_t q0 = i * n / chunks, q1 = (i + 1) * n / chunks, k0 = j * n / chunks, k1 = (j + 1) * n / chunks;
  auto rows = [](tensor t, std::int64_t a, std::int64_t b) {
    t.data = static_cast<char*>(t.data) + a * t.stride_seq * dtype_size(t.type);
    t.seq = b - a;
    return t;
  };
  const problem_block blk{q0, k0, n, n};
  options o;
  o.block = &blk;
  attn_params p;
  if (!make_params(rows(d.q_view(), q0, q1), rows(d.k_view(), k0, k1), rows(d.v_view(), k0, k1), rows(d.out_view(), q0, q1), s, o, p).ok())
    return 0;
  p.heads_q = 1;  // per head: the patterns here do not depend on it
  p.batch = 1;
  return mask_area(p);
}

// The rows of shard `mine` (global token indices) of a [1, n, heads, d] f32 tensor, contiguous.
std::vector<float> take_rows(const tensor& t, const std::vector<std::int64_t>& mine, std::int64_t heads, std::int64_t d) {
  std::vector<float> out(mine.size() * static_cast<std::size_t>(heads * d));
  for (std::size_t i = 0; i < mine.size(); ++i)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t x = 0; x < d; ++x)
        out[(i * static_cast<std::size_t>(heads) + static_cast<std::size_t>(h)) * static_cast<std::size_t>(d) + static_cast<std::size_t>(x)] =
            static_cast<const float*>(t.data)[mine[i] * t.stride_seq + h * t.stride_head + x * t.stride_dim];
  return out;
}

struct bwd_setup {
  const problem_data& data;
  std::int64_t n, hq, hkv, d, chunks_opt, reps;
  int threads, rank, size;
  double link;
};

// `--backward`: dist::attention_backward per mask x layout x mechanism (ring, ulysses, the planner's) against one
// attention_backward call of the whole problem on one process: time, volume, time blocked in MPI, overlap (as in
// the forward table) and the largest difference from the one-process gradients.
int backward_table(const bwd_setup& b, const std::vector<std::string>& masks, const std::vector<std::string>& layouts,
                   const std::vector<std::string>& mechs) {
  const std::int64_t n = b.n, hq = b.hq, hkv = b.hkv, d = b.d;
  const problem_data& data = b.data;
  if (b.rank == 0) {
    std::printf("\nbackward: ms = median wall time of dist::attention_backward (slowest rank); 1-proc = attention_backward on the\n"
                "whole problem, one process; err = max |grad - one-process grad| over dq, dk, dv\n");
    std::printf("\n%-9s %-10s %-10s | %8s %9s %7s | %8s %8s %7s %8s | %6s\n", "mask", "layout", "mechanism", "ms", "1-proc ms",
                "speedup", "MB/rank", "transfer", "overlap", "wait", "err");
  }
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> d_out(static_cast<std::size_t>(n * hq * d));
  for (float& x : d_out) x = u(rng);
  const tensor t_do = make_bshd(d_out.data(), dtype::f32, 1, n, hq, d);
  int failures = 0;
  for (const std::string& mk : masks) {
    const spec s = make_spec(mk, n);
    // The whole problem on one process (rank 0 computes, every rank gets the gradients to compare with).
    std::vector<float> out(static_cast<std::size_t>(n * hq * d)), lse(static_cast<std::size_t>(hq * n));
    std::vector<float> dq(out.size()), dk(static_cast<std::size_t>(n * hkv * d)), dv(dk.size());
    double one_s = 0.0;
    if (b.rank == 0) {
      options o = data.make_options(backend::cpu, b.threads);
      const lse_tensor l = make_lse(lse.data(), hq, n);
      o.lse = &l;
      const tensor t_out = make_bshd(out.data(), dtype::f32, 1, n, hq, d);
      (void)attention(data.q_view(), data.k_view(), data.v_view(), t_out, s, o);
      o.lse = nullptr;
      const gradients g{make_bshd(dq.data(), dtype::f32, 1, n, hq, d), make_bshd(dk.data(), dtype::f32, 1, n, hkv, d),
                        make_bshd(dv.data(), dtype::f32, 1, n, hkv, d)};
      std::vector<double> t;
      for (std::int64_t r = 0; r < b.reps + 1; ++r) {
        const double t0 = wall();
        const status st = attention_backward(data.q_view(), data.k_view(), data.v_view(), t_out, l, t_do, g, s, o);
        if (!st.ok()) std::fprintf(stderr, "%s\n", st.error.c_str());
        if (r > 0) t.push_back(wall() - t0);
      }
      std::sort(t.begin(), t.end());
      one_s = t[t.size() / 2];
    }
    MPI_Bcast(&one_s, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    for (std::vector<float>* x : {&dq, &dk, &dv}) MPI_Bcast(x->data(), static_cast<int>(x->size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    for (const std::string& ly : layouts) {
      dist::layout l = dist::layout::contiguous;
      if (!dist::parse_layout(ly, l)) continue;
      const std::int64_t chunks = b.chunks_opt ? b.chunks_opt : (l == dist::layout::zigzag ? 2 * b.size : b.size);
      std::vector<std::int64_t> mine;
      for (std::int64_t c : dist::rank_chunks(l, chunks, b.size, b.rank))
        for (std::int64_t t = c * n / chunks; t < (c + 1) * n / chunks; ++t) mine.push_back(t);
      const auto m = static_cast<std::int64_t>(mine.size());
      std::vector<float> q = take_rows(data.q_view(), mine, hq, d), k = take_rows(data.k_view(), mine, hkv, d),
                         v = take_rows(data.v_view(), mine, hkv, d), g_out = take_rows(t_do, mine, hq, d);
      std::vector<float> s_out(static_cast<std::size_t>(m * hq * d)), s_lse(static_cast<std::size_t>(hq * m));
      const tensor tq = make_bshd(q.data(), dtype::f32, 1, m, hq, d), tk = make_bshd(k.data(), dtype::f32, 1, m, hkv, d),
                   tv = make_bshd(v.data(), dtype::f32, 1, m, hkv, d), to = make_bshd(s_out.data(), dtype::f32, 1, m, hq, d);
      const lse_tensor tl = make_lse(s_lse.data(), hq, m);
      dist::cp_options fo;
      fo.shards = l;
      fo.chunks = chunks;
      fo.threads = b.threads;
      fo.lse = &tl;
      if (!dist::attention(tq, tk, tv, to, s, fo).ok()) continue;  // the forward table reports forward failures
      std::vector<float> gq(q.size()), gk(k.size()), gv(v.size());
      const dist::cp_gradients g{make_bshd(gq.data(), dtype::f32, 1, m, hq, d), make_bshd(gk.data(), dtype::f32, 1, m, hkv, d),
                                 make_bshd(gv.data(), dtype::f32, 1, m, hkv, d)};
      for (const std::string& me : mechs) {
        if (me != "ring" && me != "ulysses" && me != "auto") continue;  // the mechanisms the backward has
        dist::cp_options o = fo;
        o.lse = nullptr;
        dist::parse_mechanism(me, o.use);
        dist::cp_report rep;
        o.report = &rep;
        std::vector<double> times;
        status st;
        for (std::int64_t r = 0; r < b.reps + 1 && st.ok(); ++r) {
          MPI_Barrier(MPI_COMM_WORLD);
          const double t0 = wall();
          st = dist::attention_backward(tq, tk, tv, to, tl, make_bshd(g_out.data(), dtype::f32, 1, m, hq, d), g, s, o);
          double t = wall() - t0, tmax = 0;
          MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
          if (r > 0) times.push_back(tmax);
        }
        if (!st.ok()) {
          if (b.rank == 0) std::printf("%-9s %-10s %-10s | %s\n", mk.c_str(), ly.c_str(), me.c_str(), st.error.c_str());
          continue;
        }
        std::sort(times.begin(), times.end());
        double err = 0;
        const struct {
          const std::vector<float>&got, &whole;
          std::int64_t heads;
        } gs[3] = {{gq, dq, hq}, {gk, dk, hkv}, {gv, dv, hkv}};
        for (const auto& x : gs)
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t c = 0; c < x.heads * d; ++c)
              err = std::max(err, static_cast<double>(std::fabs(x.got[static_cast<std::size_t>(i * x.heads * d + c)] -
                                                                x.whole[static_cast<std::size_t>(mine[static_cast<std::size_t>(i)] * x.heads * d + c)])));
        double local[4] = {static_cast<double>(rep.bytes_sent), rep.wait_seconds, static_cast<double>(rep.bytes_received), err}, most[4];
        MPI_Allreduce(local, most, 4, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        const double t_med = times[times.size() / 2], transfer = b.link > 0 ? most[2] / b.link : 0.0;
        char overlap[16] = "-";
        if (transfer > 0) std::snprintf(overlap, sizeof overlap, "%.0f%%", 100.0 * (1.0 - std::min(most[1], transfer) / transfer));
        // Chunked fp32 sums against one call: a difference beyond rounding is a wrong result.
        const bool wrong = !(most[3] <= 1e-2);
        failures += wrong;
        if (b.rank == 0)
          std::printf("%-9s %-10s %-10s | %8.2f %9.2f %7.2f | %8.2f %8.2f %7s %8.2f | %6.0e%s\n", mk.c_str(), ly.c_str(),
                      rep.mechanism.c_str(), t_med * 1e3, one_s * 1e3, one_s / t_med, most[0] / 1e6, transfer * 1e3, overlap,
                      most[1] * 1e3, most[3], wrong ? "  WRONG" : "");
      }
    }
  }
  return failures;
}

}  // namespace

int cp_main(int argc, char** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::int64_t n = 8192, hq = 8, hkv = 8, d = 128, chunks_opt = 0, reps = 3;
  int threads = 1, ulysses_degree = 0;
  bool backward = false;
  std::vector<std::string> masks = {"full", "causal", "window", "document"}, mechs = {"ring", "token_ring", "ulysses", "allgather", "hybrid"},
                           layouts = {"contiguous", "zigzag"};
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const bool v = i + 1 < argc;
    if (a == "--cp") continue;
    if (a == "--n" && v) n = std::strtoll(argv[++i], nullptr, 10);
    else if (a == "--d" && v) d = std::strtoll(argv[++i], nullptr, 10);
    else if (a == "--threads" && v) threads = std::atoi(argv[++i]);
    else if (a == "--ulysses-degree" && v) ulysses_degree = std::atoi(argv[++i]);
    else if (a == "--backward") backward = true;
    else if (a == "--chunks" && v) chunks_opt = std::strtoll(argv[++i], nullptr, 10);
    else if (a == "--reps" && v) reps = std::max<std::int64_t>(1, std::strtoll(argv[++i], nullptr, 10));
    else if (a == "--masks" && v) masks = words(argv[++i]);
    else if (a == "--mechanisms" && v) mechs = words(argv[++i]);
    else if (a == "--layouts" && v) layouts = words(argv[++i]);
    else if (a == "--heads" && v) {
      const std::string h = argv[++i];
      const auto colon = h.find(':');
      if (colon == std::string::npos) return usage(rank, "--heads expects HQ:HKV");
      hq = std::strtoll(h.substr(0, colon).c_str(), nullptr, 10);
      hkv = std::strtoll(h.substr(colon + 1).c_str(), nullptr, 10);
    } else {
      const int rc = usage(rank, ("unknown or incomplete argument '" + a + "'").c_str());
      MPI_Finalize();
      return rc;
    }
  }
  // Every rank builds the whole problem (seeded, the same everywhere) and takes its shard of it.
  problem prob;
  prob.seq_q = prob.seq_k = n;
  prob.heads_q = hq;
  prob.heads_kv = hkv;
  prob.dim_qk = prob.dim_v = d;
  prob.out_f32 = true;
  const problem_data data(prob);
  const double link = link_bandwidth(MPI_COMM_WORLD, rank, size);
  // The machine's processors (mpirun binds each rank to a core, so OpenMP sees one: run threads > 1 with --bind-to none).
  const int cores = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  if (rank == 0) {
    std::printf("omniattn bench --cp   ranks=%d  threads/rank=%d  isa=%s  cpu=%s\n", size, threads, isa_name(), cpu_model().c_str());
    std::printf("problem: B=1 N=%lld heads %lld:%lld D=%lld f32; link rank 0 <-> 1: %.2f GB/s (16 MiB ping-pong, best of 5)\n",
                static_cast<long long>(n), static_cast<long long>(hq), static_cast<long long>(hkv), static_cast<long long>(d), link / 1e9);
    if (size * threads > cores)
      std::printf("note: %d ranks x %d threads oversubscribe the %d processors of this machine: times measure correctness "
                  "and volume, not scaling\n", size, threads, cores);
    std::printf("\nms = median wall time of the slowest rank; 1-proc = attention() on the whole problem, one process, the same\n"
                "threads; MB/rank = most bytes a rank sent; local = the same blocks per rank without MPI (slowest rank, ms);\n"
                "exposed = ms - local; transfer = most bytes a rank received / link (ms); wait = longest time a rank was\n"
                "blocked in MPI; overlap = 1 - min(wait, transfer) / transfer; model: bench/README.md; err = max |out -\n"
                "one-process out|\n");
    std::printf("\n%-9s %-10s %-10s | %8s %9s %7s | %8s %8s %8s %8s %7s %8s | %8s %6s\n", "mask", "layout", "mechanism", "ms",
                "1-proc ms", "speedup", "MB/rank", "local", "exposed", "transfer", "overlap", "wait", "model ms", "err");
  }
  int failures = 0;
  for (const std::string& mk : masks) {
    const spec s = make_spec(mk, n);
    // One process, the whole problem, the same threads (the other ranks wait).
    double one_s = 0.0;
    std::vector<float> full_out(static_cast<std::size_t>(n * hq * d));
    if (rank == 0) {
      options o = data.make_options(backend::cpu, threads);
      const tensor out = make_bshd(full_out.data(), dtype::f32, 1, n, hq, d);
      std::vector<double> t;
      for (std::int64_t r = 0; r < reps + 1; ++r) {
        const double t0 = wall();
        const status st = attention(data.q_view(), data.k_view(), data.v_view(), out, s, o);
        if (!st.ok()) std::fprintf(stderr, "%s\n", st.error.c_str());
        if (r > 0) t.push_back(wall() - t0);
      }
      std::sort(t.begin(), t.end());
      one_s = t[t.size() / 2];
    }
    MPI_Bcast(&one_s, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    MPI_Bcast(full_out.data(), static_cast<int>(full_out.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    for (const std::string& ly : layouts) {
      dist::layout l = dist::layout::contiguous;
      if (!dist::parse_layout(ly, l)) continue;
      const std::int64_t chunks = chunks_opt ? chunks_opt : (l == dist::layout::zigzag ? 2 * size : size);
      // The useful area of every chunk pair, and the useful rate of the one-process call.
      std::vector<std::int64_t> area(static_cast<std::size_t>(chunks * chunks));
      std::int64_t total_area = 0;
      for (std::int64_t i = 0; i < chunks; ++i)
        for (std::int64_t j = 0; j < chunks; ++j) total_area += area[static_cast<std::size_t>(i * chunks + j)] = block_area(data, s, n, chunks, i, j);
      const double flop_per_pair = 2.0 * static_cast<double>(hq) * static_cast<double>(2 * d);
      const double rate = one_s > 0 ? flop_per_pair * static_cast<double>(total_area) / one_s : 0.0;
      std::vector<std::vector<std::int64_t>> held(static_cast<std::size_t>(size));
      for (int r = 0; r < size; ++r) held[static_cast<std::size_t>(r)] = dist::rank_chunks(l, chunks, size, r);
      std::vector<std::int64_t> rows(static_cast<std::size_t>(size), 0);
      for (int r = 0; r < size; ++r)
        for (std::int64_t c : held[static_cast<std::size_t>(r)]) rows[static_cast<std::size_t>(r)] += (c + 1) * n / chunks - c * n / chunks;
      // This rank's shard.
      std::vector<std::int64_t> mine;
      for (std::int64_t c : held[static_cast<std::size_t>(rank)])
        for (std::int64_t t = c * n / chunks; t < (c + 1) * n / chunks; ++t) mine.push_back(t);
      const auto m = static_cast<std::int64_t>(mine.size());
      std::vector<float> q = take_rows(data.q_view(), mine, hq, d), k = take_rows(data.k_view(), mine, hkv, d),
                         v = take_rows(data.v_view(), mine, hkv, d);
      std::vector<float> out(static_cast<std::size_t>(m * hq * d));
      for (const std::string& me : mechs) {
        dist::mechanism mech = dist::mechanism::automatic;
        if (!dist::parse_mechanism(me, mech)) {
          if (rank == 0) std::printf("%-9s %-10s %-10s | unknown mechanism\n", mk.c_str(), ly.c_str(), me.c_str());
          continue;
        }
        // The hybrid's groups (the library's default rule when --ulysses-degree is 0).
        int U = ulysses_degree;
        if (U == 0)
          for (int x = 1; x <= size; ++x)
            if (size % x == 0 && hq % x == 0 && hkv % x == 0) U = x;
        if (U <= 0 || size % U != 0) U = 1;
        const int R = size / U;
        // The chunks of group gg (its members' chunks).
        const auto group_chunks = [&](int gg) {
          std::vector<std::int64_t> c;
          for (int t = 0; t < U; ++t) c.insert(c.end(), held[static_cast<std::size_t>(gg * U + t)].begin(), held[static_cast<std::size_t>(gg * U + t)].end());
          return c;
        };
        dist::cp_options o;
        o.use = mech;
        o.shards = l;
        o.chunks = chunks;
        o.ulysses_degree = ulysses_degree;
        o.threads = threads;
        dist::cp_report rep;
        o.report = &rep;
        std::vector<double> times;
        status st;
        for (std::int64_t r = 0; r < reps + 1 && st.ok(); ++r) {
          MPI_Barrier(MPI_COMM_WORLD);
          const double t0 = wall();
          st = dist::attention(make_bshd(q.data(), dtype::f32, 1, m, hq, d), make_bshd(k.data(), dtype::f32, 1, m, hkv, d),
                               make_bshd(v.data(), dtype::f32, 1, m, hkv, d), make_bshd(out.data(), dtype::f32, 1, m, hq, d), s, o);
          double t = wall() - t0, tmax = 0;
          MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
          if (r > 0) times.push_back(tmax);
        }
        if (!st.ok()) {  // e.g. Ulysses with heads that do not split over the ranks: said, not fatal
          if (rank == 0) std::printf("%-9s %-10s %-10s | %s\n", mk.c_str(), ly.c_str(), me.c_str(), st.error.c_str());
          continue;
        }
        std::sort(times.begin(), times.end());
        const double t_med = times[times.size() / 2];
        double local[3] = {static_cast<double>(rep.bytes_sent), rep.wait_seconds, static_cast<double>(rep.bytes_received)}, most[3];
        MPI_Allreduce(local, most, 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        double err = 0;
        for (std::int64_t i = 0; i < m; ++i)
          for (std::int64_t x = 0; x < hq * d; ++x)
            err = std::max(err, static_cast<double>(std::fabs(out[static_cast<std::size_t>(i * hq * d + x)] -
                                                                full_out[static_cast<std::size_t>(mine[static_cast<std::size_t>(i)] * hq * d + x)])));
        double err_max = 0;
        MPI_Allreduce(&err, &err_max, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        // The model (per the header): compute per step from the pairs' areas and the one-process rate.
        const auto compute_q = [&](const std::vector<std::int64_t>& q_chunks, const std::vector<std::int64_t>& kv_chunks, double heads_share) {
          double a = 0;
          for (std::int64_t i : q_chunks)
            for (std::int64_t j : kv_chunks) a += static_cast<double>(area[static_cast<std::size_t>(i * chunks + j)]);
          return rate > 0 ? heads_share * flop_per_pair * a / rate : 0.0;
        };
        const auto compute_s = [&](int r, const std::vector<std::int64_t>& kv_chunks, double heads_share) {
          double a = 0;
          for (std::int64_t i : held[static_cast<std::size_t>(r)])
            for (std::int64_t j : kv_chunks) a += static_cast<double>(area[static_cast<std::size_t>(i * chunks + j)]);
          return rate > 0 ? heads_share * flop_per_pair * a / rate : 0.0;
        };
        const double kv_shard = static_cast<double>(rows[0]) * static_cast<double>(hkv * 2 * d * 4);
        const double q_shard = static_cast<double>(rows[0]) * static_cast<double>(hq * d * 4);
        const double part = static_cast<double>(rows[0]) * static_cast<double>(hq * (d + 1) * 4);
        double model = 0.0;
        if (link > 0 && (mech == dist::mechanism::ring || mech == dist::mechanism::token_ring)) {
          for (int step = 0; step < size; ++step) {
            double c = 0;
            for (int r = 0; r < size; ++r) {
              const int owner = mech == dist::mechanism::ring ? ((r - step) % size + size) % size : (r + step) % size;
              c = std::max(c, compute_s(r, held[static_cast<std::size_t>(owner)], 1.0));
            }
            const double x = step + 1 < size ? (mech == dist::mechanism::ring ? kv_shard : q_shard) / link : 0.0;
            model += std::max(c, x) + (mech == dist::mechanism::token_ring && step > 0 ? part / link : 0.0);
          }
        } else if (link > 0 && mech == dist::mechanism::hybrid) {
          // Ulysses inside the groups (not overlapped), then the ring across them for 1 / U of the heads.
          model = (U > 1 ? static_cast<double>(U - 1) / U * (q_shard + kv_shard + part) / link : 0.0);
          for (int step = 0; step < R; ++step) {
            double c = 0;
            for (int gg = 0; gg < R; ++gg) c = std::max(c, compute_q(group_chunks(gg), group_chunks(((gg - step) % R + R) % R), 1.0 / U));
            model += std::max(c, step + 1 < R ? kv_shard / link : 0.0);
          }
        } else if (link > 0) {
          std::vector<std::int64_t> all(static_cast<std::size_t>(chunks));
          for (std::int64_t c = 0; c < chunks; ++c) all[static_cast<std::size_t>(c)] = c;
          double c = 0;
          if (mech == dist::mechanism::ulysses) {
            double total = 0;
            for (int r = 0; r < size; ++r) total += compute_s(r, all, 1.0);
            c = total / size;
            model = c + static_cast<double>(size - 1) / size * (q_shard + kv_shard + part) / link;
          } else {
            for (int r = 0; r < size; ++r) c = std::max(c, compute_s(r, all, 1.0));
            model = c + (size - 1) * kv_shard / link;
          }
        } else {
          model = one_s;
        }
        // The blocks this rank computes under the mechanism, without MPI (its own shard's data stands in for the
        // others': the kernel's time depends on the shapes and the mask, not on the values).
        std::vector<std::array<std::int64_t, 2>> pairs;
        std::int64_t heads_local = hq, kv_heads_local = hkv, head0 = 0;
        if (mech == dist::mechanism::ulysses) {
          heads_local = hq / size;
          kv_heads_local = hkv / size;
          head0 = rank * heads_local;
          for (std::int64_t i = 0; i < chunks; ++i)
            for (std::int64_t j = 0; j < chunks; ++j)
              if (area[static_cast<std::size_t>(i * chunks + j)] > 0) pairs.push_back({i, j});
        } else if (mech == dist::mechanism::hybrid) {
          heads_local = hq / U;
          kv_heads_local = hkv / U;
          head0 = (rank % U) * heads_local;
          for (std::int64_t i : group_chunks(rank / U))
            for (std::int64_t j = 0; j < chunks; ++j)
              if (area[static_cast<std::size_t>(i * chunks + j)] > 0) pairs.push_back({i, j});
        } else if (mech == dist::mechanism::token_ring) {
          for (std::int64_t i = 0; i < chunks; ++i)
            for (std::int64_t j : held[static_cast<std::size_t>(rank)])
              if (area[static_cast<std::size_t>(i * chunks + j)] > 0) pairs.push_back({i, j});
        } else {
          for (std::int64_t i : held[static_cast<std::size_t>(rank)])
            for (std::int64_t j = 0; j < chunks; ++j)
              if (area[static_cast<std::size_t>(i * chunks + j)] > 0) pairs.push_back({i, j});
        }
        std::vector<float> scratch_out(static_cast<std::size_t>(m * hq * d)), scratch_lse(static_cast<std::size_t>(hq * m));
        const auto local_blocks = [&] {
          for (const auto& [i, j] : pairs) {
            const std::int64_t li = (i + 1) * n / chunks - i * n / chunks, lj = (j + 1) * n / chunks - j * n / chunks;
            const std::int64_t rq = std::min(li, m), rk = std::min(lj, m);  // stand-in rows of this shard
            const problem_block blk{i * n / chunks, j * n / chunks, n, n, head0, hq};
            options o2;
            o2.use = backend::cpu;
            o2.threads = threads;
            o2.block = &blk;
            const lse_tensor sl = make_lse(scratch_lse.data(), heads_local, rq);
            o2.lse = &sl;
            tensor tq = make_bshd(q.data(), dtype::f32, 1, rq, heads_local, d), tk = make_bshd(k.data(), dtype::f32, 1, rk, kv_heads_local, d),
                   tv = make_bshd(v.data(), dtype::f32, 1, rk, kv_heads_local, d);
            tq.stride_seq = hq * d;  // the shard's rows, the first heads_local heads
            tk.stride_seq = tv.stride_seq = hkv * d;
            (void)attention(tq, tk, tv, make_bshd(scratch_out.data(), dtype::f32, 1, rq, heads_local, d), s, o2);
          }
        };
        std::vector<double> lt;
        for (std::int64_t r = 0; r < reps + 1; ++r) {
          MPI_Barrier(MPI_COMM_WORLD);
          const double t0 = wall();
          local_blocks();
          double t = wall() - t0, tmax = 0;
          MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
          if (r > 0) lt.push_back(tmax);
        }
        std::sort(lt.begin(), lt.end());
        const double local_s = lt[lt.size() / 2], exposed = t_med - local_s;
        const double transfer = link > 0 ? most[2] / link : 0.0;
        char overlap[16] = "-";  // nothing travelled (e.g. documents that do not cross a shard boundary)
        if (transfer > 0)
          std::snprintf(overlap, sizeof overlap, "%.0f%%", 100.0 * (1.0 - std::min(most[1], transfer) / transfer));
        // The same inputs as the one-process call: a difference beyond float rounding is a wrong result.
        const bool wrong = !(err_max <= 1e-3);
        failures += wrong;
        if (rank == 0)
          std::printf("%-9s %-10s %-10s | %8.2f %9.2f %7.2f | %8.2f %8.2f %8.2f %8.2f %7s %8.2f | %8.2f %6.0e%s\n", mk.c_str(),
                      ly.c_str(), rep.mechanism.c_str(), t_med * 1e3, one_s * 1e3, one_s / t_med, most[0] / 1e6, local_s * 1e3,
                      exposed * 1e3, transfer * 1e3, overlap, most[1] * 1e3, model * 1e3, err_max, wrong ? "  WRONG" : "");
      }
    }
  }
  if (backward) failures += backward_table({data, n, hq, hkv, d, chunks_opt, reps, threads, rank, size, link}, masks, layouts, mechs);
  if (!initialized) MPI_Finalize();
  return failures == 0 ? 0 : 1;
}

}  // namespace omniattn::bench
