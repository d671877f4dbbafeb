// The CPU driver of the attention backward: cuts an AttentionBwdParams
// problem into work items that each own their result rows and runs them on
// the FFI thread pool through the ISA-selected kernels (kernels/backward.h).
#pragma once

#include "ffi/common/params.h"
#include "ffi/cpu/parallel.h"

namespace jax_mla::cpu {

// A handler's last step: the future of `params` if `checked` (the result of
// its argument checks) succeeded and the kernels JAX_MLA_CPU_ISA asks for are
// available, else a future holding the error. Keys at or past a row's
// visible end are never read, so cache slots past kv_len may hold anything;
// their dK and dV rows are 0.
ffi::Future RunBackwardChecked(ffi::Error checked, const AttentionBwdParams& params,
                               ffi::ThreadPool pool);

}  // namespace jax_mla::cpu
