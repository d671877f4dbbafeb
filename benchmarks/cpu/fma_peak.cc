// The float32 FMA peak of one core: 12 independent FMA chains (enough to cover
// FMA latency on Zen 3 and Zen 4), best of 5 runs, for 256-bit and, where the
// CPU has it, 512-bit vectors. Built for AVX2; the AVX-512 loop carries its own
// target attribute and runs only after a CPU check, so the binary also runs on
// Zen 3. Run one copy per core to get the machine's peak.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace {

constexpr int kChains = 12;
constexpr long kIters = 50000000;

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double Avx2Gflops() {
  __m256 a[kChains];
  for (__m256& x : a) x = _mm256_set1_ps(1.f);
  const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-7f);
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < kIters; ++i) {
#pragma GCC unroll 12
    for (__m256& x : a) x = _mm256_fmadd_ps(x, mul, add);
  }
  const double s = Seconds(t0);
  float sum = 0;  // every chain feeds the result, so none is optimized away
  for (__m256& x : a) sum += _mm256_cvtss_f32(x);
  volatile float sink = sum;
  (void)sink;
  return kIters * kChains * 8 * 2.0 / s / 1e9;
}

__attribute__((target("avx512f"))) double Avx512Gflops() {
  __m512 a[kChains];
  for (__m512& x : a) x = _mm512_set1_ps(1.f);
  const __m512 mul = _mm512_set1_ps(0.999999f), add = _mm512_set1_ps(1e-7f);
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < kIters; ++i) {
#pragma GCC unroll 12
    for (__m512& x : a) x = _mm512_fmadd_ps(x, mul, add);
  }
  const double s = Seconds(t0);
  float sum = 0;
  for (__m512& x : a) sum += _mm512_cvtss_f32(x);
  volatile float sink = sum;
  (void)sink;
  return kIters * kChains * 16 * 2.0 / s / 1e9;
}

template <typename F>
double Best(F f) {
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) best = std::max(best, f());
  return best;
}

}  // namespace

int main() {
  __builtin_cpu_init();
  std::printf("fp32 FMA peak, 1 thread: avx2 %.1f GFLOP/s", Best(Avx2Gflops));
  if (__builtin_cpu_supports("avx512f")) std::printf(", avx512 %.1f GFLOP/s", Best(Avx512Gflops));
  std::printf("\n");
  return 0;
}
