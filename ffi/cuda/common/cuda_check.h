// CUDA failures as ffi::Error (Internal), never exit/abort (docs/design.md, "Backends and errors").
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "ffi/common/check.h"

// Returns an Internal error naming the failed call and CUDA's message.
#define JAX_MLA_CUDA_RETURN_IF_ERROR(expr)                                            \
  do {                                                                                \
    auto jax_mla_cuda_err_ = (expr);                                                  \
    static_assert(std::is_same_v<decltype(jax_mla_cuda_err_), cudaError_t>,           \
                  "JAX_MLA_CUDA_RETURN_IF_ERROR takes a cudaError_t");                \
    if (jax_mla_cuda_err_ != cudaSuccess)                                             \
      return ::jax_mla::ErrorBuilder(::xla::ffi::ErrorCode::kInternal)                \
             << "CUDA error in " #expr ": " << cudaGetErrorString(jax_mla_cuda_err_); \
  } while (0)
