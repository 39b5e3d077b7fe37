// What csrc/shm.cpp, csrc/normal.cpp and csrc/low_latency.cpp share of the shm protocol: where the counters of a
// segment live, how they are read and published, the bounded wait, the ring loop
// (deep_ep_ops/transports/_shm_engine.py specifies the layout), and the words of the handshake header.
#pragma once

#include <ATen/ATen.h>

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstring>
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

// --- the handshake header both whole-op paths send (deep_ep_ops/_handshake.py defines the words) ---------
constexpr int64_t kStatus = 3, kSettings = 7, kCounts = 19, kOffer = kCounts - 1;  // kOffer: last spare setting
constexpr int64_t kExpertOutOfRange = 2, kLayoutMismatch = 3, kHandleRows = 4;    // status codes

// Writes the status of the first expert id outside [-1, num_experts) of ``idx`` [n, k] (token, slot, value) into
// ``header``; false when every id is in range.
inline bool expert_id_status(int64_t* header, const int64_t* idx, int64_t n, int64_t k, int64_t num_experts) {
  for (int64_t i = 0; i < n * k; ++i)
    if (idx[i] < -1 || idx[i] >= num_experts) {
      const int64_t status[4] = {kExpertOutOfRange, i / k, i % k, idx[i]};
      std::memcpy(header + kStatus, status, sizeof(status));
      return true;
    }
  return false;
}

// Exclusive prefix sums of ``counts`` (one more entry than ``counts``: the total).
inline std::vector<int64_t> prefix(c10::IntArrayRef counts) {
  std::vector<int64_t> out(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) out[i + 1] = out[i] + counts[i];
  return out;
}

// The next contiguous run of whole rows at stream ``position`` (see _shm_engine._run).
struct Run {
  int64_t position, rows;
};

inline Run next_run(int64_t position, int64_t limit_counter, int64_t row_bytes, int64_t ring_bytes, int64_t remaining,
                    bool sending, int64_t max_rows) {
  int64_t offset = position % ring_bytes;
  if (offset + row_bytes > ring_bytes) {
    // A sender whose rows were all read may count the skipped tail as free: without that, a ring holding
    // fewer than two rows of this size after a run of another size would wait for bytes nobody will read.
    if (sending && limit_counter >= position) limit_counter = position + ring_bytes - offset;
    position += ring_bytes - offset;
    offset = 0;
  }
  const int64_t limit = sending ? limit_counter + ring_bytes - position : limit_counter - position;
  int64_t rows = std::min({remaining, (ring_bytes - offset) / row_bytes, limit / row_bytes, max_rows});
  return {position, std::max<int64_t>(rows, 0)};
}

// Runs of at most ~512 KB, so that a receiver copies out while its sender writes the next run.
inline int64_t max_run_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t(1) << 19) / std::max<int64_t>(1, row_bytes));
}

// Pushes what fits of this rank's rows for every peer into the peers' rings; true if any row moved.
// ``write(d, j, dst)`` writes row ``j`` of the outgoing stream to ``d`` (``row_bytes``) at ``dst``.
template <typename Write>
bool push(const std::vector<at::Tensor>& seg, int64_t base, int64_t ring_bytes, int64_t* mirror, int64_t* cursor,
          int64_t row_bytes, c10::IntArrayRef send_counts, int64_t rank, Write write) {
  bool moved = false;
  const int64_t num_ranks = seg.size(), max_rows = max_run_rows(row_bytes);
  for (int64_t d = 0; d < num_ranks; ++d) {
    if (d == rank || cursor[d] >= send_counts[d]) continue;
    const Run run = next_run(mirror[d], load(consumed(seg[d], rank)), row_bytes, ring_bytes,
                             send_counts[d] - cursor[d], true, max_rows);
    if (run.rows == 0) continue;
    char* dst = bytes(seg[d]) + base + rank * ring_bytes + run.position % ring_bytes;
    for (int64_t k = 0; k < run.rows; ++k) write(d, cursor[d] + k, dst + k * row_bytes);
    mirror[d] = run.position + run.rows * row_bytes;
    publish(written(seg[d], rank), mirror[d]);
    cursor[d] += run.rows;
    moved = true;
  }
  return moved;
}

// One exchange of whole rows through the rings: ``send_counts[d]`` rows to every peer ``d``, ``recv_counts[s]``
// from every source ``s``. cursor: [0, R) rows sent, [R, 2R) rows taken (this rank's own entries are the
// caller's: preset them). ``take(s, j, src, n)`` consumes rows ``j .. j + n`` of the stream from ``s`` at ``src``.
// 1 when complete, 0 when the budget ran out first (call again with the same cursor).
template <typename Write, typename Take>
int64_t ring_exchange(const std::vector<at::Tensor>& seg, c10::IntArrayRef geometry, int64_t* mirror, int64_t* cursor,
                      int64_t row_bytes, c10::IntArrayRef send_counts, c10::IntArrayRef recv_counts, int64_t rank,
                      double budget_s, Write write, Take take) {
  const int64_t base = geometry[0], ring_bytes = geometry[1], num_ranks = seg.size();
  const int64_t max_rows = max_run_rows(row_bytes);
  Waiter waiter(budget_s);
  while (true) {
    bool moved = push(seg, base, ring_bytes, mirror, cursor, row_bytes, send_counts, rank, write);
    for (int64_t s = 0; s < num_ranks; ++s) {
      int64_t& done = cursor[num_ranks + s];
      if (s == rank || done >= recv_counts[s]) continue;
      const Run run = next_run(mirror[num_ranks + s], load(written(seg[rank], s)), row_bytes, ring_bytes,
                               recv_counts[s] - done, false, max_rows);
      if (run.rows == 0) continue;
      take(s, done, bytes(seg[rank]) + base + s * ring_bytes + run.position % ring_bytes, run.rows);
      mirror[num_ranks + s] = run.position + run.rows * row_bytes;
      publish(consumed(seg[rank], s), mirror[num_ranks + s]);
      done += run.rows;
      moved = true;
    }
    bool complete = true;
    for (int64_t r = 0; r < num_ranks; ++r)
      complete = complete && cursor[r] >= send_counts[r] && cursor[num_ranks + r] >= recv_counts[r];
    if (complete) return 1;
    if (moved) waiter.progress();
    else if (waiter.idle()) return 0;
  }
}

}  // namespace deepep::shm
