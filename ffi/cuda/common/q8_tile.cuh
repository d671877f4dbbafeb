// Device helpers of the kernels over 8-bit caches (q8_0, q8_kv;
// ffi/common/quant_format.h): the query rounded to 8 bits, the int8 mma's
// result as a float and the exact int8 -> float conversion (the int8 mma and
// the 4-byte copies of the scales are in kernel_utils.cuh with the other
// PTX). Shared by mla/mla_quant_kernel.cuh and
// attention/attention_quant_kernel.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/cuda/common/kernel_utils.cuh"

namespace jax_mla::cuda {

// An integer |c| < 2^22 as the bits of the float 1.5 * 2^23 + c: accumulating
// from this start makes the mma's int32 result a float after one subtraction.
// (One block of 32 products of int8 values is at most 32 * 127 * 128 < 2^22.)
constexpr int kMagicInt = 0x4B400000;
constexpr float kMagicFloat = 12582912.f;

// The float of the signed byte i of w ^ 0x80808080 (exact: 2^23 + 128 + q).
__device__ __forceinline__ float ByteToFloat(uint32_t w_flipped, int i) {
  return __int_as_float(int(__byte_perm(w_flipped, 0x4B000000u, 0x7650u + unsigned(i)))) -
         8388736.f;
}

// One block of 32 query values x * scale rounded to 8 bits with q8_0's rule
// (RoundQueryToQ8's arithmetic: float32, IEEE division and reciprocal): the
// int8 values into `packed` (4 a word, the first in the low byte), the
// block's float32 scale returned. `src` (16-byte aligned) is read only when
// `valid`; otherwise the block is zeros with scale 0.
template <typename T>
__device__ __forceinline__ float RoundQ8Block(const T* src, float scale, bool valid,
                                              uint32_t packed[8]) {
  float x[32];
  if (valid) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint4 v = s[c];
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < 8; ++i) x[c * 8 + i] = __fmul_rn(float(e[i]), scale);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 32; ++i) x[i] = 0.f;
  }
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(x[i]));
  const float d = __fdiv_rn(amax, 127.f);
  const float id = d != 0.f ? __frcp_rn(d) : 0.f;
#pragma unroll
  for (int w = 0; w < 8; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      word |= uint32_t(uint8_t(int8_t(roundf(__fmul_rn(x[w * 4 + i], id))))) << (8 * i);
    packed[w] = word;
  }
  return d;
}

}  // namespace jax_mla::cuda
