// Host side of the TMA loads of the sm_90a kernels (both ops): tensor maps
// over a cache's rows, encoded through the driver entry point the runtime
// hands out (the module links no libcuda).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ffi/common/params.h"

namespace jax_mla::cuda {

// A 4-d tensor map over rows of `view` ([kv_batch, Skv, Hkv, D], strides in
// elements), boxes of 64 columns x 128 rows, 128B swizzle. False when the
// driver has no encoder or the strides do not suit TMA (16-byte multiples).
template <typename T>
bool EncodeRowsMap(CUtensorMap* map, const RowView& view, int64_t kv_batch, int64_t seq_kv,
                   int64_t heads, int64_t dim, int box_rows) {
  using Encode =
      CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                             cudaEnableDefault, &found);
#else
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) fn = nullptr;
    cudaGetLastError();
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr) return false;
  const int64_t e = sizeof(T);
  const int64_t strides[3] = {view.head_stride * e, view.row_stride * e, view.batch_stride * e};
  for (int64_t st : strides)
    if (st <= 0 || st % 16 != 0 || st >= (int64_t(1) << 40)) return false;
  if (reinterpret_cast<uintptr_t>(view.data) % 16 != 0) return false;
  const cuuint64_t dims[4] = {cuuint64_t(dim), cuuint64_t(heads), cuuint64_t(seq_kv),
                              cuuint64_t(kv_batch)};
  const cuuint64_t gstrides[3] = {cuuint64_t(strides[0]), cuuint64_t(strides[1]),
                                  cuuint64_t(strides[2])};
  const cuuint32_t box[4] = {64, 1, cuuint32_t(box_rows), 1};
  const cuuint32_t estrides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType dt = sizeof(T) == 2 && std::is_same_v<T, __nv_bfloat16>
                                     ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                     : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, dt, 4, const_cast<void*>(view.data), dims, gstrides, box, estrides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace jax_mla::cuda
