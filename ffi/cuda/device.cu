// Device queries: what the Python side needs at trace time (the num_splits
// heuristic sizes split-KV work by the SM count) and which kernels a device takes.
#include <cuda_runtime.h>

#include <atomic>

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

namespace {
// Compiled for the same architectures as the kernels: its binary version says
// which of them the current device runs.
__global__ void ArchProbe() {}
}  // namespace

bool RunsSm90a() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) {
    cudaGetLastError();
    return false;
  }
  static std::atomic<int> known[64];  // 0 unknown, 1 no, 2 yes
  if (device < 64 && known[device].load(std::memory_order_relaxed) != 0)
    return known[device].load(std::memory_order_relaxed) == 2;
  int major = 0, minor = 0;
  cudaFuncAttributes attr{};
  const bool yes =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
      major == 9 && minor == 0 && cudaFuncGetAttributes(&attr, ArchProbe) == cudaSuccess &&
      attr.binaryVersion == 90;
  cudaGetLastError();  // a failed query is "no", not a sticky error for the next launch
  if (device < 64) known[device].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
}

}  // namespace jax_mla::cuda
