// C++ CPU kernels of the private compute ops (deep_ep_ops/compute.py documents each one; its pure-torch
// version is the oracle, and the tests compare the two bit for bit).
//
// Only TORCH_LIBRARY_IMPL: the schemas live in deep_ep_ops/_schemas.py (a second TORCH_LIBRARY for the
// namespace would abort the process). Floating-point results must round exactly as torch does, so this
// file is compiled with -ffp-contract=off (no fused multiply-add) and every expression mirrors the order of
// the torch ops it replaces. Inner loops are plain loops over floats that the compiler vectorizes; the
// ones that dominate get AVX-512 and AVX2 clones picked at run time.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <vector>

#define DEEPEP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace deepep {

int64_t plan_total(int64_t num_experts, int64_t num_ranks, int64_t k, int64_t m, int64_t num_shared);
void plan_rows(const int64_t* idx, int64_t n, int64_t k, int64_t num_experts, int64_t num_ranks, int64_t rank,
               int64_t m, int64_t num_shared, int64_t* slot, int64_t* counts, int64_t* source, int32_t* meta);
int64_t combine_positions(const int64_t* layout_range, int64_t num_local, int64_t num_ranks, int64_t s, int64_t cap,
                          int64_t rows_per_expert, int64_t* out);

namespace {

// Bytes per row of a [n, ...] tensor whose rows are dense, and the byte distance between rows.
struct RowLayout {
  int64_t rows, row_bytes, stride_bytes;
};

RowLayout row_layout(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() >= 1, "deepep: expected ", what, " with a row dimension, got a scalar");
  int64_t inner = 1, expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expected, "deepep: expected ", what,
                " with dense rows, got strides ", t.strides());
    expected *= t.size(d);
    inner *= t.size(d);
  }
  const int64_t itemsize = t.element_size();
  return {t.size(0), inner * itemsize, (t.size(0) > 1 ? t.stride(0) : inner) * itemsize};
}

at::Tensor gather_rows(const at::Tensor& rows, const at::Tensor& index) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "deepep: expected an int64 index vector");
  const RowLayout l = row_layout(rows, "rows");
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape[0] = index.size(0);
  at::Tensor out = at::empty(shape, rows.options());
  const auto idx = index.contiguous();
  const int64_t* ix = idx.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, l.row_bytes));
  at::parallel_for(0, index.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      TORCH_CHECK(ix[i] >= 0 && ix[i] < l.rows, "deepep: index ", ix[i], " out of range for ", l.rows, " rows");
      std::memcpy(dst + i * l.row_bytes, src + ix[i] * l.stride_bytes, l.row_bytes);
    }
  });
  return out;
}

void scatter_rows(const at::Tensor& out, const at::Tensor& index, const at::Tensor& rows) {
  const RowLayout o = row_layout(out, "out"), r = row_layout(rows, "rows");
  TORCH_CHECK(o.row_bytes == r.row_bytes, "deepep: expected rows of ", o.row_bytes, " bytes, got ", r.row_bytes);
  TORCH_CHECK(index.numel() == r.rows, "deepep: expected one index per row");
  const auto idx = index.contiguous();
  const int64_t* ix = idx.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < r.rows; ++i) {
    TORCH_CHECK(ix[i] >= 0 && ix[i] < o.rows, "deepep: index ", ix[i], " out of range for ", o.rows, " rows");
    std::memcpy(dst + ix[i] * o.stride_bytes, src + i * r.stride_bytes, r.row_bytes);
  }
}

void permute_rows(const at::Tensor& out, const at::Tensor& out_index, const at::Tensor& rows,
                  const at::Tensor& row_index) {
  const RowLayout o = row_layout(out, "out"), r = row_layout(rows, "rows");
  TORCH_CHECK(o.row_bytes == r.row_bytes, "deepep: expected rows of ", o.row_bytes, " bytes, got ", r.row_bytes);
  TORCH_CHECK(out_index.numel() == row_index.numel(), "deepep: expected as many destinations as rows");
  const auto oi = out_index.contiguous(), ri = row_index.contiguous();
  const int64_t *to = oi.data_ptr<int64_t>(), *from = ri.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < oi.numel(); ++i) {
    TORCH_CHECK(to[i] >= 0 && to[i] < o.rows && from[i] >= 0 && from[i] < r.rows, "deepep: row index out of range");
    std::memcpy(dst + to[i] * o.stride_bytes, src + from[i] * r.stride_bytes, r.row_bytes);
  }
}

// --- low-latency index arithmetic (deep_ep_ops/_ll_plan.py is the specification) ------------------------

// The send plan as tensors (the core is plan_rows in low_latency.cpp, which the shm fast path shares).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ll_plan(const at::Tensor& topk_idx_t, int64_t num_experts,
                                                                   int64_t num_ranks, int64_t rank, int64_t m,
                                                                   int64_t num_shared) {
  const auto topk_idx = topk_idx_t.contiguous();
  const int64_t n = topk_idx.size(0), k = topk_idx.size(1), cols = k + (num_shared > 0 ? 1 : 0);
  const int64_t total = plan_total(num_experts, num_ranks, k, m, num_shared);
  auto opts = topk_idx.options();
  at::Tensor slot = at::empty({n, cols}, opts), counts = at::zeros({num_ranks}, opts);
  at::Tensor source = at::empty({total}, opts), meta = at::empty({total, 2}, opts.dtype(at::kInt));
  plan_rows(topk_idx.data_ptr<int64_t>(), n, k, num_experts, num_ranks, rank, m, num_shared, slot.data_ptr<int64_t>(),
            counts.data_ptr<int64_t>(), source.data_ptr<int64_t>(), meta.data_ptr<int32_t>());
  return {slot, counts, source, meta};
}

// deepep::get_dispatch_layout's local work (layout.get_dispatch_layout): which ranks and nodes each token goes
// to, and the selections per expert (ids outside [0, E) count nowhere; the op rejects them before).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_layout(const at::Tensor& topk_idx_t,
                                                                           int64_t num_experts, int64_t num_ranks,
                                                                           int64_t num_ranks_per_node) {
  const auto topk_idx = topk_idx_t.contiguous();
  const int64_t n = topk_idx.size(0), k = topk_idx.size(1), local = num_experts / num_ranks;
  const int64_t num_nodes = num_ranks / num_ranks_per_node;
  const auto i32 = topk_idx.options().dtype(at::kInt);
  at::Tensor per_rank = at::zeros({num_ranks}, i32), per_node = at::zeros({num_nodes}, i32);
  at::Tensor per_expert = at::zeros({num_experts}, i32);
  at::Tensor in_rank = at::zeros({n, num_ranks}, topk_idx.options().dtype(at::kBool));
  const int64_t* idx = topk_idx.data_ptr<int64_t>();
  int32_t *pr = per_rank.data_ptr<int32_t>(), *pn = per_node.data_ptr<int32_t>(), *pe = per_expert.data_ptr<int32_t>();
  bool* hit = in_rank.data_ptr<bool>();
  std::vector<char> node_hit(num_nodes);
  for (int64_t t = 0; t < n; ++t) {
    bool* row = hit + t * num_ranks;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx[t * k + j];
      if (e < 0 || e >= num_experts) continue;
      ++pe[e];
      row[e / local] = true;
    }
    std::fill(node_hit.begin(), node_hit.end(), 0);
    for (int64_t r = 0; r < num_ranks; ++r)
      if (row[r]) {
        ++pr[r];
        node_hit[r / num_ranks_per_node] = 1;
      }
    for (int64_t node = 0; node < num_nodes; ++node) pn[node] += node_hit[node];
  }
  return {per_rank, per_node, per_expert, in_rank};
}

// The expert side of a combine: each source's rows, in the order it sent them, as flat packed positions.
at::Tensor ll_combine_rows(const at::Tensor& layout_range_t, int64_t cap, int64_t rows_per_expert) {
  const auto layout_range = layout_range_t.contiguous();
  const int64_t L = layout_range.size(0), num_ranks = layout_range.size(1);
  at::Tensor out = at::zeros({num_ranks, cap}, layout_range.options());
  for (int64_t s = 0; s < num_ranks; ++s)
    combine_positions(layout_range.data_ptr<int64_t>(), L, num_ranks, s, cap, rows_per_expert,
                      out.data_ptr<int64_t>() + s * cap);
  return out;
}

// The real received rows in packed order: by local expert, then source rank, then arrival.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ll_sort(const at::Tensor& meta, const at::Tensor& recv_counts_t,
                                                       int64_t cap, int64_t num_local_experts, int64_t rows_per_expert) {
  TORCH_CHECK(meta.dim() == 2 && meta.size(1) == 2 && meta.stride(1) == 1, "deepep: expected int32 [n, 2] meta");
  const auto recv_counts = recv_counts_t.contiguous();
  const int64_t num_ranks = recv_counts.size(0), stride = meta.stride(0), L = num_local_experts;
  const int32_t* mt = meta.data_ptr<int32_t>();
  const int64_t* rc = recv_counts.data_ptr<int64_t>();
  auto opts = recv_counts.options();
  at::Tensor counts = at::zeros({L, num_ranks}, opts);
  int64_t* cn = counts.data_ptr<int64_t>();
  auto expert_of = [&](int64_t row) -> int64_t { return mt[row * stride]; };
  int64_t real = 0;
  for (int64_t s = 0; s < num_ranks; ++s)
    for (int64_t j = 0; j < rc[s]; ++j) {
      const int64_t e = expert_of(s * cap + j);
      if (e >= 0 && e < L) {
        ++cn[e * num_ranks + s];
        ++real;
      }
    }
  std::vector<int64_t> start(L + 1, 0), fill(L, 0);
  for (int64_t e = 0; e < L; ++e) {
    start[e + 1] = start[e];
    for (int64_t s = 0; s < num_ranks; ++s) start[e + 1] += cn[e * num_ranks + s];
  }
  at::Tensor order = at::empty({real}, opts), dest = at::empty({real}, opts);
  int64_t *od = order.data_ptr<int64_t>(), *ds = dest.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_ranks; ++s)
    for (int64_t j = 0; j < rc[s]; ++j) {
      const int64_t row = s * cap + j, e = expert_of(row);
      if (e < 0 || e >= L) continue;
      const int64_t i = start[e] + fill[e];
      od[i] = row;
      ds[i] = e * rows_per_expert + fill[e]++;
    }
  return {order, dest, counts};
}

// --- fp32 accumulation ---------------------------------------------------------------------------------

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
void add_row(float* acc, const T* row, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += to_float(row[i]);
}

DEEPEP_CLONES void add_row_bf16(float* acc, const c10::BFloat16* row, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b = uint32_t(bits[i]) << 16;
    float v;
    std::memcpy(&v, &b, 4);
    acc[i] += v;
  }
}

DEEPEP_CLONES void add_row_f32(float* acc, const float* row, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += row[i];
}

DEEPEP_CLONES void add_scaled_row_bf16(float* acc, const c10::BFloat16* row, float w, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b = uint32_t(bits[i]) << 16;
    float v;
    std::memcpy(&v, &b, 4);
    acc[i] += v * w;
  }
}

template <typename T>
void accumulate(float* acc, const T* row, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) add_row_bf16(acc, row, n);
  else if constexpr (std::is_same_v<T, float>) add_row_f32(acc, row, n);
  else add_row(acc, row, n);
}

template <typename T>
void accumulate_scaled(float* acc, const T* row, float w, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    add_scaled_row_bf16(acc, row, w, n);
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += to_float(row[i]) * w;
  }
}

template <typename T>
void store_row(T* out, const float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i]);
}

// c10's fp32 -> bf16 rounding (nearest even; any NaN becomes 0x7FC0), without branches so that it vectorizes.
DEEPEP_CLONES void store_row_bf16(c10::BFloat16* out, const float* acc, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, acc + i, 4);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    const uint16_t rounded = static_cast<uint16_t>((u + (((u >> 16) & 1) + 0x7FFFu)) >> 16);
    bits[i] = nan ? uint16_t(0x7FC0) : rounded;
  }
}

template <typename T>
void store(T* out, const float* acc, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) store_row_bf16(out, acc, n);
  else if constexpr (std::is_same_v<T, float>) std::memcpy(out, acc, n * sizeof(float));
  else store_row(out, acc, n);
}

}  // namespace

// Shared with shm.cpp: adds one row of any floating dtype into an fp32 accumulator.
void accumulate_row(float* acc, const void* row, at::ScalarType dtype, int64_t n) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "accumulate_row",
                                  [&] { accumulate(acc, static_cast<const scalar_t*>(row), n); });
}

// Shared with low_latency.cpp: adds ``w`` times one row (rounded product, then the sum, as torch does).
void accumulate_scaled_row(float* acc, const void* row, float w, at::ScalarType dtype, int64_t n) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "accumulate_scaled_row",
                                  [&] { accumulate_scaled(acc, static_cast<const scalar_t*>(row), w, n); });
}

void store_accumulated(void* out, const float* acc, at::ScalarType dtype, int64_t n) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "store_accumulated",
                                  [&] { store(static_cast<scalar_t*>(out), acc, n); });
}

// out = round(0 + src[0] + src[1] + ...) element-wise in fp32, sources in order (torch's zeros-then-add
// order), in blocks that stay in L1: no fp32 row is ever written to memory.
void reduce_rows(void* out, at::ScalarType out_dtype, const void* const* src, const at::ScalarType* dtype,
                 int64_t count, int64_t n) {
  constexpr int64_t kBlock = 1024;
  alignas(64) float acc[kBlock];
  const int64_t out_size = c10::elementSize(out_dtype);
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    std::fill(acc, acc + len, 0.0f);
    for (int64_t k = 0; k < count; ++k)
      accumulate_row(acc, static_cast<const char*>(src[k]) + begin * c10::elementSize(dtype[k]), dtype[k], len);
    store_accumulated(static_cast<char*>(out) + begin * out_size, acc, out_dtype, len);
  }
}

namespace {

at::Tensor combine_reduce(const at::Tensor& rows, const at::Tensor& token, int64_t num_tokens,
                          const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                          at::ScalarType out_dtype) {
  TORCH_CHECK(rows.dim() == 2 && (rows.size(0) == 0 || rows.stride(1) == 1), "deepep: expected [n, W] rows");
  const int64_t n = rows.size(0), width = rows.size(1);
  const auto tok = token.contiguous();
  const int64_t* tk = tok.data_ptr<int64_t>();
  // Rows of each token, in row order: the order torch's index_add_ adds them in.
  std::vector<int64_t> start(num_tokens + 1, 0), order(n);
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(tk[j] >= 0 && tk[j] < num_tokens, "deepep: token ", tk[j], " out of range");
    ++start[tk[j] + 1];
  }
  for (int64_t t = 0; t < num_tokens; ++t) start[t + 1] += start[t];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t j = 0; j < n; ++j) order[fill[tk[j]]++] = j;
  at::Tensor out = at::empty({num_tokens, width}, rows.options().dtype(out_dtype));
  std::vector<at::Tensor> biases;
  for (const auto& b : {bias_0, bias_1})
    if (b.has_value()) biases.push_back(b->contiguous());
  const char* base = static_cast<const char*>(rows.data_ptr());
  const int64_t stride = rows.stride(0) * rows.element_size();
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<const void*> src;
    std::vector<at::ScalarType> dtype;
    for (int64_t t = begin; t < end; ++t) {
      src.clear();
      dtype.clear();
      for (const auto& b : biases) {
        src.push_back(static_cast<const char*>(b.data_ptr()) + t * width * b.element_size());
        dtype.push_back(b.scalar_type());
      }
      for (int64_t k = start[t]; k < start[t + 1]; ++k) {
        src.push_back(base + order[k] * stride);
        dtype.push_back(rows.scalar_type());
      }
      reduce_rows(static_cast<char*>(out.data_ptr()) + t * width * out.element_size(), out_dtype, src.data(),
                  dtype.data(), src.size(), width);
    }
  });
  return out;
}

at::Tensor weighted_reduce(const at::Tensor& rows, const at::Tensor& slot, const at::Tensor& weights) {
  TORCH_CHECK(rows.dim() == 2 && (rows.size(0) == 0 || rows.stride(1) == 1), "deepep: expected [n, H] rows");
  const int64_t n = rows.size(0), width = rows.size(1), tokens = slot.size(0), cols = slot.size(1);
  const int64_t k = weights.size(1);
  const auto sl = slot.contiguous();
  const auto wt = weights.contiguous();
  const int64_t* s = sl.data_ptr<int64_t>();
  const float* w = wt.data_ptr<float>();
  at::Tensor out = at::empty({tokens, width}, rows.options());
  const int64_t stride = rows.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "weighted_reduce", [&] {
    const scalar_t* base = rows.data_ptr<scalar_t>();
    const std::vector<scalar_t> zero(width, scalar_t(0));
    at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(width);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t r = s[t * cols + j];
          TORCH_CHECK(r >= 0 && r <= n, "deepep: slot ", r, " out of range for ", n, " rows");
          const scalar_t* row = r == n ? zero.data() : base + r * stride;  // row n: the zero row of unused slots
          if (j < k) accumulate_scaled(acc.data(), row, w[t * k + j], width);
          else accumulate(acc.data(), row, width);
        }
        store(out.data_ptr<scalar_t>() + t * width, acc.data(), width);
      }
    });
  });
  return out;
}

// --- quantization (deep_ep_ops/quant.py defines the formats) ---------------------------------------------

template <typename T>
void load_row(float* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

DEEPEP_CLONES void load_row_bf16(float* dst, const c10::BFloat16* src, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b = uint32_t(bits[i]) << 16;
    std::memcpy(dst + i, &b, 4);
  }
}

template <typename T>
void load(float* dst, const T* src, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) load_row_bf16(dst, src, n);
  else if constexpr (std::is_same_v<T, float>) std::memcpy(dst, src, n * sizeof(float));
  else load_row(dst, src, n);
}

// max |x| over bit patterns: for non-negative floats the integer order is the float order, and an integer
// max reduction vectorizes where a float one (with its NaN rules) does not. A NaN wins, as in torch.
DEEPEP_CLONES float abs_max(const float* x, int64_t n) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, bits[i] & 0x7FFFFFFFu);
  float out;
  std::memcpy(&out, &m, 4);
  return out;
}

DEEPEP_CLONES float abs_max_bf16(const c10::BFloat16* x, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  uint16_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max<uint16_t>(m, bits[i] & 0x7FFF);
  const uint32_t wide = uint32_t(m) << 16;
  float out;
  std::memcpy(&out, &wide, 4);
  return out;
}

DEEPEP_CLONES void quantize_int8_row_bf16(int8_t* q, const c10::BFloat16* x, float divisor, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = uint32_t(bits[i]) << 16;
    float v;
    std::memcpy(&v, &b, 4);
    v = std::nearbyint(v / divisor);
    q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
}

DEEPEP_CLONES void quantize_int8_row(int8_t* q, const float* x, float divisor, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float v = std::nearbyint(x[i] / divisor);  // torch.round: half to even
    v = std::min(127.0f, std::max(-127.0f, v));
    q[i] = static_cast<int8_t>(v);
  }
}

// One row of per-token INT8: the scale rounds like (amax + eps) / 127 in fp32 (amax of |x| is exact in any
// dtype), and q like torch.round(x / scale) (division, not a reciprocal; half to even).
template <typename T>
void quantize_int8_rows(const T* src, int8_t* dst, float* sc, int64_t begin, int64_t end, int64_t hidden, float eps) {
  std::vector<float> row;
  for (int64_t r = begin; r < end; ++r) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const float s = (abs_max_bf16(src + r * hidden, hidden) + eps) / 127.0f;
      sc[r] = s;
      quantize_int8_row_bf16(dst + r * hidden, src + r * hidden, s > 0.0f ? s : 1.0f, hidden);
    } else {
      row.resize(hidden);
      load(row.data(), src + r * hidden, hidden);
      const float s = (abs_max(row.data(), hidden) + eps) / 127.0f;
      sc[r] = s;
      quantize_int8_row(dst + r * hidden, row.data(), s > 0.0f ? s : 1.0f, hidden);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x, double eps) {
  TORCH_CHECK(x.dim() >= 1, "deepep: expected x with a hidden dimension");
  const int64_t hidden = x.size(-1), rows = hidden ? x.numel() / hidden : 0;
  const auto xc = x.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  std::vector<int64_t> scale_shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_int8", [&] {
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      quantize_int8_rows(xc.data_ptr<scalar_t>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), begin, end, hidden,
                         static_cast<float>(eps));
    });
  });
  return {q, scale};
}

// c10's fp32 -> float8_e4m3fn conversion (round to nearest even, NaN above the range), written without
// branches so that it vectorizes; it gives the same bits as c10::Float8_e4m3fn(float).
inline uint8_t fp8_e4m3fn_bits(float f) {
  constexpr uint32_t fp8_max = UINT32_C(1087) << 20;
  constexpr uint32_t denorm_mask = UINT32_C(141) << 23;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t sign = bits & UINT32_C(0x80000000);
  bits ^= sign;
  float mag, denorm_bias;
  std::memcpy(&mag, &bits, 4);
  std::memcpy(&denorm_bias, &denorm_mask, 4);
  const float denorm_sum = mag + denorm_bias;
  uint32_t denorm_bits;
  std::memcpy(&denorm_bits, &denorm_sum, 4);
  const uint8_t denorm = static_cast<uint8_t>(denorm_bits - denorm_mask);
  const uint32_t mant_odd = (bits >> 20) & 1;
  const uint8_t normal = static_cast<uint8_t>((bits + ((uint32_t)(7 - 127) << 23) + 0x7FFFF + mant_odd) >> 20);
  const uint8_t result = bits >= fp8_max ? uint8_t(0x7f) : (bits < (UINT32_C(121) << 23) ? denorm : normal);
  return result | static_cast<uint8_t>(sign >> 24);
}

DEEPEP_CLONES void quantize_fp8_mul(uint8_t* q, const float* x, float inv, int64_t n) {
  for (int64_t i = 0; i < n; ++i) q[i] = fp8_e4m3fn_bits(x[i] * inv);
}

DEEPEP_CLONES void quantize_fp8_div(uint8_t* q, const float* x, float scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) q[i] = fp8_e4m3fn_bits(x[i] / scale);
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, bool round_scale, bool use_ue8m0) {
  constexpr int64_t kBlock = 128;
  TORCH_CHECK(x.dim() == 2 && x.size(1) % kBlock == 0, "deepep: expected [n, H] with H divisible by 128");
  const int64_t n = x.size(0), hidden = x.size(1), blocks = hidden / kBlock;
  const auto xc = x.contiguous();
  at::Tensor amax = at::empty({n, blocks}, x.options().dtype(at::kFloat));
  at::Tensor q = at::empty({n, hidden}, x.options().dtype(at::kFloat8_e4m3fn));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_fp8_amax", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    float* am = amax.data_ptr<float>();
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> row(hidden);
      for (int64_t r = begin; r < end; ++r) {
        load(row.data(), src + r * hidden, hidden);
        for (int64_t b = 0; b < blocks; ++b)
          am[r * blocks + b] = std::max(abs_max(row.data() + b * kBlock, kBlock), 1e-4f);
      }
    });
  });
  // The scales come from the same torch ops as deep_ep_ops.quant.per_block_fp8 (on n x H/128 values, so
  // they cost nothing): 448 / amax is reciprocal(amax) * 448 there, and log2/exp2 round as torch's do.
  at::Tensor scale = round_scale ? at::exp2(at::ceil(at::log2(amax / 448.0))) : amax / 448.0;
  at::Tensor factor = round_scale ? scale : amax.reciprocal() * 448.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_fp8", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    const float* f = factor.data_ptr<float>();
    uint8_t* dst = reinterpret_cast<uint8_t*>(q.data_ptr());
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> row(hidden);
      for (int64_t r = begin; r < end; ++r) {
        load(row.data(), src + r * hidden, hidden);
        for (int64_t b = 0; b < blocks; ++b) {
          float* xb = row.data() + b * kBlock;
          uint8_t* qb = dst + r * hidden + b * kBlock;
          if (round_scale) quantize_fp8_div(qb, xb, f[r * blocks + b], kBlock);
          else quantize_fp8_mul(qb, xb, f[r * blocks + b], kBlock);
        }
      }
    });
  });
  if (!use_ue8m0) return {q, scale};
  TORCH_CHECK(blocks % 4 == 0, "deepep: expected H divisible by 512 for UE8M0 scales");
  at::Tensor packed = at::empty({n, blocks / 4}, x.options().dtype(at::kInt));
  const int32_t* sbits = reinterpret_cast<const int32_t*>(scale.data_ptr<float>());
  int32_t* p = packed.data_ptr<int32_t>();
  for (int64_t i = 0; i < n * blocks / 4; ++i) {
    uint32_t word = 0;
    for (int k = 0; k < 4; ++k) word |= ((uint32_t(sbits[4 * i + k]) >> 23) & 0xFF) << (8 * k);
    p[i] = static_cast<int32_t>(word);
  }
  return {q, packed};
}

}  // namespace
}  // namespace deepep

TORCH_LIBRARY_IMPL(deepep, CPU, m) {
  m.impl("_gather_rows", &deepep::gather_rows);
  m.impl("_scatter_rows", &deepep::scatter_rows);
  m.impl("_permute_rows", &deepep::permute_rows);
  m.impl("_ll_plan", &deepep::ll_plan);
  m.impl("_dispatch_layout", &deepep::dispatch_layout);
  m.impl("_ll_sort", &deepep::ll_sort);
  m.impl("_ll_combine_rows", &deepep::ll_combine_rows);
  m.impl("_combine_reduce", &deepep::combine_reduce);
  m.impl("_weighted_reduce", &deepep::weighted_reduce);
  m.impl("_quantize_int8", &deepep::quantize_int8);
  m.impl("_quantize_fp8", &deepep::quantize_fp8);
}

// An importable, empty module: importing deep_ep_ops._C runs the registrations above. (Plain CPython API:
// pybind11's headers would double the build time for nothing.)
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "C++ CPU kernels of deep_ep_ops", -1, nullptr};
  return PyModule_Create(&def);
}
