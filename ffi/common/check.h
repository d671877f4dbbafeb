// Argument checks that return an ffi::Error instead of aborting.
//
//   JAX_MLA_CHECK(q.dimensions().size() == 4, InvalidArgument)
//       << "q must have rank 4, got " << q.dimensions().size();
//
// The macro evaluates to `return ffi::Error(code, message)` when the condition
// fails; the message is built with ostream syntax so actual values can be
// named. Never exit, abort or assert on user input (docs/design.md, "Backends and errors").
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_mla {

namespace ffi = xla::ffi;

// Builds the message with plain string appends, not iostreams: a module that
// carries its own static copy of libstdc++ (some toolchains link it that
// way) may find the stream locale machinery uninitialized and crash in
// operator<<, as seen with GCC 13 on the GPU machine.
class ErrorBuilder {
 public:
  explicit ErrorBuilder(ffi::ErrorCode code) : code_(code) {}
  ErrorBuilder& operator<<(const char* text) {
    message_ += text;
    return *this;
  }
  ErrorBuilder& operator<<(const std::string& text) {
    message_ += text;
    return *this;
  }
  template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
  ErrorBuilder& operator<<(T value) {
    message_ += std::to_string(value);
    return *this;
  }
  operator ffi::Error() const { return ffi::Error(code_, message_); }

 private:
  ffi::ErrorCode code_;
  std::string message_;
};

}  // namespace jax_mla

// The `if {} else` form keeps a following `else` from binding to the macro.
#define JAX_MLA_CHECK(cond, code) \
  if (cond) {                     \
  } else                          \
    return ::jax_mla::ErrorBuilder(::xla::ffi::ErrorCode::k##code)

// Propagates a failed ffi::Error from a helper.
#define JAX_MLA_RETURN_IF_ERROR(expr)                \
  do {                                               \
    ::xla::ffi::Error jax_mla_err_ = (expr);         \
    if (jax_mla_err_.failure()) return jax_mla_err_; \
  } while (0)
