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

// Each launcher reads a contiguous cache, or with kPaged a paged one through
// the RowView's block table (params.h, cache_rows.cuh).
// mma.sync, blocks of 16 * G query rows (mla_kernel.cuh).
template <typename T, int G, bool kPaged>
cudaError_t LaunchMla(const AttentionParams& p, cudaStream_t stream);
// mma.sync over an 8-bit cache (mla_quant_kernel.cuh).
template <typename T, int G, QFormat F, bool kPaged>
cudaError_t LaunchMlaQuant(const AttentionParams& p, cudaStream_t stream);
// sm_90a, 64-row blocks, keys split between the warpgroups (mla_sm90_split_kernel.cuh).
template <typename T, bool kPaged>
cudaError_t LaunchMlaSm90Split(const AttentionParams& p, cudaStream_t stream);
// sm_90a, 64-row blocks, the seesaw schedule over TMA loads (mla_sm90_seesaw_kernel.cuh);
// tm_kv from MlaKvMap.
template <typename T, bool kPaged>
cudaError_t LaunchMlaSm90Seesaw(const AttentionParams& p, const CUtensorMap& tm_kv,
                                cudaStream_t stream);

// The seesaw kernel's tensor map over the cache rows [kv_batch, Skv, 576] in
// 64-key boxes, or over a paged cache's pool [num_pages, page_size, 576] in
// boxes of min(page_size, 64) keys; false when the strides do not suit TMA
// (or the pool is empty).
template <typename T>
bool MlaKvMap(CUtensorMap* map, const AttentionParams& p) {
  RowView view = p.k;
  view.head_stride = kMlaDk;  // one head: any 16-byte multiple
  if (view.block_table != nullptr) {
    if (view.num_pages < 1) return false;
    const int box = view.page_size < kSm90Keys ? int(view.page_size) : kSm90Keys;
    return EncodeRowsMap<T>(map, view, view.num_pages, view.page_size, 1, kMlaDk, box);
  }
  if (p.kv_batch == 1) view.batch_stride = p.seq_kv * view.row_stride;  // coordinate always 0
  return EncodeRowsMap<T>(map, view, p.kv_batch, p.seq_kv, 1, kMlaDk, kSm90Keys);
}

}  // namespace jax_mla::cuda
