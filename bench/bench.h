// omniattn bench: kernel benchmark with in-process baselines and a measured machine peak.
#pragma once

#include <cstdint>
#include <string>

#include "omniattn/params.h"

namespace omniattn::bench {

// Name of the ISA Highway dispatches to on this machine ("AVX3", "AVX2", ...).
const char* isa_name();

// row[0..allowed) = softmax(row[0..allowed)), row[allowed..n) = 0; vectorized. Entries of -inf in the prefix (masked
// keys) get 0; a prefix of -inf only (a row with no allowed key) becomes all 0.
void softmax_row(float* row, std::int64_t allowed, std::int64_t n);
// Name of the kernel family OpenBLAS picked for this CPU.
const char* openblas_core();

// The unfused OpenBLAS path per (batch, head): S = scale Q K^T (sgemm), masked softmax, O = P V (sgemm).
// Materializes Lq x Lk scores per head; f32 inputs with unit dim stride only; dense or causal (p.mask is ignored).
// `threads` OpenMP threads split each head's query rows and call single-threaded OpenBLAS (one thread pool).
void openblas_unfused(const attn_params& p, int threads);
void set_openblas_threads(int threads);  // for other OpenBLAS calls; openblas_unfused uses 1 per thread

// The unfused OpenBLAS backward per (batch, head), every matrix materialized (Lq x Lk, f32):
//   S = scale Q K^T (sgemm), masked pairs -inf, P = softmax(S) (rows), dV = P^T dO (sgemm),
//   dP = dO V^T (sgemm), D_i = rowsum(dO_i * O_i), dS = P * (dP - D), dQ = scale dS K (sgemm), dK = scale dS^T Q (sgemm)
// with GQA's dK, dV summed over the query heads of a kv head (sgemm beta = 1). The spec's causal flag, mask and block
// mask are applied (row_allowed_bits; the work stays dense); score modifiers, RoPE and sinks are not (the caller checks).
// p.fwd.out must hold the forward's output. f32 tensors with unit dim stride only; `threads` OpenMP threads split the
// query rows (S, P, dP, dS, dQ) and then the key rows (dV, dK), each calling single-threaded OpenBLAS.
void openblas_unfused_backward(const attn_bwd_params& p, int threads);

// The naive neighborhood baseline (naive_local.cc), NATTEN's "naive" CPU backend in spirit: per query, its keys from
// grid_local::window on each axis (the same windows the mask evaluates), the window's K/V rows gathered (read in place
// for f32), fp32 dot products, softmax, weighted sum; OpenMP `threads` split the (head, query) rows. Any grid-local
// mask (neighborhood with dilation / causal axes, halo), any dtype and layout, varlen, GQA; the spec's causal flag
// is applied too. naive_local_unsupported says why a problem is out of its reach (empty: it runs).
std::string naive_local_unsupported(const attn_params& p);
void naive_local_attention(const attn_params& p, int threads);

// `omniattn bench ...` with the whole command line (argv[0] the program, argv[1] "bench"); returns the exit code.
int bench_main(int argc, char** argv);
// Sum of n floats with the widest vector loads (n a multiple of 64): the bandwidth probe's streaming read.
float read_sum(const float* x, std::size_t n);
// `omniattn bench --decode` (decode.cc): attention_decode on a paged KV cache against the measured read bandwidth.
int decode_main(int argc, char** argv);
// `omniattn bench --linear` (linear.cc): the linear-attention family's throughput, backward, decode step, and the
// softmax kernel at the same lengths.
int linear_main(int argc, char** argv);
// The chunked linear forward's FLOPs: per (batch, head) and chunk of n tokens, n (n + 1) (K + V) for the masked
// intra-chunk products over the causal pairs and 4 n K V for the inter-chunk read and the state update.
double linear_chunked_flops(std::int64_t batch, std::int64_t heads, std::int64_t n, std::int64_t chunk, std::int64_t K, std::int64_t V);
// `mpirun -np P omniattn bench --cp` (cp.cc, built with MPI): context-parallel attention per mechanism, layout and mask.
int cp_main(int argc, char** argv);

}  // namespace omniattn::bench
