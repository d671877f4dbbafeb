// Declarations of the MLA kernel launchers, for the handler (mla.cu): the
// kernel bodies are included only by the instantiation files in ffi/cuda/inst/
// (generate_kernels.py), which define every specialization the handler calls.
// Each launches its kernel on `stream`; the caller launches the combine.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "ffi/common/params.h"
#include "ffi/common/quant_format.h"
#include "ffi/cuda/common/tensor_map.h"
#include "ffi/cuda/mla/mla_config.h"

namespace jax_mla::cuda {

// mma.sync, blocks of 16 * G query rows (mla_kernel.cuh).
template <typename T, int G>
cudaError_t LaunchMla(const AttentionParams& p, cudaStream_t stream);
// mma.sync over an 8-bit cache (mla_quant_kernel.cuh).
template <typename T, int G, QFormat F>
cudaError_t LaunchMlaQuant(const AttentionParams& p, cudaStream_t stream);
// sm_90a, 64-row blocks, keys split between the warpgroups (mla_sm90_split_kernel.cuh).
template <typename T>
cudaError_t LaunchMlaSm90Split(const AttentionParams& p, cudaStream_t stream);
// sm_90a, 64-row blocks, the seesaw schedule over TMA loads (mla_sm90_seesaw_kernel.cuh);
// tm_kv from MlaKvMap.
template <typename T>
cudaError_t LaunchMlaSm90Seesaw(const AttentionParams& p, const CUtensorMap& tm_kv,
                                cudaStream_t stream);

// The seesaw kernel's tensor map over the cache rows [kv_batch, Skv, 576] in
// 64-key boxes; false when the strides do not suit TMA.
template <typename T>
bool MlaKvMap(CUtensorMap* map, const AttentionParams& p) {
  RowView view = p.k;
  view.head_stride = kMlaDk;  // one head: any 16-byte multiple
  if (p.kv_batch == 1) view.batch_stride = p.seq_kv * view.row_stride;  // coordinate always 0
  return EncodeRowsMap<T>(map, view, p.kv_batch, p.seq_kv, 1, kMlaDk, kSm90Keys);
}

}  // namespace jax_mla::cuda
