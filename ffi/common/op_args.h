// The arguments of flash_mla and flash_attention, checked the same way on
// every backend (docs/design.md, "Conventions": shared logic lives once, in ffi/common): q, the
// caches (float, or quantized as qs + scales), the head dims, positions,
// outputs and split partials, filled into AttentionParams. Each backend's
// handler calls these first, then rejects what it does not support yet
// (ffi::ErrorCode::kUnimplemented) and runs.
#pragma once

#include <cstdint>

#include "ffi/common/attention_args.h"
#include "ffi/common/cache_args.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/paged_args.h"
#include "ffi/common/params.h"

namespace jax_mla {

// kv_d is null for a float latent cache (kv_fmt 0). block_table is null for
// a contiguous cache; else kv holds pages [num_pages, page_size, Dk].
inline ffi::Error MlaArgs(ffi::AnyBuffer q, ffi::AnyBuffer kv, const ffi::AnyBuffer* kv_d,
                          int64_t kv_fmt, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t dv, int64_t v_offset,
                          int64_t num_splits, AttentionParams* p,
                          const ffi::Buffer<ffi::S32>* block_table = nullptr) {
  const auto qd = q.dimensions();
  JAX_MLA_CHECK(qd.size() == 4, InvalidArgument)
      << "flash_mla: q must have rank 4 [B, Sq, H, Dk], got shape " << ShapeString(qd);
  const auto qt = ToDType(q.element_type());
  JAX_MLA_CHECK(qt.has_value(), InvalidArgument)
      << "flash_mla: q must be float32, float16 or bfloat16";
  CacheShape cs;
  RowView rows;
  JAX_MLA_RETURN_IF_ERROR(CacheRows("flash_mla", "kv", kv, kv_d, kv_fmt, 3, &cs, &rows));
  const int64_t B = qd[0], Sq = qd[1], H = qd[2], Dk = qd[3];
  int64_t Skv = cs.seq;
  if (block_table != nullptr) {
    JAX_MLA_RETURN_IF_ERROR(
        PagedRows("flash_mla", "kv", *block_table, B, cs.batch, cs.seq, &rows, &Skv));
    cs.batch = B;  // every query batch row reads its own pages
  }
  JAX_MLA_CHECK(BatchSharable(B, cs.batch) && cs.dim == Dk, InvalidArgument)
      << "flash_mla: kv's logical shape " << ShapeString({cs.batch, cs.seq, cs.dim}) << " must be ["
      << B << ", Skv, " << Dk << "] to match q " << ShapeString(qd)
      << " (its batch may divide q's when a vmapped call shares the cache)";
  JAX_MLA_CHECK(dv > 0 && v_offset >= 0 && v_offset + dv <= Dk, InvalidArgument)
      << "flash_mla: the V slice [v_offset, v_offset + dv) = [" << v_offset << ", " << v_offset + dv
      << ") must lie inside the row of " << Dk;
  JAX_MLA_CHECK(!IsBlockFormat(rows.fmt) || v_offset % kQBlock == 0, InvalidArgument)
      << "flash_mla: v_offset " << v_offset << " must fall on a block boundary (a multiple of "
      << kQBlock << ") of the " << QFormatName(rows.fmt) << " cache";
  p->batch = B;
  p->kv_batch = cs.batch;
  p->seq_q = Sq;
  p->heads_q = H;
  p->heads_kv = 1;
  p->seq_kv = Skv;
  p->dk = Dk;
  p->dv = dv;
  p->q = q.untyped_data();
  p->q_dtype = *qt;
  p->k = rows;
  p->v = ColumnSlice(rows, v_offset);  // the same rows, shifted: no V copy
  p->v_in_k = v_offset;
  return SetPositionsAndOutputs("flash_mla", q_pos, kv_len, out, lse, part_out, part_lse,
                                num_splits, p);
}

// k_d / v_d are null for a float k / v (format 0).
inline ffi::Error AttentionArgs(ffi::AnyBuffer q, ffi::AnyBuffer k, const ffi::AnyBuffer* k_d,
                                int64_t k_fmt, ffi::AnyBuffer v, const ffi::AnyBuffer* v_d,
                                int64_t v_fmt, ffi::Buffer<ffi::S32> q_pos,
                                ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                                ffi::Result<ffi::Buffer<ffi::F32>> lse,
                                ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                                ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t num_splits,
                                AttentionParams* p,
                                const ffi::Buffer<ffi::S32>* block_table = nullptr) {
  const auto qd = q.dimensions();
  JAX_MLA_CHECK(qd.size() == 4, InvalidArgument)
      << "flash_attention: q must have rank 4 [B, Sq, Hq, Dk], got shape " << ShapeString(qd);
  const auto qt = ToDType(q.element_type());
  JAX_MLA_CHECK(qt.has_value(), InvalidArgument)
      << "flash_attention: q must be float32, float16 or bfloat16";
  CacheShape ks, vs;
  RowView k_rows, v_rows;
  JAX_MLA_RETURN_IF_ERROR(CacheRows("flash_attention", "k", k, k_d, k_fmt, 4, &ks, &k_rows));
  JAX_MLA_RETURN_IF_ERROR(CacheRows("flash_attention", "v", v, v_d, v_fmt, 4, &vs, &v_rows));
  const int64_t B = qd[0], Sq = qd[1], Hq = qd[2], Dk = qd[3];
  int64_t Skv = ks.seq;
  const int64_t Hkv = ks.heads, Dv = vs.dim;
  if (block_table != nullptr) {  // k and v are pages [num_pages, page_size, Hkv, D]
    JAX_MLA_CHECK(ks.batch == vs.batch && ks.seq == vs.seq, InvalidArgument)
        << "flash_attention: k and v pages must have the same [num_pages, page_size], got "
        << ShapeString({ks.batch, ks.seq}) << " and " << ShapeString({vs.batch, vs.seq});
    int64_t unused;
    JAX_MLA_RETURN_IF_ERROR(
        PagedRows("flash_attention", "k", *block_table, B, ks.batch, ks.seq, &k_rows, &Skv));
    JAX_MLA_RETURN_IF_ERROR(
        PagedRows("flash_attention", "v", *block_table, B, vs.batch, vs.seq, &v_rows, &unused));
    ks.seq = vs.seq = Skv;
    ks.batch = vs.batch = B;
  }
  const auto k_shape = ShapeString({ks.batch, ks.seq, ks.heads, ks.dim});
  const auto v_shape = ShapeString({vs.batch, vs.seq, vs.heads, vs.dim});
  JAX_MLA_CHECK(ks.batch == vs.batch && BatchSharable(B, ks.batch), InvalidArgument)
      << "flash_attention: batch of k " << ks.batch << " and v " << vs.batch << " must equal q's "
      << B << " (or divide it, when a vmapped call shares the cache)";
  JAX_MLA_CHECK(ks.dim == Dk, InvalidArgument)
      << "flash_attention: k head dim " << ks.dim << " must equal q's " << Dk;
  JAX_MLA_CHECK(vs.seq == Skv && vs.heads == Hkv, InvalidArgument)
      << "flash_attention: v shape " << v_shape << " must match k " << k_shape << " in Skv and Hkv";
  JAX_MLA_CHECK(Hkv > 0 && Hq % Hkv == 0, InvalidArgument)
      << "flash_attention: Hq = " << Hq << " must be a multiple of Hkv = " << Hkv;
  p->batch = B;
  p->kv_batch = ks.batch;
  p->seq_q = Sq;
  p->heads_q = Hq;
  p->heads_kv = Hkv;
  p->seq_kv = Skv;
  p->dk = Dk;
  p->dv = Dv;
  p->q = q.untyped_data();
  p->q_dtype = *qt;
  p->k = k_rows;
  p->v = v_rows;
  return SetPositionsAndOutputs("flash_attention", q_pos, kv_len, out, lse, part_out, part_lse,
                                num_splits, p);
}

}  // namespace jax_mla
