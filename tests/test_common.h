// Small shared helpers of the unit tests (the tolerance policy itself lives in tolerance.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "core/problem.h"
#include "hwy/targets.h"
#include "omniattn/omniattn.h"

namespace omniattn::test {

// OMNIATTN_TEST_INTENSITY=full enables the larger sweeps; the default ("quick") keeps the whole suite fast enough for
// the sanitizer build.
inline bool full_intensity() {
  const char* e = std::getenv("OMNIATTN_TEST_INTENSITY");
  return e && std::string(e) == "full";
}

// N values of `axis` such that every value appears at least floor(N / axis.size()) times (concatenated seeded
// shuffles): independent shuffles per axis give random combinations with full coverage of each axis.
template <class T>
std::vector<T> covering_sequence(const std::vector<T>& axis, std::size_t n, std::mt19937_64& rng) {
  std::vector<T> out;
  while (out.size() < n) {
    std::vector<T> perm = axis;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (const T& x : perm)
      if (out.size() < n) out.push_back(x);
  }
  return out;
}

inline const char* causal_name(causal_mode c) {
  return c == causal_mode::none ? "none" : c == causal_mode::top_left ? "top_left" : "bottom_right";
}

// Sets an environment variable for the lifetime of the guard, restoring the previous state afterwards
// (e.g. OMNIATTN_BF16_DOT=1 forces the cpu backend's bf16 dot-product kernel where the CPU has it).
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) {
      had_ = true;
      old_ = old;
    }
    ::setenv(name, value, 1);
  }
  ~scoped_env() {
    if (had_) ::setenv(name_.c_str(), old_.c_str(), 1);
    else ::unsetenv(name_.c_str());
  }
  scoped_env(const scoped_env&) = delete;
  scoped_env& operator=(const scoped_env&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

// Runs fn(target_name) once per Highway target this binary was compiled for and this CPU runs (AVX3_ZEN4 ... SSE2,
// EMU128), with dynamic dispatch pinned to that target, and prints which ran: the kernels' register blocking and vector
// widths differ per target, so every kernel test that covers arithmetic runs on each. Dispatch returns to the best
// target afterwards, also when fn fails.
template <class Fn>
void for_each_target(const char* test_name, Fn&& fn) {
  struct reset {
    ~reset() { hwy::SetSupportedTargetsForTest(0); }
  } const guard;
  std::string ran;
  for (const std::int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    fn(hwy::TargetName(target));
    ran += std::string(ran.empty() ? "" : " ") + hwy::TargetName(target);
  }
  std::printf("[  targets ] %s ran on: %s\n", test_name, ran.c_str());
}

template <class T>
bool bytes_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// A single-batch problem with dim_v = dim_qk, for the focused feature tests.
inline problem small_problem(std::int64_t lq, std::int64_t lk, std::int64_t hq, std::int64_t hkv, std::int64_t d, dtype t,
                             causal_mode c, std::uint64_t seed) {
  problem p;
  p.seq_q = lq;
  p.seq_k = lk;
  p.heads_q = hq;
  p.heads_kv = hkv;
  p.dim_qk = p.dim_v = d;
  p.type = t;
  p.causal = c;
  p.seed = seed;
  return p;
}

}  // namespace omniattn::test
