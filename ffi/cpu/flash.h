// The CPU driver shared by flash_attention and flash_mla: splits an
// AttentionParams problem into blocks of query rows x key ranges, runs them on
// the FFI thread pool through the ISA-selected kernels, normalizes, and merges
// split-KV partials by LSE.
#pragma once

#include "ffi/common/params.h"
#include "ffi/cpu/kernels.h"
#include "ffi/cpu/parallel.h"

namespace jax_mla::cpu {

// Query rows per block the driver aims for: all heads sharing a KV head times
// enough query positions to reach this many rows, so that each converted key
// tile is reused across many rows.
inline constexpr int64_t kTargetRows = 32;
// Long prefill (enough query rows that blocks of this many still make at
// least kLongMinItems work items): blocks of this many rows, so that each
// K/V tile, converted once per block, serves four times as many rows. The
// conversion reads K and V rows a whole row of heads apart (a new page per
// row), which cost as much as the tile's GEMMs at 32 rows (NOTES 16). The
// driver hands the kernel at most RowsPerCall (flash.cc) of them at a time.
inline constexpr int64_t kLongRows = 128;
inline constexpr int64_t kLongMinItems = 64;
// At most this many heads of one KV head go in a block (bounds the scratch).
inline constexpr int64_t kMaxHeadsPerBlock = 128;
// Below this many rows per KV head (decode with small GQA groups), one work
// item takes all KV heads and the kernel's attend_heads walks the keys with
// every head of a key read together, in memory order, instead of one head's
// keys (a whole row of heads apart, a new page almost every row) at a time.
inline constexpr int64_t kMinRowsPerKvHead = 8;

// How a problem is cut into work items:
// (batch, KV-head block, query-head block, query-position block, split).
struct Plan {
  int64_t group = 0;      // query heads per KV head
  int64_t heads_blk = 0;  // query heads of the group per item
  int64_t n_head_blk = 0;
  int64_t pos_blk = 0;  // query positions per item
  int64_t n_pos_blk = 0;
  int64_t kv_heads_blk = 0;  // KV heads per item
  int64_t n_kv_head_blk = 0;
  int64_t split_len = 0;  // keys per split
  int64_t items = 0;
};

// The rows of (K/V batch b, KV head h) of a view; of a paged view, those of
// sequence b, read in place through its block-table row (page sizes are
// powers of two).
KvRows RowsOf(const RowView& view, int64_t b, int64_t h);

// Splits cover whole key tiles, so trailing splits may be empty (their LSE is
// -inf and the merge ignores them).
Plan MakePlan(int64_t batch, int64_t seq_q, int64_t heads_q, int64_t heads_kv, int64_t seq_kv,
              int64_t num_splits);

// A handler's last step: the future of `params` if `checked` (the result of
// its argument checks) succeeded and the kernels JAX_MLA_CPU_ISA asks for are
// available (the switch is read at every call, so a test can change paths
// without restarting), else a future holding the error.
// The driver never reads keys at or past a row's visible end, so cache slots
// past kv_len may hold anything.
ffi::Future RunChecked(ffi::Error checked, const AttentionParams& params, ffi::ThreadPool pool);

}  // namespace jax_mla::cpu
