// The CUDA FFI handlers (defined in attention/attention.cu, attention_bwd.cu and
// mla/mla.cu) and
// the facts the Python side asks the module for (tile sizes, work items;
// split_inputs.cc).
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace jax_mla::cuda {

XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMla);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMlaQuant);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttention);
// Over 8-bit k and v caches (q8_0, q8_kv), contiguous.
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionQuant);
// The paged targets (ffi/common/paged_args.h).
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMlaPaged);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMlaQuantPaged);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionPaged);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionBwd);

// Keys per KV tile of the kernel serving head dim `dk` (num_splits is clamped
// to the number of tiles).
int KvTile(int64_t dk);
// Thread blocks a call makes without split-KV (the num_splits heuristic
// splits the keys when they do not fill the GPU).
int64_t WorkItems(int64_t batch, int64_t seq_q, int64_t heads_q, int64_t heads_kv, int64_t dk);
// flash_mla thread blocks that run at once on one SM, for `rows` = Sq * H
// query rows over a cache in format kv_fmt (QFormat numbering).
int MlaBlocksPerSm(int64_t rows, int64_t kv_fmt);

}  // namespace jax_mla::cuda
