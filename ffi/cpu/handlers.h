#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_mla::cpu {

// FFI handlers, registered as jax_mla_flash_attention / jax_mla_flash_mla.
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttention);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMla);
// The same ops over quantized caches (qs and scales passed separately).
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionQuant);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMlaQuant);
// Both over paged caches (the *_paged targets: a block table before q_pos).
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionPaged);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMlaPaged);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionQuantPaged);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMlaQuantPaged);
// The attention backward, jax_mla_flash_attention_bwd (flash_mla's too, with
// one KV head).
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionBwd);

}  // namespace jax_mla::cpu
