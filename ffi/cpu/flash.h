// The CPU driver shared by flash_attention and flash_mla: splits an
// AttentionParams problem into blocks of query rows x key ranges, runs them on
// the FFI thread pool through the ISA-selected kernels, normalizes, and merges
// split-KV partials by LSE.
#pragma once

#include "ffi/common/params.h"
#include "ffi/cpu/kernels.h"
#include "ffi/cpu/parallel.h"

namespace jax_mla::cpu {

// Query rows per block the driver aims for: all heads sharing a KV head times
// enough query positions to reach this many rows, so that each converted key
// tile is reused across many rows.
inline constexpr int64_t kTargetRows = 32;
// At most this many heads of one KV head go in a block (bounds the scratch).
inline constexpr int64_t kMaxHeadsPerBlock = 128;

// Validated parameters in, future out. Never reads keys at or past a row's
// visible end, so cache slots past kv_len may hold anything.
ffi::Future RunFlash(const AttentionParams& params, const KernelTable& kernels,
                     ffi::ThreadPool pool);

// The kernels JAX_MLA_CPU_ISA asks for now (read at every call, so a test can
// switch paths without restarting), or nullptr and an error naming the problem.
const KernelTable* CurrentKernels(ffi::Error* error);

}  // namespace jax_mla::cpu
