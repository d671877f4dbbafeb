// flash_mla on CUDA: checks, parameters, dispatch on (dtype, rows per block,
// cache format), then the combine kernel when the keys are split. Same FFI
// signatures as the CPU handlers (ffi/cpu/mla.cc), so one Python wrapper
// serves both: jax_mla_flash_mla (float cache) and jax_mla_flash_mla_quant
// (q8_0 / q8_kv cache as qs and scales, read in place; q6_0 is not supported
// on CUDA yet).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ffi/common/bindings.h"
#include "ffi/common/check.h"
#include "ffi/common/op_args.h"
#include "ffi/common/params.h"
#include "ffi/cuda/combine.h"
#include "ffi/cuda/cuda_check.h"
#include "ffi/cuda/device.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/mla_kernel.cuh"
#include "ffi/cuda/mla_quant_kernel.cuh"
#include "ffi/cuda/mla_sm90_kernel.cuh"

namespace jax_mla::cuda {

// Instantiated in ffi/cuda/inst/ (one file each).
extern template cudaError_t LaunchMla<__nv_bfloat16, 1>(const AttentionParams&, cudaStream_t);
extern template cudaError_t LaunchMla<__nv_bfloat16, 4>(const AttentionParams&, cudaStream_t);
extern template cudaError_t LaunchMla<__half, 1>(const AttentionParams&, cudaStream_t);
extern template cudaError_t LaunchMla<__half, 4>(const AttentionParams&, cudaStream_t);
extern template cudaError_t LaunchMlaSm90<__nv_bfloat16>(const AttentionParams&, cudaStream_t);
extern template cudaError_t LaunchMlaSm90<__half>(const AttentionParams&, cudaStream_t);
#define JAX_MLA_EXTERN_QUANT(T, F)                                                       \
  extern template cudaError_t LaunchMlaQuant<T, 1, F>(const AttentionParams&, cudaStream_t); \
  extern template cudaError_t LaunchMlaQuant<T, 4, F>(const AttentionParams&, cudaStream_t);
JAX_MLA_EXTERN_QUANT(__nv_bfloat16, QFormat::kQ8_0)
JAX_MLA_EXTERN_QUANT(__nv_bfloat16, QFormat::kQ8KV)
JAX_MLA_EXTERN_QUANT(__half, QFormat::kQ8_0)
JAX_MLA_EXTERN_QUANT(__half, QFormat::kQ8KV)
#undef JAX_MLA_EXTERN_QUANT

namespace {

// The shared checks, then what the CUDA kernel takes: f16 or bf16 for both q
// and kv, DeepSeek's latent layout.
ffi::Error CheckMla(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> q_pos,
                    ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::Buffer<ffi::F32>> lse,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t dv, int64_t v_offset,
                    int64_t num_splits, AttentionParams* p) {
  JAX_MLA_RETURN_IF_ERROR(MlaArgs(q, kv, nullptr, 0, q_pos, kv_len, out, lse, part_out,
                                  part_lse, dv, v_offset, num_splits, p));
  JAX_MLA_CHECK(p->q_dtype == p->k.dtype && p->q_dtype != DType::kF32, Unimplemented)
      << "flash_mla (CUDA): q and kv must both be float16 or both bfloat16, got "
      << DTypeName(p->q_dtype) << " and " << DTypeName(p->k.dtype);
  JAX_MLA_CHECK(p->dk == kMlaDk && dv == kMlaDv && v_offset == 0, Unimplemented)
      << "flash_mla (CUDA): supports Dk = 576, dv = 512, v_offset = 0, got Dk = " << p->dk
      << ", dv = " << dv << ", v_offset = " << v_offset;
  return ffi::Error::Success();
}

// The quantized cache's checks: the shared ones, then q float16 or bfloat16,
// an 8-bit format, DeepSeek's latent layout.
ffi::Error CheckMlaQuant(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::AnyBuffer kv_d,
                         int64_t kv_fmt, ffi::Buffer<ffi::S32> q_pos,
                         ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> lse,
                         ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                         ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t dv,
                         int64_t v_offset, int64_t num_splits, AttentionParams* p) {
  JAX_MLA_CHECK(kv_fmt != 0, InvalidArgument)
      << "flash_mla: the quantized-cache call needs a quantized format";
  JAX_MLA_RETURN_IF_ERROR(MlaArgs(q, kv, &kv_d, kv_fmt, q_pos, kv_len, out, lse, part_out,
                                  part_lse, dv, v_offset, num_splits, p));
  JAX_MLA_CHECK(p->q_dtype != DType::kF32, Unimplemented)
      << "flash_mla (CUDA): q must be float16 or bfloat16 over a quantized cache, got "
      << DTypeName(p->q_dtype);
  JAX_MLA_CHECK(p->k.fmt == QFormat::kQ8_0 || p->k.fmt == QFormat::kQ8KV, Unimplemented)
      << "flash_mla (CUDA): quantized caches q8_0 and q8_kv are supported, got "
      << QFormatName(p->k.fmt);
  JAX_MLA_CHECK(p->dk == kMlaDk && dv == kMlaDv && v_offset == 0, Unimplemented)
      << "flash_mla (CUDA): supports Dk = 576, dv = 512, v_offset = 0, got Dk = " << p->dk
      << ", dv = " << dv << ", v_offset = " << v_offset;
  return ffi::Error::Success();
}

// 16-row blocks: mma.sync. 64-row blocks: wgmma on Hopper, mma.sync elsewhere.
template <typename T>
cudaError_t MlaDispatch(const AttentionParams& p, cudaStream_t stream) {
  if (MlaGroups(p.seq_q * p.heads_q) == 1) return LaunchMla<T, 1>(p, stream);
  return UseSm90Kernels() ? LaunchMlaSm90<T>(p, stream) : LaunchMla<T, 4>(p, stream);
}

template <typename T, QFormat F>
cudaError_t MlaQuantDispatch(const AttentionParams& p, cudaStream_t stream) {
  return MlaGroups(p.seq_q * p.heads_q) == 1 ? LaunchMlaQuant<T, 1, F>(p, stream)
                                              : LaunchMlaQuant<T, 4, F>(p, stream);
}

template <typename T>
cudaError_t MlaQuantDispatch(const AttentionParams& p, cudaStream_t stream) {
  return p.k.fmt == QFormat::kQ8_0 ? MlaQuantDispatch<T, QFormat::kQ8_0>(p, stream)
                                   : MlaQuantDispatch<T, QFormat::kQ8KV>(p, stream);
}

// Runs a checked call: the main kernel, then the combine when the keys are split.
ffi::Error RunMla(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seq_q == 0 || p.heads_q == 0) return ffi::Error::Success();
  JAX_MLA_CHECK(p.num_splits <= 65535, InvalidArgument)
      << "flash_mla (CUDA): num_splits must be <= 65535, got " << p.num_splits;
  const bool bf16 = p.q_dtype == DType::kBF16;
  if (p.k.fmt == QFormat::kNone)
    JAX_MLA_CUDA_RETURN_IF_ERROR(bf16 ? MlaDispatch<__nv_bfloat16>(p, stream)
                                      : MlaDispatch<__half>(p, stream));
  else
    JAX_MLA_CUDA_RETURN_IF_ERROR(bf16 ? MlaQuantDispatch<__nv_bfloat16>(p, stream)
                                      : MlaQuantDispatch<__half>(p, stream));
  if (p.num_splits > 1) JAX_MLA_CUDA_RETURN_IF_ERROR(LaunchCombine(p, stream));
  return ffi::Error::Success();
}

ffi::Error FlashMla(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                    ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                    int64_t dv, int64_t v_offset, int64_t num_splits) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(CheckMla(q, kv, q_pos, kv_len, out, lse, part_out, part_lse, dv,
                                   v_offset, num_splits, &p));
  return RunMla(p, stream);
}

ffi::Error FlashMlaQuant(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                         ffi::AnyBuffer kv_d, ffi::Buffer<ffi::S32> q_pos,
                         ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> lse,
                         ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                         ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                         int64_t dv, int64_t v_offset, int64_t num_splits, int64_t kv_fmt) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(CheckMlaQuant(q, kv, kv_d, kv_fmt, q_pos, kv_len, out, lse, part_out,
                                        part_lse, dv, v_offset, num_splits, &p));
  return RunMla(p, stream);
}

}  // namespace

int MlaBlocksPerSm(int64_t rows, int64_t kv_fmt) {
  const bool quant = kv_fmt == int64_t(QFormat::kQ8_0) || kv_fmt == int64_t(QFormat::kQ8KV);
  return quant && MlaGroups(rows) == 1 ? MlaQuantShape<1, QFormat::kQ8_0>::kMinBlocks : 1;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMla, FlashMla, MlaBinding<ffi::PlatformStream<cudaStream_t>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMlaQuant, FlashMlaQuant,
                              MlaQuantBinding<ffi::PlatformStream<cudaStream_t>>());

}  // namespace jax_mla::cuda
