// omniattn explain: what select() (forward) and select_backward() (backward) pick for a problem on each backend, why,
// and the problem's tile structure.
#include <array>
#include <cstdio>
#include <iostream>
#include <string>

#include "cli.h"
#ifdef OMNIATTN_HAVE_MPI
#include "omniattn/dist.h"
#endif

namespace omniattn::cli {
namespace {

constexpr std::int64_t k_tile = 64;  // the CPU kernel's q and kv tile size

template <class Selection>
void print_selection(const Selection& sel, const char* indent) {
  for (const std::string& r : sel.reasons) std::cout << indent << r << "\n";
}

// One op's choice on the chosen backend: "forward   KERNEL" (or why none fits) and its reasons.
template <class Selection>
void print_choice(const char* op, const Selection& sel, backend use) {
  char head[32];
  std::snprintf(head, sizeof head, "%-9s ", op);
  if (sel.ok()) std::cout << head << sel.name << "\n";
  else std::cout << head << "none: no " << backend_name(use) << " kernel fits this problem\n";
  print_selection(sel, "  ");
}

template <class Selection>
void print_backend_line(const Selection& sel, backend b) {
  char head[64];
  std::snprintf(head, sizeof head, "    %-10s %s\n", backend_name(b), sel.ok() ? sel.name.c_str() : "(no kernel fits)");
  std::cout << head;
  print_selection(sel, "                 ");
}

void print_work(const attn_params& p) {
  std::int64_t dense = 0;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const seq_extent e = sequence(p, b);
    dense += e.q_len * e.k_len * p.heads_q;
  }
  const std::int64_t area = mask_area(p);
  char line[200];
  const double gflop = 2.0 * static_cast<double>(area) * static_cast<double>(p.dim_qk + p.dim_v) * 1e-9;
  std::snprintf(line, sizeof line, " of %s (%.2f%%), %.3f GFLOP (backward %.3f: 2.5x, FlashAttention's count)",
                group_digits(dense).c_str(), dense ? 100.0 * static_cast<double>(area) / static_cast<double>(dense) : 0.0,
                gflop, 2.5 * gflop);
  std::cout << "work      allowed (query, key) pairs " << group_digits(area) << line << "\n";
}

void print_tiles(const attn_params& p) {
  const block_mask bm = build_block_mask(p, k_tile, k_tile);
  std::array<std::int64_t, 3> count{};
  for (tile_kind t : bm.kinds) ++count[static_cast<std::size_t>(t)];
  std::cout << "tiles     " << k_tile << "x" << k_tile << ": " << bm.q_tiles << " q tiles x " << bm.kv_tiles << " kv tiles";
  if (bm.batch == 1 && bm.heads == 1) std::cout << " (same for every batch and head)";
  else std::cout << " x " << bm.batch << (p.cu_seqlens_q ? " sequence(s)" : " batch(es)") << " x " << bm.heads << " head(s)";
  std::cout << "\n          FULL " << group_digits(count[static_cast<std::size_t>(tile_kind::full)]) << "  PARTIAL "
            << group_digits(count[static_cast<std::size_t>(tile_kind::partial)]) << "  EMPTY "
            << group_digits(count[static_cast<std::size_t>(tile_kind::empty)]) << "  of "
            << group_digits(static_cast<std::int64_t>(bm.kinds.size())) << "\n";
}

// explain --cp P: omniattn::dist's plan for the problem on P processes.
int print_cp(const command_line& cl, const problem_data& data, const spec& s) {
#ifdef OMNIATTN_HAVE_MPI
  namespace d = omniattn::dist;
  d::cp_options o;
  if (!d::parse_mechanism(cl.cp_use, o.use)) {
    std::cerr << "omniattn explain: --cp-use '" << cl.cp_use << "': expected auto, ring, token_ring, ulysses, hybrid or allgather\n";
    return k_exit_usage;
  }
  if (!d::parse_layout(cl.cp_layout, o.shards)) {
    std::cerr << "omniattn explain: --cp-layout '" << cl.cp_layout << "': expected contiguous or zigzag\n";
    return k_exit_usage;
  }
  o.chunks = cl.cp_chunks;
  const d::cp_plan plan = d::explain(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, cl.cp_ranks, o);
  if (!plan.st.ok()) {
    std::cout << "cp        invalid: " << plan.st.error << "\n";
    return k_exit_fail;
  }
  std::cout << "cp        " << cl.cp_ranks << " processes: " << plan.mechanism << "\n";
  for (const std::string& r : plan.reasons) std::cout << "  " << r << "\n";
  std::cout << "  blocks: " << plan.pairs_nonempty << " of " << plan.pairs_total << " (query chunk, key chunk) blocks have an allowed pair; per rank:";
  for (std::int64_t n : plan.pairs_per_rank) std::cout << " " << n;
  std::cout << "\n";
  if (plan.mechanism == std::string("ring"))
    std::cout << "  ring hops not taken (no later rank needs the shard): " << plan.hops_skipped << " of "
              << static_cast<std::int64_t>(cl.cp_ranks) * (cl.cp_ranks - 1) << "\n";
  return k_exit_ok;
#else
  (void)data;
  (void)s;
  std::cerr << "omniattn explain: --cp " << cl.cp_ranks << ": this build has no MPI (omniattn_dist)\n";
  return k_exit_usage;
#endif
}

}  // namespace

int run_explain(const command_line& cl) {
  if (cl.problems.size() != 1) {
    std::cerr << "omniattn explain: expected exactly one problem, got " << cl.problems.size()
              << " (try 'omniattn explain --help')\n";
    return k_exit_usage;
  }
  std::vector<problem> probs;
  std::string error;
  if (!parse_problems(cl.problems, probs, error, cl.score)) {
    std::cerr << "omniattn explain: " << error << "\n";
    return k_exit_usage;
  }
  const problem& prob = probs.front();
  std::cout << "problem   " << prob.describe() << "\n";
  if (const status st = check_footprint(prob); !st) {
    std::cerr << "omniattn explain: " << st.error << "\n";
    return k_exit_usage;
  }

  const problem_data data(prob);
  const options opt = data.make_options(cl.use, cl.threads);
  const lse_tensor lse = data.lse_view();
  options with_lse = opt;
  if (prob.lse) with_lse.lse = &lse;
  const spec s = make_spec(prob, cl.mask);
  attn_params p;
  if (const status st = make_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), s, with_lse, p); !st) {
    std::cout << "invalid   " << st.error << "\n";
    return k_exit_fail;
  }
  p.threads = resolved_threads(cl.threads);  // what attention() does before it selects

  // The backward of the same call: what attention_backward would run on the forward's out and lse, with d_out and the
  // gradients shaped like out and q, k, v.
  const backward_data grads(prob, 7);
  attn_bwd_params bp;
  const status bwd_made = make_backward_params(data.q_view(), data.k_view(), data.v_view(), data.out_view(), lse, grads.d_out_view(),
                                               grads.grads(false), s, opt, bp);
  bp.fwd.threads = p.threads;

  const selection chosen = select(p, cl.use);
  std::cout << "backend   " << backend_name(cl.use) << ", " << p.threads << " thread(s)\n";
  print_choice("forward", chosen, cl.use);
  backward_selection chosen_bwd;
  if (bwd_made) {
    chosen_bwd = select_backward(bp, cl.use);
    print_choice("backward", chosen_bwd, cl.use);
  } else {
    std::cout << "backward  invalid: " << bwd_made.error << "\n";
  }
  print_work(p);
  print_tiles(p);
  if (cl.cp_ranks > 0)
    if (const int rc = print_cp(cl, data, s); rc != k_exit_ok) return rc;

  std::cout << "select() per backend\n  forward\n";
  for (backend b : {backend::cpu, backend::reference}) print_backend_line(select(p, b), b);
  if (bwd_made) {
    std::cout << "  backward (select_backward)\n";
    for (backend b : {backend::cpu, backend::reference}) print_backend_line(select_backward(bp, b), b);
  }
  return chosen.ok() ? k_exit_ok : k_exit_fail;
}

}  // namespace omniattn::cli
