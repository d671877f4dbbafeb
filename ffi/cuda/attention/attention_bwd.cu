// The attention backward on CUDA (jax_mla_flash_attention_bwd; the contract
// is the CPU handler's, ffi/cpu/attention_bwd.cc, plus the forward's `kernel`
// attribute, kernel_family.h): the shared checks, then what the CUDA kernels
// take (q, k, v and dout all float16 or all bfloat16, the kernel table's
// (Dk, Dv) pairs), then dispatch on the pair, the dtype and the kernel
// family. The kernels are declared in attention_bwd_launch.h and instantiated
// in ffi/cuda/inst/.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <iterator>

#include "ffi/common/attention_bwd_args.h"
#include "ffi/common/bindings.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"
#include "ffi/cuda/attention/attention_bwd_launch.h"
#include "ffi/cuda/common/cuda_check.h"
#include "ffi/cuda/device.h"
#include "ffi/cuda/handlers.h"
#include "ffi/cuda/inst/kernel_table.h"
#include "ffi/cuda/kernel_family.h"

namespace jax_mla::cuda {

namespace {

ffi::Error CheckAttentionBwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                             ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> q_pos,
                             ffi::Buffer<ffi::S32> kv_len,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_q,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_k,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_v, AttentionBwdParams* p) {
  JAX_MLA_RETURN_IF_ERROR(
      AttentionBwdArgs(q, k, v, dout, lse, delta, q_pos, kv_len, grad_q, grad_k, grad_v, p));
  const DType qt = p->q_dtype, kt = p->k.dtype, vt = p->v.dtype, ot = p->dout_dtype;
  JAX_MLA_CHECK(qt == kt && qt == vt && qt == ot && qt != DType::kF32, Unimplemented)
      << "flash_attention_bwd (CUDA): q, k, v and dout must all be float16 or all bfloat16, got "
      << DTypeName(qt) << ", " << DTypeName(kt) << ", " << DTypeName(vt) << ", " << DTypeName(ot);
  bool supported = false;
#define JAX_MLA_SUPPORTED(DK, DV) supported |= (p->dk == DK && p->dv == DV);
  JAX_MLA_ATTENTION_BWD_HEAD_DIMS(JAX_MLA_SUPPORTED)
#undef JAX_MLA_SUPPORTED
  JAX_MLA_CHECK(supported, Unimplemented)
      << "flash_attention_bwd (CUDA): (Dk, Dv) must be " << JAX_MLA_ATTENTION_BWD_HEAD_DIMS_TEXT
      << ", got (" << p->dk << ", " << p->dv << ")";
  JAX_MLA_CHECK(p->batch * p->heads_kv <= 65535, Unimplemented)
      << "flash_attention_bwd (CUDA): B * Hkv must be <= 65535, got " << p->batch * p->heads_kv;
  return ffi::Error::Success();
}

bool HasBwdSm90Kernel(int64_t dk, int64_t dv) {
#define JAX_MLA_SM90_PAIR(DK, DV) \
  if (dk == DK && dv == DV) return true;
  JAX_MLA_ATTENTION_BWD_SM90_HEAD_DIMS(JAX_MLA_SM90_PAIR)
#undef JAX_MLA_SM90_PAIR
  return false;
}

// The call's kernel family (kernel_family.h, the forward's attribute and
// names). Auto: on Hopper the wgmma backward for the pairs it takes, else
// mma.sync. A forced family the device or the pair cannot run is an error,
// never another kernel.
ffi::Error ChooseAttentionBwdKernel(const AttentionBwdParams& p, int32_t kernel,
                                    AttentionKernel* family) {
  JAX_MLA_CHECK(kernel >= 0 && kernel < int32_t(std::size(kAttentionKernelNames)), InvalidArgument)
      << "flash_attention_bwd (CUDA): kernel must be in [0, " << std::size(kAttentionKernelNames)
      << "), got " << kernel;
  *family = AttentionKernel(kernel);
  if (*family == AttentionKernel::kAuto) {
    *family = HasBwdSm90Kernel(p.dk, p.dv) && RunsSm90a() ? AttentionKernel::kSm90
                                                          : AttentionKernel::kMmaSync;
  } else if (*family == AttentionKernel::kSm90) {
    JAX_MLA_CHECK(RunsSm90a(), Unimplemented)
        << "flash_attention_bwd (CUDA): kernel sm90 needs a compute capability 9.0 device and a "
           "module built for sm_90a";
    JAX_MLA_CHECK(HasBwdSm90Kernel(p.dk, p.dv), Unimplemented)
        << "flash_attention_bwd (CUDA): kernel sm90 takes (Dk, Dv) "
        << JAX_MLA_ATTENTION_BWD_SM90_HEAD_DIMS_TEXT << ", got (" << p.dk << ", " << p.dv << ")";
  }
  return ffi::Error::Success();
}

template <typename T>
cudaError_t AttentionBwdDispatch(const AttentionBwdParams& p, AttentionKernel family,
                                 cudaStream_t stream) {
  if (family == AttentionKernel::kSm90) {
#define JAX_MLA_CASE_SM90(DK, DV) \
  if (p.dk == DK && p.dv == DV) return LaunchAttentionBwdSm90<T, DK, DV>(p, stream);
    JAX_MLA_ATTENTION_BWD_SM90_HEAD_DIMS(JAX_MLA_CASE_SM90)
#undef JAX_MLA_CASE_SM90
  }
#define JAX_MLA_CASE(DK, DV) \
  if (p.dk == DK && p.dv == DV) return LaunchAttentionBwd<T, DK, DV>(p, stream);
  JAX_MLA_ATTENTION_BWD_HEAD_DIMS(JAX_MLA_CASE)
#undef JAX_MLA_CASE
  return cudaErrorInvalidValue;  // unreachable: CheckAttentionBwd admits only the pairs above
}

ffi::Error FlashAttentionBwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> q_pos,
                             ffi::Buffer<ffi::S32> kv_len,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_q,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_k,
                             ffi::Result<ffi::Buffer<ffi::F32>> grad_v, float scale, bool causal,
                             int32_t kernel) {
  AttentionBwdParams p;
  p.scale = scale;
  p.causal = causal;
  JAX_MLA_RETURN_IF_ERROR(
      CheckAttentionBwd(q, k, v, dout, lse, delta, q_pos, kv_len, grad_q, grad_k, grad_v, &p));
  AttentionKernel family;
  JAX_MLA_RETURN_IF_ERROR(ChooseAttentionBwdKernel(p, kernel, &family));
  if (p.batch == 0 || p.heads_q == 0) return ffi::Error::Success();
  if (p.q_dtype == DType::kBF16)
    JAX_MLA_CUDA_RETURN_IF_ERROR(AttentionBwdDispatch<__nv_bfloat16>(p, family, stream));
  else
    JAX_MLA_CUDA_RETURN_IF_ERROR(AttentionBwdDispatch<__half>(p, family, stream));
  return ffi::Error::Success();
}

}  // namespace

// The shared binding plus the kernel family (kernel_family.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kFlashAttentionBwd, FlashAttentionBwd,
    AttentionBwdBinding<ffi::PlatformStream<cudaStream_t>>().Attr<int32_t>("kernel"));

}  // namespace jax_mla::cuda
