// Plain parameter structs shared by the FFI handlers (ffi/<backend>/<op>) and
// the kernels. Every pointer is commented with the shape it points to.
#pragma once

#include <cstdint>

#include "ffi/common/dtype.h"
#include "ffi/common/quant_format.h"

// Lets the CUDA kernels call the small helpers below.
#if defined(__CUDACC__)
#define JAX_MLA_HOST_DEVICE __host__ __device__
#else
#define JAX_MLA_HOST_DEVICE
#endif

namespace jax_mla {

// A strided view of key or value rows: row t of (batch b, kv head h) starts at
// data + b * batch_stride + t * row_stride + h * head_stride, counted in
// elements of dtype for a float cache and in bytes of qs for a quantized one
// (UnitBytes). A quantized row's scales start at scales + b *
// scale_batch_stride + t * scale_row_stride + h * scale_head_stride (in
// scales: float16 or float32, ScaleBytes).
struct RowView {
  const void* data = nullptr;
  DType dtype = DType::kF32;  // float caches only
  int64_t batch_stride = 0;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
  QFormat fmt = QFormat::kNone;
  const void* scales = nullptr;
  int64_t scale_batch_stride = 0;
  int64_t scale_row_stride = 0;
  int64_t scale_head_stride = 0;
  // Paged caches: when block_table != nullptr, data (and scales) hold pages
  // [num_pages, page_size, ...], batch_stride (scale_batch_stride) is the stride
  // between pages, and row t of batch b is row t % page_size of page
  // block_table[b * max_pages + t / page_size]. A page index outside
  // [0, num_pages) marks keys that are skipped, never read.
  const int32_t* block_table = nullptr;
  int64_t page_size = 0;
  int64_t max_pages = 0;
  int64_t num_pages = 0;

  int64_t UnitBytes() const { return fmt == QFormat::kNone ? DTypeBytes(dtype) : 1; }
};

// Attention of Sq query positions x Hq heads against Skv keys of Hkv heads.
// flash_attention and flash_mla both reduce to it: MLA is Hkv = 1 with K the
// whole latent row and V a slice of the same row (same data, other offset).
struct AttentionParams {
  int64_t batch = 0;     // B (of q)
  int64_t kv_batch = 0;  // batch of K/V: B, or a divisor of it when a vmapped
                         // call shares one cache (query batch b reads b % kv_batch)
  int64_t seq_q = 0;     // Sq
  int64_t heads_q = 0;   // Hq
  int64_t heads_kv = 0;  // Hkv, divides Hq
  int64_t seq_kv = 0;    // Skv
  int64_t dk = 0;        // K head dim (q and k rows)
  int64_t dv = 0;        // V head dim (v rows and output)
  float scale = 1.f;
  bool causal = false;

  const void* q = nullptr;  // [B, Sq, Hq, Dk], dtype q_dtype
  DType q_dtype = DType::kF32;
  RowView k;  // K rows [B, Skv, Hkv, Dk] (or MLA latent rows)
  RowView v;  // V rows [B, Skv, Hkv, Dv] (or a slice of the latent rows)
  // MLA: V is columns [v_in_k, v_in_k + dv) of the K rows, so kernels can read
  // it from the K data they already loaded; -1 when V is a separate tensor.
  int64_t v_in_k = -1;
  const int32_t* q_pos = nullptr;   // [B]: absolute position of query row 0
  const int32_t* kv_len = nullptr;  // [B]: keys at positions >= kv_len do not exist

  void* out = nullptr;   // [B, Sq, Hq, Dv], dtype q_dtype
  float* lse = nullptr;  // [B, Hq, Sq]

  // Split-KV: the key range is cut into num_splits chunks (the backend
  // chooses their length); with num_splits > 1 each split writes its
  // normalized partial output and LSE here and a combine step merges them.
  int64_t num_splits = 1;
  float* part_out = nullptr;  // [B, num_splits, Sq, Hq, Dv] float32
  float* part_lse = nullptr;  // [B, num_splits, Sq, Hq] float32
};

// The attention backward (docs/design.md, "Backward kernels"): the gradients
// of q, k and v from the forward's inputs, its LSE and delta =
// rowsum(dout * out) - dlse. K and V are float caches of the query batch.
struct AttentionBwdParams {
  int64_t batch = 0;     // B
  int64_t seq_q = 0;     // Sq
  int64_t heads_q = 0;   // Hq
  int64_t heads_kv = 0;  // Hkv, divides Hq
  int64_t seq_kv = 0;    // Skv
  int64_t dk = 0;        // K head dim
  int64_t dv = 0;        // V head dim
  float scale = 1.f;
  bool causal = false;

  const void* q = nullptr;  // [B, Sq, Hq, Dk], dtype q_dtype
  DType q_dtype = DType::kF32;
  RowView k;                   // K rows [B, Skv, Hkv, Dk]
  RowView v;                   // V rows [B, Skv, Hkv, Dv]
  const void* dout = nullptr;  // [B, Sq, Hq, Dv], dtype dout_dtype
  DType dout_dtype = DType::kF32;
  const float* lse = nullptr;       // [B, Hq, Sq] natural-log LSE of the scaled scores
  const float* delta = nullptr;     // [B, Hq, Sq]
  const int32_t* q_pos = nullptr;   // [B]
  const int32_t* kv_len = nullptr;  // [B]

  float* grad_q = nullptr;  // [B, Sq, Hq, Dk]
  float* grad_k = nullptr;  // [B, Skv, Hkv, Dk]
  float* grad_v = nullptr;  // [B, Skv, Hkv, Dv]
};

// Number of keys a row at query position `pos` sees, given the batch row's
// kv_len (clamped to [0, Skv], docs/design.md) and the causal flag. Visible keys are
// always the prefix [0, n) of the cache.
JAX_MLA_HOST_DEVICE inline int64_t VisibleKeys(int64_t pos, int32_t kv_len, int64_t seq_kv,
                                               bool causal) {
  int64_t n = kv_len < 0 ? 0 : (kv_len > seq_kv ? seq_kv : int64_t(kv_len));
  if (causal) {
    const int64_t limit = pos + 1 < 0 ? 0 : pos + 1;
    if (limit < n) n = limit;
  }
  return n;
}

}  // namespace jax_mla
