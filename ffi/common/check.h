// Argument checks that return an ffi::Error instead of aborting.
//
//   JAX_MLA_CHECK(q.dimensions().size() == 4, InvalidArgument)
//       << "q must have rank 4, got " << q.dimensions().size();
//
// The macro evaluates to `return ffi::Error(code, message)` when the condition
// fails; the message is built with ostream syntax so actual values can be
// named. Never exit, abort or assert on user input (STYLE.md #4).
#pragma once

#include <sstream>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_mla {

namespace ffi = xla::ffi;

class ErrorBuilder {
 public:
  explicit ErrorBuilder(ffi::ErrorCode code) : code_(code) {}
  template <typename T>
  ErrorBuilder& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }
  operator ffi::Error() const { return ffi::Error(code_, stream_.str()); }

 private:
  ffi::ErrorCode code_;
  std::ostringstream stream_;
};

}  // namespace jax_mla

// The `if {} else` form keeps a following `else` from binding to the macro.
#define JAX_MLA_CHECK(cond, code) \
  if (cond) {                     \
  } else                          \
    return ::jax_mla::ErrorBuilder(::xla::ffi::ErrorCode::k##code)

// Propagates a failed ffi::Error from a helper.
#define JAX_MLA_RETURN_IF_ERROR(expr)          \
  do {                                         \
    ::xla::ffi::Error jax_mla_err_ = (expr);   \
    if (jax_mla_err_.failure()) return jax_mla_err_; \
  } while (0)
