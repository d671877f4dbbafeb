#pragma once

namespace jax_mla::cuda {

// Multiprocessors of CUDA device `device`, or 0 when there is none.
int SmCount(int device);
// The CUDA runtime version this module was built against (e.g. 13000).
int RuntimeVersion();
// Whether calls on the current device take the sm_90a (wgmma) kernels: the
// device is compute capability 9.0 and this module carries sm_90a code.
// JAX_MLA_CUDA_SM90=0 in the environment (read once) keeps every call on the
// mma.sync kernels, for comparisons on the same card. Cached per device.
bool UseSm90Kernels();

}  // namespace jax_mla::cuda
