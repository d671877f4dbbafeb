// flash_mla on the CPU: one latent KV head; K is the whole latent row and V is
// dv columns of the same row starting at v_offset, read in place (no V copy).
// The latent cache is float (one buffer) or quantized (qs and its scales d,
// read in place too). Checks, parameters, then the shared driver (flash.cc).
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
ffi::Error CheckMla(ffi::AnyBuffer q, ffi::AnyBuffer kv, const ffi::AnyBuffer* kv_d, int64_t kv_fmt,
                    ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t dv, int64_t v_offset,
                    int64_t num_splits, AttentionParams* p,
                    const ffi::Buffer<ffi::S32>* block_table = nullptr) {
  JAX_MLA_RETURN_IF_ERROR(MlaArgs(q, kv, kv_d, kv_fmt, q_pos, kv_len, out, lse, part_out, part_lse,
                                  dv, v_offset, num_splits, p, block_table));
  JAX_MLA_CHECK(p->dk % kHeadDimMultiple == 0 && dv % kHeadDimMultiple == 0 && p->dk <= kMaxHeadDim,
                Unimplemented)
      << "flash_mla (CPU): Dk and dv must be multiples of " << kHeadDimMultiple
      << " with Dk <= " << kMaxHeadDim << ", got Dk = " << p->dk << ", dv = " << dv;
  return ffi::Error::Success();
}

ffi::Future FlashMla(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                     ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                     ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                     ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                     ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                     int64_t dv, int64_t v_offset, int64_t num_splits) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(CheckMla(q, kv, nullptr, 0, q_pos, kv_len, out, lse, part_out, part_lse, dv,
                             v_offset, num_splits, &p),
                    p, pool);
}

ffi::Future FlashMlaQuant(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                          ffi::AnyBuffer kv_d, ffi::Buffer<ffi::S32> q_pos,
                          ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                          int64_t dv, int64_t v_offset, int64_t num_splits, int64_t kv_fmt) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  ffi::Error checked =
      kv_fmt == 0 ? ffi::Error(ffi::ErrorCode::kInvalidArgument,
                               "flash_mla: the quantized-cache call needs a quantized format")
                  : CheckMla(q, kv, &kv_d, kv_fmt, q_pos, kv_len, out, lse, part_out, part_lse, dv,
                             v_offset, num_splits, &p);
  return RunChecked(std::move(checked), p, pool);
}

// Over a paged latent cache (the block table before q_pos).
ffi::Future FlashMlaPaged(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                          ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> q_pos,
                          ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                          int64_t dv, int64_t v_offset, int64_t num_splits) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(CheckMla(q, kv, nullptr, 0, q_pos, kv_len, out, lse, part_out, part_lse, dv,
                             v_offset, num_splits, &p, &block_table),
                    p, pool);
}

ffi::Future FlashMlaQuantPaged(
    ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::AnyBuffer kv_d,
    ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
    ffi::Result<ffi::Buffer<ffi::F32>> part_out, ffi::Result<ffi::Buffer<ffi::F32>> part_lse,
    float scale, bool causal, int64_t dv, int64_t v_offset, int64_t num_splits, int64_t kv_fmt) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  ffi::Error checked =
      kv_fmt == 0 ? ffi::Error(ffi::ErrorCode::kInvalidArgument,
                               "flash_mla: the quantized-cache call needs a quantized format")
                  : CheckMla(q, kv, &kv_d, kv_fmt, q_pos, kv_len, out, lse, part_out, part_lse, dv,
                             v_offset, num_splits, &p, &block_table);
  return RunChecked(std::move(checked), p, pool);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMla, FlashMla, MlaBinding<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMlaQuant, FlashMlaQuant, MlaQuantBinding<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMlaPaged, FlashMlaPaged, MlaPagedBinding<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMlaQuantPaged, FlashMlaQuantPaged,
                              MlaQuantPagedBinding<ffi::ThreadPool>());

}  // namespace jax_mla::cpu
