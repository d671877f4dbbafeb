// Where the kernels find key j of a batch row: a contiguous cache (offsets
// from the batch row's base, which the kernel computes as before) or a paged
// one (offsets from the pool's base through RowView's paged fields,
// params.h), chosen at compile time so the contiguous kernels keep their
// address arithmetic. A key
// on a page whose index lies outside [0, num_pages) is skipped: its row is
// never read (cp.async zero-fills it) and its score is masked. Callers ask
// only for keys below the row's kv_len (<= max_pages * page_size), so the
// block-table read stays inside the table.
//
// The table entries a tile's copies need are read a tile ahead (Fetch, into
// a TilePages the thread keeps in registers) and the copies address their
// rows from those (Locate with the TilePages): a cp.async never waits on a
// block-table load (benchmarks/NOTES.md, "CUDA 11" and "CUDA 12").
#pragma once

#include <cstdint>

#include "ffi/common/params.h"

namespace jax_mla::cuda {

// The block-table entries of one tile of kKeys keys (its first key a multiple
// of kKeys), one per run of 16 keys: pages hold 16 keys or more, so a run
// never spans two pages (a page of 16 or 32 keys holds several runs, and a
// tile several pages when pages are shorter than it). entry[s] is the table's
// value for keys [key0 + 16 s, key0 + 16 s + 16) as read, checked against
// [0, num_pages) where it is used (CacheRows::Valid), or -1 when key0 + 16 s
// is at or past kv_len (then not read: the table has max_pages entries and
// kv_len <= max_pages * page_size). Registers only (the callers index it with
// compile-time slots); unused for contiguous caches.
template <int kKeys>
struct TilePages {
  static_assert(kKeys % 16 == 0, "tiles are whole 16-key runs");
  static constexpr int kSlots = kKeys / 16;
  int32_t entry[kSlots];
};

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
  // The table entry of key j's page as read, -1 when j >= kv_len (not read);
  // 0 (contiguous). A load nothing waits on until Valid looks at it. j must
  // not be negative: a key below 0 is read, before the batch row's entries.
  __device__ __forceinline__ int32_t Entry(int64_t j, int64_t kv_len) const {
    if constexpr (kPaged) return j < kv_len ? __ldg(table + (j >> (__ffsll(v.page_size) - 1))) : -1;
    return 0;
  }
  // Whether an entry names a page of the pool (always, contiguous).
  __device__ __forceinline__ bool Valid(int32_t entry) const {
    if constexpr (kPaged) return entry >= 0 && entry < v.num_pages;
    return true;
  }
  // The entries of the tile of kKeys keys starting at key0 (TilePages): the
  // loads are issued here, their values first used by the tile's copies.
  template <int kKeys>
  __device__ __forceinline__ TilePages<kKeys> Fetch(int64_t key0, int64_t kv_len) const {
    TilePages<kKeys> tp;
#pragma unroll
    for (int s = 0; s < TilePages<kKeys>::kSlots; ++s) tp.entry[s] = Entry(key0 + 16 * s, kv_len);
    return tp;
  }
  // The entry of key rr of the tile (0 <= rr < kKeys), chosen among the
  // slots without indexing the register array at run time.
  template <int kKeys>
  static __device__ __forceinline__ int32_t SlotEntry(const TilePages<kKeys>& tp, int rr) {
    int32_t e = tp.entry[0];
#pragma unroll
    for (int s = 1; s < TilePages<kKeys>::kSlots; ++s)
      if (rr >= 16 * s) e = tp.entry[s];
    return e;
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
  // The same for key j = key0 + rr of the tile whose entries tp holds
  // (Fetch(key0)), with no block-table load: what the tiles' copies call.
  template <int kKeys>
  __device__ __forceinline__ bool Locate(const TilePages<kKeys>& tp, int rr, int64_t j,
                                         int64_t kv_len, int64_t batch_stride, int64_t row_stride,
                                         int64_t* off) const {
    if constexpr (kPaged) {
      const int32_t page = SlotEntry(tp, rr);
      const bool ok = j < kv_len && Valid(page);
      *off = ok ? int64_t(page) * batch_stride + Row(j) * row_stride : 0;
      return ok;
    }
    return Locate(j, kv_len, batch_stride, row_stride, off);
  }
};

}  // namespace jax_mla::cuda
