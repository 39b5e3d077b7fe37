// Normal-mode dispatch, cached dispatch and combine on the shm backend as native calls
// (deep_ep_ops/transports/_shm_normal.py calls them; deep_ep_ops/normal.py is the specification and the tests
// hold both to the same reference).
//
// Each *_agree call runs the op's handshake through the rings (the same header rows _handshake.agree sends, so a
// rank on the portable path and one here agree with each other), checks it here and reads the [R, R] traffic
// matrix. When every rank offered the ring protocol (a spare settings word of the header) and every rank
// receives little, it allocates the outputs and moves the rows through the rings, one packed row per (token,
// rank): 1 when done, 5 when the budget ran out while rows move (_shm_dispatch_rows / _shm_combine_rows go on).
// Otherwise it returns 3 and the portable path moves the rows after this handshake (dispatch: direct writes
// into the receivers' outputs, one copy, the better way for large batches). 2: a header disagrees (the caller
// raises from the headers in scratch); 4: a rank would receive more than its limit; 0: the budget ran out
// during the handshake (call again).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "shm_protocol.h"

namespace deepep {

void accumulate_row(float* acc, const void* row, at::ScalarType dtype, int64_t n);
void store_accumulated(void* out, const float* acc, at::ScalarType dtype, int64_t n);

namespace {

using namespace shm;

// config: [settings words, small bytes, then (dispatch) num_experts, num_worst_tokens, expert_alignment,
// expert_token_nums_type]
enum Config { kNumSettings, kSmallBytes, kNumExperts, kNumWorst, kExpertAlignment, kTokenNumsType };

int64_t align8(int64_t n) { return (n + 7) / 8 * 8; }

// The packed row of one token: data | scales | source index (int32) | topk_idx (int64) | topk_weights (f32).
struct Row {
  int64_t data, scales, src, idx, weights, bytes;
  Row(int64_t data_bytes, int64_t scales_bytes, int64_t k, int64_t weights_k)
      : data(0), scales(align8(data_bytes)), src(scales + align8(scales_bytes)), idx(src + 8),
        weights(idx + 8 * k), bytes(std::max<int64_t>(weights + align8(4 * weights_k), 8)) {}
};

// One int64 scratch tensor per op (zeros): the matrix, the handshake's cursor, the rows' cursor, then every
// rank's header.
inline int64_t scratch_words(int64_t num_ranks, int64_t width) {
  return num_ranks * num_ranks + 2 * (2 * num_ranks + 1) + num_ranks * width;
}

struct Scratch {
  int64_t *matrix, *agree, *rows, *headers;
  Scratch(const at::Tensor& t, int64_t num_ranks, int64_t width = 0) {
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kLong && t.numel() >= scratch_words(num_ranks, width),
                "deepep: expected int64 scratch of ", scratch_words(num_ranks, width), " words");
    matrix = t.data_ptr<int64_t>();
    agree = matrix + num_ranks * num_ranks;
    rows = agree + 2 * num_ranks + 1;
    headers = rows + 2 * num_ranks + 1;
  }
};

// Bytes of one row of a [n, ...] tensor (from its shape: the same on a rank with no tokens).
int64_t row_bytes_of(const at::Tensor& t) {
  int64_t bytes = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) bytes *= t.size(d);
  return bytes;
}

// ``like``'s shape with ``rows`` rows, zeros (the received rows go in, padding stays 0); without ``like``,
// float32 [rows, 0].
at::Tensor zero_rows(const std::optional<at::Tensor>& like, int64_t rows, const at::TensorOptions& options) {
  if (!like) return at::empty({rows, 0}, options.dtype(at::kFloat));
  auto shape = like->sizes().vec();
  shape[0] = rows;
  return at::zeros(shape, like->options());
}

// This rank's status: the first expert id outside [-1, E), else the first entry of is_token_in_rank that
// topk_idx does not give (in row-major order, like normal._status).
void set_status(int64_t* header, const int64_t* idx, const bool* in_rank, int64_t n, int64_t k, int64_t num_ranks,
                int64_t num_experts) {
  if (expert_id_status(header, idx, n, k, num_experts)) return;
  const int64_t local = num_experts / num_ranks;
  std::vector<char> expected(num_ranks);
  for (int64_t t = 0; t < n; ++t) {
    std::fill(expected.begin(), expected.end(), 0);
    for (int64_t j = 0; j < k; ++j)
      if (idx[t * k + j] >= 0) expected[idx[t * k + j] / local] = 1;
    for (int64_t r = 0; r < num_ranks; ++r)
      if (bool(expected[r]) != in_rank[t * num_ranks + r]) {
        const int64_t status[4] = {kLayoutMismatch, t, r, in_rank[t * num_ranks + r]};
        std::memcpy(header + kStatus, status, sizeof(status));
        return;
      }
  }
}

// Adds to ``counts[d]`` the tokens of ``is_token_in_rank`` [N, R] that go to rank ``d``.
void add_tokens_per_rank(int64_t* counts, const at::Tensor& is_token_in_rank) {
  const int64_t num_ranks = is_token_in_rank.size(1);
  const bool* in_rank = is_token_in_rank.data_ptr<bool>();
  for (int64_t t = 0; t < is_token_in_rank.size(0); ++t)
    for (int64_t d = 0; d < num_ranks; ++d) counts[d] += in_rank[t * num_ranks + d];
}

// The handshake through the rings: this rank's header row (already in ``headers``) to every peer, theirs into
// ``headers`` (cursor: [0, 2R) of ring_exchange; this rank's own entries preset).
bool exchange_headers(const std::vector<at::Tensor>& rings, c10::IntArrayRef geometry, const at::Tensor& mirror,
                      int64_t* headers, int64_t width, int64_t rank, int64_t* cursor, double budget_s) {
  const int64_t num_ranks = rings.size();
  const int64_t* mine = headers + rank * width;
  const std::vector<int64_t> ones(num_ranks, 1);
  return ring_exchange(rings, geometry, mirror.data_ptr<int64_t>(), cursor, width * 8, ones, ones, rank, budget_s,
                       [&](int64_t, int64_t, char* dst) { std::memcpy(dst, mine, width * 8); },
                       [&](int64_t s, int64_t, const char* src, int64_t) {
                         std::memcpy(headers + s * width, src, width * 8);
                       });
}

// Whether every header matches this rank's (magic, op, sequence, settings), reports status 0, and every rank
// sends each peer as many rows as that peer expects from it (-1: anything), as _handshake.validate checks.
bool headers_agree(const int64_t* headers, int64_t num_ranks, int64_t width, int64_t rank, int64_t num_settings) {
  const int64_t* mine = headers + rank * width;
  for (int64_t s = 0; s < num_ranks; ++s) {
    const int64_t* h = headers + s * width;
    if (std::memcmp(h, mine, kStatus * 8) != 0 || h[kStatus] != 0 ||
        std::memcmp(h + kSettings, mine + kSettings, num_settings * 8) != 0)
      return false;
    for (int64_t src = 0; src < num_ranks; ++src) {
      const int64_t expected = h[kCounts + num_ranks + src], sent = headers[src * width + kCounts + s];
      if (expected >= 0 && sent != expected) return false;
    }
  }
  return true;
}

// Whether every rank offered the ring protocol for the rows (the spare settings word).
bool all_offered(const int64_t* headers, int64_t num_ranks, int64_t width) {
  for (int64_t s = 0; s < num_ranks; ++s)
    if (headers[s * width + kOffer] != 1) return false;
  return true;
}

// The handshake of one call: this rank's header (``fill`` completes it on the first call), exchanged and checked.
// 1: every rank agrees; 0: the budget ran out (call again); 2: a header disagrees.
template <typename Fill>
int64_t handshake(const std::vector<at::Tensor>& rings, c10::IntArrayRef geometry, const at::Tensor& mirror,
                  const Scratch& at_, c10::IntArrayRef header_row, int64_t rank, int64_t num_settings,
                  double budget_s, Fill fill) {
  const int64_t num_ranks = rings.size(), width = header_row.size();
  int64_t* mine = at_.headers + rank * width;
  if (!at_.agree[2 * num_ranks]) {
    std::memcpy(mine, header_row.data(), width * 8);
    fill(mine);
    at_.agree[rank] = at_.agree[num_ranks + rank] = 1;
    at_.agree[2 * num_ranks] = 1;
  }
  if (!exchange_headers(rings, geometry, mirror, at_.headers, width, rank, at_.agree, budget_s)) return 0;
  return headers_agree(at_.headers, num_ranks, width, rank, num_settings) ? 1 : 2;
}

// The [R, R] matrix (``[s, d]``: rows s sends d) from the headers' send counts; returns the rows each rank gets.
std::vector<int64_t> read_matrix(const Scratch& at_, int64_t num_ranks, int64_t width) {
  std::vector<int64_t> received(num_ranks, 0);
  for (int64_t s = 0; s < num_ranks; ++s)
    for (int64_t d = 0; d < num_ranks; ++d)
      received[d] += at_.matrix[s * num_ranks + d] = at_.headers[s * width + kCounts + d];
  return received;
}

// Whether the rows take the rings: every rank offered it, none receives more than ``small_bytes``, and a packed
// row fits a ring (``geometry[1]`` bytes per source; the portable path may move smaller rows, or none, through
// them). Every rank decides the same from the same headers and the same ring size.
bool rows_in_rings(const Scratch& at_, const std::vector<int64_t>& received, int64_t width, int64_t row_bytes,
                   int64_t small_bytes, c10::IntArrayRef geometry) {
  const int64_t most = *std::max_element(received.begin(), received.end());
  return all_offered(at_.headers, received.size(), width) && most * row_bytes <= small_bytes &&
         row_bytes <= geometry[1];
}

// The rows through the rings into the outputs of agree (its cursor: [0, 2R) of ring_exchange, [2R] own rows done).
// Without topk_idx it is a cached dispatch's: rows of x, scales and weights only (outputs: recv_x, recv_x_scales,
// recv_topk_weights), the weights as they are.
int64_t rows(const std::vector<at::Tensor>& rings, c10::IntArrayRef geometry, const at::Tensor& mirror,
             const at::Tensor& data, const std::optional<at::Tensor>& scales,
             const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
             const at::Tensor& is_token_in_rank, c10::IntArrayRef config, int64_t rank, at::TensorList outputs,
             const at::Tensor& scratch, double budget_s) {
  const bool cached = !topk_idx.has_value();
  const int64_t num_ranks = rings.size(), n = data.size(0), k = cached ? 0 : topk_idx->size(1);
  TORCH_CHECK(data.is_contiguous() && (!scales || scales->is_contiguous()) &&
                  (!topk_weights || topk_weights->is_contiguous()),
              "deepep: expected contiguous tensors");
  const int64_t data_bytes = row_bytes_of(data), scales_bytes = scales ? row_bytes_of(*scales) : 0;
  const int64_t weights_k = topk_weights ? topk_weights->size(1) : 0;
  const Row row(data_bytes, scales_bytes, k, weights_k);
  const Scratch at_(scratch, num_ranks);
  const int64_t* matrix = at_.matrix;
  std::vector<int64_t> send_counts(num_ranks), recv_counts(num_ranks);
  for (int64_t r = 0; r < num_ranks; ++r) {
    send_counts[r] = matrix[rank * num_ranks + r];
    recv_counts[r] = matrix[r * num_ranks + rank];
  }
  const auto recv_off = prefix(recv_counts);
  // Row j of the stream to d: the j-th token (in order) that goes to d.
  const bool* in_rank = is_token_in_rank.data_ptr<bool>();
  std::vector<std::vector<int64_t>> tokens(num_ranks);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < num_ranks; ++d)
      if (in_rank[t * num_ranks + d]) tokens[d].push_back(t);
  const char* x = static_cast<const char*>(data.data_ptr());
  const char* sc = scales ? static_cast<const char*>(scales->data_ptr()) : nullptr;
  const int64_t* idx = cached ? nullptr : topk_idx->data_ptr<int64_t>();
  const float* w = topk_weights ? topk_weights->data_ptr<float>() : nullptr;
  auto write = [&](int64_t d, int64_t j, char* dst) {
    const int64_t t = tokens[d][j];
    const int32_t source = static_cast<int32_t>(t);
    std::memcpy(dst + row.data, x + t * data_bytes, data_bytes);
    if (scales_bytes) std::memcpy(dst + row.scales, sc + t * scales_bytes, scales_bytes);
    std::memcpy(dst + row.src, &source, 4);
    if (k) std::memcpy(dst + row.idx, idx + t * k, 8 * k);
    if (weights_k) std::memcpy(dst + row.weights, w + t * weights_k, 4 * weights_k);
  };
  char* recv_x = static_cast<char*>(outputs[0].data_ptr());
  char* recv_scales = static_cast<char*>(outputs[1].data_ptr());
  float* recv_weights = outputs[cached ? 2 : 3].data_ptr<float>();
  int64_t* recv_idx = cached ? nullptr : outputs[2].data_ptr<int64_t>();
  int32_t* counts = cached ? nullptr : outputs[4].data_ptr<int32_t>();
  int32_t* src_idx = cached ? nullptr : outputs[8].data_ptr<int32_t>();
  const int64_t num_local = cached ? 0 : outputs[4].numel(), first = rank * num_local;
  std::vector<char> seen(num_local);
  auto take = [&](int64_t s, int64_t j, const char* src, int64_t count) {
    for (int64_t q = 0; q < count; ++q, src += row.bytes) {
      const int64_t r = recv_off[s] + j + q;
      std::memcpy(recv_x + r * data_bytes, src + row.data, data_bytes);
      if (scales_bytes) std::memcpy(recv_scales + r * scales_bytes, src + row.scales, scales_bytes);
      if (cached) {
        if (weights_k) std::memcpy(recv_weights + r * weights_k, src + row.weights, 4 * weights_k);
        continue;
      }
      std::memcpy(src_idx + r, src + row.src, 4);
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t i = 0; i < k; ++i) {
        int64_t id;
        std::memcpy(&id, src + row.idx + 8 * i, 8);
        const bool local = id >= first && id < first + num_local;
        recv_idx[r * k + i] = local ? id - first : -1;
        if (weights_k) {
          float v;
          std::memcpy(&v, src + row.weights + 4 * i, 4);
          recv_weights[r * k + i] = local ? v : 0.0f;
        }
        if (local && !seen[id - first]) {
          seen[id - first] = 1;
          ++counts[id - first];
        }
      }
    }
  };
  int64_t* cursor = at_.rows;
  if (!cursor[2 * num_ranks]) {  // this rank's own rows: packed and taken through one row buffer
    std::vector<char> buffer(row.bytes);
    for (int64_t j = 0; j < send_counts[rank]; ++j) {
      write(rank, j, buffer.data());
      take(rank, j, buffer.data(), 1);
    }
    cursor[rank] = cursor[num_ranks + rank] = send_counts[rank];
    cursor[2 * num_ranks] = 1;
  }
  if (!ring_exchange(rings, geometry, mirror.data_ptr<int64_t>(), cursor, row.bytes, send_counts, recv_counts, rank,
                     budget_s, write, take))
    return 0;
  if (cached) return 1;
  // Per-expert counts as the op returns them: aligned up, then prefix sums with MOE_EXPERT_TOKEN_NUMS_TYPE=0.
  const int64_t alignment = std::max<int64_t>(config[kExpertAlignment], 1);
  int64_t running = 0;
  for (int64_t e = 0; e < num_local; ++e) {
    const int64_t c = (counts[e] + alignment - 1) / alignment * alignment;
    running += c;
    counts[e] = static_cast<int32_t>(config[kTokenNumsType] == 0 ? running : c);
  }
  return 1;
}

std::tuple<int64_t, std::vector<at::Tensor>> agree(
    const std::vector<at::Tensor>& rings, c10::IntArrayRef geometry, const at::Tensor& mirror,
    c10::IntArrayRef header_row, const at::Tensor& data, const std::optional<at::Tensor>& scales,
    const at::Tensor& topk_idx, const std::optional<at::Tensor>& topk_weights, const at::Tensor& is_token_in_rank,
    c10::IntArrayRef config, int64_t rank, const at::Tensor& scratch, double budget_s) {
  const int64_t num_ranks = rings.size(), width = header_row.size(), n = data.size(0), k = topk_idx.size(1);
  TORCH_CHECK(topk_idx.is_contiguous() && is_token_in_rank.is_contiguous(), "deepep: expected contiguous tensors");
  const Scratch at_(scratch, num_ranks, width);
  const bool* in_rank = is_token_in_rank.data_ptr<bool>();
  const int64_t agreed = handshake(rings, geometry, mirror, at_, header_row, rank, config[kNumSettings], budget_s,
                                   [&](int64_t* mine) {
                                     add_tokens_per_rank(mine + kCounts, is_token_in_rank);
                                     set_status(mine, topk_idx.data_ptr<int64_t>(), in_rank, n, k, num_ranks,
                                                config[kNumExperts]);
                                   });
  if (agreed != 1) return {agreed, {}};
  const auto received_by = read_matrix(at_, num_ranks, width);
  const int64_t limit = config[kNumWorst] > 0 ? config[kNumWorst] : INT32_MAX;
  for (int64_t total : received_by)
    if (total > limit) return {4, {}};
  const Row row(row_bytes_of(data), scales ? row_bytes_of(*scales) : 0, k, topk_weights ? k : 0);
  if (!rows_in_rings(at_, received_by, width, row.bytes, config[kSmallBytes], geometry)) return {3, {}};

  // The outputs, as normal.dispatch returns them (padding rows past the received ones, for num_worst_tokens).
  const int64_t* matrix = at_.matrix;
  const int64_t total = std::max(received_by[rank], config[kNumWorst]), num_local = config[kNumExperts] / num_ranks;
  at::Tensor recv_x = zero_rows(data, total, data.options()), recv_scales = zero_rows(scales, total, data.options());
  auto i32 = topk_idx.options().dtype(at::kInt);
  at::Tensor recv_idx = at::full({total, k}, -1, topk_idx.options());
  at::Tensor recv_weights = at::zeros({total, topk_weights ? k : 0}, topk_idx.options().dtype(at::kFloat));
  at::Tensor counts = at::zeros({num_local}, i32);
  at::Tensor prefix_matrix = at::empty({num_ranks, num_ranks}, i32), channel = at::empty({num_ranks, 1}, i32);
  at::Tensor zeros = at::zeros({num_ranks, 1}, i32), src_idx = at::full({total}, -1, i32);
  at::Tensor send_head = at::empty({n, num_ranks}, i32);
  int32_t* pm = prefix_matrix.data_ptr<int32_t>();
  for (int64_t d = 0; d < num_ranks; ++d) {
    int64_t sum = 0;
    for (int64_t s = 0; s < num_ranks; ++s) pm[s * num_ranks + d] = static_cast<int32_t>(sum += matrix[s * num_ranks + d]);
    channel.data_ptr<int32_t>()[d] = static_cast<int32_t>(matrix[rank * num_ranks + d]);
  }
  int32_t* head = send_head.data_ptr<int32_t>();
  std::vector<int32_t> order(num_ranks, 0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < num_ranks; ++d)
      head[t * num_ranks + d] = in_rank[t * num_ranks + d] ? order[d]++ : -1;
  std::vector<at::Tensor> outputs{recv_x, recv_scales, recv_idx, recv_weights, counts, prefix_matrix, channel, zeros,
                                  src_idx, send_head};
  // The rows, in this same call when they all move within the budget (5: call _shm_dispatch_rows to go on).
  const int64_t moved = rows(rings, geometry, mirror, data, scales, topk_idx, topk_weights, is_token_in_rank, config,
                             rank, outputs, scratch, budget_s);
  return {moved ? 1 : 5, outputs};
}


// --- combine ----------------------------------------------------------------------------------------------
// Each rank sends every source back the rows it got from it (x[:valid], source-major) and, with topk_weights,
// their weights, packed in one row; each source sums its tokens' rows in rank order after the biases, in fp32,
// rounded once (compute.Kernels.combine_reduce), and the weights likewise into float32.

// normal._fingerprint of a rank_prefix_matrix, in the same wrapping int64 arithmetic and Python's modulo.
int64_t fingerprint(const int32_t* matrix, int64_t numel) {
  uint64_t sum = 0;
  for (int64_t i = 0; i < numel; ++i)
    sum += uint64_t(int64_t(matrix[i])) * uint64_t((i * int64_t(2654435761) + 97) % 2147483647);
  const int64_t value = static_cast<int64_t>(sum), m = int64_t(1) << 62;
  return ((value % m) + m) % m;
}

// The header of an op along a handle (cached dispatch, combine): the handle's fingerprint in settings word
// ``fingerprint_word``, the status of a handle that claims more received rows than ``rows_there``, and the rows
// sent to and expected from each rank. ``back`` (combine) sends each source what came from it and expects the
// rows of its own tokens; a cached dispatch does the opposite.
void handle_header(int64_t* mine, const at::Tensor& rank_prefix_matrix, const at::Tensor& is_token_in_rank,
                   int64_t rank, int64_t rows_there, int64_t fingerprint_word, bool back) {
  TORCH_CHECK(rank_prefix_matrix.is_contiguous() && is_token_in_rank.is_contiguous(),
              "deepep: expected a contiguous handle");
  const int64_t num_ranks = rank_prefix_matrix.size(0);
  const int32_t* pm = rank_prefix_matrix.data_ptr<int32_t>();
  mine[kSettings + fingerprint_word] = fingerprint(pm, num_ranks * num_ranks);
  const int64_t valid = pm[(num_ranks - 1) * num_ranks + rank];
  if (valid > rows_there) {
    const int64_t status[4] = {kHandleRows, valid, rows_there, 0};
    std::memcpy(mine + kStatus, status, sizeof(status));
  }
  int64_t* from_sources = mine + kCounts + (back ? 0 : num_ranks);
  int64_t* own_tokens = mine + kCounts + (back ? num_ranks : 0);
  for (int64_t s = 0; s < num_ranks; ++s) {
    from_sources[s] = pm[s * num_ranks + rank] - (s ? pm[(s - 1) * num_ranks + rank] : 0);
    own_tokens[s] = 0;
  }
  add_tokens_per_rank(own_tokens, is_token_in_rank);
}

int64_t combine_rows(const std::vector<at::Tensor>& rings, c10::IntArrayRef geometry, const at::Tensor& mirror,
                     const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
                     const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                     const at::Tensor& is_token_in_rank, c10::IntArrayRef config, int64_t rank,
                     at::TensorList outputs, const at::Tensor& scratch, double budget_s) {
  const int64_t num_ranks = rings.size(), hidden = x.size(1), k = topk_weights ? topk_weights->size(1) : 0;
  TORCH_CHECK(x.is_contiguous() && (!topk_weights || topk_weights->is_contiguous()), "deepep: expected contiguous");
  const int64_t x_bytes = hidden * x.element_size(), weights_offset = align8(x_bytes);
  const int64_t row_bytes = std::max<int64_t>(weights_offset + align8(4 * k), 8);
  const Scratch at_(scratch, num_ranks);
  std::vector<int64_t> send_counts(num_ranks), recv_counts(num_ranks);
  for (int64_t r = 0; r < num_ranks; ++r) {
    send_counts[r] = at_.matrix[rank * num_ranks + r];
    recv_counts[r] = at_.matrix[r * num_ranks + rank];
  }
  const auto send_off = prefix(send_counts), recv_off = prefix(recv_counts);
  const char* xs = static_cast<const char*>(x.data_ptr());
  const float* w = topk_weights ? topk_weights->data_ptr<float>() : nullptr;
  char* staging = static_cast<char*>(outputs[2].data_ptr());
  auto write = [&](int64_t d, int64_t j, char* dst) {
    const int64_t row = send_off[d] + j;
    std::memcpy(dst, xs + row * x_bytes, x_bytes);
    if (k) std::memcpy(dst + weights_offset, w + row * k, 4 * k);
  };
  int64_t* cursor = at_.rows;
  if (!cursor[2 * num_ranks]) {  // this rank's own rows: straight into the staging rows
    for (int64_t j = 0; j < send_counts[rank]; ++j) write(rank, j, staging + (recv_off[rank] + j) * row_bytes);
    cursor[rank] = cursor[num_ranks + rank] = send_counts[rank];
    cursor[2 * num_ranks] = 1;
  }
  if (!ring_exchange(rings, geometry, mirror.data_ptr<int64_t>(), cursor, row_bytes, send_counts, recv_counts, rank,
                     budget_s, write, [&](int64_t s, int64_t j, const char* src, int64_t n) {
                       std::memcpy(staging + (recv_off[s] + j) * row_bytes, src, n * row_bytes);
                     }))
    return 0;
  const bool* in_rank = is_token_in_rank.data_ptr<bool>();
  const int64_t num_tokens = is_token_in_rank.size(0);
  std::vector<at::Tensor> biases;
  for (const auto& b : {bias_0, bias_1})
    if (b.has_value()) biases.push_back(b->contiguous());
  std::vector<int64_t> taken(num_ranks, 0);
  std::vector<float> acc(hidden), acc_w(k);
  char* out = static_cast<char*>(outputs[0].data_ptr());
  char* out_w = static_cast<char*>(outputs[1].data_ptr());
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(acc_w.begin(), acc_w.end(), 0.0f);
    for (const auto& b : biases)
      accumulate_row(acc.data(), static_cast<const char*>(b.data_ptr()) + t * hidden * b.element_size(),
                     b.scalar_type(), hidden);
    for (int64_t r = 0; r < num_ranks; ++r) {
      if (!in_rank[t * num_ranks + r]) continue;
      const char* row = staging + (recv_off[r] + taken[r]++) * row_bytes;
      accumulate_row(acc.data(), row, x.scalar_type(), hidden);
      if (k) accumulate_row(acc_w.data(), row + weights_offset, at::kFloat, k);
    }
    store_accumulated(out + t * x_bytes, acc.data(), x.scalar_type(), hidden);
    if (k) store_accumulated(out_w + t * 4 * k, acc_w.data(), at::kFloat, k);
  }
  return 1;
}

std::tuple<int64_t, std::vector<at::Tensor>> combine_agree(
    const std::vector<at::Tensor>& rings, c10::IntArrayRef geometry, const at::Tensor& mirror,
    c10::IntArrayRef header_row, const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
    const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
    const at::Tensor& rank_prefix_matrix, const at::Tensor& is_token_in_rank, c10::IntArrayRef config, int64_t rank,
    const at::Tensor& scratch, double budget_s) {
  const int64_t num_ranks = rings.size(), width = header_row.size();
  const Scratch at_(scratch, num_ranks, width);
  const int64_t agreed = handshake(rings, geometry, mirror, at_, header_row, rank, config[kNumSettings], budget_s,
                                   [&](int64_t* mine) {
                                     handle_header(mine, rank_prefix_matrix, is_token_in_rank, rank, x.size(0), 3,
                                                   true);
                                   });
  if (agreed != 1) return {agreed, {}};
  const int64_t k = topk_weights ? topk_weights->size(1) : 0;
  const int64_t row_bytes = std::max<int64_t>(align8(x.size(1) * x.element_size()) + align8(4 * k), 8);
  const auto received_by = read_matrix(at_, num_ranks, width);
  if (!rows_in_rings(at_, received_by, width, row_bytes, config[kSmallBytes], geometry)) return {3, {}};
  const int64_t received = received_by[rank];
  const int64_t num_tokens = is_token_in_rank.size(0);
  std::vector<at::Tensor> outputs{at::empty({num_tokens, x.size(1)}, x.options()),
                                  at::empty({num_tokens, k}, x.options().dtype(at::kFloat)),
                                  at::empty({received, row_bytes}, x.options().dtype(at::kByte))};
  const int64_t moved = combine_rows(rings, geometry, mirror, x, topk_weights, bias_0, bias_1, is_token_in_rank,
                                     config, rank, outputs, scratch, budget_s);
  return {moved ? 1 : 5, outputs};
}


// --- cached dispatch --------------------------------------------------------------------------------------
// A dispatch along a handle: the same tokens to the same ranks, the rows of x (and scales) and the weights as
// they are; the outputs have as many rows as the handle's recv_src_idx (zero padding past the received ones).
std::tuple<int64_t, std::vector<at::Tensor>> cached_agree(
    const std::vector<at::Tensor>& rings, c10::IntArrayRef geometry, const at::Tensor& mirror,
    c10::IntArrayRef header_row, const at::Tensor& data, const std::optional<at::Tensor>& scales,
    const std::optional<at::Tensor>& topk_weights, const at::Tensor& rank_prefix_matrix, int64_t num_recv,
    const at::Tensor& is_token_in_rank, c10::IntArrayRef config, int64_t rank, const at::Tensor& scratch,
    double budget_s) {
  const int64_t num_ranks = rings.size(), width = header_row.size();
  const Scratch at_(scratch, num_ranks, width);
  const int64_t agreed = handshake(rings, geometry, mirror, at_, header_row, rank, config[kNumSettings], budget_s,
                                   [&](int64_t* mine) {
                                     handle_header(mine, rank_prefix_matrix, is_token_in_rank, rank, num_recv, 5,
                                                   false);
                                   });
  if (agreed != 1) return {agreed, {}};
  const int64_t weights_k = topk_weights ? topk_weights->size(1) : 0;
  const Row row(row_bytes_of(data), scales ? row_bytes_of(*scales) : 0, 0, weights_k);
  if (!rows_in_rings(at_, read_matrix(at_, num_ranks, width), width, row.bytes, config[kSmallBytes], geometry))
    return {3, {}};
  std::vector<at::Tensor> outputs{zero_rows(data, num_recv, data.options()), zero_rows(scales, num_recv, data.options()),
                                  at::zeros({num_recv, weights_k}, data.options().dtype(at::kFloat))};
  const int64_t moved = rows(rings, geometry, mirror, data, scales, std::nullopt, topk_weights, is_token_in_rank,
                             config, rank, outputs, scratch, budget_s);
  return {moved ? 1 : 5, outputs};
}

}  // namespace
}  // namespace deepep

TORCH_LIBRARY_IMPL(deepep, CPU, m) {
  m.impl("_shm_dispatch_agree", &deepep::agree);
  m.impl("_shm_dispatch_rows", &deepep::rows);
  m.impl("_shm_combine_agree", &deepep::combine_agree);
  m.impl("_shm_combine_rows", &deepep::combine_rows);
  m.impl("_shm_cached_agree", &deepep::cached_agree);
}
