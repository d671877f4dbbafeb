// flash_attention on the CPU: argument checks, parameter filling, and the
// hand-off to the shared driver (flash.cc). The checks repeat the Python ones
// (jax_mla/attention.py) so that no input reaches a kernel unchecked.
#include "ffi/cpu/handlers.h"

#include "ffi/common/attention_args.h"
#include "ffi/common/cache_args.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"
#include "ffi/cpu/flash.h"

namespace jax_mla::cpu {
namespace {

// k_d / v_d are null for a float k / v (format 0).
ffi::Error CheckAttention(ffi::AnyBuffer q, ffi::AnyBuffer k, const ffi::AnyBuffer* k_d,
                          int64_t k_fmt, ffi::AnyBuffer v, const ffi::AnyBuffer* v_d,
                          int64_t v_fmt, ffi::Buffer<ffi::S32> q_pos,
                          ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                          ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t num_splits,
                          AttentionParams* p) {
  const auto qd = q.dimensions();
  JAX_MLA_CHECK(qd.size() == 4, InvalidArgument)
      << "flash_attention: q must have rank 4 [B, Sq, Hq, Dk], got shape " << ShapeString(qd);
  const auto qt = ToDType(q.element_type());
  JAX_MLA_CHECK(qt.has_value(), InvalidArgument)
      << "flash_attention: q must be float32, float16 or bfloat16";
  CacheShape ks, vs;
  RowView k_rows, v_rows;
  if (auto e = CacheRows("flash_attention", "k", k, k_d, k_fmt, 4, &ks, &k_rows); e.failure())
    return e;
  if (auto e = CacheRows("flash_attention", "v", v, v_d, v_fmt, 4, &vs, &v_rows); e.failure())
    return e;
  const int64_t B = qd[0], Sq = qd[1], Hq = qd[2], Dk = qd[3];
  const int64_t Skv = ks.seq, Hkv = ks.heads, Dv = vs.dim;
  const auto k_shape = ShapeString({ks.batch, ks.seq, ks.heads, ks.dim});
  const auto v_shape = ShapeString({vs.batch, vs.seq, vs.heads, vs.dim});
  JAX_MLA_CHECK(ks.batch == vs.batch && BatchSharable(B, ks.batch), InvalidArgument)
      << "flash_attention: batch of k " << ks.batch << " and v " << vs.batch
      << " must equal q's " << B << " (or divide it, when a vmapped call shares the cache)";
  JAX_MLA_CHECK(ks.dim == Dk, InvalidArgument)
      << "flash_attention: k head dim " << ks.dim << " must equal q's " << Dk;
  JAX_MLA_CHECK(vs.seq == Skv && vs.heads == Hkv, InvalidArgument)
      << "flash_attention: v shape " << v_shape << " must match k " << k_shape
      << " in Skv and Hkv";
  JAX_MLA_CHECK(Hkv > 0 && Hq % Hkv == 0, InvalidArgument)
      << "flash_attention: Hq = " << Hq << " must be a multiple of Hkv = " << Hkv;
  JAX_MLA_CHECK(Dk % 16 == 0 && Dv % 16 == 0 && Dk > 0 && Dv > 0 && Dk <= kMaxHeadDim &&
                    Dv <= kMaxHeadDim,
                Unimplemented)
      << "flash_attention (CPU): head dims must be multiples of 16 up to " << kMaxHeadDim
      << ", got Dk = " << Dk << ", Dv = " << Dv;
  p->batch = B;
  p->kv_batch = ks.batch;
  p->seq_q = Sq;
  p->heads_q = Hq;
  p->heads_kv = Hkv;
  p->seq_kv = Skv;
  p->dk = Dk;
  p->dv = Dv;
  p->q = q.untyped_data();
  p->q_dtype = *qt;
  p->k = k_rows;
  p->v = v_rows;
  return SetPositionsAndOutputs("flash_attention", q_pos, kv_len, out, lse, part_out, part_lse,
                                num_splits, p);
}

ffi::Future FlashAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::Buffer<ffi::S32> q_pos,
                           ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::Buffer<ffi::F32>> lse,
                           ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                           ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                           int64_t num_splits) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(CheckAttention(q, k, nullptr, 0, v, nullptr, 0, q_pos, kv_len, out, lse,
                                   part_out, part_lse, num_splits, &p),
                    p, pool);
}

// K and V each float (format 0: its scales operand is an unused placeholder)
// or quantized.
ffi::Future FlashAttentionQuant(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                ffi::AnyBuffer k_d, ffi::AnyBuffer v, ffi::AnyBuffer v_d,
                                ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                                ffi::Result<ffi::AnyBuffer> out,
                                ffi::Result<ffi::Buffer<ffi::F32>> lse,
                                ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                                ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale,
                                bool causal, int64_t num_splits, int64_t k_fmt, int64_t v_fmt) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(CheckAttention(q, k, k_fmt ? &k_d : nullptr, k_fmt, v,
                                   v_fmt ? &v_d : nullptr, v_fmt, q_pos, kv_len, out, lse,
                                   part_out, part_lse, num_splits, &p),
                    p, pool);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttention, FlashAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // q [B, Sq, Hq, Dk]
                                  .Arg<ffi::AnyBuffer>()           // k [B, Skv, Hkv, Dk]
                                  .Arg<ffi::AnyBuffer>()           // v [B, Skv, Hkv, Dv]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // q_pos [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // kv_len [B]
                                  .Ret<ffi::AnyBuffer>()           // out [B, Sq, Hq, Dv]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse [B, Hq, Sq]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // part_out [B, ns, Sq, Hq, Dv] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // part_lse [B, ns, Sq, Hq] or [0]
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("num_splits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashAttentionQuant, FlashAttentionQuant,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // q [B, Sq, Hq, Dk]
                                  .Arg<ffi::AnyBuffer>()           // k or k.qs [B, Skv, Hkv, *]
                                  .Arg<ffi::AnyBuffer>()           // k.d (or a placeholder)
                                  .Arg<ffi::AnyBuffer>()           // v or v.qs [B, Skv, Hkv, *]
                                  .Arg<ffi::AnyBuffer>()           // v.d (or a placeholder)
                                  .Arg<ffi::Buffer<ffi::S32>>()    // q_pos [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // kv_len [B]
                                  .Ret<ffi::AnyBuffer>()           // out [B, Sq, Hq, Dv]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse [B, Hq, Sq]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // part_out
                                  .Ret<ffi::Buffer<ffi::F32>>()    // part_lse
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("num_splits")
                                  .Attr<int64_t>("k_fmt")          // QFormat: 0 float, 1 q8_0,
                                  .Attr<int64_t>("v_fmt"));        // 2 q8_kv, 3 q6_0

}  // namespace jax_mla::cpu
