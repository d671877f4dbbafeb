// The split-KV combine step shared by flash_attention and flash_mla on CUDA.
#pragma once

#include <cuda_runtime.h>

#include "ffi/common/params.h"

namespace jax_mla::cuda {

// Merges p.part_out [B, ns, Sq, H, Dv] / p.part_lse [B, ns, Sq, H] (each
// split's normalized output and LSE, -inf for a split that saw no key) into
// p.out [B, Sq, H, Dv] (q's dtype) and p.lse [B, H, Sq]. Requires Dv % 4 == 0.
cudaError_t LaunchCombine(const AttentionParams& p, cudaStream_t stream);

}  // namespace jax_mla::cuda
