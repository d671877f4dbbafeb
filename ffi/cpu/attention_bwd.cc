// The attention backward on the CPU (jax_mla_flash_attention_bwd; the MLA
// backward reuses it with one KV head): argument checks, then the driver
// (flash_bwd.cc). The checks repeat the Python ones so that no input reaches
// a kernel unchecked.
#include "ffi/common/attention_bwd_args.h"
#include "ffi/common/bindings.h"
#include "ffi/common/check.h"
#include "ffi/common/params.h"
#include "ffi/cpu/flash_bwd.h"
#include "ffi/cpu/handlers.h"
#include "ffi/cpu/kernels.h"

namespace jax_mla::cpu {
namespace {

// The shared checks, then the head dims the CPU kernels take.
ffi::Error CheckAttentionBwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                             ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> q_pos,
                             ffi::Buffer<ffi::S32> kv_len,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_q,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_k,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_v, AttentionBwdParams* p) {
  JAX_MLA_RETURN_IF_ERROR(
      AttentionBwdArgs(q, k, v, dout, lse, delta, q_pos, kv_len, grad_q, grad_k, grad_v, p));
  const int64_t Dk = p->dk, Dv = p->dv;
  JAX_MLA_CHECK(Dk % kHeadDimMultiple == 0 && Dv % kHeadDimMultiple == 0 && Dk > 0 && Dv > 0 &&
                    Dk <= kMaxHeadDim && Dv <= kMaxHeadDim,
                Unimplemented)
      << "flash_attention_bwd (CPU): head dims must be multiples of " << kHeadDimMultiple
      << " up to " << kMaxHeadDim << ", got Dk = " << Dk << ", Dv = " << Dv;
  return ffi::Error::Success();
}

ffi::Future FlashAttentionBwd(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                              ffi::AnyBuffer v, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                              ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> q_pos,
                              ffi::Buffer<ffi::S32> kv_len,
                              ffi::Result<ffi::Buffer<ffi::F32>> grad_q,
                              ffi::Result<ffi::Buffer<ffi::F32>> grad_k,
                              ffi::Result<ffi::Buffer<ffi::F32>> grad_v, float scale, bool causal) {
  AttentionBwdParams p;
  p.scale = scale;
  p.causal = causal;
  return RunBackwardChecked(
      CheckAttentionBwd(q, k, v, dout, lse, delta, q_pos, kv_len, grad_q, grad_k, grad_v, &p), p,
      pool);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttentionBwd, FlashAttentionBwd,
                              AttentionBwdBinding<ffi::ThreadPool>());

}  // namespace jax_mla::cpu
