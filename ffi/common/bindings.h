// The FFI signatures of the ops, one per target name, shared by every backend
// so that one Python wrapper serves them all. `Ctx` is the backend's context
// (ffi::ThreadPool on the CPU, ffi::PlatformStream<cudaStream_t> on CUDA).
// The quantized-cache variants pass each cache's scales as the operand after
// its values and name the formats in attributes (QFormat numbering).
#pragma once

#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_mla {

namespace ffi = ::xla::ffi;

// Results and attributes common to both ops (Binding's methods take *this as
// an rvalue, hence the move).
template <typename Binding>
auto WithResults(Binding b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()         // out [B, Sq, Hq, Dv], q's dtype
      .template Ret<ffi::Buffer<ffi::F32>>()  // lse [B, Hq, Sq]
      .template Ret<ffi::Buffer<ffi::F32>>()  // part_out [B, ns, Sq, Hq, Dv] or [0]
      .template Ret<ffi::Buffer<ffi::F32>>()  // part_lse [B, ns, Sq, Hq] or [0]
      .template Attr<float>("scale")
      .template Attr<bool>("causal");
}

// jax_mla_flash_attention: (q, k, v, q_pos, kv_len) -> (out, lse, part_out, part_lse).
template <typename Ctx>
auto AttentionBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, Hq, Dk]
                         .template Arg<ffi::AnyBuffer>()          // k [B, Skv, Hkv, Dk]
                         .template Arg<ffi::AnyBuffer>()          // v [B, Skv, Hkv, Dv]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("num_splits");
}

// jax_mla_flash_attention_quant: k and v each float (its scales an unused
// placeholder) or quantized.
template <typename Ctx>
auto AttentionQuantBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, Hq, Dk]
                         .template Arg<ffi::AnyBuffer>()          // k or k.qs [B, Skv, Hkv, *]
                         .template Arg<ffi::AnyBuffer>()          // k.d (or a placeholder)
                         .template Arg<ffi::AnyBuffer>()          // v or v.qs [B, Skv, Hkv, *]
                         .template Arg<ffi::AnyBuffer>()          // v.d (or a placeholder)
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("num_splits")
      .template Attr<int64_t>("k_fmt")
      .template Attr<int64_t>("v_fmt");
}

// jax_mla_flash_mla: (q, kv, q_pos, kv_len) -> (out, lse, part_out, part_lse).
template <typename Ctx>
auto MlaBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, H, Dk]
                         .template Arg<ffi::AnyBuffer>()          // kv [B, Skv, Dk] latent rows
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("dv")
      .template Attr<int64_t>("v_offset")
      .template Attr<int64_t>("num_splits");
}

// jax_mla_flash_mla_quant: the latent cache as qs and its scales d.
template <typename Ctx>
auto MlaQuantBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, H, Dk]
                         .template Arg<ffi::AnyBuffer>()          // kv.qs [B, Skv, Dk or Dk*3/4]
                         .template Arg<ffi::AnyBuffer>()          // kv.d [B, Skv, Dk/32 or 1]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("dv")
      .template Attr<int64_t>("v_offset")
      .template Attr<int64_t>("num_splits")
      .template Attr<int64_t>("kv_fmt");
}

// The *_paged targets: the same operands over paged caches ([num_pages,
// page_size, ...]), with the block table (int32 [B, max_pages]) inserted
// right before q_pos.
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

template <typename Ctx>
auto MlaPagedBinding() {
  return WithResults(ffi::Ffi::Bind()
                         .template Ctx<Ctx>()
                         .template Arg<ffi::AnyBuffer>()          // q [B, Sq, H, Dk]
                         .template Arg<ffi::AnyBuffer>()          // kv [P, page, Dk] latent rows
                         .template Arg<ffi::Buffer<ffi::S32>>()   // block_table [B, max_pages]
                         .template Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                         .template Arg<ffi::Buffer<ffi::S32>>())  // kv_len [B]
      .template Attr<int64_t>("dv")
      .template Attr<int64_t>("v_offset")
      .template Attr<int64_t>("num_splits");
}

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

// jax_mla_flash_attention_bwd: (q, k, v, dout, lse, delta, q_pos, kv_len) ->
// (dq, dk, dv), the gradients in float32 (docs/design.md, "Backward kernels").
template <typename Ctx>
auto AttentionBwdBinding() {
  return ffi::Ffi::Bind()
      .template Ctx<Ctx>()
      .template Arg<ffi::AnyBuffer>()         // q [B, Sq, Hq, Dk]
      .template Arg<ffi::AnyBuffer>()         // k [B, Skv, Hkv, Dk]
      .template Arg<ffi::AnyBuffer>()         // v [B, Skv, Hkv, Dv]
      .template Arg<ffi::AnyBuffer>()         // dout [B, Sq, Hq, Dv]
      .template Arg<ffi::Buffer<ffi::F32>>()  // lse [B, Hq, Sq]
      .template Arg<ffi::Buffer<ffi::F32>>()  // delta [B, Hq, Sq]
      .template Arg<ffi::Buffer<ffi::S32>>()  // q_pos [B]
      .template Arg<ffi::Buffer<ffi::S32>>()  // kv_len [B]
      .template Ret<ffi::Buffer<ffi::F32>>()  // dq [B, Sq, Hq, Dk]
      .template Ret<ffi::Buffer<ffi::F32>>()  // dk [B, Skv, Hkv, Dk]
      .template Ret<ffi::Buffer<ffi::F32>>()  // dv [B, Skv, Hkv, Dv]
      .template Attr<float>("scale")
      .template Attr<bool>("causal");
}

}  // namespace jax_mla
