// The low-latency ops on the shm backend as single native calls (deep_ep_ops/transports/_shm_low_latency.py
// calls them), and the send plan they share with the _ll_plan op.
//
// Each call does what the portable path does in a dozen ops (deep_ep_ops/low_latency.py is the
// specification, and the tests hold the two to the same reference): plan, write the header and the real
// rows straight into each peer's slot, wait for the peers' slots, check their headers against this rank's,
// then sort (dispatch) or reduce (combine) straight out of the slots into the outputs. The slot protocol is
// _shm_slots/_shm_engine's, so a rank on this path and a rank on the portable one exchange with each other.
// A call returns 1 when done, 0 when its budget ran out (call again with the same arguments and state: what
// was sent is not sent twice), or 2 when a peer's header or count disagrees with this rank's (the slots are
// released and the caller reads recv_header to raise the error every rank raises).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "shm_protocol.h"

namespace deepep {

void accumulate_row(float* acc, const void* row, at::ScalarType dtype, int64_t n);
void accumulate_scaled_row(float* acc, const void* row, float w, at::ScalarType dtype, int64_t n);
void store_accumulated(void* out, const float* acc, at::ScalarType dtype, int64_t n);

// Rows of one source's send buffer: M per shared-expert rank, M * min(K, L) per routed rank (layout.chunk_caps).
std::vector<int64_t> chunk_offsets(int64_t num_experts, int64_t num_ranks, int64_t k, int64_t m, int64_t num_shared) {
  const int64_t local = num_experts / (num_ranks - num_shared), routed_cap = m * std::min(k, local);
  std::vector<int64_t> offset(num_ranks + 1, 0);
  for (int64_t d = 0; d < num_ranks; ++d) offset[d + 1] = offset[d] + (d < num_shared ? m : routed_cap);
  return offset;
}

int64_t plan_total(int64_t num_experts, int64_t num_ranks, int64_t k, int64_t m, int64_t num_shared) {
  return chunk_offsets(num_experts, num_ranks, k, m, num_shared).back();
}

// The send plan (deep_ep_ops/_ll_plan.py specifies it): each distinct (token, expert) selection takes one row
// of its destination's chunk, rows of a chunk ordered by (local expert, token); duplicate ids reuse their
// first slot's row; with shared-expert ranks, every token also takes a row of shared rank (rank + t) % S.
// Fills slot [n, cols] (total for none), counts [R] and, when given, source [total] (token of each row, n for
// none) and meta [total, 2] (local expert and token, -1 for none).
void plan_rows(const int64_t* idx, int64_t n, int64_t k, int64_t num_experts, int64_t num_ranks, int64_t rank,
               int64_t m, int64_t num_shared, int64_t* slot, int64_t* counts, int64_t* source, int32_t* meta) {
  const int64_t cols = k + (num_shared > 0 ? 1 : 0);
  const int64_t local = num_experts / (num_ranks - num_shared), width = std::max<int64_t>(local, 1);
  const auto offset = chunk_offsets(num_experts, num_ranks, k, m, num_shared);
  const int64_t total = offset[num_ranks];
  if (source) std::fill(source, source + total, n);
  if (meta) std::fill(meta, meta + 2 * total, -1);
  // dest * width + local of entry (t, j), or -1; a duplicate id points at its first slot (-2 - first).
  std::vector<int64_t> key(n * cols), fill(num_ranks * width, 0), start(num_ranks * width, 0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx[t * k + j];
      int64_t first = j;
      for (int64_t q = 0; q < j; ++q)
        if (idx[t * k + q] == e) { first = q; break; }
      const bool valid = e >= 0 && e < num_experts;  // out of range: the handshake fails every rank
      key[t * cols + j] = !valid ? -1 : first != j ? -2 - first : (num_shared + e / local) * width + e % local;
    }
    if (num_shared) key[t * cols + k] = ((rank + t) % num_shared) * width;
    for (int64_t j = 0; j < cols; ++j)
      if (key[t * cols + j] >= 0) ++fill[key[t * cols + j]];
  }
  for (int64_t d = 0; d < num_ranks; ++d) {
    int64_t at_row = offset[d];
    for (int64_t l = 0; l < width; ++l) {
      start[d * width + l] = at_row;
      at_row += fill[d * width + l];
      fill[d * width + l] = 0;
    }
    counts[d] = at_row - offset[d];
  }
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t key_j = key[t * cols + j];
      if (key_j < 0) {
        slot[t * cols + j] = key_j == -1 ? total : slot[t * cols + (-2 - key_j)];
        continue;
      }
      const int64_t row = start[key_j] + fill[key_j]++;
      slot[t * cols + j] = row;
      if (source) source[row] = t;
      if (meta) {
        meta[2 * row] = static_cast<int32_t>(key_j % width);
        meta[2 * row + 1] = static_cast<int32_t>(t);
      }
    }
  }
}

// The expert side of a combine (deep_ep_ops/_ll_plan.combine_send_rows specifies it): the flat [L,
// rows_per_expert] positions of source ``s``'s rows in the order it sent them (local expert, then token), at most
// ``cap``, into ``out``; returns how many.
int64_t combine_positions(const int64_t* layout_range, int64_t num_local, int64_t num_ranks, int64_t s, int64_t cap,
                          int64_t rows_per_expert, int64_t* out) {
  int64_t j = 0;
  for (int64_t e = 0; e < num_local; ++e) {
    const int64_t begin = layout_range[e * num_ranks + s] >> 32, count = layout_range[e * num_ranks + s] & 0xFFFFFFFF;
    for (int64_t i = 0; i < count && j < cap; ++i) out[j++] = e * rows_per_expert + begin + i;
  }
  return j;
}

namespace {

using namespace shm;

// This rank's header with the status of its first expert id outside [-1, num_experts), if any.
std::vector<int64_t> with_id_status(c10::IntArrayRef header, const int64_t* idx, int64_t n, int64_t k,
                                    int64_t num_experts) {
  std::vector<int64_t> row(header.begin(), header.end());
  expert_id_status(row.data(), idx, n, k, num_experts);
  return row;
}

struct Slots {
  const std::vector<at::Tensor>& seg;
  int64_t base, slot_bytes, header_bytes, seq, rank, num_ranks, half;

  Slots(const std::vector<at::Tensor>& segments, c10::IntArrayRef geometry, int64_t seq_, int64_t rank_)
      : seg(segments), base(geometry[0]), slot_bytes(geometry[1]), header_bytes(geometry[2]), seq(seq_), rank(rank_),
        num_ranks(segments.size()), half(seq_ % 2) {}

  char* slot(int64_t owner, int64_t source) const {
    return bytes(seg[owner]) + base + (source * 2 + half) * slot_bytes;
  }

  // Writes the header and ``write(d, rows) -> count`` rows into every peer's slot once it is free (its reader
  // is done with exchange seq - 2); sent[d] marks the peers done. False when the budget ran out first.
  template <typename Write>
  bool send(const std::vector<int64_t>& header, int64_t* sent, Waiter& waiter, Write write) const {
    while (true) {
      bool all = true;
      for (int64_t d = 0; d < num_ranks; ++d) {
        if (d == rank || sent[d]) continue;
        int64_t* ctrl = stamp(seg[d], rank, half);
        if (load(ctrl + 8) < seq - 2) {
          all = false;
          continue;
        }
        char* s = slot(d, rank);
        std::memcpy(s, header.data(), header.size() * 8);
        ctrl[1] = write(d, s + header_bytes);
        publish(ctrl, seq);
        sent[d] = 1;
      }
      if (all) return true;
      if (waiter.idle()) return false;
    }
  }

  // Waits for every peer's chunk of this exchange, copies the headers into recv_header (this rank's own
  // row too) and the row counts into n. 1: all in and agreeing; 0: budget ran out; 2: disagreement.
  int64_t receive(const std::vector<int64_t>& header, const at::Tensor& recv_header, const std::vector<int64_t>& caps,
                  int64_t row_bytes, std::vector<int64_t>& n, Waiter& waiter) const {
    for (int64_t s = 0; s < num_ranks;) {
      if (s == rank || load(stamp(seg[rank], s, half)) == seq) {
        ++s;
        continue;
      }
      if (waiter.idle()) return 0;
    }
    const int64_t width = header.size();
    int64_t* rows = recv_header.data_ptr<int64_t>();
    bool agree = true;
    for (int64_t s = 0; s < num_ranks; ++s) {
      if (s == rank) {
        std::memcpy(rows + s * width, header.data(), width * 8);
        agree = agree && header[kStatus] == 0;
        continue;
      }
      std::memcpy(rows + s * width, slot(rank, s), width * 8);
      n[s] = stamp(seg[rank], s, half)[1];
      // Never read more than this rank has room for, whatever a peer claims.
      agree = agree && std::memcmp(rows + s * width, header.data(), width * 8) == 0 && n[s] >= 0 &&
              n[s] <= caps[s] && header_bytes + n[s] * row_bytes <= slot_bytes;
    }
    if (!agree) release();
    return agree ? 1 : 2;
  }

  void release() const {
    for (int64_t s = 0; s < num_ranks; ++s)
      if (s != rank) publish(stamp(seg[rank], s, half) + 8, seq);
  }
};

// format: [row_bytes, data_bytes, scales_offset, scales_bytes, meta_offset] of the dispatch row
// (deep_ep_ops._wire.RowFormat of x, scales, meta). state: int64 [R] peers sent to.
int64_t dispatch(const std::vector<at::Tensor>& segments, c10::IntArrayRef geometry, int64_t seq,
                 c10::IntArrayRef header_row, const at::Tensor& data, const std::optional<at::Tensor>& scales,
                 const at::Tensor& topk_idx, c10::IntArrayRef format, int64_t m, int64_t num_experts,
                 int64_t num_shared, int64_t rank, int64_t expert_token_nums_type, const at::Tensor& packed,
                 const at::Tensor& packed_scales, const at::Tensor& count, const at::Tensor& src_info,
                 const at::Tensor& layout_range, const at::Tensor& recv_header, const at::Tensor& state,
                 double budget_s) {
  const Slots slots(segments, geometry, seq, rank);
  const int64_t num_ranks = slots.num_ranks, n = topk_idx.size(0), k = topk_idx.size(1);
  const int64_t row_bytes = format[0], data_bytes = format[1], scales_offset = format[2], scales_bytes = format[3];
  const int64_t meta_offset = format[4];
  TORCH_CHECK(data.is_contiguous() && topk_idx.is_contiguous() && (!scales || scales->is_contiguous()) &&
                  packed.is_contiguous() && packed_scales.is_contiguous() && src_info.is_contiguous(),
              "deepep: expected contiguous tensors");
  const int64_t* idx = topk_idx.data_ptr<int64_t>();
  const char* x = static_cast<const char*>(data.data_ptr());
  const char* sc = scales ? static_cast<const char*>(scales->data_ptr()) : nullptr;
  const auto offset = chunk_offsets(num_experts, num_ranks, k, m, num_shared);
  const int64_t total = offset[num_ranks], cols = k + (num_shared > 0 ? 1 : 0);
  std::vector<int64_t> slot(n * cols), counts(num_ranks), source(total);
  std::vector<int32_t> meta(2 * total);
  plan_rows(idx, n, k, num_experts, num_ranks, rank, m, num_shared, slot.data(), counts.data(), source.data(),
            meta.data());
  const auto header = with_id_status(header_row, idx, n, k, num_experts);
  Waiter waiter(budget_s);
  const bool sent = slots.send(header, state.data_ptr<int64_t>(), waiter, [&](int64_t d, char* dst) {
    for (int64_t j = 0; j < counts[d]; ++j) {
      const int64_t row = offset[d] + j, t = source[row];
      char* out = dst + j * row_bytes;
      std::memcpy(out, x + t * data_bytes, data_bytes);
      if (scales_bytes) std::memcpy(out + scales_offset, sc + t * scales_bytes, scales_bytes);
      std::memcpy(out + meta_offset, meta.data() + 2 * row, 8);
    }
    return counts[d];
  });
  if (!sent) return 0;
  const std::vector<int64_t> caps(offset.size() - 1, offset[rank + 1] - offset[rank]);  // chunks sent here
  std::vector<int64_t> received(num_ranks, 0);
  const int64_t status = slots.receive(header, recv_header, caps, row_bytes, received, waiter);
  if (status != 1) return status;
  received[rank] = counts[rank];

  // Sort the real rows into [L, R*M] by local expert, then source rank, then arrival (_ll_plan.ll_sort).
  const int64_t num_local = src_info.size(0), rows_per_expert = src_info.size(1);
  auto expert_token = [&](int64_t s, int64_t j, int32_t* et) {
    if (s == rank) std::memcpy(et, meta.data() + 2 * (offset[rank] + j), 8);
    else std::memcpy(et, slots.slot(rank, s) + slots.header_bytes + j * row_bytes + meta_offset, 8);
  };
  std::vector<int64_t> per_pair(num_local * num_ranks, 0);
  int32_t et[2];
  for (int64_t s = 0; s < num_ranks; ++s)
    for (int64_t j = 0; j < received[s]; ++j) {
      expert_token(s, j, et);
      if (et[0] >= 0 && et[0] < num_local) ++per_pair[et[0] * num_ranks + s];
    }
  int64_t* lr = layout_range.data_ptr<int64_t>();
  int32_t* cnt = count.data_ptr<int32_t>();
  std::vector<int64_t> next(num_local * num_ranks);
  int64_t running = 0;
  for (int64_t e = 0; e < num_local; ++e) {
    int64_t begin = 0;
    for (int64_t s = 0; s < num_ranks; ++s) {
      const int64_t c = per_pair[e * num_ranks + s];
      lr[e * num_ranks + s] = (begin << 32) | c;
      next[e * num_ranks + s] = e * rows_per_expert + begin;
      begin += c;
    }
    running += begin;
    cnt[e] = static_cast<int32_t>(expert_token_nums_type == 0 ? running : begin);
  }
  int32_t* info = src_info.data_ptr<int32_t>();
  std::fill(info, info + src_info.numel(), -1);
  char* px = static_cast<char*>(packed.data_ptr());
  char* ps = static_cast<char*>(packed_scales.data_ptr());
  for (int64_t s = 0; s < num_ranks; ++s)
    for (int64_t j = 0; j < received[s]; ++j) {
      expert_token(s, j, et);
      if (et[0] < 0 || et[0] >= num_local) continue;
      const int64_t dest = next[et[0] * num_ranks + s]++;
      const char* row = s == rank ? nullptr : slots.slot(rank, s) + slots.header_bytes + j * row_bytes;
      std::memcpy(px + dest * data_bytes, row ? row : x + et[1] * data_bytes, data_bytes);
      if (scales_bytes)
        std::memcpy(ps + dest * scales_bytes, row ? row + scales_offset : sc + et[1] * scales_bytes, scales_bytes);
      info[dest] = et[1];
    }
  slots.release();
  return 1;
}

// x: [L, R*M, H] expert outputs; each source gets back, in the order it sent them, the rows layout_range gives
// (ll_combine_rows), and sums Σ_k w[t, k] · row(t, k) (+ the shared expert's row) in fp32, slots in order,
// rounded once (the order of compute.Kernels.weighted_reduce).
int64_t combine(const std::vector<at::Tensor>& segments, c10::IntArrayRef geometry, int64_t seq,
                c10::IntArrayRef header_row, const at::Tensor& x, const at::Tensor& layout_range,
                const at::Tensor& topk_idx, const at::Tensor& topk_weights, int64_t m, int64_t num_experts,
                int64_t num_shared, int64_t rank, const at::Tensor& out, const at::Tensor& recv_header,
                const at::Tensor& state, double budget_s) {
  const Slots slots(segments, geometry, seq, rank);
  const int64_t num_ranks = slots.num_ranks, n = topk_idx.size(0), k = topk_idx.size(1);
  TORCH_CHECK(x.is_contiguous() && layout_range.is_contiguous() && topk_idx.is_contiguous() &&
                  topk_weights.is_contiguous() && out.is_contiguous(),
              "deepep: expected contiguous tensors");
  const int64_t num_local = x.size(0), rows_per_expert = x.size(1), hidden = x.size(2);
  const int64_t row_bytes = hidden * x.element_size();
  const char* xs = static_cast<const char*>(x.data_ptr());
  const int64_t* lr = layout_range.data_ptr<int64_t>();
  const int64_t* idx = topk_idx.data_ptr<int64_t>();
  const auto offset = chunk_offsets(num_experts, num_ranks, k, m, num_shared);
  const int64_t cap = offset[rank + 1] - offset[rank];
  // The rows this rank sends source s, in the order s sent them: their flat positions in x.
  std::vector<int64_t> positions(cap);
  auto rows_for = [&](int64_t s) {
    return combine_positions(lr, num_local, num_ranks, s, cap, rows_per_expert, positions.data());
  };
  const auto header = with_id_status(header_row, idx, n, k, num_experts);
  Waiter waiter(budget_s);
  const bool sent = slots.send(header, state.data_ptr<int64_t>(), waiter, [&](int64_t s, char* dst) {
    const int64_t c = rows_for(s);
    for (int64_t j = 0; j < c; ++j) std::memcpy(dst + j * row_bytes, xs + positions[j] * row_bytes, row_bytes);
    return c;
  });
  if (!sent) return 0;
  std::vector<int64_t> caps(num_ranks), received(num_ranks, 0);
  for (int64_t d = 0; d < num_ranks; ++d) caps[d] = offset[d + 1] - offset[d];
  const int64_t status = slots.receive(header, recv_header, caps, row_bytes, received, waiter);
  if (status != 1) return status;
  received[rank] = rows_for(rank);  // positions now holds this rank's own rows

  const int64_t cols = k + (num_shared > 0 ? 1 : 0), total = offset[num_ranks];
  std::vector<int64_t> slot(n * cols), counts(num_ranks);
  plan_rows(idx, n, k, num_experts, num_ranks, rank, m, num_shared, slot.data(), counts.data(), nullptr, nullptr);
  const float* w = topk_weights.data_ptr<float>();
  const std::vector<char> zero(row_bytes, 0);  // the row of an unused slot (weighted like any other)
  std::vector<float> acc(hidden);
  char* o = static_cast<char*>(out.data_ptr());
  for (int64_t t = 0; t < n; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t r = slot[t * cols + j];
      const char* row = zero.data();
      if (r < total) {
        const int64_t d = std::upper_bound(offset.begin(), offset.end(), r) - offset.begin() - 1, i = r - offset[d];
        if (i < received[d])
          row = d == rank ? xs + positions[i] * row_bytes : slots.slot(rank, d) + slots.header_bytes + i * row_bytes;
      }
      if (j < k) accumulate_scaled_row(acc.data(), row, w[t * k + j], x.scalar_type(), hidden);
      else accumulate_row(acc.data(), row, x.scalar_type(), hidden);
    }
    store_accumulated(o + t * row_bytes, acc.data(), out.scalar_type(), hidden);
  }
  slots.release();
  return 1;
}

}  // namespace
}  // namespace deepep

TORCH_LIBRARY_IMPL(deepep, CPU, m) {
  m.impl("_shm_ll_dispatch", &deepep::dispatch);
  m.impl("_shm_ll_combine", &deepep::combine);
}
