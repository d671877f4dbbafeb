// Device helpers shared by the CUDA kernels: the element types, tensor-core
// mma.sync (m16n8k16, f32 accumulation; m16n8k32 int8, s32), ldmatrix,
// cp.async, named barriers.
// Fragment layouts follow the PTX ISA "mma.m16n8k16" figures: with g = lane / 4
// and t = lane % 4, an A fragment holds (row g | g + 8, cols 2t.. | 2t + 8..),
// a B fragment (k 2t.. | 2t + 8.., col g), a C fragment (row g | g + 8, cols 2t, 2t + 1).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jax_mla::cuda {

// Packs two floats into the element type's 2-element register.
template <typename T>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t PackPair<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t PackPair<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// c += a * b on a 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void Mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void Mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

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

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements; lane l gives the address of row l % 8
// of matrix l / 8.
__device__ __forceinline__ void LdMatrixX4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}

// 16-byte asynchronous copy global -> shared; when !valid the destination is
// zero-filled and nothing is read (src is still a valid address).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
// 4-byte asynchronous copy (the scales are only 4-byte aligned); zero-filled when !valid.
__device__ __forceinline__ void CpAsync4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Barrier among `threads` threads of the block (id 0 is __syncthreads).
__device__ __forceinline__ void NamedBarrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads));
}

__device__ __forceinline__ float Exp2(float x) { return exp2f(x); }

// Online softmax over the two rows (lo, hi) a thread holds in an MMA
// accumulator fragment, each row spread over the 4 lanes of a quad (mma.sync
// m16n8 and wgmma m64nN alike). QuadRowMax: the rows' maxima over the quad.
__device__ __forceinline__ void QuadRowMax(float& mx_lo, float& mx_hi) {
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
}
// QuadRowSum: the rows' sums over the quad.
__device__ __forceinline__ void QuadRowSum(float& l_lo, float& l_hi) {
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
}
// The step from the running maxima m_* to mn_*: alpha rescales what was
// accumulated under m_*, mu is what each exp2 argument subtracts: 0 for a row
// that has seen no key yet (max -inf), so there is no inf - inf.
struct MaxStep {
  float mu_lo, mu_hi, al_lo, al_hi;
};
__device__ __forceinline__ MaxStep StepMax(float m_lo, float m_hi, float mn_lo, float mn_hi) {
  MaxStep r;
  r.mu_lo = mn_lo == -INFINITY ? 0.f : mn_lo;
  r.mu_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
  r.al_lo = Exp2(m_lo - r.mu_lo);
  r.al_hi = Exp2(m_hi - r.mu_hi);
  return r;
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace jax_mla::cuda
