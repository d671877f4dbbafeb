// The attention kernels, compiled once per ISA level: CMake builds this file
// with -DJAX_MLA_ISA=<isa> and that ISA's target flags (generic, avx2,
// avx512), each copy in its own namespace so the copies never mix. Only
// isa.cc, after checking the CPU, hands out a copy's table.
//
// The loops are written so that the compiler vectorizes them without
// reassociating floating-point sums: scores accumulate over d with the keys of
// a tile in the vector lanes (K tile transposed), and P.V accumulates over t
// with the value dims in the lanes (V row-major). Every product and sum is
// float32; nothing is rounded to a narrower type.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "ffi/cpu/kernels.h"

#ifndef JAX_MLA_ISA
#error "JAX_MLA_ISA must be defined (generic, avx2 or avx512)"
#endif
#define JAX_MLA_STR2(x) #x
#define JAX_MLA_STR(x) JAX_MLA_STR2(x)

namespace jax_mla::cpu::JAX_MLA_ISA {
namespace {

void ToFloat(const void* src, DType dtype, float* dst, int64_t n) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, size_t(n) * sizeof(float));
      return;
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = BF16ToFloat(s[i]);
      return;
    }
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      int64_t i = 0;
#if defined(__F16C__)
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
#endif
      for (; i < n; ++i) dst[i] = F16ToFloat(s[i]);
      return;
    }
  }
}

const void* RowPtr(const KvRows& rows, int64_t t) {
  return static_cast<const char*>(rows.data) + t * rows.stride * DTypeBytes(rows.dtype);
}

void Attend(const RowBlock& rows, const KvRows& k, const KvRows& v, int64_t dk, int64_t dv,
            int64_t kv_begin, float* scratch) {
  constexpr int64_t T = kKvTile;
  float* kt = scratch;       // [dk, T] K tile, transposed
  float* vt = kt + dk * T;   // [T, dv] V tile
  float* s = vt + T * dv;    // [T]     scores of one row
  float* krow = s + T;       // [dk]    one K row being converted

  int64_t kv_end = kv_begin;
  for (int64_t r = 0; r < rows.n_rows; ++r) kv_end = std::max(kv_end, rows.end[r]);

  for (int64_t t0 = kv_begin; t0 < kv_end; t0 += T) {
    // Convert the tile once for all rows of the block. Keys past the block's
    // largest end are never read: they may lie past kv_len (and be garbage).
    const int64_t tn = std::min(T, kv_end - t0);
    for (int64_t t = 0; t < tn; ++t) {
      ToFloat(RowPtr(k, t0 + t), k.dtype, krow, dk);
      for (int64_t d = 0; d < dk; ++d) kt[d * T + t] = krow[d];
      ToFloat(RowPtr(v, t0 + t), v.dtype, vt + t * dv, dv);
    }
    for (int64_t t = tn; t < T; ++t)
      for (int64_t d = 0; d < dk; ++d) kt[d * T + t] = 0.f;

    for (int64_t r = 0; r < rows.n_rows; ++r) {
      const int64_t n = std::min(tn, rows.end[r] - t0);  // keys of this tile the row sees
      if (n <= 0) continue;
      const float* q = rows.q + r * dk;
      for (int64_t t = 0; t < T; ++t) s[t] = 0.f;
      for (int64_t d = 0; d < dk; ++d) {
        const float qd = q[d];
        const float* kd = kt + d * T;
        for (int64_t t = 0; t < T; ++t) s[t] += qd * kd[t];
      }
      float mx = s[0];
      for (int64_t t = 1; t < n; ++t) mx = std::max(mx, s[t]);
      const float m_old = rows.m[r];
      const float m_new = std::max(m_old, mx);
      // exp(-inf) = 0 covers the first tile (m_old = -inf, m_new finite).
      const float corr = std::exp(m_old - m_new);
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - m_new);
        sum += s[t];
      }
      rows.m[r] = m_new;
      rows.l[r] = rows.l[r] * corr + sum;
      float* o = rows.o + r * dv;
      if (corr != 1.f)
        for (int64_t d = 0; d < dv; ++d) o[d] *= corr;
      for (int64_t t = 0; t < n; ++t) {
        const float p = s[t];
        const float* vr = vt + t * dv;
        for (int64_t d = 0; d < dv; ++d) o[d] += p * vr[d];
      }
    }
  }
}

}  // namespace

extern const KernelTable kKernels;
const KernelTable kKernels = {JAX_MLA_STR(JAX_MLA_ISA), &Attend, &ToFloat};

}  // namespace jax_mla::cpu::JAX_MLA_ISA
