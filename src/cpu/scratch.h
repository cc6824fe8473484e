// Per-thread scratch the CPU kernels keep between calls: the packed K/V lease (no per-ISA code).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/backends.h"
#include "core/parallel.h"
#include "hwy/aligned_allocator.h"

namespace omniattn::cpu {

// Packed K/V is kept under this many bytes by packing kv heads in chunks; each chunk costs two barriers, so small
// problems run as one chunk (two barriers per call) and large ones stay O(N) in memory.
constexpr std::int64_t k_pack_budget_bytes = std::int64_t{64} << 20;

// Packed K/V buffers are kept per calling thread and reused by its next calls: a fresh multi-MiB allocation per call
// pays a page fault and a page clear per 4 KiB on first touch (about 5% of a local-attention call). A lease owns the
// thread's buffer for one call; a call made while it is leased (a score or mask functor that calls attention) and a
// request over the budget get a buffer of their own, freed on return. When the lease ends, the thread's buffers are
// kept only while both slots together fit the retention limit (set_scratch_retention), so an idle thread holds at most
// that much after a long call.
class pack_lease {
 public:
  pack_lease(int slot, std::size_t floats) : slot_(slot) {
    thread_local_state& st = state();
    if (!st.leased[slot] && floats * sizeof(float) <= static_cast<std::size_t>(k_pack_budget_bytes)) {
      st.leased[slot] = true;
      leased_ = true;
      if (st.capacity[slot] < floats) {
        st.buffers[slot] = detail::checked(hwy::AllocateAligned<float>(floats));
        st.capacity[slot] = floats;
      }
      ptr_ = st.buffers[slot].get();
    } else {
      own_ = detail::checked(hwy::AllocateAligned<float>(floats));
      ptr_ = own_.get();
    }
  }
  ~pack_lease() {
    if (!leased_) return;
    thread_local_state& st = state();
    st.leased[slot_] = false;
    if ((st.capacity[0] + st.capacity[1]) * sizeof(float) > static_cast<std::size_t>(detail::scratch_retention())) {
      st.buffers[slot_].reset();
      st.capacity[slot_] = 0;
    }
  }
  pack_lease(const pack_lease&) = delete;
  pack_lease& operator=(const pack_lease&) = delete;
  float* get() const { return ptr_; }

 private:
  struct thread_local_state {
    hwy::AlignedFreeUniquePtr<float[]> buffers[2];
    std::size_t capacity[2] = {0, 0};
    bool leased[2] = {false, false};
  };
  static thread_local_state& state() {
    thread_local thread_local_state st;
    return st;
  }
  int slot_;
  bool leased_ = false;
  hwy::AlignedFreeUniquePtr<float[]> own_;
  float* ptr_ = nullptr;
};

}  // namespace omniattn::cpu
