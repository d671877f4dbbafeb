// Where the seesaw MLA kernel's cycles go (benchmarks/NOTES.md, CUDA 7): the
// kernel of ffi/cuda/mla_sm90_kernel.cuh built with -DJAX_MLA_SEESAW_PROBE,
// which adds clock() counters around each wait, launched directly (no JAX) on
// random bf16 data for one decode row, timed with events, then once more to
// read the counters, printed as cycles per tile and warpgroup.
// Build and run (device, sm_90a):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DJAX_MLA_SM90A \
//     -DJAX_MLA_SEESAW_PROBE -I. benchmarks/gpu/seesaw_probe.cu -o /tmp/probe
//   /tmp/probe 128 128 8192 [num_splits]
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "ffi/cuda/mla_sm90_kernel.cuh"

using namespace jax_mla;
using namespace jax_mla::cuda;

constexpr const char* kSeesawProbeNames[13] = {
    "consumer: prologue (Q staged)",
    "consumer: (unused)",
    "consumer: full-barrier waits (TMA data) in Q.K issue",
    "consumer: pready wait (other warpgroup's P, alpha, m)",
    "consumer: wgmma wait for S_j",
    "consumer: wgmma wait for (B)'s P.V",
    "consumer: wgmma wait for own P.V",
    "consumer: whole tile loop",
    "consumer: epilogue",
    "consumer: tiles (count, not cycles)",
    "producer: wait for owner's release",
    "producer: wait for other's release",
    "producer: whole loop",
};

__global__ void Fill(__nv_bfloat16* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    x[i] = __float2bfloat16(float(h & 0xffff) / 65536.f - 0.5f);
  }
}

#define CHECK(x)                                                              \
  do {                                                                        \
    cudaError_t e = (x);                                                      \
    if (e != cudaSuccess) {                                                   \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));   \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

int main(int argc, char** argv) {
  if (argc < 4) {
    std::printf("usage: %s B H S [num_splits]\n", argv[0]);
    return 2;
  }
  const int64_t B = std::atoll(argv[1]), H = std::atoll(argv[2]), S = std::atoll(argv[3]);
  const int64_t ns = argc > 4 ? std::atoll(argv[4]) : 1;
  __nv_bfloat16 *q, *kv, *out;
  float *lse, *part_out = nullptr, *part_lse = nullptr;
  int32_t *kv_len, *q_pos;
  CHECK(cudaMalloc(&q, B * H * kMlaDk * 2));
  CHECK(cudaMalloc(&kv, B * S * kMlaDk * 2));
  CHECK(cudaMalloc(&out, B * H * kMlaDv * 2));
  CHECK(cudaMalloc(&lse, B * H * 4));
  if (ns > 1) {
    CHECK(cudaMalloc(&part_out, B * ns * H * kMlaDv * 4));
    CHECK(cudaMalloc(&part_lse, B * ns * H * 4));
  }
  CHECK(cudaMalloc(&kv_len, B * 4));
  CHECK(cudaMalloc(&q_pos, B * 4));
  Fill<<<1024, 256>>>(q, B * H * kMlaDk, 1);
  Fill<<<1024, 256>>>(kv, B * S * kMlaDk, 2);
  int32_t* host = new int32_t[B];
  for (int64_t b = 0; b < B; ++b) host[b] = int32_t(S);
  CHECK(cudaMemcpy(kv_len, host, B * 4, cudaMemcpyHostToDevice));
  for (int64_t b = 0; b < B; ++b) host[b] = int32_t(S - 1);
  CHECK(cudaMemcpy(q_pos, host, B * 4, cudaMemcpyHostToDevice));

  AttentionParams p;
  p.batch = p.kv_batch = B;
  p.seq_q = 1;
  p.heads_q = H;
  p.heads_kv = 1;
  p.seq_kv = S;
  p.dk = kMlaDk;
  p.dv = kMlaDv;
  p.scale = 0.0721f;
  p.q = q;
  p.q_dtype = DType::kBF16;
  p.k.data = kv;
  p.k.dtype = DType::kBF16;
  p.k.batch_stride = S * kMlaDk;
  p.k.row_stride = kMlaDk;
  p.k.head_stride = kMlaDk;
  p.v = p.k;
  p.v_in_k = 0;
  p.q_pos = q_pos;
  p.kv_len = kv_len;
  p.out = out;
  p.lse = lse;
  p.num_splits = ns;
  p.part_out = part_out;
  p.part_lse = part_lse;

  cudaStream_t st;
  CHECK(cudaStreamCreate(&st));
  for (int i = 0; i < 3; ++i) CHECK(LaunchMlaSm90<__nv_bfloat16>(p, st));
  CHECK(cudaStreamSynchronize(st));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  const int reps = 20;
  CHECK(cudaEventRecord(e0, st));
  for (int i = 0; i < reps; ++i) CHECK(LaunchMlaSm90<__nv_bfloat16>(p, st));
  CHECK(cudaEventRecord(e1, st));
  CHECK(cudaEventSynchronize(e1));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, e0, e1));
  const double t = ms / reps;
  const double flops = 2.0 * B * H * S * (kMlaDk + kMlaDv);
  std::printf("B %lld H %lld S %lld splits %lld: %.4f ms per call (%.0f TFLOP/s)\n",
              (long long)B, (long long)H, (long long)S, (long long)ns, t, flops / t * 1e-9);

  if (ns == 1) {  // a checksum to compare kernel variants by (JAX_MLA_CUDA_MLA_SEESAW)
    const int64_t count = B * H * kMlaDv;
    __nv_bfloat16* h = new __nv_bfloat16[count];
    CHECK(cudaMemcpy(h, out, count * 2, cudaMemcpyDeviceToHost));
    double sum = 0, sum_abs = 0;
    for (int64_t i = 0; i < count; ++i) {
      const double v = __bfloat162float(h[i]);
      sum += v * double(i % 7 + 1);
      sum_abs += v < 0 ? -v : v;
    }
    std::printf("checksum %.6e, sum |out| %.6e\n", sum, sum_abs);
    delete[] h;
  }
#ifdef JAX_MLA_SEESAW_PROBE
  unsigned long long zero[16] = {};
  CHECK(cudaMemcpyToSymbol(g_seesaw_probe, zero, sizeof(zero)));
  CHECK(LaunchMlaSm90<__nv_bfloat16>(p, st));
  CHECK(cudaStreamSynchronize(st));
  unsigned long long c[16];
  CHECK(cudaMemcpyFromSymbol(c, g_seesaw_probe, sizeof(c)));
  // Consumer slots are summed over both warpgroups of every block and slot 9
  // sums each warpgroup's n, so slot / slot 9 is a warpgroup's cycles per
  // tile; producer slots (one warp a block) divide by the blocks' tiles.
  const double wg_tiles = double(c[9]), tiles = wg_tiles / 2;
  std::printf("tiles %.0f; cycles per tile:\n", tiles);
  for (int i = 0; i < 13; ++i) {
    if (i == 1 || i == 9) continue;
    std::printf("  %-55s %9.0f\n", kSeesawProbeNames[i], double(c[i]) / (i < 10 ? wg_tiles : tiles));
  }
#endif
  return 0;
}
