// Checks a K, V or latent cache operand, float or quantized, and describes its
// rows as a RowView. Shared by both ops on every backend: a float cache is one
// buffer [B, Skv, (Hkv,) D]; a quantized one is two, qs and d (its scales),
// with the format passed as an attribute (QFormat numbering).
#pragma once

#include <cstdint>
#include <string>

#include "ffi/common/check.h"
#include "ffi/common/ffi_types.h"
#include "ffi/common/params.h"
#include "ffi/common/quant_format.h"

namespace jax_mla {

// The logical shape of a cache: [batch, seq, heads, dim] (heads = 1 for the
// rank-3 MLA latent cache).
struct CacheShape {
  int64_t batch = 0, seq = 0, heads = 1, dim = 0;
};

// `scales` is null for a float cache (fmt_code 0). On success fills *shape
// and *view (strides included); the caller checks the dims against q's.
inline ffi::Error CacheRows(const char* op, const char* name, ffi::AnyBuffer data,
                            const ffi::AnyBuffer* scales, int64_t fmt_code, size_t rank,
                            CacheShape* shape, RowView* view) {
  const auto dd = data.dimensions();
  const char* layout = rank == 3 ? "[B, Skv, D]" : "[B, Skv, Hkv, D]";
  JAX_MLA_CHECK(IsValidQFormat(fmt_code), InvalidArgument)
      << op << ": " << name << " has unknown cache format code " << fmt_code
      << " (0 float, 1 q8_0, 2 q8_kv, 3 q6_0, 4 fp8_e4m3)";
  const QFormat fmt = static_cast<QFormat>(fmt_code);
  JAX_MLA_CHECK(dd.size() == rank, InvalidArgument)
      << op << ": " << name << " must have rank " << int64_t(rank) << " " << layout
      << ", got shape " << ShapeString(dd);
  const int64_t last = dd[rank - 1];
  shape->batch = dd[0];
  shape->seq = dd[1];
  shape->heads = rank == 4 ? dd[2] : 1;
  view->fmt = fmt;
  view->data = data.untyped_data();
  if (fmt == QFormat::kNone) {
    const auto dtype = ToDType(data.element_type());
    JAX_MLA_CHECK(dtype.has_value(), InvalidArgument)
        << op << ": " << name << " must be float32, float16 or bfloat16";
    view->dtype = *dtype;
    shape->dim = last;
  } else {
    const bool q6 = fmt == QFormat::kQ6_0, fp8 = fmt == QFormat::kFP8E4M3;
    const auto qs_type = q6 ? ffi::DataType::U8 : fp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::S8;
    JAX_MLA_CHECK(data.element_type() == qs_type, InvalidArgument)
        << op << ": " << name << ".qs of a " << QFormatName(fmt) << " cache must be "
        << (q6    ? "uint8"
            : fp8 ? "float8_e4m3fn"
                  : "int8");
    JAX_MLA_CHECK(!q6 || last % 24 == 0, InvalidArgument)
        << op << ": " << name << ".qs of a q6_0 cache must have a last axis that is a multiple "
        << "of 24 (bytes per block of 32), got shape " << ShapeString(dd);
    shape->dim = q6 ? last / 3 * 4 : last;
    JAX_MLA_CHECK(!IsBlockFormat(fmt) || shape->dim % kQBlock == 0, InvalidArgument)
        << op << ": " << name << " in " << QFormatName(fmt) << " needs a row width that is a "
        << "multiple of " << kQBlock << ", got " << shape->dim;
    JAX_MLA_CHECK(scales != nullptr, InvalidArgument)
        << op << ": " << name << " is quantized but has no scales";
    const int64_t n_scales = ScalesPerRow(fmt, shape->dim);
    const auto sd = scales->dimensions();
    bool scales_ok = sd.size() == rank && sd[rank - 1] == n_scales;
    for (size_t i = 0; scales_ok && i + 1 < rank; ++i) scales_ok = sd[i] == dd[i];
    const auto scale_type = IsRowScaled(fmt) ? ffi::DataType::F32 : ffi::DataType::F16;
    JAX_MLA_CHECK(scales_ok && scales->element_type() == scale_type, InvalidArgument)
        << op << ": " << name << ".d of a " << QFormatName(fmt) << " cache must be "
        << (IsRowScaled(fmt) ? "float32 " : "float16 ")
        << "with the shape of qs but a last axis of " << n_scales << ", got " << ShapeString(sd);
    view->scales = scales->untyped_data();
    view->scale_head_stride = n_scales;
    view->scale_row_stride = shape->heads * n_scales;
    view->scale_batch_stride = shape->seq * shape->heads * n_scales;
  }
  // Strides in elements of a float cache, in bytes of qs for a quantized one.
  view->head_stride = fmt == QFormat::kNone ? shape->dim : QsBytes(fmt, shape->dim);
  view->row_stride = shape->heads * view->head_stride;
  view->batch_stride = shape->seq * view->row_stride;
  if (rank == 3) view->head_stride = 0;
  return ffi::Error::Success();
}

// The view of columns [offset, offset + n) of the rows of `view` (MLA's V
// inside the latent rows). For the block formats offset must be a multiple of
// the block size (checked by the caller).
inline RowView ColumnSlice(RowView view, int64_t offset) {
  if (view.fmt == QFormat::kNone) {
    view.data = static_cast<const char*>(view.data) + offset * DTypeBytes(view.dtype);
    return view;
  }
  view.data = static_cast<const char*>(view.data) + QsBytes(view.fmt, offset);
  if (IsBlockFormat(view.fmt))
    view.scales = static_cast<const char*>(view.scales) + offset / kQBlock * ScaleBytes(view.fmt);
  return view;
}

}  // namespace jax_mla
