// Declarations of the attention backward's launchers, for the handler
// (attention_bwd.cu): the kernel bodies (attention_bwd_kernel.cuh) are
// included only by the instantiation files in ffi/cuda/inst/
// (generate_kernels.py). Each launches its KV kernel, then its Q kernel, on
// `stream`.
#pragma once

#include <cuda_runtime.h>

#include "ffi/common/params.h"

namespace jax_mla::cuda {

// mma.sync, every arch (attention_bwd_kernel.cuh).
template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionBwd(const AttentionBwdParams& p, cudaStream_t stream);
// sm_90a wgmma (attention_bwd_sm90_kernel.cuh); only where RunsSm90a() (device.h).
template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionBwdSm90(const AttentionBwdParams& p, cudaStream_t stream);

}  // namespace jax_mla::cuda
