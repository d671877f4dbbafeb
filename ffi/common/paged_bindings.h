// The FFI signatures of the paged targets (paged_args.h): each contiguous
// target's operands and attributes (bindings.h) with block_table (int32
// [B, max_pages]) inserted right before q_pos; the cache operands are page
// pools [num_pages, page_size, ...].
#pragma once

#include "ffi/common/bindings.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mla {

// jax_mla_flash_attention_paged: (q, k, v, block_table, q_pos, kv_len).
template <typename Ctx>
auto AttentionPagedBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, Hq, Dk]
                         .template Arg<ffi::AnyBuffer>()          // k [P, page, Hkv, Dk]
                         .template Arg<ffi::AnyBuffer>()          // v [P, page, Hkv, Dv]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // block_table [B, max_pages]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("num_splits");
}

// jax_mla_flash_attention_quant_paged.
template <typename Ctx>
auto AttentionQuantPagedBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, Hq, Dk]
                         .template Arg<ffi::AnyBuffer>()          // k or k.qs [P, page, Hkv, *]
                         .template Arg<ffi::AnyBuffer>()          // k.d (or a placeholder)
                         .template Arg<ffi::AnyBuffer>()          // v or v.qs [P, page, Hkv, *]
                         .template Arg<ffi::AnyBuffer>()          // v.d (or a placeholder)
                         .template Arg<ffi::Buffer<ffi::S32>>()   // block_table [B, max_pages]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("num_splits")
      .template Attr<int64_t>("k_fmt")
      .template Attr<int64_t>("v_fmt");
}

// jax_mla_flash_mla_paged: (q, kv, block_table, q_pos, kv_len).
template <typename Ctx>
auto MlaPagedBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, H, Dk]
                         .template Arg<ffi::AnyBuffer>()          // kv [P, page, Dk]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // block_table [B, max_pages]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("dv")
      .template Attr<int64_t>("v_offset")
      .template Attr<int64_t>("num_splits");
}

// jax_mla_flash_mla_quant_paged.
template <typename Ctx>
auto MlaQuantPagedBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, H, Dk]
                         .template Arg<ffi::AnyBuffer>()          // kv.qs [P, page, Dk or Dk*3/4]
                         .template Arg<ffi::AnyBuffer>()          // kv.d [P, page, Dk/32 or 1]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // block_table [B, max_pages]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("dv")
      .template Attr<int64_t>("v_offset")
      .template Attr<int64_t>("num_splits")
      .template Attr<int64_t>("kv_fmt");
}

}  // namespace jax_mla
