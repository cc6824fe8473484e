// Bounded memory: what a thread keeps after a large call returns is capped by set_scratch_retention.
#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "omniattn/omniattn.h"

namespace omniattn {
namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool k_sanitized = true;  // the sanitizers' allocators keep freed memory (quarantine): RSS says nothing
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool k_sanitized = true;
#else
constexpr bool k_sanitized = false;
#endif
#else
constexpr bool k_sanitized = false;
#endif

constexpr std::int64_t k_mib = std::int64_t{1} << 20;

std::int64_t resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string key;
  std::int64_t kib = -1;
  while (status >> key) {
    if (key == "VmRSS:") {
      status >> kib;
      break;
    }
    std::getline(status, key);
  }
  return kib * 1024;
}

// 64 queries against K / V broadcast (stride 0) to 2^18 keys: a few MiB of inputs, but the kernel packs
// 2^18 keys x 64 dims x 4 bytes = 64 MiB of K and as much of V (buffers larger than glibc's largest mmap threshold,
// so a freed buffer returns to the system and RSS shows what is kept).
void run_long_key_call() {
  const std::int64_t lq = 64, lk = std::int64_t{1} << 18, d = 64;
  std::vector<float> q(static_cast<std::size_t>(lq * d), 0.25f), kv(static_cast<std::size_t>(d), 0.5f), out(q.size());
  tensor k = make_bshd(kv.data(), dtype::f32, 1, 1, 1, d);
  k.seq = lk;
  k.stride_seq = 0;
  options opt;
  opt.threads = 2;
  const status st = attention(make_bshd(q.data(), dtype::f32, 1, lq, 1, d), k, k, make_bshd(out.data(), dtype::f32, 1, lq, 1, d),
                              spec{}, opt);
  ASSERT_TRUE(st.ok()) << st.error;
  EXPECT_FLOAT_EQ(out[0], 0.5f);  // every key has the same value row
}

TEST(Memory, RetainedScratchAfterALargeCallIsCapped) {
  if (k_sanitized) GTEST_SKIP() << "RSS is meaningless under a sanitizer's allocator";
  ASSERT_GT(resident_bytes(), 0) << "no VmRSS in /proc/self/status";
  // A generous limit keeps both 64 MiB buffers: the measurement sees them (the check below can fail).
  // Start from nothing retained on this thread (earlier tests may have left buffers): a call under a 0 limit frees them.
  const std::int64_t old = set_scratch_retention(0);
  run_long_key_call();
  set_scratch_retention(512 * k_mib);
  const std::int64_t before_keep = resident_bytes();
  run_long_key_call();
  const std::int64_t kept = resident_bytes() - before_keep;
  EXPECT_GE(kept, 100 * k_mib) << "retained buffers should be resident";
  // With the default 32 MiB limit the next call frees them when it returns.
  set_scratch_retention(32 * k_mib);
  run_long_key_call();
  const std::int64_t after = resident_bytes() - before_keep;
  EXPECT_LE(after, 32 * k_mib + 16 * k_mib) << "kept " << after / k_mib << " MiB after the call";
  set_scratch_retention(old);
}

TEST(Memory, RetentionLimitIsReportedAndClamped) {
  const std::int64_t old = set_scratch_retention(-5);
  EXPECT_EQ(set_scratch_retention(7 * k_mib), 0);
  EXPECT_EQ(set_scratch_retention(old), 7 * k_mib);
}

}  // namespace
}  // namespace omniattn
