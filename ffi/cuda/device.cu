// Device queries the Python side needs at trace time (the num_splits heuristic
// sizes split-KV work by the SM count). No kernels are registered yet.
#include <cuda_runtime.h>

#include "ffi/cuda/device.h"

namespace jax_mla::cuda {

int SmCount(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error; no device is not a failure here
    return 0;
  }
  return count;
}

int RuntimeVersion() {
  int version = 0;
  return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : 0;
}

}  // namespace jax_mla::cuda
