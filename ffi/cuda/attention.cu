// flash_attention on CUDA: checks, parameters, dispatch on explicit (Dk, Dv)
// pairs and the dtype, then the combine kernel when the keys are split. Same
// FFI signature as the CPU handler (ffi/cpu/attention.cc).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ffi/common/attention_args.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"
#include "ffi/cuda/attention_kernel.cuh"
#include "ffi/cuda/combine.h"
#include "ffi/cuda/cuda_check.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/mla_kernel.cuh"

// The (Dk, Dv) pairs with a kernel (DESIGN.md): DeepSeek's 192/128, then equal dims.
#define JAX_MLA_ATTENTION_HEAD_DIMS(X) X(192, 128) X(64, 64) X(128, 128) X(256, 256)

namespace jax_mla::cuda {

// Instantiated in ffi/cuda/inst/ (one file each).
#define JAX_MLA_EXTERN(DK, DV)                                                                  \
  extern template cudaError_t LaunchAttention<__nv_bfloat16, DK, DV>(const AttentionParams&,   \
                                                                     cudaStream_t);            \
  extern template cudaError_t LaunchAttention<__half, DK, DV>(const AttentionParams&, cudaStream_t);
JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_EXTERN)
#undef JAX_MLA_EXTERN

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
  JAX_MLA_CHECK(*qt == *kt && *qt == *vt && *qt != DType::kF32, Unimplemented)
      << "flash_attention (CUDA): q, k and v must all be float16 or all bfloat16, got "
      << DTypeName(*qt) << ", " << DTypeName(*kt) << ", " << DTypeName(*vt);
  bool supported = false;
#define JAX_MLA_SUPPORTED(DK, DV) supported |= (Dk == DK && Dv == DV);
  JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_SUPPORTED)
#undef JAX_MLA_SUPPORTED
  JAX_MLA_CHECK(supported, Unimplemented)
      << "flash_attention (CUDA): (Dk, Dv) must be (192, 128), (64, 64), (128, 128) or "
         "(256, 256), got (" << Dk << ", " << Dv << ")";
  JAX_MLA_CHECK(B * Hkv <= 65535 && num_splits <= 65535, Unimplemented)
      << "flash_attention (CUDA): B * Hkv and num_splits must be <= 65535, got B * Hkv = "
      << B * Hkv << ", num_splits = " << num_splits;
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

template <typename T>
cudaError_t AttentionDispatch(const AttentionParams& p, cudaStream_t stream) {
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttention, FlashAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
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

}  // namespace jax_mla::cuda
