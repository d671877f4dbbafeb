// flash_attention on the CPU: argument checks, parameter filling, and the
// hand-off to the shared driver (flash.cc). The checks repeat the Python ones
// (jax_mla/attention.py) so that no input reaches a kernel unchecked.
#include "ffi/cpu/handlers.h"

#include "ffi/common/attention_args.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"
#include "ffi/cpu/flash.h"

namespace jax_mla::cpu {
namespace {

ffi::Error CheckAttention(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t num_splits,
                          AttentionParams* p) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  JAX_MLA_CHECK(qd.size() == 4, InvalidArgument)
      << "flash_attention: q must have rank 4 [B, Sq, Hq, Dk], got shape " << ShapeString(qd);
  JAX_MLA_CHECK(kd.size() == 4, InvalidArgument)
      << "flash_attention: k must have rank 4 [B, Skv, Hkv, Dk], got shape " << ShapeString(kd);
  JAX_MLA_CHECK(vd.size() == 4, InvalidArgument)
      << "flash_attention: v must have rank 4 [B, Skv, Hkv, Dv], got shape " << ShapeString(vd);
  const auto qt = ToDType(q.element_type()), kt = ToDType(k.element_type()),
             vt = ToDType(v.element_type());
  JAX_MLA_CHECK(qt && kt && vt, InvalidArgument)
      << "flash_attention: q, k and v must be float32, float16 or bfloat16";
  const int64_t B = qd[0], Sq = qd[1], Hq = qd[2], Dk = qd[3];
  const int64_t Skv = kd[1], Hkv = kd[2], Dv = vd[3];
  JAX_MLA_CHECK(kd[0] == vd[0] && BatchSharable(B, kd[0]), InvalidArgument)
      << "flash_attention: batch of k " << kd[0] << " and v " << vd[0] << " must equal q's " << B
      << " (or divide it, when a vmapped call shares the cache)";
  JAX_MLA_CHECK(kd[3] == Dk, InvalidArgument)
      << "flash_attention: k head dim " << kd[3] << " must equal q's " << Dk;
  JAX_MLA_CHECK(vd[1] == Skv && vd[2] == Hkv, InvalidArgument)
      << "flash_attention: v shape " << ShapeString(vd) << " must match k " << ShapeString(kd)
      << " in Skv and Hkv";
  JAX_MLA_CHECK(Hkv > 0 && Hq % Hkv == 0, InvalidArgument)
      << "flash_attention: Hq = " << Hq << " must be a multiple of Hkv = " << Hkv;
  JAX_MLA_CHECK(Dk % 16 == 0 && Dv % 16 == 0 && Dk > 0 && Dv > 0 && Dk <= kMaxHeadDim &&
                    Dv <= kMaxHeadDim,
                Unimplemented)
      << "flash_attention (CPU): head dims must be multiples of 16 up to " << kMaxHeadDim
      << ", got Dk = " << Dk << ", Dv = " << Dv;
  p->batch = B;
  p->kv_batch = kd[0];
  p->seq_q = Sq;
  p->heads_q = Hq;
  p->heads_kv = Hkv;
  p->seq_kv = Skv;
  p->dk = Dk;
  p->dv = Dv;
  p->q = q.untyped_data();
  p->q_dtype = *qt;
  p->k = RowView{k.untyped_data(), *kt, Skv * Hkv * Dk, Hkv * Dk, Dk};
  p->v = RowView{v.untyped_data(), *vt, Skv * Hkv * Dv, Hkv * Dv, Dv};
  return SetPositionsAndOutputs("flash_attention", q_pos, kv_len, out, lse, part_out, part_lse,
                                num_splits, p);
}

ffi::Future FlashAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::Buffer<ffi::S32> q_pos,
                           ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::Buffer<ffi::F32>> lse,
                           ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                           ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                           int64_t num_splits) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(
      CheckAttention(q, k, v, q_pos, kv_len, out, lse, part_out, part_lse, num_splits, &p), p,
      pool);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttention, FlashAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // q [B, Sq, Hq, Dk]
                                  .Arg<ffi::AnyBuffer>()           // k [B, Skv, Hkv, Dk]
                                  .Arg<ffi::AnyBuffer>()           // v [B, Skv, Hkv, Dv]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // q_pos [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // kv_len [B]
                                  .Ret<ffi::AnyBuffer>()           // out [B, Sq, Hq, Dv]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse [B, Hq, Sq]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // part_out [B, ns, Sq, Hq, Dv] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // part_lse [B, ns, Sq, Hq] or [0]
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("num_splits"));

}  // namespace jax_mla::cpu
