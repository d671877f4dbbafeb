// The arguments of the attention backward (jax_mla_flash_attention_bwd),
// checked the same way on every backend and filled into AttentionBwdParams.
// Each backend's handler calls this first, then rejects what it does not
// support (ffi::ErrorCode::kUnimplemented) and runs. Python checks all of it
// first; this is for direct calls of the target (docs/design.md, "Conventions").
#pragma once

#include <cstdint>

#include "ffi/common/cache_args.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"

namespace jax_mla {

inline ffi::Error AttentionBwdArgs(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                   ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                                   ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> q_pos,
                                   ffi::Buffer<ffi::S32> kv_len,
                                   ffi::Result<ffi::Buffer<ffi::F32>> grad_q,
                                   ffi::Result<ffi::Buffer<ffi::F32>> grad_k,
                                   ffi::Result<ffi::Buffer<ffi::F32>> grad_v,
                                   AttentionBwdParams* p) {
  constexpr const char* op = "flash_attention_bwd";
  const auto qd = q.dimensions(), od = dout.dimensions();
  JAX_MLA_CHECK(qd.size() == 4, InvalidArgument)
      << op << ": q must have rank 4 [B, Sq, Hq, Dk], got shape " << ShapeString(qd);
  JAX_MLA_CHECK(od.size() == 4, InvalidArgument)
      << op << ": dout must have rank 4 [B, Sq, Hq, Dv], got shape " << ShapeString(od);
  JAX_MLA_CHECK(lse.dimensions().size() == 3 && delta.dimensions().size() == 3, InvalidArgument)
      << op << ": lse and delta must have rank 3 [B, Hq, Sq], got shapes "
      << ShapeString(lse.dimensions()) << " and " << ShapeString(delta.dimensions());
  const auto qt = ToDType(q.element_type()), ot = ToDType(dout.element_type());
  JAX_MLA_CHECK(qt.has_value(), InvalidArgument)
      << op << ": q must be float32, float16 or bfloat16";
  JAX_MLA_CHECK(ot.has_value(), InvalidArgument)
      << op << ": dout must be float32, float16 or bfloat16";
  // Ranks and dtypes of k and v (float caches only).
  CacheShape ks, vs;
  RowView k_rows, v_rows;
  JAX_MLA_RETURN_IF_ERROR(CacheRows(op, "k", k, nullptr, 0, 4, &ks, &k_rows));
  JAX_MLA_RETURN_IF_ERROR(CacheRows(op, "v", v, nullptr, 0, 4, &vs, &v_rows));

  const int64_t B = qd[0], Sq = qd[1], Hq = qd[2], Dk = qd[3];
  const int64_t Skv = ks.seq, Hkv = ks.heads, Dv = vs.dim;
  JAX_MLA_CHECK(ks.batch == B && vs.batch == B, InvalidArgument)
      << op << ": batch of k " << ks.batch << " and v " << vs.batch << " must equal q's " << B;
  JAX_MLA_CHECK(ks.dim == Dk, InvalidArgument)
      << op << ": k head dim " << ks.dim << " must equal q's " << Dk;
  JAX_MLA_CHECK(vs.seq == Skv && vs.heads == Hkv, InvalidArgument)
      << op << ": v shape " << ShapeString({vs.batch, vs.seq, vs.heads, vs.dim}) << " must match k "
      << ShapeString({ks.batch, ks.seq, ks.heads, ks.dim}) << " in Skv and Hkv";
  JAX_MLA_CHECK(Hkv > 0 && Hq % Hkv == 0, InvalidArgument)
      << op << ": Hq = " << Hq << " must be a multiple of Hkv = " << Hkv;
  JAX_MLA_CHECK(ShapeIs(od, {B, Sq, Hq, Dv}), InvalidArgument)
      << op << ": dout must be " << ShapeString({B, Sq, Hq, Dv}) << " (q's [B, Sq, Hq] and v's Dv)"
      << ", got " << ShapeString(od);
  JAX_MLA_CHECK(ShapeIs(lse.dimensions(), {B, Hq, Sq}) && ShapeIs(delta.dimensions(), {B, Hq, Sq}),
                InvalidArgument)
      << op << ": lse and delta must be " << ShapeString({B, Hq, Sq}) << ", got "
      << ShapeString(lse.dimensions()) << " and " << ShapeString(delta.dimensions());
  JAX_MLA_CHECK(ShapeIs(q_pos.dimensions(), {B}) && ShapeIs(kv_len.dimensions(), {B}),
                InvalidArgument)
      << op << ": q_pos and kv_len must have shape [" << B << "], got "
      << ShapeString(q_pos.dimensions()) << " and " << ShapeString(kv_len.dimensions());
  JAX_MLA_CHECK(ShapeIs(grad_q->dimensions(), {B, Sq, Hq, Dk}) &&
                    ShapeIs(grad_k->dimensions(), {B, Skv, Hkv, Dk}) &&
                    ShapeIs(grad_v->dimensions(), {B, Skv, Hkv, Dv}),
                InvalidArgument)
      << op << ": results must be dq " << ShapeString({B, Sq, Hq, Dk}) << ", dk "
      << ShapeString({B, Skv, Hkv, Dk}) << ", dv " << ShapeString({B, Skv, Hkv, Dv})
      << " float32, got " << ShapeString(grad_q->dimensions()) << ", "
      << ShapeString(grad_k->dimensions()) << ", " << ShapeString(grad_v->dimensions());

  p->batch = B;
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
  p->dout = dout.untyped_data();
  p->dout_dtype = *ot;
  p->lse = lse.typed_data();
  p->delta = delta.typed_data();
  p->q_pos = q_pos.typed_data();
  p->kv_len = kv_len.typed_data();
  p->grad_q = grad_q->typed_data();
  p->grad_k = grad_k->typed_data();
  p->grad_v = grad_v->typed_data();
  return ffi::Error::Success();
}

}  // namespace jax_mla
