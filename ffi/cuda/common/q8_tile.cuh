// Device helpers of the kernels over 8-bit caches (q8_0, q8_kv;
// ffi/common/quant_format.h): the query rounded to 8 bits, the int8 tensor-core
// product, the 4-byte copies of the scales and the exact int8 -> float
// conversion. Shared by mla/mla_quant_kernel.cuh and
// attention/attention_quant_kernel.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ffi/cuda/common/kernel_utils.cuh"

namespace jax_mla::cuda {

// c = a * b on a 16x8x32 int8 tile, c initialized to `init` (s32 accumulation).
// Fragments as ldmatrix gives them from int8 rows (16 bytes a matrix row): A
// from the query rows, B from the key rows.
__device__ __forceinline__ void MmaS8(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1,
                                      int init) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%10,%10,%10};\n"
      : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(init));
}

// 4-byte asynchronous copy (the scales are only 4-byte aligned); zero-filled when !valid.
__device__ __forceinline__ void CpAsync4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}

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
