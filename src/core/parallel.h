// Exceptions across OpenMP parallel regions.
//
// An exception that leaves an OpenMP structured block calls std::terminate: a user mask predicate or score functor
// that throws, or an allocation that fails, inside a kernel's parallel loop would kill the process. Every iteration of
// a worksharing loop runs through parallel_errors::run: the first exception is kept, the iterations after it are
// skipped (the call is failing anyway, and a broken callback would only throw again), and rethrow() raises it on the
// calling thread once the region has ended, where attention() turns it into a status.
#pragma once

#include <atomic>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace omniattn::detail {

class parallel_errors {
 public:
  template <class F>
  void run(F&& f) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      std::forward<F>(f)();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr first_;
};

// An exception thrown by user code (a mask predicate, a score functor, a Python callable), tagged with the callback
// that threw so the status can name it.
struct callback_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Runs a user callback; whatever it throws becomes a callback_error naming it (what: "<who> threw: <message>").
template <class F>
decltype(auto) call_user(const char* who, const std::string& name, F&& f) {
  try {
    return std::forward<F>(f)();
  } catch (const callback_error&) {
    throw;
  } catch (const std::exception& e) {
    throw callback_error(std::string(who) + " '" + name + "' threw: " + e.what());
  } catch (...) {
    throw callback_error(std::string(who) + " '" + name + "' threw an exception that is not a std::exception");
  }
}

// hwy::AllocateAligned and friends return null when memory runs out; kernels call this on each buffer they allocate so
// the failure reaches attention() as std::bad_alloc instead of a null dereference.
template <class Ptr>
Ptr checked(Ptr p) {
  if (!p) throw std::bad_alloc();
  return p;
}

}  // namespace omniattn::detail
