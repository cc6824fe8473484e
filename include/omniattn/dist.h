// omniattn::dist: context-parallel attention over MPI (one sequence sharded over the processes of a communicator).
//
// The global problem is attention(q, k, v, spec) over a sequence of N tokens (fixed-length batches, positions are
// global: every mask, score modifier, RoPE and the causal alignment mean what they mean on one process). The sequence
// is cut into C chunks, chunk c = tokens [c N / C, (c + 1) N / C) (floor), and each process holds some of them, in
// the order the layout gives, as its local q, k, v and out (their seq is the sum of its chunks' lengths):
//   contiguous  rank r holds chunks r C / P .. (r + 1) C / P - 1              (C a multiple of P; default C = P)
//   zigzag      chunk pairs (m, C - 1 - m), m < C / 2, go round-robin: rank r holds the pairs m = r, r + P, ...,
//               each as chunk m then chunk C - 1 - m   (C a multiple of 2P; default C = 2P: the load-balanced causal
//               sharding of ring-flash-attention and Llama 3, rank r holding chunks r and 2P - 1 - r)
//
// Math contract (exact LSE merge, fixed order): for every query chunk i, the partial result of chunk i against each
// key chunk j (the CPU kernel on that block of the problem: options::block, f32 out and LSE) is folded in the order
// j = i, i - 1, ..., 0, C - 1, ..., i + 1, skipping the pairs the mask leaves empty, in fp32:
//   m' = max(m, lse_j),  l = l exp(m - m') + exp(lse_j - m'),  o = o exp(m - m') + exp(lse_j - m') out_j
// then the sink logit (a part with lse = sink, out = 0), and out = o / l, lse = m + log l (0 and -inf when l = 0).
// The partials and the fold depend only on the chunks, so a run on P processes is bitwise identical to a run on any
// other number of processes (1 included) with the same C and layout, for every mechanism (the same binary and CPU
// kind on every rank: the kernels' rounding depends on the ISA Highway dispatches to). RoPE takes its positions from
// the layout (global token positions); spec.rope.pos_q / pos_k are refused.
//
// Mechanisms (all give the same bits):
//   ring       K/V blocks rotate around the ring with non-blocking sends and receives, overlapped with the local
//              tiles; a block travels only as far as the last rank whose queries need it (causal, sliding window,
//              document masks cut the traffic); partials that arrive before their turn in the fold wait in a buffer.
//   allgather  every rank gathers all K/V first (Llama 3's context parallelism), then computes its queries.
//   token_ring TokenRing: K/V stay; each Q travels one hop per step (as far as a rank whose keys it meets, in the
//              direction that needs fewer hops: backward for causal masks), posted a step ahead, and each block's
//              partial (out, lse) goes straight back to the Q's owner, so both directions of the links carry traffic.
//   ulysses    DeepSpeed-Ulysses: an all-to-all turns sequence shards into head shards (q.heads and k.heads
//              multiples of P), each rank computes every chunk pair for its heads, a second all-to-all returns the
//              outputs; per-head parameters keep their heads (options::block's h_offset).
//   hybrid     USP: Ulysses inside groups of U consecutive ranks (cp_options::ulysses_degree), ring across the
//              P / U groups: an all-to-all inside the group gives each member U-th of the heads for every token of
//              the group, the members with the same heads form a ring over which K/V rotate (as above), and an
//              all-to-all inside the group returns the outputs. Ulysses where heads are fewer than ranks; the
//              all-to-alls stay inside a node when a group is a node.
//   automatic  ring, TokenRing, Ulysses or the hybrid, whichever moves the fewest bytes per rank by a dense estimate
//              (masks' savings are not counted; the report says the estimates and the choice).
// A ring or TokenRing shard travels as far as the last rank that needs it (it may pass through ranks that do not);
// all-gather and Ulysses move every shard. Blocks the mask leaves empty are not computed.
// Errors are collective: when any rank's arguments are invalid (shapes and options are compared between ranks too),
// every rank returns an error (the failing rank's message, prefixed "[dist::attention] rank R: ") and no output is
// written. Calls on one communicator must not overlap (as for any MPI collective), and every rank passes the same
// spec (not checked: a different spec gives a different problem, or a hang). The library talks on its own duplicate
// of the communicator (made on the first call, cached on it, freed with it), so its messages never meet the caller's.
// An exception inside an exchange (a buffer's allocation failing once messages are in flight) cannot be agreed on:
// that rank prints why and calls MPI_Abort rather than leave the others waiting forever.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "omniattn/attention.h"

namespace omniattn::dist {

enum class mechanism : std::uint8_t { automatic, ring, allgather, token_ring, ulysses, hybrid };
enum class layout : std::uint8_t { contiguous, zigzag };

const char* mechanism_name(mechanism m);
const char* layout_name(layout l);
// The inverses ("auto" or "automatic", "ring", "token_ring", "ulysses", "hybrid", "allgather"; "contiguous",
// "zigzag"): false for any other name, m / l untouched. The binding, the CLI and the bench parse with these.
bool parse_mechanism(const std::string& name, mechanism& m);
bool parse_layout(const std::string& name, layout& l);

// What a call did on this rank (filled when cp_options::report is set).
struct cp_report {
  std::string mechanism;              // the mechanism that ran
  std::vector<std::string> reasons;   // why (the planner's choice) and the chunk layout
  std::int64_t chunks = 0;            // C
  std::int64_t pairs_computed = 0;    // (q chunk, k chunk) blocks this rank computed
  std::int64_t pairs_skipped = 0;     // empty blocks of the query chunks this rank folds (Ulysses: every chunk)
  std::int64_t bytes_sent = 0, bytes_received = 0;     // every payload: K/V, Q, partial results, all-to-all shards
  std::int64_t messages_skipped = 0;  // ring / TokenRing hops not taken because no later rank needs the shard
  std::int64_t partials_buffered = 0;  // most partials waiting for their turn in the fold at once
  double seconds = 0.0, compute_seconds = 0.0, wait_seconds = 0.0;  // wall, local kernels, blocked in MPI waits
};

struct cp_options {
  MPI_Comm comm = MPI_COMM_WORLD;
  mechanism use = mechanism::automatic;
  layout shards = layout::contiguous;
  std::int64_t chunks = 0;  // C; 0: P (contiguous) or 2P (zigzag)
  int ulysses_degree = 0;   // hybrid: ranks per Ulysses group U (dividing P, q.heads, k.heads); 0: the largest such
  int threads = 0;          // threads per process for the local kernels (0 = all cores)
  const lse_tensor* lse = nullptr;  // optional [batch, heads, local seq] LSE output
  cp_report* report = nullptr;
  // A rank that cannot make its call (e.g. a binding could not translate its arguments) passes its message here, with
  // any tensors: every rank then returns that error, instead of the others waiting for this rank.
  const char* local_error = nullptr;
};

// The chunks rank `rank` of `ranks` holds, in local order, for C chunks (the layout's rule above).
std::vector<std::int64_t> rank_chunks(layout l, std::int64_t chunks, int ranks, int rank);

// q, k, v, out: this rank's shards (the same batch, heads and dims on every rank; out f32 or q's dtype). The spec is
// the global problem's: its tables (dense masks, biases, key tables, block masks) cover all N positions, and every
// rank passes the same spec. Collective over cp_options::comm.
status attention(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, const cp_options& o);

// What attention() would do on `ranks` processes, without MPI and without computing: q, k, v and out are the WHOLE
// problem's tensors (only their shapes are read), spec and options as for the call. The planner's choice and its
// reasons, the blocks each rank would compute, the blocks the mask leaves empty, the ring hops it saves; st holds the
// error a call would report (from rank 0's point of view). `omniattn explain <problem> --cp P` prints it.
struct cp_plan {
  status st;
  std::string mechanism;
  std::vector<std::string> reasons;
  std::int64_t chunks = 0;
  std::int64_t pairs_nonempty = 0, pairs_total = 0;  // (q chunk, k chunk) blocks with an allowed pair, of C x C
  std::vector<std::int64_t> pairs_per_rank;          // blocks each rank computes (Ulysses / hybrid: for its heads)
  std::int64_t hops_skipped = 0;                     // ring: K/V hops of P (P - 1) no later rank needs
};
cp_plan explain(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const spec& s, int ranks, const cp_options& o);

// The backward of attention() above, for training: from this rank's shards of q, k, v, the forward's out and lse (what
// dist::attention returned, lse requested) and d_out, this rank's shards of dq, dk, dv (shapes of q, k, v; f32 or the
// input dtype). Each (query chunk, key chunk) block's share of the gradients is attention_backward with
// options::block; dq of a query chunk sums its blocks in the forward's fold order, dk and dv of a key chunk in the
// order i = j, j + 1, ..., C - 1, 0, ..., j - 1, in fp32, so P processes give the bits of one (same C and layout).
// Mechanisms (both give the same bits):
//   ring       K/V rotate as in the forward, each step's dK / dV shares go straight back to their owner
//              (non-blocking, overlapped with the next blocks).
//   ulysses    all-to-alls turn q, k, v, out, d_out and lse into head shards (q.heads and k.heads multiples of P),
//              each rank computes every block for its heads, and one more all-to-all returns dq, dk, dv.
//   automatic  whichever of the two moves fewer bytes per rank by a dense estimate (the report says the estimates).
// Not taken: TokenRing and all-gather (refused), d_sink_logits, d_bias, RoPE position ids.
struct cp_gradients {
  tensor dq, dk, dv;
};
status attention_backward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const lse_tensor& lse,
                          const tensor& d_out, const cp_gradients& g, const spec& s, const cp_options& o);

}  // namespace omniattn::dist
