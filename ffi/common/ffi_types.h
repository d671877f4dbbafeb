// Mapping from XLA FFI buffer types to the kernels' DType, and shape printing
// for error messages.
#pragma once

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include "ffi/common/dtype.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mla {

inline std::optional<DType> ToDType(xla::ffi::DataType t) {
  switch (t) {
    case xla::ffi::DataType::F32: return DType::kF32;
    case xla::ffi::DataType::F16: return DType::kF16;
    case xla::ffi::DataType::BF16: return DType::kBF16;
    default: return std::nullopt;
  }
}

template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << "]";
  return s.str();
}

// True when `dims` equals `expected` exactly.
template <typename Dims>
bool ShapeIs(const Dims& dims, std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) return false;
  size_t i = 0;
  for (int64_t e : expected)
    if (dims[i++] != e) return false;
  return true;
}

inline std::string ShapeString(std::initializer_list<int64_t> dims) {
  std::ostringstream s;
  s << "[";
  size_t i = 0;
  for (int64_t d : dims) s << (i++ ? ", " : "") << d;
  s << "]";
  return s.str();
}

// A K/V batch of kv_batch rows serves a query batch of `batch` rows when it is
// the same, or (a vmapped call sharing one cache) a divisor of it.
inline bool BatchSharable(int64_t batch, int64_t kv_batch) {
  return kv_batch == batch || (kv_batch > 0 && batch % kv_batch == 0);
}

// The split-KV partial results: [B, ns, Sq, H, Dv] and [B, ns, Sq, H] float32
// when num_splits > 1; unused (any shape, typically [0]) with one split.
template <typename Dims>
xla::ffi::Error CheckSplitPartials(const char* op, int64_t num_splits, int64_t B, int64_t Sq,
                                   int64_t H, int64_t Dv, const Dims& part_out,
                                   const Dims& part_lse) {
  if (num_splits < 1) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kInvalidArgument,
                           std::string(op) + ": num_splits must be >= 1, got " +
                               std::to_string(num_splits));
  }
  if (num_splits > 1 && !(ShapeIs(part_out, {B, num_splits, Sq, H, Dv}) &&
                          ShapeIs(part_lse, {B, num_splits, Sq, H}))) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kInvalidArgument,
                           std::string(op) + ": split partials must be " +
                               ShapeString({B, num_splits, Sq, H, Dv}) + " and " +
                               ShapeString({B, num_splits, Sq, H}) + ", got " +
                               ShapeString(part_out) + " and " + ShapeString(part_lse));
  }
  return xla::ffi::Error::Success();
}

}  // namespace jax_mla
