// The shared-memory copy loops of the shm backend: C++ kernels of the private ops deepep::_shm_*.
//
// The protocol (segment layout, monotonic counters, the skip rule of the rings, the two halves of the
// slots) is written down in deep_ep_ops/transports/_shm_engine.py, whose pure-torch functions are the
// fallback and the oracle of these. Counters are published with release stores after a fence (glibc's
// memcpy may use non-temporal stores for large copies) and read with acquire loads. A rank that finds
// nothing to do spins briefly, then gives its core away (sched_yield): ranks may outnumber cores.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>

#include <cstring>
#include <vector>

#include "shm_protocol.h"

namespace deepep {

void accumulate_row(float* acc, const void* row, at::ScalarType dtype, int64_t n);
void store_accumulated(void* out, const float* acc, at::ScalarType dtype, int64_t n);

namespace {

using namespace shm;

int64_t ring_copy(const std::vector<at::Tensor>& seg, c10::IntArrayRef geometry, const at::Tensor& mirror_t,
                  const at::Tensor& cursor_t, const at::Tensor& src_t, const std::optional<at::Tensor>& index,
                  c10::IntArrayRef send_counts, const at::Tensor& out_t, c10::IntArrayRef recv_counts, int64_t rank,
                  double budget_s) {
  const int64_t num_ranks = seg.size(), row_bytes = src_t.size(1);
  TORCH_CHECK(src_t.is_contiguous() && out_t.is_contiguous(), "deepep: expected contiguous rows");
  int64_t* cursor = cursor_t.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(src_t.data_ptr());
  char* out = static_cast<char*>(out_t.data_ptr());
  const int64_t* ix = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  const auto send_off = prefix(send_counts), recv_off = prefix(recv_counts);
  auto row = [&](int64_t d, int64_t j) { return src + (ix ? ix[send_off[d] + j] : send_off[d] + j) * row_bytes; };
  if (cursor[rank] < send_counts[rank]) {  // this rank's own rows: straight into place
    for (int64_t k = 0; k < send_counts[rank]; ++k)
      std::memcpy(out + (recv_off[rank] + k) * row_bytes, row(rank, k), row_bytes);
    cursor[rank] = cursor[num_ranks + rank] = send_counts[rank];
  }
  return ring_exchange(
      seg, geometry, mirror_t.data_ptr<int64_t>(), cursor, row_bytes, send_counts, recv_counts, rank, budget_s,
      [&](int64_t d, int64_t j, char* dst) { std::memcpy(dst, row(d, j), row_bytes); },
      [&](int64_t s, int64_t j, const char* rows, int64_t n) {
        std::memcpy(out + (recv_off[s] + j) * row_bytes, rows, n * row_bytes);
      });
}

// Cursor: [0, R) rows sent per rank, [R, 2R) rows of each source used, [2R] next token, [2R+1] whether the
// exchange has started, [2R+2, 3R+2) read position in each source's ring. A token is reduced as soon as its rows from every source are in, in rank
// order (the order of deep_ep_ops.compute.Kernels.combine_reduce), straight out of the rings.
int64_t ring_combine(const std::vector<at::Tensor>& seg, c10::IntArrayRef geometry, const at::Tensor& mirror_t,
                     const at::Tensor& cursor_t, const at::Tensor& rows_t, c10::IntArrayRef send_counts,
                     c10::IntArrayRef recv_counts, const at::Tensor& token_in_rank_t,
                     const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                     const at::Tensor& out_t, int64_t rank, double budget_s) {
  const int64_t base = geometry[0], ring_bytes = geometry[1], num_ranks = seg.size();
  TORCH_CHECK(cursor_t.numel() >= 3 * num_ranks + 2, "deepep: expected a cursor of 3R + 2 words");
  TORCH_CHECK(rows_t.is_contiguous() && out_t.is_contiguous() && token_in_rank_t.is_contiguous(),
              "deepep: expected contiguous tensors");
  const int64_t width = rows_t.size(1), row_bytes = width * rows_t.element_size();
  const int64_t num_tokens = out_t.size(0);
  int64_t* mirror = mirror_t.data_ptr<int64_t>();
  int64_t* cursor = cursor_t.data_ptr<int64_t>();
  int64_t* taken = cursor + num_ranks;
  int64_t& token = cursor[2 * num_ranks];
  int64_t& started = cursor[2 * num_ranks + 1];
  int64_t* read = cursor + 2 * num_ranks + 2;
  const char* src = static_cast<const char*>(rows_t.data_ptr());
  const bool* in_rank = token_in_rank_t.data_ptr<bool>();
  const auto send_off = prefix(send_counts);
  std::vector<at::Tensor> biases;
  for (const auto& b : {bias_0, bias_1})
    if (b.has_value()) biases.push_back(b->contiguous());
  if (!started) {  // the exchanges before this one are complete: its rows start where theirs ended
    for (int64_t s = 0; s < num_ranks; ++s) read[s] = mirror[num_ranks + s];
    started = 1;
  }
  std::vector<float> acc(width);
  std::vector<int64_t> at(num_ranks);
  Waiter waiter(budget_s);
  while (true) {
    bool moved = push(seg, base, ring_bytes, mirror, cursor, row_bytes, send_counts, rank,
                      [&](int64_t d, int64_t j, char* dst) { std::memcpy(dst, src + (send_off[d] + j) * row_bytes, row_bytes); });
    cursor[rank] = send_counts[rank];  // this rank's own rows are reduced in place below
    std::vector<int64_t> limit(num_ranks);
    for (int64_t s = 0; s < num_ranks; ++s) limit[s] = s == rank ? 0 : load(written(seg[rank], s));
    int64_t finished = 0;
    for (; token < num_tokens; ++token) {
      const bool* row = in_rank + token * num_ranks;
      bool ready = true;
      for (int64_t s = 0; s < num_ranks && ready; ++s) {
        if (!row[s] || s == rank) continue;
        int64_t p = read[s];
        if (p % ring_bytes + row_bytes > ring_bytes) p += ring_bytes - p % ring_bytes;
        at[s] = p;
        ready = p + row_bytes <= limit[s];
      }
      if (!ready) break;
      std::fill(acc.begin(), acc.end(), 0.0f);  // like torch: zeros, then the biases, then the rows
      for (const auto& b : biases)
        accumulate_row(acc.data(), static_cast<const char*>(b.data_ptr()) + token * width * b.element_size(),
                       b.scalar_type(), width);
      for (int64_t s = 0; s < num_ranks; ++s) {
        if (!row[s]) continue;
        const char* r = s == rank ? src + (send_off[rank] + taken[s]) * row_bytes
                                  : bytes(seg[rank]) + base + s * ring_bytes + at[s] % ring_bytes;
        accumulate_row(acc.data(), r, rows_t.scalar_type(), width);
        if (s != rank) read[s] = at[s] + row_bytes;
        ++taken[s];
      }
      store_accumulated(static_cast<char*>(out_t.data_ptr()) + token * width * out_t.element_size(), acc.data(),
                        out_t.scalar_type(), width);
      if (++finished == 256) {
        ++token;
        break;
      }
    }
    for (int64_t s = 0; s < num_ranks; ++s) {  // give the rows read back to their senders
      if (s != rank && read[s] > mirror[num_ranks + s]) {
        mirror[num_ranks + s] = read[s];
        publish(consumed(seg[rank], s), read[s]);
      }
    }
    bool complete = token >= num_tokens;
    for (int64_t d = 0; d < num_ranks; ++d) complete = complete && cursor[d] >= send_counts[d];
    if (complete) return 1;
    if (moved || finished) waiter.progress();
    else if (waiter.idle()) return 0;
  }
}

// Chunk ``first … first + n`` of a described send buffer, written to ``dst`` (see Transport.exchange_slots).
void write_chunk(char* dst, const char* rows, int64_t row_bytes, const int64_t* index, const char* patch,
                 int64_t patch_bytes, int64_t patch_offset, int64_t first, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t r = index ? index[first + j] : first + j;
    std::memcpy(dst + j * row_bytes, rows + r * row_bytes, row_bytes);
    if (patch) std::memcpy(dst + j * row_bytes + patch_offset, patch + (first + j) * patch_bytes, patch_bytes);
  }
}

// geometry: [slot_base, slot_bytes, header_bytes]; a slot holds header[d] (when given) then the rows.
int64_t slots_send(const std::vector<at::Tensor>& seg, c10::IntArrayRef geometry, int64_t seq, const at::Tensor& rows,
                   const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& patch,
                   int64_t patch_offset, const std::optional<at::Tensor>& header, c10::IntArrayRef send_caps,
                   c10::IntArrayRef counts, int64_t rank, const at::Tensor& sent_t, double budget_s) {
  const int64_t base = geometry[0], slot_bytes = geometry[1], header_bytes = geometry[2];
  const int64_t num_ranks = seg.size(), half = seq % 2, row_bytes = rows.size(1);
  int64_t* sent = sent_t.data_ptr<int64_t>();
  const auto off = prefix(send_caps);
  Waiter waiter(budget_s);
  while (true) {
    bool all = true;
    for (int64_t d = 0; d < num_ranks; ++d) {
      if (d == rank || sent[d]) continue;
      int64_t* ctrl = stamp(seg[d], rank, half);
      if (load(ctrl + 8) < seq - 2) {  // the receiver has not read what this half held before
        all = false;
        continue;
      }
      char* slot = bytes(seg[d]) + base + (rank * 2 + half) * slot_bytes;
      if (header.has_value())
        std::memcpy(slot, header->data_ptr<int64_t>() + d * header->size(1), header->size(1) * 8);
      if (counts[d] > 0)
        write_chunk(slot + header_bytes, static_cast<const char*>(rows.data_ptr()), row_bytes,
                    index ? index->data_ptr<int64_t>() : nullptr,
                    patch ? static_cast<const char*>(patch->data_ptr()) : nullptr, patch ? patch->size(1) : 0,
                    patch_offset, off[d], counts[d]);
      ctrl[1] = counts[d];
      publish(ctrl, seq);
      sent[d] = 1;
    }
    if (all) return 1;
    if (waiter.idle()) return 0;
  }
}

// recv_counts[s]: -1 until source s is read; then its row count, or -1 + count for a negative count.
int64_t slots_recv(const std::vector<at::Tensor>& seg, c10::IntArrayRef geometry, int64_t seq, const at::Tensor& rows,
                   const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& patch,
                   int64_t patch_offset, const std::optional<at::Tensor>& header, c10::IntArrayRef send_caps,
                   c10::IntArrayRef counts, const at::Tensor& out_t, const at::Tensor& recv_counts_t,
                   const std::optional<at::Tensor>& recv_header, c10::IntArrayRef recv_caps, int64_t rank,
                   double budget_s) {
  const int64_t base = geometry[0], slot_bytes = geometry[1], header_bytes = geometry[2];
  const int64_t num_ranks = seg.size(), half = seq % 2, row_bytes = out_t.size(1);
  int64_t* recv_counts = recv_counts_t.data_ptr<int64_t>();
  char* out = static_cast<char*>(out_t.data_ptr());
  const auto off = prefix(recv_caps), send_off = prefix(send_caps);
  Waiter waiter(budget_s);
  while (true) {
    bool all = true;
    for (int64_t s = 0; s < num_ranks; ++s) {
      if (recv_counts[s] != -1) continue;
      int64_t* header_row = recv_header ? recv_header->data_ptr<int64_t>() + s * recv_header->size(1) : nullptr;
      if (s == rank) {
        if (header_row) std::memcpy(header_row, header->data_ptr<int64_t>() + s * header->size(1), header->size(1) * 8);
        if (counts[rank] > 0)
          write_chunk(out + off[s] * row_bytes, static_cast<const char*>(rows.data_ptr()), row_bytes,
                      index ? index->data_ptr<int64_t>() : nullptr,
                      patch ? static_cast<const char*>(patch->data_ptr()) : nullptr, patch ? patch->size(1) : 0,
                      patch_offset, send_off[rank], counts[rank]);
        recv_counts[s] = counts[rank] >= 0 ? counts[rank] : -1 + counts[rank];
        continue;
      }
      int64_t* ctrl = stamp(seg[rank], s, half);
      if (load(ctrl) != seq) {
        all = false;
        continue;
      }
      const int64_t n = ctrl[1];
      const char* slot = bytes(seg[rank]) + base + (s * 2 + half) * slot_bytes;
      if (header_row) std::memcpy(header_row, slot, recv_header->size(1) * 8);
      // Never more than this rank has room for, whatever the sender claims: a sender that disagrees on the
      // settings is reported by the header check, after this copy.
      const int64_t fit = std::min({n, recv_caps[s], (slot_bytes - header_bytes) / std::max<int64_t>(row_bytes, 1)});
      if (fit > 0) std::memcpy(out + off[s] * row_bytes, slot + header_bytes, fit * row_bytes);
      publish(ctrl + 8, seq);
      recv_counts[s] = n >= 0 ? n : -1 + n;
    }
    if (all) return 1;
    if (waiter.idle()) return 0;
  }
}

}  // namespace
}  // namespace deepep

TORCH_LIBRARY_IMPL(deepep, CPU, m) {
  m.impl("_shm_ring_copy", &deepep::ring_copy);
  m.impl("_shm_ring_combine", &deepep::ring_combine);
  m.impl("_shm_slots_send", &deepep::slots_send);
  m.impl("_shm_slots_recv", &deepep::slots_recv);
}
