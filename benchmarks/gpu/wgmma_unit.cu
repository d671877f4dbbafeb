// Standalone check of ffi/cuda/common/wgmma.cuh on an sm_90a GPU: one m64n128 product
// per case against a host reference, on small integers (exact in bf16/f16 and
// float32), so any layout or descriptor mistake shows as a nonzero difference.
//   SS: D = A (64x128, K-major) * B^T (B 128x128, K-major): both from shared
//       memory, two 64-wide K blocks (the flash_attention S = Q K^T product).
//   RS: D = A (64x64, registers) * B (64x128 stored N-major): the P V product;
//       the N-major descriptor is tried with LBO / SBO both ways round.
//   The backward's (attention_bwd_sm90_kernel.cuh) products on 32-row tiles:
//   RS32: D = A (64x32, registers) * B (32x192 stored N-major, three 64-wide
//       blocks 32 * 128 bytes apart) as m64n128 (dV += P^T dO) and as three
//       m64n64 (dK += dS^T Q, WgmmaN64RS);
//   SS32: D = A (64x128, K-major) * B^T (B 32x128, K-major) as m64n32 (S^T = K Q^T).
// Build and run (device): nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I. \
//   benchmarks/gpu/wgmma_unit.cu -o /tmp/wgmma_unit && /tmp/wgmma_unit
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ffi/cuda/common/kernel_utils.cuh"
#include "ffi/cuda/common/wgmma.cuh"

using namespace jax_mla::cuda;

template <typename T>
__global__ void SSKernel(const T* a, const T* b, float* d) {
  __shared__ __align__(1024) char smem[64 * 256 + 128 * 256];
  char* sa = smem;
  char* sb = smem + 64 * 256;
  const int tid = threadIdx.x;
  for (int c = tid; c < 64 * 16; c += 128)
    *reinterpret_cast<uint4*>(sa + Swizzle128(64, c / 16, c % 16)) =
        reinterpret_cast<const uint4*>(a)[c];
  for (int c = tid; c < 128 * 16; c += 128)
    *reinterpret_cast<uint4*>(sb + Swizzle128(128, c / 16, c % 16)) =
        reinterpret_cast<const uint4*>(b)[c];
  FenceProxyAsync();
  __syncthreads();
  float acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const uint64_t da = SmemDesc128(SmemAddr(sa + (kk / 4) * 64 * 128 + (kk % 4) * 32), 16, 1024);
    const uint64_t db = SmemDesc128(SmemAddr(sb + (kk / 4) * 128 * 128 + (kk % 4) * 32), 16, 1024);
    WgmmaM64N128K16SS<T, 0>(acc, da, db, kk > 0);
  }
  WgmmaCommit();
  WgmmaWait<0>();
  const int warp = tid / 32, lane = tid % 32;
  for (int j = 0; j < 16; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + lane / 4 + (e / 2) * 8, col = 8 * j + 2 * (lane % 4) + e % 2;
      d[row * 128 + col] = acc[4 * j + e];
    }
}

template <typename T>
__global__ void RSKernel(const T* a, const T* b, float* d, uint32_t lbo, uint32_t sbo) {
  __shared__ __align__(1024) char smem[64 * 256];
  const int tid = threadIdx.x;
  for (int c = tid; c < 64 * 16; c += 128)  // B [64 k][128 n]: rows are k
    *reinterpret_cast<uint4*>(smem + Swizzle128(64, c / 16, c % 16)) =
        reinterpret_cast<const uint4*>(b)[c];
  FenceProxyAsync();
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  auto pair = [&](int row, int col) {
    return *reinterpret_cast<const uint32_t*>(a + row * 64 + col);
  };
  float acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  uint32_t frag[4][4];
  for (int kk = 0; kk < 4; ++kk) {
    frag[kk][0] = pair(16 * warp + g, 16 * kk + 2 * t);
    frag[kk][1] = pair(16 * warp + g + 8, 16 * kk + 2 * t);
    frag[kk][2] = pair(16 * warp + g, 16 * kk + 2 * t + 8);
    frag[kk][3] = pair(16 * warp + g + 8, 16 * kk + 2 * t + 8);
  }
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    WgmmaM64N128K16RS<T, 1>(acc, frag[kk], SmemDesc128(SmemAddr(smem + kk * 2048), lbo, sbo), 1);
  WgmmaCommit();
  WgmmaWait<0>();
  for (int j = 0; j < 16; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + g + (e / 2) * 8, col = 8 * j + 2 * t + e % 2;
      d[row * 128 + col] = acc[4 * j + e];
    }
}

template <typename T>
__global__ void RS32Kernel(const T* a, const T* b, float* d64, float* d128) {
  __shared__ __align__(1024) char smem[32 * 384];
  const int tid = threadIdx.x;
  for (int c = tid; c < 32 * 24; c += 128)  // B [32 k][192 n]: rows are k
    *reinterpret_cast<uint4*>(smem + Swizzle128(32, c / 24, c % 24)) =
        reinterpret_cast<const uint4*>(b)[c];
  FenceProxyAsync();
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  auto pair = [&](int row, int col) {
    return *reinterpret_cast<const uint32_t*>(a + row * 32 + col);
  };
  float acc[64], acc64[3][32];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
#pragma unroll
  for (int c = 0; c < 3; ++c)
#pragma unroll
    for (int i = 0; i < 32; ++i) acc64[c][i] = 0.f;
  uint32_t frag[2][4];
  for (int kk = 0; kk < 2; ++kk) {
    frag[kk][0] = pair(16 * warp + g, 16 * kk + 2 * t);
    frag[kk][1] = pair(16 * warp + g + 8, 16 * kk + 2 * t);
    frag[kk][2] = pair(16 * warp + g, 16 * kk + 2 * t + 8);
    frag[kk][3] = pair(16 * warp + g + 8, 16 * kk + 2 * t + 8);
  }
  const uint32_t base = SmemAddr(smem);
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    WgmmaM64N128K16RS<T, 1>(acc, frag[kk], SmemDesc128(base + kk * 2048, 32 * 128, 1024), 1);
#pragma unroll
    for (int c = 0; c < 3; ++c)
      WgmmaN64RS<T, 1>(acc64[c], frag[kk],
                       SmemDesc128(base + c * 32 * 128 + kk * 2048, 32 * 128, 1024), 1);
  }
  WgmmaCommit();
  WgmmaWait<0>();
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int row = 16 * warp + g + (e / 2) * 8;
#pragma unroll
    for (int j = 0; j < 16; ++j) d128[row * 128 + 8 * j + 2 * t + e % 2] = acc[4 * j + e];
#pragma unroll
    for (int c = 0; c < 3; ++c)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        d64[row * 192 + 64 * c + 8 * j + 2 * t + e % 2] = acc64[c][4 * j + e];
  }
}

template <typename T>
__global__ void SS32Kernel(const T* a, const T* b, float* d) {
  __shared__ __align__(1024) char smem[64 * 256 + 32 * 256];
  char* sa = smem;
  char* sb = smem + 64 * 256;
  const int tid = threadIdx.x;
  for (int c = tid; c < 64 * 16; c += 128)
    *reinterpret_cast<uint4*>(sa + Swizzle128(64, c / 16, c % 16)) =
        reinterpret_cast<const uint4*>(a)[c];
  for (int c = tid; c < 32 * 16; c += 128)
    *reinterpret_cast<uint4*>(sb + Swizzle128(32, c / 16, c % 16)) =
        reinterpret_cast<const uint4*>(b)[c];
  FenceProxyAsync();
  __syncthreads();
  float acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const uint64_t da = SmemDesc128(SmemAddr(sa + (kk / 4) * 64 * 128 + (kk % 4) * 32), 16, 1024);
    const uint64_t db = SmemDesc128(SmemAddr(sb + (kk / 4) * 32 * 128 + (kk % 4) * 32), 16, 1024);
    WgmmaN32<T, 0>(acc, da, db, kk > 0);
  }
  WgmmaCommit();
  WgmmaWait<0>();
  const int warp = tid / 32, lane = tid % 32;
  for (int j = 0; j < 4; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + lane / 4 + (e / 2) * 8, col = 8 * j + 2 * (lane % 4) + e % 2;
      d[row * 32 + col] = acc[4 * j + e];
    }
}

template <typename T>
int Run(const char* name) {
  int bad = 0;
  std::vector<float> fa(64 * 128), fb(128 * 128);
  for (auto& x : fa) x = float(rand() % 7 - 3);
  for (auto& x : fb) x = float(rand() % 7 - 3);
  std::vector<T> ha(fa.size()), hb(fb.size());
  for (size_t i = 0; i < fa.size(); ++i) ha[i] = T(fa[i]);
  for (size_t i = 0; i < fb.size(); ++i) hb[i] = T(fb[i]);
  T *da, *db;
  float* dd;
  cudaMalloc(&da, ha.size() * sizeof(T));
  cudaMalloc(&db, hb.size() * sizeof(T));
  cudaMalloc(&dd, 2 * 64 * 192 * sizeof(float));
  cudaMemcpy(da, ha.data(), ha.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(db, hb.data(), hb.size() * sizeof(T), cudaMemcpyHostToDevice);
  std::vector<float> got;
  auto report = [&](const char* what, const std::vector<float>& want, const float* from = nullptr) {
    cudaError_t err = cudaDeviceSynchronize();
    got.resize(want.size());
    cudaMemcpy(got.data(), from ? from : dd, got.size() * 4, cudaMemcpyDeviceToHost);
    double mx = 0;
    for (size_t i = 0; i < got.size(); ++i) mx = fmax(mx, fabs(got[i] - want[i]));
    printf("%s %s: %s, max|diff| %g -> %s\n", name, what, cudaGetErrorString(err), mx,
           mx == 0 && err == cudaSuccess ? "ok" : "FAIL");
    return mx == 0 && err == cudaSuccess;
  };
  {  // SS: A [64][128] K-major, B [128 n][128 k]
    std::vector<float> want(64 * 128, 0.f);
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 128; ++n) {
        float s = 0;
        for (int k = 0; k < 128; ++k) s += fa[m * 128 + k] * fb[n * 128 + k];
        want[m * 128 + n] = s;
      }
    SSKernel<T><<<1, 128>>>(da, db, dd);
    bad += !report("SS k-major", want);
  }
  {  // RS: A [64][64] (first 64*64 of fa), B [64 k][128 n]
    std::vector<float> want(64 * 128, 0.f);
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 128; ++n) {
        float s = 0;
        for (int k = 0; k < 64; ++k) s += fa[m * 64 + k] * fb[k * 128 + n];
        want[m * 128 + n] = s;
      }
    RSKernel<T><<<1, 128>>>(da, db, dd, 64 * 128, 1024);
    bad += !report("RS n-major LBO=8192 SBO=1024 (wgmma.cuh)", want);
    RSKernel<T><<<1, 128>>>(da, db, dd, 1024, 64 * 128);
    report("RS n-major LBO=1024 SBO=8192 (the other way, info only)", want);
  }
  {  // RS32: A [64][32] (first 64*32 of fa), B [32 k][192 n]
    std::vector<float> want64(64 * 192, 0.f), want128(64 * 128, 0.f);
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 192; ++n) {
        float s = 0;
        for (int k = 0; k < 32; ++k) s += fa[m * 32 + k] * fb[k * 192 + n];
        want64[m * 192 + n] = s;
        if (n < 128) want128[m * 128 + n] = s;
      }
    float* d128 = dd + 64 * 192;
    RS32Kernel<T><<<1, 128>>>(da, db, dd, d128);
    bad += !report("RS32 n-major m64n64 x3 (WgmmaN64RS, the backward's dK)", want64);
    bad += !report("RS32 n-major m64n128 (the backward's dV)", want128, d128);
  }
  {  // SS32: A [64][128] K-major, B [32 n][128 k]
    std::vector<float> want(64 * 32, 0.f);
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 32; ++n) {
        float s = 0;
        for (int k = 0; k < 128; ++k) s += fa[m * 128 + k] * fb[n * 128 + k];
        want[m * 32 + n] = s;
      }
    SS32Kernel<T><<<1, 128>>>(da, db, dd);
    bad += !report("SS32 k-major m64n32 (the backward's S^T)", want);
  }
  cudaFree(da);
  cudaFree(db);
  cudaFree(dd);
  return bad;
}

int main() {
  const int bad = Run<__nv_bfloat16>("bf16") + Run<__half>("f16");
  printf("wgmma unit: %s\n", bad ? "FAILED" : "all ok");
  return bad != 0;
}
