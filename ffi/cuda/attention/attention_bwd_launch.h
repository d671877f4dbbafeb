// Declaration of the attention backward's launcher, for the handler
// (attention_bwd.cu): the kernel bodies (attention_bwd_kernel.cuh) are
// included only by the instantiation files in ffi/cuda/inst/
// (generate_kernels.py). It launches the KV kernel, then the Q kernel, on
// `stream`.
#pragma once

#include <cuda_runtime.h>

#include "ffi/common/params.h"

namespace jax_mla::cuda {

// mma.sync, every arch (attention_bwd_kernel.cuh).
template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionBwd(const AttentionBwdParams& p, cudaStream_t stream);

}  // namespace jax_mla::cuda
