// Run-time choice among the kernel copies compiled for each ISA level
// (kernels.cc). A build carries all of them; the CPU decides which may run.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ffi/cpu/kernels.h"

namespace jax_mla::cpu {

#define JAX_MLA_DECLARE_ISA(isa)     \
  namespace isa {                    \
  extern const KernelTable kKernels; \
  }
#if JAX_MLA_HAVE_GENERIC
JAX_MLA_DECLARE_ISA(generic)
#endif
#if JAX_MLA_HAVE_AVX2
JAX_MLA_DECLARE_ISA(avx2)
#endif
#if JAX_MLA_HAVE_AVX512
JAX_MLA_DECLARE_ISA(avx512)
#endif
#undef JAX_MLA_DECLARE_ISA

namespace {

struct IsaEntry {
  const KernelTable* table;
  bool (*cpu_has)();
};

bool Always() { return true; }

#if defined(__x86_64__) || defined(_M_X64)
bool HasAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool HasAvx512() {
  __builtin_cpu_init();
  return HasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
}
#endif

// Best first.
const std::vector<IsaEntry>& Entries() {
  static const std::vector<IsaEntry> entries = {
#if JAX_MLA_HAVE_AVX512
      {&avx512::kKernels, &HasAvx512},
#endif
#if JAX_MLA_HAVE_AVX2
      {&avx2::kKernels, &HasAvx2},
#endif
#if JAX_MLA_HAVE_GENERIC
      {&generic::kKernels, &Always},
#endif
  };
  return entries;
}

std::string Join(bool only_supported) {
  std::string out;
  for (const IsaEntry& e : Entries()) {
    if (only_supported && !e.cpu_has()) continue;
    if (!out.empty()) out += ",";
    out += e.table->isa;
  }
  return out;
}

}  // namespace

std::string BuiltIsas() { return Join(false); }
std::string SupportedIsas() { return Join(true); }

const KernelTable* SelectKernels(std::string* error) {
  const char* env = std::getenv("JAX_MLA_CPU_ISA");
  const std::string want = (env == nullptr || *env == '\0') ? "auto" : env;
  for (const IsaEntry& e : Entries()) {
    if (want == "auto" && e.cpu_has()) return e.table;
    if (want == e.table->isa) {
      if (e.cpu_has()) return e.table;
      *error = "JAX_MLA_CPU_ISA=" + want +
               " but this CPU does not support it (supported: " + SupportedIsas() + ")";
      return nullptr;
    }
  }
  *error = "JAX_MLA_CPU_ISA=" + want + " is not one of auto," + BuiltIsas();
  return nullptr;
}

}  // namespace jax_mla::cpu
