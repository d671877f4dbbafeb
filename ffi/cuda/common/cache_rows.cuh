// Where the kernels find key j of a batch row: a contiguous cache (offsets
// from the batch row's base, which the kernel computes as before) or a paged
// one (offsets from the pool's base through RowView's paged fields,
// params.h), chosen at compile time so the contiguous kernels keep their
// address arithmetic. A key
// on a page whose index lies outside [0, num_pages) is skipped: its row is
// never read (cp.async zero-fills it) and its score is masked. Callers ask
// only for keys below the row's kv_len (<= max_pages * page_size), so the
// block-table read stays inside the table.
#pragma once

#include <cstdint>

#include "ffi/common/params.h"

namespace jax_mla::cuda {

template <bool kPaged>
struct CacheRows {
  // The view lives in the kernel's parameters: reading its fields each time
  // costs no registers (the quantized 64-row kernel spilled when the page
  // fields were copied into registers).
  const RowView& v;
  const int32_t* table = nullptr;  // batch row b's block-table row (paged)

  __device__ __forceinline__ CacheRows(const RowView& view, int64_t b) : v(view) {
    if constexpr (kPaged) table = view.block_table + b * view.max_pages;
  }
  // The base the offsets count from: the pool (paged) or batch row
  // b % kv_batch (contiguous), in units of the view's strides.
  template <typename U>
  static __device__ __forceinline__ const U* Base(const void* data, int64_t b, int64_t kv_batch,
                                                  int64_t batch_stride) {
    if constexpr (kPaged) return static_cast<const U*>(data);
    return static_cast<const U*>(data) + (b % kv_batch) * batch_stride;
  }

  // The page holding key j, -1 when skipped (paged); 0 (contiguous).
  __device__ __forceinline__ int64_t Page(int64_t j) const {
    if constexpr (kPaged) {
      const int64_t page = __ldg(table + (j >> (__ffsll(v.page_size) - 1)));
      return page >= 0 && page < v.num_pages ? page : -1;
    }
    return 0;
  }
  __device__ __forceinline__ bool Live(int64_t j) const {
    if constexpr (kPaged) return Page(j) >= 0;
    return true;
  }
  // Key j's row index within its page (paged) or batch row (contiguous).
  __device__ __forceinline__ int64_t Row(int64_t j) const {
    if constexpr (kPaged) return j & (v.page_size - 1);
    return j;
  }
  // Whether key j is read (below kv_len, not on a skipped page), and in *off
  // its row's offset from Base (units of the strides; 0 when not read, a
  // valid address for a zero-filling cp.async). `batch_stride` is the page
  // stride of a paged view (unused otherwise). The contiguous branch is the
  // kernels' original expression, so their code does not change.
  __device__ __forceinline__ bool Locate(int64_t j, int64_t kv_len, int64_t batch_stride,
                                         int64_t row_stride, int64_t* off) const {
    if constexpr (kPaged) {
      const int64_t page = j < kv_len ? Page(j) : -1;
      *off = page < 0 ? 0 : page * batch_stride + Row(j) * row_stride;
      return page >= 0;
    }
    const bool ok = j < kv_len;
    *off = (ok ? j : 0) * row_stride;
    return ok;
  }
};

}  // namespace jax_mla::cuda
