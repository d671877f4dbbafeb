// Read bandwidth of the machine: T threads (default: all cores) each stream
// through their part of a 1 GiB buffer with 256-bit loads, best of 5 passes.
// The number the decode rows' GB/s should be held against (a decode that
// reads the cache once cannot beat it).
//
//   benchmarks/cpu/build.sh && /tmp/jax_mla_cpu_tools/mem_bw [threads]
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

// Sums 32-byte words so the loads cannot be dropped; the result is printed.
int64_t ReadSum(const __m256i* begin, const __m256i* end) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (const __m256i* p = begin; p + 4 <= end; p += 4) {
    a = _mm256_add_epi64(a, _mm256_load_si256(p));
    b = _mm256_add_epi64(b, _mm256_load_si256(p + 1));
    c = _mm256_add_epi64(c, _mm256_load_si256(p + 2));
    d = _mm256_add_epi64(d, _mm256_load_si256(p + 3));
  }
  a = _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d));
  int64_t out[4];
  std::memcpy(out, &a, sizeof(out));
  return out[0] + out[1] + out[2] + out[3];
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : int(std::thread::hardware_concurrency());
  const size_t bytes = size_t(1) << 30;
  auto* data = static_cast<__m256i*>(std::aligned_alloc(64, bytes));
  std::memset(data, 1, bytes);  // touch every page before timing
  const size_t words = bytes / sizeof(__m256i), per = words / threads;
  double best = 0;
  int64_t sink = 0;
  for (int pass = 0; pass < 5; ++pass) {
    std::vector<int64_t> sums(threads);
    std::vector<std::thread> pool;
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] { sums[t] = ReadSum(data + t * per, data + (t + 1) * per); });
    for (auto& th : pool) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int64_t x : sums) sink += x;
    best = std::max(best, double(per * threads * sizeof(__m256i)) / s / 1e9);
  }
  std::printf("read bandwidth, %d threads: %.1f GB/s (checksum %lld)\n", threads, best,
              static_cast<long long>(sink & 0xff));
  std::free(data);
  return 0;
}
