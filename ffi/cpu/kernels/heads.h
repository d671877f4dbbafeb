// Few rows per KV head over several KV heads of a float cache: the GEMV
// scheme of gemv.h walked key-major across the heads (AttendHeadsAny).
//
// A fragment of ffi/cpu/kernels.cc, compiled once per ISA level inside its
// namespace (see common.h).
#pragma once

#include <algorithm>

#include "ffi/cpu/kernels/common.h"
#include "ffi/cpu/kernels/gemv.h"

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

// The same GEMV scheme over several KV heads, key-major: for each key the
// rows of all heads (adjacent in the cache) are read in turn, first for the
// scores of a block of keys, then for P.V. O rows stay in L1 meanwhile.
template <DType KT, DType VT>
void AttendHeads(const RowBlock* rows, int64_t nh, const KvHeads& kh, const KvHeads& vh, int64_t dk,
                 int64_t dv, int64_t kv_begin, float* scratch) {
  static_assert(kFew % W == 0, "the softmax block is whole vectors");
  const int64_t R = rows[0].n_rows;
  const KvRows &k = kh.head0, &v = vh.head0;
  const int64_t kb = kh.head_bytes, vb = vh.head_bytes;
  int64_t kv_end = kv_begin;
  for (int64_t u = 0; u < nh; ++u)
    for (int64_t r = 0; r < R; ++r) kv_end = std::max(kv_end, rows[u].end[r]);
  const F32 zero = F32::Zero();
  for (int64_t t0 = kv_begin; t0 < kv_end; t0 += kFew) {
    const int64_t nb = std::min(kFew, kv_end - t0);
    for (int64_t t = 0; t < nb; ++t) {
      const char* krow = static_cast<const char*>(RowPtr(k, t0 + t));
      for (int64_t u = 0; u < nh; ++u) {
        const void* kr = krow + u * kb;
        for (int64_t r = 0; r < R; ++r) {
          if (t0 + t >= rows[u].end[r]) continue;
          const float* q = rows[u].q + r * dk;
          F32 acc = zero;
          for (int64_t d = 0; d < dk; d += W)
            acc = simd::Fma(F32::Load(q + d), LoadAs<KT>(kr, d), acc);
          scratch[(u * R + r) * kFew + t] = simd::ReduceAdd(acc);
        }
      }
    }
    for (int64_t u = 0; u < nh; ++u) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = std::clamp<int64_t>(rows[u].end[r] - t0, 0, nb);
        float* s = scratch + (u * R + r) * kFew;
        if (n == 0) {
          std::fill(s, s + kFew, 0.f);  // P = 0: P.V below leaves the row alone
          continue;
        }
        const float corr = SoftmaxBlock(s, n, rows[u].m + r, rows[u].l + r);
        if (corr != 1.f) {
          float* o = rows[u].o + r * dv;
          for (int64_t d = 0; d < dv; d += W)
            simd::Mul(F32::Load(o + d), F32::Splat(corr)).Store(o + d);
        }
      }
    }
    for (int64_t t = 0; t < nb; ++t) {
      const char* vrow = static_cast<const char*>(RowPtr(v, t0 + t));
      for (int64_t u = 0; u < nh; ++u) {
        const void* vr = vrow + u * vb;
        for (int64_t r = 0; r < R; ++r) {
          const float p = scratch[(u * R + r) * kFew + t];
          if (p == 0.f) continue;  // past the row's end (or an underflowed weight)
          float* o = rows[u].o + r * dv;
          const F32 pv = F32::Splat(p);
          for (int64_t d = 0; d < dv; d += W)
            simd::Fma(pv, LoadAs<VT>(vr, d), F32::Load(o + d)).Store(o + d);
        }
      }
    }
  }
}

template <DType KT>
void AttendHeadsV(const RowBlock* rows, int64_t nh, const KvHeads& k, const KvHeads& v, int64_t dk,
                  int64_t dv, int64_t kv_begin, float* scratch) {
  switch (v.head0.dtype) {
    case DType::kF32:
      return AttendHeads<KT, DType::kF32>(rows, nh, k, v, dk, dv, kv_begin, scratch);
    case DType::kF16:
      return AttendHeads<KT, DType::kF16>(rows, nh, k, v, dk, dv, kv_begin, scratch);
    case DType::kBF16:
      return AttendHeads<KT, DType::kBF16>(rows, nh, k, v, dk, dv, kv_begin, scratch);
  }
}

void AttendHeadsAny(const RowBlock* rows, int64_t nh, const KvHeads& k, const KvHeads& v,
                    int64_t dk, int64_t dv, int64_t kv_begin, float* scratch) {
  switch (k.head0.dtype) {
    case DType::kF32: return AttendHeadsV<DType::kF32>(rows, nh, k, v, dk, dv, kv_begin, scratch);
    case DType::kF16: return AttendHeadsV<DType::kF16>(rows, nh, k, v, dk, dv, kv_begin, scratch);
    case DType::kBF16: return AttendHeadsV<DType::kBF16>(rows, nh, k, v, dk, dv, kv_begin, scratch);
  }
}

}  // namespace
}  // namespace jax_mla::cpu::JAX_MLA_ISA
