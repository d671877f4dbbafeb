// Single-thread microbenchmark of the CPU attention kernel (ffi/cpu/kernels.cc)
// without JAX: one block of R query rows over S keys of an f16 (or q8_0) cache,
// best of 15 runs. Use it to see what a kernel change does before timing whole
// calls (symbols intact, so `perf record` on it shows each kernel function).
//
//   benchmarks/cpu/build.sh && /tmp/jax_mla_cpu_tools/kernel_bench R S Dk Dv mla [q8_0]
//   (mla = 1: V is the first Dv columns of the K rows; JAX_MLA_CPU_ISA picks the path)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ffi/cpu/kernels.h"

using namespace jax_mla;
using namespace jax_mla::cpu;

int main(int argc, char** argv) {
  if (argc != 6 && argc != 7) {
    std::fprintf(stderr, "usage: %s R S Dk Dv mla(0|1) [f16|q8_0]\n", argv[0]);
    return 2;
  }
  const int64_t R = std::atoll(argv[1]), S = std::atoll(argv[2]), dk = std::atoll(argv[3]),
                dv = std::atoll(argv[4]);
  const bool mla = std::atoi(argv[5]) != 0;
  const bool q8 = argc == 7 && std::string(argv[6]) == "q8_0";
  std::string error;
  const KernelTable* kern = SelectKernels(&error);
  if (kern == nullptr) {
    std::fprintf(stderr, "%s\n", error.c_str());
    return 1;
  }
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  auto n = [](int64_t x) { return static_cast<size_t>(x); };
  std::vector<uint16_t> k(n(S * dk)), v(n(S * dv));
  for (auto& x : k) x = FloatToF16(normal(gen));
  for (auto& x : v) x = FloatToF16(normal(gen));
  std::vector<float> q(n(R * dk)), o(n(R * dv)), m(n(R)), l(n(R)),
      scratch(AttendScratchFloats(dk, dv, R));
  for (auto& x : q) x = 0.05f * normal(gen);
  std::vector<int64_t> end(n(R), S);
  const RowBlock rows{R, q.data(), end.data(), o.data(), m.data(), l.data()};
  KvRows krows{k.data(), DType::kF16, dk * 2};
  KvRows vrows{mla ? static_cast<const void*>(k.data()) : v.data(), DType::kF16,
               (mla ? dk : dv) * 2};
  // q8_0: int8 values in [-127, 127] and float16 scales, one per 32 values.
  std::uniform_int_distribution<int> byte(-127, 127);
  std::vector<int8_t> kq(n(S * dk)), vq(n(S * dv));
  for (auto& x : kq) x = int8_t(byte(gen));
  for (auto& x : vq) x = int8_t(byte(gen));
  std::vector<uint16_t> kd(n(S * dk / 32), FloatToF16(0.02f)), vd(n(S * dv / 32), FloatToF16(0.02f));
  if (q8) {
    krows = KvRows{kq.data(), DType::kF32, dk, QFormat::kQ8_0, kd.data(), dk / 32 * 2};
    vrows = mla ? krows : KvRows{vq.data(), DType::kF32, dv, QFormat::kQ8_0, vd.data(), dv / 32 * 2};
  }
  if (q8)
    for (int64_t r = 0; r < R; ++r) RoundQueryToQ8(q.data() + r * dk, dk);

  double best_us = 1e30;
  const char* reps_env = std::getenv("KERNEL_BENCH_REPS");  // more runs for a profile
  const int reps = reps_env != nullptr ? std::atoi(reps_env) : 15;
  for (int rep = 0; rep < reps; ++rep) {
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.f);
    std::fill(o.begin(), o.end(), 0.f);
    const auto t0 = std::chrono::steady_clock::now();
    kern->attend(rows, krows, vrows, mla ? 0 : -1, dk, dv, 0, scratch.data());
    const auto t1 = std::chrono::steady_clock::now();
    best_us = std::min(best_us, std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  const double flops = 2.0 * R * S * (dk + dv);
  std::printf("%s %s R=%lld S=%lld Dk=%lld Dv=%lld mla=%d: %.1f us, %.1f GFLOP/s (1 thread)\n",
              kern->isa, q8 ? "q8_0" : "f16", (long long)R, (long long)S, (long long)dk, (long long)dv, int(mla),
              best_us, flops / best_us / 1e3);
  return 0;
}
