// `omniattn bench`: the entry point. Restarts once with OPENBLAS_CORETYPE set but empty (see below), then runs the
// kernel table (--kernel, kernel.cc), the decode table (--decode, decode.cc), the linear-attention table (--linear,
// linear.cc) or the workload suite (suite.cc).
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "bench/bench.h"
#include "bench/suite.h"

namespace omniattn::bench {

int bench_main(int argc, char** argv) {
  // Context parallelism runs under mpirun and needs no OpenBLAS: dispatched before the restart below.
  for (int i = 2; i < argc; ++i)
    if (std::string(argv[i]) == "--cp") {
#ifdef OMNIATTN_HAVE_MPI
      return cp_main(argc, argv);
#else
      std::fprintf(stderr, "omniattn bench --cp: this build has no MPI (install libopenmpi-dev and reconfigure)\n");
      return 2;
#endif
    }
  // OpenBLAS picks its kernels when it loads, so the variable must be right before this process starts: an inherited
  // OPENBLAS_CORETYPE (Haswell here) halves the baseline, and OpenBLAS 0.3.21 with the variable absent does not know
  // recent Xeons and falls back to Prescott (SSE3). Set but empty, it detects by CPU features (Cooperlake here), which
  // is its best kernel; restart once that way. The header prints the kernel OpenBLAS ended up with.
  if (const char* core = std::getenv("OPENBLAS_CORETYPE"); !core || *core) {
    setenv("OPENBLAS_CORETYPE", "", 1);
    execv("/proc/self/exe", argv);
    std::perror("omniattn bench: re-exec without OPENBLAS_CORETYPE failed");
  }
  for (int i = 2; i < argc; ++i)
    if (std::string(argv[i]) == "--kernel") return kernel_main(argc, argv);
  for (int i = 2; i < argc; ++i)
    if (std::string(argv[i]) == "--decode") return decode_main(argc, argv);
  for (int i = 2; i < argc; ++i)
    if (std::string(argv[i]) == "--linear") return linear_main(argc, argv);
  suite_options opt;
  std::string error;
  if (!parse_suite_args(argc, argv, 2, opt, error)) {
    const bool multi_line = error.find('\n') != std::string::npos;  // parse errors show the text under a caret
    std::fprintf(stderr, "omniattn bench: %s%s(try 'omniattn bench --help')\n", error.c_str(), multi_line ? "\n" : " ");
    return 2;
  }
  if (opt.help) {
    print_suite_usage(stdout);
    return 0;
  }
  return run_suite(opt);
}

}  // namespace omniattn::bench
