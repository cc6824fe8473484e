// Peak arithmetic throughput of this machine, measured (not looked up): GFLOP/s with `threads` threads.
#pragma once

namespace omniattn::cpu {

// fp32 FMA on the ISA Highway dispatches to.
double measure_fp32_peak(int threads);
// AVX512-BF16 dot product (vdpbf16ps, 64 FLOPs per instruction); 0 where the CPU lacks it.
double measure_bf16_dot_peak(int threads);

}  // namespace omniattn::cpu
