// The kernel families a CUDA call may force through its `kernel` attribute
// (0 = auto, the default choice; the others index these names, which
// capabilities() lists as mla_kernels / attention_kernels and Python reads
// from JAX_MLA_CUDA_MLA_KERNEL / JAX_MLA_CUDA_ATTENTION_KERNEL at trace time),
// so one process can run and test every kernel on one card.
#pragma once

#include <cstdint>

namespace jax_mla::cuda {

// flash_mla's float-cache kernel for blocks of 64 query rows (Sq * H > 16).
// 16-row blocks and quantized caches have one kernel each (mma.sync), which
// every family runs.
enum class MlaKernel : int32_t {
  kAuto = 0,        // seesaw where RunsSm90a() and the strides suit TMA, else
                    // sm90_split there, mma_sync elsewhere
  kMmaSync = 1,     // mla/mla_kernel.cuh, every arch
  kSm90Split = 2,   // mla/mla_sm90_split_kernel.cuh, sm_90a
  kSm90Seesaw = 3,  // mla/mla_sm90_seesaw_kernel.cuh, sm_90a, TMA-compatible strides
};
inline constexpr const char* kMlaKernelNames[] = {"auto", "mma_sync", "sm90_split", "sm90_seesaw"};

// flash_attention's kernel.
enum class AttentionKernel : int32_t {
  kAuto = 0,     // sm90 for its pairs where RunsSm90a(), num_splits == 1 and the
                 // cache is float and contiguous, else mma_sync
  kMmaSync = 1,  // attention/attention_kernel.cuh, every arch and pair, paged or not;
                 // attention_quant_kernel.cuh over 8-bit caches
  kSm90 = 2,     // attention/attention_sm90_kernel.cuh, sm_90a, its pairs, contiguous
};
inline constexpr const char* kAttentionKernelNames[] = {"auto", "mma_sync", "sm90"};

}  // namespace jax_mla::cuda
