// flash_mla on the CPU: one latent KV head; K is the whole latent row and V is
// dv columns of the same row starting at v_offset, read in place (no V copy).
// Checks, parameters, then the shared driver (flash.cc) with split-KV.
#include "ffi/common/attention_args.h"
#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"
#include "ffi/cpu/flash.h"
#include "ffi/cpu/handlers.h"

namespace jax_mla::cpu {
namespace {

ffi::Error CheckMla(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> q_pos,
                    ffi::Buffer<ffi::S32> kv_len, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::Buffer<ffi::F32>> lse,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> part_lse, int64_t dv, int64_t v_offset,
                    int64_t num_splits, AttentionParams* p) {
  const auto qd = q.dimensions(), kd = kv.dimensions();
  JAX_MLA_CHECK(qd.size() == 4, InvalidArgument)
      << "flash_mla: q must have rank 4 [B, Sq, H, Dk], got shape " << ShapeString(qd);
  JAX_MLA_CHECK(kd.size() == 3, InvalidArgument)
      << "flash_mla: kv must have rank 3 [B, Skv, Dk], got shape " << ShapeString(kd);
  const auto qt = ToDType(q.element_type()), kt = ToDType(kv.element_type());
  JAX_MLA_CHECK(qt && kt, InvalidArgument)
      << "flash_mla: q and kv must be float32, float16 or bfloat16";
  const int64_t B = qd[0], Sq = qd[1], H = qd[2], Dk = qd[3], Skv = kd[1];
  JAX_MLA_CHECK(BatchSharable(B, kd[0]) && kd[2] == Dk, InvalidArgument)
      << "flash_mla: kv shape " << ShapeString(kd) << " must be [" << B << ", Skv, " << Dk
      << "] to match q " << ShapeString(qd)
      << " (its batch may divide q's when a vmapped call shares the cache)";
  JAX_MLA_CHECK(dv > 0 && v_offset >= 0 && v_offset + dv <= Dk, InvalidArgument)
      << "flash_mla: the V slice [v_offset, v_offset + dv) = [" << v_offset << ", "
      << v_offset + dv << ") must lie inside the row of " << Dk;
  JAX_MLA_CHECK(Dk % 16 == 0 && dv % 16 == 0 && Dk <= kMaxHeadDim, Unimplemented)
      << "flash_mla (CPU): Dk and dv must be multiples of 16 with Dk <= " << kMaxHeadDim
      << ", got Dk = " << Dk << ", dv = " << dv;
  p->batch = B;
  p->kv_batch = kd[0];
  p->seq_q = Sq;
  p->heads_q = H;
  p->heads_kv = 1;
  p->seq_kv = Skv;
  p->dk = Dk;
  p->dv = dv;
  p->q = q.untyped_data();
  p->q_dtype = *qt;
  p->k = RowView{kv.untyped_data(), *kt, Skv * Dk, Dk, 0};
  // V is a view of the same rows, shifted by v_offset elements.
  p->v = RowView{static_cast<const char*>(kv.untyped_data()) + v_offset * DTypeBytes(*kt), *kt,
                 Skv * Dk, Dk, 0};
  p->v_in_k = v_offset;
  return SetPositionsAndOutputs("flash_mla", q_pos, kv_len, out, lse, part_out, part_lse,
                                num_splits, p);
}

ffi::Future FlashMla(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                     ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len,
                     ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                     ffi::Result<ffi::Buffer<ffi::F32>> part_out,
                     ffi::Result<ffi::Buffer<ffi::F32>> part_lse, float scale, bool causal,
                     int64_t dv, int64_t v_offset, int64_t num_splits) {
  AttentionParams p;
  p.scale = scale;
  p.causal = causal;
  return RunChecked(CheckMla(q, kv, q_pos, kv_len, out, lse, part_out, part_lse, dv, v_offset,
                             num_splits, &p),
                    p, pool);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashMla, FlashMla,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q [B, Sq, H, Dk]
                                  .Arg<ffi::AnyBuffer>()          // kv [B, Skv, Dk] latent rows
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_len [B]
                                  .Ret<ffi::AnyBuffer>()          // out [B, Sq, H, dv]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse [B, H, Sq]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // part_out [B, ns, Sq, H, dv] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // part_lse [B, ns, Sq, H] or [0]
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("dv")
                                  .Attr<int64_t>("v_offset")
                                  .Attr<int64_t>("num_splits"));

}  // namespace jax_mla::cpu
