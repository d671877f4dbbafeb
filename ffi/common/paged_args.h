// The arguments of the paged targets (jax_mla_flash_mla_paged, ..._quant_paged,
// jax_mla_flash_attention_paged, ..._quant_paged), checked the same way on
// every backend: the cache operands are page pools [num_pages, page_size, ...]
// and block_table (int32 [B, max_pages]) maps sequence b's j-th page of
// page_size positions to a pool page. After PagedRows the call is checked as a
// contiguous one of logical shape [B, max_pages * page_size, ...]
// (op_args.h); the kernels then read rows through the RowView's paged fields
// (params.h). The FFI signatures are in paged_bindings.h.
#pragma once

#include <cstdint>

#include "ffi/common/cache_args.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/op_args.h"
#include "ffi/common/params.h"

namespace jax_mla {

// True for the page sizes every backend serves (the contract's static set).
inline bool IsValidPageSize(int64_t page_size) {
  return page_size == 16 || page_size == 32 || page_size == 64 || page_size == 128;
}

// Checks block_table against q's batch and the pool `*shape` (from CacheRows:
// batch = num_pages, seq = page_size), makes *view paged and turns *shape into
// the logical cache [batch, max_pages * page_size, ...]. The page indices are
// data: the kernels skip out-of-range ones, so they are not checked here.
inline ffi::Error PagedRows(const char* op, const char* name, ffi::Buffer<ffi::S32> block_table,
                            int64_t batch, CacheShape* shape, RowView* view) {
  const auto bd = block_table.dimensions();
  JAX_MLA_CHECK(bd.size() == 2 && bd[0] == batch, InvalidArgument)
      << op << ": block_table must be int32 [" << batch << ", max_pages], got shape "
      << ShapeString(bd);
  JAX_MLA_CHECK(IsValidPageSize(shape->seq), InvalidArgument)
      << op << ": the page size of " << name << " (its axis 1) must be 16, 32, 64 or 128, got "
      << shape->seq;
  view->block_table = block_table.typed_data();
  view->page_size = shape->seq;
  view->max_pages = bd[1];
  view->num_pages = shape->batch;
  shape->batch = batch;
  shape->seq = bd[1] * view->page_size;
  return ffi::Error::Success();
}

// q's batch, or an error when q is not [B, Sq, H, D] (checked before the
// pools so the block table's message can name B).
inline ffi::Error QueryBatch(const char* op, ffi::AnyBuffer q, int64_t* batch) {
  const auto qd = q.dimensions();
  JAX_MLA_CHECK(qd.size() == 4, InvalidArgument)
      << op << ": q must have rank 4 [B, Sq, H, Dk], got shape " << ShapeString(qd);
  *batch = qd[0];
  return ffi::Error::Success();
}

// MlaArgs for a paged latent cache kv [num_pages, page_size, Dk] (kv_d null
// for a float cache).
inline ffi::Error PagedMlaArgs(ffi::AnyBuffer q, ffi::AnyBuffer kv, const ffi::AnyBuffer* kv_d,
                               int64_t kv_fmt, ffi::Buffer<ffi::S32> block_table,
                               ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                               ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::Buffer<ffi::F32>> lse,
                               ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                               ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t dv,
                               int64_t v_offset, int64_t num_splits, AttentionParams* p) {
  int64_t batch = 0;
  JAX_MLA_RETURN_IF_ERROR(QueryBatch("flash_mla", q, &batch));
  CacheShape cs;
  RowView rows;
  JAX_MLA_RETURN_IF_ERROR(CacheRows("flash_mla", "kv", kv, kv_d, kv_fmt, 3, &cs, &rows));
  JAX_MLA_RETURN_IF_ERROR(PagedRows("flash_mla", "kv", block_table, batch, &cs, &rows));
  return MlaRowArgs(q, cs, rows, q_pos, kv_len, out, lse, part_out, part_lse, dv, v_offset,
                    num_splits, p);
}

// AttentionArgs for paged k and v [num_pages, page_size, Hkv, D] sharing one
// block table (k_d / v_d null for a float k / v).
inline ffi::Error PagedAttentionArgs(
    ffi::AnyBuffer q, ffi::AnyBuffer k, const ffi::AnyBuffer* k_d, int64_t k_fmt, ffi::AnyBuffer v,
    const ffi::AnyBuffer* v_d, int64_t v_fmt, ffi::Buffer<ffi::S32> block_table,
    ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
    ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::Buffer<ffi::F32>> part_out,
    ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t num_splits, AttentionParams* p) {
  int64_t batch = 0;
  JAX_MLA_RETURN_IF_ERROR(QueryBatch("flash_attention", q, &batch));
  CacheShape ks, vs;
  RowView k_rows, v_rows;
  JAX_MLA_RETURN_IF_ERROR(CacheRows("flash_attention", "k", k, k_d, k_fmt, 4, &ks, &k_rows));
  JAX_MLA_RETURN_IF_ERROR(CacheRows("flash_attention", "v", v, v_d, v_fmt, 4, &vs, &v_rows));
  JAX_MLA_CHECK(ks.batch == vs.batch && ks.seq == vs.seq, InvalidArgument)
      << "flash_attention: k and v pools must have the same [num_pages, page_size], got ["
      << ks.batch << ", " << ks.seq << "] and [" << vs.batch << ", " << vs.seq << "]";
  JAX_MLA_RETURN_IF_ERROR(PagedRows("flash_attention", "k", block_table, batch, &ks, &k_rows));
  JAX_MLA_RETURN_IF_ERROR(PagedRows("flash_attention", "v", block_table, batch, &vs, &v_rows));
  return AttentionRowArgs(q, ks, k_rows, vs, v_rows, q_pos, kv_len, out, lse, part_out, part_lse,
                          num_splits, p);
}

}  // namespace jax_mla
