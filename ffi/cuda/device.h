#pragma once

namespace jax_mla::cuda {

// Multiprocessors of CUDA device `device`, or 0 when there is none.
int SmCount(int device);
// The CUDA runtime version this module was built against (e.g. 13000).
int RuntimeVersion();

}  // namespace jax_mla::cuda
