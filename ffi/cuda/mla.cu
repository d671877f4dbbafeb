// flash_mla on CUDA: checks, parameters, dispatch on (dtype, rows per block),
// then the combine kernel when the keys are split. Same FFI signature as the
// CPU handler (ffi/cpu/mla.cc), so one Python wrapper serves both.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ffi/common/attention_args.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
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

ffi::Error CheckMla(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> q_pos,
                    ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::Buffer<ffi::F32>> lse,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t dv, int64_t v_offset,
                    int64_t num_splits, AttentionParams* p) {
  const auto qd = q.dimensions(), kd = kv.dimensions();
  JAX_MLA_CHECK(qd.size() == 4, InvalidArgument)
      << "flash_mla: q must have rank 4 [B, Sq, H, Dk], got shape " << ShapeString(qd);
  JAX_MLA_CHECK(kd.size() == 3, InvalidArgument)
      << "flash_mla: kv must have rank 3 [B, Skv, Dk], got shape " << ShapeString(kd);
  const auto qt = ToDType(q.element_type()), kt = ToDType(kv.element_type());
  JAX_MLA_CHECK(qt && kt, InvalidArgument)
      << "flash_mla: q and kv must be float32, float16 or bfloat16";
  const int64_t B = qd[0], Sq = qd[1], H = qd[2], Dk = qd[3], Skv = kd[1];
  JAX_MLA_CHECK(BatchSharable(B, kd[0]) && kd[2] == Dk, InvalidArgument)
      << "flash_mla: kv shape " << ShapeString(kd) << " must be [" << B << ", Skv, " << Dk
      << "] to match q " << ShapeString(qd)
      << " (its batch may divide q's when a vmapped call shares the cache)";
  JAX_MLA_CHECK(dv > 0 && v_offset >= 0 && v_offset + dv <= Dk, InvalidArgument)
      << "flash_mla: the V slice [v_offset, v_offset + dv) = [" << v_offset << ", "
      << v_offset + dv << ") must lie inside the row of " << Dk;
  JAX_MLA_CHECK(*qt == *kt && *qt != DType::kF32, Unimplemented)
      << "flash_mla (CUDA): q and kv must both be float16 or both bfloat16, got "
      << DTypeName(*qt) << " and " << DTypeName(*kt);
  JAX_MLA_CHECK(Dk == kMlaDk && dv == kMlaDv && v_offset == 0, Unimplemented)
      << "flash_mla (CUDA): supports Dk = 576, dv = 512, v_offset = 0, got Dk = " << Dk
      << ", dv = " << dv << ", v_offset = " << v_offset;
  p->batch = B;
  p->kv_batch = kd[0];
  p->seq_q = Sq;
  p->heads_q = H;
  p->heads_kv = 1;
  p->seq_kv = Skv;
  p->dk = Dk;
  p->dv = dv;
  p->q = q.untyped_data();
  p->q_dtype = *qt;
  p->k = RowView{kv.untyped_data(), *kt, Skv * Dk, Dk, 0};
  p->v = p->k;  // V is columns [0, 512) of the same rows
  p->v_in_k = v_offset;
  return SetPositionsAndOutputs("flash_mla", q_pos, kv_len, out, lse, part_out, part_lse,
                                num_splits, p);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMla, FlashMla,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()          // q [B, Sq, H, Dk]
                                  .Arg<ffi::AnyBuffer>()          // kv [B, Skv, Dk] latent rows
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_len [B]
                                  .Ret<ffi::AnyBuffer>()          // out [B, Sq, H, dv]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse [B, H, Sq]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // part_out [B, ns, Sq, H, dv] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // part_lse [B, ns, Sq, H] or [0]
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("dv")
                                  .Attr<int64_t>("v_offset")
                                  .Attr<int64_t>("num_splits"));

}  // namespace jax_mla::cuda
