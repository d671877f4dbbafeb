// The block table of a paged call (the *_paged targets), checked the same way
// on every backend: int32 [B, max_pages], pages of 16, 32, 64 or 128 keys.
// It turns the cache views that CacheRows made of the pages ([num_pages,
// page_size, ...] read as [batch, seq, ...]) into paged views (RowView's
// block_table fields), and the call's Skv into max_pages * page_size.
#pragma once

#include <cstdint>

#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"

namespace jax_mla {

inline constexpr int64_t kPageSizes[] = {16, 32, 64, 128};

inline bool IsPageSize(int64_t n) {
  for (int64_t s : kPageSizes)
    if (s == n) return true;
  return false;
}

// `pages` is the cache's [num_pages, page_size] (CacheShape batch and seq);
// on success sets *seq_kv and the paged fields of *view.
inline ffi::Error PagedRows(const char* op, const char* name, ffi::Buffer<ffi::S32> block_table,
                            int64_t batch, int64_t num_pages, int64_t page_size, RowView* view,
                            int64_t* seq_kv) {
  const auto td = block_table.dimensions();
  JAX_MLA_CHECK(td.size() == 2 && td[0] == batch, InvalidArgument)
      << op << ": block_table must be int32 [" << batch << ", max_pages], got " << ShapeString(td);
  JAX_MLA_CHECK(IsPageSize(page_size), InvalidArgument)
      << op << ": the page size (" << name << ".shape[1]) must be 16, 32, 64 or 128, got "
      << page_size;
  view->block_table = block_table.typed_data();
  view->page_size = page_size;
  view->max_pages = td[1];
  view->num_pages = num_pages;
  *seq_kv = td[1] * page_size;
  return ffi::Error::Success();
}

}  // namespace jax_mla
