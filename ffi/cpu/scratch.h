// What the CPU drivers (flash.cc, flash_bwd.cc) share around the kernels:
// per-thread scratch vectors and the debug NaN fill of outputs.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "ffi/common/dtype.h"

namespace jax_mla::cpu {

// JAX_MLA_DEBUG_NAN_FILL=1 (read at every call): outputs are filled with NaN
// before the kernels run, so an element a kernel forgets to write shows.
inline bool NanFillRequested() {
  const char* env = std::getenv("JAX_MLA_DEBUG_NAN_FILL");
  return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
}

inline void FillNaN(void* data, DType dtype, int64_t n) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) StoreFromFloat(data, i, dtype, nan);
}

// Sizes a per-thread scratch vector for a call: grown on demand and reused
// across calls, or exactly n under AddressSanitizer, so that a kernel
// overrunning this call's scratch is caught even after a larger call left slack.
template <typename V>
void Grow(V& v, size_t n) {
#if defined(__SANITIZE_ADDRESS__)
  if (v.size() != n) {
    v.resize(n);
    v.shrink_to_fit();
  }
#else
  if (v.size() < n) v.resize(n);
#endif
}

}  // namespace jax_mla::cpu
