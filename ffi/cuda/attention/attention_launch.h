// Declarations of the flash_attention kernel launchers, for the handler
// (attention.cu): the kernel bodies are included only by the instantiation
// files in ffi/cuda/inst/ (generate_kernels.py), which define every
// specialization the handler calls. Each launches its kernel on `stream`; the
// caller launches the combine.
#pragma once

#include <cuda_runtime.h>

#include "ffi/common/params.h"

namespace jax_mla::cuda {

// mma.sync, every arch (attention_kernel.cuh); kPaged: k and v are paged
// (RowView's block table, params.h).
template <typename T, int Dk, int Dv, bool kPaged>
cudaError_t LaunchAttention(const AttentionParams& p, cudaStream_t stream);
// mma.sync over 8-bit K and V, contiguous (attention_quant_kernel.cuh): k and
// v each q8_0 or q8_kv (RowView::fmt, read at run time).
template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionQuant(const AttentionParams& p, cudaStream_t stream);
// sm_90a wgmma (attention_sm90_kernel.cuh); only where RunsSm90a() (device.h).
template <typename T, int Dk, int Dv>
cudaError_t LaunchAttentionSm90(const AttentionParams& p, cudaStream_t stream);

}  // namespace jax_mla::cuda
