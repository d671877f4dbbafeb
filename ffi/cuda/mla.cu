// flash_mla on CUDA: checks, parameters, dispatch on (dtype, rows per block),
// then the combine kernel when the keys are split. Same FFI signature as the
// CPU handler (ffi/cpu/mla.cc), so one Python wrapper serves both.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ffi/common/bindings.h"
#include "ffi/common/check.h"
#include "ffi/common/op_args.h"
#include "ffi/common/params.h"
#include "ffi/cuda/combine.h"
#include "ffi/cuda/cuda_check.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/mla_kernel.cuh"

namespace jax_mla::cuda {

// Instantiated in ffi/cuda/inst/ (one file each).
extern template cudaError_t LaunchMla<__nv_bfloat16, 1>(const AttentionParams&, cudaStream_t);
extern template cudaError_t LaunchMla<__nv_bfloat16, 4>(const AttentionParams&, cudaStream_t);
extern template cudaError_t LaunchMla<__half, 1>(const AttentionParams&, cudaStream_t);
extern template cudaError_t LaunchMla<__half, 4>(const AttentionParams&, cudaStream_t);

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

template <typename T>
cudaError_t MlaDispatch(const AttentionParams& p, cudaStream_t stream) {
  return MlaGroups(p.seq_q * p.heads_q) == 1 ? LaunchMla<T, 1>(p, stream)
                                              : LaunchMla<T, 4>(p, stream);
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
  if (p.batch == 0 || p.seq_q == 0 || p.heads_q == 0) return ffi::Error::Success();
  JAX_MLA_CHECK(p.num_splits <= 65535, InvalidArgument)
      << "flash_mla (CUDA): num_splits must be <= 65535, got " << p.num_splits;
  if (p.q_dtype == DType::kBF16)
    JAX_MLA_CUDA_RETURN_IF_ERROR(MlaDispatch<__nv_bfloat16>(p, stream));
  else
    JAX_MLA_CUDA_RETURN_IF_ERROR(MlaDispatch<__half>(p, stream));
  if (p.num_splits > 1) JAX_MLA_CUDA_RETURN_IF_ERROR(LaunchCombine(p, stream));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMla, FlashMla, MlaBinding<ffi::PlatformStream<cudaStream_t>>());

}  // namespace jax_mla::cuda
