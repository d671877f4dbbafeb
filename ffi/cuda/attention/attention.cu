// flash_attention on CUDA: checks, parameters, dispatch on the (Dk, Dv) pairs
// of the kernel table (ffi/cuda/inst/kernel_table.h), the dtype and the call's
// kernel family, then the combine kernel when the keys are split. The CPU
// handler's FFI signature (ffi/cpu/attention.cc) plus the `kernel` attribute
// (kernel_family.h). The kernels are declared here (attention_launch.h) and
// instantiated in ffi/cuda/inst/. jax_mla_flash_attention_paged (a block
// table before q_pos, k and v as page pools read in place) runs the mma.sync
// kernel's paged instantiation; the sm90 kernel reads contiguous caches only.
// jax_mla_flash_attention_quant (k and v as values and scales, each q8_0 or
// q8_kv, contiguous) runs the mma.sync kernel over 8-bit caches; its paged
// twin is not implemented on CUDA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <iterator>

#include "ffi/common/bindings.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/op_args.h"
#include "ffi/common/paged_args.h"
#include "ffi/common/params.h"
#include "ffi/cuda/attention/attention_launch.h"
#include "ffi/cuda/common/combine.h"
#include "ffi/cuda/common/cuda_check.h"
#include "ffi/cuda/device.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/inst/kernel_table.h"
#include "ffi/cuda/kernel_family.h"

namespace jax_mla::cuda {

namespace {

// After the shared checks (AttentionArgs, paged or not), what the CUDA
// kernels take: one dtype, f16 or bf16, for q, k and v, and the instantiated
// head-dim pairs.
ffi::Error SupportedAttention(const AttentionParams* p, int64_t num_splits) {
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
      << "flash_attention (CUDA): (Dk, Dv) must be " << JAX_MLA_ATTENTION_HEAD_DIMS_TEXT
      << ", got (" << Dk << ", " << Dv << ")";
  JAX_MLA_CHECK(p->batch * p->heads_kv <= 65535 && num_splits <= 65535, Unimplemented)
      << "flash_attention (CUDA): B * Hkv and num_splits must be <= 65535, got B * Hkv = "
      << p->batch * p->heads_kv << ", num_splits = " << num_splits;
  return ffi::Error::Success();
}

// The quantized caches' (jax_mla_flash_attention_quant), after AttentionArgs:
// q float16 or bfloat16, k and v both 8-bit (q8_0 or q8_kv, each its own),
// the pairs the 8-bit kernel is instantiated for.
ffi::Error SupportedAttentionQuant(const AttentionParams* p, int64_t num_splits) {
  auto eight_bit = [](QFormat f) { return f == QFormat::kQ8_0 || f == QFormat::kQ8KV; };
  JAX_MLA_CHECK(p->q_dtype != DType::kF32, Unimplemented)
      << "flash_attention (CUDA): q must be float16 or bfloat16 over quantized caches, got "
      << DTypeName(p->q_dtype);
  JAX_MLA_CHECK(eight_bit(p->k.fmt) && eight_bit(p->v.fmt), Unimplemented)
      << "flash_attention (CUDA): quantized k and v must each be q8_0 or q8_kv, got k "
      << QFormatName(p->k.fmt) << ", v " << QFormatName(p->v.fmt);
  bool supported = false;
#define JAX_MLA_SUPPORTED(DK, DV) supported |= (p->dk == DK && p->dv == DV);
  JAX_MLA_ATTENTION_QUANT_HEAD_DIMS(JAX_MLA_SUPPORTED)
#undef JAX_MLA_SUPPORTED
  JAX_MLA_CHECK(supported, Unimplemented)
      << "flash_attention (CUDA): over quantized caches (Dk, Dv) must be "
      << JAX_MLA_ATTENTION_QUANT_HEAD_DIMS_TEXT << ", got (" << p->dk << ", " << p->dv << ")";
  JAX_MLA_CHECK(p->batch * p->heads_kv <= 65535 && num_splits <= 65535, Unimplemented)
      << "flash_attention (CUDA): B * Hkv and num_splits must be <= 65535, got B * Hkv = "
      << p->batch * p->heads_kv << ", num_splits = " << num_splits;
  return ffi::Error::Success();
}

bool HasSm90Kernel(int64_t dk, int64_t dv) {
#define JAX_MLA_SM90_PAIR(DK, DV) \
  if (dk == DK && dv == DV) return true;
  JAX_MLA_ATTENTION_SM90_HEAD_DIMS(JAX_MLA_SM90_PAIR)
#undef JAX_MLA_SM90_PAIR
  return false;
}

// The call's kernel family (kernel_family.h). Auto: on Hopper the wgmma
// kernel for the pairs it takes, but split-KV decode stays on mma.sync (its
// tile size is the one the num_splits heuristic assumes), and so do paged and
// quantized caches. A forced family the device, the pair or the cache cannot
// run is an error, never another kernel.
ffi::Error ChooseAttentionKernel(const AttentionParams& p, AttentionKernel* kernel) {
  const bool paged = p.k.block_table != nullptr, quantized = p.k.fmt != QFormat::kNone;
  if (*kernel == AttentionKernel::kAuto) {
    *kernel = !paged && !quantized && p.num_splits == 1 && HasSm90Kernel(p.dk, p.dv) && RunsSm90a()
                  ? AttentionKernel::kSm90
                  : AttentionKernel::kMmaSync;
    return ffi::Error::Success();
  }
  if (*kernel == AttentionKernel::kSm90) {
    JAX_MLA_CHECK(!quantized, Unimplemented)
        << "flash_attention (CUDA): kernel sm90 does not read quantized caches; mma_sync does";
    JAX_MLA_CHECK(!paged, Unimplemented)
        << "flash_attention (CUDA): kernel sm90 does not read paged caches; mma_sync does";
    JAX_MLA_CHECK(RunsSm90a(), Unimplemented)
        << "flash_attention (CUDA): kernel sm90 needs a compute capability 9.0 device and a "
           "module built for sm_90a";
    JAX_MLA_CHECK(HasSm90Kernel(p.dk, p.dv), Unimplemented)
        << "flash_attention (CUDA): kernel sm90 takes (Dk, Dv) "
        << JAX_MLA_ATTENTION_SM90_HEAD_DIMS_TEXT << ", got (" << p.dk << ", " << p.dv << ")";
  }
  return ffi::Error::Success();
}

template <typename T, bool kPaged>
cudaError_t AttentionDispatch(const AttentionParams& p, AttentionKernel kernel,
                              cudaStream_t stream) {
  if (!kPaged && kernel == AttentionKernel::kSm90) {
#define JAX_MLA_CASE_SM90(DK, DV) \
  if (p.dk == DK && p.dv == DV) return LaunchAttentionSm90<T, DK, DV>(p, stream);
    JAX_MLA_ATTENTION_SM90_HEAD_DIMS(JAX_MLA_CASE_SM90)
#undef JAX_MLA_CASE_SM90
  }
#define JAX_MLA_CASE(DK, DV) \
  if (p.dk == DK && p.dv == DV) return LaunchAttention<T, DK, DV, kPaged>(p, stream);
  JAX_MLA_ATTENTION_HEAD_DIMS(JAX_MLA_CASE)
#undef JAX_MLA_CASE
  return cudaErrorInvalidValue;  // unreachable: SupportedAttention admits only the pairs above
}

template <typename T>
cudaError_t AttentionQuantDispatch(const AttentionParams& p, cudaStream_t stream) {
#define JAX_MLA_CASE(DK, DV) \
  if (p.dk == DK && p.dv == DV) return LaunchAttentionQuant<T, DK, DV>(p, stream);
  JAX_MLA_ATTENTION_QUANT_HEAD_DIMS(JAX_MLA_CASE)
#undef JAX_MLA_CASE
  return cudaErrorInvalidValue;  // unreachable: SupportedAttentionQuant admits only the pairs above
}

// Runs a checked call: the kernel, then the combine when the keys are split.
ffi::Error RunAttention(const AttentionParams& p, int32_t kernel, cudaStream_t stream) {
  JAX_MLA_CHECK(kernel >= 0 && kernel < int32_t(std::size(kAttentionKernelNames)), InvalidArgument)
      << "flash_attention (CUDA): kernel must be in [0, " << std::size(kAttentionKernelNames)
      << "), got " << kernel;
  if (p.batch == 0 || p.seq_q == 0 || p.heads_q == 0) return ffi::Error::Success();
  AttentionKernel family = AttentionKernel(kernel);
  JAX_MLA_RETURN_IF_ERROR(ChooseAttentionKernel(p, &family));
  const bool bf16 = p.q_dtype == DType::kBF16;
  if (p.k.fmt != QFormat::kNone)  // contiguous 8-bit caches (SupportedAttentionQuant)
    JAX_MLA_CUDA_RETURN_IF_ERROR((bf16 ? AttentionQuantDispatch<__nv_bfloat16>(p, stream)
                                       : AttentionQuantDispatch<__half>(p, stream)));
  else if (p.k.block_table != nullptr)
    JAX_MLA_CUDA_RETURN_IF_ERROR((bf16 ? AttentionDispatch<__nv_bfloat16, true>(p, family, stream)
                                       : AttentionDispatch<__half, true>(p, family, stream)));
  else
    JAX_MLA_CUDA_RETURN_IF_ERROR((bf16 ? AttentionDispatch<__nv_bfloat16, false>(p, family, stream)
                                       : AttentionDispatch<__half, false>(p, family, stream)));
  if (p.num_splits > 1) JAX_MLA_CUDA_RETURN_IF_ERROR(LaunchCombine(p, stream));
  return ffi::Error::Success();
}

ffi::Error FlashAttention(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                          int64_t num_splits, int32_t kernel) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(AttentionArgs(q, k, nullptr, 0, v, nullptr, 0, q_pos, kv_len, out, lse,
                                        part_out, part_lse, num_splits, &p));
  JAX_MLA_RETURN_IF_ERROR(SupportedAttention(&p, num_splits));
  return RunAttention(p, kernel, stream);
}

ffi::Error FlashAttentionPaged(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                               ffi::AnyBuffer v, ffi::Buffer<ffi::S32> block_table,
                               ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                               ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::Buffer<ffi::F32>> lse,
                               ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                               ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale,
                               bool causal, int64_t num_splits, int32_t kernel) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(AttentionArgs(q, k, nullptr, 0, v, nullptr, 0, q_pos, kv_len, out, lse,
                                        part_out, part_lse, num_splits, &p, &block_table));
  JAX_MLA_RETURN_IF_ERROR(SupportedAttention(&p, num_splits));
  return RunAttention(p, kernel, stream);
}

ffi::Error FlashAttentionQuant(
    cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer k_d, ffi::AnyBuffer v,
    ffi::AnyBuffer v_d, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
    ffi::Result<ffi::Buffer<ffi::F32>> part_out, ffi::Result<ffi::Buffer<ffi::F32>> part_lse,
    float scale, bool causal, int64_t num_splits, int64_t k_fmt, int64_t v_fmt, int32_t kernel) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(AttentionArgs(q, k, k_fmt ? &k_d : nullptr, k_fmt, v,
                                        v_fmt ? &v_d : nullptr, v_fmt, q_pos, kv_len, out, lse,
                                        part_out, part_lse, num_splits, &p));
  JAX_MLA_RETURN_IF_ERROR(SupportedAttentionQuant(&p, num_splits));
  return RunAttention(p, kernel, stream);
}

}  // namespace

// The shared binding plus the kernel family (kernel_family.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kFlashAttention, FlashAttention,
    AttentionBinding<ffi::PlatformStream<cudaStream_t>>().Attr<int32_t>("kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kFlashAttentionQuant, FlashAttentionQuant,
    AttentionQuantBinding<ffi::PlatformStream<cudaStream_t>>().Attr<int32_t>("kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kFlashAttentionPaged, FlashAttentionPaged,
    AttentionPagedBinding<ffi::PlatformStream<cudaStream_t>>().Attr<int32_t>("kernel"));

}  // namespace jax_mla::cuda
