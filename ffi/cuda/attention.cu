// flash_attention on CUDA: checks, parameters, dispatch on explicit (Dk, Dv)
// pairs and the dtype, then the combine kernel when the keys are split. Same
// FFI signature as the CPU handler (ffi/cpu/attention.cc).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ffi/common/bindings.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/op_args.h"
#include "ffi/common/params.h"
#include "ffi/cuda/attention_kernel.cuh"
#include "ffi/cuda/attention_sm90.cuh"
#include "ffi/cuda/combine.h"
#include "ffi/cuda/cuda_check.h"
#include "ffi/cuda/device.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/mla_kernel.cuh"

// The (Dk, Dv) pairs with a kernel (DESIGN.md): DeepSeek's 192/128, then equal dims.
#define JAX_MLA_ATTENTION_HEAD_DIMS(X) X(192, 128) X(64, 64) X(128, 128) X(256, 256)
// The pairs the sm_90a wgmma kernel also takes (attention_sm90.cuh).
#define JAX_MLA_ATTENTION_SM90_HEAD_DIMS(X) X(192, 128) X(128, 128)

namespace jax_mla::cuda {

// Instantiated in ffi/cuda/inst/ (one file each).
#define JAX_MLA_EXTERN(DK, DV)                                                                  \
  extern template cudaError_t LaunchAttention<__nv_bfloat16, DK, DV>(const AttentionParams&,   \
                                                                     cudaStream_t);            \
  extern template cudaError_t LaunchAttention<__half, DK, DV>(const AttentionParams&, cudaStream_t);
JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_EXTERN)
#undef JAX_MLA_EXTERN
#define JAX_MLA_EXTERN_SM90(DK, DV)                                                            \
  extern template cudaError_t LaunchAttentionSm90<__nv_bfloat16, DK, DV>(                    \
      const AttentionParams&, cudaStream_t);                                                 \
  extern template cudaError_t LaunchAttentionSm90<__half, DK, DV>(const AttentionParams&,    \
                                                                  cudaStream_t);
JAX_MLA_ATTENTION_SM90_HEAD_DIMS(JAX_MLA_EXTERN_SM90)
#undef JAX_MLA_EXTERN_SM90

int KvTile(int64_t dk) {
  switch (dk) {
    case 576: return kMlaKeys;
#define JAX_MLA_TILE(DK, DV) \
    case DK: return AttnShape<DK, DV>::kKeys;
    JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_TILE)
#undef JAX_MLA_TILE
  }
  return 64;
}

int64_t WorkItems(int64_t batch, int64_t seq_q, int64_t heads_q, int64_t heads_kv, int64_t dk) {
  if (dk == kMlaDk && heads_kv == 1) {
    const int64_t rows = seq_q * heads_q, per_block = 16 * MlaGroups(rows);
    return batch * ((rows + per_block - 1) / per_block);
  }
  const int64_t rows = seq_q * (heads_kv > 0 ? heads_q / heads_kv : 0);
  return batch * heads_kv * ((rows + 63) / 64);
}

namespace {

// The shared checks, then what the CUDA kernels take: one dtype, f16 or bf16,
// for q, k and v, and the instantiated head-dim pairs.
ffi::Error CheckAttention(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t num_splits,
                          AttentionParams* p) {
  JAX_MLA_RETURN_IF_ERROR(AttentionArgs(q, k, nullptr, 0, v, nullptr, 0, q_pos, kv_len, out, lse,
                                        part_out, part_lse, num_splits, p));
  const DType qt = p->q_dtype, kt = p->k.dtype, vt = p->v.dtype;
  const int64_t Dk = p->dk, Dv = p->dv;
  JAX_MLA_CHECK(qt == kt && qt == vt && qt != DType::kF32, Unimplemented)
      << "flash_attention (CUDA): q, k and v must all be float16 or all bfloat16, got "
      << DTypeName(qt) << ", " << DTypeName(kt) << ", " << DTypeName(vt);
  bool supported = false;
#define JAX_MLA_SUPPORTED(DK, DV) supported |= (Dk == DK && Dv == DV);
  JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_SUPPORTED)
#undef JAX_MLA_SUPPORTED
  JAX_MLA_CHECK(supported, Unimplemented)
      << "flash_attention (CUDA): (Dk, Dv) must be (192, 128), (64, 64), (128, 128) or "
         "(256, 256), got (" << Dk << ", " << Dv << ")";
  JAX_MLA_CHECK(p->batch * p->heads_kv <= 65535 && num_splits <= 65535, Unimplemented)
      << "flash_attention (CUDA): B * Hkv and num_splits must be <= 65535, got B * Hkv = "
      << p->batch * p->heads_kv << ", num_splits = " << num_splits;
  return ffi::Error::Success();
}

template <typename T>
cudaError_t AttentionDispatch(const AttentionParams& p, cudaStream_t stream) {
  // Hopper: the wgmma kernel for the pairs it takes; split-KV decode stays on
  // mma.sync (its tile size is the one the num_splits heuristic assumes).
  if (p.num_splits == 1 && UseSm90Kernels()) {
#define JAX_MLA_CASE_SM90(DK, DV) \
  if (p.dk == DK && p.dv == DV) return LaunchAttentionSm90<T, DK, DV>(p, stream);
    JAX_MLA_ATTENTION_SM90_HEAD_DIMS(JAX_MLA_CASE_SM90)
#undef JAX_MLA_CASE_SM90
  }
#define JAX_MLA_CASE(DK, DV) \
  if (p.dk == DK && p.dv == DV) return LaunchAttention<T, DK, DV>(p, stream);
  JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_CASE)
#undef JAX_MLA_CASE
  return cudaErrorInvalidValue;  // unreachable: CheckAttention admits only the pairs above
}

ffi::Error FlashAttention(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::Buffer<ffi::S32> q_pos,
                          ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                          int64_t num_splits) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(
      CheckAttention(q, k, v, q_pos, kv_len, out, lse, part_out, part_lse, num_splits, &p));
  if (p.batch == 0 || p.seq_q == 0 || p.heads_q == 0) return ffi::Error::Success();
  if (p.q_dtype == DType::kBF16)
    JAX_MLA_CUDA_RETURN_IF_ERROR(AttentionDispatch<__nv_bfloat16>(p, stream));
  else
    JAX_MLA_CUDA_RETURN_IF_ERROR(AttentionDispatch<__half>(p, stream));
  if (p.num_splits > 1) JAX_MLA_CUDA_RETURN_IF_ERROR(LaunchCombine(p, stream));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttention, FlashAttention, AttentionBinding<ffi::PlatformStream<cudaStream_t>>());

}  // namespace jax_mla::cuda
