// Mapping from XLA FFI buffer types to the kernels' DType, and shape printing
// for error messages.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

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

// "[2, 10, 576]" (plain appends; see check.h on why not iostreams).
template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
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
  return ShapeString(std::vector<int64_t>(dims));
}

// A K/V batch of kv_batch rows serves a query batch of `batch` rows when it is
// the same, or (a vmapped call sharing one cache) a divisor of it.
inline bool BatchSharable(int64_t batch, int64_t kv_batch) {
  return kv_batch == batch || (kv_batch > 0 && batch % kv_batch == 0);
}

}  // namespace jax_mla
