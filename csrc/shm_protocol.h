// The words of the shm protocol that csrc/shm.cpp and csrc/low_latency.cpp share: where the counters of
// a segment live, how they are read and published, and the bounded wait (deep_ep_ops/transports/_shm_engine.py
// specifies the layout).
#pragma once

#include <ATen/ATen.h>

#include <sched.h>

#include <chrono>
#include <vector>

namespace deepep::shm {

constexpr int64_t kWordsPerSource = 16;

inline int64_t* words(const at::Tensor& segment) { return reinterpret_cast<int64_t*>(segment.data_ptr()); }
inline char* bytes(const at::Tensor& segment) { return static_cast<char*>(segment.data_ptr()); }
inline int64_t* written(const at::Tensor& segment, int64_t source) { return words(segment) + 8 + kWordsPerSource * source; }
inline int64_t* consumed(const at::Tensor& segment, int64_t source) { return written(segment, source) + 8; }
inline int64_t* stamp(const at::Tensor& segment, int64_t source, int64_t half) {
  return words(segment) + 8 + kWordsPerSource * (2 * source + half);
}

inline int64_t load(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void publish(int64_t* p, int64_t v) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

// Bounded waiting: spin a little, then yield; ``expired`` says when the budget of this call is spent.
class Waiter {
 public:
  explicit Waiter(double budget_s)
      : deadline_(std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(budget_s))) {}
  bool idle() {  // true when the budget is spent
    if (++spins_ > 64) sched_yield();
    else __builtin_ia32_pause();
    return std::chrono::steady_clock::now() >= deadline_;
  }
  void progress() { spins_ = 0; }

 private:
  std::chrono::steady_clock::time_point deadline_;
  int spins_ = 0;
};

// Exclusive prefix sums of ``counts`` (one more entry than ``counts``: the total).
inline std::vector<int64_t> prefix(c10::IntArrayRef counts) {
  std::vector<int64_t> out(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) out[i + 1] = out[i] + counts[i];
  return out;
}

}  // namespace deepep::shm
