// The _cuda nanobind module: bindings only. It builds wherever nvcc exists and
// loads without a GPU (static cudart); the CUDA kernels register here as they
// land (issue: CUDA kernels), so registrations() is empty for now.
#include "ffi/cuda/device.h"
#include "nanobind/nanobind.h"

namespace nb = nanobind;

NB_MODULE(_cuda, m) {
  m.def("registrations", [] { return nb::dict(); });
  m.def("sm_count", &jax_mla::cuda::SmCount, nb::arg("device") = 0,
        "Multiprocessors of a CUDA device, 0 when there is none.");
  m.def("runtime_version", &jax_mla::cuda::RuntimeVersion);
}
