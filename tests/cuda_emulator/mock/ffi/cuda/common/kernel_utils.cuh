// The device helpers of ffi/cuda/common/kernel_utils.cuh emulated on the host,
// so that the CUDA kernels' fragment logic runs without a GPU
// (tests/test_cuda_emulator.py): this file shadows the real one on the include
// path. One std::thread per CUDA thread of a block; the warp collectives
// (ldmatrix, mma.sync m16n8k16 and m16n8k32 int8, shuffles) exchange their
// operands through per-warp slots between two barriers, with the PTX ISA's
// fragment layouts; the products are float sums of the exact 16-bit inputs
// (int32 sums of the int8 ones). The few CUDA intrinsics the kernels over
// 8-bit caches use (ffi/cuda/common/q8_tile.cuh) are defined by their
// semantics. cp.async is a
// synchronous copy, so races are not emulated (compute-sanitizer's racecheck
// covers them on the GPU). The kernels that take shared addresses (SmemAddr:
// the sm_90a ones, mock wgmma.cuh) have their dynamic shared memory in
// smem_raw, at a shared address that is 16-byte aligned but not 1024-byte
// aligned, so their alignment to the swizzle period runs; their copies into
// it and the wgmma reads from it abort past the launch's size.
#pragma once
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct __nv_bfloat16 {
  uint16_t x;
  operator float() const;
};
struct __half {
  uint16_t x;
  operator float() const;
};
struct __half2 {
  __half x, y;
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
// Byte n of the result is byte (s >> 4n) & 7 of y:x.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = uint64_t(y) << 32 | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= unsigned(v >> (8 * ((s >> (4 * n)) & 7)) & 0xff) << (8 * n);
  return r;
}
// IEEE float32 arithmetic, round to nearest (the host compiles without contraction).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
// The paged kernels' table reads and page-size shift (ffi/cuda/common/cache_rows.cuh).
// The harness stores kUnreadEntry in the table entries past each row's
// kv_len, which a kernel may not read (docs/design.md, "Paged caches"): a
// read of one aborts, whatever the kernel would do with its value.
namespace emu {
inline constexpr int32_t kUnreadEntry = 0x7eadbeef;
}  // namespace emu
template <typename U>
inline U __ldg(const U* p) {
  if constexpr (sizeof(U) == sizeof(int32_t)) {
    if (*p == U(emu::kUnreadEntry)) {
      fprintf(stderr, "block-table entry past kv_len read\n");
      abort();
    }
  }
  return *p;
}
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 gridDim;

namespace emu {
inline float ToFloat(__nv_bfloat16 v) {
  uint32_t u = uint32_t(v.x) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float ToFloat(__half v) {
  _Float16 h;
  memcpy(&h, &v.x, 2);
  return float(h);
}
inline uint16_t Bf16Bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}
inline uint16_t HalfBits(float f) {
  _Float16 h = (_Float16)f;
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}
struct Warp {
  std::barrier<> bar{32};
  const char* ptr[32];
  uint32_t a[32][4], b[32][2];
  float f[32];
};
// A block of `threads` threads (128, or 512 for the MLA kernel's 64-row
// blocks): its barrier, its warps, and named barriers 1..4 of 128 threads
// (a row group of the MLA kernel).
struct Block {
  explicit Block(int threads = 128) : bar(threads) {}
  std::barrier<> bar;
  Warp warps[16];
  std::barrier<> named[5] = {std::barrier<>(128), std::barrier<>(128), std::barrier<>(128),
                             std::barrier<>(128), std::barrier<>(128)};
};
inline Block* block = nullptr;
inline Warp& MyWarp() { return block->warps[threadIdx.x / 32]; }
template <typename T>
inline float Elem(uint32_t w, int half) {
  T v;
  v.x = uint16_t(half ? w >> 16 : w & 0xffff);
  return ToFloat(v);
}
}  // namespace emu

inline __nv_bfloat16::operator float() const { return emu::ToFloat(*this); }
inline __half::operator float() const { return emu::ToFloat(*this); }
inline float __half2float(__half h) { return emu::ToFloat(h); }
inline float2 __half22float2(__half2 h) { return {emu::ToFloat(h.x), emu::ToFloat(h.y)}; }

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  auto& w = emu::MyWarp();
  const int lane = threadIdx.x % 32;
  w.f[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[lane ^ m];
  w.bar.arrive_and_wait();
  return r;
}

// The sm_90a kernels' dynamic shared memory (the others use the driver's own array).
namespace jax_mla::cuda {
alignas(1024) inline char smem_raw[240000];
}  // namespace jax_mla::cuda
namespace emu {
inline constexpr uint32_t kSharedBase = 0x190;  // smem_raw's shared address
inline size_t shared_bytes = 0;                 // the launch's dynamic shared memory
// Whether p is in smem_raw; then its `bytes` bytes must lie within the launch's size.
inline bool InShared(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  const char* base = jax_mla::cuda::smem_raw;
  if (c < base || c >= base + sizeof(jax_mla::cuda::smem_raw)) return false;
  if (size_t(c - base) + bytes > shared_bytes) {
    fprintf(stderr, "shared memory access at %zu + %zu past the launch's %zu bytes\n",
            size_t(c - base), bytes, shared_bytes);
    abort();
  }
  return true;
}
// The 16x16 A tile of a 16-bit m16n8k16 product from the warp's published
// fragments w.a (PTX layout: row g | g + 8, columns 2t.. | 8 + 2t..), the
// layout of a wgmma's register A per warp too.
template <typename T>
inline void GatherA16(const Warp& w, float A[16][16]) {
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = Elem<T>(w.a[l][0], h);
      A[g + 8][2 * t + h] = Elem<T>(w.a[l][1], h);
      A[g][2 * t + 8 + h] = Elem<T>(w.a[l][2], h);
      A[g + 8][2 * t + 8 + h] = Elem<T>(w.a[l][3], h);
    }
  }
}
}  // namespace emu

namespace jax_mla::cuda {
inline uint32_t SmemAddr(const void* p) {
  if (!emu::InShared(p, 1)) {
    fprintf(stderr, "SmemAddr of a pointer outside smem_raw\n");
    abort();
  }
  return uint32_t(emu::kSharedBase + (static_cast<const char*>(p) - smem_raw));
}

template <typename T>
inline uint32_t PackPair(float lo, float hi);
template <>
inline uint32_t PackPair<__nv_bfloat16>(float lo, float hi) {
  return emu::Bf16Bits(lo) | uint32_t(emu::Bf16Bits(hi)) << 16;
}
template <>
inline uint32_t PackPair<__half>(float lo, float hi) {
  return emu::HalfBits(lo) | uint32_t(emu::HalfBits(hi)) << 16;
}

template <typename T>
inline void Mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  auto& w = emu::MyWarp();
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  emu::GatherA16<T>(w, A);
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      B[2 * t + h][g] = emu::Elem<T>(w.b[l][0], h);
      B[2 * t + 8 + h][g] = emu::Elem<T>(w.b[l][1], h);
    }
  }
  w.bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + e % 2;
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[e] = acc;
  }
}

// c = init + a * b on a 16x8x32 int8 tile (A: row g | g + 8, bytes 4t.. | 16 + 4t..;
// B: k 4t.. | 16 + 4t.., col g).
inline void MmaS8(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, int init) {
  auto& w = emu::MyWarp();
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  int A[16][32], B[32][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      auto byte = [&](uint32_t v) { return int(int8_t(v >> (8 * i))); };
      A[g][4 * t + i] = byte(w.a[l][0]);
      A[g + 8][4 * t + i] = byte(w.a[l][1]);
      A[g][16 + 4 * t + i] = byte(w.a[l][2]);
      A[g + 8][16 + 4 * t + i] = byte(w.a[l][3]);
      B[4 * t + i][g] = byte(w.b[l][0]);
      B[16 + 4 * t + i][g] = byte(w.b[l][1]);
    }
  }
  w.bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + e % 2;
    int acc = init;
    for (int k = 0; k < 32; ++k) acc += A[row][k] * B[k][col];
    c[e] = acc;
  }
}

inline void LdMatrix(uint32_t r[4], const void* p, bool trans) {
  auto& w = emu::MyWarp();
  const int lane = threadIdx.x % 32;
  w.ptr[lane] = static_cast<const char*>(p);
  w.bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {
      memcpy(&lo, w.ptr[8 * m + g] + 4 * t, 2);
      memcpy(&hi, w.ptr[8 * m + g] + 4 * t + 2, 2);
    } else {
      memcpy(&lo, w.ptr[8 * m + 2 * t] + 2 * g, 2);
      memcpy(&hi, w.ptr[8 * m + 2 * t + 1] + 2 * g, 2);
    }
    r[m] = lo | uint32_t(hi) << 16;
  }
  w.bar.arrive_and_wait();
}
inline void LdMatrixX4(uint32_t r[4], const void* p) { LdMatrix(r, p, false); }
inline void LdMatrixX4Trans(uint32_t r[4], const void* p) { LdMatrix(r, p, true); }
inline void CpAsync16(void* smem, const void* gmem, bool valid) {
  emu::InShared(smem, 16);  // bounds, where smem is in smem_raw
  if (valid)
    memcpy(smem, gmem, 16);
  else
    memset(smem, 0, 16);
}
// Named barrier `id` of 128 threads (the MLA kernel's row groups).
inline void NamedBarrier(int id, int threads) {
  assert(threads == 128 && id >= 1 && id <= 4);
  emu::block->named[id].arrive_and_wait();
}
inline void CpAsync4(void* smem, const void* gmem, bool valid) {
  if (valid)
    memcpy(smem, gmem, 4);
  else
    memset(smem, 0, 4);
}
inline void CpAsyncCommit() {}
template <int N>
inline void CpAsyncWait() {}
inline float Exp2(float x) { return exp2f(x); }
inline void QuadRowMax(float& mx_lo, float& mx_hi) {
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
}
inline void QuadRowSum(float& l_lo, float& l_hi) {
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
}
struct MaxStep {
  float mu_lo, mu_hi, al_lo, al_hi;
};
inline MaxStep StepMax(float m_lo, float m_hi, float mn_lo, float mn_hi) {
  MaxStep r;
  r.mu_lo = mn_lo == -INFINITY ? 0.f : mn_lo;
  r.mu_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
  r.al_lo = Exp2(m_lo - r.mu_lo);
  r.al_hi = Exp2(m_hi - r.mu_hi);
  return r;
}
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
}  // namespace jax_mla::cuda
