// flash_attention on the CPU: argument checks, parameter filling, and the
// hand-off to the shared driver (flash.cc). The checks repeat the Python ones
// (jax_mla/attention.py) so that no input reaches a kernel unchecked.
#include "ffi/cpu/handlers.h"

#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"
#include "ffi/cpu/flash.h"

namespace jax_mla::cpu {
namespace {

constexpr int64_t kMaxHeadDim = 576;

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
  JAX_MLA_CHECK(ShapeIs(q_pos.dimensions(), {B}) && ShapeIs(kv_len.dimensions(), {B}),
                InvalidArgument)
      << "flash_attention: q_pos and kv_len must have shape [" << B << "], got "
      << ShapeString(q_pos.dimensions()) << " and " << ShapeString(kv_len.dimensions());
  JAX_MLA_CHECK(Dk % 16 == 0 && Dv % 16 == 0 && Dk > 0 && Dv > 0 && Dk <= kMaxHeadDim &&
                    Dv <= kMaxHeadDim,
                Unimplemented)
      << "flash_attention (CPU): head dims must be multiples of 16 up to " << kMaxHeadDim
      << ", got Dk = " << Dk << ", Dv = " << Dv;
  JAX_MLA_CHECK(out->element_type() == q.element_type() && ShapeIs(out->dimensions(), {B, Sq, Hq, Dv}),
                InvalidArgument)
      << "flash_attention: output must be " << ShapeString({B, Sq, Hq, Dv}) << " in q's dtype, got "
      << ShapeString(out->dimensions());
  JAX_MLA_CHECK(ShapeIs(lse->dimensions(), {B, Hq, Sq}), InvalidArgument)
      << "flash_attention: lse must be " << ShapeString({B, Hq, Sq}) << ", got "
      << ShapeString(lse->dimensions());
  JAX_MLA_RETURN_IF_ERROR(CheckSplitPartials("flash_attention", num_splits, B, Sq, Hq, Dv,
                                             part_out->dimensions(), part_lse->dimensions()));

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
  p->q_pos = q_pos.typed_data();
  p->kv_len = kv_len.typed_data();
  p->out = out->untyped_data();
  p->lse = lse->typed_data();
  p->num_splits = num_splits;
  p->split_len = SplitLength(Skv, num_splits);
  p->part_out = part_out->typed_data();
  p->part_lse = part_lse->typed_data();
  return ffi::Error::Success();
}

ffi::Future FlashAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::Buffer<ffi::S32> q_pos,
                           ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::Buffer<ffi::F32>> lse,
                           ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                           ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                           int64_t num_splits) {
  AttentionParams p;
  ffi::Error error =
      CheckAttention(q, k, v, q_pos, kv_len, out, lse, part_out, part_lse, num_splits, &p);
  if (error.failure()) return ReadyFuture(std::move(error));
  const KernelTable* kernels = CurrentKernels(&error);
  if (kernels == nullptr) return ReadyFuture(std::move(error));
  p.scale = scale;
  p.causal = causal;
  return RunFlash(p, *kernels, pool);
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
