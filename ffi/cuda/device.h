#pragma once

namespace jax_mla::cuda {

// Multiprocessors of CUDA device `device`, or 0 when there is none.
int SmCount(int device);
// The CUDA runtime version this module was built against (e.g. 13000).
int RuntimeVersion();
// Whether the current device runs this module's sm_90a (wgmma) kernels: it
// is compute capability 9.0 and the module carries sm_90a code (a module
// built for sm_80 alone would run their empty sm_80 bodies). Cached per device.
bool RunsSm90a();

}  // namespace jax_mla::cuda
