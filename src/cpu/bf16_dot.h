// bf16 tile operations on the x86 AVX512-BF16 dot product (vdpbf16ps): each instruction multiplies 16 pairs of bf16
// and accumulates the pair sums into fp32, twice the FLOPs of an fp32 FMA. Highway 1.0.3 has no target for it, so
// these few micro-kernels are written with intrinsics under a function-level target and called, not inlined, from
// the Highway kernel (each call does a whole register block, so the call costs nothing measurable).
//
// Layouts (a "pair" is two bf16 in one uint32, the lower-index element in the low half):
//   q pairs   [rows][dim_pairs]            pair = (q[i][2p], q[i][2p+1])
//   k pairs   [dim_pairs][64 keys]         pair = (k[j][2p], k[j][2p+1])
//   p pairs   [rows][32]                   pair = (P[i][2p], P[i][2p+1])
//   v pairs   [key_pairs][dim_vp]          pair = (v[2p][c], v[2p+1][c]), dim_vp a multiple of 16
#pragma once

#include <cstdint>

namespace omniattn::cpu {

// True when this CPU executes vdpbf16ps (AVX512F + AVX512_BF16).
bool has_bf16_dot();

// S[r][0..64) = sum_p q_pairs[r][p] . k_pairs[p][0..64), rows 1..6.
void bf16_qk_tile(int rows, const std::uint32_t* q_pairs, std::int64_t dim_pairs, const std::uint32_t* k_pairs, float* s);

// p_pairs[r][0..32) = bf16 pairs of S[r][0..64) (round to nearest even), for every row.
void bf16_pack_p(int rows, const float* s, std::uint32_t* p_pairs);

// O[r][0..dim_vp) = O[r][..] * alpha[r] + sum_p p_pairs[r][p] . v_pairs[p][..], rows 1..6, over key_pairs pairs.
void bf16_pv_tile(int rows, const std::uint32_t* p_pairs, std::int64_t key_pairs, const std::uint32_t* v_pairs,
                  std::int64_t dim_vp, const float* alpha, float* o);

// Throughput probe: runs twelve independent vdpbf16ps chains for `iters` rounds, returns the FLOPs done.
double bf16_dot_chains(std::int64_t iters, float seed);

}  // namespace omniattn::cpu
