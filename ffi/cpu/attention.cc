// flash_attention on the CPU: argument checks, parameter filling, and the
// hand-off to the shared driver (flash.cc). The checks repeat the Python ones
// (jax_mla/attention.py) so that no input reaches a kernel unchecked.
#include "ffi/common/bindings.h"
#include "ffi/common/check.h"
#include "ffi/common/op_args.h"
#include "ffi/common/params.h"
#include "ffi/cpu/flash.h"
#include "ffi/cpu/handlers.h"

namespace jax_mla::cpu {
namespace {

// The shared checks, then what the CPU kernels take: head dims that are
// multiples of kHeadDimMultiple up to kMaxHeadDim.
ffi::Error CheckAttention(ffi::AnyBuffer q, ffi::AnyBuffer k, const ffi::AnyBuffer* k_d,
                          int64_t k_fmt, ffi::AnyBuffer v, const ffi::AnyBuffer* v_d, int64_t v_fmt,
                          ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t num_splits,
                          AttentionParams* p, const ffi::Buffer<ffi::S32>* block_table = nullptr) {
  JAX_MLA_RETURN_IF_ERROR(AttentionArgs(q, k, k_d, k_fmt, v, v_d, v_fmt, q_pos, kv_len, out, lse,
                                        part_out, part_lse, num_splits, p, block_table));
  const int64_t Dk = p->dk, Dv = p->dv;
  JAX_MLA_CHECK(Dk % kHeadDimMultiple == 0 && Dv % kHeadDimMultiple == 0 && Dk > 0 && Dv > 0 &&
                    Dk <= kMaxHeadDim && Dv <= kMaxHeadDim,
                Unimplemented)
      << "flash_attention (CPU): head dims must be multiples of " << kHeadDimMultiple << " up to "
      << kMaxHeadDim << ", got Dk = " << Dk << ", Dv = " << Dv;
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
  p.scale = scale;
  p.causal = causal;
  return RunChecked(CheckAttention(q, k, nullptr, 0, v, nullptr, 0, q_pos, kv_len, out, lse,
                                   part_out, part_lse, num_splits, &p),
                    p, pool);
}

// K and V each float (format 0: its scales operand is an unused placeholder)
// or quantized.
ffi::Future FlashAttentionQuant(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                ffi::AnyBuffer k_d, ffi::AnyBuffer v, ffi::AnyBuffer v_d,
                                ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                                ffi::Result<ffi::AnyBuffer> out,
                                ffi::Result<ffi::Buffer<ffi::F32>> lse,
                                ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                                ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale,
                                bool causal, int64_t num_splits, int64_t k_fmt, int64_t v_fmt) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(
      CheckAttention(q, k, k_fmt ? &k_d : nullptr, k_fmt, v, v_fmt ? &v_d : nullptr, v_fmt, q_pos,
                     kv_len, out, lse, part_out, part_lse, num_splits, &p),
      p, pool);
}

// Over paged caches (the block table before q_pos).
ffi::Future FlashAttentionPaged(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                ffi::AnyBuffer v, ffi::Buffer<ffi::S32> block_table,
                                ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                                ffi::Result<ffi::AnyBuffer> out,
                                ffi::Result<ffi::Buffer<ffi::F32>> lse,
                                ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                                ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale,
                                bool causal, int64_t num_splits) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(CheckAttention(q, k, nullptr, 0, v, nullptr, 0, q_pos, kv_len, out, lse,
                                   part_out, part_lse, num_splits, &p, &block_table),
                    p, pool);
}

ffi::Future FlashAttentionQuantPaged(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                     ffi::AnyBuffer k_d, ffi::AnyBuffer v, ffi::AnyBuffer v_d,
                                     ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> q_pos,
                                     ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                                     ffi::Result<ffi::Buffer<ffi::F32>> lse,
                                     ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                                     ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale,
                                     bool causal, int64_t num_splits, int64_t k_fmt,
                                     int64_t v_fmt) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(
      CheckAttention(q, k, k_fmt ? &k_d : nullptr, k_fmt, v, v_fmt ? &v_d : nullptr, v_fmt, q_pos,
                     kv_len, out, lse, part_out, part_lse, num_splits, &p, &block_table),
      p, pool);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttention, FlashAttention, AttentionBinding<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttentionQuant, FlashAttentionQuant,
                              AttentionQuantBinding<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttentionPaged, FlashAttentionPaged,
                              AttentionPagedBinding<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttentionQuantPaged, FlashAttentionQuantPaged,
                              AttentionQuantPagedBinding<ffi::ThreadPool>());

}  // namespace jax_mla::cpu
