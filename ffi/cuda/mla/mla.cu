// flash_mla on CUDA: checks, parameters, dispatch on (dtype, rows per block,
// cache format, the call's kernel family), then the combine kernel when the
// keys are split. The CPU handlers' FFI signatures (ffi/cpu/mla.cc) plus the
// `kernel` attribute (kernel_family.h): jax_mla_flash_mla (float cache) and
// jax_mla_flash_mla_quant (q8_0 / q8_kv cache as qs and scales, read in place;
// q6_0 is not supported on CUDA yet), and their _paged twins (a block table
// before q_pos, the caches as page pools read in place; paged_args.h). The
// kernels are declared here (mla_launch.h) and instantiated in ffi/cuda/inst/.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <iterator>

#include "ffi/common/bindings.h"
#include "ffi/common/check.h"
#include "ffi/common/op_args.h"
#include "ffi/common/paged_args.h"
#include "ffi/common/params.h"
#include "ffi/cuda/common/combine.h"
#include "ffi/cuda/common/cuda_check.h"
#include "ffi/cuda/device.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/inst/kernel_table.h"
#include "ffi/cuda/kernel_family.h"
#include "ffi/cuda/mla/mla_config.h"
#include "ffi/cuda/mla/mla_launch.h"

namespace jax_mla::cuda {

// The kernels' constants (mla_config.h) are built for the table's layout.
#define JAX_MLA_LAYOUT_MATCHES(DK, DV, V_OFFSET)               \
  static_assert(DK == kMlaDk && DV == kMlaDv && V_OFFSET == 0, \
                "generate_kernels.py's MLA_LAYOUT must match mla_config.h");
JAX_MLA_MLA_LAYOUTS(JAX_MLA_LAYOUT_MATCHES)
#undef JAX_MLA_LAYOUT_MATCHES

namespace {

// After the shared checks (MlaArgs, paged or not), what the CUDA kernel
// takes: f16 or bf16 for both q and kv, DeepSeek's latent layout.
ffi::Error SupportedMla(const AttentionParams* p, int64_t dv, int64_t v_offset) {
  JAX_MLA_CHECK(p->q_dtype == p->k.dtype && p->q_dtype != DType::kF32, Unimplemented)
      << "flash_mla (CUDA): q and kv must both be float16 or both bfloat16, got "
      << DTypeName(p->q_dtype) << " and " << DTypeName(p->k.dtype);
  JAX_MLA_CHECK(p->dk == kMlaDk && dv == kMlaDv && v_offset == 0, Unimplemented)
      << "flash_mla (CUDA): supports Dk = 576, dv = 512, v_offset = 0, got Dk = " << p->dk
      << ", dv = " << dv << ", v_offset = " << v_offset;
  return ffi::Error::Success();
}

// The quantized cache's: after the shared checks, q float16 or bfloat16, an
// 8-bit format, DeepSeek's latent layout.
ffi::Error SupportedMlaQuant(const AttentionParams* p, int64_t dv, int64_t v_offset) {
  JAX_MLA_CHECK(p->q_dtype != DType::kF32, Unimplemented)
      << "flash_mla (CUDA): q must be float16 or bfloat16 over a quantized cache, got "
      << DTypeName(p->q_dtype);
  JAX_MLA_CHECK(
      p->k.fmt == QFormat::kQ8_0 || p->k.fmt == QFormat::kQ8KV || p->k.fmt == QFormat::kFP8E4M3,
      Unimplemented)
      << "flash_mla (CUDA): quantized caches q8_0, q8_kv and fp8_e4m3 are supported, got "
      << QFormatName(p->k.fmt);
  JAX_MLA_CHECK(p->dk == kMlaDk && dv == kMlaDv && v_offset == 0, Unimplemented)
      << "flash_mla (CUDA): supports Dk = 576, dv = 512, v_offset = 0, got Dk = " << p->dk
      << ", dv = " << dv << ", v_offset = " << v_offset;
  return ffi::Error::Success();
}

// 16-row blocks: mma.sync. 64-row blocks: the call's kernel family
// (kernel_family.h); auto takes the seesaw kernel on Hopper, the key-split
// one there when the cache's strides (or pages) do not suit TMA, mma.sync
// elsewhere; the same for paged caches. A forced family the device or the
// strides cannot run is an error, never another kernel.
template <typename T, bool kPaged>
ffi::Error MlaDispatch(const AttentionParams& p, MlaKernel kernel, cudaStream_t stream) {
  if (MlaGroups(p.seq_q * p.heads_q) == 1) {
    JAX_MLA_CUDA_RETURN_IF_ERROR((LaunchMla<T, 1, kPaged>(p, stream)));
    return ffi::Error::Success();
  }
  const bool forced = kernel != MlaKernel::kAuto;
  const char* name = kMlaKernelNames[int(kernel)];
  JAX_MLA_CHECK(!forced || kernel == MlaKernel::kMmaSync || RunsSm90a(), Unimplemented)
      << "flash_mla (CUDA): kernel " << name
      << " needs a compute capability 9.0 device and a module built for sm_90a";
  if (!forced) kernel = RunsSm90a() ? MlaKernel::kSm90Seesaw : MlaKernel::kMmaSync;
  if (kernel == MlaKernel::kSm90Seesaw) {
    CUtensorMap tm{};
    if (MlaKvMap<T>(&tm, p)) {
      JAX_MLA_CUDA_RETURN_IF_ERROR((LaunchMlaSm90Seesaw<T, kPaged>(p, tm, stream)));
      return ffi::Error::Success();
    }
    JAX_MLA_CHECK(!forced, Unimplemented)
        << "flash_mla (CUDA): kernel " << name
        << " needs cache strides that suit TMA (16-byte multiples, 16-byte-aligned data)";
    kernel = MlaKernel::kSm90Split;
  }
  if (kernel == MlaKernel::kSm90Split)
    JAX_MLA_CUDA_RETURN_IF_ERROR((LaunchMlaSm90Split<T, kPaged>(p, stream)));
  else
    JAX_MLA_CUDA_RETURN_IF_ERROR((LaunchMla<T, 4, kPaged>(p, stream)));
  return ffi::Error::Success();
}

template <typename T, QFormat F, bool kPaged>
cudaError_t MlaQuantDispatch(const AttentionParams& p, cudaStream_t stream) {
  return MlaGroups(p.seq_q * p.heads_q) == 1 ? LaunchMlaQuant<T, 1, F, kPaged>(p, stream)
                                             : LaunchMlaQuant<T, 4, F, kPaged>(p, stream);
}

template <typename T, bool kPaged>
cudaError_t MlaQuantDispatch(const AttentionParams& p, cudaStream_t stream) {
  switch (p.k.fmt) {
    case QFormat::kQ8_0: return MlaQuantDispatch<T, QFormat::kQ8_0, kPaged>(p, stream);
    case QFormat::kFP8E4M3: return MlaQuantDispatch<T, QFormat::kFP8E4M3, kPaged>(p, stream);
    default: return MlaQuantDispatch<T, QFormat::kQ8KV, kPaged>(p, stream);
  }
}

template <bool kPaged>
ffi::Error MlaMain(const AttentionParams& p, MlaKernel kernel, cudaStream_t stream) {
  const bool bf16 = p.q_dtype == DType::kBF16;
  if (p.k.fmt == QFormat::kNone)
    return bf16 ? MlaDispatch<__nv_bfloat16, kPaged>(p, kernel, stream)
                : MlaDispatch<__half, kPaged>(p, kernel, stream);
  JAX_MLA_CUDA_RETURN_IF_ERROR((bf16 ? MlaQuantDispatch<__nv_bfloat16, kPaged>(p, stream)
                                     : MlaQuantDispatch<__half, kPaged>(p, stream)));
  return ffi::Error::Success();
}

// Runs a checked call: the main kernel, then the combine when the keys are
// split. `kernel` is the call's attribute (kernel_family.h); quantized caches
// have one kernel family.
ffi::Error RunMla(const AttentionParams& p, int32_t kernel, cudaStream_t stream) {
  JAX_MLA_CHECK(kernel >= 0 && kernel < int32_t(std::size(kMlaKernelNames)), InvalidArgument)
      << "flash_mla (CUDA): kernel must be in [0, " << std::size(kMlaKernelNames) << "), got "
      << kernel;
  if (p.batch == 0 || p.seq_q == 0 || p.heads_q == 0) return ffi::Error::Success();
  JAX_MLA_CHECK(p.num_splits <= 65535, InvalidArgument)
      << "flash_mla (CUDA): num_splits must be <= 65535, got " << p.num_splits;
  JAX_MLA_RETURN_IF_ERROR(p.k.block_table != nullptr
                              ? MlaMain<true>(p, MlaKernel(kernel), stream)
                              : MlaMain<false>(p, MlaKernel(kernel), stream));
  if (p.num_splits > 1) JAX_MLA_CUDA_RETURN_IF_ERROR(LaunchCombine(p, stream));
  return ffi::Error::Success();
}

ffi::Error FlashMla(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                    ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                    int64_t dv, int64_t v_offset, int64_t num_splits, int32_t kernel) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(MlaArgs(q, kv, nullptr, 0, q_pos, kv_len, out, lse, part_out, part_lse,
                                  dv, v_offset, num_splits, &p));
  JAX_MLA_RETURN_IF_ERROR(SupportedMla(&p, dv, v_offset));
  return RunMla(p, kernel, stream);
}

ffi::Error FlashMlaPaged(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                         ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> q_pos,
                         ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> lse,
                         ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                         ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                         int64_t dv, int64_t v_offset, int64_t num_splits, int32_t kernel) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(MlaArgs(q, kv, nullptr, 0, q_pos, kv_len, out, lse, part_out, part_lse,
                                  dv, v_offset, num_splits, &p, &block_table));
  JAX_MLA_RETURN_IF_ERROR(SupportedMla(&p, dv, v_offset));
  return RunMla(p, kernel, stream);
}

ffi::Error FlashMlaQuant(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                         ffi::AnyBuffer kv_d, ffi::Buffer<ffi::S32> q_pos,
                         ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> lse,
                         ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                         ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                         int64_t dv, int64_t v_offset, int64_t num_splits, int64_t kv_fmt,
                         int32_t kernel) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_CHECK(kv_fmt != 0, InvalidArgument)
      << "flash_mla: the quantized-cache call needs a quantized format";
  JAX_MLA_RETURN_IF_ERROR(MlaArgs(q, kv, &kv_d, kv_fmt, q_pos, kv_len, out, lse, part_out, part_lse,
                                  dv, v_offset, num_splits, &p));
  JAX_MLA_RETURN_IF_ERROR(SupportedMlaQuant(&p, dv, v_offset));
  return RunMla(p, kernel, stream);
}

ffi::Error FlashMlaQuantPaged(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                              ffi::AnyBuffer kv_d, ffi::Buffer<ffi::S32> block_table,
                              ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                              ffi::Result<ffi::AnyBuffer> out,
                              ffi::Result<ffi::Buffer<ffi::F32>> lse,
                              ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                              ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                              int64_t dv, int64_t v_offset, int64_t num_splits, int64_t kv_fmt,
                              int32_t kernel) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_CHECK(kv_fmt != 0, InvalidArgument)
      << "flash_mla: the quantized-cache call needs a quantized format";
  JAX_MLA_RETURN_IF_ERROR(MlaArgs(q, kv, &kv_d, kv_fmt, q_pos, kv_len, out, lse, part_out, part_lse,
                                  dv, v_offset, num_splits, &p, &block_table));
  JAX_MLA_RETURN_IF_ERROR(SupportedMlaQuant(&p, dv, v_offset));
  return RunMla(p, kernel, stream);
}

}  // namespace

// The shared bindings plus the kernel family (kernel_family.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kFlashMla, FlashMla, MlaBinding<ffi::PlatformStream<cudaStream_t>>().Attr<int32_t>("kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kFlashMlaQuant, FlashMlaQuant,
    MlaQuantBinding<ffi::PlatformStream<cudaStream_t>>().Attr<int32_t>("kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kFlashMlaPaged, FlashMlaPaged,
    MlaPagedBinding<ffi::PlatformStream<cudaStream_t>>().Attr<int32_t>("kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kFlashMlaQuantPaged, FlashMlaQuantPaged,
    MlaQuantPagedBinding<ffi::PlatformStream<cudaStream_t>>().Attr<int32_t>("kernel"));

}  // namespace jax_mla::cuda
