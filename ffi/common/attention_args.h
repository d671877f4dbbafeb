// Checks and parameter filling that flash_attention and flash_mla share on
// every backend: positions, outputs and split-KV partials. Each op's handler
// checks its own inputs (q, k/v or kv) first, then calls this.
#pragma once

#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"

namespace jax_mla {

// Expects p->batch, seq_q, heads_q, dv and q_dtype to be set already.
inline ffi::Error SetPositionsAndOutputs(const char* op, ffi::Buffer<ffi::S32> q_pos,
                                         ffi::Buffer<ffi::S32> kv_len,
                                         ffi::Result<ffi::AnyBuffer> out,
                                         ffi::Result<ffi::Buffer<ffi::F32>> lse,
                                         ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                                         ffi::Result<ffi::Buffer<ffi::F32>> part_lse,
                                         int64_t num_splits, AttentionParams* p) {
  const int64_t B = p->batch, Sq = p->seq_q, H = p->heads_q, Dv = p->dv;
  JAX_MLA_CHECK(ShapeIs(q_pos.dimensions(), {B}) && ShapeIs(kv_len.dimensions(), {B}),
                InvalidArgument)
      << op << ": q_pos and kv_len must have shape [" << B << "], got "
      << ShapeString(q_pos.dimensions()) << " and " << ShapeString(kv_len.dimensions());
  JAX_MLA_CHECK(
      ToDType(out->element_type()) == p->q_dtype && ShapeIs(out->dimensions(), {B, Sq, H, Dv}),
      InvalidArgument)
      << op << ": output must be " << ShapeString({B, Sq, H, Dv}) << " in q's dtype "
      << DTypeName(p->q_dtype) << ", got " << ShapeString(out->dimensions());
  JAX_MLA_CHECK(ShapeIs(lse->dimensions(), {B, H, Sq}), InvalidArgument)
      << op << ": lse must be " << ShapeString({B, H, Sq}) << ", got "
      << ShapeString(lse->dimensions());
  JAX_MLA_CHECK(num_splits >= 1, InvalidArgument)
      << op << ": num_splits must be >= 1, got " << num_splits;
  // The split-KV partials are [B, ns, Sq, H, Dv] and [B, ns, Sq, H] float32
  // when the keys are split; unused (typically [0]) with one split.
  JAX_MLA_CHECK(num_splits == 1 || (ShapeIs(part_out->dimensions(), {B, num_splits, Sq, H, Dv}) &&
                                    ShapeIs(part_lse->dimensions(), {B, num_splits, Sq, H})),
                InvalidArgument)
      << op << ": split partials must be " << ShapeString({B, num_splits, Sq, H, Dv}) << " and "
      << ShapeString({B, num_splits, Sq, H}) << ", got " << ShapeString(part_out->dimensions())
      << " and " << ShapeString(part_lse->dimensions());

  p->q_pos = q_pos.typed_data();
  p->kv_len = kv_len.typed_data();
  p->out = out->untyped_data();
  p->lse = lse->typed_data();
  p->num_splits = num_splits;
  p->part_out = part_out->typed_data();
  p->part_lse = part_lse->typed_data();
  return ffi::Error::Success();
}

}  // namespace jax_mla
