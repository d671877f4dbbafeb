#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_mla::cpu {

// FFI handlers, registered as jax_mla_flash_attention / jax_mla_flash_mla.
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttention);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMla);
// The same ops over quantized caches (qs and scales passed separately).
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionQuant);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashMlaQuant);
// The attention backward, jax_mla_flash_attention_bwd (flash_mla's too, with
// one KV head).
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFlashAttentionBwd);

}  // namespace jax_mla::cpu
